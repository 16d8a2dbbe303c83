"""Step ``clinical_rf``: fold -> the fitted clinical model (one pipeline file) and its per-visit
probabilities (out-of-fold for training visits where a fusion trains on them)."""

from pathlib import Path

from kfp.dsl import Dataset, Input, Output

from components.common import FOLD_RESULT_FILE, PLAN_FILE, RF_PROBA_FILE, cli, read_json, write_json
from dfu_ml.config import Config


def run_clinical_rf(
    prepared: Path, fold_plan: Path, config: Config, out: Path, for_fusion: bool = False
) -> dict:
    """Write per-visit probabilities and the fitted clinical pipeline (features and model, one
    file) into ``out``; ``for_fusion``: out-of-fold training-visit probabilities even when
    ``config`` itself has no fusion (see ``dfu_ml.training.fold.fold_rf``)."""
    import numpy as np

    from dfu_ml.data.prepare import load_prepared
    from dfu_ml.training.clinical_rf import save_clinical_model
    from dfu_ml.training.fold import fold_predictions, fold_rf

    dataset = load_prepared(prepared)
    plan = read_json(Path(fold_plan) / PLAN_FILE)
    proba, model = fold_rf(dataset, config, plan, for_fusion)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    np.save(out / RF_PROBA_FILE, proba)
    save_clinical_model(model, out)
    # The clinical model's predictions are the fold's result in a metadata-only run, and the
    # baseline the fusion is compared with otherwise.
    result = {"fold": plan["fold"], "pretrain": {}, "clinical_columns": model.columns_used}
    if plan["val_rows"]:
        result.update(fold_predictions(dataset, config, plan, proba))
        print(
            f"clinical model ({config.clinical_model}), fold {plan['fold']}: validation "
            f"quadratic kappa {result['metrics']['per_row']['quadratic_kappa']:.4f}",
            flush=True,
        )
    write_json(out / FOLD_RESULT_FILE, result)
    return result


def clinical_forest(
    prepared: Input[Dataset],
    fold_plan: Input[Dataset],
    config: Input[Dataset],
    rf: Output[Dataset],
    for_fusion: bool = False,
):
    """Fit the clinical model (feature pipeline and estimator) on the fold's training visits:
    probabilities for validation visits, and out-of-fold probabilities for training visits (inner
    CV grouped by patient) where a fusion trains on them.

    Args:
        prepared: the prepared dataset.
        fold_plan: the fold plan from resample_alpha.
        config: the run's resolved configuration (config.json).
        rf: probabilities and the fitted clinical pipeline (clinical_model.joblib).
        for_fusion: out-of-fold training-visit probabilities although the configuration is
            metadata-only (the search's clinical view, which its fused combinations read).
    """
    from pathlib import Path

    from components.clinical_rf import run_clinical_rf
    from components.common import resolve_config

    result = run_clinical_rf(
        Path(prepared.path),
        Path(fold_plan.path),
        resolve_config(config.path),
        Path(rf.path),
        for_fusion,
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
