"""The training stages run on Keras's torch backend too (the model, layer, loss and metric code uses
only ``keras`` and ``keras.ops``).

Keras picks its backend when it is first imported, so the stages run in a subprocess started with
KERAS_BACKEND=torch. The test skips, saying why, where torch is not installed in this interpreter
(``pip install torch`` adds it; a CPU wheel is enough).
"""

import json
import math
import os
import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.slow

SCRIPT = textwrap.dedent("""
    import json, sys
    from pathlib import Path

    import keras
    import numpy as np

    from dfu_ml.config import load_config
    from dfu_ml.data.prepare import prepare_dataset
    from dfu_ml.training import models
    from dfu_ml.training.fold import (fold_predictions, fold_rf, plan_fold, run_pretrain,
                                      run_stage1, run_stage2)
    from dfu_ml.training.metrics import KAPPA

    data, work = Path(sys.argv[1]), Path(sys.argv[2])
    config = load_config("smoke", ["modalities=metadata,depth_rgb", "pretrain_epochs=2",
                                   "stage1_epochs=2", "stage2_epochs=1", "rf_n_estimators=20",
                                   "rf_inner_folds=2"])
    dataset = prepare_dataset(data, image_size=config.image_size, modalities=["depth_rgb"],
                              crop_margins=config.crop_margins)
    plan = plan_fold(dataset, config, 0)
    rf_proba, _ = fold_rf(dataset, config, plan)
    quiet = lambda message: None
    pre = run_pretrain(dataset, config, plan, "depth_rgb", work / "encoder", log=quiet)
    encoders = {"depth_rgb": work / "encoder"}
    s1 = run_stage1(dataset, config, plan, rf_proba, encoders, log=quiet)
    # Cached features vs images, without Dropout: torch's unseeded dropout draws from torch's
    # global generator, which every DataLoader iterator (the feature pass's predict calls
    # included) draws from too, so the two paths cannot get the same masks on torch.
    no_dropout = config.replace(dropout=0.0)
    s1_cached = run_stage1(dataset, no_dropout, plan, rf_proba, encoders, log=quiet)
    s1_images = run_stage1(dataset, no_dropout.replace(stage1_cached_features=False), plan,
                           rf_proba, encoders, log=quiet)
    s2 = run_stage2(dataset, config, plan, rf_proba, s1, log=quiet)
    bf16 = run_pretrain(dataset, config.replace(mixed_precision="mixed_bfloat16", pretrain_epochs=1),
                        plan, "depth_rgb", None, log=quiet)
    bf16_backbone = bf16.model.get_layer(models.encoder_name("depth_rgb")).get_layer(
        models.backbone_name("depth_rgb"))
    predictions = fold_predictions(dataset, config, plan, rf_proba, s2.val_proba)
    s2.model.save(work / "fusion.keras")
    reloaded = keras.saving.load_model(work / "fusion.keras", compile=False)
    out = {
        "backend": keras.backend.backend(),
        "val_rows": len(plan["val_rows"]),
        "stages": {r.stage: {k: v for k, v in r.summary().items()} for r in (pre, s1, s2)},
        "fusion_rf_weight": s2.model.get_layer(models.FUSION_LAYER).rf_weight(),
        "reloaded_rf_weight": reloaded.get_layer(models.FUSION_LAYER).rf_weight(),
        "kappa_key": KAPPA,
        "predicted_rows": len(predictions["proba"]),
        "proba_row_sums": np.asarray(predictions["proba"]).sum(axis=1).tolist(),
        "stage1_inputs": [s1_cached.extra["stage1_inputs"], s1_images.extra["stage1_inputs"]],
        "cached_vs_images_max_weight_diff": max(float(np.abs(a - b).max()) for a, b in zip(
            s1_cached.model.get_weights(), s1_images.model.get_weights())),
        "cached_vs_images_kappa": [s1_cached.history[KAPPA], s1_images.history[KAPPA]],
        "bf16": {
            "output": bf16.model.get_layer(models.OUTPUT_LAYER).compute_dtype,
            "backbone": sorted({l.compute_dtype for l in bf16_backbone.layers if l.weights}),
            "loss": bf16.history["loss"],
            "val_rows_scored": bf16.val_rows_scored,
        },
    }
    print("RESULT " + json.dumps(out))
""")


def torch_env():
    env = dict(
        os.environ, KERAS_BACKEND="torch", TF_CPP_MIN_LOG_LEVEL="3", TF_ENABLE_ONEDNN_OPTS="0"
    )
    return env


def test_stages_run_on_the_torch_backend(request, tmp_path):
    probe = subprocess.run(
        [sys.executable, "-c", "import torch; print(torch.__version__)"],
        capture_output=True,
        text=True,
        env=torch_env(),
        timeout=120,
    )
    if probe.returncode != 0:
        last = (probe.stderr.strip().splitlines() or ["no output"])[-1]
        pytest.skip(
            f"torch is not importable in {sys.executable} ({last}); "
            "`pip install torch` to run the stages on Keras's torch backend"
        )
    synthetic_dir = request.getfixturevalue("synthetic_dir")  # only once torch is known to work
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(synthetic_dir), str(tmp_path)],
        capture_output=True,
        text=True,
        env=torch_env(),
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    line = [l for l in done.stdout.splitlines() if l.startswith("RESULT ")][-1]
    out = json.loads(line[len("RESULT ") :])
    assert out["backend"] == "torch"
    kappa = out["kappa_key"]
    stages = out["stages"]
    assert set(stages) == {"pretrain[depth_rgb]", "stage1", "stage2"}
    for name, s in stages.items():
        assert len(s["history"][kappa]) == s["epochs_run"] >= 1, name
        assert s["best_epoch"] == s["history"][kappa].index(max(s["history"][kappa])) + 1
        assert s["trainable_params"] > 0
        assert s["val_rows_scored"] == out["val_rows"]
        assert s["steps_per_epoch"] >= 2
    assert stages["stage2"]["kept_stage1_weights"] != stages["stage2"]["improved_on_stage1"]
    assert stages["stage2"]["trainable_params"] > stages["stage1"]["trainable_params"]
    assert out["fusion_rf_weight"] != 0.7  # the learnable fusion weight trained on torch too
    assert out["reloaded_rf_weight"] == pytest.approx(out["fusion_rf_weight"], rel=1e-6)
    assert out["predicted_rows"] == out["val_rows"]
    assert all(abs(s - 1) < 1e-4 for s in out["proba_row_sums"])
    # Stage 1 on cached backbone features trains the model Stage 1 on images trains, on torch too
    # (the training arrays are torch tensors there: batches are cut on the device).
    assert out["stage1_inputs"] == ["cached_backbone_features", "images"]
    assert out["cached_vs_images_max_weight_diff"] < 1e-4
    assert out["cached_vs_images_kappa"][0] == pytest.approx(out["cached_vs_images_kappa"][1])
    # Mixed precision: bfloat16 compute, float32 probabilities, a finite loss. torch.compile
    # (jit_compile=compiled) is not run here: on CPU it took about 3 minutes for Stage 1's head.
    assert out["bf16"]["output"] == "float32" and out["bf16"]["backbone"] == ["bfloat16"]
    assert all(math.isfinite(v) for v in out["bf16"]["loss"])
    assert out["bf16"]["val_rows_scored"] == out["val_rows"]
