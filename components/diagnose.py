"""Steps of the diagnose pipeline (``pipelines/diagnose.py``): one task per variant and fold (its
own pre-training or a shared one, Stage 1, Stage 2), pools of a loop's artifacts, and the report.

Every variant's configuration is the run's resolved configuration with that variant's overlays
(``dfu_ml.diagnose``); the steps run the same library code as the main pipeline's.
"""

from pathlib import Path

from kfp.dsl import HTML, Artifact, Dataset, Input, Markdown, Metrics, Model, Output

from components.common import (
    FOLD_RESULT_FILE,
    PLAN_FILE,
    RF_PROBA_FILE,
    cli,
    read_json,
    write_json,
)
from dfu_ml.config import Config

JOB_FILE = "diagnose_job.json"
ENCODERS = "encoders"


def encoders_of_group(pool: Path, group: str) -> dict:
    """modality -> encoder folder of pre-training group ``group`` (the variant that trained it),
    from a pool of variant outputs."""
    for folder in sorted(Path(pool).iterdir()):
        if read_json(folder / JOB_FILE)["variant"] == group:
            return {d.name: d for d in sorted((folder / ENCODERS).iterdir())}
    return {}


def run_diagnose_variant(
    prepared: Path,
    fold_plan: Path,
    rf: Path,
    variant: str,
    config: Config,
    out: Path,
    pretrained: Path | None = None,
) -> dict:
    """One variant on one fold (``config`` is the run's): its pre-training, unless it reuses
    another variant's from the ``pretrained`` pool (``dfu_ml.diagnose.pretrain_group``), then
    Stage 1 and Stage 2. Writes ``encoders/<modality>`` (when it pre-trained), the fold result
    tagged with the variant, and ``diagnose_job.json`` into ``out``."""
    import numpy as np

    from dfu_ml.data.prepare import load_prepared
    from dfu_ml.diagnose import pretrain_config, pretrain_group, variant_config
    from dfu_ml.errors import DfuError
    from dfu_ml.training.fold import (
        fold_predictions,
        run_pretrain,
        run_stage1,
        run_stage2,
        stage_alpha,
    )
    from dfu_ml.training.models import ENCODER_CONFIG

    out = Path(out)
    settings, group = variant_config(config, variant), pretrain_group(variant)
    dataset = load_prepared(prepared)
    plan = read_json(Path(fold_plan) / PLAN_FILE)
    if pretrained is None:
        if group != variant:
            raise DfuError(f"variant {variant} reuses {group}'s pre-training: pass that pool")
        dirs = {m: out / ENCODERS / m for m in settings.image_modalities}
        for modality, folder in dirs.items():
            run_pretrain(dataset, pretrain_config(config, group), plan, modality, folder)
    else:
        dirs = encoders_of_group(pretrained, group)
        missing = sorted(set(settings.image_modalities) - set(dirs))
        if missing:
            raise DfuError(f"{pretrained}: no {missing} encoder pre-trained by {group!r}")
        print(f"variant {variant}: reusing the pre-training of {group}", flush=True)
    rf_proba = np.load(Path(rf) / RF_PROBA_FILE)
    stage1 = run_stage1(dataset, settings, plan, rf_proba, dirs)
    stage2 = run_stage2(dataset, settings, plan, rf_proba, stage1)
    result = {
        "variant": variant,
        "pretrain_group": group,
        "fold": plan["fold"],
        "alpha": {
            "pretrain": stage_alpha(plan, pretrain_config(config, group), "pretrain"),
            "fusion": stage_alpha(plan, settings, "fusion"),
        },
        "pretrain": {m: read_json(d / ENCODER_CONFIG)["summary"] for m, d in dirs.items()},
        "stage1": stage1.summary(),
        "stage2": stage2.summary(),
        **fold_predictions(dataset, settings, plan, rf_proba, stage2.val_proba),
    }
    write_json(out / FOLD_RESULT_FILE, result)
    write_json(out / JOB_FILE, {"variant": variant, "group": group, "fold": plan["fold"]})
    return result


def run_pool(items: list[Path], out: Path) -> None:
    """Copy each artifact folder into ``out/<i>``: one artifact for a later loop to read (a
    loop's collected outputs cannot enter another loop)."""
    import shutil

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for i, item in enumerate(items):
        shutil.copytree(item, out / f"{i:04d}")


def run_diagnose_report(result_pools: list[Path], config: Config, out: Path) -> dict:
    """Every variant's fold results -> diagnose.json, .html, .md and the plot in ``out``."""
    from dfu_ml.diagnose_report import diagnose, format_report, write_report

    results = [
        read_json(folder / FOLD_RESULT_FILE)
        for pool in result_pools
        for folder in sorted(Path(pool).iterdir())
    ]
    diagnosis = diagnose(results, config)
    write_report(diagnosis, out)
    print(format_report(diagnosis), flush=True)
    return diagnosis


