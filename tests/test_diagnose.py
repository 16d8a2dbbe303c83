"""``dfu-kfp diagnose``'s parts: the root-cause overlays and variants, the switches they set (the
study's monitor, alphas, carried-over classifier, Stage 2 override), which variants share a
pre-training, and the report's paired costs and findings. The pipeline end to end is in
tests/test_diagnose_pipeline.py."""

import keras
import numpy as np
import pytest
from sklearn.metrics import cohen_kappa_score

from dfu_ml import diagnose
from dfu_ml.config import Config, load_config
from dfu_ml.diagnose import (
    FIXED,
    FUSION_ONLY_KEYS,
    PRE_FIX,
    ROOT_CAUSES,
    SHARED_KEYS,
    VARIANTS,
    overlay_values,
    pretrain_config,
    pretrain_group,
    pretrain_groups,
    variant_config,
)
from dfu_ml.diagnose_report import MIN_KAPPA_EFFECT, paired_cost, root_cause_finding
from dfu_ml.errors import ConfigError
from dfu_ml.training import models
from dfu_ml.training.metrics import BATCH_KAPPA, KAPPA, batch_kappa
from dfu_ml.training.resampling import compute_focal_alpha, focal_alpha
from dfu_ml.training.stages import FitSettings, StageData, _fit


# --- overlays and variants ---------------------------------------------------------------------
@pytest.mark.parametrize("rc", ROOT_CAUSES, ids=lambda rc: rc.id)
def test_each_overlay_reverts_something_and_documents_its_check(rc):
    values = overlay_values(rc.id)
    assert values and not set(values) & SHARED_KEYS
    for config in (Config(), load_config("smoke"), load_config("paper")):
        reverted = variant_config(config, rc.variant)
        changed = {k for k in values if getattr(reverted, k) != getattr(config, k)}
        assert changed, f"{rc.overlay} changes nothing on profile {config.profile}"
    text = (diagnose.OVERLAY_DIR / rc.overlay).read_text()
    assert f"{rc.id} reverted" in text
    for check in rc.checks:
        assert check in text, f"{rc.overlay} does not name the check written for it: {check}"


def test_variants_are_the_fixed_config_with_their_overlays():
    base = load_config("smoke", ["cv_folds=2"])
    assert variant_config(base, FIXED) == base
    pre_fix = variant_config(base, PRE_FIX)
    for rc in ROOT_CAUSES:
        minus = variant_config(base, rc.variant)
        changed = {k for k in base.to_dict() if getattr(minus, k) != getattr(base, k)}
        assert changed and changed <= set(overlay_values(rc.id))
        for key in overlay_values(rc.id):
            assert getattr(pre_fix, key) == getattr(minus, key), key
    # The study's settings, as the root-cause analysis names them.
    assert (pre_fix.pretrain_alpha, pre_fix.fusion_alpha) == ("uncapped", "uncapped")
    assert (pre_fix.stage1_freeze, pre_fix.stage2_lr, pre_fix.stage2_keep_better) == (
        "encoder",
        1e-6,
        False,
    )
    assert (pre_fix.fusion_learnable, pre_fix.fusion_rf_weight) == (False, 0.7)
    assert (pre_fix.batch_size, pre_fix.clip_batch_size) == (600, False)
    assert pre_fix.transfer_output_layer and pre_fix.pretrain_monitor == "batch_kappa"
    assert list(VARIANTS) == [PRE_FIX, FIXED, *(rc.variant for rc in ROOT_CAUSES)]


def test_variants_share_a_pretraining_only_when_it_is_the_same():
    assert pretrain_groups() == [PRE_FIX, FIXED, "minus-RC1", "minus-RC6"]
    for v in ("minus-RC2", "minus-RC3", "minus-RC4", "minus-RC5"):
        assert pretrain_group(v) == FIXED
    # What pre-training reads (the model it builds and how it fits) does not depend on the keys
    # that only the fusion stages read, so the sharing cannot change a result.
    base = load_config("smoke")
    for v in VARIANTS:
        config = variant_config(base, v)
        shared = pretrain_config(base, pretrain_group(v))
        assert FitSettings.for_stage(config, "pretrain") == FitSettings.for_stage(
            shared, "pretrain"
        )
        assert models.EncoderSpec.from_config(config) == models.EncoderSpec.from_config(shared)
        assert (config.pretrain_alpha, config.seed) == (shared.pretrain_alpha, shared.seed)
        differing = {k for k in base.to_dict() if getattr(config, k) != getattr(shared, k)}
        assert differing <= FUSION_ONLY_KEYS


