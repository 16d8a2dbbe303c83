"""Keras 3 models: image encoders, the standalone image model and the fusion model.

Only ``keras`` and ``keras.ops`` are used, so the same code runs with KERAS_BACKEND=tensorflow,
torch or jax. The backbone is a tracked sub-model (never hidden in a Lambda, where it would not
train, save or transfer) and receives raw [0, 255] pixels: the application backbones rescale
themselves, and the small CNN rescales in its first layer.
"""

from __future__ import annotations

import contextlib
import math
import os
from dataclasses import dataclass
from pathlib import Path

import keras
from keras import layers, ops

from dfu_ml.data.schema import NUM_CLASSES
from dfu_ml.errors import ConfigError

OUTPUT_LAYER = "output"
RF_INPUT = "rf_probs"
IMAGE_CLASSIFIER = "image_classifier"
FUSION_LAYER = "fusion"
ENCODER_FILE = "encoder.keras"
ENCODER_CONFIG = "encoder.json"

APPLICATIONS = {
    "EfficientNetB0": "efficientnet.EfficientNetB0",
    "EfficientNetB1": "efficientnet.EfficientNetB1",
    "EfficientNetB2": "efficientnet.EfficientNetB2",
    "EfficientNetB3": "efficientnet.EfficientNetB3",
    "DenseNet121": "densenet.DenseNet121",
    "MobileNetV3Small": "MobileNetV3Small",
}
# Keras's own file names for the ImageNet weights without the top (include_top=False) of each
# application backbone: keras.applications stores them under $KERAS_HOME/models, and
# docker/build.sh bakes them there into the GPU image (tests/test_models.py checks each name
# against the Keras source, so a Keras upgrade that renames one fails a test, not a cluster run).
IMAGENET_FILES = {
    "EfficientNetB0": "efficientnetb0_notop.h5",
    "EfficientNetB1": "efficientnetb1_notop.h5",
    "EfficientNetB2": "efficientnetb2_notop.h5",
    "EfficientNetB3": "efficientnetb3_notop.h5",
    "DenseNet121": "densenet121_weights_tf_dim_ordering_tf_kernels_notop.h5",
    "MobileNetV3Small": "weights_mobilenet_v3_small_224_1.0_float_no_top_v2.h5",
}
# Layers whose output is a class probability: always float32 under a mixed-precision policy
# (a bfloat16 softmax and fusion would round the probabilities the loss and kappa read).
FLOAT32 = "float32"


@dataclass(frozen=True)
class EncoderSpec:
    """How an image encoder is built: backbone, crop size, initial weights and head.

    The fields are the training configuration's keys of the same meaning (``image_size``,
    ``backbone``, ``backbone_weights``, ``feature_dim``, ``dropout``).
    """

    image_size: int
    backbone: str = "small_cnn"
    weights: str = "none"  # none | imagenet | path to a local weights file
    feature_dim: int = 64
    dropout: float = 0.3

    @classmethod
    def from_config(cls, config) -> EncoderSpec:
        return cls(
            image_size=config.image_size,
            backbone=config.backbone,
            weights=config.backbone_weights,
            feature_dim=config.feature_dim,
            dropout=config.dropout,
        )


@dataclass(frozen=True)
class FusionSpec:
    """How the fusion model is built: its image modalities, their encoders and the fusion."""

    modalities: tuple[str, ...]
    encoder: EncoderSpec
    use_metadata: bool = True
    rf_weight: float = 0.7  # initial w_rf of the learnable fusion (RC5)
    learnable_fusion: bool = True

    @classmethod
    def from_config(cls, config) -> FusionSpec:
        return cls(
            modalities=tuple(config.image_modalities),
            encoder=EncoderSpec.from_config(config),
            use_metadata=config.uses_metadata,
            rf_weight=config.fusion_rf_weight,
            learnable_fusion=config.fusion_learnable,
        )


def image_input_name(modality: str) -> str:
    return f"{modality}_image"


def encoder_name(modality: str) -> str:
    return f"{modality}_encoder"


def backbone_name(modality: str) -> str:
    return f"{modality}_backbone"


@contextlib.contextmanager
def precision(policy: str):
    """Build models under a Keras dtype policy (``none`` = float32), restoring the global one.

    Layers take the policy when they are built, so only models built inside are mixed; the
    probability layers stay float32 (:data:`FLOAT32`). A saved model keeps its layers' policies.
    """
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy("float32" if policy in ("none", "", None) else policy)
    try:
        yield
    finally:
        keras.config.set_dtype_policy(previous)


def keras_models_dir() -> Path:
    """Where Keras keeps downloaded weights: ``$KERAS_HOME/models`` (default ``~/.keras``)."""
    home = os.environ.get("KERAS_HOME") or os.path.join(os.path.expanduser("~"), ".keras")
    return Path(home) / "models"


