"""The ``dfu-kfp`` command: synth, run, compile, check, predict, upload.

Every expected error is one ``error:`` line on standard error (exit 2) that names the file, row,
column or key at fault. An unexpected exception is one line too, pointing at the log file that
holds its traceback (exit 1).
"""

import argparse
import os
import sys
import tempfile
import traceback
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")

from dfu_ml.errors import ConfigError, DfuError

DEFAULT_OUT = Path("runs") / "latest"


def _synth(args) -> None:
    from dfu_ml.data.synthetic import generate_synthetic_dataset, render_from_real

    if args.from_real:
        result = render_from_real(
            args.from_real, args.out, image_scale=args.image_scale or 1.0, seed=args.seed
        )
    else:
        result = generate_synthetic_dataset(
            args.out,
            patients=args.patients,
            seed=args.seed,
            image_scale=args.image_scale or 0.25,
            clinical_signal=args.clinical_signal,
            image_signal=args.image_signal,
        )
    print(", ".join(f"{k}: {v}" for k, v in result.items()))


def _settings(args):
    """The training configuration and the runtime settings from --config, --runtime and --set
    (each ``--set`` key goes to whichever of the two defines it)."""
    from dfu_ml.config import load_config
    from pipelines.settings import load_runtime, split_overrides

    config_overrides, runtime_overrides = split_overrides(args.set)
    return (
        load_config(args.config, config_overrides),
        load_runtime(getattr(args, "runtime", None), runtime_overrides),
    )


def _run(args) -> None:
    from pipelines.local_run import run_local

    config, runtime = _settings(args)
    summary = run_local(
        config,
        args.data,
        args.out,
        synth_patients=args.synth_patients,
        runner=args.runner,
        runtime=runtime,
    )
    if args.strict and not summary["blessed"]:
        raise SystemExit(1)


def _compile(args) -> None:
    from pipelines.pipeline import compile_pipeline
    from pipelines.settings import unpinned_warning

    config, runtime = _settings(args)
    warning = unpinned_warning(runtime)
    if warning:
        print(f"warning: {warning}", file=sys.stderr)
    path = compile_pipeline(config, args.output, runtime)
    print(
        f"wrote {path}; upload it in the KFP UI (Pipelines -> Upload pipeline) or run:\n"
        f"  kfp --endpoint http://KFP_HOST -n NAMESPACE run create -e EXPERIMENT -r RUN "
        f"-f {path} data=s3://BUCKET/PREFIX"
    )


def _upload(args) -> None:
    from dfu_ml.storage import upload_tree

    upload_tree(args.folder, args.destination)
    print(f"uploaded {args.folder} to {args.destination} (complete: readers verify every file)")


def _predict(args) -> None:
    import json

    from dfu_ml.predict import predict_folder

    out = Path(args.out)
    if out.is_dir():
        raise ConfigError(f"--out {out} is a folder; give the path of the CSV file to write")
    table, metrics = predict_folder(args.model, args.data, args.expect_digest)
    out.parent.mkdir(parents=True, exist_ok=True)
    temp = out.with_name(f".{out.name}.partial")
    table.to_csv(temp, index=False)
    os.replace(temp, out)
    print(f"wrote {len(table)} visit predictions to {out}")
    if metrics:
        print(json.dumps({k: metrics[k] for k in ("quadratic_kappa", "accuracy", "macro_f1")}))


def _check(args) -> None:
    """The KFP backend's upload and run-creation checks, on a compiled pipeline file."""
    import yaml
    from kfp.cli.utils.parsing import parse_parameter_value

    from pipelines.acceptance import PipelineRejected, check_pipeline, check_run_arguments
    from pipelines.pipeline import expected_placement
    from pipelines.run_parameters import for_pipeline
    from pipelines.settings import load_runtime

    path = Path(args.pipeline)
    if not path.is_file():
        raise ConfigError(f"{path}: no such pipeline file; compile one with dfu-kfp compile")
    runtime = load_runtime(args.runtime, args.set)
    spec = next(yaml.safe_load_all(path.read_text()))
    parameters = for_pipeline(spec.get("pipelineInfo", {}).get("name", ""))
    problems = check_pipeline(path, expected_placement(runtime), parameters.kfp_types())
    arguments = {}
    for text in args.arguments:
        if "=" not in text:
            raise ConfigError(f"run argument {text!r} must look like key=value")
        key, value = text.split("=", 1)
        arguments[key] = parse_parameter_value(value)
    problems += check_run_arguments(spec, arguments)
    if problems:
        raise PipelineRejected(
            f"{path} would be rejected or mis-run by a KFP backend: " + "; ".join(problems)
        )
    print(f"{path}: accepted (schema, references, run parameters, Kubernetes settings)")


