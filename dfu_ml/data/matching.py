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

MATCH_EXACT = "exact"
MATCH_OTHER_VIEW = "other_angle_or_view"
MATCH_OTHER_DEBRIDEMENT = "other_debridement"
MATCH_NONE = "none"


def deduplicate_visits(clinical: pd.DataFrame) -> tuple[pd.DataFrame, int]:
    """Keep the first row of each duplicated visit key; return the frame and how many were dropped."""
    duplicated = clinical.duplicated(list(schema.VISIT_KEY), keep="first")
    return clinical.loc[~duplicated].reset_index(drop=True), int(duplicated.sum())


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
