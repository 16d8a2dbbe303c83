"""Patient-grouped, stratified, seeded K-fold splits, and patient subsampling.

No patient is ever in both the training and the validation side of a fold. ``data_percentage``
samples patients (stratified by each patient's most common label), never rows.
"""

from __future__ import annotations

import numpy as np
from sklearn.model_selection import StratifiedGroupKFold

from dfu_ml.data.schema import CLASS_NAMES, NUM_CLASSES
from dfu_ml.errors import DataError, FoldError


def _patient_majority_labels(labels: np.ndarray, patients: np.ndarray) -> dict:
    majority = {}
    for patient in np.unique(patients):
        counts = np.bincount(labels[patients == patient], minlength=NUM_CLASSES)
        majority[patient] = int(np.argmax(counts))
    return majority


def sample_patients(
    labels: np.ndarray, patients: np.ndarray, percentage: float, seed: int
) -> np.ndarray:
    """Boolean mask of the rows whose patient is kept when sampling ``percentage`` % of patients."""
    labels, patients = np.asarray(labels), np.asarray(patients)
    if percentage >= 100:
        return np.ones(len(patients), dtype=bool)
    rng = np.random.default_rng(seed)
    majority = _patient_majority_labels(labels, patients)
    kept = []
    for cls in range(NUM_CLASSES):
        group = np.array(sorted(p for p, c in majority.items() if c == cls))
        if len(group):
            n = max(1, int(round(len(group) * percentage / 100)))
            kept.extend(rng.choice(group, size=n, replace=False).tolist())
    mask = np.isin(patients, kept)
    if not mask.any():
        raise DataError(f"data_percentage={percentage} leaves no patients; raise it")
    return mask


def patient_folds(
    labels: np.ndarray, patients: np.ndarray, n_folds: int, seed: int
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Stratified grouped K-fold by patient. Returns (train_idx, val_idx) per fold.

    Raises FoldError, naming the fold and the class, when a fold's training or validation side
    lacks a class: training on it would silently never predict that class.
    """
    labels, patients = np.asarray(labels), np.asarray(patients)
    if len(labels) == 0:
        raise DataError("the dataset is empty after filtering; nothing to split into folds")
    n_patients = len(np.unique(patients))
    if n_patients < n_folds:
        raise FoldError(
            f"cv_folds={n_folds} needs at least {n_folds} patients, the data has "
            f"{n_patients}; lower cv_folds or raise data_percentage"
        )
    splitter = StratifiedGroupKFold(n_splits=n_folds, shuffle=True, random_state=seed)
    folds = []
    for k, (train, val) in enumerate(splitter.split(np.zeros(len(labels)), labels, patients)):
        for side, idx in (("training", train), ("validation", val)):
            present = set(np.unique(labels[idx]).tolist())
            missing = [CLASS_NAMES[c] for c in range(NUM_CLASSES) if c not in present]
            if missing:
                raise FoldError(
                    f"fold {k}: the {side} side has no {', '.join(missing)} rows "
                    f"({len(np.unique(patients[idx]))} patients); use fewer folds "
                    "(cv_folds), more data (data_percentage) or another seed"
                )
        folds.append((np.sort(train), np.sort(val)))
    return folds
