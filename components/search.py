"""Steps of the modality-combination search (``pipelines/search.py``), thin over ``dfu_ml.search``.

Per fold the search splits patients once (``split_search_fold``), fits the clinical model once
(the main job's ``clinical_forest`` on the split's clinical view), pre-trains each image modality
once (``pretrain_shared_encoder``), gathers the encoders into one artifact (``gather_encoders``)
and trains Stage 1 then Stage 2 of every image combination from them (``fuse_combination``); the
fold's results are gathered (``gather_fold_results``) and compared over folds
(``evaluate_search``). The final fit runs the same steps on all patients for the final model's
members, and ``bundle_search`` bundles them. Each step reads its view's fold plan from the split
(``views/<view>/fold_plan.json``) and the view's configuration from the search's.

As in every step module, each ``run_<step>`` is a plain function over local folders that the KFP
function calls, and ``main`` is the same step as a command line (``python -m components.search
<step> ...``).
"""

import argparse
from pathlib import Path
from typing import List  # noqa: UP035 - KFP reads typing.List annotations

from kfp.dsl import HTML, Dataset, Input, Markdown, Metrics, Model, Output

from components.common import (
    FOLD_RESULT_FILE,
    PLAN_FILE,
    cli,
    read_json,
    write_json,
)
from dfu_ml.config import Config
from dfu_ml.errors import DataError

SPLIT_FILE = "split.json"
VIEWS_DIR = "views"
FOLD_RESULTS_FILE = "fold_results.json"
SEARCH_FILE = "search.json"
# Written instead of a model by a final-fit step whose view the final model does not use.
SKIPPED_FILE = "skipped.json"


def view_plan_dir(split: Path, view: str) -> Path:
    """Where the split keeps one view's fold plan (a folder holding fold_plan.json)."""
    return Path(split) / VIEWS_DIR / view


def final_epochs(final_fit: Path | None, view: str, stage: str) -> int:
    """Epochs for ``stage`` of ``view`` in the final fit (from search.json), 0 for a CV fold."""
    if final_fit is None:
        return 0
    return int(read_json(Path(final_fit) / SEARCH_FILE)["final_fit_epochs"][view][stage])


def skipped_in_final_fit(final_fit: Path | None, view: str, out: Path, pretraining: bool) -> bool:
    """In the final fit, a view the final model does not use is not trained (an encoder no
    member needs, a combination that is not a member): say so in ``out`` and return True."""
    from dfu_ml.search import parse_combination

    if final_fit is None:
        return False
    members = read_json(Path(final_fit) / SEARCH_FILE)["final_model"]["members"]
    used = {m for name in members for m in parse_combination(name)} if pretraining else members
    if view in used:
        return False
    write_json(Path(out) / SKIPPED_FILE, {"view": view, "final_model_members": members})
    print(f"final fit: the final model ({', '.join(members)}) does not use {view}; skipped")
    return True


# --- split ----------------------------------------------------------------------------------------
def run_split(
    prepared: Path, fold: int, config: Config, combinations: list[str], out: Path
) -> dict:
    """Write the fold's shared split into ``out``: ``split.json`` (patients, combinations),
    ``views/<view>/fold_plan.json`` per view, and the clinical view's plan as ``fold_plan.json``
    (so that the clinical forest step reads the split as its fold plan)."""
    from dfu_ml.data.prepare import load_prepared
    from dfu_ml.search import BASELINE, SearchSettings
    from dfu_ml.search.folds import split_fold

    names = list(SearchSettings.from_values(combinations).combinations)
    split = split_fold(load_prepared(prepared), config, fold, names)
    out = Path(out)
    for view, plan in split["views"].items():
        write_json(view_plan_dir(out, view) / PLAN_FILE, plan)
    write_json(out / PLAN_FILE, split["views"][BASELINE])
    write_json(
        out / SPLIT_FILE,
        {**{k: v for k, v in split.items() if k != "views"}, "combinations": names},
    )
    label = "final fit" if fold < 0 else f"fold {fold}"
    print(
        f"{label}: {len(split['train_patients'])} training and {len(split['val_patients'])} "
        f"validation patients, shared by {len(names)} combinations; rows per view: "
        + ", ".join(
            f"{view} {len(p['train_rows'])}/{len(p['val_rows'])}"
            for view, p in split["views"].items()
        ),
        flush=True,
    )
    return split


