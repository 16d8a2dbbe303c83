"""Reading the study's CSV files exactly as users hold them.

Quirks handled here (DATA.md): a UTF-8 BOM, quoted headers with commas, text-coded columns, visit
keys zero-padded in one CSV and not in the other, duplicated visit keys, missing values.
"""

from __future__ import annotations

import csv
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from dfu_ml.data import schema
from dfu_ml.errors import DataError

IMAGE_NAME_PATTERN = re.compile(
    r"^(?P<seq>\d+)_P(?P<patient>\d{3})(?P<appt>\d{2})(?P<dfu>\d)"
    r"(?P<debri>[AB])(?P<camera>[DT])(?P<angle>[LMR])(?P<view>[WZ])\.png$"
)


@dataclass(frozen=True)
class ImageName:
    """The parts of an image file name such as ``280_P003011BDLW.png``."""

    seq: int
    patient: int
    appt: int
    dfu: int
    debri: str
    camera: str
    angle: str
    view: str

    @property
    def capture(self) -> tuple:
        """What identifies one capture, whichever camera took it."""
        return (self.patient, self.appt, self.dfu, self.debri, self.angle, self.view)


def parse_image_name(name: str) -> ImageName:
    """Parse the study's image file-name convention, or raise DataError naming the file."""
    match = IMAGE_NAME_PATTERN.match(name)
    if match is None:
        raise DataError(
            f"image file name {name!r} does not follow the convention "
            "'{seq}_P{PPP}{AA}{D}{B|A}{D|T}{L|M|R}{W|Z}.png' (e.g. 280_P003011BDLW.png)"
        )
    g = match.groupdict()
    return ImageName(
        int(g["seq"]),
        int(g["patient"]),
        int(g["appt"]),
        int(g["dfu"]),
        g["debri"],
        g["camera"],
        g["angle"],
        g["view"],
    )


def format_image_name(
    seq: int, patient: int, appt: int, dfu: int, debri: str, camera: str, angle: str, view: str
) -> str:
    """The inverse of :func:`parse_image_name`."""
    return f"{seq}_P{patient:03d}{appt:02d}{dfu}{debri}{camera}{angle}{view}.png"


def _read_csv(path: Path, what: str) -> pd.DataFrame:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{what} not found: {path}")
    raw = path.read_bytes()[:4096]
    if b"\x00" in raw or raw[:8] == b"\x89PNG\r\n\x1a\n":
        raise DataError(f"{path} is not a CSV file (it holds binary data); expected the {what}")
    try:
        # utf-8-sig drops the BOM; everything is read as text first so that padded IDs survive.
        frame = pd.read_csv(
            path,
            encoding="utf-8-sig",
            dtype=str,
            keep_default_na=False,
            na_values=[""],
            skipinitialspace=False,
        )
    except (pd.errors.ParserError, UnicodeDecodeError, csv.Error) as exc:
        raise DataError(f"{path} is not a readable CSV ({what}): {exc}") from None
    except pd.errors.EmptyDataError:
        raise DataError(f"{path} is empty; expected the {what}") from None
    _reject_duplicate_headers(path)
    frame.columns = [c.strip() for c in frame.columns]
    return frame


def _reject_duplicate_headers(path: Path) -> None:
    """A repeated column name is an error: pandas would rename the second copy (``Patient#.1``)
    and every reader would silently use the first."""
    with open(path, encoding="utf-8-sig", newline="") as handle:
        header = next(csv.reader(handle), [])
    seen: dict[str, int] = {}
    for number, name in enumerate((h.strip() for h in header), start=1):
        if name in seen:
            raise DataError(
                f"{path}, line 1: column {name!r} appears twice (columns {seen[name]} and "
                f"{number}); remove or rename one of them"
            )
        seen[name] = number


def _require_columns(frame: pd.DataFrame, columns, path: Path) -> None:
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise DataError(
            f"{path}: missing required column(s) {missing}; found {list(frame.columns)[:8]}..."
            if len(frame.columns) > 8
            else f"{path}: missing required column(s) {missing}; found {list(frame.columns)}"
        )


def _to_int_column(frame: pd.DataFrame, column: str, path: Path) -> pd.Series:
    values = pd.to_numeric(frame[column].str.strip(), errors="coerce")
    bad = values.isna() | (values % 1 != 0)
    if bad.any():
        row = int(np.flatnonzero(bad.to_numpy())[0])
        raise DataError(
            f"{path}, line {row + 2}, column {column!r}: "
            f"{frame[column].iloc[row]!r} is not an integer identifier"
        )
    return values.astype(int)


