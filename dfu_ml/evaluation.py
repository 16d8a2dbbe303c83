"""Cross-validation evaluation: metrics per fold and across folds, the health verdict, the
epochs the final fit uses, training-curve and confusion-matrix plots and an HTML report."""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path

import numpy as np

from dfu_ml.config import Config
from dfu_ml.data.schema import CLASS_NAMES
from dfu_ml.training.clinical_rf import ClinicalModelSpec
from dfu_ml.training.health import format_verdict, health_verdict
from dfu_ml.training.metrics import KAPPA, mean_std

HEADLINE = ("quadratic_kappa", "accuracy", "macro_f1")


def _stage_figures(fold: dict) -> dict:
    figures = {}
    for modality, s in fold.get("pretrain", {}).items():
        figures[f"pretrain[{modality}]"] = s
    for stage in ("stage1", "stage2"):
        if fold.get(stage):
            figures[stage] = fold[stage]
    return {
        name: {
            k: s.get(k)
            for k in (
                "best_epoch",
                "best_val_kappa",
                "trainable_params",
                "steps_per_epoch",
                "batch_size",
                "epochs_run",
                "kept_stage1_weights",
                "fusion_rf_weight",
            )
            if k in s
        }
        for name, s in figures.items()
    }


def final_fit_epochs(folds: list[dict], config: Config) -> dict:
    """Epochs for the final fit on all patients: the median best epoch over folds, per stage."""

    def median(values, default):
        values = [v for v in values if v]
        return int(round(float(np.median(values)))) if values else default

    return {
        "pretrain": median(
            [s["best_epoch"] for f in folds for s in f.get("pretrain", {}).values()],
            config.pretrain_epochs,
        ),
        "stage1": median(
            [f["stage1"]["best_epoch"] for f in folds if f.get("stage1")], config.stage1_epochs
        ),
        # A fold that kept Stage 1 learned nothing in Stage 2: count it as one epoch.
        "stage2": median(
            [
                1 if f["stage2"].get("kept_stage1_weights") else f["stage2"]["best_epoch"]
                for f in folds
                if f.get("stage2")
            ],
            config.stage2_epochs,
        ),
    }


def summarize_folds(folds: list[dict], config: Config) -> dict:
    """Everything the report, the summary file and the blessing need."""
    folds = sorted(folds, key=lambda f: f["fold"])
    per_fold = []
    for f in folds:
        per_fold.append(
            {
                "fold": f["fold"],
                "per_row": {k: f["metrics"]["per_row"][k] for k in HEADLINE},
                "per_visit": {k: f["metrics"]["per_visit"][k] for k in HEADLINE},
                "confusion_matrix": f["metrics"]["per_row"]["confusion_matrix"],
                "f1_per_class": f["metrics"]["per_row"]["f1_per_class"],
                "stages": _stage_figures(f),
            }
        )
    mean = {
        level: {k: mean_std([p[level][k] for p in per_fold]) for k in HEADLINE}
        for level in ("per_row", "per_visit")
    }
    confusion = np.sum([p["confusion_matrix"] for p in per_fold], axis=0).tolist()
    verdict = health_verdict(folds, config, mean["per_row"]["quadratic_kappa"]["mean"])
    return {
        "modalities": config.modalities,
        "folds": per_fold,
        "mean": mean,
        "confusion_matrix_total": confusion,
        "health": verdict,
        "blessed": bool(verdict["passed"]),
        "final_fit_epochs": final_fit_epochs(folds, config),
        "clinical_model": ClinicalModelSpec.from_config(config).describe(),
        "config": config.to_dict(),
    }


def format_table(summary: dict) -> str:
    """A plain-text table of per-fold and mean metrics (per image-set row and per visit)."""
    header = (
        f"{'fold':>6} | {'kappa':>7} {'acc':>6} {'F1':>6} | {'kappa/v':>7} {'acc/v':>6} {'F1/v':>6}"
    )
    lines = [header, "-" * len(header)]
    for p in summary["folds"]:
        r, v = p["per_row"], p["per_visit"]
        lines.append(
            f"{p['fold']:>6} | {r['quadratic_kappa']:>7.3f} {r['accuracy']:>6.3f} "
            f"{r['macro_f1']:>6.3f} | {v['quadratic_kappa']:>7.3f} {v['accuracy']:>6.3f} "
            f"{v['macro_f1']:>6.3f}"
        )
    m = summary["mean"]
    lines.append("-" * len(header))
    lines.append(
        "  mean | "
        + " ".join(f"{m['per_row'][k]['mean']:>6.3f}" for k in HEADLINE)
        + " | "
        + " ".join(f"{m['per_visit'][k]['mean']:>6.3f}" for k in HEADLINE)
    )
    lines.append(
        "   std | "
        + " ".join(f"{m['per_row'][k]['std']:>6.3f}" for k in HEADLINE)
        + " | "
        + " ".join(f"{m['per_visit'][k]['std']:>6.3f}" for k in HEADLINE)
    )
    lines.append("(per image-set row | per visit; kappa is quadratic-weighted Cohen's kappa)")
    return "\n".join(lines)


