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


def visits_by_key(rows: list[dict]) -> dict[tuple, dict]:
    """The visits of a clinical CSV by key, as DATA.md says duplicated keys are resolved: a
    repeated key on another "Appt Days" is another visit, numbered after the ulcer's highest
    appointment; on the same day it is the same visit (the first row)."""
    highest: dict[tuple, int] = {}
    for row in rows:
        patient, appt, dfu = visit_key(row)
        highest[(patient, dfu)] = max(highest.get((patient, dfu), appt), appt)
    visits: dict[tuple, dict] = {}
    for row in rows:
        key = visit_key(row)
        if key in visits and visits[key]["Appt Days"] != row["Appt Days"]:
            highest[(key[0], key[2])] += 1
            key = (key[0], highest[(key[0], key[2])], key[2])
        visits.setdefault(key, row)
    return visits
