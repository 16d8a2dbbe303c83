"""The clinical model: one fitted pipeline, nothing fitted on validation rows, missing values
reach the model as missing, excluded columns never reach it, out-of-fold training probabilities
only where a fusion uses them, every model selectable, and a check on the real clinical data."""

import dataclasses

import numpy as np
import pandas as pd
import pytest
from fixtures_data import REAL_DEV, with_permuted_labels
from sklearn.model_selection import KFold

from dfu_ml.config import load_config
from dfu_ml.data import schema
from dfu_ml.data.schema import PATIENT_COLUMN
from dfu_ml.training import clinical_rf
from dfu_ml.training.clinical_rf import (
    ClinicalModelSpec,
    OrdinalForest,
    clinical_probabilities,
    fit_clinical_model,
    fit_thresholds,
    inner_splits,
    ordinal_proba,
    out_of_fold_proba,
)
from dfu_ml.training.fold import fold_predictions, fold_rf, plan_fold, training_rows
from dfu_ml.training.metrics import quadratic_kappa

FEATURES = schema.NUMERIC_FEATURE_COLUMNS[:8]
SPEC = ClinicalModelSpec(n_estimators=40, inner_folds=3, seed=0)


def random_visits(
    patients: int, visits_per_patient: int, seed: int, duplicate_within_patient: bool = False
) -> pd.DataFrame:
    """Visits with random features and random labels (no signal). With
    ``duplicate_within_patient`` every visit of a patient is an exact copy (same features, same
    label), so any leakage of a patient across an inner split makes the OOF prediction perfect."""
    rng = np.random.default_rng(seed)
    rows = []
    for p in range(patients):
        shared = rng.normal(size=len(FEATURES))
        label = int(rng.integers(0, 3))
        for _ in range(visits_per_patient):
            values = shared if duplicate_within_patient else rng.normal(size=len(FEATURES))
            rows.append(
                {
                    PATIENT_COLUMN: p + 1,
                    "label": label if duplicate_within_patient else int(rng.integers(0, 3)),
                    **dict(zip(FEATURES, values)),
                }
            )
    return pd.DataFrame(rows)


def true_class_mean(proba: np.ndarray, labels: np.ndarray) -> float:
    return float(proba[np.arange(len(labels)), labels].mean())


def test_training_rows_get_out_of_fold_not_in_sample_probabilities():
    visits = random_visits(patients=40, visits_per_patient=3, seed=0)
    labels = visits["label"].to_numpy()
    train = np.arange(0, 90)
    val = np.arange(90, 120)
    proba, model = clinical_probabilities(
        visits, train, val, dataclasses.replace(SPEC, n_estimators=60, min_samples_leaf=1)
    )
    assert not np.isnan(proba).any()
    np.testing.assert_allclose(proba.sum(axis=1), 1.0, atol=1e-6)
    in_sample = true_class_mean(model.predict_proba(visits.iloc[train]), labels[train])
    given = true_class_mean(proba[train], labels[train])
    # Random labels: a forest with 1-row leaves memorises its training rows, but cannot predict
    # held-out ones.
    assert in_sample > 0.6
    assert given < 0.45
    assert in_sample - given > 0.25
    # Validation rows come from the model fitted on every training visit.
    np.testing.assert_allclose(proba[val], model.predict_proba(visits.iloc[val]))


def test_without_out_of_fold_training_rows_are_left_empty(monkeypatch):
    """Nothing uses training-row probabilities in a metadata-only run: no inner models."""
    visits = random_visits(patients=20, visits_per_patient=3, seed=1)
    calls = []
    monkeypatch.setattr(clinical_rf, "out_of_fold_proba", lambda *a: calls.append(a))
    proba, _ = clinical_probabilities(visits, np.arange(45), np.arange(45, 60), SPEC, False)
    assert calls == []
    assert np.isnan(proba[:45]).all() and not np.isnan(proba[45:]).any()


def test_out_of_fold_matches_clinical_probabilities_for_training_rows():
    visits = random_visits(patients=20, visits_per_patient=3, seed=1)
    train = np.arange(0, 45)
    proba, _ = clinical_probabilities(visits, train, np.arange(45, 60), SPEC)
    np.testing.assert_allclose(proba[train], out_of_fold_proba(visits.iloc[train], SPEC))


