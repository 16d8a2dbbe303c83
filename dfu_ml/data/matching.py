"""Matching image sets to clinical rows.

One training row is one image set of a visit: a depth box (depth RGB + its depth map) plus the
thermal box of the same capture (thermal RGB + its thermal map), plus the visit's clinical row.
The exact capture is tried first; looser fallbacks are counted, never silent.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import pandas as pd

from dfu_ml.data import schema
from dfu_ml.data.reading import parse_image_name
from dfu_ml.errors import DataError

MATCH_EXACT = "exact"
MATCH_OTHER_VIEW = "other_angle_or_view"
MATCH_OTHER_DEBRIDEMENT = "other_debridement"
MATCH_NONE = "none"


APPT_DAYS = "Appt Days"


def _compatible(a: pd.Series, b: pd.Series) -> bool:
    """Equal wherever both rows have a value (one copy may have blanks the other fills)."""
    return bool(((a == b) | a.isna() | b.isna()).all())


def deduplicate_visits(
    clinical: pd.DataFrame, source: str = "clinical CSV"
) -> tuple[pd.DataFrame, dict]:
    """One row per visit key without losing a visit; returns the frame and counts for the report.

    A row that repeats an earlier row's visit key (``Patient#``, ``Appt#``, ``DFU#``) is

    - **merged** into that row when the two agree wherever both have a value (the same visit
      entered twice; a value only the copy has fills the blank);
    - **renumbered** when its ``Appt Days`` differs from every earlier row of that key: it is
      another visit whose appointment number was mistyped, so it gets the next appointment
      number after the highest that the patient's ulcer has in the file. The key's first row
      keeps its number, and with it the images named with that number. In the real data this
      is patients 75 (days 0 and 7) and 161 (days 0 and 56, and images named appointment 1 that
      have no clinical row: renumbered, the day-56 visit gets exactly those images);
    - otherwise (the same day with conflicting values) an error: which row is right is not ours
      to guess.

    Counts: ``duplicate_visit_keys`` (rows repeating a key), ``duplicate_rows_merged``,
    ``visits_renumbered`` and ``renumbered_visits`` (one line each: where, from, to, why).
    """
    key = list(schema.VISIT_KEY)
    compared = [c for c in clinical.columns if c != "row_in_file"]
    appt_days = clinical[APPT_DAYS] if APPT_DAYS in clinical else pd.Series(np.nan, clinical.index)
    out = clinical.copy()
    highest = clinical.groupby([schema.PATIENT_COLUMN, schema.DFU_COLUMN])[schema.APPT_COLUMN].max()
    rows_of_key: dict[tuple, list[int]] = {}
    merged, renumbered = [], []
    for i, visit in enumerate(zip(*(clinical[c] for c in key))):
        earlier = rows_of_key.setdefault(visit, [])
        if not earlier:
            earlier.append(i)
            continue
        row = clinical.iloc[i][compared]
        twin = next((j for j in earlier if _compatible(row, out.iloc[j][compared])), None)
        if twin is not None:
            out.loc[out.index[twin], compared] = out.iloc[twin][compared].combine_first(row)
            merged.append(i)
            continue
        days = appt_days.iloc[i]
        if pd.isna(days) or any(appt_days.iloc[j] == days for j in earlier):
            lines = ", ".join(str(clinical["row_in_file"].iloc[j]) for j in (*earlier, i))
            raise DataError(
                f"{source}, lines {lines}: the same visit key {dict(zip(key, visit))} and "
                f"the same {APPT_DAYS!r} with conflicting values; remove the wrong row or "
                "correct its Appt#"
            )
        ulcer = (visit[0], visit[2])
        highest[ulcer] += 1
        out.iloc[i, out.columns.get_loc(schema.APPT_COLUMN)] = highest[ulcer]
        earlier.append(i)
        first = earlier[0]
        renumbered.append(
            f"patient {visit[0]}, ulcer {visit[2]}, line {clinical['row_in_file'].iloc[i]}: "
            f"Appt# {visit[1]} -> {highest[ulcer]} ({APPT_DAYS} {days:g}; line "
            f"{clinical['row_in_file'].iloc[first]} keeps Appt# {visit[1]} at "
            f"{APPT_DAYS} {appt_days.iloc[first]:g})"
        )
    counts = {
        "duplicate_visit_keys": len(merged) + len(renumbered),
        "duplicate_rows_merged": len(merged),
        "visits_renumbered": len(renumbered),
        "renumbered_visits": renumbered,
    }
    return out.drop(index=out.index[merged]).reset_index(drop=True), counts


def _with_capture(boxes: pd.DataFrame) -> pd.DataFrame:
    parsed = [parse_image_name(n) for n in boxes["Filename"]]
    out = boxes.copy()
    out["debri"] = [p.debri for p in parsed]
    out["angle_view"] = [p.angle + p.view for p in parsed]
    out["capture"] = [p.capture for p in parsed]
    out["visit"] = list(
        zip(boxes[schema.PATIENT_COLUMN], boxes[schema.APPT_COLUMN], boxes[schema.DFU_COLUMN])
    )
    return out


def match_image_sets(
    clinical: pd.DataFrame, depth_boxes: pd.DataFrame, thermal_boxes: pd.DataFrame
) -> tuple[pd.DataFrame, dict]:
    """Build one row per depth box, matched to its thermal twin and its visit.

    Returns the image-set frame (columns ``visit_index``, ``patient``, ``appt``, ``dfu``,
    ``depth_file``, ``thermal_file``, the two boxes, ``thermal_match``) and counts for the report.
    Sets whose visit has no clinical row are dropped and counted.
    """
    visit_index = {
        key: i
        for i, key in enumerate(
            zip(
                clinical[schema.PATIENT_COLUMN],
                clinical[schema.APPT_COLUMN],
                clinical[schema.DFU_COLUMN],
            )
        )
    }
    depth = _with_capture(depth_boxes)
    thermal = _with_capture(thermal_boxes)

    exact: dict[tuple, int] = {}
    by_visit_debri: dict[tuple, list[int]] = {}
    by_visit: dict[tuple, list[int]] = {}
    for i, row in enumerate(thermal.itertuples(index=False)):
        visit = row.visit
        exact.setdefault((row.capture, visit), i)
        by_visit_debri.setdefault((visit, row.debri), []).append(i)
        by_visit.setdefault(visit, []).append(i)

    rows = []
    counts: Counter = Counter()
    for row in depth.itertuples(index=False):
        visit = row.visit
        if visit not in visit_index:
            counts["sets_without_clinical_row"] += 1
            continue
        t_index, how = exact.get((row.capture, visit)), MATCH_EXACT
        if t_index is None:
            candidates, how = by_visit_debri.get((visit, row.debri), []), MATCH_OTHER_VIEW
            if not candidates:
                candidates, how = by_visit.get(visit, []), MATCH_OTHER_DEBRIDEMENT
            t_index = candidates[0] if candidates else None
            if t_index is None:
                how = MATCH_NONE
        counts[f"thermal_match_{how}"] += 1
        t_row = thermal.iloc[t_index] if t_index is not None else None
        rows.append(
            {
                "visit_index": visit_index[visit],
                "patient": visit[0],
                "appt": visit[1],
                "dfu": visit[2],
                "debri": row.debri,
                "angle_view": row.angle_view,
                "depth_file": row.Filename,
                "depth_box": (row.Xmin, row.Ymin, row.Xmax, row.Ymax),
                "depth_box_line": row.row_in_file,
                "thermal_file": None if t_row is None else t_row["Filename"],
                "thermal_box": None
                if t_row is None
                else (
                    int(t_row["Xmin"]),
                    int(t_row["Ymin"]),
                    int(t_row["Xmax"]),
                    int(t_row["Ymax"]),
                ),
                "thermal_box_line": None if t_row is None else int(t_row["row_in_file"]),
                "thermal_match": how,
            }
        )
    sets = pd.DataFrame(
        rows,
        columns=[
            "visit_index",
            "patient",
            "appt",
            "dfu",
            "debri",
            "angle_view",
            "depth_file",
            "depth_box",
            "depth_box_line",
            "thermal_file",
            "thermal_box",
            "thermal_box_line",
            "thermal_match",
        ],
    )
    used_thermal = set(sets["thermal_file"].dropna())
    counts["thermal_images_without_depth_twin"] = int(
        (~thermal["Filename"].isin(used_thermal)).sum()
    )
    counts["loose_matches"] = (
        counts[f"thermal_match_{MATCH_OTHER_VIEW}"]
        + counts[f"thermal_match_{MATCH_OTHER_DEBRIDEMENT}"]
    )
    counts["visits_with_images"] = int(np.unique(sets["visit_index"]).size) if len(sets) else 0
    return sets, dict(counts)
