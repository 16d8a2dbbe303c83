"""The main job: run the real pipeline definition through ``kfp.local``.

With no ``--data`` it generates a synthetic dataset and uses a local folder as the object store
(the embedded default). It ends with the per-fold and mean metrics, the health verdict,
``OUT/summary.json``, ``OUT/report.html`` and the final model bundle in ``OUT/final_model``.
"""

import builtins
import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
import time
import warnings
from pathlib import Path

from dfu_ml.config import Config

DEFAULT_SYNTH_PATIENTS = 40
DEFAULT_SYNTH_SCALE = 0.2


# A line of kfp's JSON dump of the executor input: a key, a brace or bracket, or a bare value.
_JSON_LINE = re.compile(r'^(["{}\[\]]|(-?\d+(\.\d+)?([eE][-+]?\d+)?|true|false|null),?$)')


class _DropKfpChatter(logging.Filter):
    """kfp.local logs every task's outputs (artifact URIs, the whole config) and a "Streamed logs"
    banner: keep them in the log file, not on the console."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return " outputs:" not in message and "Streamed logs" not in message


@contextlib.contextmanager
def concise_console(log_path: Path):
    """Show step progress and our own output; send kfp's executor dumps to ``log_path`` only.

    kfp.local prints each step's output through ``builtins.print`` (indented), including the
    executor's INFO log with the whole executor input as JSON. Every line still goes to the log.
    Steps run concurrently, so the filter judges each line on its own.
    """
    original_print = builtins.print
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log_file = open(log_path, "a")
    pending = {"prefix": ""}

    def visible(line: str) -> bool:
        text = line.strip()
        if not text or "[KFP Executor" in line or set(text) <= {"-"}:
            return False
        return not (_JSON_LINE.match(text) or text.startswith('"'))

    def filtered_print(*args, **kwargs):
        if kwargs.get("file") is not None:
            return original_print(*args, **kwargs)
        end = kwargs.get("end", "\n")
        text = kwargs.get("sep", " ").join(str(a) for a in args)
        if end == "" and not text.strip():
            pending["prefix"] += text  # kfp's indentation, printed separately
            return None
        line, pending["prefix"] = pending["prefix"] + text, ""
        log_file.write(line + end)
        if visible(line):
            original_print(line, end=end, flush=True)
        return None

    log_filter = _DropKfpChatter()
    logging.getLogger().addFilter(log_filter)
    builtins.print = filtered_print
    try:
        with warnings.catch_warnings():
            # Locally every step runs in this Python, whatever image it names; the README says so.
            warnings.filterwarnings("ignore", message=".*custom or non-Python base image.*")
            yield
    finally:
        builtins.print = original_print
        logging.getLogger().removeFilter(log_filter)
        log_file.close()


# --- runner="docker": every step in its component image, through kfp.local.DockerRunner ------------
def _local_ref(ref: str) -> str:
    """kfp.local finds a local image only by NAME:TAG or NAME@DIGEST, not NAME:TAG@DIGEST."""
    name = ref.partition("@")[0]
    return name if ":" in name.rsplit("/", 1)[-1] else ref


def _run_container(client, image: str, command: list, volumes: dict, **run_args) -> int:
    """kfp.local's ``run_docker_container`` without ``auto_remove``. kfp 2.17 has the container
    removed on exit, then takes the 404 from ``wait`` for exit status 0: a failing step passes
    (always under podman; kubeflow/pipelines#13332). Also: no pull of a ``localhost/`` image."""
    import docker
    from kfp.local.docker_task_handler import add_latest_tag_if_not_present

    image = add_latest_tag_if_not_present(image)
    try:
        client.images.get(image)
    except docker.errors.ImageNotFound:
        if image.startswith("localhost/"):
            raise RuntimeError(
                f"image {image} is not in the local image store of {client.api.base_url}"
                " (build it: bash docker/build.sh)"
            ) from None
        client.images.pull(image)
    container = client.containers.run(
        image=image, command=command, detach=True, volumes=volumes, **run_args
    )
    try:
        rest = b""
        for chunk in container.logs(stream=True, follow=True):  # pieces of lines: print whole ones
            *lines, rest = (rest + chunk).split(b"\n")
            for line in lines:
                print(line.decode(errors="replace"))
        if rest:
            print(rest.decode(errors="replace"))
        return container.wait()["StatusCode"]
    finally:
        with contextlib.suppress(docker.errors.APIError):
            container.remove(force=True)


@contextlib.contextmanager
def _docker_exit_status():
    from kfp.local import docker_task_handler

    original = docker_task_handler.run_docker_container
    docker_task_handler.run_docker_container = _run_container
    try:
        yield
    finally:
        docker_task_handler.run_docker_container = original


def _docker_runner(out: Path, pipeline_root: Path, data: str, models_uri: str):
    """A DockerRunner for the component images, run as their own non-root user (uid 1000).

    kfp mounts only the pipeline root (at the same path); a local dataset (read-only) and a local
    models folder are mounted at their paths too. Folders under ``out`` that the steps write to
    become world-writable. Host network, so that an S3 endpoint on localhost is reachable; the
    DFU_S3_* variables are passed in (the Kubernetes secret's job on a cluster).
    """
    try:
        from docker.types import Mount
    except ImportError as err:
        raise ImportError("runner='docker' needs docker-py: pip install docker") from err
    from kfp import local

    writable = [pipeline_root]
    mounts, mounted = [], [pipeline_root]
    for path, read_only in ((data, True), (models_uri, False)):
        if not path or "://" in path:
            continue
        path = Path(path).resolve()
        if not read_only:
            path.mkdir(parents=True, exist_ok=True)
            if path.is_relative_to(out):
                writable.append(path)
        if not any(path.is_relative_to(m) for m in mounted):
            mounts.append(
                Mount(target=str(path), source=str(path), type="bind", read_only=read_only)
            )
            mounted.append(path)
    for path in writable:
        path.chmod(0o777)
    environment = {k: v for k, v in os.environ.items() if k.startswith("DFU_S3_")}
    return local.DockerRunner(network_mode="host", mounts=mounts, environment=environment)


def _newest_run(pipeline_root: Path) -> Path:
    runs = sorted(
        (p for p in pipeline_root.iterdir() if p.is_dir()), key=lambda p: p.stat().st_mtime
    )
    if not runs:
        raise RuntimeError(f"kfp.local left no run folder under {pipeline_root}")
    return runs[-1]


def run_local(
    config: Config,
    data: str | None,
    out: Path,
    synth_patients: int = DEFAULT_SYNTH_PATIENTS,
    log=print,
    quiet: bool = True,
    runner: str = "subprocess",
    images: dict | None = None,
) -> dict:
    """Run the pipeline locally and collect its results into ``out``; return the summary.

    ``runner="subprocess"`` runs every step in this Python; ``runner="docker"`` runs each in its
    component image through kfp's DockerRunner (DOCKER_HOST may name podman's socket). ``images``
    ({"cpu": REF, "gpu": REF}) defaults to docker/images.json; with docker, to its CPU image for
    both (kfp.local gives containers no GPU).
    """
    if runner not in ("subprocess", "docker"):
        raise ValueError(f"runner {runner!r}: 'subprocess' or 'docker'")
    from kfp import local

    from dfu_ml.evaluation import format_table
    from dfu_ml.training.health import format_verdict
    from pipelines.pipeline import build_pipeline

    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    # kfp.local leaves a mktemp folder per step: keep them inside the run's folder.
    tmp = out / "tmp"
    tmp.mkdir(exist_ok=True)
    os.environ["TMPDIR"] = str(tmp)
    os.environ.setdefault("KERAS_HOME", str(tmp / "keras"))
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
    store = out / "store"
    if data is None:
        from dfu_ml.data import synthetic
        from dfu_ml.data.synthetic import generate_synthetic_dataset

        # Keyed by everything that shapes the data, the generator's code included, so a later
        # run never reuses a dataset made by other code or settings.
        generator = hashlib.sha256(Path(synthetic.__file__).read_bytes()).hexdigest()[:10]
        data_dir = (
            store
            / "datasets"
            / f"synthetic-p{synth_patients}-s{config.seed}-x{DEFAULT_SYNTH_SCALE}-{generator}"
        )
        if not (data_dir / "DataMaster_Processed_V12_WithMissing.csv").is_file():
            log(f"generating a synthetic dataset ({synth_patients} patients) in {data_dir}")
            generate_synthetic_dataset(
                data_dir, patients=synth_patients, seed=config.seed, image_scale=DEFAULT_SYNTH_SCALE
            )
        data = str(data_dir)
    models_uri = config.models_uri or str(store / "models")
    config = config.replace(models_uri=models_uri)
    pipeline_root = out / "pipeline_root"
    pipeline_root.mkdir(exist_ok=True)
    if runner == "docker":
        if images is None:
            from pipelines.pipeline import component_images

            images = dict.fromkeys(("cpu", "gpu"), component_images()["cpu"])
        images = {kind: _local_ref(ref) for kind, ref in images.items()}
        data = str(Path(data).resolve()) if "://" not in data else data
        step_runner = _docker_runner(out, pipeline_root, data, models_uri)
    else:
        step_runner = local.SubprocessRunner(use_venv=False)
    local.init(runner=step_runner, pipeline_root=str(pipeline_root), raise_on_error=True)
    pipeline = build_pipeline(config, images=images, local=True)
    log(
        f"running pipeline 'dfu-kfp' locally: data {data}, modalities {config.modalities}, "
        f"{config.cv_folds} folds, profile {config.profile}"
    )
    start = time.time()
    log_path = out / "logs" / "pipeline.log"
    log(f"full step logs: {log_path}")
    with (
        concise_console(log_path) if quiet else contextlib.nullcontext(),
        _docker_exit_status() if runner == "docker" else contextlib.nullcontext(),
    ):
        pipeline(data=data)
    run_dir = _newest_run(pipeline_root)
    summary_dir = run_dir / "evaluate-op" / "summary"
    bundle_dir = run_dir / "publish-op" / "final_model"
    summary = json.loads((summary_dir / "summary.json").read_text())
    final_model = out / "final_model"
    if final_model.exists():
        shutil.rmtree(final_model)
    shutil.copytree(bundle_dir, final_model)
    for name in ("report.html", "training_curves.png", "confusion_matrix.png"):
        if (summary_dir / name).is_file():
            shutil.copyfile(summary_dir / name, out / name)
    manifest = json.loads((final_model / "manifest.json").read_text())
    summary.update(
        {
            "final_model": str(final_model),
            "model_id": manifest["model_id"],
            "data": data,
            "pipeline_run": str(run_dir),
            "published_to": (
                models_uri.rstrip("/") + "/" + manifest["model_id"] if summary["blessed"] else None
            ),
            "report": str(out / "report.html"),
            "seconds": round(time.time() - start, 1),
        }
    )
    summary.pop("files", None)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    log("")
    log(format_table(summary))
    log(format_verdict(summary["health"]))
    log(
        f"summary: {out / 'summary.json'}  report: {out / 'report.html'}  final model: {final_model}"
        f"  ({summary['seconds']} s)"
    )
    return summary
