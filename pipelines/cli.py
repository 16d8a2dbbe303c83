"""The ``dfu-kfp`` command: synth, run, compile, predict."""

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")

from dfu_ml.errors import DfuError  # noqa: E402


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


def _config(args):
    from dfu_ml.config import load_config

    return load_config(args.config, args.set)


def _run(args) -> None:
    from pipelines.local_run import run_local

    out = args.out or Path("runs") / "latest"
    summary = run_local(
        _config(args), args.data, out, synth_patients=args.synth_patients, runner=args.runner
    )
    if args.strict and not summary["blessed"]:
        raise SystemExit(1)


def _compile(args) -> None:
    from pipelines.pipeline import compile_pipeline

    path = compile_pipeline(_config(args), args.output)
    print(
        f"wrote {path}; upload it in the KFP UI or run: kfp run create -e EXPERIMENT -r RUN "
        f"-f {path} data=s3://BUCKET/PREFIX"
    )


def _predict(args) -> None:
    import json

    from dfu_ml.predict import predict_folder

    table, metrics = predict_folder(args.model, args.data)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    table.to_csv(args.out, index=False)
    print(f"wrote {len(table)} visit predictions to {args.out}")
    if metrics:
        print(json.dumps({k: metrics[k] for k in ("quadratic_kappa", "accuracy", "macro_f1")}))


def build_parser() -> argparse.ArgumentParser:
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
            "--set",
            nargs="+",
            default=[],
            metavar="KEY=VALUE",
            help="override config keys, e.g. --set modalities=metadata cv_folds=2",
        )

    run = sub.add_parser("run", help="run the pipeline locally (kfp.local)")
    config_args(run, "smoke")
    run.add_argument("--data", help="dataset folder or s3://bucket/prefix (default: synthetic)")
    run.add_argument("--out", type=Path, help="output folder (default: runs/latest)")
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

    comp = sub.add_parser("compile", help="compile the pipeline to YAML for a KFP backend")
    config_args(comp, "paper")
    comp.add_argument("--output", required=True, type=Path)
    comp.set_defaults(func=_compile)

    pred = sub.add_parser("predict", help="predict healing phases for new visits")
    pred.add_argument("--model", required=True, type=Path, help="a final_model bundle folder")
    pred.add_argument("--data", required=True, type=Path, help="dataset folder")
    pred.add_argument("--out", required=True, type=Path, help="predictions CSV")
    pred.set_defaults(func=_predict)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except DfuError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