def test_an_overlay_may_not_change_what_every_variant_shares(tmp_path, monkeypatch):
    (tmp_path / "rc3.yaml").write_text("stage1_freeze: encoder\nresampling: none\n")
    monkeypatch.setattr(diagnose, "OVERLAY_DIR", tmp_path)
    with pytest.raises(ConfigError, match="'resampling' shapes the data, folds or forest"):
        overlay_values("RC3")
    with pytest.raises(ConfigError, match="unknown diagnose variant 'minus-RC9'"):
        diagnose.variant_overrides("minus-RC9")


def test_diagnose_needs_an_image_modality():
    with pytest.raises(ConfigError, match="needs at least one image modality"):
        diagnose.check_diagnosable(load_config("smoke", ["modalities=metadata"]))


@pytest.mark.parametrize(
    "override, message",
    [
        ("fusion_alpha=inverse", "'fusion_alpha': 'inverse' is not one of equal, capped"),
        ("pretrain_monitor=val_loss", "'pretrain_monitor': 'val_loss' is not one of"),
        ("stage2_keep_better=sometimes", "'stage2_keep_better' must be true or false"),
    ],
)
def test_new_switches_are_validated(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config("smoke", [override])


# --- the switches -------------------------------------------------------------------------------
def test_focal_alpha_settings():
    labels = np.array([0] * 30 + [1] * 60 + [2] * 10)
    counts = np.bincount(labels)
    assert focal_alpha("equal", counts, 3.0) == [1.0, 1.0, 1.0]
    assert focal_alpha("capped", counts, 3.0) == pytest.approx(compute_focal_alpha(labels, 3.0))
    uncapped = focal_alpha("uncapped", counts, 3.0)
    assert uncapped == pytest.approx(compute_focal_alpha(labels, None))
    assert max(uncapped) / min(uncapped) == pytest.approx(6.0)


def test_batch_kappa_is_the_mean_unweighted_kappa_of_the_batches():
    rng = np.random.default_rng(0)
    y_true, y_pred = rng.integers(0, 3, 50), rng.integers(0, 3, 50)
    y_pred[:25] = y_true[:25]
    expected = np.mean(
        [cohen_kappa_score(y_true[i : i + 16], y_pred[i : i + 16]) for i in range(0, 50, 16)]
    )
    assert batch_kappa(y_true, y_pred, 16) == pytest.approx(expected)
    assert batch_kappa(y_true, y_pred, 600) == pytest.approx(cohen_kappa_score(y_true, y_pred))
    # A batch of one class everywhere has no kappa: it counts as 0.
    assert batch_kappa(np.zeros(8, int), np.zeros(8, int), 4) == 0.0


def test_the_study_monitor_picks_the_best_epoch_and_the_report_keeps_quadratic_kappa():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(90, 4)).astype("float32")
    y = (x[:, 0] > 0).astype(int) + (x[:, 0] > 1).astype(int)
    inputs = keras.Input((4,), name="x")
    model = keras.Model(
        {"x": inputs}, keras.layers.Dense(3, activation="softmax", name="output")(inputs)
    )
    data = StageData({"x": x[:60]}, y[:60], {"x": x[60:]}, y[60:])
    settings = FitSettings(learning_rate=0.05, epochs=6, batch_size=8, monitor=BATCH_KAPPA)
    result = _fit("pretrain[x]", model, data, [1, 1, 1], settings, lambda _: None)
    history = result.history
    assert len(history[BATCH_KAPPA]) == len(history[KAPPA]) == result.epochs_run
    assert result.best_epoch == int(np.argmax(history[BATCH_KAPPA])) + 1
    assert result.best_val_kappa == history[KAPPA][result.best_epoch - 1]


