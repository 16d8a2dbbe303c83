"""The Kubeflow pipeline: compiled YAML, the local main job end to end (reading the dataset from
and publishing to a real S3 protocol server), a metadata-only run, and predict on held-back
patients."""

import json
import os
import re

import numpy as np
import pandas as pd
import pytest
import yaml

from dfu_ml.config import load_config
from dfu_ml.data.schema import CLASS_NAMES, CLINICAL_CSV, LABEL_COLUMN
from dfu_ml.data.synthetic import generate_synthetic_dataset

FAST = [
    "cv_folds=2",
    "pretrain_epochs=3",
    "stage1_epochs=3",
    "stage2_epochs=2",
    "rf_n_estimators=40",
]
PINNED = {
    "cpu": "registry.example/dfu-kfp-cpu:0.1.0@sha256:" + "a" * 64,
    "gpu": "registry.example/dfu-kfp-gpu:0.1.0@sha256:" + "b" * 64,
}


def _compile(tmp_path, profile="paper", overrides=(), runtime=None):
    from pipelines.pipeline import compile_pipeline

    path = compile_pipeline(
        load_config(profile, list(overrides)), tmp_path / "pipeline.yaml", runtime
    )
    text = path.read_text()
    return text, list(yaml.safe_load_all(text))


def _executor_components(spec) -> dict:
    """executor label -> the component it runs (numbered copies folded: stage1-fusion-2)."""
    return {
        c["executorLabel"]: re.sub(r"-\d+$", "", name.removeprefix("comp-"))
        for name, c in spec["components"].items()
        if "executorLabel" in c
    }


def test_compiled_yaml_places_exactly_the_gpu_steps_on_gpu_nodes(tmp_path):
    from pipelines.pipeline import GPU_COMPONENTS

    _, (spec, platform) = _compile(tmp_path)
    executors = spec["deploymentSpec"]["executors"]
    k8s = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    components = _executor_components(spec)
    assert set(components.values()) >= GPU_COMPONENTS
    for name, executor in executors.items():
        accelerator = executor["container"].get("resources", {}).get("accelerator")
        placement = k8s.get(name, {})
        if components[name] in GPU_COMPONENTS:
            assert accelerator["resourceType"] == "nvidia.com/gpu" and accelerator["count"] == "1"
            assert placement["nodeSelector"]["labels"] == {"dfu-kfp/node-pool": "gpu"}
            assert placement["tolerations"][0]["key"] == "nvidia.com/gpu"
            assert "gpu" in executor["container"]["image"]
        else:
            assert accelerator is None, name
            assert "nodeSelector" not in placement and "tolerations" not in placement, name


def test_compiled_yaml_holds_no_credentials_and_reads_them_from_the_secret(tmp_path, monkeypatch):
    from pipelines.pipeline import STORAGE_COMPONENTS

    secret = "s3cr3t-value-that-must-not-leak"
    monkeypatch.setenv("DFU_S3_SECRET_KEY", secret)
    monkeypatch.setenv("DFU_S3_ACCESS_KEY", "ACCESS-KEY-NOT-IN-YAML")
    text, (spec, platform) = _compile(tmp_path)
    assert secret not in text and "ACCESS-KEY-NOT-IN-YAML" not in text
    k8s = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    components = _executor_components(spec)
    with_secret = {components[n] for n, e in k8s.items() if "secretAsEnv" in e}
    assert with_secret == set(STORAGE_COMPONENTS)
    env = {k["envVar"] for k in k8s["exec-prepare-data"]["secretAsEnv"][0]["keyToEnv"]}
    assert env == {"DFU_S3_ACCESS_KEY", "DFU_S3_SECRET_KEY"}
    retried = {
        task["componentRef"]["name"]
        for component in [spec["root"], *spec["components"].values()]
        for task in component.get("dag", {}).get("tasks", {}).values()
        if int(task.get("retryPolicy", {}).get("maxRetryCount", 0)) >= 1
    }
    assert {"comp-prepare-data", "comp-publish-model"} <= retried


def test_runtime_settings_change_placement_but_never_the_training_config(tmp_path):
    from pipelines.settings import RuntimeSettings

    runtime = RuntimeSettings(
        images=PINNED, s3_endpoint="minio.example:9000", gpu_node_selector={"pool": "a100"}
    )
    text, (spec, platform) = _compile(tmp_path, runtime=runtime)
    used = {e["container"]["image"] for e in spec["deploymentSpec"]["executors"].values()}
    assert used == set(PINNED.values())
    k8s = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    assert k8s["exec-stage1-fusion"]["nodeSelector"]["labels"] == {"pool": "a100"}
    assert "minio.example:9000" in text
    # The training configuration compiled in is the same as with the default settings.
    (tmp_path / "default").mkdir()
    _, (default_spec, _) = _compile(tmp_path / "default")
    assert _compiled_config(spec) == _compiled_config(default_spec)


