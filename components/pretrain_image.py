"""Step ``pretrain_image``: fold x image modality -> encoder artifact, history and metrics."""

from pathlib import Path

from kfp.dsl import Dataset, Input, Metrics, Model, Output

from components.common import PLAN_FILE, add_epochs_argument, cli, read_json
from dfu_ml.config import Config


def run_pretrain_image(
    prepared: Path, fold_plan: Path, modality: str, config: Config, out: Path, epochs: int = 0
) -> dict:
    """Pre-train one modality's image model and save its encoder (no ``output`` layer) in ``out``.

    ``epochs`` > 0 overrides the configured maximum (the final fit uses the folds' best epochs).
    """
    from dfu_ml.data.prepare import load_prepared
    from dfu_ml.errors import ConfigError
    from dfu_ml.training.fold import run_pretrain

    if modality not in config.image_modalities:
        raise ConfigError(
            f"--modality {modality!r} is not among the run's image modalities "
            f"{config.image_modalities}"
        )
    plan = read_json(Path(fold_plan) / PLAN_FILE)
    result = run_pretrain(
        load_prepared(prepared), config, plan, modality, Path(out), epochs=epochs or None
    )
    return result.summary()


def pretrain_encoder(
    prepared: Input[Dataset],
    fold_plan: Input[Dataset],
    modality: str,
    config: Input[Dataset],
    encoder: Output[Model],
    metrics: Output[Metrics],
    final_fit: Input[Dataset] = None,
):
    """Pre-train the standalone image model of one modality (focal loss with equal alpha, early
    stopping on validation quadratic kappa) and export its encoder for Stage 1.

    Args:
        prepared: the prepared dataset.
        fold_plan: the fold plan from resample_alpha.
        modality: depth_rgb, depth_map, thermal_rgb or thermal_map.
        config: the run's resolved configuration (config.json).
        final_fit: for the final fit, the evaluation summary whose best epochs fix the epoch
            count; absent for cross-validation folds (early stopping on validation kappa).
        encoder: the encoder artifact (encoder.keras, encoder.json).
        metrics: best epoch, validation kappa, trainable parameters.
    """
    from pathlib import Path

    from components.common import final_fit_epochs, log_stage_metrics, resolve_config
    from components.pretrain_image import run_pretrain_image

    summary = run_pretrain_image(
        Path(prepared.path),
        Path(fold_plan.path),
        modality,
        resolve_config(config.path),
        Path(encoder.path),
        final_fit_epochs(final_fit, "pretrain"),
    )
    log_stage_metrics(metrics, summary, prefix=f"{modality}_")
    encoder.metadata.update({"modality": modality, "best_epoch": summary["best_epoch"]})


def main(argv=None) -> int:
    def add(parser):
        parser.add_argument("--prepared", required=True)
        parser.add_argument("--fold-plan", required=True)
        parser.add_argument("--modality", required=True)
        add_epochs_argument(parser)

    return cli(
        "components.pretrain_image",
        __doc__,
        add,
        lambda a: run_pretrain_image(
            a.prepared, a.fold_plan, a.modality, a.config, a.out, a.epochs
        ),
        argv,
    )


if __name__ == "__main__":
    raise SystemExit(main())
