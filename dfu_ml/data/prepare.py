"""Dataset preparation: the only place images are decoded.

Reads a dataset folder in the study's layout, matches image sets to visits, crops every modality's
wound box (with per-modality margins), resizes keeping the aspect ratio, zero-pads to a square and
stores everything in one versioned ``dataset.npz`` that later steps load in one read.
"""

from __future__ import annotations

import io
import json
import os
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, UnidentifiedImageError

from dfu_ml.data import schema
from dfu_ml.data.matching import deduplicate_visits, match_image_sets
from dfu_ml.data.reading import read_boxes, read_clinical
from dfu_ml.errors import DataError

FORMAT_VERSION = 1
DATASET_FILE = "dataset.npz"
REPORT_JSON = "data_report.json"
REPORT_MD = "data_report.md"


@dataclass
class PreparedDataset:
    """Prepared data held in memory: visits (clinical rows), image sets and their crops."""

    visits: pd.DataFrame  # one row per visit: visit keys, ``label``, raw clinical columns
    sets: pd.DataFrame  # one row per image set: ``visit_index``, file names, availability flags
    images: dict  # modality -> uint8 array (n_sets, size, size, 3)
    meta: dict

    @property
    def image_size(self) -> int:
        return int(self.meta["image_size"])

    def set_labels(self) -> np.ndarray:
        return self.visits["label"].to_numpy()[self.sets["visit_index"].to_numpy()]

    def set_patients(self) -> np.ndarray:
        return self.sets["patient"].to_numpy()


