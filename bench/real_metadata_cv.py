"""Metadata-only patient cross-validation on the real clinical data (the dev subset).

Reads the real clinical CSV (no images needed), then for each fold runs the same building blocks
as the pipeline: ``plan_fold`` (patient-grouped, stratified folds), ``fold_rf`` (the clinical random
forest fitted on the fold's training visits) and ``fold_predictions`` (the forest's probabilities for
the validation visits). No sample is removed. Rows are visits, so the figures are per visit.

    .venv/bin/python bench/real_metadata_cv.py                       # seed 42, the paper profile
    .venv/bin/python bench/real_metadata_cv.py --seeds 0 1 2 3 4     # several seeds: the spread
    .venv/bin/python bench/real_metadata_cv.py --json out.json       # also write the figures

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
from dfu_ml.training.fold import fold_predictions, fold_rf, plan_fold  # noqa: E402

HEADLINE = ("quadratic_kappa", "accuracy", "macro_f1")
DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "dfu_real_dev"


def run_cv(dataset, profile: str = "paper", overrides: list[str] | None = None, log=print) -> dict:
    """Metadata-only K-fold patient CV; returns per-fold metrics and mean/std over folds."""
    config = load_config(profile, ["modalities=metadata", *(overrides or [])])
    folds = []
    for k in range(config.cv_folds):
        start = time.time()
        plan = plan_fold(dataset, config, k)
        rf_proba, _ = fold_rf(dataset, config, plan)
        metrics = fold_predictions(dataset, config, plan, rf_proba)["metrics"]["per_visit"]
        folds.append(
            {
                "fold": k,
                "val_visits": len(plan["val_rows"]),
                "val_patients": len(plan["val_patients"]),
                **{m: metrics[m] for m in HEADLINE},
            }
        )
        log(
            f"  seed {config.seed} fold {k}: "
            + "  ".join(f"{m} {metrics[m]:.3f}" for m in HEADLINE)
            + f"  ({len(plan['val_rows'])} visits, {len(plan['val_patients'])} patients, "
            f"{time.time() - start:.1f} s)"
        )
    summary = {
        m: {
            "mean": float(np.mean([f[m] for f in folds])),
            "std": float(np.std([f[m] for f in folds])),
        }
        for m in HEADLINE
    }
    return {
        "seed": config.seed,
        "cv_folds": config.cv_folds,
        "rf_n_estimators": config.rf_n_estimators,
        "rf_inner_folds": config.rf_inner_folds,
        "folds": folds,
        "mean_std": summary,
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=os.environ.get("DFU_REAL_DEV", str(DEFAULT_DATA)))
    parser.add_argument("--profile", default="paper")
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument(
        "--seeds",
        type=int,
        nargs="*",
        default=None,
        help="seeds to run (default: the profile's seed)",
    )
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="extra config override"
    )
    parser.add_argument("--json", help="write every figure to this JSON file")
    args = parser.parse_args(argv)

    start = time.time()
    dataset = prepare_dataset(Path(args.data), modalities=[])
    report = dataset.meta["report"]
    print(
        f"data: {args.data}: {report['labelled_visits']} labelled visits, {report['patients']} "
        f"patients, class mix {report['class_mix_visits']}, duplicate visit keys dropped "
        f"{report['duplicate_visit_keys']}"
    )
    overrides = [f"cv_folds={args.folds}", *args.set]
    seeds = args.seeds if args.seeds else [None]
    runs = []
    for seed in seeds:
        extra = overrides + ([f"seed={seed}"] if seed is not None else [])
        run = run_cv(dataset, args.profile, extra)
        runs.append(run)
        ms = run["mean_std"]
        print(
            f"seed {run['seed']}: "
            + "  ".join(f"{m} {ms[m]['mean']:.3f} +/- {ms[m]['std']:.3f}" for m in HEADLINE)
        )
    out = {
        "data": str(args.data),
        "profile": args.profile,
        "overrides": overrides,
        "visits": report["labelled_visits"],
        "patients": report["patients"],
        "runs": runs,
        "seconds": round(time.time() - start, 1),
    }
    if len(runs) > 1:
        out["across_seeds"] = {
            m: {
                "mean_of_means": float(np.mean([r["mean_std"][m]["mean"] for r in runs])),
                "std_of_means": float(np.std([r["mean_std"][m]["mean"] for r in runs])),
                "min_mean": float(np.min([r["mean_std"][m]["mean"] for r in runs])),
                "max_mean": float(np.max([r["mean_std"][m]["mean"] for r in runs])),
                "all_folds_mean": float(np.mean([f[m] for r in runs for f in r["folds"]])),
                "all_folds_std": float(np.std([f[m] for r in runs for f in r["folds"]])),
            }
            for m in HEADLINE
        }
        print("across seeds (mean of the per-seed means, their std, min..max):")
        for m, v in out["across_seeds"].items():
            print(
                f"  {m}: {v['mean_of_means']:.3f} +/- {v['std_of_means']:.3f} "
                f"({v['min_mean']:.3f}..{v['max_mean']:.3f}); all folds "
                f"{v['all_folds_mean']:.3f} +/- {v['all_folds_std']:.3f}"
            )
    print(f"total {out['seconds']} s")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
