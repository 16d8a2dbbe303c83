"""Keras models: fusion model, tracked backbones, learnable fusion weight, encoder artifacts,
application backbones, parameter counting and Stage 2 unfreezing."""

import math
import re
from pathlib import Path

import keras
import numpy as np
import pytest
from keras import layers, ops

from dfu_ml.errors import ConfigError
from dfu_ml.training import models
from dfu_ml.training.models import (
    FUSION_LAYER,
    IMAGE_CLASSIFIER,
    OUTPUT_LAYER,
    RF_INPUT,
    EncoderSpec,
    FusionSpec,
    LearnableFusionWeight,
    backbone_name,
    build_backbone,
    build_fusion_model,
    build_image_encoder,
    build_image_model,
    count_trainable_params,
    encoder_name,
    image_input_name,
    load_encoder_into,
    save_encoder,
    set_backbone_trainable,
    unfreeze_top_of_backbones,
)

SIZE = 32
ALL_IMAGE = ["depth_rgb", "depth_map", "thermal_rgb", "thermal_map"]


def all_layers(model):
    """Every layer, recursively through nested models."""
    for layer in model.layers:
        yield layer
        if isinstance(layer, keras.Model):
            yield from all_layers(layer)


def images(n, seed=0):
    return np.random.default_rng(seed).uniform(0, 255, (n, SIZE, SIZE, 3)).astype("float32")


def inputs_for(modalities, n, metadata=True, seed=0):
    x = {image_input_name(m): images(n, seed + i) for i, m in enumerate(modalities)}
    if metadata:
        x[RF_INPUT] = np.random.default_rng(seed).dirichlet([1, 1, 1], n).astype("float32")
    return x


def tiny_fusion(modalities, metadata=True, backbone="small_cnn", weights="none", **fusion_args):
    """A fusion model of 8-d encoders at SIZE px."""
    encoder = EncoderSpec(SIZE, backbone, weights, feature_dim=8)
    return build_fusion_model(FusionSpec(tuple(modalities), encoder, metadata, **fusion_args))


def weights_equal(a, b):
    return len(a) == len(b) and all(np.array_equal(x, y) for x, y in zip(a, b))


@pytest.mark.parametrize("modalities", [["depth_rgb"], ALL_IMAGE])
@pytest.mark.parametrize("metadata", [True, False])
def test_build_fusion_model(modalities, metadata):
    keras.utils.set_random_seed(0)
    model = tiny_fusion(modalities, metadata)
    names = {t.name for t in model.inputs}
    assert {image_input_name(m) for m in modalities} <= names
    assert (RF_INPUT in names) == metadata
    assert len(model.inputs) == len(modalities) + int(metadata)
    out = np.asarray(model.predict(inputs_for(modalities, 5, metadata), verbose=0))
    assert out.shape == (5, 3)
    np.testing.assert_allclose(out.sum(axis=1), 1.0, atol=1e-5)
    assert model.get_layer(OUTPUT_LAYER if not metadata else FUSION_LAYER)
    if metadata:
        assert isinstance(model.get_layer(FUSION_LAYER), LearnableFusionWeight)
    else:
        with pytest.raises(ValueError):
            model.get_layer(FUSION_LAYER)
    # One encoder per modality, each with its own tracked backbone sub-model.
    for m in modalities:
        encoder = model.get_layer(encoder_name(m))
        backbone = encoder.get_layer(backbone_name(m))
        assert isinstance(encoder, keras.Model) and isinstance(backbone, keras.Model)
        model_ids = {id(w) for w in model.weights}
        assert backbone.weights and all(id(w) in model_ids for w in backbone.weights)
        assert all(
            id(w) in {id(t) for t in model.trainable_weights} for w in backbone.trainable_weights
        )
    assert not [l for l in all_layers(model) if isinstance(l, layers.Lambda)]


def test_fusion_model_needs_an_image_modality():
    with pytest.raises(ValueError, match="image modality"):
        tiny_fusion([])