def test_inner_cv_is_grouped_by_patient():
    """Duplicated visits: with a patient's copies on both sides of an inner split the OOF
    prediction would be (near) perfect; grouped, it is at chance level."""
    visits = random_visits(patients=30, visits_per_patient=4, seed=2, duplicate_within_patient=True)
    labels = visits["label"].to_numpy()
    patients = visits[PATIENT_COLUMN].to_numpy()
    spec = dataclasses.replace(SPEC, inner_folds=5)

    splits = inner_splits(labels, patients, spec.inner_folds, spec.seed)
    assert len(splits) == 5
    held = np.concatenate([held for _, held in splits])
    assert sorted(held.tolist()) == list(range(len(visits)))  # every visit held out once
    for inner_train, inner_held in splits:
        assert not set(patients[inner_train]) & set(patients[inner_held])

    oof = out_of_fold_proba(visits, spec)
    assert float((oof.argmax(1) == labels).mean()) < 0.6

    # Control: the same models on ungrouped splits are near perfect (so the test can fail).
    leaky = np.zeros_like(oof)
    for tr, ho in KFold(5, shuffle=True, random_state=0).split(visits):
        leaky[ho] = fit_clinical_model(visits.iloc[tr], spec).predict_proba(visits.iloc[ho])
    assert float((leaky.argmax(1) == labels).mean()) > 0.9


def _metadata_cv_kappas(dataset, config) -> list[float]:
    kappas = []
    for fold in range(config.cv_folds):
        plan = plan_fold(dataset, config, fold)
        rf_proba, _ = fold_rf(dataset, config, plan)
        kappas.append(
            fold_predictions(dataset, config, plan, rf_proba)["metrics"]["per_visit"][
                "quadratic_kappa"
            ]
        )
    return kappas


def _seen_all_kappas(dataset, config) -> list[float]:
    """Control: a model fitted on every visit, validation visits included, scored on them."""
    rows = training_rows(dataset, config)
    visits = dataset.visits
    model = fit_clinical_model(visits, ClinicalModelSpec.from_config(config))
    kappas = []
    for fold in range(config.cv_folds):
        val = rows["visit_index"].to_numpy()[plan_fold(dataset, config, fold)["val_rows"]]
        predicted = model.predict_proba(visits.iloc[val]).argmax(1)
        kappas.append(quadratic_kappa(visits["label"].to_numpy()[val], predicted))
    return kappas


def test_shuffled_labels_give_chance_level_validation_kappa(prepared_synthetic):
    """Leak test: with permuted visit labels nothing can be learned, so the validation kappa of
    plan_fold + fold_rf stays near 0; a model that had seen the validation visits scores high
    (checked as a control)."""
    honest, leaky = [], []
    for seed in range(4):
        dataset = with_permuted_labels(prepared_synthetic, seed)
        config = load_config("smoke", ["modalities=metadata", f"seed={seed}", "rf_n_estimators=40"])
        honest.extend(_metadata_cv_kappas(dataset, config))
        if seed == 0:
            leaky.extend(_seen_all_kappas(dataset, config))
    assert abs(float(np.mean(honest))) < 0.2, honest
    assert float(np.mean(leaky)) > 0.5, leaky


def test_pure_noise_features_gain_nothing(prepared_synthetic):
    """Every clinical feature replaced by pure noise (the labels kept): validation kappa stays
    near 0, while a model fitted on the validation visits too scores high on that noise."""
    rng = np.random.default_rng(7)
    visits = prepared_synthetic.visits.copy()
    columns = ClinicalModelSpec().columns
    for column in columns.numeric:
        visits[column] = rng.normal(size=len(visits))
    for column in columns.ordinal + columns.nominal:
        visits[column] = np.nan
    dataset = dataclasses.replace(prepared_synthetic, visits=visits)
    honest, leaky = [], []
    for seed in range(3):
        config = load_config("smoke", ["modalities=metadata", f"seed={seed}", "rf_n_estimators=40"])
        honest.extend(_metadata_cv_kappas(dataset, config))
        leaky.extend(_seen_all_kappas(dataset, config))
    assert abs(float(np.mean(honest))) < 0.2, honest
    assert float(np.mean(leaky)) > 0.5, leaky


