"""The training-health verdict on hand-made stage figures: a stage that stopped learning (the
study's failure) fails it; a stage that peaked early at epoch 1 while it kept learning passes,
and the verdict says so."""

import pytest

from dfu_ml.config import load_config
from dfu_ml.training.health import health_verdict, stopped_learning
from dfu_ml.training.metrics import KAPPA

CONFIG = load_config("smoke", ["modalities=metadata,depth_rgb"])


def stage(name, loss, kappa, steps=16, params=5000, **extra):
    best = max(range(len(kappa)), key=lambda i: (kappa[i], -i)) + 1
    return {
        "stage": name,
        "best_epoch": best,
        "best_val_kappa": kappa[best - 1],
        "epochs_run": len(loss),
        "trainable_params": params,
        "steps_per_epoch": steps,
        "history": {"loss": loss, KAPPA: kappa},
        **extra,
    }


LEARNING = ([0.60, 0.45, 0.35, 0.30], [0.40, 0.55, 0.62, 0.66])
EARLY_PEAK = ([0.43, 0.29, 0.24, 0.23, 0.22], [0.609, 0.551, 0.577, 0.58, 0.599])
FLAT_LOSS = ([0.500, 0.499, 0.4995, 0.498], [0.50, 0.48, 0.49, 0.47])
FLAT_KAPPA = ([0.60, 0.45, 0.35, 0.30], [0.0, 0.0, 0.0, 0.0])
AT_CHANCE = ([0.60, 0.45, 0.35, 0.30], [0.0, -0.05, 0.0, -0.02])


def fold(stage1_curves, stage2_kept=True):
    stage2 = stage(
        "stage2",
        [0.2, 0.19],
        [0.5, 0.5],
        kept_stage1_weights=stage2_kept,
        improved_on_stage1=not stage2_kept,
        fusion_rf_weight=0.66,
        fusion_rf_weight_initial=0.7,
    )
    return {
        "fold": 0,
        "pretrain": {"depth_rgb": stage("pretrain[depth_rgb]", *LEARNING)},
        "stage1": stage("stage1", *stage1_curves),
        "stage2": stage2,
        "metrics": {"per_row": {"predicted_classes": 3}},
    }


def checks(verdict):
    return {c["check"]: c for c in verdict["checks"]}


@pytest.mark.parametrize(
    "curves, stopped",
    [
        (LEARNING, False),
        (EARLY_PEAK, False),
        (FLAT_LOSS, True),
        (FLAT_KAPPA, True),
        (AT_CHANCE, True),
    ],
)
def test_stopped_learning_tells_a_stuck_stage_from_an_early_peak(curves, stopped):
    assert stopped_learning(stage("stage1", *curves), CONFIG.health_min_loss_drop) is stopped


def test_an_early_peak_of_a_learning_stage1_passes_and_is_reported():
    verdict = health_verdict([fold(EARLY_PEAK)], CONFIG, 0.6)
    by_name = checks(verdict)
    assert by_name["stage1_best_epoch_after_1"]["passed"]
    assert by_name["stage1_best_epoch_after_1"]["figure"] == 1
    assert "early peaks: [(0, 'stage1')]" in by_name["stage1_best_epoch_after_1"]["detail"]
    assert by_name["no_stage_restores_epoch_1"]["passed"]
    assert "early peaks that kept learning" in by_name["no_stage_restores_epoch_1"]["detail"]
    assert verdict["passed"]


@pytest.mark.parametrize("curves", [FLAT_LOSS, FLAT_KAPPA, AT_CHANCE])
def test_a_stage1_that_stopped_learning_at_epoch_1_fails(curves):
    verdict = health_verdict([fold(curves)], CONFIG, 0.6)
    by_name = checks(verdict)
    assert not by_name["stage1_best_epoch_after_1"]["passed"]
    assert not by_name["no_stage_restores_epoch_1"]["passed"]
    assert "(0, 'stage1')" in by_name["no_stage_restores_epoch_1"]["detail"]
    assert not verdict["passed"]


# Stage 2 at the study's 1e-6 (RC4): it stays where Stage 1's best epoch left it (LEARNING's
# epoch 4: loss 0.30, kappa 0.66).
STUCK_STAGE2 = {"loss": [0.300, 0.299], KAPPA: [0.66, 0.66]}


def test_a_used_stage2_that_stopped_learning_fails_but_a_discarded_one_does_not():
    stuck = fold(LEARNING, stage2_kept=False)
    stuck["stage2"]["history"] = STUCK_STAGE2
    assert not checks(health_verdict([stuck], CONFIG, 0.6))["no_stage_restores_epoch_1"]["passed"]
    kept = fold(LEARNING, stage2_kept=True)
    kept["stage2"]["history"] = STUCK_STAGE2
    assert checks(health_verdict([kept], CONFIG, 0.6))["no_stage_restores_epoch_1"]["passed"]


def test_a_stage2_whose_first_epoch_improved_on_stage1_is_learning():
    """Stage 2 starts from Stage 1's best weights: a first epoch that lowered the loss from there
    and beat Stage 1's kappa learned, even if later epochs did not (seed 42, fold 2 of the test
    dataset); measured from its own first epoch it looked stuck."""
    stage1 = stage(
        "stage1",
        [0.4594, 0.2892, 0.2422, 0.2149, 0.2033, 0.1848, 0.1746, 0.1725],
        [0.5155, 0.5987, 0.6085, 0.6629, 0.7239, 0.7676, 0.7729, 0.7767],
    )
    stage2 = stage("stage2", [0.1558, 0.1644, 0.1536, 0.169], [0.7873, 0.7746, 0.7658, 0.7606])
    drop = CONFIG.health_min_loss_drop
    assert stopped_learning(stage2, drop)  # judged alone: its loss never fell 5% below epoch 1
    assert not stopped_learning(stage2, drop, start=stage1)
    improved = fold(LEARNING, stage2_kept=False)
    improved["stage1"], improved["stage2"] = stage1, {**improved["stage2"], **stage2}
    by_name = checks(health_verdict([improved], CONFIG, 0.78))
    assert by_name["no_stage_restores_epoch_1"]["passed"]
    assert "(0, 'stage2')" in by_name["no_stage_restores_epoch_1"]["detail"]  # an early peak


def test_the_loss_drop_threshold_is_configurable():
    strict = load_config("smoke", ["modalities=metadata,depth_rgb", "health_min_loss_drop=0.9"])
    assert not health_verdict([fold(EARLY_PEAK)], strict, 0.6)["passed"]
