"""The training stages on a tiny synthetic dataset: batch size and steps, per-epoch kappa history,
best epoch, trainable parameters, freezing, Stage 2's fallback and determinism (TRAINING.md)."""

import math

import keras
import numpy as np
import pytest
from fixtures_data import smoke_config
from keras import ops

from dfu_ml.training import models
from dfu_ml.training.fold import (
    fold_rf,
    model_inputs,
    plan_fold,
    run_pretrain,
    run_stage1,
    run_stage2,
    stage_data,
    training_rows,
)
from dfu_ml.training.metrics import KAPPA, quadratic_kappa
from dfu_ml.training.stages import (
    EpochBatches,
    FitSettings,
    FixedBatches,
    _fit,
    backbone_features,
    build_fusion_for,
    effective_batch_size,
    predict_all,
)

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


# ------------------------------------------------------------ fixed batch shapes (RC6 holds)


@pytest.mark.parametrize("rows, batch", [(37, 8), (40, 8), (5, 16), (1, 1), (267, 100000)])
def test_epoch_batches_fixed_shape_every_row_once(rows, batch):
    x = {"a": np.arange(rows, dtype="float32")[:, None] * np.ones((1, 2), "float32")}
    y = np.arange(rows)
    data = EpochBatches(x, y, batch, seed=(3, 4))
    assert data.num_batches == math.ceil(rows / batch)  # steps from the array trained on (RC6)
    batch = min(batch, rows)  # a batch beyond the rows is one step of all of them, unpadded
    orders = []
    for _ in range(3):
        seen, weights = [], []
        for i in range(data.num_batches):
            xb, yb, wb = data[i]
            assert xb["a"].shape == (batch, 2) and yb.shape == (batch,) and wb.shape == (batch,)
            np.testing.assert_array_equal(xb["a"][:, 0], yb)  # rows stay aligned
            seen += yb[wb == 1].tolist()
            weights += wb.tolist()
        # Every row once at weight 1; the padding (weight 0) only fills the last batch.
        assert sorted(seen) == list(range(rows))
        assert sum(weights) == rows and all(w == 1 for w in weights[:rows])
        orders.append(seen)
        data.on_epoch_end()
    if rows > 2:
        assert orders[0] != orders[1]  # a new order every epoch
    # The order depends on the seed alone (two models trained on the same rows see the same).
    first, twin = EpochBatches(x, y, batch, (3, 4)), EpochBatches(x, y, batch, (3, 4))
    assert [first[i][1].tolist() for i in range(first.num_batches)] == [
        twin[i][1].tolist() for i in range(twin.num_batches)
    ]


class BatchSizes(keras.layers.Layer):
    """Records the smallest and largest batch it ran on, in training and in inference, as
    variables updated by the step itself (so compiled steps record their real shapes too)."""

    def build(self, input_shape):
        def var(name, value):
            return self.add_weight(
                name=name, shape=(), initializer=keras.initializers.Constant(value), trainable=False
            )

        self.sizes = {
            (training, end): var(f"{'train' if training else 'infer'}_{end}", v)
            for training in (True, False)
            for end, v in (("min", 1e9), ("max", 0.0))
        }

    def call(self, x, training=False):
        size = ops.cast(ops.shape(x)[0], "float32")
        smallest, largest = self.sizes[(bool(training), "min")], self.sizes[(bool(training), "max")]
        smallest.assign(ops.minimum(smallest, size))
        largest.assign(ops.maximum(largest, size))
        return x

    def seen(self, training: bool) -> tuple[float, float]:
        return tuple(
            float(ops.convert_to_numpy(self.sizes[(training, end)])) for end in ("min", "max")
        )


