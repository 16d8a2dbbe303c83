"""Step ``clinical_rf``: fold -> random-forest probabilities (out-of-fold for training visits)."""

from pathlib import Path

from kfp.dsl import Dataset, Input, Output

from components.common import (
    FOLD_RESULT_FILE,
    PLAN_FILE,
    RF_FOREST_FILE,
    RF_PROBA_FILE,
    RF_TRANSFORMER_FILE,
    cli,
    read_json,
    write_json,
)
from dfu_ml.config import Config


def run_clinical_rf(prepared: Path, fold_plan: Path, config: Config, out: Path) -> dict:
    """Write per-visit probabilities, the fitted forest and its feature transformer into ``out``."""
    import joblib
    import numpy as np

    from dfu_ml.data.prepare import load_prepared
    from dfu_ml.training.fold import fold_predictions, fold_rf

    dataset = load_prepared(prepared)
    plan = read_json(Path(fold_plan) / PLAN_FILE)
    proba, forest = fold_rf(dataset, config, plan)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    np.save(out / RF_PROBA_FILE, proba)
    joblib.dump(forest.forest, out / RF_FOREST_FILE)
    (out / RF_TRANSFORMER_FILE).write_text(forest.transformer.to_json())
    # The RF-only predictions are the fold's result in a metadata-only run, and the baseline the
    # fusion is compared with otherwise.
    result = {"fold": plan["fold"], "pretrain": {}}
    if plan["val_rows"]:
        result.update(fold_predictions(dataset, config, plan, proba))
        print(
            f"clinical RF, fold {plan['fold']}: validation quadratic kappa "
            f"{result['metrics']['per_row']['quadratic_kappa']:.4f}",
            flush=True,
        )
    write_json(out / FOLD_RESULT_FILE, result)
    return result


def clinical_forest(
    prepared: Input[Dataset], fold_plan: Input[Dataset], config: Input[Dataset], rf: Output[Dataset]
):
    """Fit the clinical random forest on the fold's training visits: out-of-fold probabilities for
    training visits (inner CV grouped by patient), forest probabilities for validation visits.

    Args:
        prepared: the prepared dataset.
        fold_plan: the fold plan from resample_alpha.
        config: the run's resolved configuration (config.json).
        rf: probabilities, forest and feature transformer.
    """
    from pathlib import Path

    from components.clinical_rf import run_clinical_rf
    from components.common import resolve_config

    result = run_clinical_rf(
        Path(prepared.path), Path(fold_plan.path), resolve_config(config.path), Path(rf.path)
    )
    if "metrics" in result:
        rf.metadata["val_quadratic_kappa"] = result["metrics"]["per_row"]["quadratic_kappa"]


def main(argv=None) -> int:
    def add(parser):
        parser.add_argument("--prepared", required=True)
        parser.add_argument("--fold-plan", required=True)

    return cli(
        "components.clinical_rf",
        __doc__,
        add,
        lambda a: run_clinical_rf(a.prepared, a.fold_plan, a.config, a.out),
        argv,
    )


if __name__ == "__main__":
    raise SystemExit(main())