# --- KFP components ------------------------------------------------------------------------------
def diagnose_variant(
    prepared: Input[Dataset],
    fold_plan: Input[Dataset],
    rf: Input[Dataset],
    variant: str,
    config: Input[Dataset],
    trained: Output[Model],
    metrics: Output[Metrics],
    pretrained: Input[Artifact] = None,
):
    """One diagnose variant on one fold: its image pre-training (or, given ``pretrained``, the
    encoders of the variant whose pre-training it shares), Stage 1, Stage 2 and the fold's
    validation predictions.

    Args:
        prepared: the prepared dataset.
        fold_plan: the fold plan (shared by every variant).
        rf: the clinical random forest's probabilities (shared by every variant).
        variant: pre-fix, fixed or minus-RC1 .. minus-RC6.
        config: the run's resolved configuration (config.json); the variant's overlays go on top.
        trained: fold_result.json tagged with the variant, and the encoders it pre-trained.
        metrics: Stage 1's and Stage 2's figures and the fold's validation kappa.
        pretrained: for a variant that reuses another's pre-training, the fold's pool of the
            variants that pre-trained.
    """
    from pathlib import Path

    from components.common import log_metrics, log_stage_metrics, resolve_config
    from components.diagnose import run_diagnose_variant

    fold = run_diagnose_variant(
        Path(prepared.path),
        Path(fold_plan.path),
        Path(rf.path),
        variant,
        resolve_config(config.path),
        Path(trained.path),
        None if pretrained is None else Path(pretrained.path),
    )
    log_stage_metrics(metrics, fold["stage1"], prefix="stage1_")
    log_stage_metrics(metrics, fold["stage2"], prefix="stage2_")
    log_metrics(metrics, {"fold_quadratic_kappa": fold["metrics"]["per_row"]["quadratic_kappa"]})
    trained.metadata.update({"variant": variant, "fold": fold["fold"]})


def pool_artifacts(items: Input[list[Artifact]], pool: Output[Artifact]):
    """Gather a loop's artifacts into one (each in a numbered sub-folder), for the next loop.

    Args:
        items: the collected artifacts.
        pool: one folder holding a copy of each.
    """
    from pathlib import Path

    from components.diagnose import run_pool

    run_pool([Path(item.path) for item in items], Path(pool.path))


def diagnose_report(
    pretrained_pools: Input[list[Artifact]],
    reusing_pools: Input[list[Artifact]],
    config: Input[Dataset],
    summary: Output[Dataset],
    metrics: Output[Metrics],
    report: Output[HTML],
    markdown: Output[Markdown],
):
    """The root-cause report: per variant, the final kappa (mean +/- std over folds) and the
    symptoms; per root cause, the paired kappa cost of reverting its fix and the checks it trips.

    Args:
        pretrained_pools: per fold, the pool of the variants that ran their own pre-training.
        reusing_pools: per fold, the pool of the variants that reused another's.
        config: the run's resolved configuration (config.json).
        summary: diagnose.json, diagnose.html, diagnose.md and diagnose_kappa.png.
        metrics: each variant's mean kappa and each root cause's mean cost.
        report: the HTML report.
        markdown: the report as Markdown.
    """
    import shutil
    from pathlib import Path

    from components.common import log_metrics, resolve_config
    from components.diagnose import run_diagnose_report

    diagnosis = run_diagnose_report(
        [Path(p.path) for p in [*pretrained_pools, *reusing_pools]],
        resolve_config(config.path),
        Path(summary.path),
    )
    log_metrics(
        metrics,
        {
            **{
                "kappa_" + v["variant"].replace("-", "_"): v["kappa"]["mean"]
                for v in diagnosis["variants"]
            },
            **{f"cost_{f['root_cause']}": f["cost"]["mean"] for f in diagnosis["root_causes"]},
        },
    )
    shutil.copyfile(diagnosis["files"]["html"], report.path)
    shutil.copyfile(diagnosis["files"]["md"], markdown.path)


def main(argv=None) -> int:
    """``python -m components.diagnose --variant V ...``: one variant on one fold, by hand."""

    def add(parser):
        parser.add_argument("--prepared", required=True)
        parser.add_argument("--fold-plan", required=True)
        parser.add_argument("--rf", required=True)
        parser.add_argument("--variant", required=True, help="pre-fix, fixed, minus-RC1, ...")
        parser.add_argument(
            "--pretrained",
            help="a pool of the variants that pre-trained (for a variant that reuses one's)",
        )

    return cli(
        "components.diagnose",
        __doc__,
        add,
        lambda a: run_diagnose_variant(
            a.prepared, a.fold_plan, a.rf, a.variant, a.config, a.out, a.pretrained
        ),
        argv,
    )


if __name__ == "__main__":
    raise SystemExit(main())
