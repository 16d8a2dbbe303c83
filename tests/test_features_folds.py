"""Clinical features (fixed categories, no leaks, fit on training rows only) and patient folds."""

import json
import re

import numpy as np
import pandas as pd
import pytest

from dfu_ml.data import schema
from dfu_ml.errors import DataError, FoldError
from dfu_ml.features import ClinicalFeatureTransformer, encode_clinical
from dfu_ml.folds import patient_folds, sample_patients


def _visits(n: int, seed: int = 0) -> pd.DataFrame:
    """A clinical frame shaped like read_clinical's output (every column, text kept as text)."""
    rng = np.random.default_rng(seed)
    data = {}
    for column in schema.CLINICAL_COLUMNS:
        data[column] = rng.normal(30, 2, n).round(1)
    data["ID"] = [str(1000 + i) for i in range(n)]
    data[schema.PATIENT_COLUMN] = np.arange(n) // 2 + 1
    data[schema.APPT_COLUMN] = np.arange(n) % 2
    data[schema.DFU_COLUMN] = np.ones(n, dtype=int)
    text_columns = {**schema.ORDINAL_TEXT_COLUMNS, **schema.NOMINAL_TEXT_COLUMNS}
    for column, categories in text_columns.items():
        data[column] = [categories[i % len(categories)].upper() for i in range(n)]
    for column in schema.FREE_TEXT_COLUMNS:
        data[column] = ["some text"] * n
    labels = np.arange(n) % 3
    data[schema.LABEL_COLUMN] = [schema.CLASS_NAMES[i] for i in labels]
    data["Healing Phase"] = [schema.CLASS_NAMES[i] + "+" for i in labels]
    data["Phase Confidence (%)"] = ["90"] * n
    frame = pd.DataFrame(data)
    frame["label"] = labels
    frame["row_in_file"] = np.arange(n) + 2
    return frame


# --------------------------------------------------------------------------------------------
# Features


def test_category_lists_are_fixed():
    full = _visits(30)
    plantar_only = full.assign(**{"Foot Aspect": "Plantar", schema.SEX: "M"})
    assert list(encode_clinical(plantar_only).columns) == list(encode_clinical(full).columns)
    a = ClinicalFeatureTransformer().fit(full)
    b = ClinicalFeatureTransformer().fit(plantar_only)
    assert a.columns_ == b.columns_
    for category in schema.NOMINAL_TEXT_COLUMNS["Foot Aspect"]:
        assert f"Foot Aspect={category}" in b.columns_
    encoded = encode_clinical(plantar_only)
    assert (encoded["Foot Aspect=plantar"] == 1).all()
    assert (encoded["Foot Aspect=dorsal"] == 0).all()
    assert b.transform(full).shape == a.transform(full).shape == (30, len(a.columns_))


def test_unseen_category_does_not_crash():
    train = _visits(12)
    transformer = ClinicalFeatureTransformer().fit(train)
    new = _visits(2, seed=1).assign(**{schema.SEX: "Unknown", "Foot Aspect": "Sideways"})
    encoded = encode_clinical(new)
    assert encoded[schema.SEX].isna().all()  # ordinal: missing, then imputed
    hot = [c for c in encoded.columns if c.startswith("Foot Aspect=")]
    assert len(hot) == len(schema.NOMINAL_TEXT_COLUMNS["Foot Aspect"])
    assert (encoded[hot] == 0).all().all()  # one-hot: all zero, not missing
    out = transformer.transform(new)
    assert np.isfinite(out).all()
    i = transformer.columns_.index(schema.SEX)
    expected = (transformer.medians_[i] - transformer.means_[i]) / transformer.scales_[i]
    assert out[:, i] == pytest.approx(np.full(2, expected))


def test_ordinal_codes_follow_the_header_numbering():
    frame = _visits(3).assign(
        **{schema.SEX: ["f", " M ", "F"], schema.EXUDATE_APPEARANCE: ["Serous", "thick", "BLOODY"]}
    )
    encoded = encode_clinical(frame)
    assert encoded[schema.SEX].tolist() == [0.0, 1.0, 0.0]
    assert encoded[schema.EXUDATE_APPEARANCE].tolist() == [0.0, 3.0, 2.0]


def test_leaky_and_identifier_columns_never_become_features():
    transformer = ClinicalFeatureTransformer().fit(_visits(20))
    forbidden = {
        *schema.IDENTIFIER_COLUMNS,
        *schema.LEAKY_COLUMNS,
        *schema.FREE_TEXT_COLUMNS,
        schema.LABEL_COLUMN,
        "label",
        "row_in_file",
    }
    sources = {c.split("=")[0] for c in transformer.columns_}
    assert not sources & forbidden
    assert schema.WOUND_TEMP in transformer.columns_  # and real features are there


def test_label_does_not_leak_through_features():
    visits = _visits(30)
    shuffled = visits.copy()
    for column in (schema.LABEL_COLUMN, "Healing Phase", "Phase Confidence (%)", "label"):
        shuffled[column] = visits[column].to_numpy()[::-1]
    a = ClinicalFeatureTransformer().fit(visits)
    b = ClinicalFeatureTransformer().fit(shuffled)
    np.testing.assert_array_equal(a.transform(visits), b.transform(shuffled))