def build_parser() -> argparse.ArgumentParser:
    from pipelines.run_parameters import parameter_table

    parser = argparse.ArgumentParser(
        prog="dfu-kfp",
        description=(
            "Train, evaluate and publish a diabetic-foot-ulcer healing-phase classifier as a "
            "Kubeflow pipeline (locally through kfp.local, or compiled for a cluster)."
        ),
    )
    sub = parser.add_subparsers(dest="command", required=True)

    synth = sub.add_parser("synth", help="write a synthetic dataset in the study's layout")
    synth.add_argument("--out", required=True, type=Path)
    synth.add_argument("--patients", type=int, default=40)
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument(
        "--image-scale",
        type=float,
        default=None,
        help="frame size relative to the real cameras (default 0.25; 1.0 with --from-real)",
    )
    synth.add_argument("--clinical-signal", type=float, default=0.6)
    synth.add_argument("--image-signal", type=float, default=1.5)
    synth.add_argument(
        "--from-real", type=Path, help="render images for a real dataset's rows and boxes"
    )
    synth.set_defaults(func=_synth)

    def config_args(p, default):
        p.add_argument("--config", default=default, help="profile (smoke, paper) or YAML file")
        p.add_argument(
            "--runtime",
            help="YAML file of runtime settings (images, GPU placement, S3 endpoint, models_uri)",
        )
        p.add_argument(
            "--set",
            nargs="+",
            default=[],
            metavar="KEY=VALUE",
            help="override config keys or runtime settings, e.g. --set modalities=metadata "
            "cv_folds=2 s3_endpoint=minio.example:9000",
        )

    run = sub.add_parser("run", help="run the pipeline locally (kfp.local)")
    config_args(run, "smoke")
    run.add_argument("--data", help="dataset folder or s3://bucket/prefix (default: synthetic)")
    run.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output folder (runs/latest)")
    run.add_argument("--synth-patients", type=int, default=40)
    run.add_argument("--strict", action="store_true", help="exit 1 when the health verdict fails")
    run.add_argument(
        "--runner",
        choices=("subprocess", "docker"),
        default="subprocess",
        help="run each step in this Python (default) or in its component image "
        "through kfp's DockerRunner (set DOCKER_HOST for podman's socket)",
    )
    run.set_defaults(func=_run)

    parameters = "\n".join(f"  {n} ({t}): {h}" for n, t, h in parameter_table())
    comp = sub.add_parser(
        "compile",
        help="compile the pipeline to YAML for a KFP backend",
        description="Compile the pipeline for a KFP backend. Run parameters (kfp run create "
        f"... key=value):\n{parameters}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    config_args(comp, "paper")
    comp.add_argument("--output", required=True, type=Path)
    comp.set_defaults(func=_compile)

    check = sub.add_parser(
        "check",
        help="check a compiled pipeline (and run arguments) as a KFP backend would",
    )
    check.add_argument("pipeline", help="the compiled pipeline YAML")
    check.add_argument(
        "arguments", nargs="*", metavar="KEY=VALUE", help="run arguments, as for kfp run create"
    )
    check.add_argument("--runtime", help="the runtime settings file it was compiled with")
    check.add_argument(
        "--set",
        nargs="+",
        default=[],
        metavar="KEY=VALUE",
        help="runtime settings it was compiled with",
    )
    check.set_defaults(func=_check)

    pred = sub.add_parser("predict", help="predict healing phases for new visits")
    pred.add_argument("--model", required=True, type=Path, help="a final_model bundle folder")
    pred.add_argument("--data", required=True, type=Path, help="dataset folder")
    pred.add_argument("--out", required=True, type=Path, help="predictions CSV")
    pred.add_argument(
        "--expect-digest",
        default="",
        metavar="SHA256",
        help="refuse a bundle whose digest is not this one (publish prints it; KFP records it "
        "as the final_model artifact's bundle_digest)",
    )
    pred.set_defaults(func=_predict)

    upload = sub.add_parser(
        "upload",
        help="upload a dataset folder to s3:// so that readers see all of it or none of it",
        description="Upload a folder to s3://bucket/prefix (DFU_S3_* variables) with a "
        "completion marker that lists every file's size and SHA-256: readers verify it, and an "
        "interrupted upload, or one still running, is never read; replacing a dataset there "
        "switches readers from the old one to the new one at once.",
    )
    upload.add_argument("folder", type=Path, help="the dataset folder")
    upload.add_argument("destination", help="s3://bucket/prefix, e.g. s3://dfu-data/study")
    upload.set_defaults(func=_upload)
    return parser


def _crash_log(args) -> Path:
    """Where an unexpected traceback goes: the run's log, or a new file for other commands."""
    if getattr(args, "command", None) == "run":
        path = Path(args.out).resolve() / "logs" / "pipeline.log"
        path.parent.mkdir(parents=True, exist_ok=True)
        return path
    handle, name = tempfile.mkstemp(prefix="dfu-kfp-error-", suffix=".log")
    os.close(handle)
    return Path(name)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except DfuError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # a path the user gave that cannot be read or written
        where = f": {exc.filename}" if exc.filename else ""
        print(f"error: {exc.strerror or exc}{where}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - one line on the console, the traceback in a log
        log = _crash_log(args)
        with open(log, "a") as handle:
            traceback.print_exc(file=handle)
        print(
            f"error: unexpected {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            f" (a bug: the traceback is in {log}; please report it)",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
