"""Dataset preparation: from-real rendering + prepare on the real dev CSVs, crop geometry,
per-modality margins, the prepared-file round trip, the data report and missing images.

Expected values are computed independently from the CSVs with the csv module (or from DATA.md).
"""

import csv
import json
import re
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from dfu_ml.data import schema
from csv_helpers import csv_rows, visit_key, visits_by_key
from dfu_ml.data.prepare import (
    DATASET_FILE,
    REPORT_JSON,
    REPORT_MD,
    crop_resize_pad,
    decode_image,
    load_prepared,
    prepare_dataset,
    save_prepared,
)
from dfu_ml.data.synthetic import generate_synthetic_dataset, render_from_real
from dfu_ml.errors import DataError
from pipelines.cli import main as cli_main

REAL_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "dfu_real_dev"
LABEL_CODES = {"I": 0, "P": 1, "R": 2}
NAME = re.compile(r"^(\d+)_P(\d\d\d)(\d\d)(\d)([AB])([DT])([LMR])([WZ])\.png$")
SCALE = 0.05


# --------------------------------------------------------------------------------------------
# From-real rendering and preparation of the real dev CSVs


@pytest.fixture(scope="module")
def real_dir() -> Path:
    if not (REAL_DIR / schema.CLINICAL_CSV).is_file():
        pytest.skip(f"real dev data not found at {REAL_DIR}")
    return REAL_DIR


