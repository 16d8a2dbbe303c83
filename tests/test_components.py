"""Every step as a command line on tiny inputs, as a user runs it inside the image with
``docker run IMAGE python -m components.<step> ...``; artifact arguments may be s3:// URIs."""

import json
import subprocess
import sys

import numpy as np
import pytest
import yaml

from dfu_ml.data.synthetic import generate_synthetic_dataset

STEPS = (
    "prepare",
    "resample_alpha",
    "clinical_rf",
    "pretrain_image",
    "stage1",
    "stage2",
    "evaluate",
    "publish",
)


@pytest.mark.parametrize("step", STEPS)
def test_every_step_has_a_cli_help(step):
    result = subprocess.run(
        [sys.executable, "-m", f"components.{step}", "--help"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"usage: python -m components.{step}")
    assert "--out" in result.stdout and "--config" in result.stdout


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("steps")
    generate_synthetic_dataset(root / "data", patients=10, seed=5, image_scale=0.08)
    config = root / "tiny.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "extends": "smoke",
                "modalities": ["metadata", "depth_rgb", "thermal_map"],
                "cv_folds": 2,
                "pretrain_epochs": 2,
                "stage1_epochs": 2,
                "stage2_epochs": 2,
                "rf_n_estimators": 30,
            }
        )
    )
    return root, str(config)


def _run(module, *args):
    from importlib import import_module

    return import_module(f"components.{module}").main([str(a) for a in args])


@pytest.mark.slow
def test_the_steps_chain_on_tiny_inputs_through_their_clis(tiny):
    root, config = tiny
    assert (
        _run("prepare", "--data", root / "data", "--out", root / "prepared", "--config", config)
        == 0
    )
    assert (root / "prepared" / "dataset.npz").is_file()
    report = json.loads((root / "prepared" / "data_report.json").read_text())
    assert report["patients"] == 10 and report["image_sets"] > 0

    assert (
        _run(
            "resample_alpha",
            "--prepared",
            root / "prepared",
            "--fold",
            0,
            "--out",
            root / "plan",
            "--config",
            config,
        )
        == 0
    )
    plan = json.loads((root / "plan" / "fold_plan.json").read_text())
    assert not set(plan["train_patients"]) & set(plan["val_patients"])
    assert abs(sum(plan["alpha_fusion"]) - 3) < 1e-6 and plan["alpha_pretrain"] == [1.0, 1.0, 1.0]

    assert (
        _run(
            "clinical_rf",
            "--prepared",
            root / "prepared",
            "--fold-plan",
            root / "plan",
            "--out",
            root / "rf",
            "--config",
            config,
        )
        == 0
    )
    proba = np.load(root / "rf" / "rf_proba.npy")
    assert np.allclose(np.nansum(proba, axis=1)[~np.isnan(proba).any(axis=1)], 1.0)

    for modality in ("depth_rgb", "thermal_map"):
        assert (
            _run(
                "pretrain_image",
                "--prepared",
                root / "prepared",
                "--fold-plan",
                root / "plan",
                "--modality",
                modality,
                "--out",
                root / f"enc_{modality}",
                "--config",
                config,
            )
            == 0
        )
        described = json.loads((root / f"enc_{modality}" / "encoder.json").read_text())
        assert described["modality"] == modality and described["summary"]["epochs_run"] >= 1

    assert (
        _run(
            "stage1",
            "--prepared",
            root / "prepared",
            "--fold-plan",
            root / "plan",
            "--rf",
            root / "rf",
            "--encoder",
            root / "enc_depth_rgb",
            "--encoder",
            root / "enc_thermal_map",
            "--out",
            root / "s1",
            "--config",
            config,
        )
        == 0
    )
    # Stage 2 twice from the same Stage 1 artifact, as two pipeline runs would: each step loads
    # Stage 1's model afresh, and the results must be identical.
    for out in ("s2", "s2-again"):
        assert (
            _run(
                "stage2",
                "--prepared",
                root / "prepared",
                "--fold-plan",
                root / "plan",
                "--rf",
                root / "rf",
                "--stage1",
                root / "s1",
                "--out",
                root / out,
                "--config",
                config,
            )
            == 0
        )
    result = json.loads((root / "s2" / "fold_result.json").read_text())
    again = json.loads((root / "s2-again" / "fold_result.json").read_text())
    assert result["stage2"]["weights_from"] in ("stage1", "stage2")
    assert len(result["labels"]) == len(plan["val_rows"])
    assert result["stage2"]["history"] == again["stage2"]["history"]
    assert result["proba"] == again["proba"] and result["metrics"] == again["metrics"]

    assert (
        _run("evaluate", "--fold-result", root / "s2", "--out", root / "eval", "--config", config)
        == 0
    )
    summary = json.loads((root / "eval" / "summary.json").read_text())
    assert summary["folds"][0]["per_row"]["quadratic_kappa"] == pytest.approx(
        result["metrics"]["per_row"]["quadratic_kappa"]
    )

    assert (
        _run(
            "publish",
            "--rf",
            root / "rf",
            "--summary",
            root / "eval",
            "--model",
            root / "s2",
            "--prepared",
            root / "prepared",
            "--out",
            root / "bundle",
            "--config",
            config,
            "--models-uri",
            root / "models",
        )
        == 0
    )
    manifest = json.loads((root / "bundle" / "manifest.json").read_text())
    assert manifest["blessed"] == summary["blessed"]
    assert (root / "models" / manifest["model_id"]).is_dir() == summary["blessed"]


