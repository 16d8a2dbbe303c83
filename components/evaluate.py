"""Step ``evaluate``: all folds -> metrics, confusion matrices, plots, health verdict, blessing."""

from pathlib import Path

from kfp.dsl import HTML, Artifact, ClassificationMetrics, Dataset, Input, Markdown, Metrics, Output

from components.common import (
    FOLD_RESULT_FILE,
    SUMMARY_FILE,
    cli,
    read_json,
    write_json,
)
from dfu_ml.config import Config


def run_evaluate(fold_results: list[Path], config: Config, out: Path) -> dict:
    """Summarise the folds into ``out`` (summary.json, report.html, plots); print the table and
    the verdict."""
    from dfu_ml.evaluation import format_table, summarize_folds, write_report
    from dfu_ml.training.health import format_verdict

    folds = [read_json(Path(p) / FOLD_RESULT_FILE) for p in fold_results]
    summary = summarize_folds(folds, config)
    out = Path(out)
    summary["files"] = write_report(summary, folds, out)
    write_json(out / SUMMARY_FILE, summary)
    print(format_table(summary), flush=True)
    print(format_verdict(summary["health"]), flush=True)
    return summary


def evaluate_folds(
    fold_results: Input[list[Artifact]],
    config: Input[Dataset],
    summary: Output[Dataset],
    metrics: Output[Metrics],
    confusion: Output[ClassificationMetrics],
    report: Output[HTML],
    markdown: Output[Markdown],
) -> bool:
    """Compute metrics per fold and across folds (per image-set row and per visit), the
    training-health verdict and the blessing that gates publishing (the returned value), and
    the epochs the final fit trains for (in summary.json).

    Args:
        fold_results: one fold result per cross-validation fold.
        config: the run's resolved configuration (config.json).
        summary: summary.json, report.html and the plots.
        metrics: mean metrics, shown in the KFP UI.
        confusion: the confusion matrix over all folds.
        report: the HTML report.
        markdown: the metrics table and the verdict as Markdown.
    """
    import shutil
    from pathlib import Path

    from components.common import log_metrics, resolve_config
    from components.evaluate import run_evaluate
    from dfu_ml.data.schema import CLASS_NAMES
    from dfu_ml.evaluation import report_markdown

    result = run_evaluate(
        [Path(f.path) for f in fold_results], resolve_config(config.path), Path(summary.path)
    )
    log_metrics(
        metrics,
        {
            f"{level}_{key}_mean": value["mean"]
            for level in ("per_row", "per_visit")
            for key, value in result["mean"][level].items()
        },
    )
    log_metrics(metrics, {"health_passed": int(result["health"]["passed"])})
    confusion.log_confusion_matrix(list(CLASS_NAMES), result["confusion_matrix_total"])
    shutil.copyfile(result["files"]["report"], report.path)
    Path(markdown.path).write_text(report_markdown(result))
    return result["blessed"]


def main(argv=None) -> int:
    def add(parser):
        parser.add_argument(
            "--fold-result",
            action="append",
            required=True,
            help="a folder holding fold_result.json; repeat for each fold",
        )

    return cli(
        "components.evaluate",
        __doc__,
        add,
        lambda a: run_evaluate(a.fold_result, a.config, a.out),
        argv,
    )


if __name__ == "__main__":
    raise SystemExit(main())