def test_fixed_batches_score_every_row_once_in_one_shape():
    keras.utils.set_random_seed(0)
    inputs = keras.Input((4,), name="x")
    recorder = BatchSizes()
    hidden = keras.layers.Dense(5, activation="relu")(recorder(inputs))
    model = keras.Model({"x": inputs}, keras.layers.Dense(3, activation="softmax")(hidden))
    x = {"x": np.random.default_rng(0).normal(size=(101, 4)).astype("float32")}
    rows = FixedBatches(x, max_batch=16)
    assert rows.batch == 16 and rows.padding == 11  # 7 batches of 16, the last padded
    # Fewer rows than the batch: the power of two that holds them (few shapes across folds).
    assert (FixedBatches(x, 256).batch, FixedBatches(x, 256).padding) == (128, 27)
    assert FixedBatches({"x": x["x"][:1]}, 256).batch == 1
    proba = rows.predict(model)
    assert proba.shape == (101, 3)
    proba_again = predict_all(model, x, 16)
    # One shape over both calls: no partial batch to build (compile) a second step for.
    assert recorder.seen(training=False) == (rows.batch, rows.batch)
    one_by_one = np.concatenate(
        [model.predict({"x": x["x"][i : i + 1]}, verbose=0) for i in (0, 57, 100)]
    )
    np.testing.assert_allclose(proba_again[[0, 57, 100]], one_by_one, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(proba, proba_again, rtol=1e-6)


def test_training_steps_have_one_batch_shape(fold_data):
    """The stages' fit sees only full batches: the last partial batch is padded (RC6 still holds:
    the steps per epoch are ceil(rows / batch), checked in test_stage_results)."""
    dataset, config, plan, _ = fold_data
    data = stage_data(dataset, config, plan, None, [MODALITY])
    keras.utils.set_random_seed(0)
    name = models.image_input_name(MODALITY)
    inputs = keras.Input((config.image_size, config.image_size, 3), name=name)
    recorder = BatchSizes()
    pooled = keras.layers.GlobalAveragePooling2D()(recorder(inputs))
    model = keras.Model({name: inputs}, keras.layers.Dense(3, activation="softmax")(pooled))
    settings = FitSettings(learning_rate=1e-3, epochs=2, batch_size=config.batch_size)
    assert len(data.y_train) % settings.batch_size  # premise: a partial last batch
    result = _fit("shapes", model, data, (1.0, 1.0, 1.0), settings, quiet)
    assert recorder.seen(training=True) == (result.batch_size, result.batch_size)
    val_batch = FixedBatches(data.x_val, settings.predict_batch_size).batch
    assert recorder.seen(training=False) == (val_batch, val_batch)
    assert result.steps_per_epoch == math.ceil(len(data.y_train) / result.batch_size)
    assert int(model.optimizer.iterations) == 2 * result.steps_per_epoch


# --------------------------------------------------------------- Stage 1 on cached features


def test_stage1_head_computes_the_fusion_model(fold_data, trained):
    """The head on cached backbone features gives the fusion model's predictions, shares its
    weights, and trains exactly its trainable parameters."""
    dataset, config, plan, rf_proba = fold_data
    keras.utils.set_random_seed(5)
    fusion = build_fusion_for(config)
    models.load_encoder_into(fusion, MODALITY, trained["enc_dir"])
    models.set_backbone_trainable(fusion, [MODALITY], False)
    head = models.build_stage1_head(fusion, [MODALITY])
    fusion_ids = {id(w) for w in fusion.weights}
    assert head.weights and all(id(w) in fusion_ids for w in head.weights)
    assert [id(w) for w in head.trainable_weights] == [id(w) for w in fusion.trainable_weights]
    data = stage_data(dataset, config, plan, rf_proba)
    features = backbone_features(fusion, [MODALITY], data.x_val, 64)
    assert set(features) == {models.feature_input_name(MODALITY), models.RF_INPUT}
    np.testing.assert_allclose(
        predict_all(head, features, 64), predict_all(fusion, data.x_val, 64), rtol=1e-5, atol=1e-6
    )


@pytest.mark.parametrize("freeze", ["backbone", "encoder"])
def test_cached_stage1_trains_the_same_model_as_stage1_on_images(fold_data, trained, freeze):
    """Same weights, same seed, same batches (EpochBatches' order depends on the seed only), same
    Dropout masks (the head calls the fusion model's own Dropout layer, whose seed generator starts
    alike in both builds): two epochs on cached features leave the weights, history and
    validation kappa of two epochs on images, to float tolerance. What can differ is float
    rounding: the backbone runs in a predict step on batches of another size than in the train
    step."""
    dataset, config, plan, rf_proba = fold_data
    config = config.replace(stage1_epochs=2, stage1_freeze=freeze)
    enc = {MODALITY: trained["enc_dir"]}
    cached = run_stage1(dataset, config, plan, rf_proba, enc, log=quiet)
    images = run_stage1(
        dataset, config.replace(stage1_cached_features=False), plan, rf_proba, enc, log=quiet
    )
    assert cached.extra["stage1_inputs"] == "cached_backbone_features"
    assert images.extra["stage1_inputs"] == "images"
    # The artifact handed to Stage 2 is the whole fusion model, compiled like the other.
    assert [t.name for t in cached.model.inputs] == [t.name for t in images.model.inputs]
    assert [l.name for l in cached.model.layers] == [l.name for l in images.model.layers]
    assert (
        cached.trainable_params
        == images.trainable_params
        == models.count_trainable_params(cached.model)
    )
    assert list(cached.model.loss.alpha) == pytest.approx(plan["alpha_fusion"])
    for a, b in zip(cached.model.get_weights(), images.model.get_weights()):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    moved = max(
        float(np.abs(a - b).max())
        for a, b in zip(weights_of(head_of(cached.model)), trained["artifact_head"])
    )
    assert (moved > 1e-4) == (freeze == "backbone")  # the encoder head trained unless frozen
    assert cached.history["loss"] == pytest.approx(images.history["loss"], rel=1e-4)
    assert cached.history[KAPPA] == pytest.approx(images.history[KAPPA], abs=1e-9)
    assert cached.best_epoch == images.best_epoch
    # The fusion model saved by the Stage 1 step predicts what the head was validated with.
    data = stage_data(dataset, config, plan, rf_proba)
    kappa = quadratic_kappa(data.y_val, predict_all(cached.model, data.x_val, 64).argmax(1))
    assert kappa == pytest.approx(cached.best_val_kappa, abs=1e-9)


def test_compiled_steps_train_what_eager_steps_train(fold_data, trained):
    """jit_compile=compiled (XLA here on TensorFlow) changes how Stage 1's steps run, not what
    they compute: the same weights as eager steps to float tolerance (without Dropout, whose
    random numbers XLA may draw differently). An eager stage runs first, as in a whole suite: its
    deterministic kernels must not silently turn the compiled stage eager (Keras on TensorFlow
    refuses XLA while op determinism is on)."""
    dataset, config, plan, rf_proba = fold_data
    config = config.replace(stage1_epochs=2, dropout=0.0)
    enc = {MODALITY: trained["enc_dir"]}
    runs = {
        mode: run_stage1(dataset, config.replace(jit_compile=mode), plan, rf_proba, enc, log=quiet)
        for mode in ("eager", "compiled")
    }
    assert runs["compiled"].extra["jit_compile"] is True
    assert runs["eager"].extra["jit_compile"] is False
    for a, b in zip(runs["compiled"].model.get_weights(), runs["eager"].model.get_weights()):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    assert runs["compiled"].history[KAPPA] == pytest.approx(runs["eager"].history[KAPPA], abs=1e-9)