def split_search_fold(
    prepared: Input[Dataset],
    fold: int,
    config: Input[Dataset],
    combinations: List[str],
    split: Output[Dataset],
    clinical_config: Output[Dataset],
) -> List[str]:
    """Assign the fold's patients once for every combination and plan each view's rows from that
    split: the clinical rows, each image modality's, each image combination's. Checks that the
    data has every modality a combination needs, before anything trains. Returns the image
    modalities to pre-train in this fold.

    Args:
        prepared: the prepared dataset.
        fold: fold number, or -1 for the final fit on all patients.
        config: the search's resolved configuration (config.json).
        combinations: the combinations compared (metadata-only is always among them).
        split: split.json, the clinical view's fold_plan.json, and views/<view>/fold_plan.json.
        clinical_config: the clinical view's configuration (metadata only), for the forest.
    """
    from pathlib import Path

    from components.common import resolve_config
    from components.search import run_split
    from dfu_ml.search import BASELINE, SearchSettings, view_config

    search = resolve_config(config.path)
    run_split(Path(prepared.path), fold, search, list(combinations), Path(split.path))
    Path(clinical_config.path).write_text(view_config(search, BASELINE).to_json())
    settings = SearchSettings.from_values(list(combinations))
    split.metadata.update({"fold": fold, "combinations": len(settings.combinations)})
    return settings.pretrain_modalities


# --- shared pre-training --------------------------------------------------------------------------
def run_pretrain_shared(
    prepared: Path,
    split: Path,
    modality: str,
    config: Config,
    out: Path,
    final_fit: Path | None = None,
) -> dict | None:
    """Pre-train ``modality``'s encoder once for the fold (on the rows that have it) into
    ``out``; None when the final model does not use it."""
    from components.pretrain_image import run_pretrain_image
    from dfu_ml.search import view_config

    if skipped_in_final_fit(final_fit, modality, out, pretraining=True):
        return None
    return run_pretrain_image(
        prepared,
        view_plan_dir(split, modality),
        modality,
        view_config(config, modality),
        out,
        final_epochs(final_fit, modality, "pretrain"),
    )


def pretrain_shared_encoder(
    prepared: Input[Dataset],
    split: Input[Dataset],
    modality: str,
    config: Input[Dataset],
    encoder: Output[Model],
    metrics: Output[Metrics],
    final_fit: Input[Dataset] = None,
):
    """Pre-train one image modality's encoder once for the fold, on the training patients' image
    sets that have that modality (focal loss with equal alpha, early stopping on validation
    kappa); every combination with this modality loads it.

    Args:
        prepared: the prepared dataset.
        split: the fold's shared split.
        modality: depth_rgb, depth_map, thermal_rgb or thermal_map.
        config: the search's resolved configuration (config.json).
        final_fit: for the final fit, the search summary (epochs, final-model members); absent
            for cross-validation folds.
        encoder: the encoder artifact (encoder.keras, encoder.json), or skipped.json.
        metrics: best epoch, validation kappa, trainable parameters, steps per epoch.
    """
    from pathlib import Path

    from components.common import log_stage_metrics, resolve_config
    from components.search import run_pretrain_shared

    summary = run_pretrain_shared(
        Path(prepared.path),
        Path(split.path),
        modality,
        resolve_config(config.path),
        Path(encoder.path),
        None if final_fit is None else Path(final_fit.path),
    )
    encoder.metadata["modality"] = modality
    if summary is not None:
        log_stage_metrics(metrics, summary, prefix=f"{modality}_")
        encoder.metadata["best_epoch"] = summary["best_epoch"]


def run_gather_encoders(encoders: list[Path], out: Path) -> list[Path]:
    """Copy the fold's trained encoders into ``out/<n>/`` (the fusion step maps them by the
    modality each one's description names); return the folders."""
    import shutil

    trained = [Path(e) for e in encoders if not (Path(e) / SKIPPED_FILE).is_file()]
    Path(out).mkdir(parents=True, exist_ok=True)
    gathered = [Path(out) / str(i) for i in range(len(trained))]
    for source, target in zip(trained, gathered):
        shutil.copytree(source, target)
    return gathered