def find_dataset_files(folder: Path) -> dict:
    """Locate the three CSVs in a dataset folder (or in its single subfolder)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"dataset folder not found: {folder}")
    files = {
        "clinical": folder / schema.CLINICAL_CSV,
        "depth_boxes": folder / schema.DEPTH_BOX_CSV,
        "thermal_boxes": folder / schema.THERMAL_BOX_CSV,
    }
    if not files["clinical"].is_file():
        raise DataError(
            f"{folder}: no {schema.CLINICAL_CSV}; a dataset folder holds the clinical "
            f"CSV, {schema.DEPTH_BOX_CSV}, {schema.THERMAL_BOX_CSV} and the image folders"
        )
    return files


# Pillow's modes for 16- and 32-bit single-channel PNGs (a depth camera's raw export).
WIDE_GREY_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")


def to_rgb8(img: Image.Image) -> np.ndarray:
    """Any PNG mode a camera writes as an 8-bit RGB array (height, width, 3).

    8-bit grey, RGB, RGBA (alpha dropped), palette and bilevel images go through Pillow's own
    conversion. 16-bit grey is scaled by its bit depth (65535 -> 255, as an 8-bit export of the
    same image would be): ``convert("RGB")`` clips it instead, which turned a 16-bit depth image
    all white.
    """
    if img.mode in WIDE_GREY_MODES:
        wide = np.asarray(img, dtype=np.float64)
        grey = np.rint(np.clip(wide, 0, 65535) / 257.0).astype(np.uint8)
        return np.repeat(grey[:, :, None], 3, axis=2)
    return np.asarray(img.convert("RGB"))


def decode_image(path: Path) -> np.ndarray:
    try:
        with Image.open(path) as img:
            img.load()
            return to_rgb8(img)
    except FileNotFoundError:
        raise DataError(f"image file missing: {path}") from None
    except (UnidentifiedImageError, OSError, SyntaxError, zlib.error, ValueError) as exc:
        raise DataError(f"image file is corrupt or not a PNG: {path} ({exc})") from None


def crop_resize_pad(
    frame: np.ndarray, box: tuple, margin: int, size: int
) -> tuple[np.ndarray, bool]:
    """Crop ``box`` widened by ``margin`` (clamped at the border), fit into ``size`` keeping the
    aspect ratio and zero-pad to a square. Returns the crop and whether it was clamped."""
    height, width = frame.shape[:2]
    x0, y0, x1, y1 = box
    cx0, cy0 = max(0, x0 - margin), max(0, y0 - margin)
    cx1, cy1 = min(width, x1 + margin), min(height, y1 + margin)
    clamped = (cx0, cy0, cx1, cy1) != (x0 - margin, y0 - margin, x1 + margin, y1 + margin)
    crop = Image.fromarray(frame[cy0:cy1, cx0:cx1])
    scale = size / max(crop.width, crop.height)
    new_w, new_h = max(1, round(crop.width * scale)), max(1, round(crop.height * scale))
    resized = np.asarray(crop.resize((new_w, new_h), Image.BILINEAR))
    out = np.zeros((size, size, 3), dtype=np.uint8)
    top, left = (size - new_h) // 2, (size - new_w) // 2
    out[top : top + new_h, left : left + new_w] = resized
    return out, clamped


def _check_box_inside(box, shape, box_csv: str, line: int, image: Path) -> None:
    height, width = shape[:2]
    x0, y0, x1, y1 = box
    if x0 < 0 or y0 < 0 or x1 > width or y1 > height:
        raise DataError(
            f"{box_csv}, line {line}: box {box} lies outside {image.name} ({width}x{height}); "
            "fix the box coordinates (pixels of the original image)"
        )


def prepare_dataset(
    folder: Path,
    image_size: int = 64,
    modalities=schema.IMAGE_MODALITIES,
    crop_margins: dict | None = None,
    on_missing_image: str = "error",
    require_labels: bool = True,
    workers: int | None = None,
) -> PreparedDataset:
    """Read, match, crop and pack a dataset folder. See the module docstring."""
    files = find_dataset_files(folder)
    folder = Path(folder)
    clinical = read_clinical(files["clinical"], require_labels=require_labels)
    visits, counts = deduplicate_visits(clinical, str(files["clinical"]))
    modalities = [m for m in modalities if m in schema.IMAGE_MODALITIES]
    if modalities and files["depth_boxes"].is_file():
        depth_boxes = read_boxes(files["depth_boxes"], "D")
        thermal_boxes = (
            read_boxes(files["thermal_boxes"], "T")
            if files["thermal_boxes"].is_file()
            else depth_boxes.iloc[0:0]
        )
        sets, match_counts = match_image_sets(visits, depth_boxes, thermal_boxes)
        counts.update(match_counts)
    else:
        if modalities:
            raise DataError(
                f"{folder}: no {schema.DEPTH_BOX_CSV}; image modalities {modalities} "
                "need it (or run with modalities=metadata)"
            )
        sets = pd.DataFrame(
            columns=[
                "visit_index",
                "patient",
                "appt",
                "dfu",
                "depth_file",
                "thermal_file",
                "thermal_match",
            ]
        )
    absent = [m for m in modalities if not (folder / schema.MODALITY_FOLDERS[m]).is_dir()]
    if absent and on_missing_image == "error" and len(sets):
        raise DataError(
            f"{folder}: no {', '.join(schema.MODALITY_FOLDERS[m] + '/' for m in absent)} folder, "
            f"which modality {', '.join(absent)} needs; add the images, or leave "
            f"{', '.join(absent)} out of the modalities (or of a search's combinations)"
        )
    images, crop_counts = _crop_all(
        folder, sets, modalities, image_size, crop_margins or {}, on_missing_image, workers
    )
    counts.update(crop_counts)
    for modality in modalities:
        sets[f"has_{modality}"] = images.pop(f"_ok_{modality}")
        if len(sets) and not sets[f"has_{modality}"].any():
            raise DataError(
                f"{folder / schema.MODALITY_FOLDERS[modality]}: none of the {len(sets)} image "
                f"sets has its {modality} image (on_missing_image=skip skips missing files, but "
                f"here every one is missing); restore the folder or leave {modality} out of "
                "'modalities'"
            )
    meta = {
        "format_version": FORMAT_VERSION,
        "source": str(folder),
        "image_size": image_size,
        "modalities": list(modalities),
        "crop_margins": dict(crop_margins or {}),
        "counts": counts,
    }
    dataset = PreparedDataset(
        visits=visits, sets=sets.reset_index(drop=True), images=images, meta=meta
    )
    meta["report"] = data_report(dataset)
    return dataset


def prepare_for_config(folder: Path, config, require_labels: bool = True) -> PreparedDataset:
    """:func:`prepare_dataset` with a run's settings (``config`` is a :class:`dfu_ml.config.Config`):
    how training and prediction prepare data alike. The data report also lists the clinical
    columns the run's column policy uses (and those of them the CSV lacks)."""
    from dfu_ml.features import ClinicalColumns, unseen_category_values

    dataset = prepare_dataset(
        folder,
        image_size=config.image_size,
        modalities=config.image_modalities,
        crop_margins=config.crop_margins,
        on_missing_image=config.on_missing_image,
        require_labels=require_labels,
    )
    columns = ClinicalColumns.for_policy(config.clinical_include_leak_suspect)
    report = dataset.meta["report"]
    report["clinical_columns"] = columns.report()
    report["clinical_columns_absent"] = [c for c in columns.used if c not in dataset.visits]
    report["unseen_category_values"] = [
        f"{column}: {value!r} x{count}"
        for column, value, count in unseen_category_values(dataset.visits, columns.categories)
    ]
    return dataset


