"""Benchmark: one fold of the staged training (pre-training per modality, Stage 1, Stage 2) with
a profile's backbone, on whatever device Keras uses.

Prints, per stage, wall seconds, epochs, training rows and images per second (training images
seen / wall seconds, so it includes the first-epoch build and scoring the validation set once per
epoch), plus the backend and device. Example (GPU machine, PyTorch backend):

    KERAS_BACKEND=torch python bench/gpu_stages.py --profile paper --patients 40 --epochs 3
"""

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def device_name() -> str:
    backend = os.environ.get("KERAS_BACKEND", "tensorflow")
    try:
        if backend == "torch":
            import torch

            return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
        if backend == "jax":
            import jax

            return str(jax.devices()[0])
    except Exception as exc:  # a benchmark reports what it could not read
        return f"unknown ({exc})"
    return platform.processor() or "cpu"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default="paper")
    parser.add_argument("--patients", type=int, default=40)
    parser.add_argument("--image-scale", type=float, default=0.5)
    parser.add_argument("--epochs", type=int, default=3, help="epochs per stage (fixed)")
    parser.add_argument("--set", nargs="*", default=[], help="extra config overrides")
    parser.add_argument("--work", type=Path, default=None)
    args = parser.parse_args()

    import keras

    from dfu_ml.config import load_config
    from dfu_ml.data.prepare import prepare_for_config
    from dfu_ml.data.synthetic import generate_synthetic_dataset
    from dfu_ml.training.fold import fold_rf, plan_fold, run_pretrain, run_stage1, run_stage2

    epochs = args.epochs
    config = load_config(
        args.profile,
        [
            f"pretrain_epochs={epochs}",
            f"stage1_epochs={epochs}",
            f"stage2_epochs={epochs}",
            f"early_stopping_patience={epochs}",
            *args.set,
        ],
    )
    work = args.work or Path(tempfile.mkdtemp(prefix="dfu-bench-"))
    figures = {
        "backend": keras.backend.backend(),
        "device": device_name(),
        "keras": keras.__version__,
        "profile": config.profile,
        "backbone": config.backbone,
        "image_size": config.image_size,
        "batch_size": config.batch_size,
        "stages": {},
    }
    start = time.time()
    if not (work / "data" / "bounding_box_depth.csv").is_file():  # reuse a --work folder's data
        generate_synthetic_dataset(
            work / "data", patients=args.patients, seed=0, image_scale=args.image_scale
        )
    figures["synth_seconds"] = round(time.time() - start, 1)
    start = time.time()
    dataset = prepare_for_config(work / "data", config)
    figures["prepare_seconds"] = round(time.time() - start, 1)
    plan = plan_fold(dataset, config, 0)
    rf_proba, _ = fold_rf(dataset, config, plan)
    quiet = lambda _message: None  # noqa: E731

    encoders = {}
    for modality in config.image_modalities:
        encoders[modality] = work / f"encoder_{modality}"
        result = run_pretrain(dataset, config, plan, modality, encoders[modality], log=quiet)
        figures["stages"][f"pretrain[{modality}]"] = result.summary()
    stage1 = run_stage1(dataset, config, plan, rf_proba, encoders, log=quiet)
    figures["stages"]["stage1"] = stage1.summary()
    stage2 = run_stage2(dataset, config, plan, rf_proba, stage1, log=quiet)
    figures["stages"]["stage2"] = stage2.summary()

    print(json.dumps({k: v for k, v in figures.items() if k != "stages"}))
    print(
        f"{'stage':<24}{'seconds':>9}{'epochs':>8}{'rows':>7}{'img/s':>9}{'params':>12}{'kappa':>8}"
    )
    for name, s in figures["stages"].items():
        images = (
            s["train_rows"]
            * s["epochs_run"]
            * max(1, name.count("[") or len(config.image_modalities))
        )
        print(
            f"{name:<24}{s['seconds']:>9.1f}{s['epochs_run']:>8}{s['train_rows']:>7}"
            f"{images / s['seconds']:>9.0f}{s['trainable_params']:>12,}{s['best_val_kappa']:>8.3f}"
        )


if __name__ == "__main__":
    main()
