"""The clinical model: one fitted scikit-learn pipeline (the clinical features of
``dfu_ml.features`` and an estimator), its probabilities for validation visits, and out-of-fold
probabilities for training visits where the fusion uses them.

Image-set rows are copies of their visit's clinical row (and resampling copies them again), so the
model is fitted on unique visits, and every inner cross-validation is grouped by patient: copies of
a visit, and visits of one patient, never straddle an inner split. A metadata-only run (and an
image run without the metadata modality) uses no training-row probabilities, so no inner models
are fitted there.

Estimators (``clinical_model``; docs/RESULTS.md compares them on the same folds):

- ``forest``: a random forest with balanced class weights; argmax of its probabilities.
- ``boosting``: histogram gradient boosting with balanced class weights.
- ``ordinal_forest``: a forest regressor on the ordered phase (I=0 < P=1 < R=2) whose two class
  thresholds are fitted on inner, patient-grouped out-of-fold predictions.

All three take missing values natively.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.base import BaseEstimator, ClassifierMixin, TransformerMixin
from sklearn.ensemble import (
    HistGradientBoostingClassifier,
    RandomForestClassifier,
    RandomForestRegressor,
)
from sklearn.model_selection import GroupKFold, StratifiedGroupKFold, cross_val_predict
from sklearn.pipeline import Pipeline
from sklearn.utils.class_weight import compute_sample_weight

from dfu_ml.config import CLINICAL_MODELS, Config
from dfu_ml.data.schema import NUM_CLASSES, PATIENT_COLUMN
from dfu_ml.features import ClinicalColumns, feature_pipeline

# Histogram gradient boosting keeps scikit-learn's defaults except the class weights and a mild
# L2 penalty: it is compared as it comes, not tuned on the dev folds.
BOOSTING_SETTINGS = {"learning_rate": 0.1, "max_iter": 100, "l2_regularization": 1.0}


class DropUninformative(TransformerMixin, BaseEstimator):
    """Keeps the columns with at least two distinct values in the training rows (missing
    values left aside): a constant or all-missing column carries nothing."""

    def fit(self, X, y=None):
        X = np.asarray(X, dtype=float)
        self.n_features_in_ = X.shape[1]
        low, high = np.nanmin(X, axis=0, initial=np.inf), np.nanmax(X, axis=0, initial=-np.inf)
        self.keep_ = high > low
        return self

    def transform(self, X):
        return np.asarray(X, dtype=float)[:, self.keep_]

    def get_feature_names_out(self, input_features=None):
        return np.asarray(input_features, dtype=object)[self.keep_]


def inner_splits(labels: np.ndarray, groups: np.ndarray, folds: int, seed: int) -> list:
    """Patient-grouped inner splits, stratified where the class counts allow it."""
    k = max(2, min(folds, len(np.unique(groups))))
    x = np.zeros(len(labels))
    try:
        cv = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed)
        return list(cv.split(x, labels, groups))
    except ValueError:
        return list(GroupKFold(n_splits=k).split(x, labels, groups))


def _quadratic_kappa(labels: np.ndarray, predicted: np.ndarray) -> float:
    """Quadratic-weighted kappa from the confusion matrix (fast enough for a threshold grid)."""
    n = NUM_CLASSES
    observed = np.bincount(labels * n + predicted, minlength=n * n).reshape(n, n).astype(float)
    expected = np.outer(observed.sum(1), observed.sum(0)) / max(1.0, observed.sum())
    weights = (np.arange(n)[:, None] - np.arange(n)[None, :]) ** 2
    denominator = (weights * expected).sum()
    return 0.0 if denominator == 0 else 1.0 - (weights * observed).sum() / denominator


def fit_thresholds(scores: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    """The two cut points on the ordinal score that maximise quadratic kappa, from a coarse grid
    of the scores' quantiles (coarse on purpose: the thresholds should not chase noise)."""
    quantiles = np.unique(np.quantile(scores, np.linspace(0.02, 0.98, 49)))
    grid = (quantiles[:-1] + quantiles[1:]) / 2  # between scores: no score sits on a cut point
    best = (-np.inf, 0.5, 1.5)
    for i, low in enumerate(grid):
        for high in grid[i + 1 :]:
            kappa = _quadratic_kappa(labels, np.digitize(scores, [low, high]))
            if kappa > best[0]:
                best = (kappa, float(low), float(high))
    return best[1], best[2]


