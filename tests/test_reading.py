"""Reading the study's real CSV files (the dev copy in ../shared) and the image-name convention.

Expectations are computed independently from the files with the csv module, or taken from DATA.md.
"""

import csv
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from dfu_ml.data import schema
from dfu_ml.data.matching import deduplicate_visits
from dfu_ml.data.reading import format_image_name, parse_image_name, read_boxes, read_clinical
from dfu_ml.errors import DataError

REAL_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "dfu_real_dev"
LABEL_CODES = {"I": 0, "P": 1, "R": 2}  # DATA.md: I = 0, P = 1, R = 2
# My own reading of DATA.md's file-name convention, independent of reading.IMAGE_NAME_PATTERN.
NAME = re.compile(r"^(\d+)_P(\d\d\d)(\d\d)(\d)([AB])([DT])([LMR])([WZ])\.png$")


@pytest.fixture(scope="module")
def real_dir() -> Path:
    if not (REAL_DIR / schema.CLINICAL_CSV).is_file():
        pytest.skip(f"real dev data not found at {REAL_DIR}")
    return REAL_DIR


def _csv_rows(path: Path) -> tuple[list[str], list[dict]]:
    with open(path, newline="", encoding="utf-8-sig") as handle:
        reader = csv.reader(handle)
        header = next(reader)
        rows = [dict(zip(header, values)) for values in reader]
    return header, rows


@pytest.fixture(scope="module")
def clinical_raw(real_dir):
    return _csv_rows(real_dir / schema.CLINICAL_CSV)


@pytest.fixture(scope="module")
def clinical(real_dir):
    return read_clinical(real_dir / schema.CLINICAL_CSV)


# --------------------------------------------------------------------------------------------
# Clinical CSV


def test_clinical_csv_really_has_a_bom(real_dir):
    # Guards the premise of the next test: the file on disk starts with the UTF-8 BOM.
    assert (real_dir / schema.CLINICAL_CSV).read_bytes()[:3] == b"\xef\xbb\xbf"


def test_clinical_columns_bom_stripped_and_quoted_headers_intact(clinical, clinical_raw):
    header, rows = clinical_raw
    added = {"label", "row_in_file"}
    columns = [c for c in clinical.columns if c not in added]
    assert columns[0] == "ID"  # not '\ufeffID'
    assert len(columns) == 72
    assert columns == header == list(schema.CLINICAL_COLUMNS)
    with_commas = [c for c in header if "," in c]
    assert schema.SEX in with_commas and len(with_commas) >= 5
    for column in with_commas:
        assert column in clinical.columns
    assert len(clinical) == len(rows)


def test_clinical_labels_mapped_to_0_1_2(clinical, clinical_raw):
    _, rows = clinical_raw
    expected = np.array([LABEL_CODES[r[schema.LABEL_COLUMN].strip()] for r in rows])
    np.testing.assert_array_equal(clinical["label"].to_numpy(), expected)
    assert set(expected.tolist()) == {0, 1, 2}


def test_clinical_visit_keys_are_integers(clinical, clinical_raw):
    _, rows = clinical_raw
    for column in schema.VISIT_KEY:
        assert np.issubdtype(clinical[column].dtype, np.integer), column
        np.testing.assert_array_equal(clinical[column].to_numpy(), [int(r[column]) for r in rows])


def test_clinical_text_coded_columns_stay_text_and_numbers_become_floats(clinical, clinical_raw):
    _, rows = clinical_raw
    sex = clinical[schema.SEX].dropna().str.upper()
    assert set(sex) == {"F", "M"}  # DATA.md: holds F/M despite the header's 0/1
    assert set(clinical[schema.SIDE].dropna().str.lower()) == {"left", "right"}
    temps = clinical[schema.WOUND_TEMP]
    assert temps.dtype == float
    blanks = sum(r[schema.WOUND_TEMP].strip() == "" for r in rows)
    assert blanks > 0 and int(temps.isna().sum()) == blanks
    first = next(i for i, r in enumerate(rows) if r[schema.WOUND_TEMP].strip())
    assert temps.iloc[first] == pytest.approx(float(rows[first][schema.WOUND_TEMP]))