def test_backbone_trains_inside_the_fusion_model():
    """A gradient step moves the backbone's weights (a Lambda-wrapped backbone would not)."""
    keras.utils.set_random_seed(0)
    model = tiny_fusion(["depth_rgb"])
    backbone = model.get_layer(encoder_name("depth_rgb")).get_layer(backbone_name("depth_rgb"))
    before = [np.array(w) for w in backbone.get_weights()]
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss="categorical_crossentropy")
    x = inputs_for(["depth_rgb"], 8)
    model.fit(x, np.eye(3, dtype="float32")[np.arange(8) % 3], epochs=1, batch_size=8, verbose=0)
    assert not weights_equal(before, backbone.get_weights())


# ------------------------------------------------------------------------- learnable fusion


def test_learnable_fusion_weight_numerics_and_training():
    layer = LearnableFusionWeight(0.7, learnable=True)
    rng = np.random.default_rng(0)
    p_rf = rng.dirichlet([1, 1, 1], 6).astype("float32")
    p_img = rng.dirichlet([1, 1, 1], 6).astype("float32")
    out = ops.convert_to_numpy(layer([p_rf, p_img]))
    assert layer.rf_weight() == pytest.approx(0.70, abs=1e-6)
    np.testing.assert_allclose(out, 0.7 * p_rf + 0.3 * p_img, rtol=1e-5, atol=1e-6)
    assert len(layer.trainable_weights) == 1 and layer.trainable_weights[0] is layer.logit
    # Another weight: output follows w = sigmoid(z).
    layer.logit.assign(0.0)
    out = ops.convert_to_numpy(layer([p_rf, p_img]))
    np.testing.assert_allclose(out, 0.5 * p_rf + 0.5 * p_img, rtol=1e-5, atol=1e-6)
    fixed = LearnableFusionWeight(0.7, learnable=False)
    fixed([p_rf, p_img])
    assert not fixed.trainable_weights and len(fixed.non_trainable_weights) == 1


def test_fusion_weight_moves_in_training_only_when_learnable():
    rng = np.random.default_rng(0)
    x = inputs_for(["depth_rgb"], 16)
    y = np.eye(3, dtype="float32")[rng.integers(0, 3, 16)]
    moved = {}
    for learnable in (True, False):
        keras.utils.set_random_seed(0)
        model = tiny_fusion(["depth_rgb"], learnable_fusion=learnable)
        model.compile(optimizer=keras.optimizers.Adam(0.05), loss="categorical_crossentropy")
        model.fit(x, y, epochs=2, batch_size=8, verbose=0)
        moved[learnable] = abs(model.get_layer(FUSION_LAYER).rf_weight() - 0.7)
    assert moved[True] > 1e-3
    assert moved[False] < 1e-6  # float32 rounding of sigmoid(logit(0.7)) only


def test_fusion_model_round_trips_through_keras_file(tmp_path):
    keras.utils.set_random_seed(0)
    model = tiny_fusion(["depth_rgb", "thermal_map"], rf_weight=0.7)
    model.get_layer(FUSION_LAYER).logit.assign(0.3)  # a learned value, not the initial one
    path = tmp_path / "fusion.keras"
    model.save(path)
    loaded = keras.saving.load_model(path, compile=False)
    layer = loaded.get_layer(FUSION_LAYER)
    assert isinstance(layer, LearnableFusionWeight)
    assert layer.learnable and layer.initial_rf_weight == pytest.approx(0.7)
    assert layer.rf_weight() == pytest.approx(1 / (1 + math.exp(-0.3)), rel=1e-6)
    x = inputs_for(["depth_rgb", "thermal_map"], 4)
    np.testing.assert_allclose(
        loaded.predict(x, verbose=0), model.predict(x, verbose=0), rtol=1e-5, atol=1e-6
    )


# ---------------------------------------------------------------------------- backbones


APPLICATION_MODULES = {
    "EfficientNetB0": ("efficientnet", "EfficientNetB0"),
    "DenseNet121": ("densenet", "DenseNet121"),
    "MobileNetV3Small": ("mobilenet_v3", "MobileNetV3Small"),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(APPLICATION_MODULES))
