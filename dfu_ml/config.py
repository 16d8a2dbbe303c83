"""One configuration schema for local runs, compiled pipelines and step CLIs.

A run's configuration is the defaults below, overlaid by a profile (``smoke``, ``paper`` or a YAML
file, which may itself ``extends:`` a profile), overlaid by ``key=value`` overrides. Unknown keys
and values of the wrong type or range are errors that name the key.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from dfu_ml.data.schema import IMAGE_MODALITIES
from dfu_ml.errors import ConfigError

PROFILE_DIR = Path(__file__).parent / "profiles"
METADATA = "metadata"
MODALITY_CHOICES = (METADATA, *IMAGE_MODALITIES)
BACKBONES = (
    "small_cnn",
    "EfficientNetB0",
    "EfficientNetB1",
    "EfficientNetB2",
    "EfficientNetB3",
    "DenseNet121",
    "MobileNetV3Small",
)
RESAMPLING = ("none", "random", "combined")
ALPHA_SETTINGS = ("equal", "capped", "uncapped")  # focal-loss alphas: see resampling.focal_alpha
STAGE1_FREEZE = ("backbone", "encoder")
CLINICAL_MODELS = ("forest", "boosting", "ordinal_forest")
MIXED_PRECISION = ("none", "mixed_bfloat16", "mixed_float16")
# Words YAML reads as strings (on/off would be booleans).
JIT_COMPILE = ("auto", "compiled", "eager")
PRETRAIN_MONITOR = ("quadratic_kappa", "batch_kappa")


@dataclass
class Config:
    """Every setting that defines an experiment (and, with the code and the data, its model id).

    Where the steps run (images, GPU placement, the object store, where models are published) is
    not here: see ``pipelines/settings.py``. Field comments say why a default is what it is.
    """

    profile: str = "default"
    # Data
    modalities: list = field(default_factory=lambda: [METADATA, "depth_rgb", "thermal_map"])
    cv_folds: int = 5
    data_percentage: float = 100.0
    seed: int = 42
    image_size: int = 64
    # The study widened the depth-map box by its field-of-view error and the thermal-map box by
    # 30 px; the depth-map figure is not published, so 10 px is our estimate.
    crop_margins: dict = field(
        default_factory=lambda: {
            "depth_rgb": 0,
            "depth_map": 10,
            "thermal_rgb": 0,
            "thermal_map": 30,
        }
    )
    on_missing_image: str = "error"
    # Resampling and focal loss (RC2)
    resampling: str = "combined"
    alpha_max_ratio: float = 3.0
    focal_gamma: float = 2.0
    pretrain_alpha: str = "equal"  # RC1: pre-training uses [1, 1, 1]
    # Clinical model (dfu_ml/training/clinical_rf.py: ClinicalModelSpec). The default and the
    # column policy were chosen on dev cross-validation (docs/RESULTS.md).
    clinical_model: str = "forest"  # forest | boosting | ordinal_forest
    # Columns decided when the wound is assessed (Dressing Grouped, offloading) are target-leak
    # suspects (dfu_ml/data/schema.py); true brings them back.
    clinical_include_leak_suspect: bool = False
    # Trees (forest, ordinal_forest): at 500 a different forest seed moved the 5-fold mean kappa
    # by 0.02 on the dev data; more trees only lower that noise.
    rf_n_estimators: int = 1000
    rf_max_depth: int = 0  # 0 means unlimited
    rf_min_samples_leaf: int = 5  # chosen on dev CV from 1, 2, 3, 5, 10 (docs/RESULTS.md)
    rf_inner_folds: int = 5  # patient-grouped inner folds (fusion training-row probabilities)
    # Image models
    backbone: str = "small_cnn"
    backbone_weights: str = "none"  # none | imagenet | path to a local weights file
    feature_dim: int = 64
    dropout: float = 0.3
    batch_size: int = 32
    clip_batch_size: bool = True  # RC6: keep several updates per epoch
    early_stopping_patience: int = 5
    pretrain_epochs: int = 30
    pretrain_lr: float = 1e-5
    stage1_epochs: int = 30
    stage1_lr: float = 1e-4
    stage1_freeze: str = "backbone"  # RC3: only the backbone is frozen
    stage2_epochs: int = 20
    stage2_lr: float = 1e-5  # RC4: 1e-6 moved nothing
    stage2_unfreeze_fraction: float = 0.2
    fusion_rf_weight: float = 0.70
    fusion_learnable: bool = True  # RC5: a fixed 0.70/0.30 split scaled the image gradient by 0.3
    # How the image stages execute (docs/TRAINING.md, "Fast training steps"). Mixed precision
    # changes the arithmetic, so it is part of the experiment; the probability layers stay float32.
    mixed_precision: str = "none"  # none | mixed_bfloat16 | mixed_float16 (GPU profiles: bf16)
    # auto: Keras's choice (XLA on TensorFlow with a GPU and on JAX; eager on torch and on CPU,
    # where XLA was ~7x slower). compiled: XLA, or torch.compile on torch. eager: neither.
    # Measure before choosing (bench/gpu_stages.py). On TensorFlow XLA excludes deterministic
    # kernels, so compiled runs there are repeatable to float tolerance only.
    jit_compile: str = "auto"
    predict_batch_size: int = 256  # validation/feature batches: as large as memory allows
    stage1_cached_features: bool = True  # Stage 1 trains on the frozen backbones' cached output
    # Root-cause switches: each default is the fix; `dfu-kfp diagnose` reverts them
    # (dfu_ml/profiles/diagnose/, docs/TRAINING.md). RC1: pre-training monitored an unweighted,
    # batch-averaged kappa (batch_kappa) and its output layer was carried into the fusion model;
    # RC2: the fusion's focal alphas were uncapped inverse frequencies; RC4: Stage 2's weights were
    # used even when they were worse than Stage 1's.
    pretrain_monitor: str = "quadratic_kappa"
    transfer_output_layer: bool = False
    fusion_alpha: str = "capped"
    stage2_keep_better: bool = True
    # Health verdict
    health_min_kappa: float = 0.25
    health_min_trainable_params: int = 1000
    health_min_steps_per_epoch: int = 3
    # A stage whose best epoch is 1 passes as an early peak only if its training loss fell by at
    # least this fraction (a stuck stage's loss stays where epoch 1 left it).
    health_min_loss_drop: float = 0.05

    @property
    def image_modalities(self) -> list[str]:
        return [m for m in self.modalities if m != METADATA]

    @property
    def uses_metadata(self) -> bool:
        return METADATA in self.modalities

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    def replace(self, **changes: Any) -> "Config":
        return from_dict({**self.to_dict(), **changes})


FIELDS = {f.name: f for f in dataclasses.fields(Config)}


def _check_type(key: str, value: Any, default: Any) -> Any:
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise ConfigError(f"config key {key!r} must be true or false, got {value!r}")
        return value
    if isinstance(default, int):
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(f"config key {key!r} must be an integer, got {value!r}")
        return value
    if isinstance(default, float):
        if isinstance(value, str):
            # YAML 1.1 (PyYAML) reads exponent notation without a dot, e.g. ``1e-5``, as a string.
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"config key {key!r} must be a number, got {value!r}")
        return float(value)
    if isinstance(default, str):
        if not isinstance(value, str):
            raise ConfigError(f"config key {key!r} must be a string, got {value!r}")
        return value
    if isinstance(default, list):
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list):
            raise ConfigError(f"config key {key!r} must be a list, got {value!r}")
        return value
    if isinstance(default, dict):
        if not isinstance(value, dict):
            raise ConfigError(f"config key {key!r} must be a mapping, got {value!r}")
        # A partial mapping overrides the defaults it names and keeps the others.
        return {**default, **value}
    return value


def _choice(key: str, value: Any, choices) -> None:
    if value not in choices:
        raise ConfigError(f"config key {key!r}: {value!r} is not one of {', '.join(choices)}")


def validate(config: Config) -> Config:
    """Check ranges and choices; raise ConfigError naming the key."""
    if not config.modalities:
        raise ConfigError(
            "config key 'modalities' is empty; give at least one of " + ", ".join(MODALITY_CHOICES)
        )
    for m in config.modalities:
        _choice("modalities", m, MODALITY_CHOICES)
    if len(set(config.modalities)) != len(config.modalities):
        raise ConfigError(f"config key 'modalities' repeats a modality: {config.modalities}")
    if config.cv_folds < 2:
        raise ConfigError(f"config key 'cv_folds' must be >= 2, got {config.cv_folds}")
    if not 0 < config.data_percentage <= 100:
        raise ConfigError(
            f"config key 'data_percentage' must be in (0, 100], got {config.data_percentage}"
        )
    if not 16 <= config.image_size <= 1024:
        raise ConfigError(f"config key 'image_size' must be in [16, 1024], got {config.image_size}")
    unknown_margins = set(config.crop_margins) - set(IMAGE_MODALITIES)
    if unknown_margins:
        raise ConfigError(
            f"config key 'crop_margins' has unknown modality {sorted(unknown_margins)}"
        )
    for modality, margin in config.crop_margins.items():
        if isinstance(margin, bool) or not isinstance(margin, int) or not 0 <= margin <= 1000:
            raise ConfigError(
                f"config key 'crop_margins': the {modality} margin must be a whole number of "
                f"pixels in 0..1000, got {margin!r}"
            )
    _choice("on_missing_image", config.on_missing_image, ("error", "skip"))
    _choice("resampling", config.resampling, RESAMPLING)
    _choice("pretrain_alpha", config.pretrain_alpha, ALPHA_SETTINGS)
    _choice("fusion_alpha", config.fusion_alpha, ALPHA_SETTINGS)
    _choice("pretrain_monitor", config.pretrain_monitor, PRETRAIN_MONITOR)
    _choice("backbone", config.backbone, BACKBONES)
    _choice("stage1_freeze", config.stage1_freeze, STAGE1_FREEZE)
    if config.alpha_max_ratio < 1:
        raise ConfigError(
            f"config key 'alpha_max_ratio' must be >= 1, got {config.alpha_max_ratio}"
        )
    if config.batch_size < 1:
        raise ConfigError(f"config key 'batch_size' must be >= 1, got {config.batch_size}")
    for key in (
        "pretrain_epochs",
        "stage1_epochs",
        "stage2_epochs",
        "early_stopping_patience",
        "feature_dim",
    ):
        if getattr(config, key) < 1:
            raise ConfigError(f"config key {key!r} must be >= 1, got {getattr(config, key)}")
    for key in ("pretrain_lr", "stage1_lr", "stage2_lr"):
        if not 0 < getattr(config, key) < 1:
            raise ConfigError(f"config key {key!r} must be in (0, 1), got {getattr(config, key)}")
    if not 0 < config.fusion_rf_weight < 1:
        raise ConfigError(
            f"config key 'fusion_rf_weight' must be in (0, 1), got {config.fusion_rf_weight}"
        )
    if not 0 <= config.stage2_unfreeze_fraction <= 1:
        raise ConfigError(
            "config key 'stage2_unfreeze_fraction' must be in [0, 1], got "
            f"{config.stage2_unfreeze_fraction}"
        )
    _choice("clinical_model", config.clinical_model, CLINICAL_MODELS)
    for key, low, high, meaning in RANGES:
        value = getattr(config, key)
        if not low <= value <= high or (key in OPEN_ABOVE and value == high):
            interval = f"[{low}, {high}{')' if key in OPEN_ABOVE else ']'}"
            raise ConfigError(f"config key {key!r} must be in {interval} ({meaning}), got {value}")
    _validate_execution(config)
    return config


# Range checks of the keys without a check of their own above: (key, low, high, meaning).
RANGES = (
    ("seed", 0, 2**32 - 1, "a non-negative integer seed"),
    ("focal_gamma", 0.0, 10.0, "the focal loss's focusing exponent; 0 is cross-entropy"),
    ("dropout", 0.0, 1.0, "the fraction of features dropped"),
    ("health_min_kappa", -1.0, 1.0, "a kappa threshold"),
    ("health_min_trainable_params", 0, 10**10, "a parameter count"),
    ("health_min_steps_per_epoch", 1, 10**6, "updates per epoch"),
    ("health_min_loss_drop", 0.0, 1.0, "a fraction of the epoch-1 training loss"),
    ("rf_n_estimators", 1, 5000, "trees of the clinical forests"),
    ("rf_max_depth", 0, 1000, "the clinical trees' depth; 0 is unlimited"),
    ("rf_min_samples_leaf", 1, 1000, "training visits per leaf of the clinical trees"),
    ("rf_inner_folds", 2, 20, "patient-grouped inner folds of the clinical model"),
)
OPEN_ABOVE = {"dropout", "health_min_loss_drop"}


def _validate_execution(config: Config) -> None:
    """The keys of how the image stages execute (mixed precision, compilation, batch sizes)."""
    _choice("mixed_precision", config.mixed_precision, MIXED_PRECISION)
    _choice("jit_compile", config.jit_compile, JIT_COMPILE)
    if config.backbone_weights == "imagenet" and config.backbone == "small_cnn":
        # Caught here, not when the first GPU step builds its model.
        raise ConfigError(
            "config key 'backbone_weights' is imagenet, but backbone 'small_cnn' is this "
            "project's own CNN with no ImageNet weights; use backbone_weights=none or a Keras "
            "application backbone"
        )
    if config.predict_batch_size < 1:
        raise ConfigError(
            f"config key 'predict_batch_size' must be >= 1, got {config.predict_batch_size}"
        )


def from_dict(values: dict, source: str = "config") -> Config:
    """Build a validated Config from a mapping; unknown keys are an error naming the key."""
    defaults = Config()
    checked = {}
    for key, value in values.items():
        if key not in FIELDS:
            close = [k for k in FIELDS if k.split("_")[0] == key.split("_")[0]]
            hint = f" (did you mean {', '.join(close[:3])}?)" if close else ""
            raise ConfigError(f"{source}: unknown config key {key!r}{hint}")
        checked[key] = _check_type(key, value, getattr(defaults, key))
    return validate(Config(**checked))


def _read_yaml(path: Path) -> dict:
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping of config keys, got {type(data).__name__}")
    return data


def profile_names() -> list[str]:
    return sorted(p.stem for p in PROFILE_DIR.glob("*.yaml"))


def _profile_values(name_or_path: str, seen: tuple = ()) -> dict:
    path = Path(name_or_path)
    if not path.is_file():
        path = PROFILE_DIR / f"{name_or_path}.yaml"
        if not path.is_file():
            raise ConfigError(
                f"config {name_or_path!r} is neither a YAML file nor a profile "
                f"({', '.join(profile_names())})"
            )
    if str(path.resolve()) in seen:
        raise ConfigError(f"{path}: 'extends' forms a cycle")
    values = _read_yaml(path)
    parent = values.pop("extends", None)
    if parent and (path.parent / str(parent)).is_file():  # a file next to this one
        parent = str(path.parent / str(parent))
    base = _profile_values(parent, seen + (str(path.resolve()),)) if parent else {}
    values.setdefault("profile", path.stem)
    for key in values:
        if key not in FIELDS:
            from_dict({key: values[key]}, source=str(path))
    return {**base, **values}


def parse_override(text: str) -> tuple[str, Any]:
    """Parse one ``key=value`` override; the value is read as YAML (numbers, lists, booleans)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like key=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    if key in FIELDS and isinstance(getattr(Config(), key), str) and not isinstance(value, str):
        value = raw
    return key, value


def load_config(profile: str | None = None, overrides: list[str] | dict | None = None) -> Config:
    """Defaults, then a profile name or YAML file, then ``key=value`` overrides."""
    values = _profile_values(profile) if profile else {}
    if isinstance(overrides, dict):
        values.update(overrides)
    else:
        for text in overrides or []:
            key, value = parse_override(text)
            values[key] = value
    return from_dict(values, source=f"config {profile or 'defaults'}")


def config_from_json(text: str) -> Config:
    """Rebuild a Config serialised with :meth:`Config.to_json` (how pipeline steps receive it)."""
    try:
        values = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"config JSON is not valid: {exc}") from None
    return from_dict(values, source="config JSON")
