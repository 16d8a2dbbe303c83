"""Further clinical-model candidates for ``bench/real_metadata_cv.py`` (``--variants further``):
the ideas tried after the default was chosen, to see whether anything principled lifts the
metadata-only kappa. None is part of the product; docs/RESULTS.md reports what each measured.

Every candidate is built from the real pipeline (``ClinicalModelSpec``, ``feature_pipeline``) and
fitted on a fold's training visits only; anything chosen inside a fit (a leaf size, a penalty,
class multipliers) is chosen on inner folds of those training visits, grouped by patient
(``grouped_out_of_fold_proba``), never on the validation visits. The estimators take the visits
frame, so they can read the patients for their inner folds.
"""

from __future__ import annotations

import itertools

import numpy as np
import pandas as pd
from sklearn.base import BaseEstimator, ClassifierMixin, TransformerMixin, clone
from sklearn.ensemble import ExtraTreesClassifier
from sklearn.impute import MissingIndicator, SimpleImputer
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import FeatureUnion, Pipeline
from sklearn.preprocessing import FunctionTransformer, OrdinalEncoder, StandardScaler
from sklearn.tree import DecisionTreeClassifier
from sklearn.utils.class_weight import compute_sample_weight

from dfu_ml.data import schema
from dfu_ml.data.schema import NUM_CLASSES, PATIENT_COLUMN
from dfu_ml.features import feature_pipeline
from dfu_ml.training.clinical_rf import (
    ClinicalModel,
    DropUninformative,
    grouped_out_of_fold_proba,
)
from dfu_ml.training.metrics import quadratic_kappa

CLASSES = np.arange(NUM_CLASSES)


def _full_proba(model, X) -> np.ndarray:
    """predict_proba with a column for every class (the clinical model's own rule)."""
    return ClinicalModel(model).predict_proba(X)


class InnerChoice(ClassifierMixin, BaseEstimator):
    """Of ``candidates`` (unfitted pipelines), the one whose inner out-of-fold quadratic kappa is
    highest, refitted on every training visit. ``inner_params`` are set on the candidates for the
    inner fits only (fewer trees: the choice, not the final model, is what they serve)."""

    def __init__(self, candidates=(), inner_params=None, folds=5, seed=0):
        self.candidates = candidates
        self.inner_params = inner_params
        self.folds = folds
        self.seed = seed

    def fit(self, visits, y):
        y = np.asarray(y, dtype=int)
        self.scores_ = []
        for candidate in self.candidates:
            inner = clone(candidate).set_params(**(self.inner_params or {}))
            proba = grouped_out_of_fold_proba(inner, visits, y, self.folds, self.seed)
            self.scores_.append(quadratic_kappa(y, proba.argmax(axis=1)))
        self.chosen_ = int(np.argmax(self.scores_))
        self.model_ = clone(self.candidates[self.chosen_]).fit(visits, y)
        self.classes_ = CLASSES
        return self

    def predict_proba(self, visits):
        return _full_proba(self.model_, visits)


class InnerClassScale(ClassifierMixin, BaseEstimator):
    """The pipeline's probabilities times class multipliers (I and R against P, from a grid of
    ``exp(-1..1)``) chosen on inner out-of-fold probabilities to maximise quadratic kappa: a
    decision rule fitted on the training visits instead of the plain argmax."""

    GRID = np.exp(np.linspace(-1.0, 1.0, 9))

    def __init__(self, pipeline=None, folds=5, seed=0):
        self.pipeline = pipeline
        self.folds = folds
        self.seed = seed

    def fit(self, visits, y):
        y = np.asarray(y, dtype=int)
        proba = grouped_out_of_fold_proba(clone(self.pipeline), visits, y, self.folds, self.seed)
        best = -np.inf
        for low, high in itertools.product(self.GRID, self.GRID):
            scale = np.array([low, 1.0, high])
            kappa = quadratic_kappa(y, (proba * scale).argmax(axis=1))
            if kappa > best:
                best, self.scale_ = kappa, scale
        self.model_ = clone(self.pipeline).fit(visits, y)
        self.classes_ = CLASSES
        return self

    def predict_proba(self, visits):
        proba = _full_proba(self.model_, visits) * self.scale_
        return proba / proba.sum(axis=1, keepdims=True)


class Averaged(ClassifierMixin, BaseEstimator):
    """The mean of several pipelines' probabilities (a soft vote)."""

    def __init__(self, members=()):
        self.members = members

    def fit(self, visits, y):
        self.models_ = [clone(m).fit(visits, y) for m in self.members]
        self.classes_ = CLASSES
        return self

    def predict_proba(self, visits):
        return np.mean([_full_proba(m, visits) for m in self.models_], axis=0)


