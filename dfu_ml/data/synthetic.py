"""Synthetic DFU datasets in the study's exact layout.

``generate_synthetic_dataset`` invents patients, visits and captures with a class mix like the
real one, a tunable class signal in the clinical columns and in the images, and writes the clinical
CSV (BOM, quoted headers, text codes, missing values, a duplicated visit key), both box CSVs (depth
zero-padded, thermal not) and PNGs for the four modalities.

``render_from_real`` renders images for the rows and boxes of a real dataset. Every pixel comes
from the visit's measurements (temperatures, exudate, wound score), never from its label.
"""

from __future__ import annotations

import csv
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from dfu_ml.data import schema
from dfu_ml.data.matching import deduplicate_visits
from dfu_ml.data.reading import format_image_name, parse_image_name, read_boxes, read_clinical
from dfu_ml.errors import ConfigError

CLASS_MIX = (0.31, 0.557, 0.133)  # I, P, R of the real 890 visits
ANGLE_VIEWS = ("LW", "MW", "RW", "MZ")
MEDIAN_BOX = 56  # px at full resolution
THERMAL_MAP_RANGE = (24.0, 38.0)  # degC mapped onto the viridis scale


@dataclass
class Appearance:
    """What the renderer needs to know about one wound at one visit."""

    wound_temp: float = 31.0
    peri_temp: float = 31.0
    skin_temp: float = 30.5
    exudate: float = 0.5  # 0..3
    wound_score: float = 1.0  # 0..4
    redness: float = 0.0  # extra image-only tint (synthetic class signal), -1..1

    @classmethod
    def from_clinical_row(cls, row: pd.Series) -> "Appearance":
        """Measurements only: the label never reaches the renderer."""

        def value(column, default):
            v = row.get(column, np.nan)
            try:
                v = float(v)
            except (TypeError, ValueError):
                return default
            return default if np.isnan(v) else v

        skin = value(schema.SKIN_TEMP, 30.5)
        return cls(
            wound_temp=value(schema.WOUND_TEMP, skin),
            peri_temp=value(schema.PERI_TEMP, skin),
            skin_temp=skin,
            exudate=value(schema.EXUDATE_AMOUNT, 0.5),
            wound_score=value(schema.WOUND_SCORE, 1.0),
        )


_VIRIDIS = None


def _viridis() -> np.ndarray:
    global _VIRIDIS
    if _VIRIDIS is None:
        from matplotlib import colormaps

        _VIRIDIS = (colormaps["viridis"](np.linspace(0, 1, 256))[:, :3] * 255).astype(np.uint8)
    return _VIRIDIS