def test_application_backbone_builds_offline_and_takes_raw_pixels(name):
    """weights='none' builds without a download at 32 px; the backbone takes raw [0, 255] pixels
    and preprocesses them itself, exactly as the application's preprocess_input would."""
    keras.utils.set_random_seed(0)
    backbone = build_backbone(EncoderSpec(SIZE, name), "depth_rgb_backbone")
    assert isinstance(backbone, keras.Model) and backbone.name == "depth_rgb_backbone"
    assert not [l for l in all_layers(backbone) if isinstance(l, layers.Lambda)]
    module_name, factory_name = APPLICATION_MODULES[name]
    module = getattr(keras.applications, module_name)
    reference = getattr(keras.applications, factory_name)(
        include_top=False, pooling="avg", input_shape=(SIZE, SIZE, 3), weights=None
    )
    reference.set_weights(backbone.get_weights())
    x = images(2)
    ours = np.asarray(backbone.predict(x, verbose=0))
    theirs = np.asarray(reference.predict(module.preprocess_input(x.copy()), verbose=0))
    assert ours.shape == (2, reference.output_shape[-1])
    np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("backbone", ["small_cnn", "MobileNetV3Small"])
def test_backbone_weights_from_a_local_file(tmp_path, backbone):
    keras.utils.set_random_seed(1)
    source = build_backbone(EncoderSpec(SIZE, backbone), "source")
    path = tmp_path / "backbone.weights.h5"
    source.save_weights(path)
    keras.utils.set_random_seed(2)  # a different initialisation...
    fresh = build_backbone(EncoderSpec(SIZE, backbone), "depth_rgb_backbone")
    assert not weights_equal(source.get_weights(), fresh.get_weights())
    loaded = build_backbone(EncoderSpec(SIZE, backbone, str(path)), "depth_rgb_backbone")
    assert weights_equal(source.get_weights(), loaded.get_weights())  # ...replaced by the file
    # And through the encoder / fusion model that pass the path down.
    encoder = build_image_encoder(
        "depth_rgb", EncoderSpec(SIZE, backbone, str(path), feature_dim=8)
    )
    assert weights_equal(
        source.get_weights(), encoder.get_layer(backbone_name("depth_rgb")).get_weights()
    )


def test_backbone_weights_file_missing():
    with pytest.raises(ConfigError, match="backbone_weights file not found: /nonexistent/w"):
        build_backbone(EncoderSpec(SIZE, "small_cnn", "/nonexistent/w.weights.h5"), "b")


@pytest.mark.parametrize("suffix", [".weights.h5", ".h5"])
def test_backbone_weights_of_another_model_fail_loudly(tmp_path, suffix):
    """A file of another backbone is an error naming the file and the expected backbone (it was
    loaded with skip_mismatch=True, which left every mismatching layer random without a word)."""
    keras.utils.set_random_seed(1)
    other = build_backbone(EncoderSpec(SIZE, "small_cnn"), "other")
    path = tmp_path / f"small_cnn{suffix}"
    save_weights(other, path)
    with pytest.raises(ConfigError, match=rf"{path}.*MobileNetV3Small"):
        build_backbone(EncoderSpec(SIZE, "MobileNetV3Small", str(path)), "depth_rgb_backbone")


def save_weights(model, path):
    """``model``'s weights in Keras's ``.weights.h5`` format or, for another ``.h5`` name, in the
    legacy layout of Keras's ImageNet files (per layer, trainable then non-trainable weights, in
    layer order), which ``load_weights`` reads by layer order."""
    import h5py

    path = Path(path)
    if path.name.endswith(".weights.h5"):
        model.save_weights(path)
        return
    with h5py.File(path, "w") as f:
        f.attrs["layer_names"] = [layer.name.encode() for layer in model.layers]
        for layer in model.layers:
            group = f.create_group(layer.name)
            weights = layer.trainable_weights + layer.non_trainable_weights
            names = [f"{layer.name}/{w.name}_{i}".encode() for i, w in enumerate(weights)]
            group.attrs["weight_names"] = names
            for name, w in zip(names, weights):
                group.create_dataset(name.decode(), data=ops.convert_to_numpy(w))


