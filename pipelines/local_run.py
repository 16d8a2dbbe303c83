"""The main job: run the real pipeline definition through ``kfp.local``.

With no ``--data`` it generates a synthetic dataset and uses a local folder as the object store
(the embedded default). It ends with the per-fold and mean metrics, the health verdict,
``OUT/summary.json``, ``OUT/report.html`` and the final model bundle in ``OUT/final_model``.
"""

import json
import os
import shutil
import time
from pathlib import Path

from dfu_ml.config import Config

DEFAULT_SYNTH_PATIENTS = 40
DEFAULT_SYNTH_SCALE = 0.2


def _newest_run(pipeline_root: Path) -> Path:
    runs = sorted((p for p in pipeline_root.iterdir() if p.is_dir()), key=lambda p: p.stat().st_mtime)
    if not runs:
        raise RuntimeError(f"kfp.local left no run folder under {pipeline_root}")
    return runs[-1]


def run_local(config: Config, data: str | None, out: Path, synth_patients: int = DEFAULT_SYNTH_PATIENTS,
              log=print) -> dict:
    """Run the pipeline locally and collect its results into ``out``; return the summary."""
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
        from dfu_ml.data.synthetic import generate_synthetic_dataset

        data_dir = store / "datasets" / f"synthetic-p{synth_patients}-s{config.seed}"
        if not (data_dir / "DataMaster_Processed_V12_WithMissing.csv").is_file():
            log(f"generating a synthetic dataset ({synth_patients} patients) in {data_dir}")
            generate_synthetic_dataset(data_dir, patients=synth_patients, seed=config.seed,
                                       image_scale=DEFAULT_SYNTH_SCALE)
        data = str(data_dir)
    models_uri = config.models_uri or str(store / "models")
    config = config.replace(models_uri=models_uri)
    pipeline_root = out / "pipeline_root"
    pipeline_root.mkdir(exist_ok=True)
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(pipeline_root),
               raise_on_error=True)
    pipeline = build_pipeline(config, local=True)
    log(f"running pipeline 'dfu-kfp' locally: data {data}, modalities {config.modalities}, "
        f"{config.cv_folds} folds, profile {config.profile}")
    start = time.time()
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
    summary.update({"final_model": str(final_model), "model_id": manifest["model_id"],
                    "data": data, "pipeline_run": str(run_dir),
                    "published_to": (models_uri.rstrip("/") + "/" + manifest["model_id"]
                                     if summary["blessed"] else None),
                    "report": str(out / "report.html"), "seconds": round(time.time() - start, 1)})
    summary.pop("files", None)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    log("")
    log(format_table(summary))
    log(format_verdict(summary["health"]))
    log(f"summary: {out / 'summary.json'}  report: {out / 'report.html'}  final model: {final_model}"
        f"  ({summary['seconds']} s)")
    return summary