def _smooth_noise(rng: np.random.Generator, height: int, width: int, cell: int = 16) -> np.ndarray:
    """Low-frequency noise in [-1, 1], cheap at full frame size (drawn small, upsampled)."""
    small = rng.uniform(-1, 1, (max(2, height // cell), max(2, width // cell))).astype(np.float32)
    return np.asarray(Image.fromarray(small, mode="F").resize((width, height), Image.BILINEAR))


def _wound_masks(
    height: int, width: int, boxes: list[tuple]
) -> list[tuple[np.ndarray, slice, slice]]:
    """For each box: an elliptical falloff (1 at the centre, 0 outside) over a padded window."""
    masks = []
    for x0, y0, x1, y1 in boxes:
        pad_x, pad_y = (x1 - x0), (y1 - y0)
        ys = slice(max(0, y0 - pad_y), min(height, y1 + pad_y))
        xs = slice(max(0, x0 - pad_x), min(width, x1 + pad_x))
        yy, xx = np.mgrid[ys, xs].astype(np.float32)
        cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
        rx, ry = max(1.0, (x1 - x0) / 2), max(1.0, (y1 - y0) / 2)
        dist = np.sqrt(((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2)
        masks.append((dist, ys, xs))
    return masks


def _fov_mask(height: int, width: int) -> np.ndarray:
    """The thermal camera's black field-of-view border."""
    yy, xx = np.ogrid[:height, :width]
    return ((xx - width / 2) / (width * 0.55)) ** 2 + (
        (yy - height / 2) / (height * 0.52)
    ) ** 2 <= 1


def render_depth_pair(rng, size: tuple[int, int], wounds: list[tuple[tuple, Appearance]]):
    """Depth RGB and depth map (viridis) frames with the given wounds."""
    width, height = size
    noise = _smooth_noise(rng, height, width)
    skin = np.array([196, 150, 128], np.float32)
    rgb = skin[None, None, :] * (1 + 0.08 * noise[..., None])
    depth = 0.55 + 0.25 * np.linspace(-1, 1, height, dtype=np.float32)[:, None] + 0.05 * noise
    for (dist, ys, xs), (_, look) in zip(
        _wound_masks(height, width, [b for b, _ in wounds]), wounds
    ):
        inside = np.clip(1.2 - dist, 0, 1)[..., None]
        # Inflamed, exuding wounds look redder and wetter; healing ones paler and pinker.
        heat = np.clip((look.wound_temp - look.skin_temp) / 3.0, -1, 1.5)
        wound = np.array(
            [
                150 + 40 * heat + 40 * look.redness,
                60 + 25 * look.exudate,
                60 + 15 * look.wound_score - 30 * look.redness,
            ],
            np.float32,
        )
        rgb[ys, xs] = rgb[ys, xs] * (1 - inside) + np.clip(wound, 0, 255) * inside
        depth[ys, xs] -= (0.05 + 0.04 * look.wound_score + 0.05 * look.redness) * inside[..., 0]
    rgb = np.clip(rgb + rng.normal(0, 4, (1, 1, 3)), 0, 255).astype(np.uint8)
    depth_map = _viridis()[np.clip(depth * 255, 0, 255).astype(np.uint8)]
    return rgb, depth_map


def render_thermal_pair(rng, size: tuple[int, int], wounds: list[tuple[tuple, Appearance]]):
    """Thermal RGB and thermal map (viridis over THERMAL_MAP_RANGE) frames with the given wounds."""
    width, height = size
    noise = _smooth_noise(rng, height, width, cell=24)
    skin_temp = float(np.mean([look.skin_temp for _, look in wounds])) if wounds else 30.5
    temp = skin_temp + 0.6 * noise
    rgb = np.repeat((120 + 50 * noise)[..., None], 3, axis=2).astype(np.float32)
    for (dist, ys, xs), (_, look) in zip(
        _wound_masks(height, width, [b for b, _ in wounds]), wounds
    ):
        core = np.clip(1.0 - dist, 0, 1)
        ring = np.clip(1.0 - np.abs(dist - 1.4) / 0.6, 0, 1)
        temp[ys, xs] += (
            (look.wound_temp - skin_temp) * core
            + (look.peri_temp - skin_temp) * ring
            + 3.0 * look.redness * core
        )
        rgb[ys, xs] = (
            rgb[ys, xs] * (1 - core[..., None]) + (90 + 60 * core[..., None]) * core[..., None]
        )
    fov = _fov_mask(height, width)
    thermal_map = _viridis()[
        np.clip(
            (temp - THERMAL_MAP_RANGE[0]) / (THERMAL_MAP_RANGE[1] - THERMAL_MAP_RANGE[0]) * 255,
            0,
            255,
        ).astype(np.uint8)
    ]
    thermal_map[~fov] = 0
    rgb[~fov] = 0
    return np.clip(rgb, 0, 255).astype(np.uint8), thermal_map


def _save_png(array: np.ndarray, path: Path) -> None:
    Image.fromarray(array).save(path, compress_level=1)


def _scaled_frame(camera: str, scale: float) -> tuple[int, int]:
    width, height = schema.FRAME_SIZE[camera]
    return max(32, round(width * scale)), max(32, round(height * scale))


# --------------------------------------------------------------------------------------------
# Generating a dataset from scratch


def _synth_clinical_rows(rng, patients: int, clinical_signal: float) -> list[dict]:
    rows = []
    for patient in range(1, patients + 1):
        n_dfus = int(rng.choice([1, 2], p=[0.7, 0.3]))
        age, weight, height = rng.integers(35, 90), rng.normal(90, 18), rng.normal(172, 9)
        sex, diabetes = rng.choice(["F", "M"], p=[0.2, 0.8]), int(rng.choice([1, 2], p=[0.1, 0.9]))
        n_appts = int(rng.integers(2, 6))
        patient_id = str(rng.integers(1000, 9999))
        for dfu in range(1, n_dfus + 1):
            side, aspect = (
                rng.choice(["Left", "Right"]),
                rng.choice(["Plantar", "Dorsal", "Lateral", "Medial"], p=[0.85, 0.09, 0.04, 0.02]),
            )
            location = rng.choice(
                ["Hallux", "toes", "middle", "Heel", "ankle"], p=[0.35, 0.4, 0.12, 0.1, 0.03]
            )
            onset0 = float(rng.integers(10, 1500))
            # What stays the same at every visit of this ulcer, as CSV columns.
            known = {
                "ID": patient_id,
                "Patient#": patient,
                "Age": age,
                schema.SEX: sex,
                "Weight (Kg)": round(weight, 1),
                "Height (cm)": round(height, 2),
                "Type of Diabetes": diabetes,
                "Number of DFUs": n_dfus,
                "DFU#": dfu,
                schema.SIDE: side,
                "Foot Aspect": aspect,
                "Location": f"{location} area",
                schema.LOCATION_GROUPED: location,
            }
            for appt in range(n_appts):
                label = int(rng.choice(3, p=CLASS_MIX))
                rows.append(_synth_visit(rng, known, appt, label, clinical_signal, onset0))
    return rows


def _synth_visit(rng, known: dict, appt: int, label: int, signal: float, onset0: float) -> dict:
    # The class signal: inflamed wounds are hotter, wetter and score worse; remodelling ones
    # are older. ``signal`` scales every class-dependent shift (0 = no signal).
    phase = label - 1.0  # -1 I, 0 P, +1 R
    skin = rng.normal(30.0, 1.2)
    wound_delta = -1.2 * phase * signal + rng.normal(0.3, 0.8)
    peri_delta = -0.7 * phase * signal + rng.normal(0.2, 0.6)
    exudate = int(np.clip(round(1.0 - 0.8 * phase * signal + rng.normal(0, 0.6)), 0, 3))
    wound_score = int(np.clip(round(2.0 - 1.0 * phase * signal + rng.normal(0, 0.8)), 0, 4))
    row = {c: "" for c in schema.CLINICAL_COLUMNS}
    row.update(known)
    row.update(
        {
            "Smoking": int(rng.integers(0, 3)),
            "Alcohol Consumption": int(rng.integers(0, 3)),
            "Habits Score": int(rng.integers(0, 5)),
            "Heart Conditions": int(rng.random() < 0.3),
            "Cancer History": int(rng.random() < 0.1),
            "Sensory Peripheral": int(rng.random() < 0.6),
            "Clinical Score": int(rng.integers(1, 5)),
            schema.ONSET_DAYS: round(onset0 + 14 * appt + 60 * phase * signal + rng.normal(0, 20)),
            "Appt#": appt,
            "Appt Days": 14 * appt,
            schema.WOUND_TEMP: round(skin + wound_delta, 1),
            schema.PERI_TEMP: round(skin + peri_delta, 1),
            schema.SKIN_TEMP: round(skin, 1),
            schema.WOUND_TEMP_NORM: round(wound_delta / skin, 5),
            schema.PERI_TEMP_NORM: round(peri_delta / skin, 5),
            "Pain Level": int(rng.integers(0, 4)),
            "Type of Pain": "0",
            "Type of Pain Grouped": rng.choice(
                ["NoPain", "ChronicPain", "ThrobbingPain"], p=[0.8, 0.1, 0.1]
            ),
            "Wound Tunneling": int(rng.random() < 0.1),
            schema.EXUDATE_AMOUNT: min(exudate, 2),
            schema.EXUDATE_APPEARANCE: rng.choice(
                ["Serous", "Haemoserous", "Bloody", "Thick"], p=[0.35, 0.17, 0.45, 0.03]
            ),
            "Odor": rng.choice(["NoOdor", "Unpleasant"], p=[0.95, 0.05]),
            schema.WOUND_SCORE: wound_score,
            "Dressing": "Betadine",
            "Dressing Grouped": rng.choice(
                ["Antiseptic", "AbsorbentDressing", "NoDressing"], p=[0.8, 0.12, 0.08]
            ),
            "Leg Score": int(rng.integers(0, 6)),
            "Offloading Score": int(rng.integers(0, 3)),
            "Healing Phase": schema.CLASS_NAMES[label] + rng.choice(["", "+", "-"]),
            "Phase Confidence (%)": int(rng.choice([60, 70, 80, 90])),
            schema.LABEL_COLUMN: schema.CLASS_NAMES[label],
            "_redness": float(np.clip(-0.8 * phase + rng.normal(0, 0.3), -1, 1)),
        }
    )
    for column in schema.CLINICAL_COLUMNS:
        if row[column] == "" and column not in schema.FREE_TEXT_COLUMNS + (
            "Type of Pain2",
            "Type of Pain_Grouped2",
        ):
            row[column] = int(rng.random() < 0.3)
    return row


# Realistic missingness (fraction of rows blank) for a few columns.
MISSING_RATES = {
    schema.EXUDATE_APPEARANCE: 0.2,
    schema.WOUND_TEMP: 0.045,
    schema.PERI_TEMP: 0.046,
    schema.SKIN_TEMP: 0.05,
    schema.WOUND_TEMP_NORM: 0.05,
    schema.PERI_TEMP_NORM: 0.05,
    schema.ONSET_DAYS: 0.05,
    "Clinical Score": 0.05,
    "Foot Score": 0.035,
    "Weight (Kg)": 0.03,
    "Phase Confidence (%)": 0.03,
}


def _write_clinical_csv(rows: list[dict], path: Path, rng) -> None:
    with open(path, "w", newline="", encoding="utf-8-sig") as handle:
        writer = csv.writer(handle, quoting=csv.QUOTE_MINIMAL)
        writer.writerow(schema.CLINICAL_COLUMNS)
        for row in rows:
            values = []
            for column in schema.CLINICAL_COLUMNS:
                value = row[column]
                if rng.random() < MISSING_RATES.get(column, 0.0):
                    value = ""
                values.append(value)
            writer.writerow(values)


def _write_box_csv(rows: list[dict], path: Path, padded: bool) -> None:
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(schema.BOX_COLUMNS)
        for r in rows:
            patient = f"{r['Patient#']:03d}" if padded else str(r["Patient#"])
            appt = f"{r['Appt#']:02d}" if padded else str(r["Appt#"])
            writer.writerow(
                [
                    r["Filename"],
                    patient,
                    appt,
                    r["DFU#"],
                    r["DebriStat"],
                    r["Camera"],
                    r["Angle"],
                    r["Bounding Box Number"],
                    *r["box"],
                ]
            )


def _random_box(rng, frame: tuple[int, int], scale: float, others: list[tuple]) -> tuple:
    width, height = frame
    for _ in range(20):
        side = max(6, int(rng.normal(MEDIAN_BOX, 12) * scale))
        w, h = side, max(6, int(side * rng.uniform(0.8, 1.25)))
        x0 = int(rng.integers(int(0.15 * width), max(int(0.15 * width) + 1, int(0.85 * width) - w)))
        y0 = int(
            rng.integers(int(0.15 * height), max(int(0.15 * height) + 1, int(0.85 * height) - h))
        )
        box = (x0, y0, min(width, x0 + w), min(height, y0 + h))
        if all(box[2] < o[0] or box[0] > o[2] or box[3] < o[1] or box[1] > o[3] for o in others):
            return box
    return box


MIN_PATIENTS = 1


def _check_settings(seed: int, image_scale: float, patients: int | None = None) -> None:
    """Bad generator settings are errors naming the setting, before anything is written."""
    if patients is not None and patients < MIN_PATIENTS:
        raise ConfigError(
            f"patients={patients}: a synthetic dataset needs at least {MIN_PATIENTS} patients"
        )
    if not 0 < image_scale <= 1:
        raise ConfigError(f"image_scale={image_scale}: give a frame scale in (0, 1]")
    if seed < 0:
        raise ConfigError(f"seed={seed}: give a non-negative seed")


def generate_synthetic_dataset(
    out: Path,
    patients: int = 40,
    seed: int = 0,
    image_scale: float = 0.25,
    clinical_signal: float = 0.6,
    image_signal: float = 1.5,
) -> dict:
    """Write a complete synthetic dataset into ``out``; return a summary of what was written."""
    _check_settings(patients=patients, seed=seed, image_scale=image_scale)
    rng = np.random.default_rng(seed)
    out = Path(out)
    for folder in schema.MODALITY_FOLDERS.values():
        (out / folder).mkdir(parents=True, exist_ok=True)
    rows = _synth_clinical_rows(rng, patients, clinical_signal)
    depth_rows, thermal_rows = [], []
    by_appt: dict[tuple, list[dict]] = {}
    for row in rows:
        by_appt.setdefault((row["Patient#"], row["Appt#"]), []).append(row)
    seq = 1
    depth_frame, thermal_frame = _scaled_frame("D", image_scale), _scaled_frame("T", image_scale)
    for (patient, appt), visit_rows in by_appt.items():
        captures = [(d, av) for d in ("B", "A") for av in ANGLE_VIEWS[:3]]
        captures = [
            captures[i]
            for i in sorted(rng.choice(len(captures), size=int(rng.integers(3, 6)), replace=False))
        ]
        for debri, angle_view in captures:
            # Like the real data, one frame shows every ulcer of the visit and is named after the
            # first; each ulcer gets its own box row carrying its own DFU#.
            name_dfu = visit_rows[0]["DFU#"]
            wounds_d, wounds_t = [], []
            for row in visit_rows:
                look = Appearance.from_clinical_row(pd.Series(row))
                look.redness = row["_redness"] * image_signal
                box_d = _random_box(rng, depth_frame, image_scale, [b for b, _ in wounds_d])
                box_t = _random_box(rng, thermal_frame, image_scale, [b for b, _ in wounds_t])
                wounds_d.append((box_d, look))
                wounds_t.append((box_t, look))
            # About one capture in twelve has no exact thermal twin (a loose match must be found).
            has_thermal = rng.random() > 1 / 12 or len(captures) == 1
            names = {
                cam: format_image_name(seq, patient, appt, name_dfu, debri, cam, *angle_view)
                for cam in ("D", "T")
            }
            rgb, depth_map = render_depth_pair(rng, depth_frame, wounds_d)
            _save_png(rgb, out / schema.MODALITY_FOLDERS["depth_rgb"] / names["D"])
            _save_png(depth_map, out / schema.MODALITY_FOLDERS["depth_map"] / names["D"])
            if has_thermal:
                rgb, thermal_map = render_thermal_pair(rng, thermal_frame, wounds_t)
                _save_png(rgb, out / schema.MODALITY_FOLDERS["thermal_rgb"] / names["T"])
                _save_png(thermal_map, out / schema.MODALITY_FOLDERS["thermal_map"] / names["T"])
            for number, (row, (box_d, _), (box_t, _)) in enumerate(
                zip(visit_rows, wounds_d, wounds_t), start=1
            ):
                common = {
                    "Patient#": patient,
                    "Appt#": appt,
                    "DFU#": row["DFU#"],
                    "DebriStat": debri,
                    "Angle": angle_view,
                    "Bounding Box Number": number,
                }
                depth_rows.append({**common, "Filename": names["D"], "Camera": "D", "box": box_d})
                if has_thermal:
                    thermal_rows.append(
                        {**common, "Filename": names["T"], "Camera": "T", "box": box_t}
                    )
            seq += 1
    # A duplicated visit key, as in the real file.
    rows.append(dict(rows[len(rows) // 2]))
    _write_clinical_csv(rows, out / schema.CLINICAL_CSV, rng)
    _write_box_csv(depth_rows, out / schema.DEPTH_BOX_CSV, padded=True)
    _write_box_csv(thermal_rows, out / schema.THERMAL_BOX_CSV, padded=False)
    return {
        "patients": patients,
        "visits": len(rows) - 1,
        "clinical_rows": len(rows),
        "depth_images": seq - 1,
        "depth_boxes": len(depth_rows),
        "thermal_boxes": len(thermal_rows),
        "out": str(out),
    }


# --------------------------------------------------------------------------------------------
# Rendering images for a real dataset's rows and boxes


def _scale_box_csv(source: Path, target: Path, scale: float) -> None:
    frame = pd.read_csv(source, dtype=str, keep_default_na=False, encoding="utf-8-sig")
    if scale != 1.0:
        for column in ("Xmin", "Ymin", "Xmax", "Ymax"):
            frame[column] = (frame[column].astype(int) * scale).round().astype(int).astype(str)
        # Keep a box non-empty after rounding.
        for lo, hi in (("Xmin", "Xmax"), ("Ymin", "Ymax")):
            same = frame[lo].astype(int) >= frame[hi].astype(int)
            frame.loc[same, hi] = (frame.loc[same, lo].astype(int) + 1).astype(str)
    frame.to_csv(target, index=False)


def render_from_real(real_dir: Path, out: Path, image_scale: float = 1.0, seed: int = 0) -> dict:
    """Copy a real dataset's CSVs into ``out`` and render all four modalities for every box."""
    _check_settings(seed=seed, image_scale=image_scale)
    real_dir, out = Path(real_dir), Path(out)
    rng = np.random.default_rng(seed)
    out.mkdir(parents=True, exist_ok=True)
    for folder in schema.MODALITY_FOLDERS.values():
        (out / folder).mkdir(exist_ok=True)
    # Visits as training reads them (a renumbered visit's images are rendered from its own row).
    clinical, _ = deduplicate_visits(
        read_clinical(real_dir / schema.CLINICAL_CSV, require_labels=False)
    )
    shutil.copyfile(real_dir / schema.CLINICAL_CSV, out / schema.CLINICAL_CSV)
    looks: dict[tuple, Appearance] = {}
    for _, row in clinical.drop(
        columns=["label", schema.LABEL_COLUMN, *schema.LABEL_DERIVED_COLUMNS], errors="ignore"
    ).iterrows():
        key = tuple(int(row[c]) for c in schema.VISIT_KEY)
        looks.setdefault(key, Appearance.from_clinical_row(row))
    rendered = 0
    for csv_name, camera, render, modalities in (
        (schema.DEPTH_BOX_CSV, "D", render_depth_pair, ("depth_rgb", "depth_map")),
        (schema.THERMAL_BOX_CSV, "T", render_thermal_pair, ("thermal_rgb", "thermal_map")),
    ):
        if not (real_dir / csv_name).is_file():
            continue
        _scale_box_csv(real_dir / csv_name, out / csv_name, image_scale)
        boxes = read_boxes(out / csv_name, camera)
        frame = _scaled_frame(camera, image_scale)
        for name, group in boxes.groupby("Filename", sort=False):
            parse_image_name(name)
            wounds = [
                (
                    (int(r.Xmin), int(r.Ymin), int(r.Xmax), int(r.Ymax)),
                    looks.get(tuple(int(r[c]) for c in schema.VISIT_KEY), Appearance()),
                )
                for _, r in group.iterrows()
            ]
            first, second = render(rng, frame, wounds)
            _save_png(first, out / schema.MODALITY_FOLDERS[modalities[0]] / name)
            _save_png(second, out / schema.MODALITY_FOLDERS[modalities[1]] / name)
            rendered += 1
    return {"visits": len(clinical), "images_rendered": rendered, "out": str(out)}