def _crop_all(
    folder: Path,
    sets: pd.DataFrame,
    modalities,
    size: int,
    margins: dict,
    on_missing_image: str,
    workers: int | None,
):
    images = {m: np.zeros((len(sets), size, size, 3), dtype=np.uint8) for m in modalities}
    ok = {m: np.zeros(len(sets), dtype=bool) for m in modalities}
    counts = {"images_missing": 0, "crops_clamped": 0, "sets_without_thermal": 0}
    # One job per image file: a frame that holds several ulcers is decoded once.
    jobs: dict[Path, list] = {}
    for i, row in enumerate(sets.itertuples(index=False)):
        for modality in modalities:
            camera = schema.MODALITY_CAMERA[modality]
            name = row.depth_file if camera == "D" else row.thermal_file
            if name is None or (isinstance(name, float) and np.isnan(name)):
                continue
            box = row.depth_box if camera == "D" else row.thermal_box
            line = row.depth_box_line if camera == "D" else row.thermal_box_line
            path = folder / schema.MODALITY_FOLDERS[modality] / name
            jobs.setdefault(path, []).append((i, modality, box, line, camera))
    counts["sets_without_thermal"] = int(sets["thermal_file"].isna().sum()) if len(sets) else 0

    def work(path: Path):
        if not path.is_file():
            if on_missing_image == "error":
                raise DataError(
                    f"image file missing: {path}; restore it, or set on_missing_image=skip to "
                    "drop the modality for that image set (counted in the data report)"
                )
            return path, None
        return path, decode_image(path)

    box_csv = {"D": schema.DEPTH_BOX_CSV, "T": schema.THERMAL_BOX_CSV}
    with ThreadPoolExecutor(max_workers=workers or min(4, os.cpu_count() or 1)) as pool:
        for path, frame in pool.map(work, list(jobs)):
            if frame is None:
                counts["images_missing"] += 1
                continue
            for i, modality, box, line, camera in jobs[path]:
                _check_box_inside(box, frame.shape, box_csv[camera], line, path)
                crop, clamped = crop_resize_pad(frame, box, int(margins.get(modality, 0)), size)
                images[modality][i] = crop
                ok[modality][i] = True
                counts["crops_clamped"] += int(clamped)
    for modality in modalities:
        images[f"_ok_{modality}"] = ok[modality]
    return images, counts


def data_report(dataset: PreparedDataset) -> dict:
    """Counts a user checks before training: rows, visits, patients, class mix, losses."""
    visits, sets = dataset.visits, dataset.sets
    labelled = visits["label"] >= 0
    mix = {name: int((visits["label"] == i).sum()) for i, name in enumerate(schema.CLASS_NAMES)}
    set_labels = dataset.set_labels() if len(sets) else np.array([], dtype=int)
    report = {
        "visits": int(len(visits)),
        "labelled_visits": int(labelled.sum()),
        "patients": int(visits[schema.PATIENT_COLUMN].nunique()),
        "image_sets": int(len(sets)),
        "visits_with_images": int(dataset.meta["counts"].get("visits_with_images", 0)),
        "class_mix_visits": mix,
        "class_mix_visits_percent": {
            k: round(100.0 * v / max(1, int(labelled.sum())), 1) for k, v in mix.items()
        },
        "class_mix_image_sets": {
            name: int((set_labels == i).sum()) for i, name in enumerate(schema.CLASS_NAMES)
        },
        "modalities": dataset.meta["modalities"],
        "image_size": dataset.meta["image_size"],
    }
    report.update(dataset.meta["counts"])
    return report