def _compiled_config(spec) -> dict:
    resolve = spec["root"]["dag"]["tasks"]["resolve-config"]["inputs"]["parameters"]
    return json.loads(resolve["config_json"]["runtimeValue"]["constant"])


def test_unpinned_images_are_warned_about_on_compile(tmp_path, capsys):
    from pipelines.cli import main

    assert main(["compile", "--config", "smoke", "--output", str(tmp_path / "a.yaml")]) == 0
    assert "warning: compiling with unpinned or local images" in capsys.readouterr().err
    pinned = json.dumps(PINNED)
    assert (
        main(
            [
                "compile",
                "--config",
                "smoke",
                "--output",
                str(tmp_path / "b.yaml"),
                "--set",
                f"images={pinned}",
            ]
        )
        == 0
    )
    assert "warning" not in capsys.readouterr().err


def test_the_ui_sees_display_names_descriptions_and_stage_metrics(tmp_path):
    from pipelines.run_parameters import MAIN

    _, (spec, _platform) = _compile(tmp_path)
    description = spec["pipelineInfo"]["description"]
    for stage in (
        "prepare data",
        "clinical random forest",
        "pre-train image encoder",
        "Stage 1",
        "Stage 2",
        "evaluate folds",
        "final fit",
        "publish",
    ):
        assert stage in description
    parameters = spec["root"]["inputDefinitions"]["parameters"]
    assert set(parameters) == {p.name for p in MAIN.parameters}
    for name, parameter in parameters.items():
        assert parameter.get("description"), f"run parameter {name} has no description"
    names = []
    for component in [spec["root"], *spec["components"].values()]:
        for key, task in component.get("dag", {}).get("tasks", {}).items():
            names.append(task["taskInfo"]["name"])
            assert task["taskInfo"]["name"] != key, f"task {key} has no display name"
    for expected in (
        "prepare data",
        "fold · pre-train image encoder",
        "fold · Stage 1, frozen backbones",
        "final fit · Stage 2, fine-tune",
        "evaluate folds · health verdict",
        "publish blessed model",
        "cross-validation folds",
    ):
        assert expected in names
    assert not any(name.endswith("-op") or "_op" in name for name in spec["components"])
    for stage in ("pretrain-encoder", "stage1-fusion", "stage2-finetune"):
        outputs = spec["components"][f"comp-{stage}"]["outputDefinitions"]["artifacts"]
        assert outputs["metrics"]["artifactType"]["schemaTitle"] == "system.Metrics", stage
    evaluate = spec["components"]["comp-evaluate-folds"]["outputDefinitions"]["artifacts"]
    assert {
        evaluate[k]["artifactType"]["schemaTitle"] for k in ("confusion", "report", "markdown")
    } == {"system.ClassificationMetrics", "system.HTML", "system.Markdown"}


def test_metadata_only_config_compiles_without_gpu_steps(tmp_path):
    from pipelines.pipeline import GPU_COMPONENTS

    _, (spec, _platform) = _compile(tmp_path, overrides=["modalities=metadata"])
    assert not set(_executor_components(spec).values()) & GPU_COMPONENTS
    assert not any(
        "accelerator" in e["container"].get("resources", {})
        for e in spec["deploymentSpec"]["executors"].values()
    )


def _upload_dataset(folder, uri):
    from dfu_ml.storage import S3Settings, ensure_bucket, make_client, parse_s3_uri, upload_tree

    bucket, _ = parse_s3_uri(uri)
    ensure_bucket(make_client(S3Settings.from_env()), bucket)
    upload_tree(folder, uri)


def _list_objects(uri):
    from dfu_ml.storage import S3Settings, make_client, parse_s3_uri

    bucket, prefix = parse_s3_uri(uri)
    client = make_client(S3Settings.from_env())
    return [o.object_name for o in client.list_objects(bucket, prefix=prefix, recursive=True)]