def ordinal_proba(scores: np.ndarray, thresholds: tuple[float, float]) -> np.ndarray:
    """Class probabilities from ordinal scores: the score is mapped piecewise-linearly so that the
    thresholds fall at 0.5 and 1.5, and its mass is shared by the two nearest classes; the argmax
    is the thresholded class."""
    low, high = thresholds
    width = max(high - low, 1e-9)
    position = np.interp(
        scores, [low - width, low, high, high + width], [-0.5, 0.5, 1.5, 2.5]
    ).clip(0, NUM_CLASSES - 1)
    proba = np.clip(1 - np.abs(position[:, None] - np.arange(NUM_CLASSES)[None, :]), 0, 1)
    return proba / proba.sum(axis=1, keepdims=True)


class OrdinalForest(ClassifierMixin, BaseEstimator):
    """A forest regressor on the ordered phase with thresholds fitted on inner folds.

    ``fit(X, y, groups)`` needs the patients: the thresholds come from out-of-fold predictions on
    patient-grouped inner folds, so that they are set on scores like those of unseen patients.
    """

    def __init__(
        self, n_estimators=300, max_depth=None, min_samples_leaf=2, inner_folds=5, random_state=0
    ):
        self.n_estimators = n_estimators
        self.max_depth = max_depth
        self.min_samples_leaf = min_samples_leaf
        self.inner_folds = inner_folds
        self.random_state = random_state

    def _regressor(self) -> RandomForestRegressor:
        return RandomForestRegressor(
            n_estimators=self.n_estimators,
            max_depth=self.max_depth,
            min_samples_leaf=self.min_samples_leaf,
            max_features=1 / 3,  # the regression default of scikit-learn's forests
            random_state=self.random_state,
            n_jobs=-1,
        )

    def fit(self, X, y, groups=None):
        if groups is None:
            raise ValueError("OrdinalForest.fit needs groups (patients) for its inner folds")
        y = np.asarray(y, dtype=int)
        weights = compute_sample_weight("balanced", y)
        splits = inner_splits(y, np.asarray(groups), self.inner_folds, self.random_state)
        scores = cross_val_predict(
            self._regressor(), X, y, cv=splits, params={"sample_weight": weights}
        )
        self.thresholds_ = fit_thresholds(scores, y)
        self.regressor_ = self._regressor().fit(X, y, sample_weight=weights)
        self.classes_ = np.arange(NUM_CLASSES)
        return self

    def predict_proba(self, X) -> np.ndarray:
        return ordinal_proba(self.regressor_.predict(X), self.thresholds_)

    def predict(self, X) -> np.ndarray:
        return self.predict_proba(X).argmax(axis=1)


@dataclass(frozen=True)
class ClinicalModelSpec:
    """What defines the clinical model (config keys ``clinical_model``, ``rf_*`` and
    ``clinical_include_leak_suspect``)."""

    # The defaults are the configuration's (dfu_ml/config.py says why).
    model: str = Config.clinical_model
    n_estimators: int = Config.rf_n_estimators
    max_depth: int = Config.rf_max_depth  # 0 means unlimited
    min_samples_leaf: int = Config.rf_min_samples_leaf
    inner_folds: int = Config.rf_inner_folds
    include_leak_suspect: bool = Config.clinical_include_leak_suspect
    seed: int = 0

    @classmethod
    def from_config(cls, config) -> ClinicalModelSpec:
        return cls(
            model=config.clinical_model,
            n_estimators=config.rf_n_estimators,
            max_depth=config.rf_max_depth,
            min_samples_leaf=config.rf_min_samples_leaf,
            inner_folds=config.rf_inner_folds,
            include_leak_suspect=config.clinical_include_leak_suspect,
            seed=config.seed,
        )

    @property
    def columns(self) -> ClinicalColumns:
        return ClinicalColumns.for_policy(self.include_leak_suspect)

    def estimator(self):
        depth = self.max_depth or None
        if self.model == "forest":
            return RandomForestClassifier(
                n_estimators=self.n_estimators,
                max_depth=depth,
                min_samples_leaf=self.min_samples_leaf,
                class_weight="balanced",
                random_state=self.seed,
                n_jobs=-1,
            )
        if self.model == "boosting":
            return HistGradientBoostingClassifier(
                **BOOSTING_SETTINGS,
                max_depth=depth,
                class_weight="balanced",
                early_stopping=False,
                random_state=self.seed,
            )
        if self.model == "ordinal_forest":
            return OrdinalForest(
                self.n_estimators, depth, self.min_samples_leaf, self.inner_folds, self.seed
            )
        raise ValueError(f"unknown clinical model {self.model!r}; one of {CLINICAL_MODELS}")

    def pipeline(self) -> Pipeline:
        """The unfitted pipeline: clinical features, then the estimator. Boosting gets the
        features that vary in the training rows only: scikit-learn's gradient boosting cannot bin
        an all-missing column (the forests need no such step, and their number of candidate
        features per split stays fixed by the schema)."""
        steps = [("features", feature_pipeline(self.columns))]
        if self.model == "boosting":
            steps.append(("informative", DropUninformative()))
        return Pipeline([*steps, ("model", self.estimator())])

    def describe(self) -> dict:
        """The estimator and the columns it uses (summary.json)."""
        return {"model": self.model, "columns": self.columns.report()}

    def fit_params(self, visits: pd.DataFrame) -> dict:
        """What ``Pipeline.fit`` passes on besides X and y: the patients, where the estimator
        folds internally."""
        if self.model == "ordinal_forest":
            return {"model__groups": visits[PATIENT_COLUMN].to_numpy()}
        return {}


