"""The smoke pipeline through kfp.local's DockerRunner: every step in the component image, the one
the cluster runs, as its non-root user.

Needs a Docker-compatible API and the image: DFU_DOCKER_HOST names the socket (``.ci/run`` starts
podman's after docker/ci_images.sh built the image) and DFU_DOCKER_IMAGE the image (default
localhost/dfu-kfp-cpu:<version>). Without them these tests skip, saying why.
"""

import os
from pathlib import Path

import pytest

from dfu_ml import __version__
from pipelines import local_run

IMAGE = os.environ.get("DFU_DOCKER_IMAGE", f"localhost/dfu-kfp-cpu:{__version__}")
IMAGE_UID = 1000  # USER in docker/Dockerfile.cpu
STEPS = {
    "resolve-config",
    "prepare-data",
    "make-fold-plan",
    "clinical-forest",
    "pretrain-encoder",
    "stage1-fusion",
    "stage2-finetune",
    "evaluate-folds",
    "bundle-model",
    "publish-model",
}


@pytest.mark.parametrize(
    "ref, local",
    [
        ("localhost/dfu-kfp-cpu:0.1.0@sha256:" + "a" * 64, "localhost/dfu-kfp-cpu:0.1.0"),
        ("localhost/dfu-kfp-cpu:0.1.0", "localhost/dfu-kfp-cpu:0.1.0"),
        (
            "localhost:5000/dfu-kfp-cpu@sha256:" + "a" * 64,
            "localhost:5000/dfu-kfp-cpu@sha256:" + "a" * 64,
        ),
    ],
)
def test_local_ref(ref, local):
    assert local_run._local_ref(ref) == local


@pytest.fixture(scope="module")
def docker_host():
    host = os.environ.get("DFU_DOCKER_HOST")
    if not host:
        pytest.skip(
            "DFU_DOCKER_HOST is not set (a Docker-compatible socket, e.g. podman's: see .ci/run)"
        )
    docker = pytest.importorskip("docker", reason="docker-py is not installed (pip install docker)")
    try:
        client = docker.DockerClient(base_url=host, timeout=30)
        client.ping()
    except Exception as err:  # noqa: BLE001 - any failure to reach the API means: skip
        pytest.skip(f"no Docker API at DFU_DOCKER_HOST={host}: {err}")
    try:
        client.images.get(IMAGE)
    except docker.errors.ImageNotFound:
        pytest.skip(f"image {IMAGE} not found at {host} (bash docker/ci_images.sh builds it)")
    finally:
        client.close()
    return host


@pytest.fixture
def docker_env(docker_host, monkeypatch, tmp_path):
    monkeypatch.setenv("DOCKER_HOST", docker_host)
    # run_local points these at its output folder; give them back afterwards
    monkeypatch.setenv("TMPDIR", os.environ.get("TMPDIR", "/tmp"))
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras"))
    return docker_host


@pytest.mark.slow
def test_smoke_pipeline_in_the_component_image(docker_env, tmp_path):
    from dfu_ml.config import load_config
    from dfu_ml.data.synthetic import generate_synthetic_dataset
    from pipelines.settings import RuntimeSettings

    if os.getuid() == IMAGE_UID:
        pytest.skip(
            f"this test tells the image's files by their owner, uid {IMAGE_UID}: run it as another user"
        )
    data = tmp_path / "data"  # outside the pipeline root: mounted read-only by run_local
    generate_synthetic_dataset(data, patients=12, seed=0, image_scale=0.1)
    config = load_config(
        "smoke",
        [
            "cv_folds=2",
            "modalities=[metadata, depth_rgb]",
            "pretrain_epochs=2",
            "stage1_epochs=2",
            "stage2_epochs=2",
        ],
    )
    out = tmp_path / "out"
    summary = local_run.run_local(
        config,
        str(data),
        out,
        runner="docker",
        runtime=RuntimeSettings(images={"cpu": IMAGE, "gpu": IMAGE}),
        log=lambda *a: None,
    )

    assert len(summary["folds"]) == 2 and summary["modalities"] == ["metadata", "depth_rgb"]
    assert summary["health"] and summary["model_id"]
    final = Path(summary["final_model"])
    for name in ("manifest.json", "model.keras", "clinical_model.joblib"):
        assert (final / name).is_file(), f"final model bundle lacks {name}"
    assert (out / "summary.json").is_file()

    run_dir = Path(summary["pipeline_run"])
    done = sorted(run_dir.rglob("executor_output.json"))  # written by each step's executor
    ran = {p.parent.name.rstrip("-0123456789") for p in done}
    # publish runs only for a blessed model
    assert ran == STEPS if summary["blessed"] else ran == STEPS - {"publish-model"}
    not_in_image = [str(p.relative_to(run_dir)) for p in done if p.stat().st_uid != IMAGE_UID]
    assert not not_in_image, (
        f"steps that did not run as the image's uid {IMAGE_UID}: {not_in_image}"
    )
    assert (run_dir / "evaluate-folds" / "summary" / "summary.json").stat().st_uid == IMAGE_UID
    assert not list(data.rglob("*.npz")), "the dataset folder should have been mounted read-only"


def test_failing_step_fails(docker_env, tmp_path):
    """kfp 2.17's DockerRunner reports a failed container as SUCCESS (kubeflow/pipelines#13332);
    run_local's runner="docker" reads the real exit status."""
    from kfp import dsl, local

    from pipelines.kfp_workarounds import docker_exit_status

    @dsl.component(base_image=IMAGE, install_kfp_package=False)
    def exits_3():
        import sys

        print("failing on purpose")
        sys.exit(3)

    @dsl.pipeline
    def failing():
        exits_3()

    root = tmp_path / "root"
    root.mkdir()
    runner = local_run._docker_runner(tmp_path, root, data=str(root), models_uri="")
    local.init(runner=runner, pipeline_root=str(root), raise_on_error=True)
    with docker_exit_status(), pytest.raises(RuntimeError, match="FAILURE"):
        failing()