def read_clinical(path: Path, require_labels: bool = True) -> pd.DataFrame:
    """Read the clinical CSV into a frame with integer visit keys and a 0/1/2 ``label`` column.

    Numeric columns become floats, text-coded columns stay text (features.py encodes them against
    fixed lists). ``label`` is -1 for rows without a label when ``require_labels`` is False.
    """
    path = Path(path)
    frame = _read_csv(path, "clinical CSV")
    _require_columns(frame, schema.REQUIRED_CLINICAL_COLUMNS, path)
    if require_labels and schema.LABEL_COLUMN not in frame.columns:
        raise DataError(
            f"{path}: label column {schema.LABEL_COLUMN!r} is missing; add it with values "
            f"{'/'.join(schema.CLASS_NAMES)}, or use predict for unlabelled data"
        )
    if frame.empty:
        raise DataError(f"{path}: the clinical CSV has a header but no rows")
    for column in schema.VISIT_KEY:
        frame[column] = _to_int_column(frame, column, path)
    for column in frame.columns:
        if column in schema.TEXT_COLUMNS or column in schema.VISIT_KEY:
            continue
        numeric = pd.to_numeric(frame[column].str.strip(), errors="coerce")
        not_numeric = numeric.isna() & frame[column].notna()
        if not_numeric.any() and column in schema.NUMERIC_FEATURE_COLUMNS:
            row = int(np.flatnonzero(not_numeric.to_numpy())[0])
            raise DataError(
                f"{path}, line {row + 2}, column {column!r}: {frame[column].iloc[row]!r} is not a "
                "number; fix the value or leave the cell empty for 'missing'"
            )
        frame[column] = numeric.astype(float)
    frame["label"] = _encode_labels(frame, path, require_labels)
    frame["row_in_file"] = np.arange(len(frame)) + 2
    return frame.reset_index(drop=True)


def _encode_labels(frame: pd.DataFrame, path: Path, require_labels: bool) -> np.ndarray:
    if schema.LABEL_COLUMN not in frame.columns:
        return np.full(len(frame), -1, dtype=int)
    codes = {name: i for i, name in enumerate(schema.CLASS_NAMES)}
    text = frame[schema.LABEL_COLUMN].fillna("").str.strip().str.upper()
    labels = text.map(codes)
    unknown = labels.isna() & ((text != "") | require_labels)
    if unknown.any():
        row = int(np.flatnonzero(unknown.to_numpy())[0])
        raise DataError(
            f"{path}, line {row + 2}, column {schema.LABEL_COLUMN!r}: label "
            f"{frame[schema.LABEL_COLUMN].iloc[row]!r} is not one of "
            f"{', '.join(schema.CLASS_NAMES)} ({unknown.sum()} such row(s))"
        )
    return labels.fillna(-1).astype(int).to_numpy()


def read_boxes(path: Path, camera: str) -> pd.DataFrame:
    """Read one bounding-box CSV; visit keys become integers whatever their zero-padding."""
    path = Path(path)
    frame = _read_csv(path, f"bounding-box CSV for camera {camera}")
    _require_columns(frame, schema.BOX_COLUMNS, path)
    if frame.empty:
        raise DataError(f"{path}: the bounding-box CSV has a header but no rows")
    empty = frame["Filename"].isna() | (frame["Filename"].str.strip() == "")
    if empty.any():
        row = int(np.flatnonzero(empty.to_numpy())[0])
        raise DataError(
            f"{path}, line {row + 2}, column 'Filename': the cell is empty ({int(empty.sum())} "
            "such row(s)); give the image file name or remove the row"
        )
    for column in (*schema.VISIT_KEY, "Bounding Box Number", "Xmin", "Ymin", "Xmax", "Ymax"):
        frame[column] = _to_int_column(frame, column, path)
    frame["Filename"] = frame["Filename"].str.strip()
    for row, name in enumerate(frame["Filename"]):
        try:
            parsed = parse_image_name(name)
        except DataError as exc:
            raise DataError(f"{path}, line {row + 2}: {exc}") from None
        if parsed.camera != camera:
            raise DataError(
                f"{path}, line {row + 2}: {name!r} is a camera-{parsed.camera} image in the "
                f"camera-{camera} box file; check that the depth and thermal CSVs are not swapped"
            )
    empty = (frame["Xmax"] <= frame["Xmin"]) | (frame["Ymax"] <= frame["Ymin"])
    if empty.any():
        row = int(np.flatnonzero(empty.to_numpy())[0])
        raise DataError(
            f"{path}, line {row + 2} ({frame['Filename'].iloc[row]}): bounding box "
            f"({frame['Xmin'].iloc[row]}, {frame['Ymin'].iloc[row]}, {frame['Xmax'].iloc[row]}, "
            f"{frame['Ymax'].iloc[row]}) has zero or negative area; fix Xmin<Xmax and Ymin<Ymax"
        )
    frame["row_in_file"] = np.arange(len(frame)) + 2
    return frame.reset_index(drop=True)
