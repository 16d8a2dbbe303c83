"""The later clinical-model candidates of the metadata bench (bench/clinical_candidates.py): what
docs/RESULTS.md says of them holds. The ulcer-history features read earlier visits only, the
patient bootstrap keeps a patient's visits together, inner choices are made on the training visits
by inner kappa, and every candidate fits and predicts three-class probabilities."""

import sys

import numpy as np
import pytest
from fixtures_data import REPO

from dfu_ml.data import schema
from dfu_ml.data.schema import PATIENT_COLUMN
from dfu_ml.features import feature_pipeline
from dfu_ml.training.clinical_rf import ClinicalModelSpec

sys.path.insert(0, str(REPO / "bench"))
import clinical_candidates as cc  # noqa: E402

SPEC = ClinicalModelSpec(n_estimators=20, inner_folds=3, seed=0)


def _history(visits):
    """The columns UlcerHistory adds: gap, visit number, then one change per history column."""
    added = 2 + len(cc.HISTORY_COLUMNS)
    return cc.UlcerHistory(feature_pipeline(SPEC.columns)).fit(visits).transform(visits)[:, -added:]


def test_ulcer_history_reads_earlier_visits_only(prepared_synthetic):
    visits = prepared_synthetic.visits
    history = _history(visits)
    ulcer = [visits[PATIENT_COLUMN], visits[schema.DFU_COLUMN]]
    days = visits["Appt Days"].astype(float)
    first = days.eq(days.groupby(ulcer).transform("min")).to_numpy()
    assert first.any() and (~first).any()
    # The first visit of an ulcer has no previous one: number 0, no gap, no change.
    assert np.all(history[first, 1] == 0)
    assert np.isnan(history[first, 0]).all() and np.isnan(history[first, 2:]).all()
    assert np.all(history[~first, 1] >= 1) and np.all(history[~first, 0] > 0)

    # Changing every ulcer's last visit (and the row order) changes no other visit's history.
    last = days.eq(days.groupby(ulcer).transform("max")).to_numpy() & ~first
    changed = visits.copy()
    changed.loc[last, schema.WOUND_TEMP] = changed.loc[last, schema.WOUND_TEMP] + 5.0
    changed = changed.sample(frac=1.0, random_state=0)
    again = _history(changed)[np.argsort(changed.index.to_numpy())]
    order = np.argsort(visits.index.to_numpy())
    np.testing.assert_array_equal(again[~last[order]], history[order][~last[order]])
    # ... while the last visits' wound-temperature change moves by exactly the added 5 degrees.
    moved = again[last[order], 2] - history[order][last[order], 2]
    np.testing.assert_allclose(moved[~np.isnan(moved)], 5.0)
    assert (~np.isnan(moved)).any()


def test_patient_bootstrap_keeps_a_patients_visits_together():
    patients = np.repeat(np.arange(30), 4)
    y = np.tile([0, 1, 1, 2], 30)
    draws = cc.patient_bootstrap_weights(patients, y, trees=50, seed=3)
    left_out = 0
    for weight, _ in draws:
        counts = (weight / cc.compute_sample_weight("balanced", y)).reshape(30, 4)
        assert np.allclose(counts, counts[:, :1]), "a patient's visits drawn apart"
        assert np.isclose(counts[:, 0].sum(), 30)  # as many draws as patients
        left_out += int((counts[:, 0] == 0).sum())
    assert 0 < left_out < 50 * 30  # some patients are out of some trees, not all


def test_inner_choice_prefers_the_model_that_learns(prepared_synthetic):
    from sklearn.dummy import DummyClassifier
    from sklearn.pipeline import Pipeline

    visits = prepared_synthetic.visits
    y = visits["label"].to_numpy()
    chance = Pipeline(
        [("features", feature_pipeline(SPEC.columns)), ("model", DummyClassifier(random_state=0))]
    )
    chosen = cc.InnerChoice([chance, SPEC.pipeline()], folds=3, seed=0).fit(visits, y)
    assert chosen.chosen_ == 1, chosen.scores_
    assert chosen.scores_[1] > chosen.scores_[0] + 0.2


@pytest.mark.parametrize("name", sorted(cc.CANDIDATES))
def test_every_candidate_fits_and_predicts_three_classes(prepared_synthetic, name):
    visits = prepared_synthetic.visits
    patients = visits[PATIENT_COLUMN].unique()
    train = visits[visits[PATIENT_COLUMN].isin(patients[: len(patients) * 2 // 3])]
    val = visits[~visits[PATIENT_COLUMN].isin(train[PATIENT_COLUMN])]
    model = cc.CANDIDATES[name](SPEC).fit(train, train["label"].to_numpy())
    proba = cc._full_proba(model, val)
    assert proba.shape == (len(val), 3)
    np.testing.assert_allclose(proba.sum(axis=1), 1.0, atol=1e-6)
