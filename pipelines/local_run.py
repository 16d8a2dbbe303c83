"""The main job: run the real pipeline definition through ``kfp.local``.

With no ``--data`` it generates a synthetic dataset and uses a local folder as the object store
(the embedded default). It ends with the per-fold and mean metrics, the health verdict,
``OUT/summary.json``, ``OUT/report.html`` and the final model bundle in ``OUT/final_model``.

Results are run-scoped and appear only when the run succeeds: they are gathered from what the
pipeline returns into a staging folder, then moved into place. ``OUT/run_status.json`` says whether
the last run is running, succeeded or failed; a failed run leaves the previous results in place and
says so. A failing step becomes one ``DfuError`` naming the step and its error; every line of every
step stays in ``OUT/logs/pipeline.log``.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import io
import json
import os
import re
import shutil
import sys
import threading
import time
import uuid
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from dfu_ml.config import Config
from dfu_ml.errors import DfuError
from pipelines.settings import RuntimeSettings

DEFAULT_SYNTH_PATIENTS = 40
DEFAULT_SYNTH_SCALE = 0.2
RESULT_FILES = ("report.html", "training_curves.png", "confusion_matrix.png")
STATUS_FILE = "run_status.json"

_ANSI = re.compile(r"\x1b\[[0-9;]*m")
# A line of the executor's JSON dump of its input: a key, a brace or bracket, or a bare value.
_JSON_LINE = re.compile(r'^(["{}\[\]]|(-?\d+(\.\d+)?([eE][-+]?\d+)?|true|false|null),?$)')
_TASK_START = re.compile(r"Executing task '([^']+)'")
_TASK_FAILED = re.compile(r"Task '([^']+)' finished with status FAILURE")
# The last line of a step's traceback: the exception's type and message.
_EXCEPTION = re.compile(r"^((?:[A-Za-z_][\w]*\.)*[A-Za-z_]\w*(?:Error|Exception)): (.*)$")
_EXPECTED = "dfu_ml.errors."


class PipelineStepFailed(DfuError):
    """A pipeline step failed; the message names the step and its error."""


class StepConsole(io.TextIOBase):
    """What kfp.local writes while a pipeline runs (it is made this process's standard output).

    Every line goes to the log file. The console shows step progress and the steps' own output,
    not kfp's executor dumps (the whole executor input as JSON) or artifact listings. The last
    error a step raised is remembered, so that a failure can be reported in one line.

    kfp.local runs the iterations of a ParallelFor in threads that all print here, and
    ``print`` writes a line in pieces: each thread's unfinished line is kept apart, and one lock
    serialises whole lines (shared, two threads' pieces interleaved inside lines and in the log
    file's buffer, which is not thread-safe, and once left invalid UTF-8 in the log).
    """

    def __init__(self, log_file, console):
        super().__init__()
        self.lock = threading.RLock()
        self.log_file, self.console = log_file, console
        self.pending: dict[int, str] = {}  # thread id -> its unfinished line
        self.task = None
        self.failed_task = None
        # (task that was last announced, exception line): steps of a ParallelFor run
        # concurrently, so the announced task is only a hint.
        self.exceptions: list[tuple[str | None, str]] = []
        self.in_listing = False
        self.in_traceback = False

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        with self.lock:
            thread = threading.get_ident()
            *lines, self.pending[thread] = (self.pending.get(thread, "") + text).split("\n")
            for line in lines:
                self._line(_ANSI.sub("", line))
        return len(text)

    def flush(self) -> None:
        with self.lock:
            self.log_file.flush()
            self.console.flush()

    def close_pending(self) -> None:
        with self.lock:
            for line in self.pending.values():
                if line:
                    self._line(_ANSI.sub("", line))
            self.pending.clear()

    def _line(self, line: str) -> None:
        self.log_file.write(line + "\n")
        text = line.strip()
        started = _TASK_START.search(line)
        if started:
            self.task = started.group(1)
        failed = _TASK_FAILED.search(line)
        if failed:
            self.failed_task = self.failed_task or failed.group(1)
        if _EXCEPTION.match(text):
            self.exceptions.append((self.task, text))
        if self._visible(line, text):
            self.console.write(line + "\n")
            self.console.flush()

    def _visible(self, line: str, text: str) -> bool:
        # A failing step's traceback stays in the log: the failure is reported in one line.
        if text.startswith(
            (
                "Traceback (most recent call last)",
                "During handling of the above exception",
                "The above exception was the direct",
            )
        ):
            self.in_traceback = True
        if self.in_traceback:
            if _EXCEPTION.match(text):
                self.in_traceback = False
            return False
        if " outputs:" in line:  # kfp's listing of a task's outputs follows, indented
            self.in_listing = True
            return False
        if self.in_listing:
            if line.startswith(" ") or not text:
                return False
            self.in_listing = False
        if not text or "[KFP Executor" in line or set(text) <= {"-"}:
            return False
        if "Streamed logs" in line or "Cleaned up workspace" in line:
            return False
        return not (_JSON_LINE.match(text) or text.startswith('"'))

    def failure(self, log_path: Path) -> PipelineStepFailed:
        """The error to raise for a failed run: the failed step and the error it raised."""
        task = self.failed_task or self.task or "?"
        same_task = [text for hint, text in self.exceptions if hint == task]
        expected = [text for _, text in self.exceptions if text.startswith(_EXPECTED)]
        candidates = same_task or expected or [text for _, text in self.exceptions]
        error = candidates[-1] if candidates else ""
        if error.startswith(_EXPECTED):
            _, _, message = error.partition(": ")
            return PipelineStepFailed(f"step {task!r} failed: {message} (full log: {log_path})")
        detail = f" ({error})" if error else ""
        return PipelineStepFailed(
            f"step {task!r} failed with an unexpected error{detail}; its traceback is in {log_path}"
        )


def synthetic_dataset(store: Path, seed: int, patients: int, log=print) -> str:
    """The embedded default dataset, generated once per generator version and settings."""
    from dfu_ml.data import synthetic

    # Keyed by everything that shapes the data, the generator's code included, so a later run
    # never reuses a dataset made by other code or settings.
    generator = hashlib.sha256(Path(synthetic.__file__).read_bytes()).hexdigest()[:10]
    folder = (
        store / "datasets" / f"synthetic-p{patients}-s{seed}-x{DEFAULT_SYNTH_SCALE}-{generator}"
    )
    if not (folder / "DataMaster_Processed_V12_WithMissing.csv").is_file():
        log(f"generating a synthetic dataset ({patients} patients) in {folder}")
        synthetic.generate_synthetic_dataset(
            folder, patients=patients, seed=seed, image_scale=DEFAULT_SYNTH_SCALE
        )
    return str(folder)


# --- runner="docker": every step in its component image, through kfp.local.DockerRunner ------------
def _local_ref(ref: str) -> str:
    """kfp.local finds a local image only by NAME:TAG or NAME@DIGEST, not NAME:TAG@DIGEST."""
    name = ref.partition("@")[0]
    return name if ":" in name.rsplit("/", 1)[-1] else ref


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


# --- results ---------------------------------------------------------------------------------------
def _write_json_atomic(path: Path, data) -> None:
    temp = path.with_name(f".{path.name}.{uuid.uuid4().hex}")
    temp.write_text(json.dumps(data, indent=2))
    os.replace(temp, path)


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")


def _publish_results(staging: Path, out: Path, summary_file: str = "summary.json") -> None:
    """Move the staged results into ``out``: files with one rename each, folders by renaming the
    old folder away first (a reader sees the old bundle or the new, never a mix)."""
    for item in sorted(staging.iterdir(), key=lambda p: p.name == summary_file):
        target = out / item.name
        if item.is_dir():
            old = out / f".{item.name}.old-{uuid.uuid4().hex[:8]}"
            if target.exists():
                os.replace(target, old)
            os.replace(item, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(item, target)  # the summary last: it names the other results


@dataclass
class LocalRun:
    """What a collector needs to gather a finished local run's results (see :func:`execute`)."""

    out: Path
    run_id: str
    data: str
    runtime: RuntimeSettings
    started: float


def execute(
    build: Callable[[RuntimeSettings], object],
    collect: Callable[[dict, Path, LocalRun], dict],
    out: Path,
    data: str | None,
    *,
    seed: int = 42,
    synth_patients: int = DEFAULT_SYNTH_PATIENTS,
    describe: str = "",
    summary_file: str = "summary.json",
    log=print,
    quiet: bool = True,
    runner: str = "subprocess",
    runtime: RuntimeSettings | None = None,
    arguments: dict | None = None,
) -> dict:
    """Run a pipeline through kfp.local and move its collected results into ``out``.

    ``build(runtime)`` returns the pipeline function (called with ``data``, ``models_uri`` where
    it takes one, and ``arguments``: any other run parameters);
    ``collect(outputs, staging, run)`` writes the results from the pipeline's returned artifacts
    into ``staging`` and returns the summary, which this function moves into ``out`` only when
    the run succeeds (``summary_file`` last). ``OUT/run_status.json`` says whether the last run is
    running, succeeded or failed; a failed run leaves earlier results as they were and says so.

    ``runner="subprocess"`` runs every step in this Python; ``runner="docker"`` runs each in its
    component image through kfp's DockerRunner (DOCKER_HOST may name podman's socket), the CPU
    image of ``runtime.images`` for every step (kfp.local gives containers no GPU).
    ``runtime.models_uri`` defaults to ``OUT/store/models``. Without ``data``, the embedded
    synthetic dataset of ``synth_patients`` patients (generated from ``seed``) is used.
    """
    if runner not in ("subprocess", "docker"):
        raise ValueError(f"runner {runner!r}: 'subprocess' or 'docker'")
    from kfp import local

    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    run_id = datetime.datetime.now().strftime("%Y%m%d-%H%M%S-") + uuid.uuid4().hex[:6]
    status = {"run_id": run_id, "status": "running", "started": _now()}
    _write_json_atomic(out / STATUS_FILE, status)
    # kfp.local leaves a mktemp folder per step: keep them inside the run's folder.
    tmp = out / "tmp"
    tmp.mkdir(exist_ok=True)
    os.environ["TMPDIR"] = str(tmp)
    os.environ.setdefault("KERAS_HOME", str(tmp / "keras"))
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
    store = out / "store"
    runtime = runtime or RuntimeSettings()
    if not runtime.models_uri:
        runtime = runtime.replace(models_uri=str(store / "models"))
    log_path = out / "logs" / "pipeline.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    start = time.time()
    try:
        if data is None:
            data = synthetic_dataset(store, seed, synth_patients, log)
        pipeline_root = out / "pipeline_root"
        pipeline_root.mkdir(exist_ok=True)
        if runner == "docker":
            images = dict.fromkeys(("cpu", "gpu"), _local_ref(runtime.images["cpu"]))
            runtime = runtime.replace(images=images)
            data = str(Path(data).resolve()) if "://" not in data else data
            step_runner = _docker_runner(out, pipeline_root, data, runtime.models_uri)
        else:
            step_runner = local.SubprocessRunner(use_venv=False)
        local.init(runner=step_runner, pipeline_root=str(pipeline_root), raise_on_error=True)
        pipeline = build(runtime)
        log(f"running pipeline {pipeline.name!r} locally: data {data}{describe}")
        log(f"full step logs: {log_path}")
        arguments = {"data": data, **(arguments or {})}
        if "models_uri" in pipeline.component_spec.inputs:
            arguments["models_uri"] = runtime.models_uri
        outputs = _run_pipeline(pipeline, arguments, log_path, quiet, runner)
        summary = _gather(
            collect, outputs, LocalRun(out, run_id, data, runtime, start), summary_file
        )
    except BaseException as exc:
        status.update(status="failed", finished=_now(), error=str(exc).splitlines()[0][:500])
        kept = (out / summary_file).is_file()
        if kept:
            status["previous_results"] = f"kept: {summary_file} and the results beside it are "
            status["previous_results"] += "from an earlier run (see its run_id)"
        _write_json_atomic(out / STATUS_FILE, status)
        if kept and isinstance(exc, DfuError):
            raise type(exc)(
                f"{exc}; the results in {out} are from an earlier run and were left as they were"
            ) from None
        raise
    status.update(status="succeeded", finished=_now())
    _write_json_atomic(out / STATUS_FILE, status)
    return summary


def run_local(
    config: Config,
    data: str | None,
    out: Path,
    synth_patients: int = DEFAULT_SYNTH_PATIENTS,
    log=print,
    quiet: bool = True,
    runner: str = "subprocess",
    runtime: RuntimeSettings | None = None,
) -> dict:
    """The main job: the training pipeline through kfp.local, its results collected into ``out``
    (see :func:`execute`); prints the metrics table and the verdict and returns the summary."""
    from dfu_ml.evaluation import format_table
    from dfu_ml.training.health import format_verdict
    from pipelines.pipeline import build_pipeline

    summary = execute(
        lambda runtime: build_pipeline(config, runtime, local=True),
        _collect,
        out,
        data,
        seed=config.seed,
        synth_patients=synth_patients,
        describe=f", modalities {config.modalities}, {config.cv_folds} folds, profile "
        f"{config.profile}",
        log=log,
        quiet=quiet,
        runner=runner,
        runtime=runtime,
    )
    out = Path(out).resolve()
    log("")
    log(format_table(summary))
    log(format_verdict(summary["health"]))
    log(
        f"summary: {out / 'summary.json'}  report: {out / 'report.html'}  final model: "
        f"{summary['final_model']}  ({summary['seconds']} s)"
    )
    return summary


def _gather(collect, outputs: dict, run: LocalRun, summary_file: str) -> dict:
    """Let ``collect`` fill a staging folder, then move it into ``run.out`` (summary last)."""
    staging = run.out / f".staging-{run.run_id}"
    staging.mkdir()
    try:
        summary = collect(outputs, staging, run)
        summary["seconds"] = round(time.time() - run.started, 1)
        (staging / summary_file).write_text(json.dumps(summary, indent=2))
        _publish_results(staging, run.out, summary_file)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return summary


def _run_pipeline(pipeline, arguments: dict, log_path: Path, quiet: bool, runner: str) -> dict:
    """Call the pipeline; return its outputs, or raise PipelineStepFailed naming the step."""
    from pipelines.kfp_workarounds import docker_exit_status

    with open(log_path, "a", encoding="utf-8") as log_file:
        console = StepConsole(log_file, sys.stdout)
        redirect = contextlib.redirect_stdout(console) if quiet else contextlib.nullcontext()
        try:
            with (
                redirect,
                warnings.catch_warnings(),
                docker_exit_status() if runner == "docker" else contextlib.nullcontext(),
            ):
                # Locally every step runs in this Python, whatever image it names (README).
                warnings.filterwarnings("ignore", message=".*custom or non-Python base image.*")
                # GPU placement and display names apply on a cluster only (README).
                warnings.filterwarnings("ignore", message=".*no effect in the current local runner")
                task = pipeline(**arguments)
        except RuntimeError as exc:
            console.close_pending()
            if not str(exc).startswith("Pipeline"):
                raise
            log_file.write(f"{_ANSI.sub('', str(exc))}\n")
            raise console.failure(log_path) from None
        console.close_pending()
    return task.outputs


def _collect(outputs: dict, staging: Path, run: LocalRun) -> dict:
    """The main job's results: the summary, the report and its plots, the final model bundle."""
    return collect_results(outputs, staging, run, "summary.json", RESULT_FILES, "final_model")


def collect_results(
    outputs: dict, staging: Path, run: LocalRun, summary_file: str, files, model_key: str
) -> dict:
    """A training pipeline's results (its ``summary`` and ``final_model`` outputs) staged for
    the run's folder: ``summary_file`` read and returned with where things went (the bundle's
    path under ``model_key``, the model id, where it was published, the report: the first of
    ``files``), the bundle and ``files`` copied (each that the pipeline wrote)."""
    summary_dir = Path(outputs["summary"].path)
    bundle_dir = Path(outputs["final_model"].path)
    summary = json.loads((summary_dir / summary_file).read_text())
    manifest = json.loads((bundle_dir / "manifest.json").read_text())
    shutil.copytree(bundle_dir, staging / "final_model")
    for name in files:
        if (summary_dir / name).is_file():
            shutil.copyfile(summary_dir / name, staging / name)
    models_uri = run.runtime.models_uri
    published = summary["blessed"] and bool(models_uri)
    summary.pop("files", None)
    summary.update(
        {
            "run_id": run.run_id,
            model_key: str(run.out / "final_model"),
            "model_id": manifest["model_id"],
            "data": run.data,
            "pipeline_run": str(summary_dir.parents[1]),
            "published_to": (
                models_uri.rstrip("/") + "/" + manifest["model_id"] if published else None
            ),
            "report": str(run.out / files[0]),
        }
    )
    return summary
