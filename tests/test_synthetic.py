"""The synthetic generator writes the study's exact layout, with its quirks and a tunable signal.

Expectations come from DATA.md (class mix, padding, frame sizes) and from reading the written
files with the csv module and PIL.
"""

import re
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dfu_ml.data import schema
from csv_helpers import csv_rows, visit_key
from dfu_ml.data.prepare import prepare_dataset
from dfu_ml.data.synthetic import generate_synthetic_dataset

DATA_MD_MIX = {"I": 31.0, "P": 55.7, "R": 13.3}  # percent of visits, DATA.md
SCALE = 0.05


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth60")
    summary = generate_synthetic_dataset(out, patients=60, seed=11, image_scale=SCALE)
    return out, summary


def test_class_mix_like_the_real_one(synth):
    out, _ = synth
    _, rows = csv_rows(out / schema.CLINICAL_CSV)
    visits = {}
    for row in rows:
        visits.setdefault(visit_key(row), row[schema.LABEL_COLUMN])
    mix = Counter(visits.values())
    assert set(mix) == set(DATA_MD_MIX)
    for name, percent in DATA_MD_MIX.items():
        assert abs(100 * mix[name] / len(visits) - percent) <= 12, (name, mix)


def test_several_visits_per_patient(synth):
    out, summary = synth
    _, rows = csv_rows(out / schema.CLINICAL_CSV)
    per_patient = defaultdict(set)
    for row in rows:
        per_patient[int(row["Patient#"])].add((int(row["Appt#"]), int(row["DFU#"])))
    assert len(per_patient) == summary["patients"] == 60
    appts = {p: len({a for a, _ in v}) for p, v in per_patient.items()}
    assert min(appts.values()) >= 2
    assert np.mean([len(v) for v in per_patient.values()]) > 2.5


def test_clinical_csv_has_the_real_quirks(synth):
    out, summary = synth
    raw = (out / schema.CLINICAL_CSV).read_bytes()
    assert raw.startswith(b"\xef\xbb\xbf")
    header_line = raw[3:].split(b"\r\n")[0].split(b"\n")[0].decode("utf-8")
    header, rows = csv_rows(out / schema.CLINICAL_CSV)
    assert len(header) == 72 and header[0] == "ID"
    assert header == list(schema.CLINICAL_COLUMNS)
    for column in (c for c in header if "," in c):
        assert f'"{column}"' in header_line  # quoted because of the comma
    assert all(len(r) == 72 for r in rows)
    keys = Counter(visit_key(r) for r in rows)
    assert any(n > 1 for n in keys.values())  # a duplicated visit key, as in the real file
    assert len(rows) == summary["clinical_rows"]
    # Text codes despite numeric-looking headers, and some missing temperatures.
    assert {r[schema.SEX] for r in rows} <= {"F", "M"}
    assert {r[schema.SIDE] for r in rows} <= {"Left", "Right"}
    assert any(r[schema.WOUND_TEMP] == "" for r in rows)


def test_box_csvs_padding(synth):
    out, _ = synth
    _, depth = csv_rows(out / schema.DEPTH_BOX_CSV)
    _, thermal = csv_rows(out / schema.THERMAL_BOX_CSV)
    assert depth and thermal
    assert all(
        re.fullmatch(r"\d{3}", r["Patient#"]) and re.fullmatch(r"\d{2}", r["Appt#"]) for r in depth
    )
    assert all(
        r["Patient#"] == str(int(r["Patient#"])) and r["Appt#"] == str(int(r["Appt#"]))
        for r in thermal
    )
    assert any(r["Patient#"].startswith("0") for r in depth)
    for rows, camera in ((depth, "D"), (thermal, "T")):
        assert {r["Camera"] for r in rows} == {camera}


def test_png_sizes_follow_the_scale(synth):
    out, _ = synth
    for modality, folder in schema.MODALITY_FOLDERS.items():
        width, height = schema.FRAME_SIZE[schema.MODALITY_CAMERA[modality]]
        expected = (round(width * SCALE), round(height * SCALE))
        files = sorted((out / folder).glob("*.png"))
        assert files, folder
        for path in files[:: max(1, len(files) // 10)]:
            with Image.open(path) as img:
                assert img.size == expected, path
                assert img.mode == "RGB"


def test_every_box_row_has_its_images(synth):
    out, _ = synth
    for name, modalities in (
        (schema.DEPTH_BOX_CSV, ("depth_rgb", "depth_map")),
        (schema.THERMAL_BOX_CSV, ("thermal_rgb", "thermal_map")),
    ):
        _, rows = csv_rows(out / name)
        for modality in modalities:
            present = {p.name for p in (out / schema.MODALITY_FOLDERS[modality]).glob("*.png")}
            assert {r["Filename"] for r in rows} == present


def test_two_ulcers_share_one_image(synth):
    out, _ = synth
    _, clinical = csv_rows(out / schema.CLINICAL_CSV)
    _, depth = csv_rows(out / schema.DEPTH_BOX_CSV)
    two_dfus = {int(r["Patient#"]) for r in clinical if int(r["DFU#"]) == 2}
    assert two_dfus  # premise: some patient has two ulcers
    dfus_per_file = defaultdict(set)
    for r in depth:
        dfus_per_file[r["Filename"]].add(int(r["DFU#"]))
    shared = {name for name, dfus in dfus_per_file.items() if len(dfus) >= 2}
    assert shared
    patients_with_shared = {int(r["Patient#"]) for r in depth if r["Filename"] in shared}
    assert patients_with_shared == two_dfus
    for name in shared:
        assert (out / schema.MODALITY_FOLDERS["depth_rgb"] / name).is_file()


def test_synthetic_dataset_prepares_with_loose_matches(synth):
    out, summary = synth
    report = prepare_dataset(out, image_size=16, modalities=["thermal_map"]).meta["report"]
    assert report["image_sets"] == summary["depth_boxes"]
    assert report["visits"] == summary["visits"]
    assert report["loose_matches"] > 0  # some captures lack their exact thermal twin
    assert report["images_missing"] == 0


def _wound_temp_gap(folder: Path) -> float:
    _, rows = csv_rows(folder / schema.CLINICAL_CSV)
    temps = {"I": [], "R": []}
    for r in rows:
        if r[schema.LABEL_COLUMN] in temps and r[schema.WOUND_TEMP] != "":
            temps[r[schema.LABEL_COLUMN]].append(float(r[schema.WOUND_TEMP]))
    return float(np.mean(temps["I"]) - np.mean(temps["R"]))


def test_clinical_signal_is_tunable(tmp_path):
    gaps = {}
    for signal in (0.0, 1.5):
        generate_synthetic_dataset(
            tmp_path / str(signal), patients=40, seed=2, image_scale=SCALE, clinical_signal=signal
        )
        gaps[signal] = _wound_temp_gap(tmp_path / str(signal))
    assert abs(gaps[0.0]) < 1.0
    assert gaps[1.5] > gaps[0.0] + 1.5  # inflamed wounds are hotter than remodelling ones


def test_generation_is_seeded(tmp_path):
    for name in ("a", "b"):
        generate_synthetic_dataset(tmp_path / name, patients=3, seed=4, image_scale=SCALE)
    for path in (schema.CLINICAL_CSV, schema.DEPTH_BOX_CSV, schema.THERMAL_BOX_CSV):
        assert (tmp_path / "a" / path).read_bytes() == (tmp_path / "b" / path).read_bytes()
