"""The search's comparison table as console text, Markdown and HTML, and its plot."""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path

import numpy as np

from dfu_ml.data.schema import CLASS_NAMES
from dfu_ml.search import BASELINE, ENSEMBLE
from dfu_ml.search.compare import NESTED

PLOT_FILE = "search.png"
HTML_FILE = "search.html"
MARKDOWN_FILE = "search.md"


def _label(name: str, row: dict) -> str:
    if row["kind"] == "ensemble":
        return f"{ENSEMBLE} (average of {len(row['members'])})"
    if name == BASELINE:
        return f"{name} (baseline)"
    return name


def _ms(figure: dict | None, digits: int = 3) -> str:
    if not figure or figure["mean"] is None or np.isnan(figure["mean"]):
        return "-"
    return f"{figure['mean']:.{digits}f} ± {figure['std']:.{digits}f}"


def _m(figure: dict | None) -> str:
    if not figure or np.isnan(figure["mean"]):
        return "-"
    return f"{figure['mean']:.3f}"


def _delta(row: dict, metric: str = "quadratic_kappa") -> str:
    paired = row.get("paired")
    if not paired:
        return ""
    text = f"{paired['mean'][metric]:+.3f}"
    if paired.get("ci"):
        low, high = paired["ci"][metric]
        text += f" [{low:+.3f}, {high:+.3f}]"
    return text


def _health(row: dict) -> str:
    if "health" not in row:
        return ""
    return "PASS" if row["health"] else "FAIL"


def _class_f1(row: dict, level: str) -> str:
    mean = row["mean"][level]
    if not mean:
        return "-"
    return "/".join(f"{mean['f1_per_class'][c]['mean']:.2f}" for c in CLASS_NAMES)


def table_rows(summary: dict) -> list[dict]:
    """One dict of formatted cells per table row, in the table's order."""
    out = []
    for name, row in summary["rows"].items():
        visit, per_row = row["mean"]["per_visit"], row["mean"]["per_row"]
        out.append(
            {
                "model": _label(name, row),
                "kappa_v": _ms(visit["quadratic_kappa"]),
                "acc_v": _m(visit["accuracy"]),
                "f1_v": _m(visit["macro_f1"]),
                "class_f1_v": _class_f1(row, "per_visit"),
                "kappa_r": _ms(per_row["quadratic_kappa"]) if per_row else "-",
                "acc_r": _m(per_row["accuracy"]) if per_row else "-",
                "f1_r": _m(per_row["macro_f1"]) if per_row else "-",
                "class_f1_r": _class_f1(row, "per_row"),
                "delta": _delta(row),
                "coverage": f"{row['coverage']:.0%}",
                "health": _health(row),
            }
        )
    return out


COLUMNS = (
    ("model", "model"),
    ("kappa_v", "kappa/visit"),
    ("acc_v", "acc/v"),
    ("f1_v", "F1/v"),
    ("class_f1_v", "F1 I/P/R /v"),
    ("kappa_r", "kappa/row"),
    ("acc_r", "acc/r"),
    ("f1_r", "F1/r"),
    ("class_f1_r", "F1 I/P/R /r"),
    ("delta", "Δ kappa/v vs metadata [95% CI]"),
    ("coverage", "visits"),
    ("health", "health"),
)


def notes(summary: dict) -> list[str]:
    """What the table's reader must know, as sentences."""
    best = summary["best_on_same_folds"]
    nested = summary["rows"][NESTED]
    choices = ", ".join(f"fold {c['fold']} <- {c['chosen']}" for c in nested["choices"])
    paired = summary["rows"][ENSEMBLE].get("paired") or {}
    replicates = paired.get("replicates")
    return [
        f"Best of {best['candidates']} combinations on the same folds: {best['combination']}, "
        f"mean {summary['selection_metric']} {best['mean']:.3f}. Choosing the best of "
        f"{best['candidates']} on the folds it is scored on is optimistic (the maximum of "
        f"{best['candidates']} noisy estimates); the nested choice, scored on each fold with a "
        f"combination chosen on the other folds only, gives {best['nested_mean']:.3f} "
        f"({choices}).",
        "The ensemble averages every combination's out-of-fold per-visit probabilities; nothing "
        "in it is chosen or fitted on validation results.",
        "Δ: paired per-fold difference to metadata-only on the visits both scored, averaged over "
        "folds"
        + (
            f"; 95% interval from {replicates} bootstrap resamplings of each fold's validation "
            "patients"
            if replicates
            else "; no bootstrap (bootstrap=0)"
        )
        + ". 'visits': share of the baseline's validation visits a model scored.",
        "Per-row figures are per image-set row (comparable with the study); combinations score "
        "different rows, so only per-visit figures are compared and the ensemble is per visit.",
    ]


def format_search_table(summary: dict) -> str:
    rows = table_rows(summary)
    widths = {key: max(len(title), *(len(r[key]) for r in rows)) for key, title in COLUMNS}
    header = " | ".join(title.ljust(widths[key]) for key, title in COLUMNS)
    lines = [
        f"Modality-combination search: {len(summary['combinations'])} combinations on the same "
        f"{len(summary['folds'])} patient folds (mean ± std over folds)",
        header,
        "-" * len(header),
    ]
    for r in rows:
        lines.append(" | ".join(r[key].ljust(widths[key]) for key, _ in COLUMNS))
    lines.append("")
    lines.extend(notes(summary))
    final = summary.get("final_model")
    if final:
        lines.append(
            f"Final model: {final['choice']} -> {', '.join(final['members'])}; training health "
            f"{'PASS' if final['verdict']['passed'] else 'FAIL'}."
        )
    return "\n".join(lines)


