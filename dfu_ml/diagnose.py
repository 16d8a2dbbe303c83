"""The study's root-cause analysis as an experiment: one configuration trained with its fixes
reverted, all together and one at a time (``dfu-kfp diagnose``).

Variants of the run's configuration, on the same patient folds:

- ``pre-fix``: every root cause's fix reverted (the study before its analysis);
- ``fixed``: the configuration as it is (every fix in place);
- ``minus-RC1`` .. ``minus-RC6``: only that root cause's fix reverted.

What reverting a root cause means is a config overlay, ``dfu_ml/profiles/diagnose/rcK.yaml``,
whose comments say what it reverts and which health check was written for it; the stages switch
on those keys only. The report's side (paired differences, findings, tables) is
:mod:`dfu_ml.diagnose_report`.
"""

from __future__ import annotations

from dataclasses import dataclass

from dfu_ml.config import FIELDS, PROFILE_DIR, Config, _read_yaml
from dfu_ml.errors import ConfigError

OVERLAY_DIR = PROFILE_DIR / "diagnose"
PRE_FIX, FIXED = "pre-fix", "fixed"


@dataclass(frozen=True)
class RootCause:
    """One root cause: its id, what went wrong, and the health checks written to catch it."""

    id: str
    cause: str
    checks: tuple[str, ...]

    @property
    def variant(self) -> str:
        """The variant that reverts only this root cause's fix."""
        return f"minus-{self.id}"

    @property
    def overlay(self) -> str:
        return f"{self.id.lower()}.yaml"


ROOT_CAUSES = (
    RootCause(
        "RC1",
        "image pre-training collapsed to one class and was carried into the fusion model",
        ("pretraining_kappa_positive",),
    ),
    RootCause(
        "RC2",
        "uncapped inverse-frequency alphas pushed the fusion towards the rare class",
        ("predictions_cover_several_classes",),
    ),
    RootCause(
        "RC3",
        "Stage 1 trained only a classifier on frozen image features",
        ("trainable_params_minimum",),
    ),
    RootCause(
        "RC4",
        "Stage 2 at 1e-6 moved nothing, and its weights were used regardless",
        ("stage2_improves_or_stage1_kept", "no_stage_restores_epoch_1"),
    ),
    RootCause(
        "RC5",
        "a fixed 0.70/0.30 fusion scaled the image gradient by 0.3",
        ("fusion_weight_learned",),
    ),
    RootCause(
        "RC6",
        "one update per epoch: a batch of 600 on 471 training rows",
        ("steps_per_epoch_minimum",),
    ),
)
BY_ID = {rc.id: rc for rc in ROOT_CAUSES}

# Each variant: the root causes whose fixes it reverts, in report order.
VARIANTS: dict[str, tuple[str, ...]] = {
    PRE_FIX: tuple(BY_ID),
    FIXED: (),
    **{rc.variant: (rc.id,) for rc in ROOT_CAUSES},
}

# What every variant shares (the prepared data, the fold plans, the clinical forest) is made with
# the run's configuration: an overlay may not change the keys those read.
SHARED_KEYS = frozenset(
    {
        "modalities",
        "cv_folds",
        "data_percentage",
        "seed",
        "image_size",
        "crop_margins",
        "on_missing_image",
        "resampling",
        "rf_n_estimators",
        "rf_max_depth",
        "rf_min_samples_leaf",
        "rf_inner_folds",
    }
)
# Keys that only Stage 1 and Stage 2 read: variants that differ in these alone share their
# pre-training. Any other key is taken to change pre-training (an unlisted key costs sharing,
# never correctness).
FUSION_ONLY_KEYS = frozenset(
    {
        "fusion_alpha",
        "fusion_learnable",
        "fusion_rf_weight",
        "transfer_output_layer",
        "stage1_freeze",
        "stage1_lr",
        "stage1_epochs",
        "stage2_lr",
        "stage2_epochs",
        "stage2_keep_better",
        "stage2_unfreeze_fraction",
    }
)


def overlay_values(rc_id: str) -> dict:
    """The config keys that revert ``rc_id``'s fix, read from its overlay file."""
    if rc_id not in BY_ID:
        raise ConfigError(f"unknown root cause {rc_id!r}: one of {', '.join(BY_ID)}")
    path = OVERLAY_DIR / BY_ID[rc_id].overlay
    values = _read_yaml(path)
    for key in values:
        if key not in FIELDS:
            raise ConfigError(f"{path}: unknown config key {key!r}")
        if key in SHARED_KEYS:
            raise ConfigError(
                f"{path}: {key!r} shapes the data, folds or forest every variant shares; an "
                "overlay may change only what the image stages do"
            )
    return values


def variant_overrides(variant: str) -> dict:
    """Every key ``variant`` sets over the run's configuration (its overlays merged)."""
    if variant not in VARIANTS:
        raise ConfigError(f"unknown diagnose variant {variant!r}: one of {', '.join(VARIANTS)}")
    merged = {}
    for rc_id in VARIANTS[variant]:
        merged.update(overlay_values(rc_id))
    return merged


def variant_config(base: Config, variant: str) -> Config:
    """The configuration ``variant`` trains with: ``base`` with its overlays applied."""
    return base.replace(**variant_overrides(variant))


def _pretrain_overrides(variant: str) -> dict:
    return {k: v for k, v in variant_overrides(variant).items() if k not in FUSION_ONLY_KEYS}


def pretrain_group(variant: str) -> str:
    """The variant whose pre-training ``variant`` reuses: the first (in report order) whose
    overlays change pre-training in the same way (``fixed`` for most)."""
    mine = _pretrain_overrides(variant)
    return next(v for v in VARIANTS if _pretrain_overrides(v) == mine)


def pretrain_groups() -> list[str]:
    """The distinct pre-trainings a diagnose run trains (per fold and image modality)."""
    return list(dict.fromkeys(pretrain_group(v) for v in VARIANTS))


def pretrain_config(base: Config, group: str) -> Config:
    """The configuration pre-training group ``group`` trains with."""
    return base.replace(**_pretrain_overrides(group))


def check_diagnosable(config: Config) -> Config:
    """A diagnose run needs image modalities: every root cause lives in the image stages."""
    if not config.image_modalities:
        raise ConfigError(
            f"modalities {config.modalities}: every root cause is in the image stages; diagnose "
            "needs at least one image modality (e.g. --set modalities=metadata,depth_rgb)"
        )
    for variant in VARIANTS:
        variant_config(config, variant)  # every overlay loads and validates on this config
    return config