def test_validation_patients_never_reach_the_model(prepared_synthetic, monkeypatch):
    """Every fit, inner ones included (an image run's fold), sees training patients only."""
    config = load_config("smoke", ["rf_n_estimators=10"])
    plan = plan_fold(prepared_synthetic, config, 1)
    seen = []
    real_fit = clinical_rf.Pipeline.fit

    def recording_fit(self, X, *args, **kwargs):
        seen.append(set(X[PATIENT_COLUMN]))
        return real_fit(self, X, *args, **kwargs)

    monkeypatch.setattr(clinical_rf.Pipeline, "fit", recording_fit)
    fold_rf(prepared_synthetic, config, plan)
    assert len(seen) == config.rf_inner_folds + 1
    for patients in seen:
        assert patients <= set(plan["train_patients"])
        assert not patients & set(plan["val_patients"])


def test_metadata_only_fold_fits_one_model(prepared_synthetic, monkeypatch):
    calls = []
    real = clinical_rf.cross_val_predict
    monkeypatch.setattr(
        clinical_rf, "cross_val_predict", lambda *a, **k: calls.append(1) or real(*a, **k)
    )
    for modalities, inner in (
        ("metadata", 0),
        ("depth_rgb,thermal_map", 0),
        ("metadata,depth_rgb", 1),
    ):
        calls.clear()
        config = load_config("smoke", [f"modalities={modalities}", "rf_n_estimators=10"])
        plan = plan_fold(prepared_synthetic, config, 0)
        proba, _ = fold_rf(prepared_synthetic, config, plan)
        train_visits = training_rows(prepared_synthetic, config)["visit_index"].to_numpy()[
            plan["train_rows"]
        ]
        assert len(calls) == inner, modalities
        assert np.isnan(proba[train_visits]).all() != bool(inner), modalities


def _informative_missingness(n: int = 240, seed: int = 0) -> pd.DataFrame:
    """Visits whose only signal is whether Exudate Appearance is missing (then R), the way the
    real data carries it; present values say nothing."""
    rng = np.random.default_rng(seed)
    labels = rng.choice(3, size=n, p=[0.35, 0.45, 0.2])
    appearance = rng.choice(["Serous", "Haemoserous", "Bloody"], size=n).astype(object)
    appearance[labels == 2] = None
    frame = pd.DataFrame(
        {
            PATIENT_COLUMN: np.arange(n) // 2,
            "label": labels,
            schema.EXUDATE_APPEARANCE: appearance,
            schema.WOUND_TEMP: rng.normal(30, 1, n),
        }
    )
    frame.loc[labels == 2, schema.WOUND_TEMP] = np.nan
    return frame


@pytest.mark.parametrize("model", ["forest", "boosting", "ordinal_forest"])
def test_missing_values_reach_the_model_as_missing(model):
    """Every model reads missingness itself: rows with the informative missing values are
    predicted R; filled with the training median (what imputation did) they would not be."""
    train, new = _informative_missingness(seed=0), _informative_missingness(seed=1)
    fitted = fit_clinical_model(train, dataclasses.replace(SPEC, model=model))
    received = fitted.pipeline[:-1].transform(new)  # what the estimator gets
    names = fitted.feature_names
    missing = new["label"].to_numpy() == 2
    assert np.isnan(received[missing, names.index(schema.EXUDATE_APPEARANCE)]).all()
    assert np.isnan(received[missing, names.index(schema.WOUND_TEMP)]).all()
    assert (fitted.predict_proba(new)[missing].argmax(1) == 2).mean() > 0.9
    imputed = new.copy()
    imputed[schema.EXUDATE_APPEARANCE] = imputed[schema.EXUDATE_APPEARANCE].fillna("Haemoserous")
    imputed[schema.WOUND_TEMP] = imputed[schema.WOUND_TEMP].fillna(
        train[schema.WOUND_TEMP].median()
    )
    assert (fitted.predict_proba(imputed)[missing].argmax(1) == 2).mean() < 0.5