def test_imagenet_weights_come_from_keras_home(tmp_path, monkeypatch):
    """``backbone_weights: imagenet`` loads Keras's file of that name under $KERAS_HOME/models
    (where docker/build.sh bakes the real ones into the GPU image); here a file saved from a
    ``weights=None`` backbone stands in for it."""
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras"))
    expected = tmp_path / "keras" / "models" / models.IMAGENET_FILES["MobileNetV3Small"]
    with pytest.raises(ConfigError, match=re.escape(str(expected))):
        build_backbone(EncoderSpec(SIZE, "MobileNetV3Small", "imagenet"), "depth_rgb_backbone")
    keras.utils.set_random_seed(1)
    source = build_backbone(EncoderSpec(SIZE, "MobileNetV3Small"), "source")
    expected.parent.mkdir(parents=True)
    save_weights(source, expected)
    keras.utils.set_random_seed(2)
    loaded = build_backbone(EncoderSpec(SIZE, "MobileNetV3Small", "imagenet"), "depth_rgb_backbone")
    assert weights_equal(source.get_weights(), loaded.get_weights())
    with pytest.raises(ConfigError, match="no ImageNet weights for backbone 'small_cnn'"):
        build_backbone(EncoderSpec(SIZE, "small_cnn", "imagenet"), "b")


@pytest.mark.slow
@pytest.mark.parametrize("backbone", sorted(models.IMAGENET_FILES))
def test_imagenet_file_names_are_the_ones_keras_asks_for(backbone, monkeypatch):
    """The table of file names is Keras's own: the application asks get_file for exactly it."""
    from keras.src.utils import file_utils

    asked = []

    def no_download(fname, *args, **kwargs):
        asked.append(fname)
        raise RuntimeError("no download in tests")

    monkeypatch.setattr(file_utils, "get_file", no_download)
    module, name = models.APPLICATIONS[backbone].rpartition(".")[::2]
    factory = getattr(getattr(keras.applications, module) if module else keras.applications, name)
    with pytest.raises(RuntimeError, match="no download"):
        factory(include_top=False, pooling="avg", input_shape=(SIZE, SIZE, 3), weights="imagenet")
    assert asked == [models.IMAGENET_FILES[backbone]]


def test_probability_layers_stay_float32_under_mixed_precision():
    keras.utils.set_random_seed(0)
    with models.precision("mixed_bfloat16"):
        fusion = tiny_fusion(["depth_rgb", "thermal_map"])
        image_model = build_image_model(
            build_image_encoder("depth_rgb", EncoderSpec(SIZE, feature_dim=8)), "depth_rgb"
        )
    assert keras.config.dtype_policy().name == "float32"  # restored
    for layer in (fusion.get_layer(IMAGE_CLASSIFIER), fusion.get_layer(FUSION_LAYER)):
        assert layer.compute_dtype == "float32"
    assert image_model.get_layer(OUTPUT_LAYER).compute_dtype == "float32"
    assert fusion.get_layer("image_projection").compute_dtype == "bfloat16"
    backbone = fusion.get_layer(encoder_name("depth_rgb")).get_layer(backbone_name("depth_rgb"))
    assert {l.compute_dtype for l in backbone.layers if l.weights} == {"bfloat16"}
    assert all(w.dtype == "float32" for w in fusion.weights)  # variables stay float32
    out = np.asarray(fusion.predict(inputs_for(["depth_rgb", "thermal_map"], 4), verbose=0))
    assert out.dtype == np.float32
    np.testing.assert_allclose(out.sum(axis=1), 1.0, atol=1e-5)


# ------------------------------------------------------------------------ encoder artifact