def report_markdown(summary: dict) -> str:
    """The metrics table and the health verdict as Markdown (the KFP UI's Markdown preview)."""
    return (
        f"# dfu-kfp cross-validation: {', '.join(summary['modalities'])}\n\n"
        f"```\n{format_table(summary)}\n```\n\n```\n{format_verdict(summary['health'])}\n```\n"
    )


def _figure_png(fig) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90, bbox_inches="tight")
    return buffer.getvalue()


def plot_training_curves(folds: list[dict]) -> bytes | None:
    """Validation kappa per epoch for every stage of every fold, as PNG bytes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = [
        (f["fold"], name, s["history"].get(KAPPA, []))
        for f in folds
        for name, s in [
            *((f"pretrain[{m}]", p) for m, p in f.get("pretrain", {}).items()),
            *((k, f[k]) for k in ("stage1", "stage2") if f.get(k)),
        ]
    ]
    if not curves:
        return None
    stages = sorted({name for _, name, _ in curves})
    fig, axes = plt.subplots(1, len(stages), figsize=(4 * len(stages), 3), squeeze=False)
    axes[0][0].set_ylabel("validation quadratic kappa")
    for ax, stage in zip(axes[0], stages):
        for fold, name, values in curves:
            if name == stage and values:
                ax.plot(range(1, len(values) + 1), values, marker="o", label=f"fold {fold}")
        ax.set_title(stage)
        ax.set_xlabel("epoch")
        ax.legend(fontsize=7)
    fig.tight_layout()
    png = _figure_png(fig)
    plt.close(fig)
    return png


def plot_confusion(matrix) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    matrix = np.asarray(matrix)
    fig, ax = plt.subplots(figsize=(3.5, 3))
    ax.imshow(matrix, cmap="Blues")
    for (i, j), v in np.ndenumerate(matrix):
        ax.text(j, i, str(v), ha="center", va="center")
    ax.set_xticks(range(len(CLASS_NAMES)), CLASS_NAMES)
    ax.set_yticks(range(len(CLASS_NAMES)), CLASS_NAMES)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title("all folds, per image-set row")
    png = _figure_png(fig)
    plt.close(fig)
    return png


def render_report_html(summary: dict, plots: dict[str, bytes]) -> str:
    """A self-contained HTML report: metrics table, stage figures, health verdict and plots."""
    e = html.escape
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>dfu-kfp report</title>",
        "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}"
        ".pass{color:#070}.fail{color:#b00;font-weight:bold}</style></head><body>",
        f"<h1>dfu-kfp cross-validation report</h1><p>Modalities: {e(', '.join(summary['modalities']))}"
        f" &middot; profile {e(str(summary['config'].get('profile')))}</p>",
        f"<h2>Training health: <span class='{'pass' if summary['health']['passed'] else 'fail'}'>"
        f"{'PASS' if summary['health']['passed'] else 'FAIL'}</span></h2><table>"
        "<tr><th>check</th><th>result</th><th>figure</th><th>detail</th></tr>",
    ]
    for c in summary["health"]["checks"]:
        cls = "pass" if c["passed"] else "fail"
        parts.append(
            f"<tr><td>{e(c['check'])}</td><td class='{cls}'>{'pass' if c['passed'] else 'FAIL'}"
            f"</td><td>{e(str(c['figure']))}</td><td>{e(c['detail'])}</td></tr>"
        )
    parts.append("</table><h2>Metrics</h2><pre>" + e(format_table(summary)) + "</pre>")
    parts.append(
        "<h2>Stages</h2><table><tr><th>fold</th><th>stage</th><th>best epoch</th>"
        "<th>val kappa</th><th>trainable params</th><th>steps/epoch</th><th>note</th></tr>"
    )
    for p in summary["folds"]:
        for name, s in p["stages"].items():
            note = "kept Stage 1 weights" if s.get("kept_stage1_weights") else ""
            if s.get("fusion_rf_weight") is not None:
                note += f" RF weight {s['fusion_rf_weight']:.3f}"
            parts.append(
                f"<tr><td>{p['fold']}</td><td>{e(name)}</td><td>{s['best_epoch']}</td>"
                f"<td>{s['best_val_kappa']:.4f}</td><td>{s['trainable_params']:,}</td>"
                f"<td>{s['steps_per_epoch']}</td><td>{e(note.strip())}</td></tr>"
            )
    parts.append("</table>")
    for title, png in plots.items():
        if png:
            data = base64.b64encode(png).decode()
            parts.append(
                f"<h2>{e(title)}</h2><img alt='{e(title)}' src='data:image/png;base64,{data}'>"
            )
    parts.append("</body></html>")
    return "\n".join(parts)


def write_report(summary: dict, folds: list[dict], out_dir: Path) -> dict:
    """Write report.html and the plot PNGs into ``out_dir``; return their paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    plots = {
        "Training curves": plot_training_curves(folds),
        "Confusion matrix": plot_confusion(summary["confusion_matrix_total"]),
    }
    paths = {}
    for title, png in plots.items():
        if png:
            path = out_dir / (title.lower().replace(" ", "_") + ".png")
            path.write_bytes(png)
            paths[title] = str(path)
    report = out_dir / "report.html"
    report.write_text(render_report_html(summary, plots))
    paths["report"] = str(report)
    return paths
