"""Step ``stage2``: fine-tune the top of the backbones; keep Stage 1 when Stage 2 does not improve."""

from pathlib import Path

from kfp.dsl import Dataset, Input, Metrics, Model, Output

from components.common import (
    FOLD_RESULT_FILE,
    MODEL_FILE,
    PLAN_FILE,
    RF_PROBA_FILE,
    SUMMARY_FILE,
    add_epochs_argument,
    cli,
    read_json,
    write_json,
)
from dfu_ml.config import Config


def run_stage2(
    prepared: Path,
    fold_plan: Path,
    rf: Path,
    stage1: Path,
    config: Config,
    out: Path,
    epochs: int = 0,
) -> dict:
    """Train Stage 2 from the Stage 1 model; write the fold's model and ``fold_result.json``."""
    import keras
    import numpy as np

    from dfu_ml.data.prepare import load_prepared
    from dfu_ml.training.fold import fold_predictions
    from dfu_ml.training.fold import run_stage2 as train
    from dfu_ml.training.stages import StageResult

    dataset = load_prepared(prepared)
    plan = read_json(Path(fold_plan) / PLAN_FILE)
    rf_proba = np.load(Path(rf) / RF_PROBA_FILE)
    previous = read_json(Path(stage1) / SUMMARY_FILE)
    stage1_model = keras.saving.load_model(Path(stage1) / MODEL_FILE, compile=False)
    s1 = previous["stage1"]
    stage1_result = StageResult.from_summary(s1, stage1_model)
    result = train(dataset, config, plan, rf_proba, stage1_result, epochs=epochs or None)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    result.model.save(out / MODEL_FILE)
    fold_result = {
        "fold": plan["fold"],
        "pretrain": previous["pretrain"],
        "stage1": s1,
        "stage2": result.summary(),
    }
    if plan["val_rows"]:
        fold_result.update(fold_predictions(dataset, config, plan, rf_proba, result.val_proba))
    write_json(out / FOLD_RESULT_FILE, fold_result)
    return fold_result


def stage2_finetune(
    prepared: Input[Dataset],
    fold_plan: Input[Dataset],
    rf: Input[Dataset],
    stage1_model: Input[Model],
    config: Input[Dataset],
    model: Output[Model],
    metrics: Output[Metrics],
    final_fit: Input[Dataset] = None,
):
    """Stage 2: unfreeze the top fraction of each backbone (BatchNorm frozen), fine-tune at a low
    learning rate, keep Stage 1's weights when validation kappa does not improve, and write the
    fold's validation predictions.

    Args:
        prepared: the prepared dataset.
        fold_plan: the fold plan from resample_alpha.
        rf: the clinical random forest's probabilities.
        stage1_model: the Stage 1 model.
        config: the run's resolved configuration (config.json).
        final_fit: for the final fit, the evaluation summary whose best epochs fix the epoch
            count; absent for cross-validation folds (early stopping on validation kappa).
        model: the fold's final fusion model and fold_result.json.
        metrics: best epoch, validation kappa, trainable parameters, steps per epoch, whether
            Stage 1's weights were kept, and the fold's validation metrics.
    """
    from pathlib import Path

    from components.common import (
        final_fit_epochs,
        log_stage2_outcome,
        log_stage_metrics,
        resolve_config,
    )
    from components.stage2 import run_stage2

    result = run_stage2(
        Path(prepared.path),
        Path(fold_plan.path),
        Path(rf.path),
        Path(stage1_model.path),
        resolve_config(config.path),
        Path(model.path),
        final_fit_epochs(final_fit, "stage2"),
    )
    log_stage_metrics(metrics, result["stage2"])
    log_stage2_outcome(metrics, result)


def main(argv=None) -> int:
    def add(parser):
        parser.add_argument("--prepared", required=True)
        parser.add_argument("--fold-plan", required=True)
        parser.add_argument("--rf", required=True)
        parser.add_argument("--stage1", required=True, help="the Stage 1 model folder")
        add_epochs_argument(parser)

    return cli(
        "components.stage2",
        __doc__,
        add,
        lambda a: run_stage2(a.prepared, a.fold_plan, a.rf, a.stage1, a.config, a.out, a.epochs),
        argv,
    )


if __name__ == "__main__":
    raise SystemExit(main())