def imagenet_weights_file(backbone: str) -> Path:
    """The ImageNet weights file ``backbone_weights: imagenet`` loads; a ConfigError naming the
    expected file when it is absent (nothing is downloaded at run time)."""
    if backbone not in IMAGENET_FILES:
        raise ConfigError(
            f"backbone_weights=imagenet: there are no ImageNet weights for backbone {backbone!r}; "
            f"use one of {', '.join(IMAGENET_FILES)} or backbone_weights=none"
        )
    path = keras_models_dir() / IMAGENET_FILES[backbone]
    if not path.is_file():
        raise ConfigError(
            f"backbone_weights=imagenet: the {backbone} ImageNet weights file {path} is missing. "
            "Build the GPU image with them (docker/build.sh bakes them by default), copy Keras's "
            f"{IMAGENET_FILES[backbone]} there, set KERAS_HOME to the folder above models/, or "
            "use backbone_weights=none"
        )
    return path


def _load_backbone_weights(model: keras.Model, path: Path, backbone: str) -> None:
    """Load a weights file into a backbone, failing loudly when the file is of another model:
    ``skip_mismatch=True`` silently left every mismatching layer at its random initialisation."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"backbone_weights file not found: {path}")
    try:
        model.load_weights(path)
    except (ValueError, KeyError, OSError) as exc:
        raise ConfigError(
            f"backbone_weights file {path} does not hold the weights of a {backbone} backbone at "
            f"this image size ({exc.__class__.__name__}: {str(exc).splitlines()[0][:200]}); "
            "give a file saved from the same backbone"
        ) from None


def _small_cnn(image_size: int, name: str) -> keras.Model:
    """A CPU-sized CNN (about 25k parameters at width 16) for smoke runs and tests."""
    inputs = keras.Input((image_size, image_size, 3), name=f"{name}_input")
    x = layers.Rescaling(1.0 / 255.0)(inputs)
    for i, width in enumerate((16, 32, 64)):
        x = layers.Conv2D(width, 3, padding="same", use_bias=False, name=f"conv{i}")(x)
        # A faster-moving average than the default 0.99: smoke runs have few steps, and lagging
        # statistics make early validation epochs look like a collapse.
        x = layers.BatchNormalization(momentum=0.9, name=f"bn{i}")(x)
        x = layers.Activation("relu")(x)
        x = layers.MaxPooling2D()(x)
    x = layers.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, x, name=name)


def build_backbone(spec: EncoderSpec, name: str) -> keras.Model:
    """A backbone sub-model that maps raw [0, 255] images to a pooled feature vector.

    ``spec.weights`` is ``none``, ``imagenet`` (Keras's weights file under ``$KERAS_HOME/models``,
    see :func:`imagenet_weights_file`: nothing is downloaded on our clusters) or a path to a local
    ``.h5``/``.weights.h5`` file. Either file must be of this backbone, or a ConfigError says so.
    """
    backbone, image_size, weights = spec.backbone, spec.image_size, spec.weights
    weights_file = None
    if weights == "imagenet":
        weights_file = imagenet_weights_file(backbone)
    elif weights not in ("none", "", None):
        weights_file = Path(weights)
    if backbone == "small_cnn":
        model = _small_cnn(image_size, name)
    else:
        path = APPLICATIONS[backbone].split(".")
        factory = keras.applications
        for part in path:
            factory = getattr(factory, part)
        kwargs = {
            "include_top": False,
            "pooling": "avg",
            "input_shape": (image_size, image_size, 3),
            # Loaded below, from the file Keras would have downloaded: the same load_weights call
            # keras.applications makes, without its download.
            "weights": None,
        }
        if backbone == "MobileNetV3Small":
            kwargs["include_preprocessing"] = True
        if backbone.startswith("DenseNet"):
            # DenseNet has no built-in preprocessing (EfficientNet and MobileNetV3 do): add its
            # ImageNet "torch" preprocessing (x / 255, then per-channel mean/std) in front.
            raw = keras.Input((image_size, image_size, 3), name=f"{name}_input")
            x = layers.Rescaling(1.0 / 255.0, name="rescale_255")(raw)
            kwargs["input_tensor"] = layers.Normalization(
                mean=[0.485, 0.456, 0.406],
                variance=[0.229**2, 0.224**2, 0.225**2],
                name="imagenet_normalization",
            )(x)
        model = factory(**kwargs)
        model.name = name
    if weights_file is not None:
        _load_backbone_weights(model, weights_file, backbone)
    return model


# Building the layers above the backbones is written once, for two callers: the fusion model
# (``new``: make each layer) and the Stage 1 head on cached backbone features (``shared(model)``:
# take the fusion model's layer of that name, so that both models train the same weights).
def new(name: str, make):
    return make()


def shared(model: keras.Model):
    return lambda name, make: model.get_layer(name)


def _encoder_head(x, modality: str, spec: EncoderSpec | None, layer=new):
    """Backbone features -> the encoder's Dense features and Dropout."""
    x = layer(
        f"{modality}_features",
        lambda: layers.Dense(spec.feature_dim, activation="relu", name=f"{modality}_features"),
    )(x)
    return layer(
        f"{modality}_dropout", lambda: layers.Dropout(spec.dropout, name=f"{modality}_dropout")
    )(x)