def search_markdown(summary: dict) -> str:
    rows = table_rows(summary)
    lines = [
        f"# dfu-kfp modality-combination search ({len(summary['combinations'])} combinations, "
        f"{len(summary['folds'])} folds)",
        "",
        "| " + " | ".join(title for _, title in COLUMNS) + " |",
        "|" + "---|" * len(COLUMNS),
    ]
    for r in rows:
        lines.append("| " + " | ".join(r[key] or " " for key, _ in COLUMNS) + " |")
    lines.append("")
    lines.extend(f"- {n}" for n in notes(summary))
    lines.extend(["", "## Paired per-fold differences (quadratic kappa per visit)", ""])
    lines.append("| model | fold | visits | model | metadata | difference |")
    lines.append("|---|---|---|---|---|---|")
    for name, row in summary["rows"].items():
        for p in (row.get("paired") or {}).get("per_fold", []):
            lines.append(
                f"| {_label(name, row)} | {p['fold']} | {p['visits']} | "
                f"{p['model']['quadratic_kappa']:.3f} | {p['baseline']['quadratic_kappa']:.3f} | "
                f"{p['difference']['quadratic_kappa']:+.3f} |"
            )
    return "\n".join(lines) + "\n"


def plot_search(summary: dict) -> bytes:
    """Per-visit kappa per model (mean, std and each fold) and the paired difference to
    metadata-only with its interval, as PNG bytes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(summary["rows"])
    labels = [_label(n, summary["rows"][n]) for n in names]
    y = np.arange(len(names))[::-1]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 0.38 * len(names) + 1.5), sharey=True)
    for yi, name in zip(y, names):
        row = summary["rows"][name]
        folds = [p["per_visit"]["quadratic_kappa"] for p in row["per_fold"]]
        figure = row["mean"]["per_visit"]["quadratic_kappa"]
        left.errorbar(figure["mean"], yi, xerr=figure["std"], fmt="o", color="black", capsize=3)
        left.scatter(folds, [yi] * len(folds), color="tab:blue", s=12, zorder=3)
        paired = row.get("paired")
        if paired:
            diffs = [p["difference"]["quadratic_kappa"] for p in paired["per_fold"]]
            mean = paired["mean"]["quadratic_kappa"]
            if paired.get("ci"):
                low, high = paired["ci"]["quadratic_kappa"]
                right.errorbar(
                    mean, yi, xerr=[[mean - low], [high - mean]], fmt="o", color="black", capsize=3
                )
            else:
                right.scatter([mean], [yi], color="black")
            right.scatter(diffs, [yi] * len(diffs), color="tab:orange", s=12, zorder=3)
    right.axvline(0, color="grey", lw=1, ls="--")
    left.set_yticks(y, labels)
    left.set_xlabel("quadratic kappa per visit (mean ± std; dots: folds)")
    right.set_xlabel("paired difference to metadata-only (95% CI; dots: folds)")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90, bbox_inches="tight")
    plt.close(fig)
    return buffer.getvalue()


def search_html(summary: dict, plot: bytes) -> str:
    e = html.escape
    rows = table_rows(summary)
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>dfu-kfp search</title>",
        "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}"
        "td:first-child{text-align:left}</style></head><body>",
        f"<h1>Modality-combination search</h1><p>{len(summary['combinations'])} combinations on "
        f"the same {len(summary['folds'])} patient folds; mean ± std over folds.</p><table><tr>",
        "".join(f"<th>{e(title)}</th>" for _, title in COLUMNS) + "</tr>",
    ]
    for r in rows:
        parts.append("<tr>" + "".join(f"<td>{e(r[key])}</td>" for key, _ in COLUMNS) + "</tr>")
    parts.append("</table><ul>" + "".join(f"<li>{e(n)}</li>" for n in notes(summary)) + "</ul>")
    data = base64.b64encode(plot).decode()
    parts.append(f"<img alt='search plot' src='data:image/png;base64,{data}'>")
    final = summary.get("final_model")
    if final:
        parts.append(
            f"<h2>Final model: {e(final['choice'])}</h2><p>members: "
            f"{e(', '.join(final['members']))}; training health "
            f"{'PASS' if final['verdict']['passed'] else 'FAIL'}</p><ul>"
            + "".join(
                f"<li>{'pass' if c['passed'] else 'FAIL'}: {e(c['check'])} ({e(str(c['figure']))})"
                "</li>"
                for c in final["verdict"]["checks"]
            )
            + "</ul>"
        )
    parts.append("</body></html>")
    return "\n".join(parts)


def write_search_report(summary: dict, out_dir: Path) -> dict:
    """Write search.md, search.html and search.png into ``out_dir``; return their paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    plot = plot_search(summary)
    (out_dir / PLOT_FILE).write_bytes(plot)
    (out_dir / MARKDOWN_FILE).write_text(search_markdown(summary))
    (out_dir / HTML_FILE).write_text(search_html(summary, plot))
    return {name: str(out_dir / name) for name in (MARKDOWN_FILE, HTML_FILE, PLOT_FILE)}
