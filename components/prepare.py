"""Step ``prepare``: a dataset location (local folder or s3://) -> prepared dataset + data report."""

import tempfile
from pathlib import Path

from kfp.dsl import Dataset, Input, Markdown, Output

from components.common import cli
from dfu_ml.config import Config


def run_prepare(data: str, config: Config, out: Path, report_path: Path | None = None) -> dict:
    """Download the dataset if it is in object storage, prepare it into ``out`` and return the
    data report."""
    from dfu_ml.data.prepare import (
        content_digest,
        prepare_for_config,
        report_markdown,
        save_prepared,
    )
    from dfu_ml.storage import download_tree, is_s3_uri

    with tempfile.TemporaryDirectory(prefix="dfu-data-") as scratch:
        # Datasets are often copied with other tools (no completion marker): read, with a warning.
        folder = (
            download_tree(data, Path(scratch) / "data", allow_unmarked=True)
            if is_s3_uri(data)
            else Path(data)
        )
        dataset = prepare_for_config(folder, config)
    dataset.meta["source"] = data
    dataset.meta["report"]["content_digest"] = content_digest(dataset)
    save_prepared(dataset, out)
    report = dataset.meta["report"]
    if report_path is not None:
        Path(report_path).write_text(report_markdown(report))
    print(report_markdown(report), flush=True)
    return report


def prepare_data(
    data: str, config: Input[Dataset], prepared: Output[Dataset], report: Output[Markdown]
) -> str:
    """Read a dataset in the study's layout, crop every modality's wound box and pack the crops,
    the row index and the clinical table into one versioned artifact with a data report. Returns
    the prepared data's content digest, which the model id is derived from.

    Args:
        data: local folder or s3://bucket/prefix holding the CSVs and image folders.
        config: the run's resolved configuration (config.json).
        prepared: the prepared dataset (a folder with dataset.npz).
        report: the data report.
    """
    from pathlib import Path

    from components.common import resolve_config
    from components.prepare import run_prepare

    summary = run_prepare(data, resolve_config(config.path), Path(prepared.path), Path(report.path))
    prepared.metadata.update({k: v for k, v in summary.items() if isinstance(v, (int, float, str))})
    return summary["content_digest"]


def main(argv=None) -> int:
    def add(parser):
        parser.add_argument("--data", required=True, help="dataset folder or s3://bucket/prefix")

    return cli(
        "components.prepare", __doc__, add, lambda a: run_prepare(a.data, a.config, a.out), argv
    )


if __name__ == "__main__":
    raise SystemExit(main())
