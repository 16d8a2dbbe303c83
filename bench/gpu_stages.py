"""Benchmark: the image stages against a plain PyTorch loop on the same device, in one command.

One invocation prints, on whatever device Keras uses:

1. **stages**: one fold of the real training code (``dfu_ml.training.fold``: pre-training per
   modality, Stage 1, Stage 2) on a small synthetic dataset with a fixed number of epochs; per
   stage the first epoch's seconds (building and compiling the step included), the steady
   training images/s (epochs 2.., training steps only), the validation scoring seconds and, for
   Stage 1, the one-time backbone-feature pass. With ``--stage1-images`` also Stage 1 the old way
   (backbones run every step) for the speed-up of the cached features.
2. **reference**: the same backbone trained by a plain PyTorch loop at the same batch, image size
   and precision: torchvision's model of that backbone when torchvision is importable, else the
   Keras-built image model driven by a plain torch loop (KERAS_BACKEND=torch only); the output
   says which. Then the ratio of pre-training's and Stage 2's steady images/s to it.
3. **real size** (``--real-size``): a synthetic dataset of about 3,100 image sets (the study's
   size), one whole fold of the profile with early stopping, and the GPU-minutes of that fold
   (measured) and of the 5-fold cross-validation plus the final fit (extrapolated from the fold,
   labelled so). ``--budget-minutes`` caps the whole command: the fold's epochs are capped so
   that it ends in time, and a capped stage is extrapolated to its profile maximum.

The GPU command (one H100/H200, within a 10-minute limit; ``--work`` keeps the rendered data):

    KERAS_BACKEND=torch python bench/gpu_stages.py --profile paper-scratch --stage1-images \
        --real-size --budget-minutes 9 --json bench.json

(`paper-scratch`: the device has no ImageNet weights files; speed does not depend on them.)

``--json FILE`` writes every figure. On CPU use a small backbone, e.g.
``--profile paper-scratch --set backbone=MobileNetV3Small image_size=64 mixed_precision=none``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

REAL_IMAGE_SETS = 3100  # the study's image sets (docs/DATA.md)
START = time.time()


def quiet(_message: str) -> None:
    pass


def elapsed() -> float:
    return time.time() - START


def device_name() -> str:
    import keras

    backend = keras.backend.backend()
    try:
        if backend == "torch":
            import torch

            return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
        if backend == "jax":
            import jax

            return str(jax.devices()[0])
        if backend == "tensorflow":
            import tensorflow as tf

            gpus = tf.config.list_physical_devices("GPU")
            return gpus[0].name if gpus else "cpu"
    except Exception as exc:  # a benchmark reports what it could not read
        return f"unknown ({exc})"
    return "cpu"


def stage_figures(name: str, summary: dict, modalities: int) -> dict:
    """Speed figures of one stage from its summary (``epoch_train_seconds`` from the stage)."""
    epochs = summary["epoch_train_seconds"]
    images_per_epoch = summary["train_rows"] * modalities
    steady = epochs[1:] or epochs
    return {
        "stage": name,
        "epochs": summary["epochs_run"],
        "rows": summary["train_rows"],
        "first_epoch_s": round(epochs[0], 2),
        "steady_img_s": round(images_per_epoch * len(steady) / max(sum(steady), 1e-9), 1),
        "steady_epoch_s": round(statistics.mean(steady), 3),
        "validation_s": summary.get("validation_seconds", 0.0),
        "features_s": summary.get("feature_seconds", 0.0),
        "total_s": summary["seconds"],
        "best_epoch": summary["best_epoch"],
        "kappa": round(summary["best_val_kappa"], 3),
        "params": summary["trainable_params"],
        "jit_compile": summary.get("jit_compile"),
    }


def run_fold_stages(dataset, config, work: Path, stage1_images: bool = False) -> dict:
    """Every stage of fold 0, timed; returns the figures and the stage summaries."""
    from dfu_ml.training.fold import fold_rf, plan_fold, run_pretrain, run_stage1, run_stage2

    plan = plan_fold(dataset, config, 0)
    rf_proba, _ = fold_rf(dataset, config, plan)
    n = len(config.image_modalities)
    figures, summaries, encoders = [], {}, {}
    for modality in config.image_modalities:
        encoders[modality] = work / f"encoder_{modality}"
        result = run_pretrain(dataset, config, plan, modality, encoders[modality], log=quiet)
        summaries[f"pretrain[{modality}]"] = result.summary()
        figures.append(stage_figures(f"pretrain[{modality}]", result.summary(), 1))
    if stage1_images:
        images = config.replace(stage1_cached_features=False)
        old = run_stage1(dataset, images, plan, rf_proba, encoders, log=quiet)
        figures.append(stage_figures("stage1 (images)", old.summary(), n))
    stage1 = run_stage1(dataset, config, plan, rf_proba, encoders, log=quiet)
    summaries["stage1"] = stage1.summary()
    figures.append(stage_figures("stage1", stage1.summary(), n))
    stage2 = run_stage2(dataset, config, plan, rf_proba, stage1, log=quiet)
    summaries["stage2"] = stage2.summary()
    figures.append(stage_figures("stage2", stage2.summary(), n))
    return {
        "figures": figures,
        "summaries": summaries,
        "val_rows": len(plan["val_rows"]),
        "image_sets_used": len(plan["train_rows"]) + len(plan["val_rows"]),
    }


def print_stages(figures: list) -> None:
    header = (
        f"{'stage':<22}{'epochs':>7}{'rows':>6}{'1st ep s':>9}{'img/s':>8}{'ep s':>7}"
        f"{'val s':>7}{'feat s':>7}{'total s':>8}{'kappa':>7}{'params':>11}"
    )
    print(header)
    for f in figures:
        print(
            f"{f['stage']:<22}{f['epochs']:>7}{f['rows']:>6}{f['first_epoch_s']:>9.2f}"
            f"{f['steady_img_s']:>8.0f}{f['steady_epoch_s']:>7.2f}{f['validation_s']:>7.2f}"
            f"{f['features_s']:>7.2f}{f['total_s']:>8.1f}{f['kappa']:>7.3f}{f['params']:>11,}"
        )


# ------------------------------------------------------------------------ the PyTorch reference

TORCHVISION = {
    "DenseNet121": "densenet121",
    "MobileNetV3Small": "mobilenet_v3_small",
    "EfficientNetB0": "efficientnet_b0",
    "EfficientNetB1": "efficientnet_b1",
    "EfficientNetB2": "efficientnet_b2",
    "EfficientNetB3": "efficientnet_b3",
}


def _reference_model(config):
    """(torch module taking NCHW floats, a description) or (None, why not)."""
    try:
        import torchvision

        if config.backbone in TORCHVISION:
            factory = getattr(torchvision.models, TORCHVISION[config.backbone])
            model = factory(weights=None, num_classes=3)
            return model, f"torchvision.models.{TORCHVISION[config.backbone]} (NCHW)"
    except ImportError:
        pass
    import keras

    if keras.backend.backend() != "torch":
        return None, "skipped: needs torchvision or KERAS_BACKEND=torch"
    from dfu_ml.training import models

    with models.precision("none"):  # the loop below applies the precision itself (autocast)
        encoder = models.build_image_encoder("depth_rgb", models.EncoderSpec.from_config(config))
        image_model = models.build_image_model(encoder, "depth_rgb")
    return image_model, "the Keras-built image model driven by a plain torch loop (NHWC)"


def torch_reference(config, steps: int, warmup: int = 5) -> dict:
    """Images/s of a plain PyTorch training loop (Adam, cross-entropy, eager) of the backbone at
    the config's batch size, image size and precision, on random images already on the device."""
    try:
        import torch
    except ImportError:
        return {"reference": "skipped: torch is not installed"}
    model, what = _reference_model(config)
    if model is None:
        return {"reference": what}
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = model.to(device).train()
    keras_model = "Keras" in what
    size, batch = config.image_size, config.batch_size
    shape = (batch, size, size, 3) if keras_model else (batch, 3, size, size)
    x = torch.rand(shape, device=device) * (255.0 if keras_model else 1.0)
    y = torch.randint(0, 3, (batch,), device=device)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    dtype = {"mixed_bfloat16": torch.bfloat16, "mixed_float16": torch.float16}.get(
        config.mixed_precision
    )

    def step():
        with torch.autocast(device_type=device, dtype=dtype, enabled=dtype is not None):
            out = model({"depth_rgb_image": x}, training=True) if keras_model else model(x)
            # the Keras model ends in a softmax, torchvision's in logits
            logits = torch.log(out.float().clamp_min(1e-7)) if keras_model else out.float()
            loss = torch.nn.functional.cross_entropy(logits, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    for _ in range(warmup):
        step()
    sync()
    start = time.time()
    for _ in range(steps):
        step()
    sync()
    seconds = time.time() - start
    return {
        "reference": what,
        "device": device,
        "batch": batch,
        "image_size": size,
        "precision": str(dtype or "float32"),
        "steps": steps,
        "img_s": round(steps * batch / seconds, 1),
    }


# ------------------------------------------------------------------------------- the real size


def render_dataset(folder: Path, patients: int, image_scale: float) -> dict:
    from dfu_ml.data.synthetic import generate_synthetic_dataset

    if not (folder / "bounding_box_depth.csv").is_file():  # reuse a --work folder's data
        generate_synthetic_dataset(folder, patients=patients, seed=0, image_scale=image_scale)
    return {"patients": patients, "image_scale": image_scale}


def epoch_caps(config, per_row_seconds: dict, rows: dict, seconds_left: float) -> dict:
    """Maximum epochs per stage so that the fold fits in ``seconds_left``, estimated from the
    small run's seconds per training row and epoch (validation included); at least 2."""
    want = {
        "pretrain": config.pretrain_epochs,
        "stage1": config.stage1_epochs,
        "stage2": config.stage2_epochs,
    }
    full = sum(per_row_seconds[s] * rows[s] * want[s] for s in want)
    share = min(1.0, seconds_left / max(full, 1e-9))
    return {s: max(2, min(want[s], math.floor(want[s] * share))) for s in want}


def real_size(args, config, small: dict, work: Path) -> dict:
    """One whole fold at about the study's size, with early stopping, within the budget."""
    from dfu_ml.data.prepare import prepare_for_config

    n_mod = len(config.image_modalities)
    sets_per_patient = small["image_sets"] / args.patients
    patients = math.ceil(REAL_IMAGE_SETS / sets_per_patient)
    start = time.time()
    render = render_dataset(work / "real_data", patients, args.real_image_scale)
    render["seconds"] = round(time.time() - start, 1)
    start = time.time()
    dataset = prepare_for_config(work / "real_data", config)
    render["prepare_seconds"] = round(time.time() - start, 1)
    render["image_sets"] = len(dataset.sets)
    if render["image_sets"] > REAL_IMAGE_SETS:  # the generator's sets per patient vary: sample
        config = config.replace(data_percentage=round(100 * REAL_IMAGE_SETS / len(dataset.sets), 1))
    # Seconds per training row and epoch in the small run, per stage kind (images per row: one
    # for pre-training, one per modality for the fusion stages, already in the figures).
    per_row = {}
    for kind in ("pretrain", "stage1", "stage2"):
        figs = [f for f in small["figures"] if f["stage"].split("[")[0] == kind]
        per_row[kind] = sum(
            (f["steady_epoch_s"] + f["validation_s"] / max(f["epochs"], 1)) / f["rows"]
            for f in figs
        )
    train_rows = small["train_rows"] * REAL_IMAGE_SETS / small["image_sets"]
    rows = {"pretrain": train_rows, "stage1": train_rows, "stage2": train_rows}
    seconds_left = args.budget_minutes * 60 - elapsed() - 30  # 30 s for the report
    caps = epoch_caps(config, per_row, rows, seconds_left)
    capped = config.replace(
        pretrain_epochs=caps["pretrain"],
        stage1_epochs=caps["stage1"],
        stage2_epochs=caps["stage2"],
    )
    start = time.time()
    fold = run_fold_stages(dataset, capped, work / "real")
    fold_seconds = time.time() - start
    render["data_percentage"] = config.data_percentage
    render["image_sets_used"] = fold["image_sets_used"]
    return {
        "dataset": render,
        "epoch_caps": caps,
        "fold_seconds": round(fold_seconds, 1),
        "figures": fold["figures"],
        **extrapolate(config, caps, fold, n_mod),
    }


def extrapolate(config, caps: dict, fold: dict, n_mod: int) -> dict:
    """GPU-minutes of one fold (measured; a stage that ran into its cap extrapolated to the
    profile's maximum) and of the 5-fold CV plus final fit (extrapolated: every fold like this
    one; the final fit trains 5/4 of the rows for the median best epoch, with no validation)."""
    want = {
        "pretrain": config.pretrain_epochs,
        "stage1": config.stage1_epochs,
        "stage2": config.stage2_epochs,
    }
    measured = sum(f["total_s"] for f in fold["figures"])
    uncapped = final = 0.0
    for f in fold["figures"]:
        kind = f["stage"].split("[")[0]
        per_epoch = f["steady_epoch_s"] + f["validation_s"] / max(f["epochs"], 1)
        hit_cap = f["epochs"] >= caps[kind] and caps[kind] < want[kind]
        extra_epochs = (want[kind] - f["epochs"]) if hit_cap else 0
        uncapped += f["total_s"] + extra_epochs * per_epoch
        best = f["best_epoch"] + extra_epochs
        final += f["first_epoch_s"] + f["features_s"] + 1.25 * f["steady_epoch_s"] * (best - 1)
    folds = config.cv_folds
    return {
        "fold_gpu_minutes_measured": round(measured / 60, 2),
        "fold_gpu_minutes_uncapped_estimate": round(uncapped / 60, 2),
        "cv_plus_final_gpu_minutes_extrapolated": round((folds * uncapped + final) / 60, 1),
        "final_fit_gpu_minutes_extrapolated": round(final / 60, 2),
    }


# ------------------------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default="paper")
    parser.add_argument("--patients", type=int, default=40, help="small dataset's patients")
    parser.add_argument("--image-scale", type=float, default=0.25)
    parser.add_argument("--epochs", type=int, default=4, help="epochs per stage, small dataset")
    parser.add_argument("--set", nargs="*", default=[], help="extra config overrides")
    parser.add_argument("--stage1-images", action="store_true", help="also Stage 1 on images")
    parser.add_argument("--reference-steps", type=int, default=40)
    parser.add_argument("--real-size", action="store_true", help="one fold at the study's size")
    parser.add_argument("--real-image-scale", type=float, default=0.15)
    parser.add_argument("--budget-minutes", type=float, default=9.0, help="cap for the command")
    parser.add_argument("--cache-dir", help="persistent compilation cache root for this run")
    parser.add_argument("--work", type=Path, default=None)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    if args.cache_dir:
        from dfu_ml.training.compile_cache import use_cache

        use_cache(args.cache_dir)

    import keras

    from dfu_ml.config import load_config
    from dfu_ml.data.prepare import prepare_for_config

    base = load_config(args.profile, args.set)
    epochs = args.epochs
    small_config = base.replace(
        pretrain_epochs=epochs,
        stage1_epochs=epochs,
        stage2_epochs=epochs,
        early_stopping_patience=epochs,
    )
    work = args.work or Path(tempfile.mkdtemp(prefix="dfu-bench-"))
    out = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "backend": keras.backend.backend(),
        "device": device_name(),
        "host": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
        "keras": keras.__version__,
        "profile": base.profile,
        "overrides": args.set,
        "backbone": base.backbone,
        "image_size": base.image_size,
        "batch_size": base.batch_size,
        "mixed_precision": base.mixed_precision,
        "jit_compile": base.jit_compile,
        "modalities": base.image_modalities,
    }
    try:
        import torch

        out["torch"] = torch.__version__
    except ImportError:
        pass
    print(json.dumps(out), flush=True)

    start = time.time()
    render_dataset(work / "data", args.patients, args.image_scale)
    dataset = prepare_for_config(work / "data", small_config)
    out["small_dataset"] = {
        "patients": args.patients,
        "image_sets": len(dataset.sets),
        "seconds": round(time.time() - start, 1),
    }
    small = run_fold_stages(dataset, small_config, work / "small", args.stage1_images)
    small["image_sets"] = len(dataset.sets)
    small["train_rows"] = small["figures"][0]["rows"]
    out["stages"] = small["figures"]
    print(f"\n1. stages: one fold, {epochs} epochs, {out['small_dataset']}")
    print_stages(small["figures"])

    reference = torch_reference(base, args.reference_steps)
    out["reference"] = reference
    print(f"\n2. reference: {reference.get('reference')}")
    if "img_s" in reference:
        print(f"   plain PyTorch loop: {reference['img_s']:.0f} img/s ({reference})")
        ratios = {
            f["stage"]: round(f["steady_img_s"] / reference["img_s"], 3)
            for f in small["figures"]
            if f["stage"].startswith(("pretrain", "stage2"))
        }
        out["ratio_to_reference"] = ratios
        print(f"   stage img/s / reference img/s: {ratios}")
    stage1 = {f["stage"]: f for f in small["figures"] if f["stage"].startswith("stage1")}
    if "stage1 (images)" in stage1:
        speedup = stage1["stage1 (images)"]["total_s"] / max(stage1["stage1"]["total_s"], 1e-9)
        out["stage1_cached_speedup"] = round(speedup, 1)
        print(f"   Stage 1 on cached features: {speedup:.1f}x faster than on images")

    if args.real_size:
        real = real_size(args, base, small, work)
        out["real_size"] = real
        print(f"\n3. real size: {real['dataset']}, epoch caps {real['epoch_caps']}")
        print_stages(real["figures"])
        print(
            f"   fold GPU-minutes (measured): {real['fold_gpu_minutes_measured']}; uncapped "
            f"(estimate): {real['fold_gpu_minutes_uncapped_estimate']}; 5-fold CV + final fit "
            f"(extrapolated): {real['cv_plus_final_gpu_minutes_extrapolated']}"
        )
    out["command_seconds"] = round(elapsed(), 1)
    print(f"\nwhole command: {out['command_seconds']} s")
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