def test_encoder_artifact_excludes_output_and_loads_into_fusion(tmp_path):
    keras.utils.set_random_seed(3)
    encoder = build_image_encoder("thermal_map", EncoderSpec(SIZE, feature_dim=8))
    image_model = build_image_model(encoder, "thermal_map")
    assert image_model.get_layer(OUTPUT_LAYER)
    save_encoder(
        image_model.get_layer(encoder_name("thermal_map")),
        tmp_path / "enc",
        {"modality": "thermal_map"},
    )
    saved = keras.saving.load_model(tmp_path / "enc" / models.ENCODER_FILE, compile=False)
    assert OUTPUT_LAYER not in {l.name for l in all_layers(saved)}
    assert saved.output_shape[-1] == 8  # features, not class probabilities

    keras.utils.set_random_seed(4)
    fusion = tiny_fusion(["depth_rgb", "thermal_map"])
    target = fusion.get_layer(encoder_name("thermal_map"))
    other = fusion.get_layer(encoder_name("depth_rgb"))
    other_before = [np.array(w) for w in other.get_weights()]
    classifier_before = [np.array(w) for w in fusion.get_layer(IMAGE_CLASSIFIER).get_weights()]
    assert not weights_equal(encoder.get_weights(), target.get_weights())
    load_encoder_into(fusion, "thermal_map", tmp_path / "enc")
    assert weights_equal(encoder.get_weights(), target.get_weights())
    assert weights_equal(other_before, other.get_weights())  # other modality untouched
    assert weights_equal(classifier_before, fusion.get_layer(IMAGE_CLASSIFIER).get_weights())
    with pytest.raises(ValueError, match="thermal_map"):
        load_encoder_into(fusion, "depth_rgb", tmp_path / "enc")


# -------------------------------------------------------------------- params and freezing


def trainable_size(model):
    return int(sum(np.prod(ops.convert_to_numpy(w).shape) for w in model.trainable_weights))


def test_count_trainable_params_and_backbone_freezing():
    keras.utils.set_random_seed(0)
    model = tiny_fusion(["depth_rgb", "thermal_map"])
    total = count_trainable_params(model)
    assert total == trainable_size(model) > 0
    backbone_params = sum(
        trainable_size(model.get_layer(encoder_name(m)).get_layer(backbone_name(m)))
        for m in ("depth_rgb", "thermal_map")
    )
    set_backbone_trainable(model, ["depth_rgb", "thermal_map"], False)
    assert count_trainable_params(model) == trainable_size(model) == total - backbone_params
    models.freeze_encoders(model, ["depth_rgb", "thermal_map"])
    # Only the projection of the two 8-d feature vectors (16*8+8), the image classifier (8*3+3)
    # and the fusion logit remain trainable.
    assert count_trainable_params(model) == 16 * 8 + 8 + 8 * 3 + 3 + 1


@pytest.mark.parametrize(
    "backbone, fraction",
    [("small_cnn", 0.2), ("small_cnn", 0.5), ("small_cnn", 1.0), ("MobileNetV3Small", 0.2)],
)
def test_unfreeze_top_of_backbones(backbone, fraction):
    keras.utils.set_random_seed(0)
    model = tiny_fusion(["depth_rgb"], backbone=backbone)
    set_backbone_trainable(model, ["depth_rgb"], False)
    frozen = count_trainable_params(model)
    unfreeze_top_of_backbones(model, ["depth_rgb"], fraction)
    bb = model.get_layer(encoder_name("depth_rgb")).get_layer(backbone_name("depth_rgb"))
    weighted = [l for l in bb.layers if l.weights]
    bn = [l for l in weighted if isinstance(l, layers.BatchNormalization)]
    other = [l for l in weighted if not isinstance(l, layers.BatchNormalization)]
    assert bn and not any(l.trainable for l in bn)
    assert not any(w.trainable for l in bn for w in l.weights)
    flags = [l.trainable for l in other]
    n_open = sum(flags)
    # A contiguous top block is unfrozen: at least one layer, about the fraction of them.
    assert n_open >= 1
    assert flags == [False] * (len(other) - n_open) + [True] * n_open
    assert n_open <= max(1, math.ceil(fraction * len(other)))
    if fraction == 1.0:
        assert n_open == len(other)
    assert count_trainable_params(model) > frozen


def test_unfreeze_fraction_zero_keeps_backbone_frozen():
    keras.utils.set_random_seed(0)
    model = tiny_fusion(["depth_rgb"])
    set_backbone_trainable(model, ["depth_rgb"], False)
    frozen = count_trainable_params(model)
    unfreeze_top_of_backbones(model, ["depth_rgb"], 0.0)
    assert count_trainable_params(model) == frozen