class FrankHall(ClassifierMixin, BaseEstimator):
    """Ordinal classification after Frank and Hall: one binary model per cut (phase > I, phase >
    P), class probabilities from the differences of their probabilities."""

    def __init__(self, base=None):
        self.base = base

    def fit(self, X, y):
        y = np.asarray(y, dtype=int)
        self.models_ = [clone(self.base).fit(X, (y > k).astype(int)) for k in (0, 1)]
        self.classes_ = CLASSES
        return self

    def predict_proba(self, X):
        above_i, above_p = (m.predict_proba(X)[:, -1] for m in self.models_)
        proba = np.clip(np.stack([1 - above_i, above_i - above_p, above_p], axis=1), 0, None)
        return proba / np.maximum(proba.sum(axis=1, keepdims=True), 1e-12)


def _fit_tree(X, y, weight, seed, min_samples_leaf):
    keep = weight > 0
    tree = DecisionTreeClassifier(
        max_features="sqrt", min_samples_leaf=min_samples_leaf, random_state=seed
    )
    return tree.fit(X[keep], y[keep], sample_weight=weight[keep])


def patient_bootstrap_weights(patients: np.ndarray, y: np.ndarray, trees: int, seed: int) -> list:
    """``(visit weights, tree seed)`` per tree: a bootstrap of patients (each visit weighted by its
    patient's draw count, so a patient's visits are in or out of a tree together) times the
    balanced class weights."""
    unique, patient_of_visit = np.unique(patients, return_inverse=True)
    class_weight = compute_sample_weight("balanced", y)
    rng = np.random.default_rng(seed)
    draws = []
    for _ in range(trees):
        counts = np.bincount(rng.integers(0, len(unique), len(unique)), minlength=len(unique))
        draws.append((counts[patient_of_visit] * class_weight, int(rng.integers(2**31))))
    return draws


class PatientBootstrapForest(ClassifierMixin, BaseEstimator):
    """A random forest whose bootstrap draws patients, not visits (the patient is the independent
    unit: a visit-level bootstrap puts a patient's visits both in and out of a tree's sample),
    with balanced class weights, on the real clinical features."""

    def __init__(self, columns=None, n_estimators=1000, min_samples_leaf=5, seed=0):
        self.columns = columns
        self.n_estimators = n_estimators
        self.min_samples_leaf = min_samples_leaf
        self.seed = seed

    def fit(self, visits, y):
        from joblib import Parallel, delayed

        y = np.asarray(y, dtype=int)
        self.features_ = feature_pipeline(self.columns).fit(visits, y)
        X = np.asarray(self.features_.transform(visits), dtype=float)
        draws = patient_bootstrap_weights(
            visits[PATIENT_COLUMN].to_numpy(), y, self.n_estimators, self.seed
        )
        self.trees_ = Parallel(n_jobs=-1)(
            delayed(_fit_tree)(X, y, weight, seed, self.min_samples_leaf) for weight, seed in draws
        )
        self.classes_ = CLASSES
        return self

    def predict_proba(self, visits):
        X = np.asarray(self.features_.transform(visits), dtype=float)
        return np.mean([_full_proba(tree, X) for tree in self.trees_], axis=0)


# Wound measurements whose change since the ulcer's previous visit ``UlcerHistory`` adds.
HISTORY_COLUMNS = (
    schema.WOUND_TEMP,
    schema.PERI_TEMP,
    schema.WOUND_TEMP_NORM,
    schema.PERI_TEMP_NORM,
    schema.WOUND_SCORE,
    schema.EXUDATE_AMOUNT,
    "Pain Level",
    "Wound Tunneling",
    "Erythema at Peri-ulcer",
    "Edema at Peri-ulcer",
    "Maceration at Peri-ulcer",
)


class _FeaturesPlus(TransformerMixin, BaseEstimator):
    """The clinical features (``features``, fitted on the training visits) followed by the columns
    that ``added(visits)`` computes from the visits frame."""

    def fit(self, visits, y=None):
        self.features_ = clone(self.features).fit(visits, y)
        return self

    def transform(self, visits):
        features = np.asarray(self.features_.transform(visits), dtype=float)
        return np.hstack([features, self.added(visits)])


class UlcerHistory(_FeaturesPlus):
    """The clinical features plus what the ulcer's earlier visits say: days since its previous
    visit, the visit's number in the ulcer's series, and (``changes``) the change of each wound
    measurement since the previous visit. Only earlier visits of the same ulcer (patient, DFU#,
    ordered by Appt Days) are read, never later ones and never a label."""

    def __init__(self, features=None, changes=True):
        self.features = features
        self.changes = changes

    def added(self, visits) -> np.ndarray:
        key = [PATIENT_COLUMN, schema.DFU_COLUMN]
        order = visits.assign(_row=np.arange(len(visits))).sort_values(
            [*key, "Appt Days", schema.APPT_COLUMN, "_row"]
        )
        ulcer = [order[k] for k in key]

        def since_previous(column):
            value = pd.to_numeric(order[column], errors="coerce")
            return value - value.groupby(ulcer).shift(1)

        history = {
            "days_since_previous_visit": since_previous("Appt Days"),
            "visit_number_of_ulcer": order.groupby(ulcer).cumcount().astype(float),
        }
        for column in HISTORY_COLUMNS if self.changes else ():
            history[f"{column} change"] = since_previous(column)
        return pd.DataFrame(history, index=order.index).loc[visits.index].to_numpy(dtype=float)


