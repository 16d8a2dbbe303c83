"""Step ``publish``: assemble the final model bundle and, if blessed, push it to the models bucket."""

from pathlib import Path

from kfp.dsl import Dataset, Input, Model, Output

from components.common import cli
from dfu_ml.config import Config


def run_publish(
    rf: Path,
    summary: Path,
    config: Config,
    out: Path,
    model: Path | None = None,
    models_uri: str = "",
    data: str = "",
) -> dict:
    """Write the bundle into ``out``; upload it under ``models_uri`` only when the run is blessed."""
    from dfu_ml.bundle import assemble_bundle
    from dfu_ml.storage import copy_tree

    manifest = assemble_bundle(
        out,
        config,
        rf_dir=Path(rf),
        summary_dir=Path(summary),
        model_dir=None if model is None else Path(model),
        data=data,
    )
    if not manifest["blessed"]:
        print(
            "NOT PUBLISHED: the training-health verdict failed; the bundle is kept in the run's "
            f"artifacts only ({out})",
            flush=True,
        )
    elif models_uri:
        target = models_uri.rstrip("/") + "/" + manifest["model_id"]
        copy_tree(out, target)
        manifest["published_to"] = target
        print(f"published {manifest['model_id']} to {target}", flush=True)
    else:
        print("blessed; no models_uri configured, so nothing was pushed", flush=True)
    return manifest


def publish_op(
    rf: Input[Dataset],
    summary: Input[Dataset],
    config: Input[Dataset],
    models_uri: str,
    data: str,
    final_model: Output[Model],
    model: Input[Model] = None,
):
    """Bundle the final model (fusion weights, random forest, feature transformer, config, report)
    and push it to the models bucket when the evaluation blessed the run.

    Args:
        rf: the final fit's random forest.
        summary: the evaluation summary (health verdict and blessing).
        config: the run's resolved configuration (config.json).
        models_uri: s3://bucket/prefix (or a local folder) for blessed models; empty to skip.
        data: the dataset location, recorded in the bundle's manifest.
        final_model: the bundle.
        model: the final fit's fusion model (absent for metadata-only runs).
    """
    from pathlib import Path

    from components.common import resolve_config
    from components.publish import run_publish

    manifest = run_publish(
        Path(rf.path),
        Path(summary.path),
        resolve_config(config.path),
        Path(final_model.path),
        None if model is None else Path(model.path),
        models_uri,
        data,
    )
    final_model.metadata.update({k: manifest[k] for k in ("model_id", "blessed")})
    if "published_to" in manifest:
        final_model.metadata["published_to"] = manifest["published_to"]


def main(argv=None) -> int:
    def add(parser):
        parser.add_argument("--rf", required=True, help="final fit's clinical_rf output")
        parser.add_argument("--summary", required=True, help="evaluate's output folder")
        parser.add_argument("--model", help="final fit's stage2 output (image runs)")
        parser.add_argument("--models-uri", default="", help="s3://bucket/prefix or a folder")
        parser.add_argument("--data", default="", help="dataset location, for the manifest")

    return cli(
        "components.publish",
        __doc__,
        add,
        lambda a: run_publish(a.rf, a.summary, a.config, a.out, a.model, a.models_uri, a.data),
        argv,
    )


if __name__ == "__main__":
    raise SystemExit(main())
