"""Reading the study's CSVs with the csv module alone, to check the library against."""

import csv
from pathlib import Path

from dfu_ml.data import schema


def csv_rows(path: Path) -> tuple[list[str], list[dict]]:
    with open(path, newline="", encoding="utf-8-sig") as handle:
        reader = csv.reader(handle)
        header = next(reader)
        return header, [dict(zip(header, values)) for values in reader]


def visit_key(row: dict) -> tuple:
    return tuple(int(row[c]) for c in schema.VISIT_KEY)
