"""Steps ``bundle`` and ``publish``: assemble the final model bundle, then push it to the models
bucket when the evaluation blessed the run; a model id that is already there is never rewritten."""

from pathlib import Path

from kfp.dsl import Dataset, Input, Model, Output

from components.common import cli, read_json
from dfu_ml.config import Config


def run_bundle(
    rf: Path,
    summary: Path,
    config: Config,
    out: Path,
    model: Path | None = None,
    data: str = "",
    data_digest: str = "",
    code_version: str = "",
) -> dict:
    """Assemble the bundle into ``out`` and return its manifest."""
    from dfu_ml.bundle import assemble_bundle

    return assemble_bundle(
        out,
        config,
        rf_dir=Path(rf),
        summary_dir=Path(summary),
        model_dir=None if model is None else Path(model),
        data=data,
        data_digest=data_digest,
        code_version=code_version,
    )


def run_publish(bundle: Path, models_uri: str) -> str:
    """Push a blessed bundle to ``models_uri``/model_id; return where it is published ("" if not).

    Published models are immutable: when that model id is already complete there, nothing is
    written (the id is a digest of the configuration, the code and the data, so the model there
    is this one). An earlier publish that did not finish is not complete (object storage shows a
    tree only with its completion marker), so publishing again completes it; a publish that
    runs at the same time as another of the same id leaves the first one to finish in place.
    The bundle is verified against its manifest before anything is pushed.
    """
    from dfu_ml.bundle import bundle_digest, verify_bundle
    from dfu_ml.storage import copy_tree, tree_is_complete

    manifest = verify_bundle(Path(bundle))
    if not manifest["blessed"]:
        print(
            "NOT PUBLISHED: the training-health verdict failed; the bundle is kept in the run's "
            f"artifacts only ({bundle})",
            flush=True,
        )
        return ""
    if not models_uri:
        print("blessed; no models_uri given, so nothing was pushed", flush=True)
        return ""
    model = manifest["model_id"]
    target = models_uri.rstrip("/") + "/" + model
    if tree_is_complete(target) or not copy_tree(bundle, target, if_absent=True):
        print(
            f"model {model} is already published at {target}; nothing was written "
            "(published models are never overwritten)",
            flush=True,
        )
        return target
    print(
        f"published {model} (bundle digest sha256:{bundle_digest(bundle)}) to {target}", flush=True
    )
    return target


def bundle_model(
    rf: Input[Dataset],
    summary: Input[Dataset],
    config: Input[Dataset],
    data: str,
    data_digest: str,
    code_version: str,
    final_model: Output[Model],
    model: Input[Model] = None,
):
    """Bundle the final model (fusion weights, clinical model, config, evaluation summary and
    report, manifest) under a model id derived from the configuration, the code and the data.

    Args:
        rf: the final fit's clinical model.
        summary: the evaluation summary (health verdict and blessing).
        config: the run's resolved configuration (config.json).
        data: the dataset location, recorded in the manifest.
        data_digest: the prepared data's content digest (part of the model id).
        code_version: the package version and a digest of its sources (part of the model id).
        final_model: the bundle.
        model: the final fit's fusion model (absent for metadata-only runs).
    """
    from pathlib import Path

    from components.common import resolve_config
    from components.publish import run_bundle

    manifest = run_bundle(
        Path(rf.path),
        Path(summary.path),
        resolve_config(config.path),
        Path(final_model.path),
        None if model is None else Path(model.path),
        data,
        data_digest,
        code_version,
    )
    from dfu_ml.bundle import bundle_digest

    final_model.metadata.update({k: manifest[k] for k in ("model_id", "blessed")})
    # Recorded by KFP with the artifact: `dfu-kfp predict --expect-digest` checks a copy against it.
    final_model.metadata["bundle_digest"] = "sha256:" + bundle_digest(Path(final_model.path))


def publish_model(final_model: Input[Model], models_uri: str) -> str:
    """Push the blessed bundle to ``models_uri``/<model id>, unless that id is already there.

    Args:
        final_model: the bundle.
        models_uri: s3://bucket/prefix (or a folder) for blessed models; empty: push nothing.
    """
    from pathlib import Path

    from components.publish import run_publish

    return run_publish(Path(final_model.path), models_uri)


def main(argv=None) -> int:
    def add(parser):
        parser.add_argument("--rf", required=True, help="final fit's clinical_rf output")
        parser.add_argument("--summary", required=True, help="evaluate's output folder")
        parser.add_argument(
            "--prepared", required=True, help="the prepared dataset (its content digest)"
        )
        parser.add_argument("--model", help="final fit's stage2 output (image runs)")
        parser.add_argument("--models-uri", default="", help="s3://bucket/prefix or a folder")
        parser.add_argument("--data", default="", help="dataset location, for the manifest")

    def run(args):
        from components.common import code_version
        from dfu_ml.data.prepare import REPORT_JSON

        digest = read_json(Path(args.prepared) / REPORT_JSON).get("content_digest", "")
        run_bundle(
            args.rf,
            args.summary,
            args.config,
            args.out,
            args.model,
            args.data,
            digest,
            code_version(),
        )
        run_publish(args.out, args.models_uri)

    return cli("components.publish", __doc__, add, run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