def test_duplicated_visit_keys_are_distinct_visits_renumbered(clinical, clinical_raw, real_dir):
    """The real file's repeated keys have different Appt Days: distinct visits, both kept; the
    later one gets the ulcer's next free appointment number, and for patient 161 that is the
    number its otherwise orphaned images carry."""
    _, rows = clinical_raw
    keys = [tuple(int(r[c]) for c in schema.VISIT_KEY) for r in rows]
    repeated = [i for i, key in enumerate(keys) if key in keys[:i]]
    assert repeated  # DATA.md: a few visit keys are duplicated
    for i in repeated:
        first = keys.index(keys[i])
        assert rows[i]["Appt Days"] != rows[first]["Appt Days"]

    visits, counts = deduplicate_visits(clinical)
    assert counts["duplicate_visit_keys"] == counts["visits_renumbered"] == len(repeated)
    assert counts["duplicate_rows_merged"] == 0
    assert len(visits) == len(rows)  # no labelled row dropped
    assert not visits.duplicated(list(schema.VISIT_KEY)).any()
    table = visits.set_index("row_in_file")
    for i in repeated:
        patient, appt, dfu = keys[i]
        ulcer = {k[1] for k in keys if (k[0], k[2]) == (patient, dfu)}
        assert table.loc[i + 2, schema.APPT_COLUMN] == max(ulcer) + 1
        assert table.loc[keys.index(keys[i]) + 2, schema.APPT_COLUMN] == appt  # first keeps it
        assert f"line {i + 2}: Appt# {appt} -> {max(ulcer) + 1}" in "\n".join(
            counts["renumbered_visits"]
        )
    _, depth = _csv_rows(real_dir / schema.DEPTH_BOX_CSV)
    image_visits = {tuple(int(r[c]) for c in schema.VISIT_KEY) for r in depth}
    assert (161, 1, 1) in image_visits and (161, 1, 1) not in keys
    assert table.loc[table[schema.PATIENT_COLUMN] == 161, schema.APPT_COLUMN].tolist() == [0, 1]


def _two_rows(**second) -> pd.DataFrame:
    first = {"Patient#": 5, "Appt#": 0, "DFU#": 1, "Appt Days": 0.0, "Age": 60.0, "label": 1}
    frame = pd.DataFrame([first, {**first, **second}])
    frame["row_in_file"] = [2, 3]
    return frame


def test_a_visit_entered_twice_is_merged():
    visits, counts = deduplicate_visits(_two_rows(Age=np.nan, Weight=80.0))
    assert len(visits) == 1 and counts["duplicate_rows_merged"] == 1
    assert visits.loc[0, "Age"] == 60.0 and visits.loc[0, "Weight"] == 80.0  # blanks filled


def test_another_day_under_the_same_key_is_renumbered():
    visits, counts = deduplicate_visits(_two_rows(**{"Appt Days": 14.0, "label": 2}))
    assert visits["Appt#"].tolist() == [0, 1] and visits["label"].tolist() == [1, 2]
    assert counts["visits_renumbered"] == 1


def test_conflicting_rows_of_one_visit_are_an_error():
    with pytest.raises(DataError, match=r"x\.csv, lines 2, 3: .*conflicting"):
        deduplicate_visits(_two_rows(label=2), source="x.csv")


# --------------------------------------------------------------------------------------------
# Bounding-box CSVs


@pytest.fixture(scope="module")
def boxes(real_dir):
    return {
        "D": (
            read_boxes(real_dir / schema.DEPTH_BOX_CSV, "D"),
            _csv_rows(real_dir / schema.DEPTH_BOX_CSV)[1],
        ),
        "T": (
            read_boxes(real_dir / schema.THERMAL_BOX_CSV, "T"),
            _csv_rows(real_dir / schema.THERMAL_BOX_CSV)[1],
        ),
    }


