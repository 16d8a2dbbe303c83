"""The final model bundle: what ``publish`` pushes and ``predict`` loads.

A folder with the fusion model (image runs), the fitted clinical pipeline (features and model,
one file), the configuration, the evaluation summary and report, and a manifest whose
``model_id`` is a digest of the training configuration, the code version and the prepared data's
content: the same experiment on the same data with the same code gets the same id wherever it
runs, and anything else gets another, so a published model is never overwritten by a different
one.

The manifest also lists every other file of the bundle with its size and SHA-256, and
``load_bundle`` checks them all before it loads anything: the clinical pipeline is a pickle, which
runs code when it is loaded, so a changed, truncated or added-in file is refused first. The
SHA-256 of ``manifest.json`` itself (the *bundle digest*) pins every file at once: ``publish``
prints it, and ``load_bundle(..., expected_digest=...)`` refuses any other bundle.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from dfu_ml import __version__
from dfu_ml.config import Config, config_from_json
from dfu_ml.errors import DataError
from dfu_ml.storage import FileEntry

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
        "files": file_digests(out),
    }
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2))
    return manifest


def file_digests(folder: Path) -> dict[str, dict]:
    """Every file below ``folder`` but the manifest: relative path -> size and SHA-256."""
    return {
        path.relative_to(folder).as_posix(): dataclasses.asdict(FileEntry.of(path))
        for path in sorted(Path(folder).rglob("*"))
        if path.is_file() and path.relative_to(folder).as_posix() != MANIFEST
    }


def bundle_digest(folder: Path) -> str:
    """The SHA-256 of the bundle's manifest, which lists every other file's SHA-256: one value
    that pins the whole bundle (``publish`` prints it; ``predict --expect-digest`` checks it)."""
    return FileEntry.of(Path(folder) / MANIFEST).sha256


def verify_bundle(folder: Path, expected_digest: str = "") -> dict:
    """Check a bundle before anything in it is loaded; return its manifest.

    Every file the manifest lists must be there with its size and SHA-256 (a pickle from a
    bundle runs code when loaded, so nothing unverified is ever opened). With
    ``expected_digest`` the manifest itself must have that SHA-256. Raises DataError naming the
    folder and the file at fault.
    """
    folder = Path(folder)
    path = folder / MANIFEST
    if not path.is_file():
        raise DataError(
            f"{folder} is not a dfu-kfp model bundle (no {MANIFEST}); pass the final_model "
            "folder named in summary.json"
        )
    raw = path.read_bytes()
    actual = hashlib.sha256(raw).hexdigest()
    if expected_digest and actual != expected_digest.strip().lower().removeprefix("sha256:"):
        raise DataError(
            f"model bundle {folder}: its digest is sha256:{actual}, not the expected "
            f"{expected_digest}; this is not the bundle that was published: load the published one"
        )
    try:
        manifest = json.loads(raw)
        files = {str(name): FileEntry.from_dict(e) for name, e in manifest["files"].items()}
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise DataError(
            f"model bundle {folder}: {MANIFEST} lists no file digests ({exc!r}); it was made by "
            "an older dfu-kfp or is damaged: bundle the model again"
        ) from exc
    for name, expected in sorted(files.items()):
        _check_bundle_file(folder, name, expected)
    return manifest


def _check_bundle_file(folder: Path, name: str, expected: FileEntry) -> None:
    relative = PurePosixPath(name)
    if not name or relative.is_absolute() or ".." in relative.parts or name == MANIFEST:
        raise DataError(f"model bundle {folder}: {MANIFEST} lists an invalid file name {name!r}")
    path = folder / relative
    if not path.is_file():
        raise DataError(
            f"model bundle {folder}: {name} is missing ({MANIFEST} lists it); copy the whole "
            "bundle again"
        )
    actual = FileEntry.of(path)
    if actual.size != expected.size:
        raise DataError(
            f"model bundle {folder}: {name} has {actual.size} bytes but {MANIFEST} lists "
            f"{expected.size} (truncated or replaced); copy the whole bundle again"
        )
    if actual.sha256 != expected.sha256:
        raise DataError(
            f"model bundle {folder}: {name} does not match its SHA-256 in {MANIFEST} (changed "
            "after it was bundled); it was not loaded: use the bundle as it was published"
        )


@dataclass
class Bundle:
    config: Config
    manifest: dict
    clinical_model: object  # dfu_ml.training.clinical_rf.ClinicalModel
    model: object | None


def load_bundle(folder: Path, expected_digest: str = "") -> Bundle:
    """Verify the bundle (``verify_bundle``), then load it; only files it lists are opened."""
    import joblib

    from dfu_ml.training.clinical_rf import ClinicalModel

    folder = Path(folder)
    manifest = verify_bundle(folder, expected_digest)

    def verified(name: str) -> Path:
        if name not in manifest["files"]:
            raise DataError(
                f"model bundle {folder}: {MANIFEST} does not list {name}, which this bundle "
                "needs; bundle the model again"
            )
        return folder / name

    config = config_from_json(verified(CONFIG_FILE).read_text())
    model = None
    if config.image_modalities:
        import keras

        import dfu_ml.training.models  # noqa: F401  (registers LearnableFusionWeight)

        model = keras.saving.load_model(verified(MODEL_FILE), compile=False)
    return Bundle(
        config,
        manifest,
        ClinicalModel(joblib.load(verified(CLINICAL_MODEL_FILE))),
        model,
    )