class WoundMinusPeri(_FeaturesPlus):
    """The clinical features plus the wound centre's temperature minus the peri-ulcer's."""

    def __init__(self, features=None):
        self.features = features

    def added(self, visits) -> np.ndarray:
        wound, peri = (
            pd.to_numeric(visits[c], errors="coerce").to_numpy(dtype=float)
            for c in (schema.WOUND_TEMP, schema.PERI_TEMP)
        )
        return (wound - peri)[:, None]


def _with_features(spec, features):
    pipeline = spec.pipeline()
    pipeline.steps[0] = ("features", features)
    return pipeline


def _after_features(spec, step):
    pipeline = spec.pipeline()
    pipeline.steps.insert(1, ("represent", step))
    return pipeline


def _nominal_as_codes(spec):
    """Nominal text as one column of category codes each (fewer, denser columns than one-hot)."""
    pipeline = spec.pipeline()
    encode = pipeline.named_steps["features"].named_steps["encode"]
    columns = spec.columns
    codes = OrdinalEncoder(
        categories=[list(columns.categories[c]) for c in columns.nominal],
        handle_unknown="use_encoded_value",
        unknown_value=np.nan,
        encoded_missing_value=np.nan,
        dtype=float,
    )
    encode.transformers = [
        (name, codes, cols) if name == "nominal" else (name, step, cols)
        for name, step, cols in encode.transformers
    ]
    return pipeline


def _logistic(spec, C):
    """Balanced logistic regression: median imputation with missing indicators, scaling."""
    return Pipeline(
        [
            ("features", feature_pipeline(spec.columns)),
            ("informative", DropUninformative()),
            ("impute", SimpleImputer(strategy="median", add_indicator=True)),
            ("scale", StandardScaler()),
            ("model", LogisticRegression(C=C, class_weight="balanced", max_iter=5000)),
        ]
    )


def _logistic_inner_c(spec):
    candidates = [_logistic(spec, C) for C in (0.01, 0.03, 0.1, 0.3, 1.0)]
    return InnerChoice(candidates, folds=spec.inner_folds, seed=spec.seed)


def _extra_trees(spec):
    pipeline = spec.pipeline()
    pipeline.steps[-1] = (
        "model",
        ExtraTreesClassifier(
            n_estimators=spec.n_estimators,
            min_samples_leaf=spec.min_samples_leaf,
            class_weight="balanced",
            random_state=spec.seed,
            n_jobs=-1,
        ),
    )
    return pipeline


INNER_LEAVES = (2, 3, 5, 10)

# name -> pipeline factory (ClinicalModelSpec -> unfitted estimator taking the visits frame).
CANDIDATES = {
    "forest_inner_leaf": lambda spec: InnerChoice(
        [spec.pipeline().set_params(model__min_samples_leaf=n) for n in INNER_LEAVES],
        {"model__n_estimators": 300},
        spec.inner_folds,
        spec.seed,
    ),
    "forest_inner_class_scale": lambda spec: InnerClassScale(
        spec.pipeline(), spec.inner_folds, spec.seed
    ),
    "forest_ulcer_history": lambda spec: _with_features(
        spec, UlcerHistory(feature_pipeline(spec.columns))
    ),
    "forest_ulcer_order": lambda spec: _with_features(
        spec, UlcerHistory(feature_pipeline(spec.columns), changes=False)
    ),
    "forest_patient_bootstrap": lambda spec: PatientBootstrapForest(
        spec.columns, spec.n_estimators, spec.min_samples_leaf, spec.seed
    ),
    "forest_frank_hall": lambda spec: spec.pipeline().set_params(model=FrankHall(spec.estimator())),
    "forest_out_of_range": lambda spec: _after_features(
        spec, SimpleImputer(strategy="constant", fill_value=-1e3, keep_empty_features=True)
    ),
    "forest_missing_indicators": lambda spec: _after_features(
        spec,
        FeatureUnion(
            [
                ("values", FunctionTransformer()),
                ("missing", MissingIndicator(features="missing-only", error_on_new=False)),
            ]
        ),
    ),
    "forest_nominal_codes": _nominal_as_codes,
    "forest_wound_minus_peri": lambda spec: _with_features(
        spec, WoundMinusPeri(feature_pipeline(spec.columns))
    ),
    "forest_plus_extra_trees": lambda spec: Averaged([spec.pipeline(), _extra_trees(spec)]),
    "logistic_inner_c": _logistic_inner_c,
    "forest_plus_logistic": lambda spec: Averaged([spec.pipeline(), _logistic_inner_c(spec)]),
}