def gather_encoders(
    encoders: Input[list[Model]], combinations: List[str], fold_encoders: Output[Model]
) -> List[str]:
    """Gather the fold's pre-trained encoders into one artifact, one folder per modality, which
    every combination's fusion step of the fold reads (KFP cannot hand a loop's collected
    outputs to the tasks of a sibling loop). Returns the image combinations that fuse them.

    Args:
        encoders: the fold's encoder artifacts, one per modality.
        combinations: the combinations compared.
        fold_encoders: the encoders, in <modality>/ folders.
    """
    from pathlib import Path

    from components.search import run_gather_encoders
    from dfu_ml.search import SearchSettings

    gathered = run_gather_encoders([Path(e.path) for e in encoders], Path(fold_encoders.path))
    fold_encoders.metadata["encoders"] = len(gathered)
    return SearchSettings.from_values(list(combinations)).image_combinations


# --- Stage 1 and Stage 2 per combination ----------------------------------------------------------
def _file_digest(path: Path) -> str:
    import hashlib

    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]


def run_fuse_combination(
    prepared: Path,
    split: Path,
    combination: str,
    rf: Path,
    encoders: Path,
    config: Config,
    out: Path,
    final_fit: Path | None = None,
) -> dict | None:
    """Stage 1 then Stage 2 of one image combination on the fold's shared split and encoders;
    writes the model and ``fold_result.json`` (with the combination and the digests of the
    encoders it loaded) into ``out``. None when the final model does not use it."""
    if skipped_in_final_fit(final_fit, combination, out, pretraining=False):
        return None
    import tempfile

    from components.stage1 import encoder_dirs_by_modality, run_stage1
    from components.stage2 import run_stage2
    from dfu_ml.search import view_config
    from dfu_ml.training.models import ENCODER_FILE

    view = view_config(config, combination)
    plan = view_plan_dir(split, combination)
    by_modality = encoder_dirs_by_modality(sorted(Path(encoders).iterdir()))
    missing = [m for m in view.image_modalities if m not in by_modality]
    if missing:
        raise DataError(f"{encoders}: no pre-trained {missing} encoder for {combination}")
    encoder_dirs = [by_modality[m] for m in view.image_modalities]
    with tempfile.TemporaryDirectory(prefix="dfu-stage1-") as scratch:
        stage1 = Path(scratch) / "stage1"
        run_stage1(
            prepared,
            plan,
            rf,
            encoder_dirs,
            view,
            stage1,
            final_epochs(final_fit, combination, "stage1"),
        )
        result = run_stage2(
            prepared, plan, rf, stage1, view, out, final_epochs(final_fit, combination, "stage2")
        )
    result["combination"] = combination
    result["encoders"] = {
        m: {"digest": _file_digest(by_modality[m] / ENCODER_FILE), "fold": result["fold"]}
        for m in view.image_modalities
    }
    write_json(Path(out) / FOLD_RESULT_FILE, result)
    return result


def fuse_combination(
    prepared: Input[Dataset],
    split: Input[Dataset],
    combination: str,
    rf: Input[Dataset],
    encoders: Input[Model],
    config: Input[Dataset],
    model: Output[Model],
    metrics: Output[Metrics],
    final_fit: Input[Dataset] = None,
):
    """Stage 1 (fusion model, the fold's shared encoders loaded, backbones frozen, learnable
    fusion weight) then Stage 2 (fine-tune the top of the backbones; Stage 1 kept when it does
    not improve) of one combination, on the rows that have every one of its modalities.

    Args:
        prepared: the prepared dataset.
        split: the fold's shared split.
        combination: e.g. metadata+depth_rgb+thermal_map.
        rf: the fold's clinical random forest.
        encoders: the fold's gathered encoders.
        config: the search's resolved configuration (config.json).
        final_fit: for the final fit, the search summary (epochs, final-model members); absent
            for cross-validation folds.
        model: the combination's fusion model and fold_result.json, or skipped.json.
        metrics: both stages' best epoch, validation kappa, trainable parameters, steps per
            epoch; whether Stage 1 was kept; the fold's validation metrics.
    """
    from pathlib import Path

    from components.common import log_stage2_outcome, log_stage_metrics, resolve_config
    from components.search import run_fuse_combination

    result = run_fuse_combination(
        Path(prepared.path),
        Path(split.path),
        combination,
        Path(rf.path),
        Path(encoders.path),
        resolve_config(config.path),
        Path(model.path),
        None if final_fit is None else Path(final_fit.path),
    )
    model.metadata["combination"] = combination
    if result is None:
        return
    log_stage_metrics(metrics, result["stage1"], prefix="stage1_")
    log_stage_metrics(metrics, result["stage2"], prefix="stage2_")
    log_stage2_outcome(metrics, result)


