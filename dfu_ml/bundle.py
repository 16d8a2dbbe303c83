"""The final model bundle: what ``publish`` pushes and ``predict`` loads.

A folder with the fusion model (image runs), the fitted clinical pipeline (features and model,
one file), the configuration, the evaluation summary and report, and a manifest whose
``model_id`` is a digest of the training configuration, the code version and the prepared data's
content: the same experiment on the same data with the same code gets the same id wherever it
runs, and anything else gets another, so a published model is never overwritten by a different
one.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

from dfu_ml import __version__
from dfu_ml.config import Config, config_from_json
from dfu_ml.errors import DataError

MANIFEST = "manifest.json"
MODEL_FILE = "model.keras"
CLINICAL_MODEL_FILE = "clinical_model.joblib"
CONFIG_FILE = "config.json"


def model_id(config: Config, data_digest: str, code_version: str) -> str:
    """The model id: what was trained (the configuration; its ``profile`` is only a label), by
    which code, on which data (a content digest, not a location)."""
    experiment = {k: v for k, v in config.to_dict().items() if k != "profile"}
    text = json.dumps([experiment, code_version, data_digest], sort_keys=True)
    return f"dfu-{__version__}-{hashlib.sha256(text.encode()).hexdigest()[:16]}"


def assemble_bundle(
    out: Path,
    config: Config,
    rf_dir: Path,
    summary_dir: Path,
    model_dir: Path | None,
    data: str = "",
    data_digest: str = "",
    code_version: str = "",
) -> dict:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(rf_dir / CLINICAL_MODEL_FILE, out / CLINICAL_MODEL_FILE)
    if config.image_modalities:
        if model_dir is None or not (Path(model_dir) / MODEL_FILE).is_file():
            raise DataError("an image run's bundle needs the final fusion model (model.keras)")
        shutil.copyfile(Path(model_dir) / MODEL_FILE, out / MODEL_FILE)
    summary = json.loads((Path(summary_dir) / "summary.json").read_text())
    for name in ("summary.json", "report.html"):
        if (Path(summary_dir) / name).is_file():
            shutil.copyfile(Path(summary_dir) / name, out / name)
    (out / CONFIG_FILE).write_text(config.to_json())
    manifest = {
        "model_id": model_id(config, data_digest, code_version),
        "version": __version__,
        "code_version": code_version,
        "data": data,
        "data_digest": data_digest,
        "modalities": config.modalities,
        "image_size": config.image_size,
        "blessed": bool(summary["blessed"]),
        "mean_quadratic_kappa": summary["mean"]["per_row"]["quadratic_kappa"]["mean"],
        "files": sorted(p.name for p in out.iterdir()),
    }
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2))
    return manifest


@dataclass
class Bundle:
    config: Config
    manifest: dict
    clinical_model: object  # dfu_ml.training.clinical_rf.ClinicalModel
    model: object | None


def load_bundle(folder: Path) -> Bundle:
    import joblib

    from dfu_ml.training.clinical_rf import ClinicalModel

    folder = Path(folder)
    if not (folder / MANIFEST).is_file():
        raise DataError(
            f"{folder} is not a dfu-kfp model bundle (no {MANIFEST}); pass the "
            "final_model folder named in summary.json"
        )
    config = config_from_json((folder / CONFIG_FILE).read_text())
    model = None
    if config.image_modalities:
        import keras

        import dfu_ml.training.models  # noqa: F401  (registers LearnableFusionWeight)

        model = keras.saving.load_model(folder / MODEL_FILE, compile=False)
    return Bundle(
        config,
        json.loads((folder / MANIFEST).read_text()),
        ClinicalModel(joblib.load(folder / CLINICAL_MODEL_FILE)),
        model,
    )
