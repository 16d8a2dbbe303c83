"""Clinical features (column policy, fixed categories, missing kept missing, no leaks) and patient
folds."""

import re

import numpy as np
import pandas as pd
import pytest

from dfu_ml.data import schema
from dfu_ml.errors import DataError, FoldError
from dfu_ml.features import ClinicalColumns, feature_pipeline, unseen_category_values
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


def _fitted(visits: pd.DataFrame, include_leak_suspect: bool = False):
    columns = ClinicalColumns.for_policy(include_leak_suspect)
    pipeline = feature_pipeline(columns).fit(visits)
    return pipeline, list(pipeline.get_feature_names_out())


def test_category_lists_are_fixed():
    full = _visits(30)
    plantar_only = full.assign(**{"Foot Aspect": "Plantar", schema.SEX: "M"})
    a, names_a = _fitted(full)
    b, names_b = _fitted(plantar_only)
    assert names_a == names_b
    for category in schema.NOMINAL_TEXT_COLUMNS["Foot Aspect"]:
        assert f"Foot Aspect={category}" in names_b
    encoded = pd.DataFrame(b.transform(plantar_only), columns=names_b)
    assert (encoded["Foot Aspect=plantar"] == 1).all()
    assert (encoded["Foot Aspect=dorsal"] == 0).all()
    assert b.transform(full).shape == a.transform(full).shape == (30, len(names_a))
    np.testing.assert_array_equal(a.transform(full), b.transform(full))


def test_unseen_category_is_missing_and_named():
    train = _visits(12)
    pipeline, names = _fitted(train)
    new = _visits(2, seed=1).assign(**{schema.SEX: "Unknown", "Foot Aspect": "Sideways"})
    encoded = pd.DataFrame(pipeline.transform(new), columns=names)
    assert encoded[schema.SEX].isna().all()  # ordinal: missing, never a crash
    assert (encoded["Foot Aspect=missing"] == 1).all()  # nominal: the "missing" column
    hot = [c for c in names if c.startswith("Foot Aspect=") and c != "Foot Aspect=missing"]
    assert (encoded[hot] == 0).all().all()
    categories = ClinicalColumns.for_policy().categories
    assert unseen_category_values(new, categories) == [
        (schema.SEX, "Unknown", 2),
        ("Foot Aspect", "Sideways", 2),
    ]
    assert unseen_category_values(train, categories) == []


def test_ordinal_codes_follow_the_header_numbering():
    frame = _visits(3).assign(
        **{schema.SEX: ["f", " M ", "F"], schema.EXUDATE_APPEARANCE: ["Serous", "thick", "BLOODY"]}
    )
    pipeline, names = _fitted(frame)
    encoded = pd.DataFrame(pipeline.transform(frame), columns=names)
    assert encoded[schema.SEX].tolist() == [0.0, 1.0, 0.0]
    assert encoded[schema.EXUDATE_APPEARANCE].tolist() == [0.0, 3.0, 2.0]


def test_missing_values_stay_missing():
    """No imputation: a missing number or ordinal value is NaN in what the model receives, a
    missing nominal value is its own column, whatever the training rows held."""
    train = _visits(6).assign(**{schema.WOUND_TEMP: [30.0, 31.0, 35.0, 30.0, 31.0, 35.0]})
    other = _visits(3, seed=9).assign(
        **{
            schema.WOUND_TEMP: [np.nan, 41.0, 100.0],
            schema.EXUDATE_APPEARANCE: [None, "Serous", None],
            "Foot Aspect": ["Plantar", None, "Dorsal"],
        }
    )
    pipeline, names = _fitted(train)
    encoded = pd.DataFrame(pipeline.transform(other), columns=names)
    assert encoded[schema.WOUND_TEMP].iloc[0] != encoded[schema.WOUND_TEMP].iloc[0]  # NaN
    assert encoded[schema.WOUND_TEMP].iloc[1:].tolist() == [41.0, 100.0]  # not scaled
    assert encoded[schema.EXUDATE_APPEARANCE].isna().tolist() == [True, False, True]
    assert encoded["Foot Aspect=missing"].tolist() == [0.0, 1.0, 0.0]
    # A column absent from the CSV is missing everywhere, not an error.
    absent = pd.DataFrame(pipeline.transform(other.drop(columns=[schema.PERI_TEMP])), columns=names)
    assert absent[schema.PERI_TEMP].isna().all()


def test_column_policy_groups():
    """Identifiers, label-derived and free-text columns never become features; the columns
    decided after the assessment only with the config key."""
    never = {
        *schema.IDENTIFIER_COLUMNS,
        *schema.LABEL_DERIVED_COLUMNS,
        *schema.FREE_TEXT_COLUMNS,
        schema.LABEL_COLUMN,
        "label",
        "row_in_file",
    }
    default, study = ClinicalColumns.for_policy(False), ClinicalColumns.for_policy(True)
    for columns in (default, study):
        assert not set(columns.used) & never
        assert schema.WOUND_TEMP in columns.used and schema.EXUDATE_APPEARANCE in columns.used
    assert not set(default.used) & set(schema.LEAK_SUSPECT_COLUMNS)
    assert set(study.used) - set(default.used) == set(schema.DECIDED_AFTER_ASSESSMENT_COLUMNS)
    report = default.report()
    assert report["used"] == default.used
    assert "Dressing Grouped" in report["excluded"]["leak_suspect"]
    assert report["excluded"]["label_derived"] == list(schema.LABEL_DERIVED_COLUMNS)
    # Every CSV column is in exactly one group.
    groups = [
        set(default.used),
        set(schema.IDENTIFIER_COLUMNS),
        set(schema.LABEL_DERIVED_COLUMNS),
        set(schema.FREE_TEXT_COLUMNS),
        set(schema.DECIDED_AFTER_ASSESSMENT_COLUMNS),
        {schema.LABEL_COLUMN},
    ]
    assert sum(len(g) for g in groups) == len(set().union(*groups)) == len(schema.CLINICAL_COLUMNS)


def test_label_does_not_leak_through_features():
    visits = _visits(30)
    shuffled = visits.copy()
    for column in (schema.LABEL_COLUMN, *schema.LABEL_DERIVED_COLUMNS, "label", "Dressing"):
        shuffled[column] = visits[column].to_numpy()[::-1]
    a, _ = _fitted(visits, include_leak_suspect=True)
    b, _ = _fitted(shuffled, include_leak_suspect=True)
    np.testing.assert_array_equal(a.transform(visits), b.transform(shuffled))


def test_feature_pipeline_survives_pickling():
    import pickle

    visits = _visits(15)
    visits.loc[3, schema.WOUND_TEMP] = np.nan
    pipeline, _ = _fitted(visits)
    restored = pickle.loads(pickle.dumps(pipeline))
    other = _visits(5, seed=3)
    np.testing.assert_array_equal(restored.transform(other), pipeline.transform(other))


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
