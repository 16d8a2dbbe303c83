"""The clinical random forest: out-of-fold probabilities for training rows, and probabilities for
validation rows from a forest fitted on every training visit.

Image-set rows are copies of their visit's clinical row (and resampling copies them again), so the
forest is fitted on unique visits and the inner cross-validation is grouped by patient: copies of
a visit, and visits of one patient, never straddle an inner split.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
from sklearn.ensemble import RandomForestClassifier
from sklearn.model_selection import GroupKFold, StratifiedGroupKFold

from dfu_ml.data.schema import NUM_CLASSES, PATIENT_COLUMN
from dfu_ml.features import ClinicalFeatureTransformer


@dataclass
class ClinicalForest:
    """A fitted feature transformer and forest; predicts 3-class probabilities for visits."""

    transformer: ClinicalFeatureTransformer
    forest: RandomForestClassifier

    def predict_proba(self, visits: pd.DataFrame) -> np.ndarray:
        return _full_proba(self.forest, self.transformer.transform(visits))


def _full_proba(forest: RandomForestClassifier, features: np.ndarray) -> np.ndarray:
    """predict_proba with a column for every class, even one absent from the fit."""
    proba = np.zeros((len(features), NUM_CLASSES))
    if len(features):
        proba[:, forest.classes_.astype(int)] = forest.predict_proba(features)
    return proba


def _make_forest(
    n_estimators: int, max_depth: int, min_samples_leaf: int, seed: int
) -> RandomForestClassifier:
    return RandomForestClassifier(
        n_estimators=n_estimators,
        max_depth=max_depth or None,
        min_samples_leaf=min_samples_leaf,
        class_weight="balanced",
        random_state=seed,
        n_jobs=-1,
    )


def fit_clinical_forest(
    visits: pd.DataFrame,
    n_estimators: int = 300,
    max_depth: int = 0,
    min_samples_leaf: int = 2,
    seed: int = 0,
) -> ClinicalForest:
    """Fit the feature transformer and the forest on these (training) visits."""
    transformer = ClinicalFeatureTransformer().fit(visits)
    forest = _make_forest(n_estimators, max_depth, min_samples_leaf, seed)
    forest.fit(transformer.transform(visits), visits["label"].to_numpy())
    return ClinicalForest(transformer, forest)


def out_of_fold_proba(
    visits: pd.DataFrame,
    inner_folds: int = 5,
    n_estimators: int = 300,
    max_depth: int = 0,
    min_samples_leaf: int = 2,
    seed: int = 0,
) -> np.ndarray:
    """Out-of-fold probabilities for each (unique) training visit, grouped by patient.

    Every fold refits the feature transformer too, so no statistic of a held-out visit leaks.
    """
    labels = visits["label"].to_numpy()
    groups = visits[PATIENT_COLUMN].to_numpy()
    n_groups = len(np.unique(groups))
    k = max(2, min(inner_folds, n_groups))
    try:
        splits = list(
            StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed).split(
                np.zeros(len(labels)), labels, groups
            )
        )
    except ValueError:
        splits = list(GroupKFold(n_splits=k).split(np.zeros(len(labels)), labels, groups))
    oof = np.full((len(visits), NUM_CLASSES), np.nan)
    for inner_train, inner_held in splits:
        model = fit_clinical_forest(
            visits.iloc[inner_train], n_estimators, max_depth, min_samples_leaf, seed
        )
        oof[inner_held] = model.predict_proba(visits.iloc[inner_held])
    return oof


def clinical_rf_probabilities(
    visits: pd.DataFrame,
    train_visits: np.ndarray,
    val_visits: np.ndarray,
    inner_folds: int = 5,
    n_estimators: int = 300,
    max_depth: int = 0,
    min_samples_leaf: int = 2,
    seed: int = 0,
):
    """RF probabilities for one fold.

    Returns ``(proba, forest)``: ``proba`` has a row per visit in ``visits`` (NaN for visits in
    neither side), out-of-fold for training visits, from ``forest`` (fitted on all training
    visits) for validation visits.
    """
    train_visits = np.unique(train_visits)
    val_visits = np.unique(val_visits)
    proba = np.full((len(visits), NUM_CLASSES), np.nan)
    train_frame = visits.iloc[train_visits]
    proba[train_visits] = out_of_fold_proba(
        train_frame, inner_folds, n_estimators, max_depth, min_samples_leaf, seed
    )
    forest = fit_clinical_forest(train_frame, n_estimators, max_depth, min_samples_leaf, seed)
    if len(val_visits):
        proba[val_visits] = forest.predict_proba(visits.iloc[val_visits])
    return proba, forest