@pytest.fixture(scope="module")
def real_prepared(real_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("from_real")
    # The documented command: dfu-kfp synth --from-real DIR --out TMP --image-scale 0.05
    assert (
        cli_main(
            ["synth", "--from-real", str(real_dir), "--out", str(out), "--image-scale", str(SCALE)]
        )
        == 0
    )
    return out, prepare_dataset(out, image_size=16)


@pytest.fixture(scope="module")
def real_expected(real_dir):
    """Everything the report should say, computed from the CSVs with the csv module."""
    _, clinical = csv_rows(real_dir / schema.CLINICAL_CSV)
    first = visits_by_key(clinical)
    mix = Counter(row[schema.LABEL_COLUMN].strip() for row in first.values())
    _, depth = csv_rows(real_dir / schema.DEPTH_BOX_CSV)
    _, thermal = csv_rows(real_dir / schema.THERMAL_BOX_CSV)

    def capture(name):  # patient, appt, ulcer, debridement, angle, view (camera left out)
        g = NAME.match(name.strip()).groups()
        return (int(g[1]), int(g[2]), int(g[3]), g[4], g[6], g[7])

    exact = {(capture(r["Filename"]), visit_key(r)) for r in thermal}
    visit_debri = {(visit_key(r), capture(r["Filename"])[3]) for r in thermal}
    visit_any = {visit_key(r) for r in thermal}
    matches = Counter()
    for r in depth:
        visit = visit_key(r)
        if visit not in first:
            matches["sets_without_clinical_row"] += 1
        elif (capture(r["Filename"]), visit) in exact:
            matches["exact"] += 1
        elif (visit, capture(r["Filename"])[3]) in visit_debri:
            matches["other_angle_or_view"] += 1
        elif visit in visit_any:
            matches["other_debridement"] += 1
        else:
            matches["none"] += 1
    return {
        "visits": len(first),
        "duplicates": len(clinical) - len({visit_key(r) for r in clinical}),
        "patients": len({k[0] for k in first}),
        "mix": {name: mix[name] for name in schema.CLASS_NAMES},
        "image_sets": sum(visit_key(r) in first for r in depth),
        "matches": matches,
        "depth_files": {r["Filename"].strip() for r in depth},
        "thermal_files": {r["Filename"].strip() for r in thermal},
    }


def test_from_real_renders_every_box_file(real_prepared, real_expected):
    out, _ = real_prepared
    for modality, files in (
        ("depth_rgb", "depth_files"),
        ("depth_map", "depth_files"),
        ("thermal_rgb", "thermal_files"),
        ("thermal_map", "thermal_files"),
    ):
        written = {p.name for p in (out / schema.MODALITY_FOLDERS[modality]).glob("*.png")}
        assert written == real_expected[files], modality
    width, height = schema.FRAME_SIZE["T"]
    sample = next((out / schema.MODALITY_FOLDERS["thermal_map"]).glob("*.png"))
    with Image.open(sample) as img:
        assert img.size == (round(width * SCALE), round(height * SCALE))


def test_real_report_counts_match_the_csvs(real_prepared, real_expected):
    _, dataset = real_prepared
    report = dataset.meta["report"]
    assert report["visits"] == real_expected["visits"] == len(dataset.visits)
    assert report["duplicate_visit_keys"] == real_expected["duplicates"] > 0
    assert report["patients"] == real_expected["patients"]
    assert report["class_mix_visits"] == real_expected["mix"]
    assert report["labelled_visits"] == sum(real_expected["mix"].values())
    assert report["image_sets"] == real_expected["image_sets"] == len(dataset.sets)
    assert report["images_missing"] == 0


def test_real_loose_matches_are_counted(real_prepared, real_expected):
    _, dataset = real_prepared
    report, expected = dataset.meta["report"], real_expected["matches"]
    assert expected["other_angle_or_view"] + expected["other_debridement"] > 0  # premise
    assert report["sets_without_clinical_row"] == expected["sets_without_clinical_row"]
    for how in ("exact", "other_angle_or_view", "other_debridement", "none"):
        assert report.get(f"thermal_match_{how}", 0) == expected[how], how
    loose = expected["other_angle_or_view"] + expected["other_debridement"]
    assert report["loose_matches"] == loose
    per_row = dataset.sets["thermal_match"].value_counts().to_dict()
    assert per_row.get("exact", 0) == expected["exact"]
    # Sets without any thermal image have no thermal crops.
    none = dataset.sets["thermal_match"] == "none"
    assert not dataset.sets.loc[none, "has_thermal_map"].any()
    assert dataset.sets.loc[~none, "has_thermal_map"].all()


def test_real_set_labels_are_the_visit_labels(real_prepared, real_dir):
    _, dataset = real_prepared
    _, clinical = csv_rows(real_dir / schema.CLINICAL_CSV)
    first = {
        k: LABEL_CODES[r[schema.LABEL_COLUMN].strip()] for k, r in visits_by_key(clinical).items()
    }
    keys = zip(dataset.sets["patient"], dataset.sets["appt"], dataset.sets["dfu"])
    np.testing.assert_array_equal(dataset.set_labels(), [first[tuple(map(int, k))] for k in keys])


def _write_subset(real_dir: Path, target: Path, n_box_rows: int, transform) -> None:
    """Copy the clinical CSV (through ``transform(header, rows)``) and the first box rows."""
    target.mkdir(parents=True)
    header, rows = csv_rows(real_dir / schema.CLINICAL_CSV)
    rows = transform(header, rows)
    with open(target / schema.CLINICAL_CSV, "w", newline="", encoding="utf-8-sig") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows([[r[c] for c in header] for r in rows])
    for name in (schema.DEPTH_BOX_CSV, schema.THERMAL_BOX_CSV):
        lines = (real_dir / name).read_text(encoding="utf-8-sig").splitlines(keepends=True)
        (target / name).write_text("".join(lines[: n_box_rows + 1]))


def _permute(columns, seed=0):
    def transform(header, rows):
        rng = np.random.default_rng(seed)
        order = rng.permutation(len(rows))
        out = [dict(r) for r in rows]
        for column in columns:
            for r, j in zip(out, order):
                r[column] = rows[j][column]
        return out

    return transform


def _pngs(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*.png"))}


def test_from_real_pixels_come_from_measurements_not_labels(real_dir, tmp_path):
    n_boxes = 120
    label_columns = (schema.LABEL_COLUMN, "Healing Phase", "Phase Confidence (%)")
    _write_subset(real_dir, tmp_path / "orig", n_boxes, lambda h, rows: rows)
    _write_subset(real_dir, tmp_path / "perm", n_boxes, _permute(label_columns))
    _write_subset(real_dir, tmp_path / "temp", n_boxes, _permute([schema.WOUND_TEMP]))
    _, orig_rows = csv_rows(tmp_path / "orig" / schema.CLINICAL_CSV)
    _, perm_rows = csv_rows(tmp_path / "perm" / schema.CLINICAL_CSV)
    changed = sum(
        a[schema.LABEL_COLUMN] != b[schema.LABEL_COLUMN] for a, b in zip(orig_rows, perm_rows)
    )
    assert changed > len(orig_rows) / 4  # the permutation really moved labels

    images = {}
    for name in ("orig", "perm", "temp"):
        render_from_real(tmp_path / name, tmp_path / f"{name}_out", image_scale=SCALE, seed=3)
        images[name] = _pngs(tmp_path / f"{name}_out")
    assert len(images["orig"]) >= 4 * 20
    assert images["perm"] == images["orig"]  # byte-identical
    # Control: the comparison is sensitive; moving the wound temperatures changes thermal maps.
    folder = schema.MODALITY_FOLDERS["thermal_map"]
    thermal_maps = [k for k in images["orig"] if k.startswith(folder)]
    assert any(images["temp"][k] != images["orig"][k] for k in thermal_maps)


# --------------------------------------------------------------------------------------------
# crop_resize_pad


def _frame(height=100, width=200, seed=0):
    return np.random.default_rng(seed).integers(1, 256, (height, width, 3), dtype=np.uint8)


@pytest.mark.parametrize(
    "box,size",
    [((50, 20, 110, 50), 16), ((10, 10, 30, 70), 32), ((0, 0, 200, 100), 20), ((5, 5, 8, 9), 16)],
)
def test_crop_keeps_aspect_ratio_and_zero_pads(box, size):
    frame = _frame()
    out, clamped = crop_resize_pad(frame, box, 0, size)
    assert out.shape == (size, size, 3) and out.dtype == np.uint8
    assert not clamped
    w, h = box[2] - box[0], box[3] - box[1]
    exp_w, exp_h = round(w * size / max(w, h)), round(h * size / max(w, h))
    filled = out.any(axis=2)  # frame pixels are >= 1, padding is exactly 0
    rows, cols = np.flatnonzero(filled.any(axis=1)), np.flatnonzero(filled.any(axis=0))
    assert (rows[-1] - rows[0] + 1, cols[-1] - cols[0] + 1) == (exp_h, exp_w)
    assert filled.sum() == exp_h * exp_w  # a solid rectangle, centred, zeros around it
    assert abs(rows[0] - (size - rows[-1] - 1)) <= 1 and abs(cols[0] - (size - cols[-1] - 1)) <= 1


def test_crop_content_is_the_box():
    frame = np.zeros((50, 80, 3), np.uint8)
    frame[10:20, 30:40] = (200, 100, 50)  # the box, one colour
    out, _ = crop_resize_pad(frame, (30, 10, 40, 20), 0, 16)
    assert (out == np.array([200, 100, 50], np.uint8)).all()  # square box: no padding at all
    wider, _ = crop_resize_pad(frame, (30, 10, 40, 20), 5, 20)
    assert (wider[0] == 0).all() and (wider[10, 10] == (200, 100, 50)).all()


def test_crop_clamped_when_the_margin_crosses_the_border():
    frame = _frame()
    _, clamped = crop_resize_pad(frame, (5, 40, 30, 60), 4, 16)
    assert not clamped
    out, clamped = crop_resize_pad(frame, (5, 40, 30, 60), 6, 16)
    assert clamped
    _, clamped = crop_resize_pad(frame, (150, 80, 198, 99), 3, 16)
    assert clamped
    # Clamped crop = the part of the widened box inside the frame: 0..36 x 34..66 -> 36 x 32.
    filled = out.any(axis=2)
    assert filled.any(axis=0).sum() == 16 and filled.any(axis=1).sum() == round(32 * 16 / 36)


def test_crop_of_uint8_extremes_stays_in_range():
    frame = np.zeros((40, 40, 3), np.uint8)
    frame[::2] = 255
    out, _ = crop_resize_pad(frame, (3, 3, 37, 30), 0, 16)
    assert out.dtype == np.uint8 and out.max() <= 255 and out.min() >= 0 and out.max() > 0


# --------------------------------------------------------------------------------------------
# Preparation of a small synthetic dataset


@pytest.fixture(scope="module")
def synth_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth_small")
    generate_synthetic_dataset(out, patients=6, seed=5, image_scale=0.1)
    return out


@pytest.fixture(scope="module")
def synth_prepared(synth_dir):
    return prepare_dataset(synth_dir, image_size=16, crop_margins={})


def test_report_has_the_counts_a_user_checks(synth_dir, synth_prepared):
    report = synth_prepared.meta["report"]
    _, clinical = csv_rows(synth_dir / schema.CLINICAL_CSV)
    _, depth = csv_rows(synth_dir / schema.DEPTH_BOX_CSV)
    keys = {visit_key(r) for r in clinical}
    for key in (
        "image_sets",
        "visits",
        "patients",
        "class_mix_visits",
        "images_missing",
        "loose_matches",
        "crops_clamped",
        "duplicate_visit_keys",
    ):
        assert key in report, key
    assert report["visits"] == len(keys)
    assert report["duplicate_visit_keys"] == len(clinical) - len(keys)
    assert report["patients"] == len({k[0] for k in keys}) == 6
    assert report["image_sets"] == len(depth)
    assert sum(report["class_mix_visits"].values()) == len(keys)
    assert report["images_missing"] == 0 and report["crops_clamped"] == 0
    for modality in schema.IMAGE_MODALITIES:
        assert synth_prepared.images[modality].shape == (len(depth), 16, 16, 3)
        assert synth_prepared.images[modality].dtype == np.uint8


def _expected_clamps(dataset, margins: dict, scale: float) -> int:
    count = 0
    for modality, margin in margins.items():
        camera = schema.MODALITY_CAMERA[modality]
        w, h = (max(32, round(v * scale)) for v in schema.FRAME_SIZE[camera])
        column = "depth_box" if camera == "D" else "thermal_box"
        for box, ok in zip(dataset.sets[column], dataset.sets[f"has_{modality}"]):
            if ok:
                x0, y0, x1, y1 = box
                count += x0 - margin < 0 or y0 - margin < 0 or x1 + margin > w or y1 + margin > h
    return count


def test_per_modality_margins_change_only_their_crops(synth_dir, synth_prepared):
    margins = {"depth_map": 3, "thermal_map": 1000}
    wider = prepare_dataset(synth_dir, image_size=16, crop_margins=margins)
    base = synth_prepared
    for modality in ("depth_rgb", "thermal_rgb"):
        np.testing.assert_array_equal(wider.images[modality], base.images[modality])
    for modality in margins:
        ok = wider.sets[f"has_{modality}"].to_numpy()
        differs = (wider.images[modality] != base.images[modality]).reshape(len(ok), -1).any(axis=1)
        assert differs[ok].all(), modality
    expected = _expected_clamps(wider, margins, 0.1)
    assert expected >= wider.sets["has_thermal_map"].sum()  # 1000 px crosses every border
    assert wider.meta["report"]["crops_clamped"] == expected
    assert wider.meta["crop_margins"] == margins


def test_save_load_round_trip(synth_prepared, tmp_path):
    path = save_prepared(synth_prepared, tmp_path / "prepared")
    assert path.name == DATASET_FILE
    assert (
        json.loads((tmp_path / "prepared" / REPORT_JSON).read_text())
        == synth_prepared.meta["report"]
    )
    assert "image sets" in (tmp_path / "prepared" / REPORT_MD).read_text()
    loaded = load_prepared(tmp_path / "prepared")
    assert set(loaded.images) == set(synth_prepared.images)
    for modality, array in synth_prepared.images.items():
        assert loaded.images[modality].dtype == np.uint8
        np.testing.assert_array_equal(loaded.images[modality], array)
    assert loaded.meta == json.loads(json.dumps(synth_prepared.meta))
    pd.testing.assert_frame_equal(loaded.visits, synth_prepared.visits, check_dtype=False)
    assert loaded.visits["ID"].tolist() == synth_prepared.visits["ID"].tolist()  # text stays text
    assert isinstance(loaded.sets["depth_box"].iloc[0], tuple)
    pd.testing.assert_frame_equal(loaded.sets, synth_prepared.sets, check_dtype=False)
    np.testing.assert_array_equal(loaded.set_labels(), synth_prepared.set_labels())
    np.testing.assert_array_equal(loaded.set_patients(), synth_prepared.set_patients())
    assert load_prepared(path).image_size == 16  # the npz path works too


def test_load_rejects_another_format_version(synth_prepared, tmp_path):
    meta = dict(synth_prepared.meta, format_version=synth_prepared.meta["format_version"] + 98)
    stale = type(synth_prepared)(
        visits=synth_prepared.visits,
        sets=synth_prepared.sets,
        images=synth_prepared.images,
        meta=meta,
    )
    path = save_prepared(stale, tmp_path / "old", compress=False)
    with pytest.raises(DataError, match=str(meta["format_version"])) as info:
        load_prepared(path)
    assert str(path) in str(info.value)


def test_load_missing_prepared_file_names_it(tmp_path):
    with pytest.raises(DataError, match=re.escape(str(tmp_path / DATASET_FILE))):
        load_prepared(tmp_path)


@pytest.fixture
def synth_copy(synth_dir, tmp_path):
    target = tmp_path / "data"
    shutil.copytree(synth_dir, target)
    return target


def test_on_missing_image_skip_counts_and_flags(synth_copy):
    _, depth = csv_rows(synth_copy / schema.DEPTH_BOX_CSV)
    name = depth[0]["Filename"]
    (synth_copy / schema.MODALITY_FOLDERS["depth_map"] / name).unlink()
    dataset = prepare_dataset(synth_copy, image_size=16, on_missing_image="skip")
    assert dataset.meta["report"]["images_missing"] == 1
    uses = (dataset.sets["depth_file"] == name).to_numpy()
    assert uses.sum() == sum(r["Filename"] == name for r in depth) >= 1
    np.testing.assert_array_equal(dataset.sets["has_depth_map"].to_numpy(), ~uses)
    assert dataset.sets["has_depth_rgb"].all()
    assert not dataset.images["depth_map"][uses].any()  # left as zeros


def test_on_missing_image_skip_refuses_a_modality_with_no_image_at_all(synth_copy):
    folder = synth_copy / schema.MODALITY_FOLDERS["thermal_map"]
    for path in folder.glob("*.png"):
        path.unlink()
    with pytest.raises(DataError, match="every one is missing") as info:
        prepare_dataset(synth_copy, image_size=16, on_missing_image="skip")
    assert str(folder) in str(info.value) and "thermal_map" in str(info.value)


def test_on_missing_image_error_names_the_file(synth_copy):
    _, thermal = csv_rows(synth_copy / schema.THERMAL_BOX_CSV)
    name = thermal[-1]["Filename"]
    (synth_copy / schema.MODALITY_FOLDERS["thermal_rgb"] / name).unlink()
    with pytest.raises(DataError, match=re.escape(name)) as info:
        prepare_dataset(synth_copy, image_size=16)
    assert schema.MODALITY_FOLDERS["thermal_rgb"] in str(info.value)
    assert "on_missing_image" in str(info.value)


def test_prepare_only_the_asked_modalities(synth_dir):
    dataset = prepare_dataset(synth_dir, image_size=16, modalities=["thermal_map"])
    assert set(dataset.images) == {"thermal_map"}
    assert dataset.meta["modalities"] == ["thermal_map"]
    assert "has_depth_rgb" not in dataset.sets


# --------------------------------------------------------------------------------------------
# Every PNG mode a camera writes decodes to 8-bit RGB with the right scaling


def _gradient(height=12, width=20):
    y, x = np.mgrid[0:height, 0:width]
    return np.stack([x * 12, y * 20, (x + y) * 7], axis=2).astype(np.uint8)


def _grey(rgb):
    return (rgb.astype(int).sum(axis=2) // 3).astype(np.uint8)


def _png_modes():
    """(name, PIL image as a camera would write it, the 8-bit RGB it must decode to)."""
    rgb = _gradient()
    grey = _grey(rgb)
    alpha = np.full(grey.shape, 90, np.uint8)
    palette = np.array([[0, 0, 0], [255, 0, 0], [0, 200, 50], [30, 60, 250]], np.uint8)
    index = (np.arange(grey.size).reshape(grey.shape) % len(palette)).astype(np.uint8)
    paletted = Image.fromarray(index, mode="P")
    paletted.putpalette(palette.flatten().tolist())
    bilevel = grey > 128
    as_rgb = np.repeat(grey[:, :, None], 3, axis=2)
    odd = np.array([[0, 1000, 65535], [128, 32768, 40000]], np.uint16)  # not multiples of 257
    return [
        ("RGB", Image.fromarray(rgb, "RGB"), rgb),
        ("RGBA", Image.fromarray(np.dstack([rgb, alpha]), "RGBA"), rgb),
        ("L", Image.fromarray(grey, "L"), as_rgb),
        ("LA", Image.fromarray(np.dstack([grey, alpha]), "LA"), as_rgb),
        ("P", paletted, palette[index]),
        ("1", Image.fromarray(bilevel).convert("1"), np.repeat(bilevel[:, :, None] * 255, 3, 2)),
        ("I;16", Image.fromarray(grey.astype(np.uint16) * 257), as_rgb),
        (
            "I;16 odd values",
            Image.fromarray(odd),
            np.repeat(np.rint(odd / 257).astype(np.uint8)[:, :, None], 3, axis=2),
        ),
    ]


@pytest.mark.parametrize("name, image, expected", _png_modes(), ids=lambda v: str(v)[:12])
def test_every_png_mode_decodes_to_rgb8_with_the_right_scaling(tmp_path, name, image, expected):
    path = tmp_path / "image.png"
    image.save(path)
    with Image.open(path) as reopened:
        assert reopened.mode.startswith(name.split()[0])  # the file really has that mode
    decoded = decode_image(path)
    assert decoded.dtype == np.uint8 and decoded.shape == expected.shape
    np.testing.assert_array_equal(decoded, expected.astype(np.uint8))


def test_a_16_bit_depth_dataset_prepares_like_its_8_bit_twin(synth_copy, tmp_path):
    """Finding: convert("RGB") clipped 16-bit depth images to all white, silently."""
    folder = synth_copy / schema.MODALITY_FOLDERS["depth_map"]
    eight_bit = tmp_path / "eight_bit"
    shutil.copytree(synth_copy, eight_bit)
    for path in sorted(folder.glob("*.png")):
        grey = _grey(np.asarray(Image.open(path).convert("RGB")))
        Image.fromarray(grey, "L").save(
            eight_bit / schema.MODALITY_FOLDERS["depth_map"] / path.name
        )
        Image.fromarray(grey.astype(np.uint16) * 257).save(path)  # the 16-bit twin
    wide = prepare_dataset(synth_copy, image_size=16, modalities=["depth_map"])
    narrow = prepare_dataset(eight_bit, image_size=16, modalities=["depth_map"])
    assert 0 < narrow.images["depth_map"].mean() < 200
    np.testing.assert_array_equal(wide.images["depth_map"], narrow.images["depth_map"])