def test_excluded_columns_never_reach_the_model(prepared_synthetic):
    """A leak-suspect column that gives the label away changes nothing by default; brought back
    by the config key, it does (the control)."""
    visits = prepared_synthetic.visits.copy()
    dressing = np.array(["Antiseptic", "AbsorbentDressing", "NoDressing"])
    visits["Dressing Grouped"] = dressing[visits["label"].to_numpy()]
    for column in (*schema.IDENTIFIER_COLUMNS[1:], *schema.LABEL_DERIVED_COLUMNS):
        assert column in visits
    dataset = dataclasses.replace(prepared_synthetic, visits=visits)
    base = ["modalities=metadata", "rf_n_estimators=40"]
    for include, check in ((False, lambda k: k < 0.9), (True, lambda k: k > 0.95)):
        config = load_config("smoke", [*base, f"clinical_include_leak_suspect={include}"])
        kappas = _metadata_cv_kappas(dataset, config)
        assert check(float(np.mean(kappas))), (include, kappas)
    model = fit_clinical_model(visits, ClinicalModelSpec())
    never = {*schema.IDENTIFIER_COLUMNS, *schema.LEAK_SUSPECT_COLUMNS, *schema.FREE_TEXT_COLUMNS}
    assert not set(model.columns_used) & never
    # Changing an excluded column changes no prediction.
    scrambled = visits.assign(
        **{"Dressing Grouped": dressing[::-1][visits["label"].to_numpy()], "Patient#": 0}
    )
    np.testing.assert_allclose(
        model.predict_proba(visits), model.predict_proba(scrambled), rtol=0, atol=1e-12
    )  # (tree votes are summed in parallel: only the last bit may differ)


def test_ordinal_thresholds_and_probabilities():
    scores = np.array([0.1, 0.2, 0.9, 1.1, 1.8, 1.9])
    labels = np.array([0, 0, 1, 1, 2, 2])
    low, high = fit_thresholds(scores, labels)
    assert 0.2 <= low < 0.9 and 1.1 <= high < 1.8
    proba = ordinal_proba(np.array([low - 1, (low + high) / 2, high + 1]), (low, high))
    np.testing.assert_allclose(proba.sum(1), 1.0)
    assert proba.argmax(1).tolist() == [0, 1, 2]
    assert np.digitize(scores, [low, high]).tolist() == labels.tolist()
    with pytest.raises(ValueError, match="groups"):
        OrdinalForest(n_estimators=5).fit(np.zeros((6, 1)), labels)


@pytest.mark.parametrize("model", ["boosting", "ordinal_forest"])
def test_every_clinical_model_learns_the_synthetic_signal(prepared_synthetic, model):
    """Selectable by config key, and learning: clearly above the same model on shuffled labels
    (the small synthetic set is hard on boosting's 20-row leaves)."""
    config = load_config("smoke", ["modalities=metadata", f"clinical_model={model}"])
    learned = float(np.mean(_metadata_cv_kappas(prepared_synthetic, config)))
    shuffled = float(
        np.mean(_metadata_cv_kappas(with_permuted_labels(prepared_synthetic, 0), config))
    )
    assert learned > 0.2 and learned > shuffled + 0.15, (learned, shuffled)


@pytest.mark.skipif(
    not (REAL_DEV / "DataMaster_Processed_V12_WithMissing.csv").is_file(),
    reason=f"the real clinical dev data is not at {REAL_DEV}",
)
def test_real_clinical_metadata_cv_is_above_chance():
    """Metadata-only 2-fold patient CV on the real clinical CSV (no images needed): the clinical
    columns carry signal, so quadratic kappa is clearly above chance."""
    from dfu_ml.data.prepare import prepare_dataset

    dataset = prepare_dataset(REAL_DEV, modalities=[])
    assert dataset.meta["report"]["labelled_visits"] > 500
    config = load_config("paper", ["modalities=metadata", "cv_folds=2", "rf_n_estimators=60"])
    kappas = _metadata_cv_kappas(dataset, config)
    assert len(kappas) == 2
    assert float(np.mean(kappas)) > 0.2, kappas
