"""Step ``resample_alpha``: fold -> training index (resampled), validation index, focal alphas."""

from pathlib import Path

from kfp.dsl import Dataset, Input, Output

from components.common import PLAN_FILE, cli, write_json
from dfu_ml.config import Config


def run_resample_alpha(prepared: Path, fold: int, config: Config, out: Path) -> dict:
    """Write the fold plan (``fold_plan.json``) into ``out``; fold -1 is the final fit."""
    from dfu_ml.data.prepare import load_prepared
    from dfu_ml.training.fold import plan_fold

    plan = plan_fold(load_prepared(prepared), config, fold)
    write_json(Path(out) / PLAN_FILE, plan)
    print(
        f"fold {fold}: train {plan['class_counts_train']} -> resampled "
        f"{plan['class_counts_resampled']} ({config.resampling}), validation "
        f"{plan['class_counts_val']}; alpha {[round(a, 3) for a in plan['alpha_fusion']]}, "
        f"pre-training alpha {[round(a, 3) for a in plan['alpha_pretrain']]}",
        flush=True,
    )
    return plan


def make_fold_plan(
    prepared: Input[Dataset], fold: int, config: Input[Dataset], fold_plan: Output[Dataset]
):
    """Split patients for one fold, resample the training rows and compute the focal-loss alphas
    (capped inverse frequency for fusion, [1, 1, 1] for pre-training by default).

    Args:
        prepared: the prepared dataset.
        fold: fold number, or -1 for the final fit on all patients.
        config: the run's resolved configuration (config.json).
        fold_plan: the fold plan (fold_plan.json).
    """
    from pathlib import Path

    from components.common import resolve_config
    from components.resample_alpha import run_resample_alpha

    plan = run_resample_alpha(
        Path(prepared.path), fold, resolve_config(config.path), Path(fold_plan.path)
    )
    fold_plan.metadata.update({"fold": fold, "alpha_fusion": plan["alpha_fusion"]})


def main(argv=None) -> int:
    def add(parser):
        parser.add_argument("--prepared", required=True)
        parser.add_argument("--fold", required=True, type=int, help="fold number, -1 = final fit")

    return cli(
        "components.resample_alpha",
        __doc__,
        add,
        lambda a: run_resample_alpha(a.prepared, a.fold, a.config, a.out),
        argv,
    )


if __name__ == "__main__":
    raise SystemExit(main())