def test_imputation_and_scaling_use_training_rows_only():
    train = _visits(3).assign(**{schema.WOUND_TEMP: [30.0, 31.0, 35.0]})
    other = _visits(3, seed=9).assign(**{schema.WOUND_TEMP: [np.nan, 41.0, 100.0]})
    transformer = ClinicalFeatureTransformer().fit(train)
    i = transformer.columns_.index(schema.WOUND_TEMP)
    mean, std = np.mean([30, 31, 35]), np.std([30, 31, 35])
    out = transformer.transform(other)[:, i]
    # Missing -> the training median (31), scaled with the training mean and std.
    assert out == pytest.approx(
        [(31 - mean) / std, (41 - mean) / std, (100 - mean) / std], rel=1e-5
    )
    # Fitting on the other split would have given other numbers.
    refit = ClinicalFeatureTransformer().fit(other).transform(other)[:, i]
    assert not np.allclose(refit, out)
    # Transforming does not change the fitted state.
    expected_train = (np.array([30, 31, 35]) - mean) / std
    assert transformer.transform(train)[:, i] == pytest.approx(expected_train, rel=1e-5)


def test_all_missing_training_column_is_zero_and_unscaled():
    train = _visits(4).assign(**{schema.PERI_TEMP: np.nan})
    transformer = ClinicalFeatureTransformer().fit(train)
    i = transformer.columns_.index(schema.PERI_TEMP)
    assert transformer.medians_[i] == 0 and transformer.scales_[i] == 1
    out = transformer.transform(_visits(2).assign(**{schema.PERI_TEMP: [np.nan, 2.0]}))[:, i]
    assert out.tolist() == [0.0, 2.0]


def test_transformer_json_round_trip():
    visits = _visits(15)
    visits.loc[3, schema.WOUND_TEMP] = np.nan
    transformer = ClinicalFeatureTransformer().fit(visits)
    restored = ClinicalFeatureTransformer.from_json(transformer.to_json())
    assert restored.columns_ == transformer.columns_
    json.loads(transformer.to_json())  # plain JSON
    other = _visits(5, seed=3)
    np.testing.assert_array_equal(restored.transform(other), transformer.transform(other))


def test_transform_before_fit_is_an_error():
    with pytest.raises(RuntimeError):
        ClinicalFeatureTransformer().transform(_visits(2))


# --------------------------------------------------------------------------------------------
# Folds


def _rows(n_patients: int = 30, seed: int = 0):
    """Rows of patients with 1-5 rows each; labels vary within a patient."""
    rng = np.random.default_rng(seed)
    patients = np.repeat(np.arange(100, 100 + n_patients), rng.integers(1, 6, n_patients))
    labels = rng.choice(3, size=len(patients), p=[0.31, 0.557, 0.133])
    labels[:3] = [0, 1, 2]
    return labels, patients


def test_folds_group_by_patient_and_cover_every_row_once():
    labels, patients = _rows()
    folds = patient_folds(labels, patients, 3, seed=1)
    assert len(folds) == 3
    seen = np.zeros(len(labels), dtype=int)
    for train, val in folds:
        assert not set(patients[train]) & set(patients[val])
        assert len(train) + len(val) == len(labels)
        assert set(train.tolist()) | set(val.tolist()) == set(range(len(labels)))
        seen[val] += 1
    assert (seen == 1).all()


def test_folds_are_seeded():
    labels, patients = _rows()
    a = patient_folds(labels, patients, 3, seed=1)
    b = patient_folds(labels, patients, 3, seed=1)
    c = patient_folds(labels, patients, 3, seed=2)
    assert all(np.array_equal(x[1], y[1]) for x, y in zip(a, b))
    assert any(not np.array_equal(x[1], y[1]) for x, y in zip(a, c))


def test_data_percentage_samples_patients_not_rows():
    labels, patients = _rows(40)
    mask = sample_patients(labels, patients, 50, seed=3)
    for patient in np.unique(patients):
        rows = mask[patients == patient]
        assert rows.all() or not rows.any(), patient
    kept = len(np.unique(patients[mask]))
    assert 0.35 * 40 <= kept <= 0.65 * 40
    assert sample_patients(labels, patients, 100, seed=3).all()
    again = sample_patients(labels, patients, 50, seed=3)
    np.testing.assert_array_equal(again, mask)


def test_fold_lacking_a_class_names_fold_and_class():
    # Class R occurs for one patient only: the fold that validates on it trains without R.
    patients = np.repeat(np.arange(10), 3)
    labels = np.array([0, 1, 1] * 10)
    labels[patients == 4] = 2
    with pytest.raises(FoldError) as info:
        patient_folds(labels, patients, 2, seed=0)
    message = str(info.value)
    assert re.search(r"fold [01]\b", message)
    assert re.search(r"no R rows", message)


def test_too_few_patients_is_a_fold_error():
    with pytest.raises(FoldError, match=r"cv_folds=5 needs at least 5 patients.* has 3\b"):
        patient_folds(np.array([0, 1, 2, 0]), np.array([1, 2, 3, 3]), 5, seed=0)


def test_empty_rows_are_a_data_error():
    with pytest.raises(DataError, match="empty"):
        patient_folds(np.array([], dtype=int), np.array([], dtype=int), 3, seed=0)