def test_box_csv_padding_differs_on_disk(boxes):
    _, depth_raw = boxes["D"]
    _, thermal_raw = boxes["T"]
    # DATA.md: depth zero-pads Patient# and Appt#, thermal does not.
    assert all(len(r["Patient#"]) == 3 for r in depth_raw)
    assert any(r["Patient#"].startswith("0") for r in depth_raw)
    assert any(re.fullmatch(r"0\d", r["Appt#"]) for r in depth_raw)
    assert not any(re.fullmatch(r"0\d+", r["Patient#"]) for r in thermal_raw)
    assert not any(re.fullmatch(r"0\d+", r["Appt#"]) for r in thermal_raw)


@pytest.mark.parametrize("camera", ["D", "T"])
def test_box_keys_read_as_integers(boxes, camera):
    frame, raw = boxes[camera]
    assert len(frame) == len(raw)
    for column in (*schema.VISIT_KEY, "Xmin", "Ymin", "Xmax", "Ymax", "Bounding Box Number"):
        assert np.issubdtype(frame[column].dtype, np.integer), column
        np.testing.assert_array_equal(frame[column].to_numpy(), [int(r[column]) for r in raw])


def test_padded_and_unpadded_twins_end_up_as_the_same_ints(boxes):
    depth, depth_raw = boxes["D"]
    thermal, thermal_raw = boxes["T"]
    depth_by = {(r["Filename"], r["Bounding Box Number"]): i for i, r in enumerate(depth_raw)}
    compared = differently_written = 0
    for j, r in enumerate(thermal_raw):
        i = depth_by.get((_twin(r["Filename"]), r["Bounding Box Number"]))
        if i is None:
            continue
        compared += 1
        for column in schema.VISIT_KEY:
            assert depth.at[i, column] == thermal.at[j, column], (r["Filename"], column)
        differently_written += depth_raw[i]["Patient#"] != r["Patient#"]
    assert compared > 0.8 * len(thermal_raw)
    assert differently_written > 0  # the comparison really crossed the padding difference


def _twin(thermal_name: str) -> str:
    m = NAME.match(thermal_name)
    assert m, thermal_name
    parts = list(m.groups())
    parts[5] = "D"
    return f"{parts[0]}_P{''.join(parts[1:])}.png"


@pytest.mark.parametrize("camera", ["D", "T"])
def test_every_real_file_name_parses(boxes, camera):
    _, raw = boxes[camera]
    for r in raw:
        name = r["Filename"].strip()
        parsed = parse_image_name(name)
        m = NAME.match(name)
        assert m is not None
        assert (parsed.seq, parsed.patient, parsed.appt, parsed.dfu) == tuple(
            int(g) for g in m.groups()[:4]
        )
        assert parsed.camera == camera
        # The name's patient and appointment agree with the row's (the DFU# may not: a frame
        # that shows several ulcers is named after the first).
        assert (parsed.patient, parsed.appt) == (int(r["Patient#"]), int(r["Appt#"]))
        assert (
            format_image_name(
                parsed.seq,
                parsed.patient,
                parsed.appt,
                parsed.dfu,
                parsed.debri,
                parsed.camera,
                parsed.angle,
                parsed.view,
            )
            == name
        )


def test_parse_image_name_example_from_data_md():
    parsed = parse_image_name("280_P003011BDLW.png")
    assert (parsed.seq, parsed.patient, parsed.appt, parsed.dfu) == (280, 3, 1, 1)
    assert (parsed.debri, parsed.camera, parsed.angle, parsed.view) == ("B", "D", "L", "W")
    twin = parse_image_name("280_P003011BTLW.png")
    assert twin.capture == parsed.capture and twin.camera == "T"


@pytest.mark.parametrize(
    "name", ["280_P03011BDLW.png", "280_P003011XDLW.png", "P003011BDLW.png", "280_P003011BDLW.jpg"]
)
def test_bad_image_names_raise_data_error_naming_the_file(name):
    with pytest.raises(DataError, match=re.escape(name)):
        parse_image_name(name)
