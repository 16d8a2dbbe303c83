"""Resampling of training rows and focal-loss alpha (RC2), on training rows only."""

from __future__ import annotations

import numpy as np

from dfu_ml.data.schema import NUM_CLASSES

EQUAL_ALPHA = [1.0, 1.0, 1.0]


def class_counts(labels: np.ndarray) -> np.ndarray:
    return np.bincount(np.asarray(labels, dtype=int), minlength=NUM_CLASSES)


def compute_focal_alpha(labels: np.ndarray, max_ratio: float | None = 3.0) -> list[float]:
    """Inverse class frequency of the original training rows, capped, normalised to sum 3.

    The cap keeps max/min <= ``max_ratio`` (the study's uncapped [0.60, 0.31, 2.09] made the model
    predict the rare class everywhere). ``max_ratio=None`` gives the uncapped, pre-fix alphas.
    """
    counts = class_counts(labels).astype(float)
    if (counts == 0).any():
        missing = [i for i in range(NUM_CLASSES) if counts[i] == 0]
        raise ValueError(f"cannot compute focal alpha: no training rows of class(es) {missing}")
    inverse = counts.sum() / counts
    alpha = inverse / inverse.sum() * NUM_CLASSES
    if max_ratio is not None:
        # Lower the largest alphas to max_ratio times the smallest, then renormalise (the ratio is
        # scale-free, so renormalising keeps it). This reproduces the study's capped figures.
        alpha = np.minimum(alpha, alpha.min() * max_ratio)
        alpha = alpha / alpha.sum() * NUM_CLASSES
    return [float(a) for a in alpha]


def resample_indices(labels: np.ndarray, strategy: str, seed: int | tuple[int, ...]) -> np.ndarray:
    """Indices (into ``labels``) of the resampled training rows (``seed``: non-negative integers,
    as NumPy's ``default_rng`` takes them).

    ``none`` keeps every row once; ``random`` oversamples every class to the largest count;
    ``combined`` undersamples the largest class to the middle count and oversamples the smallest
    class up to it.
    """
    labels = np.asarray(labels, dtype=int)
    rng = np.random.default_rng(seed)
    if strategy == "none":
        return np.arange(len(labels))
    counts = class_counts(labels)
    present = [c for c in range(NUM_CLASSES) if counts[c] > 0]
    if strategy == "random":
        targets = {c: counts.max() for c in present}
    elif strategy == "combined":
        order = sorted(present, key=lambda c: counts[c])
        middle = counts[order[len(order) // 2]]
        targets = {c: (middle if c in (order[0], order[-1]) else counts[c]) for c in present}
    else:
        raise ValueError(f"unknown resampling strategy {strategy!r}: use none, random or combined")
    chosen = []
    for c in present:
        idx = np.flatnonzero(labels == c)
        target = int(targets[c])
        if target <= len(idx):
            chosen.append(rng.choice(idx, size=target, replace=False))
        else:
            extra = rng.choice(idx, size=target - len(idx), replace=True)
            chosen.append(np.concatenate([idx, extra]))
    out = np.concatenate(chosen)
    return np.sort(out)