@pytest.mark.slow
def test_local_pipeline_end_to_end_through_s3_then_predict_on_held_back_patients(tmp_path, s3_env):
    from dfu_ml.storage import S3Settings, ensure_bucket, make_client
    from pipelines.cli import main
    from pipelines.local_run import run_local
    from pipelines.settings import RuntimeSettings

    data = tmp_path / "data"
    generate_synthetic_dataset(data, patients=14, seed=3, image_scale=0.12)
    _upload_dataset(data, "s3://dfu-data/synthetic")
    ensure_bucket(make_client(S3Settings.from_env()), "dfu-models")
    config = load_config("smoke", FAST)
    runtime = RuntimeSettings(models_uri="s3://dfu-models/runs")
    summary = run_local(
        config, "s3://dfu-data/synthetic", tmp_path / "out", log=lambda _: None, runtime=runtime
    )

    written = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert written["final_model"] == str(tmp_path / "out" / "final_model")
    assert len(written["folds"]) == 2
    for fold in written["folds"]:
        for level in ("per_row", "per_visit"):
            assert set(fold[level]) == {"quadratic_kappa", "accuracy", "macro_f1"}
        for name in ("pretrain[depth_rgb]", "pretrain[thermal_map]", "stage1", "stage2"):
            stage = fold["stages"][name]
            assert stage["best_epoch"] >= 1 and stage["trainable_params"] > 0
            assert -1 <= stage["best_val_kappa"] <= 1
    assert {c["check"] for c in written["health"]["checks"]} >= {
        "pretraining_kappa_positive",
        "stage1_best_epoch_after_1",
        "stage2_improves_or_stage1_kept",
        "final_kappa_above_threshold",
        "no_stage_restores_epoch_1",
    }
    assert (tmp_path / "out" / "report.html").read_text().count("<img") >= 2
    # Really trained: the stages ran epochs and the final fit used the folds' best epochs.
    assert written["final_fit_epochs"]["stage1"] >= 1
    published = _list_objects("s3://dfu-models/runs/")
    if summary["blessed"]:
        assert f"runs/{summary['model_id']}/_SUCCESS" in published
        versions = f"runs/{summary['model_id']}/_versions/"
        assert any(k.startswith(versions) and k.endswith("/model.keras") for k in published)
    else:
        assert published == []

    # New patients (another seed), first with labels, then without.
    new = tmp_path / "new"
    generate_synthetic_dataset(new, patients=5, seed=99, image_scale=0.12)
    clinical = pd.read_csv(new / CLINICAL_CSV, encoding="utf-8-sig")
    visits = len(clinical.drop_duplicates(["Patient#", "Appt#", "DFU#"]))
    out_csv = tmp_path / "pred.csv"
    predict = [
        "predict",
        "--model",
        written["final_model"],
        "--data",
        str(new),
        "--out",
        str(out_csv),
    ]
    assert main(predict) == 0
    predictions = pd.read_csv(out_csv)
    assert len(predictions) == visits
    proba = predictions[[f"p_{c}" for c in CLASS_NAMES]].to_numpy()
    assert np.allclose(proba.sum(axis=1), 1.0, atol=1e-4)
    assert set(predictions["predicted_phase"]) <= set(CLASS_NAMES)
    assert (predictions["true_phase"].isin(CLASS_NAMES)).all()
    clinical.drop(columns=[LABEL_COLUMN]).to_csv(
        new / CLINICAL_CSV, index=False, encoding="utf-8-sig"
    )
    assert main(predict) == 0
    unlabelled = pd.read_csv(out_csv)
    assert "true_phase" not in unlabelled and len(unlabelled) == visits
    assert np.allclose(unlabelled[[f"p_{c}" for c in CLASS_NAMES]].to_numpy(), proba, atol=1e-5)


@pytest.mark.slow
def test_metadata_only_run_of_the_main_job(tmp_path, capsys):
    from pipelines.cli import main

    data = tmp_path / "data"
    generate_synthetic_dataset(data, patients=14, seed=4, image_scale=0.05)
    code = main(
        [
            "run",
            "--data",
            str(data),
            "--out",
            str(tmp_path / "out"),
            "--set",
            "modalities=metadata",
            "cv_folds=2",
            "data_percentage=80",
            "rf_n_estimators=40",
        ]
    )
    assert code == 0
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["modalities"] == ["metadata"]
    assert all(f["stages"] == {} for f in summary["folds"])
    checks = {c["check"] for c in summary["health"]["checks"]}
    assert "final_kappa_above_threshold" in checks and "stage1_best_epoch_after_1" not in checks
    bundle = sorted(os.listdir(summary["final_model"]))
    assert "clinical_model.joblib" in bundle and "model.keras" not in bundle
    # summary.json lists the clinical columns used: leak suspects are out by default.
    columns = summary["clinical_model"]["columns"]
    assert "Dressing Grouped" not in columns["used"] and "Wound Score" in columns["used"]
    assert "Dressing Grouped" in columns["excluded"]["leak_suspect"]
    printed = capsys.readouterr().out
    assert "Training health:" in printed and "mean |" in printed
