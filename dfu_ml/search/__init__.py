"""Which modalities help: a modality-combination search on shared patient folds.

A **combination** is a set of modalities (``metadata``, ``depth_rgb``, ``depth_map``,
``thermal_rgb``, ``thermal_map``) written with ``+`` in the canonical order of
:data:`dfu_ml.config.MODALITY_CHOICES`, e.g. ``metadata+depth_rgb+thermal_map``. The study compared
the 15 non-empty combinations of :data:`STUDY_MODALITIES` (``--all``).

Every combination is trained on the same patient folds, so their per-fold figures are paired:

- :mod:`dfu_ml.search.folds`: one patient split per fold, and each combination's rows planned from
  it (the shared fold plan);
- :mod:`dfu_ml.search.compare`: the comparison table, paired differences to metadata-only with a
  patient bootstrap, the late-fusion ensemble and the nested choice;
- :mod:`dfu_ml.search.final`: which combinations the final fit trains and bundles, their
  epochs, the blessing, and the ensemble bundle;
- :mod:`dfu_ml.search.summary`: all of it as ``search.json``, with what the sharing saved;
- :mod:`dfu_ml.search.report`: the console, Markdown and HTML tables and the plot.

``metadata`` alone is part of every search: it is the baseline every paired difference is taken
against, and the clinical model it needs is fitted once per fold anyway.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

from dfu_ml.config import METADATA, MODALITY_CHOICES, Config
from dfu_ml.errors import ConfigError

STUDY_MODALITIES = (METADATA, "depth_rgb", "depth_map", "thermal_map")
BASELINE = METADATA
SEPARATOR = "+"
ENSEMBLE = "ensemble"
BEST = "best"
MAX_BOOTSTRAP = 100_000


def parse_combination(text: str) -> tuple[str, ...]:
    """``"thermal_map+metadata"`` -> ``("metadata", "thermal_map")`` (canonical order)."""
    parts = [p.strip() for p in str(text).split(SEPARATOR)]
    if not all(parts):
        raise ConfigError(
            f"combination {text!r} is empty or has an empty part; join modalities with "
            f"'{SEPARATOR}', e.g. metadata+depth_rgb"
        )
    for part in parts:
        if part not in MODALITY_CHOICES:
            raise ConfigError(
                f"combination {text!r}: unknown modality {part!r}; use "
                f"{', '.join(MODALITY_CHOICES)} joined by '{SEPARATOR}'"
            )
    if len(set(parts)) != len(parts):
        raise ConfigError(f"combination {text!r} names a modality twice")
    return tuple(m for m in MODALITY_CHOICES if m in parts)


def combination_name(modalities) -> str:
    return SEPARATOR.join(m for m in MODALITY_CHOICES if m in set(modalities))


def canonical(text: str) -> str:
    return combination_name(parse_combination(text))


def all_combinations(modalities=STUDY_MODALITIES) -> list[str]:
    """Every non-empty combination of ``modalities``, smallest first (15 for the study's four)."""
    ordered = [m for m in MODALITY_CHOICES if m in set(modalities)]
    return [
        combination_name(subset)
        for size in range(1, len(ordered) + 1)
        for subset in itertools.combinations(ordered, size)
    ]


def resolve_combinations(texts) -> list[str]:
    """Canonical names, each once, with the metadata-only baseline first (added if absent)."""
    if isinstance(texts, str):
        texts = [texts]
    names = [canonical(t) for t in texts]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ConfigError(f"combinations: {', '.join(repeated)} given more than once")
    return [BASELINE] + [n for n in names if n != BASELINE]


def has_images(combination: str) -> bool:
    return any(m != METADATA for m in parse_combination(combination))


def image_combinations(combinations) -> list[str]:
    """The combinations that train image branches (Stage 1 and Stage 2)."""
    return [c for c in combinations if has_images(c)]


def pretrain_modalities(combinations) -> list[str]:
    """The image modalities to pre-train (each once per fold), in canonical order."""
    used = {m for c in combinations for m in parse_combination(c)}
    return [m for m in MODALITY_CHOICES if m in used and m != METADATA]


def view_config(config: Config, view: str) -> Config:
    """The configuration that trains ``view`` (a combination, or one modality to pre-train)."""
    return config.replace(modalities=list(parse_combination(view)))


def search_config(config: Config, combinations) -> Config:
    """The search's own configuration: every modality any combination uses (what prepare crops)."""
    return config.replace(modalities=[METADATA, *pretrain_modalities(combinations)])


@dataclass(frozen=True)
class SearchSettings:
    """What a search compares and what it publishes (run parameters of the search pipeline).

    ``final_model`` is ``ensemble`` (the average of every combination's model), ``best`` (the
    combination with the best mean per-visit kappa over the folds) or one combination's name.
    ``bootstrap`` is the number of patient-bootstrap replicates of each paired difference (0: no
    confidence intervals).
    """

    combinations: tuple[str, ...]
    final_model: str = ENSEMBLE
    bootstrap: int = 1000

    @classmethod
    def from_values(cls, combinations, final_model: str = ENSEMBLE, bootstrap: int = 1000):
        names = tuple(resolve_combinations(combinations))
        final = str(final_model).strip()
        if final not in (ENSEMBLE, BEST):
            try:
                final = canonical(final)
            except ConfigError as exc:
                raise ConfigError(
                    f"final_model {final_model!r}: '{ENSEMBLE}', '{BEST}' or one of the "
                    f"combinations ({exc})"
                ) from None
            if final not in names:
                raise ConfigError(
                    f"final_model {final_model!r} is not among the combinations "
                    f"({', '.join(names)}); add it or choose '{ENSEMBLE}' or '{BEST}'"
                )
        if isinstance(bootstrap, bool) or not 0 <= int(bootstrap) <= MAX_BOOTSTRAP:
            raise ConfigError(
                f"bootstrap {bootstrap!r}: a number of replicates in 0..{MAX_BOOTSTRAP}"
            )
        return cls(names, final, int(bootstrap))

    @property
    def image_combinations(self) -> list[str]:
        return image_combinations(self.combinations)

    @property
    def pretrain_modalities(self) -> list[str]:
        return pretrain_modalities(self.combinations)
