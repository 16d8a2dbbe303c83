"""Metadata-only patient cross-validation on the real clinical data (the dev subset): the clinical
models and column policies compared on the same folds.

Reads the real clinical CSV (no images needed), then for each variant, seed and fold runs the same
building blocks as the pipeline: ``plan_fold`` (patient-grouped, stratified folds), ``fold_rf``
(the clinical model fitted on the fold's training visits only) and ``fold_predictions`` (its
probabilities for the validation visits). No sample is removed. Rows are visits, so the figures
are per visit. Every variant of a seed validates on the same folds.

    .venv/bin/python bench/real_metadata_cv.py                          # default model, seeds 0-4
    .venv/bin/python bench/real_metadata_cv.py --variants table         # the comparison table
    .venv/bin/python bench/real_metadata_cv.py --variants further       # the later candidates
    .venv/bin/python bench/real_metadata_cv.py --variants all           # both
    .venv/bin/python bench/real_metadata_cv.py --variants forest --set clinical_include_leak_suspect=true
    .venv/bin/python bench/real_metadata_cv.py --json out.json          # also write the figures

Variants (``--variants NAME ...``, ``table``, ``further`` or ``all``) are config overrides on the
paper profile, and a few ablations built here only to measure them, on the same folds:
``*_median_imputed*`` (median imputation and scaling fitted on the training visits in front of the
forest: the feature handling before missing values were kept), ``forest_dressing_only`` and
``forest_offloading_only`` (one group of the leak suspects brought back), ``forest_unweighted``
(no balanced class weights), ``forest_expected_class`` (the rounded expected phase instead of the
argmax) and ``forest_duplicates_dropped`` (the two renumbered visits left out, as the old
deduplication did; the folds move only by those two visits). ``further`` are the candidates tried
after the default was chosen (``bench/clinical_candidates.py``), each on both column policies.

The data folder defaults to ``../shared/data/dfu_real_dev`` next to the repository (override with
``--data`` or the DFU_REAL_DEV environment variable).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # the fold blocks import Keras
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")

import numpy as np
from clinical_candidates import CANDIDATES

from dfu_ml.config import load_config
from dfu_ml.data.prepare import prepare_dataset
from dfu_ml.data.schema import CLASS_NAMES, NUM_CLASSES
from dfu_ml.training.clinical_rf import ClinicalModel, ClinicalModelSpec
from dfu_ml.training.fold import fold_predictions, fold_rf, plan_fold, training_rows

HEADLINE = ("quadratic_kappa", "accuracy", "macro_f1")
METRICS = (*HEADLINE, *(f"f1_{c}" for c in CLASS_NAMES))
DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "dfu_real_dev"
STUDY_COLUMNS = "clinical_include_leak_suspect=true"


def _pipeline(spec, columns=None, median_imputed=False):
    """A bench-only ablation of the real clinical pipeline: other columns, or median imputation
    and scaling after the features (the feature handling before missing values were kept)."""
    from sklearn.impute import SimpleImputer
    from sklearn.preprocessing import StandardScaler

    from dfu_ml.features import feature_pipeline

    pipeline = spec.pipeline()
    if columns is not None:
        pipeline.steps[0] = ("features", feature_pipeline(columns))
    if median_imputed:
        pipeline.steps[1:1] = [
            ("impute", SimpleImputer(strategy="median", keep_empty_features=True)),
            ("scale", StandardScaler()),
        ]
    return pipeline


def _only(group: str):
    """The default columns plus one group of the leak suspects (dressing or offloading)."""
    from dfu_ml.data.schema import OFFLOADING_COLUMNS
    from dfu_ml.features import ClinicalColumns

    default, study = ClinicalColumns.for_policy(False), ClinicalColumns.for_policy(True)
    if group == "dressing":
        return ClinicalColumns(default.numeric, study.ordinal, study.nominal, True)
    extra = tuple(c for c in study.numeric if c in OFFLOADING_COLUMNS)
    return ClinicalColumns(default.numeric + extra, default.ordinal, default.nominal, True)


def _unweighted(spec):
    """The forest without ``class_weight="balanced"``."""
    return spec.pipeline().set_params(model__class_weight=None)


def expected_class(proba: np.ndarray) -> np.ndarray:
    """The rounded expected phase (sum of k * p_k) as a one-hot: the decision rule that argmax
    replaced."""
    chosen = np.rint(proba @ np.arange(NUM_CLASSES)).astype(int).clip(0, NUM_CLASSES - 1)
    return np.eye(NUM_CLASSES)[chosen]


def duplicates_dropped(dataset):
    """The renumbered visits unlabelled (so no run uses them): what dropping the second row of a
    duplicated visit key did before."""
    lines = [
        int(r.split("line ")[1].split(":")[0]) for r in dataset.meta["report"]["renumbered_visits"]
    ]
    visits = dataset.visits.copy()
    visits.loc[visits["row_in_file"].isin(lines), "label"] = -1
    return dataclasses.replace(dataset, visits=visits)


@dataclass(frozen=True)
class Variant:
    """Config overrides on the profile, and bench-only changes measured on the same folds: a
    pipeline built from the spec (None: the real ``fold_rf``), a decision rule applied to the
    validation probabilities, a change to the prepared data."""

    overrides: tuple = ()
    pipeline: Callable | None = None
    decide: Callable | None = None
    data: Callable | None = None


VARIANTS = {
    "forest": Variant(),
    "forest_study_columns": Variant((STUDY_COLUMNS,)),
    "forest_dressing_only": Variant(pipeline=lambda spec: _pipeline(spec, _only("dressing"))),
    "forest_offloading_only": Variant(pipeline=lambda spec: _pipeline(spec, _only("offloading"))),
    "forest_median_imputed": Variant(pipeline=lambda spec: _pipeline(spec, median_imputed=True)),
    "forest_median_imputed_study_columns": Variant(
        (STUDY_COLUMNS,), pipeline=lambda spec: _pipeline(spec, median_imputed=True)
    ),
    "forest_unweighted": Variant(pipeline=_unweighted),
    "forest_expected_class": Variant(decide=expected_class),
    "forest_duplicates_dropped": Variant(data=duplicates_dropped),
    **{f"forest_leaf{n}": Variant((f"rf_min_samples_leaf={n}",)) for n in (1, 2, 3, 10)},
    "forest_500_trees": Variant(("rf_n_estimators=500",)),
    "boosting": Variant(("clinical_model=boosting",)),
    "boosting_study_columns": Variant(("clinical_model=boosting", STUDY_COLUMNS)),
    "ordinal_forest": Variant(("clinical_model=ordinal_forest",)),
    "ordinal_forest_study_columns": Variant(("clinical_model=ordinal_forest", STUDY_COLUMNS)),
}
# The candidates tried after the default was chosen (bench/clinical_candidates.py), on both column
# policies: ``--variants further``.
TABLE = list(VARIANTS)
FURTHER = {}
for _name, _factory in CANDIDATES.items():
    FURTHER[_name] = Variant(pipeline=_factory)
    FURTHER[f"{_name}_study_columns"] = Variant((STUDY_COLUMNS,), pipeline=_factory)
VARIANTS.update(FURTHER)
GROUPS = {"table": TABLE, "further": list(FURTHER), "all": list(VARIANTS)}


def _ablation_proba(dataset, config, plan, variant: Variant) -> np.ndarray:
    """Validation-visit probabilities of a bench-only pipeline (or the real one) fitted on the
    training visits of the same fold, through the variant's decision rule (training rows get
    none: nothing uses them metadata-only)."""
    rows = training_rows(dataset, config)
    train = np.unique(rows["visit_index"].to_numpy()[plan["train_rows"]])
    val = np.unique(rows["visit_index"].to_numpy()[plan["val_rows"]])
    visits = dataset.visits
    spec = ClinicalModelSpec.from_config(config)
    pipeline = variant.pipeline(spec) if variant.pipeline else spec.pipeline()
    fitted = pipeline.fit(
        visits.iloc[train], visits["label"].to_numpy()[train], **spec.fit_params(visits.iloc[train])
    )
    proba = np.full((len(visits), NUM_CLASSES), np.nan)
    proba[val] = ClinicalModel(fitted).predict_proba(visits.iloc[val])
    if variant.decide:
        proba[val] = variant.decide(proba[val])
    return proba


def _fold_metrics(dataset, config, plan, variant: Variant) -> dict:
    if variant.pipeline is None and variant.decide is None:
        rf_proba, _ = fold_rf(dataset, config, plan)
    else:
        rf_proba = _ablation_proba(dataset, config, plan, variant)
    metrics = fold_predictions(dataset, config, plan, rf_proba)["metrics"]["per_visit"]
    out = {m: metrics[m] for m in HEADLINE}
    out.update({f"f1_{c}": metrics["f1_per_class"][c] for c in CLASS_NAMES})
    return out


def _mean_std(values) -> dict:
    return {"mean": float(np.mean(values)), "std": float(np.std(values))}


def run_cv(dataset, profile: str, overrides: list[str], variant=Variant(), log=print) -> dict:
    """Metadata-only K-fold patient CV; returns per-fold metrics and mean/std over folds."""
    config = load_config(profile, ["modalities=metadata", *overrides])
    folds = []
    for k in range(config.cv_folds):
        start = time.time()
        plan = plan_fold(dataset, config, k)
        metrics = _fold_metrics(dataset, config, plan, variant)
        folds.append(
            {
                "fold": k,
                "val_visits": len(plan["val_rows"]),
                "val_patients": len(plan["val_patients"]),
                **metrics,
            }
        )
        log(
            f"    seed {config.seed} fold {k}: "
            + "  ".join(f"{m} {metrics[m]:.3f}" for m in HEADLINE)
            + f"  ({len(plan['val_rows'])} visits, {time.time() - start:.1f} s)"
        )
    return {
        "seed": config.seed,
        "folds": folds,
        "mean_std": {m: _mean_std([f[m] for f in folds]) for m in METRICS},
    }


def across_seeds(runs: list[dict]) -> dict:
    """Per metric: the mean and std of the per-seed means, their range, and all folds pooled."""
    out = {}
    for m in METRICS:
        means = [r["mean_std"][m]["mean"] for r in runs]
        pooled = [f[m] for r in runs for f in r["folds"]]
        out[m] = {
            "mean_of_means": float(np.mean(means)),
            "std_of_means": float(np.std(means)),
            "min_mean": float(np.min(means)),
            "max_mean": float(np.max(means)),
            "all_folds_mean": float(np.mean(pooled)),
            "all_folds_std": float(np.std(pooled)),
        }
    return out


def markdown_table(results: dict) -> str:
    """One row per variant: mean +/- std over seeds of the 5-fold means, and the per-fold std
    over all folds of all seeds in brackets."""
    header = "| variant | " + " | ".join(METRICS) + " |"
    lines = [header, "|---" * (len(METRICS) + 1) + "|"]
    for name, result in results.items():
        cells = [
            f"{v['mean_of_means']:.3f} +/- {v['std_of_means']:.3f} [{v['all_folds_std']:.3f}]"
            for v in (result["across_seeds"][m] for m in METRICS)
        ]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


TIMING_COLUMNS = (
    "Dressing Grouped",
    "Offloading Score",
    "No Offloading",
    "Wound Score",
    "Exudate Amount (None:0,Minor,Medium,Severe:3)",
    "Pain Level",
)


def column_timing(visits, columns=TIMING_COLUMNS) -> dict:
    """When does a column change, relative to the phase? Over consecutive visits of one ulcer
    (ordered by Appt Days) with two earlier visits: of the transitions where the column's value
    changed, the share where the phase changed at the same visit, and where it changed at the
    visit before. A column decided after this visit's assessment follows this visit's phase; one
    decided at the previous visit (what the patient arrives with) follows the previous phase."""
    ordered = visits.sort_values(["Patient#", "DFU#", "Appt Days", "row_in_file"])
    ulcer = ordered.groupby(["Patient#", "DFU#"])
    label = ordered["label"]
    changed_now = ulcer["label"].shift(1).ne(label) & ulcer["label"].shift(1).notna()
    changed_before = changed_now.groupby([ordered["Patient#"], ordered["DFU#"]]).shift(1)
    eligible = ulcer["label"].shift(2).notna()
    out = {
        "baseline": {
            "transitions": int(eligible.sum()),
            "phase_changed_now": float(changed_now[eligible].mean()),
            "phase_changed_before": float(changed_before[eligible].astype(float).mean()),
        }
    }
    for column in columns:
        previous = ulcer[column].shift(1)
        moved = eligible & previous.notna() & ordered[column].notna() & previous.ne(ordered[column])
        out[column] = {
            "transitions": int(moved.sum()),
            "phase_changed_now": float(changed_now[moved].mean()),
            "phase_changed_before": float(changed_before[moved].astype(float).mean()),
        }
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=os.environ.get("DFU_REAL_DEV", str(DEFAULT_DATA)))
    parser.add_argument("--profile", default="paper")
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument(
        "--variants",
        nargs="+",
        default=["forest"],
        help=f"'table', 'further', 'all' or some of: {', '.join(VARIANTS)} (default: forest)",
    )
    parser.add_argument(
        "--set", nargs="+", default=[], metavar="KEY=VALUE", help="extra config overrides"
    )
    parser.add_argument("--json", help="write every figure to this JSON file")
    parser.add_argument(
        "--timing", action="store_true", help="also print when leak-suspect columns change"
    )
    args = parser.parse_args(argv)
    names = [n for v in args.variants for n in GROUPS.get(v, [v])]
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        parser.error(f"unknown variant(s) {unknown}; choose from {', '.join(VARIANTS)}")

    start = time.time()
    dataset = prepare_dataset(Path(args.data), modalities=[])
    report = dataset.meta["report"]
    print(
        f"data: {args.data}: {report['labelled_visits']} labelled visits, {report['patients']} "
        f"patients, class mix {report['class_mix_visits']}; duplicated visit keys "
        f"{report['duplicate_visit_keys']} (merged {report['duplicate_rows_merged']}, "
        f"renumbered {report['visits_renumbered']})"
    )
    timing = column_timing(dataset.visits) if args.timing else None
    if timing:
        print("column changes vs phase changes (share of the column's changes):")
        for column, t in timing.items():
            print(
                f"  {column[:45]:45s} {t['transitions']:4d} changes: phase changed at the same "
                f"visit {t['phase_changed_now']:.2f}, at the visit before "
                f"{t['phase_changed_before']:.2f}"
            )
    results = {}
    for name in names:
        variant = VARIANTS[name]
        overrides = [f"cv_folds={args.folds}", *variant.overrides, *args.set]
        data = variant.data(dataset) if variant.data else dataset
        print(f"{name}: {' '.join(overrides)}", flush=True)
        runs = []
        for seed in args.seeds:
            run = run_cv(data, args.profile, [*overrides, f"seed={seed}"], variant)
            runs.append(run)
            ms = run["mean_std"]
            print(
                f"  seed {seed}: "
                + "  ".join(f"{m} {ms[m]['mean']:.3f} +/- {ms[m]['std']:.3f}" for m in HEADLINE),
                flush=True,
            )
        results[name] = {"overrides": overrides, "runs": runs, "across_seeds": across_seeds(runs)}
        kappa = results[name]["across_seeds"]["quadratic_kappa"]
        print(
            f"  {name}: quadratic kappa {kappa['mean_of_means']:.3f} +/- "
            f"{kappa['std_of_means']:.3f} over seeds ({kappa['min_mean']:.3f}.."
            f"{kappa['max_mean']:.3f}); all folds {kappa['all_folds_mean']:.3f} +/- "
            f"{kappa['all_folds_std']:.3f}",
            flush=True,
        )
    print()
    print(f"seeds {args.seeds}, {args.folds}-fold patient CV, per visit: mean +/- std over seeds "
          "of the fold means [std over all folds]")  # fmt: skip
    print(markdown_table(results))
    out = {
        "data": str(args.data),
        "profile": args.profile,
        "seeds": args.seeds,
        "visits": report["labelled_visits"],
        "patients": report["patients"],
        "variants": results,
        "timing": timing,
        "seconds": round(time.time() - start, 1),
    }
    print(f"total {out['seconds']} s")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
