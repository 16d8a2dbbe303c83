"""Step ``stage1``: fusion model with the pre-trained encoders loaded and the backbones frozen."""

from pathlib import Path

from kfp.dsl import Dataset, Input, Metrics, Model, Output

from components.common import (
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


def encoder_dirs_by_modality(encoders: list[Path]) -> dict:
    """Map each encoder artifact folder to its modality, read from its own description."""
    from dfu_ml.training.models import ENCODER_CONFIG

    return {read_json(Path(d) / ENCODER_CONFIG)["modality"]: Path(d) for d in encoders}


def run_stage1(
    prepared: Path,
    fold_plan: Path,
    rf: Path,
    encoders: list[Path],
    config: Config,
    out: Path,
    epochs: int = 0,
) -> dict:
    """Train Stage 1 and save the fusion model and the stage summaries into ``out``."""
    import numpy as np

    from dfu_ml.data.prepare import load_prepared
    from dfu_ml.errors import ConfigError
    from dfu_ml.training.fold import run_stage1 as train
    from dfu_ml.training.models import ENCODER_CONFIG

    dirs = encoder_dirs_by_modality(encoders)
    missing = sorted(set(config.image_modalities) - set(dirs))
    if missing:
        raise ConfigError(f"no pre-trained encoder for {missing}; pass one --encoder per modality")
    plan = read_json(Path(fold_plan) / PLAN_FILE)
    rf_proba = np.load(Path(rf) / RF_PROBA_FILE)
    result = train(load_prepared(prepared), config, plan, rf_proba, dirs, epochs=epochs or None)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    result.model.save(out / MODEL_FILE)
    summary = {
        "fold": plan["fold"],
        "stage1": result.summary(),
        "pretrain": {m: read_json(d / ENCODER_CONFIG)["summary"] for m, d in dirs.items()},
    }
    write_json(out / SUMMARY_FILE, summary)
    return summary


def stage1_fusion(
    prepared: Input[Dataset],
    fold_plan: Input[Dataset],
    rf: Input[Dataset],
    encoders: Input[list[Model]],
    config: Input[Dataset],
    model: Output[Model],
    metrics: Output[Metrics],
    final_fit: Input[Dataset] = None,
):
    """Stage 1: the fusion model (RF probabilities + image branches + learnable fusion weight)
    with the pre-trained encoders loaded by name and only the backbones frozen.

    Args:
        prepared: the prepared dataset.
        fold_plan: the fold plan from resample_alpha.
        rf: the clinical random forest's probabilities.
        encoders: one encoder artifact per image modality.
        config: the run's resolved configuration (config.json).
        final_fit: for the final fit, the evaluation summary whose best epochs fix the epoch
            count; absent for cross-validation folds (early stopping on validation kappa).
        model: the Stage 1 fusion model and the stage summaries.
        metrics: best epoch, validation kappa, trainable parameters, steps per epoch.
    """
    from pathlib import Path

    from components.common import final_fit_epochs, log_stage_metrics, resolve_config
    from components.stage1 import run_stage1

    summary = run_stage1(
        Path(prepared.path),
        Path(fold_plan.path),
        Path(rf.path),
        [Path(e.path) for e in encoders],
        resolve_config(config.path),
        Path(model.path),
        final_fit_epochs(final_fit, "stage1"),
    )
    log_stage_metrics(metrics, summary["stage1"])
    model.metadata.update(
        {
            "best_epoch": summary["stage1"]["best_epoch"],
            "trainable_params": summary["stage1"]["trainable_params"],
        }
    )


def main(argv=None) -> int:
    def add(parser):
        parser.add_argument("--prepared", required=True)
        parser.add_argument("--fold-plan", required=True)
        parser.add_argument("--rf", required=True)
        parser.add_argument(
            "--encoder",
            action="append",
            default=[],
            help="an encoder artifact folder; repeat for each modality",
        )
        add_epochs_argument(parser)

    return cli(
        "components.stage1",
        __doc__,
        add,
        lambda a: run_stage1(a.prepared, a.fold_plan, a.rf, a.encoder, a.config, a.out, a.epochs),
        argv,
    )


if __name__ == "__main__":
    raise SystemExit(main())