def _fusion_top(features: list, rf_input, spec: FusionSpec | None, layer=new):
    """Encoder features -> (concatenation and projection) -> image classifier -> fusion."""
    if len(features) > 1:
        x = layer("image_features", lambda: layers.Concatenate(name="image_features"))(features)
        x = layer(
            "image_projection",
            lambda: layers.Dense(
                spec.encoder.feature_dim, activation="relu", name="image_projection"
            ),
        )(x)
    else:
        x = features[0]
    image_probs = layer(
        IMAGE_CLASSIFIER,
        lambda: layers.Dense(
            NUM_CLASSES, activation="softmax", name=IMAGE_CLASSIFIER, dtype=FLOAT32
        ),
    )(x)
    if rf_input is None:
        return layer(
            OUTPUT_LAYER, lambda: layers.Activation("linear", name=OUTPUT_LAYER, dtype=FLOAT32)
        )(image_probs)
    fusion = layer(
        FUSION_LAYER,
        lambda: LearnableFusionWeight(
            spec.rf_weight, spec.learnable_fusion, name=FUSION_LAYER, dtype=FLOAT32
        ),
    )
    return fusion([rf_input, image_probs])


def build_image_encoder(modality: str, spec: EncoderSpec) -> keras.Model:
    """Image encoder for one modality: backbone sub-model + a head to a feature vector."""
    size = spec.image_size
    inputs = keras.Input((size, size, 3), name=image_input_name(modality))
    features = build_backbone(spec, backbone_name(modality))(inputs)
    return keras.Model(inputs, _encoder_head(features, modality, spec), name=encoder_name(modality))


def build_image_model(encoder: keras.Model, modality: str) -> keras.Model:
    """Standalone image model for pre-training: encoder + Dense(3, softmax, name="output")."""
    name = image_input_name(modality)
    inputs = keras.Input(tuple(encoder.inputs[0].shape[1:]), name=name)
    outputs = layers.Dense(NUM_CLASSES, activation="softmax", name=OUTPUT_LAYER, dtype=FLOAT32)(
        encoder(inputs)
    )
    return keras.Model({name: inputs}, outputs, name=f"{encoder.name}_pretrain")


@keras.saving.register_keras_serializable(package="dfu_kfp")
class LearnableFusionWeight(layers.Layer):
    """output = w_rf * p_rf + (1 - w_rf) * p_img, with w_rf = sigmoid(z) and z trainable (RC5).

    A fixed 0.70/0.30 split scaled the image branch's gradient by 0.3; learning z lets the data
    decide. ``learnable=False`` reproduces the fixed split (for the pre-fix comparison).
    """

    def __init__(self, initial_rf_weight: float = 0.7, learnable: bool = True, **kwargs):
        super().__init__(**kwargs)
        self.initial_rf_weight = float(initial_rf_weight)
        self.learnable = bool(learnable)

    def build(self, input_shape):
        logit = math.log(self.initial_rf_weight / (1.0 - self.initial_rf_weight))
        self.logit = self.add_weight(
            name="rf_logit",
            shape=(),
            initializer=keras.initializers.Constant(logit),
            trainable=self.learnable,
        )

    def call(self, inputs):
        p_rf, p_img = inputs
        w_rf = ops.sigmoid(self.logit)
        return w_rf * ops.cast(p_rf, p_img.dtype) + (1.0 - w_rf) * p_img

    def rf_weight(self) -> float:
        return float(ops.convert_to_numpy(ops.sigmoid(self.logit)))

    def get_config(self):
        return {
            **super().get_config(),
            "initial_rf_weight": self.initial_rf_weight,
            "learnable": self.learnable,
        }