@dataclass
class ClinicalModel:
    """A fitted clinical pipeline (features and estimator, one object); predicts probabilities
    for all three classes, even one absent from the fit."""

    pipeline: Pipeline

    def predict_proba(self, visits: pd.DataFrame) -> np.ndarray:
        proba = np.zeros((len(visits), NUM_CLASSES))
        if len(visits):
            classes = np.asarray(self.pipeline.classes_).astype(int)
            proba[:, classes] = self.pipeline.predict_proba(visits)
        return proba

    @property
    def _select(self):
        return self.pipeline.named_steps["features"].named_steps["select"]

    @property
    def columns_used(self) -> list[str]:
        """The raw clinical columns that reach the estimator."""
        return [str(c) for c in self._select.get_feature_names_out()]

    @property
    def categories(self) -> dict[str, list[str]]:
        """The fixed category list of each text column used."""
        return dict(self._select.categories or {})

    @property
    def feature_names(self) -> list[str]:
        """The columns the estimator receives (``pipeline[:-1].transform``)."""
        return [str(c) for c in self.pipeline[:-1].get_feature_names_out()]


def fit_clinical_model(visits: pd.DataFrame, spec: ClinicalModelSpec) -> ClinicalModel:
    """Fit the features and the estimator on these (training) visits."""
    pipeline = spec.pipeline()
    pipeline.fit(visits, visits["label"].to_numpy(), **spec.fit_params(visits))
    return ClinicalModel(pipeline)


def grouped_out_of_fold_proba(
    estimator, visits: pd.DataFrame, labels: np.ndarray, folds: int, seed: int, params=None
) -> np.ndarray:
    """Out-of-fold probabilities of ``estimator`` (unfitted; it takes the visits frame) for each
    visit, on patient-grouped inner folds (:func:`inner_splits`): ``cross_val_predict`` refits the
    whole estimator per inner fold, features included. A column per class, even one absent from
    ``labels``."""
    labels = np.asarray(labels)
    splits = inner_splits(labels, visits[PATIENT_COLUMN].to_numpy(), folds, seed)
    proba = cross_val_predict(
        estimator, visits, labels, cv=splits, method="predict_proba", params=params
    )
    full = np.zeros((len(visits), NUM_CLASSES))
    full[:, np.unique(labels)] = proba  # columns follow the classes present in ``labels``
    return full


def out_of_fold_proba(visits: pd.DataFrame, spec: ClinicalModelSpec) -> np.ndarray:
    """Out-of-fold probabilities of the clinical pipeline for each (unique) training visit."""
    return grouped_out_of_fold_proba(
        spec.pipeline(),
        visits,
        visits["label"].to_numpy(),
        spec.inner_folds,
        spec.seed,
        spec.fit_params(visits),
    )


def clinical_probabilities(
    visits: pd.DataFrame,
    train_visits: np.ndarray,
    val_visits: np.ndarray,
    spec: ClinicalModelSpec,
    out_of_fold: bool = True,
) -> tuple[np.ndarray, ClinicalModel]:
    """Clinical-model probabilities for one fold.

    Returns ``(proba, model)``: ``proba`` has a row per visit in ``visits``; validation visits
    get ``model``'s (fitted on every training visit) probabilities; training visits get
    out-of-fold probabilities when ``out_of_fold`` (the fusion trains on them), else NaN, like
    visits on neither side.
    """
    train_visits = np.unique(train_visits)
    val_visits = np.unique(val_visits)
    proba = np.full((len(visits), NUM_CLASSES), np.nan)
    train_frame = visits.iloc[train_visits]
    if out_of_fold:
        proba[train_visits] = out_of_fold_proba(train_frame, spec)
    model = fit_clinical_model(train_frame, spec)
    if len(val_visits):
        proba[val_visits] = model.predict_proba(visits.iloc[val_visits])
    return proba, model


def save_clinical_model(model: ClinicalModel, folder: Path) -> Path:
    """Write the fitted pipeline (features and estimator) as one file."""
    import joblib

    from dfu_ml.bundle import CLINICAL_MODEL_FILE

    path = Path(folder) / CLINICAL_MODEL_FILE
    joblib.dump(model.pipeline, path)
    return path
