"""The training stages on a tiny synthetic dataset: batch size and steps, per-epoch kappa history,
best epoch, trainable parameters, freezing, Stage 2's fallback and determinism (TRAINING.md)."""

import math

import keras
import numpy as np
import pytest

from dfu_ml.training import models
from dfu_ml.training.fold import (
    model_inputs,
    plan_fold,
    fold_rf,
    run_pretrain,
    run_stage1,
    run_stage2,
    training_rows,
)
from dfu_ml.training.metrics import KAPPA, quadratic_kappa
from dfu_ml.training.stages import build_fusion_for, effective_batch_size, predict_all
from fixtures_data import smoke_config

pytestmark = pytest.mark.slow

MODALITY = "depth_rgb"
TINY = (
    "modalities=metadata,depth_rgb",
    "pretrain_epochs=3",
    "stage1_epochs=3",
    "stage2_epochs=2",
    "rf_n_estimators=20",
    "rf_inner_folds=2",
)


def quiet(message):
    pass


def weights_of(layer):
    return [np.array(w) for w in layer.get_weights()]


def same(a, b):
    return len(a) == len(b) and all(np.array_equal(x, y) for x, y in zip(a, b))


def backbone_of(model):
    return model.get_layer(models.encoder_name(MODALITY)).get_layer(models.backbone_name(MODALITY))


def head_of(model):
    return model.get_layer(models.encoder_name(MODALITY)).get_layer(f"{MODALITY}_features")


# ------------------------------------------------------------------------ batch size and steps


def test_effective_batch_size_clips_below_the_training_set():
    assert effective_batch_size(471, 600, 3) == 157  # the study's RC6 case
    assert effective_batch_size(267, 16, 2) == 16  # already small enough: unchanged
    assert effective_batch_size(471, 600, 3, clip=False) == 600
    for rows in (1, 2, 5, 17, 100, 471, 1000):
        for batch in (1, 16, 32, 600, 100000):
            for min_steps in (1, 2, 3, 5):
                b = effective_batch_size(rows, batch, min_steps)
                assert 1 <= b <= batch
                if rows >= min_steps:
                    assert math.ceil(rows / b) >= min_steps
                if rows >= 2 and min_steps >= 2:
                    assert b < rows


@pytest.fixture(scope="module")
def fold_data(prepared_synthetic):
    config = smoke_config(*TINY)
    plan = plan_fold(prepared_synthetic, config, 0)
    rf_proba, _ = fold_rf(prepared_synthetic, config, plan)
    return prepared_synthetic, config, plan, rf_proba


@pytest.fixture(scope="module")
def trained(fold_data, tmp_path_factory):
    """Pre-training, Stage 1 and Stage 2 once, with snapshots taken between the stages."""
    dataset, config, plan, rf_proba = fold_data
    enc_dir = tmp_path_factory.mktemp("stages") / "encoder"
    pre = run_pretrain(dataset, config, plan, MODALITY, enc_dir, log=quiet)
    out = {"pre": pre, "pre_iterations": int(pre.model.optimizer.iterations), "enc_dir": enc_dir}
    artifact = keras.saving.load_model(enc_dir / models.ENCODER_FILE, compile=False)
    out["artifact_backbone"] = weights_of(artifact.get_layer(models.backbone_name(MODALITY)))
    out["artifact_head"] = weights_of(artifact.get_layer(f"{MODALITY}_features"))
    s1 = run_stage1(dataset, config, plan, rf_proba, {MODALITY: enc_dir}, log=quiet)
    out.update(
        s1=s1,
        s1_iterations=int(s1.model.optimizer.iterations),
        s1_weights=[np.array(w) for w in s1.model.get_weights()],
        # Snapshots: Stage 2 goes on training the same model object.
        s1_backbone=weights_of(backbone_of(s1.model)),
        s1_head=weights_of(head_of(s1.model)),
        s1_loss_alpha=list(s1.model.loss.alpha),
    )
    s2 = run_stage2(dataset, config, plan, rf_proba, s1, log=quiet)
    out.update(s2=s2, s2_iterations=int(s2.model.optimizer.iterations))
    return out


def test_stage_results(trained, fold_data):
    dataset, config, plan, _ = fold_data
    n_train = len(plan["train_rows_resampled"])
    n_val = len(plan["val_rows"])
    for key in ("pre", "s1", "s2"):
        r = trained[key]
        assert r.train_rows == n_train
        assert r.batch_size == effective_batch_size(
            n_train, config.batch_size, config.health_min_steps_per_epoch
        )
        assert r.steps_per_epoch == math.ceil(n_train / r.batch_size)
        assert r.steps_per_epoch >= config.health_min_steps_per_epoch
        # Keras ran exactly that many updates per epoch.
        assert trained[f"{key}_iterations"] == r.steps_per_epoch * r.epochs_run
        history = r.history[KAPPA]
        assert len(history) == r.epochs_run == len(r.history["loss"]) >= 2
        assert r.best_epoch == int(np.argmax(history)) + 1
        assert r.best_val_kappa == history[r.best_epoch - 1]
        assert r.trainable_params > 0
        assert r.val_rows_scored == n_val
        summary = r.summary()
        assert summary["history"][KAPPA] == history and "model" not in summary
    assert trained["pre"].epochs_run == config.pretrain_epochs
    # Stage 1 trains more than a Dense(3) on frozen features (RC3).
    assert trained["s1"].trainable_params > 3 * config.feature_dim + 3 + 1