# --- results and comparison -----------------------------------------------------------------------
def run_gather_fold_results(split: Path, rf: Path, fused: list[Path], out: Path) -> dict:
    """One file with the fold's results of every combination (metadata-only: the forest's) and
    which patient each validation visit belongs to."""
    from dfu_ml.search import BASELINE

    meta = read_json(Path(split) / SPLIT_FILE)
    results = {BASELINE: read_json(Path(rf) / FOLD_RESULT_FILE)}
    for folder in fused:
        result = read_json(Path(folder) / FOLD_RESULT_FILE)
        results[result["combination"]] = result
    gathered = {
        "fold": meta["fold"],
        "val_visit_patient": meta["val_visit_patient"],
        "results": results,
    }
    write_json(Path(out) / FOLD_RESULTS_FILE, gathered)
    return gathered


def gather_fold_results(
    split: Input[Dataset],
    rf: Input[Dataset],
    fold_results: Output[Dataset],
    fused: Input[list[Model]] = None,
):
    """Gather one fold's validation results of every combination into one artifact (the
    comparison takes one per fold).

    Args:
        split: the fold's shared split.
        rf: the fold's clinical random forest (the metadata-only combination).
        fused: the fold's fusion results, one per image combination (absent when no combination
            has images).
        fold_results: fold_results.json.
    """
    from pathlib import Path

    from components.search import run_gather_fold_results

    run_gather_fold_results(
        Path(split.path),
        Path(rf.path),
        [Path(f.path) for f in fused or []],
        Path(fold_results.path),
    )


def run_evaluate_search(
    fold_results: list[Path],
    config: Config,
    combinations: list[str],
    final_model: str,
    bootstrap: int,
    out: Path,
) -> dict:
    """Compare the combinations over the folds into ``out`` (search.json, search.md,
    search.html, search.png) and print the table."""
    from dfu_ml.search import SearchSettings
    from dfu_ml.search.report import format_search_table, write_search_report
    from dfu_ml.search.summary import summarize_search

    settings = SearchSettings.from_values(combinations, final_model, bootstrap)
    folds = [read_json(Path(p) / FOLD_RESULTS_FILE) for p in fold_results]
    summary = summarize_search(folds, config, settings)
    summary["files"] = write_search_report(summary, out)
    write_json(Path(out) / SEARCH_FILE, summary)
    print(format_search_table(summary), flush=True)
    return summary


def evaluate_search(
    fold_results: Input[list[Dataset]],
    config: Input[Dataset],
    combinations: List[str],
    final_model: str,
    bootstrap_replicates: int,
    summary: Output[Dataset],
    metrics: Output[Metrics],
    report: Output[HTML],
    markdown: Output[Markdown],
) -> bool:
    """Compare every combination over the folds: mean +/- std of kappa, accuracy and F1 per row
    and per visit, paired differences to metadata-only with patient-bootstrap intervals, the
    late-fusion ensemble and the nested choice; pick the final model's members and bless it
    (the returned value).

    Args:
        fold_results: one fold_results.json per cross-validation fold.
        config: the search's resolved configuration (config.json).
        combinations: the combinations compared.
        final_model: ensemble, best or a combination.
        bootstrap_replicates: patient-bootstrap replicates per paired difference (0: none).
        summary: search.json, search.md, search.html, search.png.
        metrics: each model's mean per-visit quadratic kappa, shown in the KFP UI.
        report: the HTML table and plot.
        markdown: the table as Markdown.
    """
    import shutil
    from pathlib import Path

    from components.common import log_metrics, resolve_config
    from components.search import run_evaluate_search

    result = run_evaluate_search(
        [Path(f.path) for f in fold_results],
        resolve_config(config.path),
        list(combinations),
        final_model,
        int(bootstrap_replicates),
        Path(summary.path),
    )
    log_metrics(
        metrics,
        {
            f"kappa_per_visit[{name}]": row["mean"]["per_visit"]["quadratic_kappa"]["mean"]
            for name, row in result["rows"].items()
        },
    )
    shutil.copyfile(result["files"]["search.html"], report.path)
    shutil.copyfile(result["files"]["search.md"], markdown.path)
    return result["blessed"]