@pytest.mark.parametrize("modalities", [["depth_rgb"], ["depth_rgb", "thermal_map"]])
def test_the_pretrained_output_layer_is_carried_over_only_when_asked(tmp_path, modalities):
    spec = models.EncoderSpec(image_size=32, feature_dim=8)
    dirs, saved = {}, []
    for i, modality in enumerate(modalities):
        image_model = models.build_image_model(models.build_image_encoder(modality, spec), modality)
        output = image_model.get_layer(models.OUTPUT_LAYER)
        output.set_weights([np.full((8, 3), i + 1.0, "float32"), np.full(3, -i, "float32")])
        dirs[modality] = tmp_path / modality
        dirs[modality].mkdir()
        models.save_output_layer(image_model, dirs[modality])
        saved.append(output.get_weights())
    fusion = models.build_fusion_model(models.FusionSpec(tuple(modalities), spec))
    classifier = fusion.get_layer(models.IMAGE_CLASSIFIER)
    assert not np.allclose(classifier.get_weights()[0], saved[0][0])
    models.load_output_layer_into(fusion, dirs)
    kernel, bias = classifier.get_weights()
    np.testing.assert_allclose(kernel, np.mean([w[0] for w in saved], axis=0))
    np.testing.assert_allclose(bias, np.mean([w[1] for w in saved], axis=0))


# --- paired costs and findings ------------------------------------------------------------------
def _variant(kappas, failed=()):
    return {"kappa": {"per_fold": dict(enumerate(kappas))}, "failed_checks": list(failed)}


def test_paired_cost_and_what_counts_as_measurable():
    cost = paired_cost(_variant([0.8, 0.7, 0.75]), _variant([0.5, 0.45, 0.55]))
    assert cost["per_fold"] == pytest.approx([0.3, 0.25, 0.2])
    assert cost["mean"] == pytest.approx(0.25) and cost["sd"] == pytest.approx(0.05)
    assert cost["measurable"]
    # Folds that disagree: the spread is larger than the mean.
    assert not paired_cost(_variant([0.8, 0.7]), _variant([0.7, 0.75]))["measurable"]
    # Consistent but tiny (below a row or two changing class).
    small = MIN_KAPPA_EFFECT / 2
    assert not paired_cost(_variant([0.8, 0.7]), _variant([0.8 - small, 0.7 - small]))["measurable"]
    # One fold: no spread, nothing is measurable.
    one = paired_cost(_variant([0.9]), _variant([0.1]))
    assert not one["measurable"] and np.isnan(one["sd"])


@pytest.mark.parametrize(
    "kappas, failed, finding, phrase",
    [
        ([0.5, 0.4], ["fusion_weight_learned"], "flagged", "flagged by the check written for it"),
        ([0.5, 0.4], [], "missed", "the verdict misses this revert"),
        ([0.95, 0.85], [], "fix_costs_kappa", "the fix costs kappa"),
        ([0.79, 0.71], ["final_kappa_above_threshold"], "other_checks", "not by the check"),
        ([0.79, 0.71], [], "no_measurable_difference", "made no measurable difference"),
    ],
)
def test_root_cause_findings(kappas, failed, finding, phrase):
    fixed = _variant([0.8, 0.7])
    result = root_cause_finding("RC5", fixed, _variant(kappas, failed))
    assert result["finding"] == finding
    assert phrase in result["line"] and result["line"].startswith("RC5 (")
    assert result["tripped"] == failed
    assert "paired over 2 folds" in result["line"]


def test_a_check_failing_for_fixed_too_is_not_counted_as_tripped():
    fixed = _variant([0.8, 0.7], ["fusion_weight_learned"])
    result = root_cause_finding("RC5", fixed, _variant([0.79, 0.71], ["fusion_weight_learned"]))
    assert result["tripped"] == [] and result["failing_for_fixed_too"] == ["fusion_weight_learned"]
    assert "fails for fixed too" in result["line"]