def test_alphas_reach_the_loss(trained, fold_data):
    _, config, plan, _ = fold_data
    assert list(trained["pre"].model.loss.alpha) == pytest.approx([1.0, 1.0, 1.0])  # RC1
    assert trained["s1_loss_alpha"] == pytest.approx(plan["alpha_fusion"])
    assert trained["pre"].model.loss.gamma == config.focal_gamma


def test_returned_weights_are_the_best_epochs(trained, fold_data):
    """The pre-trained model's validation kappa is the best epoch's (restored weights)."""
    dataset, config, plan, _ = fold_data
    rows = training_rows(dataset, config)
    x = model_inputs(dataset, config, rows, plan["val_rows"], None, [MODALITY])
    y = rows["label"].to_numpy()[plan["val_rows"]]
    kappa = quadratic_kappa(y, predict_all(trained["pre"].model, x, 64).argmax(1))
    assert kappa == pytest.approx(trained["pre"].best_val_kappa, abs=1e-9)


def test_stage1_freezes_only_the_backbone(trained):
    s1 = trained["s1"]
    # Loaded from the encoder artifact and unchanged by training.
    assert same(trained["s1_backbone"], trained["artifact_backbone"])
    # The encoder's head trained.
    assert not same(trained["s1_head"], trained["artifact_head"])
    # Trainable = everything but the backbone.
    fresh = build_fusion_for(smoke_config(*TINY))
    models.set_backbone_trainable(fresh, [MODALITY], False)
    assert s1.trainable_params == models.count_trainable_params(fresh)


def test_stage1_encoder_freeze_option(fold_data, trained):
    dataset, _, plan, rf_proba = fold_data
    config = smoke_config(*TINY, "stage1_freeze=encoder", "stage1_epochs=2")
    s1 = run_stage1(dataset, config, plan, rf_proba, {MODALITY: trained["enc_dir"]}, log=quiet)
    encoder = s1.model.get_layer(models.encoder_name(MODALITY))
    artifact = keras.saving.load_model(trained["enc_dir"] / models.ENCODER_FILE, compile=False)
    assert same(weights_of(encoder), weights_of(artifact))
    assert s1.trainable_params < trained["s1"].trainable_params
    # Only the image classifier and the fusion logit.
    assert s1.trainable_params == 3 * config.feature_dim + 3 + 1


def test_stage2_unfreezes_part_of_the_backbone(trained):
    assert trained["s2"].trainable_params > trained["s1"].trainable_params
    extra = trained["s2"].extra
    assert extra["improved_on_stage1"] != extra["kept_stage1_weights"]
    assert extra["weights_from"] == ("stage1" if extra["kept_stage1_weights"] else "stage2")
    assert extra["stage1_val_kappa"] == trained["s1"].best_val_kappa
    assert extra["improved_on_stage1"] == (
        trained["s2"].best_val_kappa > trained["s1"].best_val_kappa
    )


@pytest.mark.parametrize("stage2_lr", [1e-12, 0.5])
def test_stage2_keeps_stage1_weights_when_not_improving(fold_data, trained, stage2_lr):
    """Stage 2 cannot improve: a rate too small to change any prediction, or one so large that
    every update wrecks the model (its weights surely moved, so equal weights afterwards prove
    the restore). Stage 1's weights come back, and the final kappa is measured on them."""
    dataset, config, plan, rf_proba = fold_data
    s1 = run_stage1(dataset, config, plan, rf_proba, {MODALITY: trained["enc_dir"]}, log=quiet)
    stage1_weights = [np.array(w) for w in s1.model.get_weights()]
    s2 = run_stage2(
        dataset, config.replace(stage2_lr=stage2_lr, stage2_epochs=2), plan, rf_proba, s1, log=quiet
    )
    assert s2.best_val_kappa <= s1.best_val_kappa
    assert s2.extra["kept_stage1_weights"] is True
    assert s2.extra["improved_on_stage1"] is False
    assert s2.extra["weights_from"] == "stage1"
    assert same([np.array(w) for w in s2.model.get_weights()], stage1_weights)
    assert s2.extra["final_val_kappa"] == pytest.approx(s1.best_val_kappa, abs=1e-9)
    assert s2.extra["fusion_rf_weight"] == pytest.approx(s1.extra["fusion_rf_weight"])


def test_training_is_deterministic_for_a_seed(fold_data, tmp_path):
    dataset, config, plan, _ = fold_data
    config = config.replace(pretrain_epochs=2)
    runs = [
        run_pretrain(dataset, config.replace(seed=seed), plan, MODALITY, None, log=quiet)
        for seed in (7, 7, 8)
    ]
    a, b, c = ([np.array(w) for w in r.model.get_weights()] for r in runs)
    assert same(a, b)
    assert runs[0].history == runs[1].history
    assert not same(a, c)
