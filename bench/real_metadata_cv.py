"""Metadata-only patient cross-validation on the real clinical data (the dev subset): the clinical
models and column policies compared on the same folds.

Reads the real clinical CSV (no images needed), then for each variant, seed and fold runs the same
building blocks as the pipeline: ``plan_fold`` (patient-grouped, stratified folds), ``fold_rf``
(the clinical model fitted on the fold's training visits only) and ``fold_predictions`` (its
probabilities for the validation visits). No sample is removed. Rows are visits, so the figures
are per visit. Every variant of a seed validates on the same folds.

    .venv/bin/python bench/real_metadata_cv.py                          # default model, seeds 0-4
    .venv/bin/python bench/real_metadata_cv.py --variants all           # the comparison table
    .venv/bin/python bench/real_metadata_cv.py --variants forest --set clinical_include_leak_suspect=true
    .venv/bin/python bench/real_metadata_cv.py --json out.json          # also write the figures

Variants (``--variants NAME ...`` or ``all``) are config overrides on the paper profile, except
``forest_median_imputed``: the forest behind median imputation and scaling fitted on the training
visits (what the project did before missing values were kept), built here only to measure it.

The data folder defaults to ``../shared/data/dfu_real_dev`` next to the repository (override with
``--data`` or the DFU_REAL_DEV environment variable).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # the fold blocks import Keras
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")

import numpy as np  # noqa: E402

from dfu_ml.config import load_config  # noqa: E402
from dfu_ml.data.prepare import prepare_dataset  # noqa: E402
from dfu_ml.data.schema import CLASS_NAMES, NUM_CLASSES  # noqa: E402
from dfu_ml.training.clinical_rf import ClinicalModel, ClinicalModelSpec  # noqa: E402
from dfu_ml.training.fold import fold_predictions, fold_rf, plan_fold, training_rows  # noqa: E402

HEADLINE = ("quadratic_kappa", "accuracy", "macro_f1")
METRICS = (*HEADLINE, *(f"f1_{c}" for c in CLASS_NAMES))
DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "dfu_real_dev"
STUDY_COLUMNS = "clinical_include_leak_suspect=true"
VARIANTS = {
    "forest": [],
    "forest_study_columns": [STUDY_COLUMNS],
    "forest_median_imputed": [],
    "forest_median_imputed_study_columns": [STUDY_COLUMNS],
    "boosting": ["clinical_model=boosting"],
    "boosting_study_columns": ["clinical_model=boosting", STUDY_COLUMNS],
    "ordinal_forest": ["clinical_model=ordinal_forest"],
    "ordinal_forest_study_columns": ["clinical_model=ordinal_forest", STUDY_COLUMNS],
}


def _median_imputed_pipeline(spec):
    """The forest behind median imputation and scaling (the pre-fix feature handling)."""
    from sklearn.impute import SimpleImputer
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import StandardScaler

    from dfu_ml.features import feature_pipeline

    return Pipeline(
        [
            ("features", feature_pipeline(spec.columns)),
            ("impute", SimpleImputer(strategy="median", keep_empty_features=True)),
            ("scale", StandardScaler()),
            ("model", spec.estimator()),
        ]
    )


def _median_imputed_proba(dataset, config, plan) -> np.ndarray:
    """Validation-visit probabilities of the median-imputed forest, fitted on the training
    visits of the same fold (training rows get none: nothing uses them metadata-only)."""
    rows = training_rows(dataset, config)
    train = np.unique(rows["visit_index"].to_numpy()[plan["train_rows"]])
    val = np.unique(rows["visit_index"].to_numpy()[plan["val_rows"]])
    visits = dataset.visits
    pipeline = _median_imputed_pipeline(ClinicalModelSpec.from_config(config))
    model = ClinicalModel(pipeline.fit(visits.iloc[train], visits["label"].to_numpy()[train]))
    proba = np.full((len(visits), NUM_CLASSES), np.nan)
    proba[val] = model.predict_proba(visits.iloc[val])
    return proba


def _fold_metrics(dataset, config, plan, median_imputed: bool) -> dict:
    if median_imputed:
        rf_proba = _median_imputed_proba(dataset, config, plan)
    else:
        rf_proba, _ = fold_rf(dataset, config, plan)
    metrics = fold_predictions(dataset, config, plan, rf_proba)["metrics"]["per_visit"]
    out = {m: metrics[m] for m in HEADLINE}
    out.update({f"f1_{c}": metrics["f1_per_class"][c] for c in CLASS_NAMES})
    return out


def _mean_std(values) -> dict:
    return {"mean": float(np.mean(values)), "std": float(np.std(values))}


def run_cv(dataset, profile: str, overrides: list[str], median_imputed=False, log=print) -> dict:
    """Metadata-only K-fold patient CV; returns per-fold metrics and mean/std over folds."""
    config = load_config(profile, ["modalities=metadata", *overrides])
    folds = []
    for k in range(config.cv_folds):
        start = time.time()
        plan = plan_fold(dataset, config, k)
        metrics = _fold_metrics(dataset, config, plan, median_imputed)
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
        help=f"'all' or some of: {', '.join(VARIANTS)} (default: forest)",
    )
    parser.add_argument(
        "--set", nargs="+", default=[], metavar="KEY=VALUE", help="extra config overrides"
    )
    parser.add_argument("--json", help="write every figure to this JSON file")
    args = parser.parse_args(argv)
    names = list(VARIANTS) if args.variants == ["all"] else args.variants
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
    results = {}
    for name in names:
        overrides = [f"cv_folds={args.folds}", *VARIANTS[name], *args.set]
        print(f"{name}: {' '.join(overrides)}", flush=True)
        runs = []
        for seed in args.seeds:
            run = run_cv(
                dataset,
                args.profile,
                [*overrides, f"seed={seed}"],
                median_imputed="median_imputed" in name,
            )
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
        "seconds": round(time.time() - start, 1),
    }
    print(f"total {out['seconds']} s")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