# --- final model ----------------------------------------------------------------------------------
def run_bundle_search(
    rf: Path,
    fused: list[Path],
    summary: Path,
    config: Config,
    out: Path,
    data: str = "",
    data_digest: str = "",
    code_version: str = "",
) -> dict:
    """Bundle the final model (one combination, or the ensemble of several) into ``out``."""
    from dfu_ml.search import SearchSettings, has_images
    from dfu_ml.search.final import MemberFiles, assemble_final_model

    search = read_json(Path(summary) / SEARCH_FILE)
    settings = SearchSettings.from_values(**search["settings"])
    members = {
        name: MemberFiles(Path(rf)) for name in settings.combinations if not has_images(name)
    }
    for folder in fused:
        if not (Path(folder) / SKIPPED_FILE).is_file():
            name = read_json(Path(folder) / FOLD_RESULT_FILE)["combination"]
            members[name] = MemberFiles(Path(rf), Path(folder))
    return assemble_final_model(
        out, search, members, config, settings, data, data_digest, code_version
    )


def bundle_search(
    rf: Input[Dataset],
    summary: Input[Dataset],
    config: Input[Dataset],
    data: str,
    data_digest: str,
    code_version: str,
    final_model: Output[Model],
    fused: Input[list[Model]] = None,
):
    """Bundle the search's final model: one combination's bundle, or an ensemble bundle with one
    bundle per member, under a model id derived from the members and what the search compared.

    Args:
        rf: the final fit's clinical model.
        summary: the search summary (members, blessing).
        config: the search's resolved configuration (config.json).
        data: the dataset location, recorded in the manifest.
        data_digest: the prepared data's content digest (part of the model id).
        code_version: the package version and a digest of its sources (part of the model id).
        final_model: the bundle.
        fused: the final fit's fusion models (absent when no combination has images).
    """
    from pathlib import Path

    from components.common import resolve_config
    from components.search import run_bundle_search

    manifest = run_bundle_search(
        Path(rf.path),
        [Path(f.path) for f in fused or []],
        Path(summary.path),
        resolve_config(config.path),
        Path(final_model.path),
        data,
        data_digest,
        code_version,
    )
    final_model.metadata.update({k: manifest[k] for k in ("model_id", "blessed", "kind")})


# --- command line ---------------------------------------------------------------------------------
STEPS = ("split", "pretrain", "fuse", "evaluate")


def main(argv=None) -> int:
    """``python -m components.search STEP ...``: a search step on local folders (or s3://)."""
    parser = argparse.ArgumentParser(
        prog="python -m components.search",
        description="A step of the modality-combination search; STEP --help for its arguments.",
    )
    parser.add_argument("step", choices=STEPS, metavar="STEP", help=", ".join(STEPS))
    parser.add_argument("arguments", nargs=argparse.REMAINDER, help="the step's arguments")
    known = parser.parse_args(argv)
    rest = known.arguments
    module = f"components.search {known.step}"

    def add_split(p):
        p.add_argument("--prepared", required=True)
        p.add_argument("--fold", required=True, type=int, help="fold number, -1 = final fit")
        p.add_argument("--combination", action="append", required=True, help="repeat for each")

    def add_view(p, view: str):
        p.add_argument("--prepared", required=True)
        p.add_argument("--split", required=True, help="split_search_fold's output folder")
        p.add_argument(f"--{view}", required=True)
        p.add_argument("--final-fit", help="the search summary folder (final fit only)")

    def add_fuse(p):
        add_view(p, "combination")
        p.add_argument("--rf", required=True)
        p.add_argument("--encoders", required=True, help="gather_encoders' output folder")

    def add_evaluate(p):
        p.add_argument("--fold-results", action="append", required=True, help="one per fold")
        p.add_argument("--combination", action="append", required=True)
        p.add_argument("--final-model", default="ensemble")
        p.add_argument("--bootstrap", type=int, default=1000)

    steps = {
        "split": (
            add_split,
            lambda a: run_split(a.prepared, a.fold, a.config, a.combination, a.out),
        ),
        "pretrain": (
            lambda p: add_view(p, "modality"),
            lambda a: run_pretrain_shared(
                a.prepared, a.split, a.modality, a.config, a.out, a.final_fit
            ),
        ),
        "fuse": (
            add_fuse,
            lambda a: run_fuse_combination(
                a.prepared, a.split, a.combination, a.rf, a.encoders, a.config, a.out, a.final_fit
            ),
        ),
        "evaluate": (
            add_evaluate,
            lambda a: run_evaluate_search(
                a.fold_results, a.config, a.combination, a.final_model, a.bootstrap, a.out
            ),
        ),
    }
    add, run = steps[known.step]
    return cli(module, __doc__.splitlines()[0], add, run, rest)


if __name__ == "__main__":
    raise SystemExit(main())