@pytest.mark.slow
def test_a_step_reads_and_writes_s3_artifacts(tiny, s3_env):
    from dfu_ml.storage import S3Settings, download_tree, ensure_bucket, make_client, upload_tree

    root, config = tiny
    ensure_bucket(make_client(S3Settings.from_env()), "mlpipeline")
    if not (root / "prepared" / "dataset.npz").is_file():
        assert (
            _run("prepare", "--data", root / "data", "--out", root / "prepared", "--config", config)
            == 0
        )
    upload_tree(root / "prepared", "s3://mlpipeline/run1/prepared")
    assert (
        _run(
            "resample_alpha",
            "--prepared",
            "s3://mlpipeline/run1/prepared",
            "--fold",
            1,
            "--out",
            "s3://mlpipeline/run1/plan",
            "--config",
            config,
        )
        == 0
    )
    local = download_tree("s3://mlpipeline/run1/plan", root / "plan_from_s3")
    assert json.loads((local / "fold_plan.json").read_text())["fold"] == 1


def test_a_bad_step_input_is_one_clear_error_without_traceback(tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "components.resample_alpha",
            "--prepared",
            str(tmp_path / "nowhere"),
            "--fold",
            "0",
            "--out",
            str(tmp_path / "o"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "prepared dataset not found" in result.stderr and "nowhere" in result.stderr


def test_a_step_takes_config_overrides(tiny):
    root, config = tiny
    if not (root / "prepared" / "dataset.npz").is_file():
        assert (
            _run("prepare", "--data", root / "data", "--out", root / "prepared", "--config", config)
            == 0
        )
    for strategy in ("none", "combined"):
        assert (
            _run(
                "resample_alpha",
                "--prepared",
                root / "prepared",
                "--fold",
                0,
                "--out",
                root / f"plan_{strategy}",
                "--config",
                config,
                "--set",
                f"resampling={strategy}",
            )
            == 0
        )
    plain = json.loads((root / "plan_none" / "fold_plan.json").read_text())
    combined = json.loads((root / "plan_combined" / "fold_plan.json").read_text())
    assert plain["train_rows_resampled"] == plain["train_rows"]
    assert len(set(combined["class_counts_resampled"])) == 1  # combined equalises the classes
    assert (
        _run(
            "resample_alpha",
            "--prepared",
            root / "prepared",
            "--fold",
            0,
            "--out",
            root / "plan_bad",
            "--config",
            config,
            "--set",
            "resampling=sometimes",
        )
        == 2
    )
