"""Classification metrics, reported the same way everywhere.

The monitored validation kappa, the checkpoints and the reports all use quadratic-weighted Cohen's
kappa computed over the whole validation set (never a batch average), under one name. The one
exception, :func:`batch_kappa`, replays the study's pre-training monitor for ``dfu-kfp diagnose``
(``pretrain_monitor: batch_kappa``, RC1); nothing reports it.
"""

from __future__ import annotations

import numpy as np
from sklearn.metrics import accuracy_score, cohen_kappa_score, confusion_matrix, f1_score

from dfu_ml.data.schema import CLASS_NAMES, NUM_CLASSES

KAPPA = "val_quadratic_kappa"
BATCH_KAPPA = "val_batch_kappa"
LABELS = list(range(NUM_CLASSES))


def quadratic_kappa(y_true, y_pred) -> float:
    """Quadratic-weighted Cohen's kappa; 0.0 when it is undefined (a single class everywhere)."""
    y_true, y_pred = np.asarray(y_true, int), np.asarray(y_pred, int)
    if len(y_true) == 0:
        return float("nan")
    if len(np.unique(np.concatenate([y_true, y_pred]))) < 2:
        return 0.0
    value = cohen_kappa_score(y_true, y_pred, weights="quadratic", labels=LABELS)
    return 0.0 if np.isnan(value) else float(value)


def batch_kappa(y_true, y_pred, batch_size: int) -> float:
    """The study's monitored kappa (RC1): unweighted Cohen's kappa of each validation batch of
    ``batch_size`` rows, averaged over the batches; a batch where it is undefined counts as 0."""
    y_true, y_pred = np.asarray(y_true, int), np.asarray(y_pred, int)
    values = []
    for start in range(0, len(y_true), max(1, batch_size)):
        t, p = y_true[start : start + batch_size], y_pred[start : start + batch_size]
        value = 0.0
        if len(np.unique(np.concatenate([t, p]))) > 1:
            value = cohen_kappa_score(t, p, labels=LABELS)
        values.append(0.0 if np.isnan(value) else float(value))
    return float(np.mean(values)) if values else float("nan")


def classification_metrics(y_true, proba) -> dict:
    """Kappa, accuracy, macro and per-class F1, the confusion matrix and the predicted-class mix."""
    y_true = np.asarray(y_true, int)
    y_pred = np.asarray(proba).argmax(axis=1)
    per_class = f1_score(y_true, y_pred, labels=LABELS, average=None, zero_division=0)
    return {
        "quadratic_kappa": quadratic_kappa(y_true, y_pred),
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "macro_f1": float(
            f1_score(y_true, y_pred, labels=LABELS, average="macro", zero_division=0)
        ),
        "f1_per_class": {CLASS_NAMES[i]: float(per_class[i]) for i in LABELS},
        "confusion_matrix": confusion_matrix(y_true, y_pred, labels=LABELS).tolist(),
        "predicted_classes": int(len(np.unique(y_pred))),
        "rows": int(len(y_true)),
    }


def per_visit(visit_index, y_true, proba) -> tuple[np.ndarray, ...]:
    """Average the probabilities of a visit's image sets: one prediction per visit.

    Returns the visit indices, their labels, their mean probabilities and their image-set counts.
    """
    visit_index = np.asarray(visit_index)
    visits, inverse = np.unique(visit_index, return_inverse=True)
    summed = np.zeros((len(visits), NUM_CLASSES))
    np.add.at(summed, inverse, np.asarray(proba))
    counts = np.bincount(inverse, minlength=len(visits))[:, None]
    labels = np.zeros(len(visits), int)
    labels[inverse] = np.asarray(y_true)
    return visits, labels, summed / counts, counts[:, 0]


def evaluate_predictions(visit_index, y_true, proba) -> dict:
    """Metrics per image-set row and per visit."""
    _, visit_labels, visit_proba, _ = per_visit(visit_index, y_true, proba)
    return {
        "per_row": classification_metrics(y_true, proba),
        "per_visit": classification_metrics(visit_labels, visit_proba),
    }


def mean_std(values) -> dict:
    values = np.asarray([v for v in values if v is not None and not np.isnan(v)], float)
    if not len(values):
        return {"mean": float("nan"), "std": float("nan")}
    return {"mean": float(values.mean()), "std": float(values.std(ddof=0))}
