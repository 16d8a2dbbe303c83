"""Bad input gives a DfuError subclass whose message names the file, row, column or setting at
fault; the step CLIs print it as ``error: ...`` with exit code 2 and no traceback."""

import csv
import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from dfu_ml.config import load_config
from dfu_ml.data import schema
from dfu_ml.data.prepare import PreparedDataset, prepare_dataset
from dfu_ml.data.reading import read_boxes, read_clinical
from dfu_ml.data.synthetic import generate_synthetic_dataset
from dfu_ml.errors import ConfigError, DataError, FoldError, StorageError
from dfu_ml.folds import patient_folds

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny")
    generate_synthetic_dataset(out, patients=4, seed=1, image_scale=0.05)
    return out


@pytest.fixture
def data(tiny, tmp_path):
    target = tmp_path / "data"
    shutil.copytree(tiny, target)
    return target


def _read(path: Path) -> tuple[list[str], list[list[str]]]:
    with open(path, newline="", encoding="utf-8-sig") as handle:
        rows = list(csv.reader(handle))
    return rows[0], rows[1:]


def _write(path: Path, header, rows, bom=True) -> None:
    with open(path, "w", newline="", encoding="utf-8-sig" if bom else "utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)


def _message(excinfo) -> str:
    return str(excinfo.value)


# --------------------------------------------------------------------------------------------
# Clinical CSV


def test_missing_label_column(data):
    path = data / schema.CLINICAL_CSV
    header, rows = _read(path)
    i = header.index(schema.LABEL_COLUMN)
    _write(path, header[:i] + header[i + 1 :], [r[:i] + r[i + 1 :] for r in rows])
    with pytest.raises(DataError) as info:
        prepare_dataset(data, image_size=16)
    assert str(path) in _message(info) and repr(schema.LABEL_COLUMN) in _message(info)


def test_unknown_label_value_names_the_line(data):
    path = data / schema.CLINICAL_CSV
    header, rows = _read(path)
    index = 3
    rows[index][header.index(schema.LABEL_COLUMN)] = "X"
    _write(path, header, rows)
    with pytest.raises(DataError) as info:
        read_clinical(path)
    message = _message(info)
    assert str(path) in message
    assert f"line {index + 2}" in message  # header is line 1
    assert "'X'" in message and repr(schema.LABEL_COLUMN) in message


def test_missing_required_column(data):
    path = data / schema.CLINICAL_CSV
    header, rows = _read(path)
    i = header.index(schema.DFU_COLUMN)
    _write(path, header[:i] + header[i + 1 :], [r[:i] + r[i + 1 :] for r in rows])
    with pytest.raises(DataError) as info:
        prepare_dataset(data, image_size=16)
    assert str(path) in _message(info) and schema.DFU_COLUMN in _message(info)


def test_non_integer_visit_key_names_line_and_column(data):
    path = data / schema.CLINICAL_CSV
    header, rows = _read(path)
    rows[5][header.index(schema.APPT_COLUMN)] = "two"
    _write(path, header, rows)
    with pytest.raises(DataError) as info:
        read_clinical(path)
    assert "line 7" in _message(info) and repr(schema.APPT_COLUMN) in _message(info)
    assert "'two'" in _message(info)


def test_text_in_a_numeric_column_names_line_and_column(data):
    path = data / schema.CLINICAL_CSV
    header, rows = _read(path)
    rows[0][header.index(schema.WOUND_TEMP)] = "warm"
    _write(path, header, rows)
    with pytest.raises(DataError) as info:
        read_clinical(path)
    assert "line 2" in _message(info) and repr(schema.WOUND_TEMP) in _message(info)


@pytest.mark.parametrize("column", [schema.LABEL_COLUMN, schema.PATIENT_COLUMN])
def test_a_duplicated_header_names_the_column_and_both_positions(data, column):
    path = data / schema.CLINICAL_CSV
    header, rows = _read(path)
    i = header.index(column)
    _write(path, header + [column], [r + [r[i]] for r in rows])
    with pytest.raises(DataError) as info:
        read_clinical(path)
    message = _message(info)
    assert str(path) in message and "line 1" in message
    assert f"column {column!r} appears twice (columns {i + 1} and {len(header) + 1})" in message


def test_a_duplicated_box_header_is_an_error(data):
    path = data / schema.DEPTH_BOX_CSV
    header, rows = _read(path)
    _write(path, header + ["Xmin"], [r + ["0"] for r in rows], bom=False)
    with pytest.raises(DataError, match="column 'Xmin' appears twice"):
        read_boxes(path, "D")


def test_an_empty_filename_in_a_box_csv_names_the_line(data):
    path = data / schema.THERMAL_BOX_CSV
    header, rows = _read(path)
    rows[2][header.index("Filename")] = ""
    _write(path, header, rows, bom=False)
    with pytest.raises(DataError) as info:
        read_boxes(path, "T")
    assert str(path) in _message(info) and "line 4, column 'Filename'" in _message(info)
    assert "empty" in _message(info)


def test_png_renamed_to_csv(data):
    path = data / schema.CLINICAL_CSV
    png = next((data / schema.MODALITY_FOLDERS["depth_rgb"]).glob("*.png"))
    shutil.copyfile(png, path)
    with pytest.raises(DataError, match="not a CSV") as info:
        prepare_dataset(data, image_size=16)
    assert str(path) in _message(info)


@pytest.mark.parametrize("with_nul", [True, False])
def test_random_binary_file_as_csv(data, with_nul):
    path = data / schema.DEPTH_BOX_CSV
    rng = np.random.default_rng(7)
    low = 0 if with_nul else 0x80  # 0x80..0xff alone is never valid UTF-8 text
    payload = rng.integers(low, 256, 5000, dtype=np.uint8)
    if with_nul:
        payload[10] = 0
    path.write_bytes(payload.tobytes())
    with pytest.raises(DataError) as info:
        read_boxes(path, "D")
    assert str(path) in _message(info)


def test_empty_clinical_csv(data):
    path = data / schema.CLINICAL_CSV
    path.write_text("")
    with pytest.raises(DataError, match="empty") as info:
        read_clinical(path)
    assert str(path) in _message(info)


# --------------------------------------------------------------------------------------------
# Images and boxes


def test_missing_image_file(data):
    _, rows = _read(data / schema.DEPTH_BOX_CSV)
    missing = data / schema.MODALITY_FOLDERS["depth_rgb"] / rows[-1][0]
    missing.unlink()
    with pytest.raises(DataError) as info:
        prepare_dataset(data, image_size=16)
    assert str(missing) in _message(info)


def test_corrupt_png(data):
    _, rows = _read(data / schema.THERMAL_BOX_CSV)
    path = data / schema.MODALITY_FOLDERS["thermal_map"] / rows[0][0]
    content = path.read_bytes()
    path.write_bytes(content[: len(content) // 2])
    with pytest.raises(DataError, match="corrupt") as info:
        prepare_dataset(data, image_size=16)
    assert str(path) in _message(info)


def _edit_box(path: Path, index: int, **values) -> str:
    header, rows = _read(path)
    for column, value in values.items():
        rows[index][header.index(column)] = str(value)
    _write(path, header, rows, bom=False)
    return rows[index][0]


def test_box_outside_the_image(data):
    path = data / schema.DEPTH_BOX_CSV
    name = _edit_box(path, 2, Xmax=5000)
    with pytest.raises(DataError, match="outside") as info:
        prepare_dataset(data, image_size=16)
    message = _message(info)
    assert schema.DEPTH_BOX_CSV in message and "line 4" in message and name in message


def test_box_with_zero_area(data):
    path = data / schema.THERMAL_BOX_CSV
    header, rows = _read(path)
    name = _edit_box(path, 1, Ymax=rows[1][header.index("Ymin")])
    with pytest.raises(DataError, match="zero or negative area") as info:
        prepare_dataset(data, image_size=16)
    message = _message(info)
    assert str(path) in message and "line 3" in message and name in message


def test_swapped_box_csvs(data):
    depth, thermal = data / schema.DEPTH_BOX_CSV, data / schema.THERMAL_BOX_CSV
    depth_text = depth.read_bytes()
    depth.write_bytes(thermal.read_bytes())
    thermal.write_bytes(depth_text)
    with pytest.raises(DataError, match="swapped") as info:
        prepare_dataset(data, image_size=16)
    assert str(depth) in _message(info) and "line 2" in _message(info)


def test_dataset_folder_without_clinical_csv(tmp_path):
    with pytest.raises(DataError, match=re.escape(schema.CLINICAL_CSV)) as info:
        prepare_dataset(tmp_path, image_size=16)
    assert str(tmp_path) in _message(info)


# --------------------------------------------------------------------------------------------
# Empty data and impossible folds


def _metadata_dataset(patients, labels) -> PreparedDataset:
    visits = pd.DataFrame(
        {
            schema.PATIENT_COLUMN: patients,
            schema.APPT_COLUMN: range(len(labels)),
            schema.DFU_COLUMN: 1,
            "label": labels,
        }
    )
    return PreparedDataset(
        visits=visits,
        sets=pd.DataFrame(),
        images={},
        meta={"image_size": 16, "modalities": [], "counts": {}},
    )


def test_no_labelled_rows_after_filtering():
    from dfu_ml.training.fold import training_rows

    dataset = _metadata_dataset([1, 1, 2, 3], [-1, -1, -1, -1])
    with pytest.raises(DataError, match="no labelled rows") as info:
        training_rows(dataset, load_config("smoke", ["modalities=metadata"]))
    assert "metadata" in _message(info)


def test_empty_rows_for_folds():
    with pytest.raises(DataError, match="empty"):
        patient_folds(np.array([], dtype=int), np.array([], dtype=int), 3, seed=0)


def test_fold_without_a_class_through_plan_fold():
    from dfu_ml.training.fold import plan_fold

    patients = np.repeat(np.arange(1, 9), 3)
    labels = np.tile([0, 1, 0], 8)
    labels[patients == 5] = 2  # only one patient has R
    dataset = _metadata_dataset(patients, labels)
    with pytest.raises(FoldError) as info:
        plan_fold(dataset, load_config("smoke", ["modalities=metadata", "cv_folds=2"]), 0)
    assert re.search(r"fold [01]\b", _message(info)) and "no R rows" in _message(info)


def test_bad_config_value_names_the_key():
    with pytest.raises(ConfigError, match="'cv_folds'"):
        load_config("smoke", ["cv_folds=1"])


# --------------------------------------------------------------------------------------------
# Object storage


@pytest.fixture
def clean_s3_env(monkeypatch):
    for name in (
        "DFU_S3_ENDPOINT",
        "DFU_S3_ACCESS_KEY",
        "DFU_S3_SECRET_KEY",
        "DFU_S3_SECURE",
        "DFU_S3_REGION",
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
    ):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_unreachable_object_storage_names_the_endpoint(clean_s3_env, tmp_path):
    from dfu_ml.storage import download_tree

    endpoint = f"127.0.0.1:{_closed_port()}"
    clean_s3_env.setenv("DFU_S3_ENDPOINT", endpoint)
    clean_s3_env.setenv("DFU_S3_ACCESS_KEY", "someone")
    clean_s3_env.setenv("DFU_S3_SECRET_KEY", "some-secret-key")
    clean_s3_env.setenv("DFU_S3_SECURE", "false")
    # (a bucket name of 3+ characters: 's3://b/p' would fail on the name before connecting)
    with pytest.raises(StorageError, match="cannot reach") as info:
        download_tree("s3://bucket/p", tmp_path / "out")
    assert endpoint in _message(info)
    assert "some-secret-key" not in _message(info)
    assert not (tmp_path / "out").exists()


def test_object_storage_without_endpoint(clean_s3_env, tmp_path):
    from dfu_ml.storage import download_tree

    clean_s3_env.setenv("DFU_S3_ACCESS_KEY", "someone")
    clean_s3_env.setenv("DFU_S3_SECRET_KEY", "some-secret-key")
    with pytest.raises(StorageError, match="DFU_S3_ENDPOINT") as info:
        download_tree("s3://bucket/p", tmp_path / "out")
    assert "not configured" in _message(info)


# --------------------------------------------------------------------------------------------
# The step CLI prints the message, exits 2, and shows no traceback


def test_prepare_cli_reports_bad_input_without_traceback(data, tmp_path):
    bad_csv = data / schema.CLINICAL_CSV
    shutil.copyfile(next((data / schema.MODALITY_FOLDERS["depth_map"]).glob("*.png")), bad_csv)
    env = dict(os.environ, PYTHONPATH=str(REPO))
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "components.prepare",
            "--data",
            str(data),
            "--out",
            str(tmp_path / "out"),
            "--config",
            "smoke",
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert result.stderr.startswith("error: ")
    assert str(bad_csv) in result.stderr and "not a CSV" in result.stderr
    assert not (tmp_path / "out" / "dataset.npz").exists()