def build_fusion_model(spec: FusionSpec) -> keras.Model:
    """Fusion of RF probabilities with 1..4 image modalities (or image-only without metadata).

    Image features (concatenated and projected when several) -> ``image_classifier`` Dense(3)
    -> :class:`LearnableFusionWeight` with the RF probabilities.
    """
    modalities, size = spec.modalities, spec.encoder.image_size
    if not modalities:
        raise ValueError(
            "the fusion model needs at least one image modality; a metadata-only "
            "run uses the random forest's probabilities directly"
        )
    inputs, features = {}, []
    for modality in modalities:
        name = image_input_name(modality)
        inputs[name] = keras.Input((size, size, 3), name=name)
        features.append(build_image_encoder(modality, spec.encoder)(inputs[name]))
    if spec.use_metadata:
        inputs[RF_INPUT] = keras.Input((NUM_CLASSES,), name=RF_INPUT)
    outputs = _fusion_top(features, inputs.get(RF_INPUT), spec)
    return keras.Model(inputs, outputs, name="dfu_fusion")


def feature_input_name(modality: str) -> str:
    return f"{modality}_backbone_features"


def backbone_of(model: keras.Model, modality: str) -> keras.Model:
    return model.get_layer(encoder_name(modality)).get_layer(backbone_name(modality))


def build_stage1_head(fusion: keras.Model, modalities) -> keras.Model:
    """The fusion model above its backbones, on cached backbone features.

    Its inputs are each modality's backbone output (``{modality}_backbone_features``) and the RF
    probabilities; every layer is the fusion model's own (:func:`shared`), so training the head
    trains the fusion model's weights, and the fusion model with its backbones is the Stage 1
    model. Valid while the backbones are frozen: their output is then fixed for the stage.
    """
    inputs, features = {}, []
    for modality in modalities:
        name = feature_input_name(modality)
        inputs[name] = keras.Input((backbone_of(fusion, modality).output.shape[-1],), name=name)
        encoder = fusion.get_layer(encoder_name(modality))
        features.append(_encoder_head(inputs[name], modality, None, shared(encoder)))
    if has_fusion_layer(fusion):
        inputs[RF_INPUT] = keras.Input((NUM_CLASSES,), name=RF_INPUT)
    outputs = _fusion_top(features, inputs.get(RF_INPUT), None, shared(fusion))
    return keras.Model(inputs, outputs, name="dfu_fusion_stage1_head")


def has_fusion_layer(model: keras.Model) -> bool:
    """Whether the model fuses RF probabilities (it has a metadata input)."""
    return any(layer.name == FUSION_LAYER for layer in model.layers)


def count_trainable_params(model: keras.Model) -> int:
    return int(sum(math.prod(w.shape) for w in model.trainable_weights))


def set_backbone_trainable(model: keras.Model, modalities: list[str], trainable: bool) -> None:
    for modality in modalities:
        model.get_layer(encoder_name(modality)).get_layer(
            backbone_name(modality)
        ).trainable = trainable


def freeze_encoders(model: keras.Model, modalities: list[str]) -> None:
    for modality in modalities:
        model.get_layer(encoder_name(modality)).trainable = False


def unfreeze_top_of_backbones(model: keras.Model, modalities: list[str], fraction: float) -> None:
    """Unfreeze the top ``fraction`` of each backbone's layers, keeping BatchNorm frozen.

    BatchNorm statistics learned on large batches are destroyed by small fine-tuning batches, the
    reason the keras-io fine-tuning recipe keeps them frozen.
    """
    for modality in modalities:
        encoder = model.get_layer(encoder_name(modality))
        encoder.trainable = True
        backbone = encoder.get_layer(backbone_name(modality))
        backbone.trainable = True
        weighted = [layer for layer in backbone.layers if layer.weights]
        # The fraction counts the layers that can be unfrozen: counted over BatchNorm layers too,
        # the top "layer" of every backbone here is a BatchNorm and a small fraction unfroze nothing.
        tunable = [layer for layer in weighted if not isinstance(layer, layers.BatchNormalization)]
        first_unfrozen = (
            len(tunable) - max(1, round(fraction * len(tunable))) if fraction else len(tunable)
        )
        for layer in weighted:
            if isinstance(layer, layers.BatchNormalization):
                layer.trainable = False
        for i, layer in enumerate(tunable):
            layer.trainable = i >= first_unfrozen


def save_encoder(encoder: keras.Model, directory: Path, description: dict) -> None:
    """Encoder artifact: every weight but the ``output`` layer's, plus what built it."""
    import json

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    encoder.save(directory / ENCODER_FILE)
    (directory / ENCODER_CONFIG).write_text(json.dumps(description, indent=2))


def load_encoder_into(model: keras.Model, modality: str, directory: Path) -> None:
    """Load an encoder artifact into the fusion model's encoder of the same name."""
    import json

    directory = Path(directory)
    description = json.loads((directory / ENCODER_CONFIG).read_text())
    if description.get("modality") != modality:
        raise ValueError(
            f"{directory} holds the {description.get('modality')} encoder, not {modality}"
        )
    loaded = keras.saving.load_model(directory / ENCODER_FILE, compile=False)
    target = model.get_layer(encoder_name(modality))
    target.set_weights(loaded.get_weights())
