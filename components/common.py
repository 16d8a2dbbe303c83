"""What every step shares: quiet TensorFlow, config parsing, JSON files and the CLI scaffold."""

import argparse
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path

# Must be set before TensorFlow is imported (it is imported lazily by the training steps).
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
os.environ.setdefault("KERAS_HOME", os.path.join(os.environ.get("TMPDIR", "/tmp"), "dfu-kfp-keras"))

from dfu_ml.config import Config, config_from_json, load_config, parse_override
from dfu_ml.errors import DfuError

PLAN_FILE = "fold_plan.json"
RF_PROBA_FILE = "rf_proba.npy"
SUMMARY_FILE = "summary.json"
MODEL_FILE = "model.keras"
FOLD_RESULT_FILE = "fold_result.json"


def resolve_config(config: str, overrides=()) -> Config:
    """A step's configuration: a profile name, a YAML or JSON file (such as the pipeline's
    ``config`` artifact) or a JSON string, then ``key=value`` overrides."""
    text = config.strip()
    if text.startswith("{"):
        values = config_from_json(text).to_dict()
        values.update(parse_override(o) for o in overrides)
        return load_config(None, values)
    return load_config(text, list(overrides))


def final_fit_epochs(final_fit, stage: str) -> int:
    """Epochs for ``stage`` in the final fit (from the evaluation summary), 0 for a CV fold."""
    if final_fit is None:
        return 0
    return int(read_json(Path(final_fit.path) / SUMMARY_FILE)["final_fit_epochs"][stage])


STAGE_METRICS = ("best_epoch", "best_val_kappa", "trainable_params", "steps_per_epoch")


def log_stage_metrics(metrics, summary: dict, prefix: str = "") -> None:
    """A training stage's figures (best epoch, best validation kappa, trainable parameters, steps
    per epoch) as KFP metrics, so that the UI shows them for every stage of every fold."""
    log_metrics(metrics, {f"{prefix}{key}": summary[key] for key in STAGE_METRICS})


def log_stage2_outcome(metrics, result: dict) -> None:
    """What a step that ends with Stage 2 shows in the UI besides the stage's figures: whether
    Stage 1's weights were kept (RC4) and the fold's validation metrics per row."""
    per_row = result.get("metrics", {}).get("per_row", {})
    log_metrics(
        metrics,
        {
            "kept_stage1_weights": int(result["stage2"]["kept_stage1_weights"]),
            **{
                f"fold_{k}": per_row[k]
                for k in ("quadratic_kappa", "accuracy", "macro_f1")
                if k in per_row
            },
        },
    )


def log_metrics(metrics, values: dict) -> None:
    """Log to a KFP Metrics artifact, skipping values that are not finite numbers (KFP cannot
    store NaN, and a final fit has no validation kappa)."""
    import math

    for name, value in values.items():
        if isinstance(value, (int, float)) and math.isfinite(value):
            metrics.log_metric(name, value)


def write_json(path: Path, data) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.with_name(path.name + ".partial")
    temp.write_text(json.dumps(data, indent=2, default=float))
    os.replace(temp, path)
    return path


def read_json(path: Path):
    path = Path(path)
    if not path.is_file():
        raise DfuError(f"expected file not found: {path}; did the step that writes it run?")
    return json.loads(path.read_text())


def code_version() -> str:
    """The package version plus a digest of the library, component and pipeline sources (part of
    every model id, and of KFP's cache key through the pipeline's first step)."""
    import hashlib

    from dfu_ml import __version__

    root = Path(__file__).resolve().parent.parent
    digest = hashlib.sha256()
    for folder in ("dfu_ml", "components", "pipelines"):
        for path in sorted((root / folder).rglob("*")):
            if path.suffix in (".py", ".yaml"):
                digest.update(path.relative_to(root).as_posix().encode())
                digest.update(path.read_bytes())
    return f"{__version__}+{digest.hexdigest()[:16]}"


# Arguments that name object-storage locations the step itself reads (not artifact folders).
PASS_THROUGH_URIS = ("data", "models_uri")


def _stage_s3_arguments(args: argparse.Namespace, scratch: Path) -> list[tuple[Path, str]]:
    """Replace ``s3://`` artifact arguments by local folders: inputs are downloaded now, ``--out``
    is uploaded after the step. Returns the (local, uri) pairs to upload."""
    from dfu_ml.storage import download_tree, is_s3_uri

    uploads = []
    for name, value in vars(args).items():
        if name in PASS_THROUGH_URIS:
            continue
        values = value if isinstance(value, list) else [value]
        if not any(isinstance(v, (str, Path)) and is_s3_uri(str(v)) for v in values):
            continue
        local = []
        for i, item in enumerate(values):
            if not is_s3_uri(str(item)):
                local.append(item)
                continue
            folder = scratch / f"{name}{i}"
            if name == "out":
                folder.mkdir(parents=True)
                uploads.append((folder, str(item)))
            else:
                # KFP's launcher writes artifacts without our marker (and records them only once
                # uploaded): read them, with a warning; an unfinished upload of ours is refused.
                download_tree(str(item), folder, allow_unmarked=True)
            local.append(folder)
        setattr(args, name, local if isinstance(value, list) else local[0])
    return uploads


def cli(
    module: str,
    description: str,
    add_arguments: Callable[[argparse.ArgumentParser], None],
    run: Callable[[argparse.Namespace], object],
    argv=None,
) -> int:
    """Parse arguments, run the step, and print expected errors without a traceback.

    Every folder argument may also be an ``s3://`` URI (for example a pipeline artifact in the
    KFP bucket): inputs are downloaded first and ``--out`` is uploaded when the step succeeds.
    """
    import tempfile

    from dfu_ml.storage import upload_tree

    parser = argparse.ArgumentParser(prog=f"python -m {module}", description=description)
    add_arguments(parser)
    parser.add_argument("--out", required=True, help="output folder or s3://bucket/prefix")
    parser.add_argument(
        "--config",
        default="smoke",
        help="profile name (smoke, paper, ...), YAML or JSON file, or config JSON (default: smoke)",
    )
    parser.add_argument(
        "--set", nargs="+", default=[], metavar="KEY=VALUE", help="override config keys"
    )
    args = parser.parse_args(argv)
    try:
        args.config = resolve_config(args.config, args.set)
        with tempfile.TemporaryDirectory(prefix="dfu-step-") as scratch:
            uploads = _stage_s3_arguments(args, Path(scratch))
            run(args)
            for folder, uri in uploads:
                upload_tree(folder, uri)
    except DfuError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


def add_epochs_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--epochs", type=int, default=0, help="a fixed epoch count (the final fit's); 0 = config"
    )