def report_markdown(report: dict) -> str:
    lines = ["# Data report", "", "| item | value |", "|---|---|"]
    for key, value in report.items():
        lines.append(f"| {key.replace('_', ' ')} | {value} |")
    return "\n".join(lines) + "\n"


def save_prepared(dataset: PreparedDataset, out_dir: Path, compress: bool = True) -> Path:
    """Write ``dataset.npz`` and the data report into ``out_dir``; return the npz path."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    sets = dataset.sets.copy()
    for column in ("depth_box", "thermal_box"):
        if column in sets:
            sets[column] = [
                json.dumps(list(map(int, b))) if isinstance(b, tuple) else "" for b in sets[column]
            ]
    arrays = {
        "meta_json": np.array(json.dumps(dataset.meta)),
        "visits_csv": np.array(dataset.visits.to_csv(index=False)),
        "sets_csv": np.array(sets.to_csv(index=False)),
    }
    arrays.update({f"images_{m}": a for m, a in dataset.images.items()})
    target = out_dir / DATASET_FILE
    temp = out_dir / (DATASET_FILE + ".partial")
    with open(temp, "wb") as handle:
        (np.savez_compressed if compress else np.savez)(handle, **arrays)
    os.replace(temp, target)
    (out_dir / REPORT_JSON).write_text(json.dumps(dataset.meta["report"], indent=2))
    (out_dir / REPORT_MD).write_text(report_markdown(dataset.meta["report"]))
    return target


def load_prepared(path: Path) -> PreparedDataset:
    """Load a prepared dataset from ``dataset.npz`` or the folder that holds it."""
    path = Path(path)
    if path.is_dir():
        path = path / DATASET_FILE
    if not path.is_file():
        raise DataError(f"prepared dataset not found: {path}; run the prepare step first")
    with np.load(path, allow_pickle=False) as data:
        meta = json.loads(str(data["meta_json"]))
        if meta.get("format_version") != FORMAT_VERSION:
            raise DataError(
                f"{path}: prepared-dataset format {meta.get('format_version')} is not "
                f"{FORMAT_VERSION}; prepare the dataset again with this version"
            )
        # The columns read_clinical keeps as text stay text.
        visits = pd.read_csv(
            io.StringIO(str(data["visits_csv"])), dtype={c: str for c in schema.TEXT_COLUMNS}
        )
        sets = pd.read_csv(
            io.StringIO(str(data["sets_csv"])), dtype={"depth_file": str, "thermal_file": str}
        )
        for column in ("depth_box", "thermal_box"):  # save_prepared wrote them as JSON lists
            if column in sets:
                sets[column] = [
                    tuple(json.loads(b)) if isinstance(b, str) and b else None for b in sets[column]
                ]
        images = {m: data[f"images_{m}"] for m in meta["modalities"]}
    return PreparedDataset(visits=visits, sets=sets, images=images, meta=meta)


def content_digest(dataset: PreparedDataset) -> str:
    """SHA-256 of what training reads from a prepared dataset (tables, crops, crop settings), not
    of where it came from: the same data behind another URI gives the same digest, other data
    behind the same URI another one."""
    import hashlib

    digest = hashlib.sha256()
    settings = {k: dataset.meta[k] for k in ("image_size", "modalities", "crop_margins")}
    digest.update(json.dumps(settings, sort_keys=True).encode())
    digest.update(dataset.visits.to_csv(index=False).encode())
    digest.update(dataset.sets.to_csv(index=False).encode())
    for modality in sorted(dataset.images):
        array = np.ascontiguousarray(dataset.images[modality])
        digest.update(f"{modality}{array.shape}{array.dtype}".encode())
        digest.update(array.tobytes())
    return digest.hexdigest()
