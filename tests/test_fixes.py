"""Proof that the root-cause fixes work (TRAINING.md): on a synthetic dataset with a real class
signal, the smoke profile's every fold passes every health check; the pre-fix settings (uncapped
pre-training alpha, one update per epoch, Stage 2 at 1e-6, fixed 0.70/0.30 fusion) fail the verdict
and are flagged by the checks that were written for them."""

import numpy as np
import pytest

from dfu_ml.evaluation import summarize_folds
from dfu_ml.training.fold import run_fold
from dfu_ml.training.health import format_verdict, health_verdict
from fixtures_data import smoke_config

pytestmark = pytest.mark.slow

MODALITIES = "modalities=metadata,depth_rgb,thermal_map"
PRE_FIX = (
    "pretrain_alpha=uncapped",
    "clip_batch_size=false",
    "batch_size=100000",
    "stage2_lr=1e-6",
    "fusion_learnable=false",
)


def quiet(message):
    pass


def failed_checks(verdict):
    return {c["check"] for c in verdict["checks"] if not c["passed"]}


# Several seeds, each on another fold, so that the fixed defaults are shown to hold in general,
# not on one lucky draw; seed 42's fold 2 is the one whose Stage 1 peaked at epoch 1 on an AMD EPYC.
SEED_FOLDS = [(0, 0), (1, 1), (2, 2), (3, 0), (42, 2)]


@pytest.mark.parametrize("seed, fold", SEED_FOLDS)
def test_fixed_defaults_pass_every_health_check(prepared_synthetic, tmp_path, seed, fold):
    config = smoke_config(MODALITIES, "cv_folds=3", f"seed={seed}")
    assert config.pretrain_alpha == "equal" and config.clip_batch_size
    assert config.fusion_learnable and config.stage2_lr > 1e-6
    result = run_fold(prepared_synthetic, config, fold, tmp_path, log=quiet)
    summary = summarize_folds([result], config)
    verdict = summary["health"]
    assert verdict["passed"], f"seed {seed}, fold {fold}:\n{format_verdict(verdict)}"
    assert summary["blessed"]
    assert {c["check"] for c in verdict["checks"]} == {
        "pretraining_kappa_positive",
        "stage1_best_epoch_after_1",
        "stage2_improves_or_stage1_kept",
        "no_stage_restores_epoch_1",
        "fusion_weight_learned",
        "trainable_params_minimum",
        "steps_per_epoch_minimum",
        "final_kappa_above_threshold",
        "predictions_cover_several_classes",
    }
    # The figures behind the checks, from the fold itself, with a margin.
    assert result["stage1"]["steps_per_epoch"] >= 3
    assert result["stage2"]["fusion_rf_weight"] != pytest.approx(0.7, abs=1e-4)
    assert all(p["best_val_kappa"] > 0.1 for p in result["pretrain"].values())
    assert result["metrics"]["per_row"]["quadratic_kappa"] > config.health_min_kappa + 0.2


def test_pre_fix_settings_fail_and_are_flagged(prepared_synthetic, tmp_path):
    """The study's settings on the same data and fold: one update per epoch, a fixed fusion, a
    useless Stage 2. One fold is enough for the verdict to fail."""
    config = smoke_config(MODALITIES, "cv_folds=3", *PRE_FIX)
    fold = run_fold(prepared_synthetic, config, 0, tmp_path, log=quiet)
    verdict = health_verdict([fold], config, fold["metrics"]["per_row"]["quadratic_kappa"])
    failed = failed_checks(verdict)
    assert not verdict["passed"]
    assert {"steps_per_epoch_minimum", "fusion_weight_learned"} <= failed, format_verdict(verdict)
    # The figures: one step per epoch in every stage, and a fusion weight that never moved.
    stages = [*fold["pretrain"].values(), fold["stage1"], fold["stage2"]]
    assert {s["steps_per_epoch"] for s in stages} == {1}
    assert fold["stage2"]["fusion_rf_weight"] == pytest.approx(0.7, abs=1e-6)
    assert fold["stage2"]["fusion_learnable"] is False
    assert fold["plan"]["alpha_pretrain"] != pytest.approx([1.0, 1.0, 1.0])


def test_run_fold_is_deterministic(prepared_synthetic, tmp_path):
    config = smoke_config(
        "modalities=metadata,depth_rgb",
        "pretrain_epochs=2",
        "stage1_epochs=2",
        "stage2_epochs=1",
        "rf_n_estimators=20",
        "rf_inner_folds=2",
    )
    first = run_fold(prepared_synthetic, config, 1, tmp_path / "a", log=quiet)
    second = run_fold(prepared_synthetic, config, 1, tmp_path / "b", log=quiet)
    for stage in ("stage1", "stage2"):
        for key in ("history", "best_epoch", "best_val_kappa", "trainable_params"):
            assert first[stage][key] == second[stage][key]
    assert first["pretrain"]["depth_rgb"]["history"] == second["pretrain"]["depth_rgb"]["history"]
    np.testing.assert_array_equal(np.array(first["proba"]), np.array(second["proba"]))
    assert first["metrics"] == second["metrics"]
