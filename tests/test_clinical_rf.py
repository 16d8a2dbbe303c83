"""The clinical random forest: out-of-fold training probabilities, grouped inner CV, no leakage,
and a sanity check on the real clinical data."""

import numpy as np
import pandas as pd
import pytest
from sklearn.model_selection import KFold

from dfu_ml.config import load_config
from dfu_ml.data.schema import NUMERIC_FEATURE_COLUMNS, PATIENT_COLUMN
from dfu_ml.training import clinical_rf
from dfu_ml.training.clinical_rf import (
    clinical_rf_probabilities,
    fit_clinical_forest,
    out_of_fold_proba,
)
from dfu_ml.training.fold import fold_predictions, fold_rf, plan_fold, training_rows
from dfu_ml.training.metrics import quadratic_kappa
from fixtures_data import REAL_DEV, with_permuted_labels

FEATURES = NUMERIC_FEATURE_COLUMNS[:8]


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
    proba, forest = clinical_rf_probabilities(
        visits, train, val, inner_folds=3, n_estimators=60, seed=0
    )
    assert not np.isnan(proba).any()
    np.testing.assert_allclose(proba.sum(axis=1), 1.0, atol=1e-6)
    in_sample = true_class_mean(forest.predict_proba(visits.iloc[train]), labels[train])
    given = true_class_mean(proba[train], labels[train])
    # Random labels: a forest memorises its training rows, but cannot predict held-out ones.
    assert in_sample > 0.6
    assert given < 0.45
    assert in_sample - given > 0.25
    # Validation rows come from the forest fitted on every training visit.
    np.testing.assert_allclose(proba[val], forest.predict_proba(visits.iloc[val]))


def test_out_of_fold_matches_clinical_rf_probabilities_for_training_rows():
    visits = random_visits(patients=20, visits_per_patient=3, seed=1)
    train = np.arange(0, 45)
    proba, _ = clinical_rf_probabilities(
        visits, train, np.arange(45, 60), inner_folds=3, n_estimators=20, seed=4
    )
    oof = out_of_fold_proba(visits.iloc[train], inner_folds=3, n_estimators=20, seed=4)
    np.testing.assert_allclose(proba[train], oof)


def test_inner_cv_is_grouped_by_patient(monkeypatch):
    """Duplicated visits: with a patient's copies on both sides of an inner split the OOF
    prediction would be (near) perfect; grouped, it is at chance level."""
    visits = random_visits(patients=30, visits_per_patient=4, seed=2, duplicate_within_patient=True)
    labels = visits["label"].to_numpy()

    fitted_patients = []
    real_fit = clinical_rf.fit_clinical_forest

    def recording_fit(frame, *args, **kwargs):
        fitted_patients.append(set(frame[PATIENT_COLUMN]))
        return real_fit(frame, *args, **kwargs)

    monkeypatch.setattr(clinical_rf, "fit_clinical_forest", recording_fit)
    oof = out_of_fold_proba(visits, inner_folds=5, n_estimators=40, seed=0)
    monkeypatch.undo()

    assert len(fitted_patients) == 5
    all_patients = set(visits[PATIENT_COLUMN])
    for inner_train in fitted_patients:
        held_out = all_patients - inner_train
        assert held_out, "every inner fold holds some patients out"
    # Every patient is held out exactly once, i.e. never in the inner training side with itself.
    held_counts = {p: sum(p not in s for s in fitted_patients) for p in all_patients}
    assert set(held_counts.values()) == {1}

    grouped_accuracy = float((oof.argmax(1) == labels).mean())
    assert grouped_accuracy < 0.6

    # Control: the same forests on ungrouped splits are near perfect (so the test can fail).
    leaky = np.zeros_like(oof)
    for tr, ho in KFold(5, shuffle=True, random_state=0).split(visits):
        model = fit_clinical_forest(visits.iloc[tr], n_estimators=40, seed=0)
        leaky[ho] = model.predict_proba(visits.iloc[ho])
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


def test_shuffled_labels_give_chance_level_validation_kappa(prepared_synthetic):
    """Leak test: with permuted visit labels nothing can be learned, so the validation kappa of
    plan_fold + fold_rf stays near 0; a forest that had seen the validation visits would score
    high (checked as a control)."""
    honest, leaky = [], []
    for seed in range(4):
        dataset = with_permuted_labels(prepared_synthetic, seed)
        config = load_config(
            "smoke",
            ["modalities=metadata", f"seed={seed}", "rf_n_estimators=40", "rf_inner_folds=2"],
        )
        honest.extend(_metadata_cv_kappas(dataset, config))
        if seed == 0:
            rows = training_rows(dataset, config)
            visits = dataset.visits
            for fold in range(config.cv_folds):
                plan = plan_fold(dataset, config, fold)
                val = rows["visit_index"].to_numpy()[plan["val_rows"]]
                seen_all = fit_clinical_forest(visits, n_estimators=40, seed=seed)
                predicted = seen_all.predict_proba(visits.iloc[val]).argmax(1)
                leaky.append(quadratic_kappa(visits["label"].to_numpy()[val], predicted))
    assert abs(float(np.mean(honest))) < 0.2, honest
    assert float(np.mean(leaky)) > 0.5, leaky


def test_validation_patients_never_reach_the_forest(prepared_synthetic, monkeypatch):
    config = load_config("smoke", ["modalities=metadata", "rf_n_estimators=10", "rf_inner_folds=2"])
    plan = plan_fold(prepared_synthetic, config, 1)
    seen = []
    real_fit = clinical_rf.fit_clinical_forest

    def recording_fit(frame, *args, **kwargs):
        seen.append(set(frame[PATIENT_COLUMN]))
        return real_fit(frame, *args, **kwargs)

    monkeypatch.setattr(clinical_rf, "fit_clinical_forest", recording_fit)
    fold_rf(prepared_synthetic, config, plan)
    assert len(seen) == config.rf_inner_folds + 1
    for patients in seen:
        assert patients <= set(plan["train_patients"])
        assert not patients & set(plan["val_patients"])


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
    config = load_config(
        "paper", ["modalities=metadata", "cv_folds=2", "rf_n_estimators=60", "rf_inner_folds=2"]
    )
    kappas = _metadata_cv_kappas(dataset, config)
    assert len(kappas) == 2
    assert float(np.mean(kappas)) > 0.15, kappas
