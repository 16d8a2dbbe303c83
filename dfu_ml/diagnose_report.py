"""The diagnose report: per variant, the final kappa and every symptom the root-cause analysis
names; per root cause, what reverting its fix costs (paired over folds) and which checks it trips.

**Measurable.** Reverting a fix changes a fold's final quadratic kappa by d_f = kappa(fixed) -
kappa(variant), paired on the same patients. The change is *measurable* when the mean of d_f
exceeds both its spread (the sample standard deviation of d_f over the folds) and
:data:`MIN_KAPPA_EFFECT`, the size of one or two validation rows changing class. With one fold
there is no spread and nothing is measurable; with two, it is a low bar (every fold moved the same
way, by similar amounts): more folds give firmer answers.
"""

from __future__ import annotations

import base64
import html
import math
from pathlib import Path

import numpy as np

from dfu_ml.config import Config
from dfu_ml.diagnose import (
    BY_ID,
    FIXED,
    PRE_FIX,
    ROOT_CAUSES,
    VARIANTS,
    variant_config,
    variant_overrides,
)
from dfu_ml.evaluation import _figure_png, summarize_folds
from dfu_ml.training.metrics import mean_std

MIN_KAPPA_EFFECT = 0.02
MEASURABLE_RULE = (
    "a difference is measurable when its mean over the folds exceeds both its sample standard "
    f"deviation over the folds and {MIN_KAPPA_EFFECT} kappa"
)
FILES = {"json": "diagnose.json", "html": "diagnose.html", "md": "diagnose.md"}
PLOT_FILE = "diagnose_kappa.png"


# --- per fold and per variant ------------------------------------------------------------------
def _at_best(stage: dict, key: str):
    values = stage.get("history", {}).get(key)
    return int(values[stage["best_epoch"] - 1]) if values else None


def _stage2_outcome(stage2: dict) -> str:
    if stage2.get("improved_on_stage1"):
        return "improved"
    return "kept Stage 1" if stage2.get("kept_stage1_weights") else "overrode Stage 1"


def fold_symptoms(fold: dict) -> dict:
    """The symptoms the root-cause analysis names, for one fold of one variant."""
    pre, s1, s2 = fold["pretrain"], fold["stage1"], fold["stage2"]
    initial, final = s2.get("fusion_rf_weight_initial"), s2.get("fusion_rf_weight")
    return {
        "fold": fold["fold"],
        "kappa": fold["metrics"]["per_row"]["quadratic_kappa"],
        "predicted_classes": fold["metrics"]["per_row"]["predicted_classes"],
        "best_epoch": {
            **{f"pretrain[{m}]": s["best_epoch"] for m, s in pre.items()},
            "stage1": s1["best_epoch"],
            "stage2": s2["best_epoch"],
        },
        "pretrain_kappa": {m: s["best_val_kappa"] for m, s in pre.items()},
        "pretrain_predicted_classes": {
            m: _at_best(s, "val_predicted_classes") for m, s in pre.items()
        },
        "trainable_params": {"stage1": s1["trainable_params"], "stage2": s2["trainable_params"]},
        "steps_per_epoch": {
            "pretrain": min(s["steps_per_epoch"] for s in pre.values()),
            "stage1": s1["steps_per_epoch"],
            "stage2": s2["steps_per_epoch"],
        },
        "fusion_rf_weight": {
            "initial": initial,
            "final": final,
            "moved": None if final is None else final - initial,
        },
        "stage2": _stage2_outcome(s2),
        "alpha": fold.get("alpha", {}),
    }


def summarize_variant(variant: str, folds: list[dict], base: Config) -> dict:
    """One variant over its folds: kappa, the health verdict (its own configuration's), and the
    symptoms per fold."""
    config = variant_config(base, variant)
    summary = summarize_folds(folds, config)
    symptoms = [fold_symptoms(f) for f in sorted(folds, key=lambda f: f["fold"])]
    kappas = {s["fold"]: s["kappa"] for s in symptoms}
    return {
        "variant": variant,
        "reverts": list(VARIANTS[variant]),
        "settings": variant_overrides(variant),
        "kappa": {**mean_std(list(kappas.values())), "per_fold": kappas},
        "kappa_per_visit": summary["mean"]["per_visit"]["quadratic_kappa"],
        "passed": summary["health"]["passed"],
        "failed_checks": [c["check"] for c in summary["health"]["checks"] if not c["passed"]],
        "health": summary["health"],
        "folds": symptoms,
    }


# --- paired differences and findings -----------------------------------------------------------
def paired_cost(fixed: dict, other: dict) -> dict:
    """kappa(fixed) - kappa(other) per fold shared by both, its mean and spread (sample standard
    deviation), and whether it is measurable (module docstring)."""
    folds = sorted(set(fixed["kappa"]["per_fold"]) & set(other["kappa"]["per_fold"]))
    diffs = [fixed["kappa"]["per_fold"][f] - other["kappa"]["per_fold"][f] for f in folds]
    mean = float(np.mean(diffs)) if diffs else math.nan
    sd = float(np.std(diffs, ddof=1)) if len(diffs) > 1 else math.nan
    measurable = len(diffs) > 1 and abs(mean) > max(sd, MIN_KAPPA_EFFECT)
    return {"folds": folds, "per_fold": diffs, "mean": mean, "sd": sd, "measurable": measurable}


def _cost_text(cost: dict) -> str:
    per_fold = ", ".join(f"{d:+.3f}" for d in cost["per_fold"])
    spread = "no spread with one fold" if math.isnan(cost["sd"]) else f"sd {cost['sd']:.3f}"
    return (
        f"{cost['mean']:+.3f} kappa (paired over {len(cost['folds'])} folds: {per_fold}; {spread})"
    )


def root_cause_finding(rc_id: str, fixed: dict, minus: dict) -> dict:
    """What reverting ``rc_id``'s fix did, against ``fixed``: its kappa cost, the checks it trips
    (those that fail for it and pass for ``fixed``) and a one-line finding."""
    rc = BY_ID[rc_id]
    cost = paired_cost(fixed, minus)
    tripped = [c for c in minus["failed_checks"] if c not in fixed["failed_checks"]]
    own = [c for c in rc.checks if c in tripped]
    already = [c for c in rc.checks if c in fixed["failed_checks"]]
    checks = ", ".join(rc.checks)
    if own:
        finding = "flagged"
        verdict = f"flagged by the check written for it ({', '.join(own)}); " + (
            "a measurable kappa change" if cost["measurable"] else "no measurable kappa change"
        )
    elif cost["measurable"] and cost["mean"] > 0:
        finding = "missed"
        verdict = (
            f"a measurable cost that its check ({checks}) did not flag: the verdict misses this "
            "revert on this data"
        )
    elif cost["measurable"]:
        finding = "fix_costs_kappa"
        verdict = "reverting it scored measurably higher: on this data the fix costs kappa"
    elif tripped:
        finding = "other_checks"
        verdict = f"not by the check written for it ({checks}); no measurable kappa difference"
    else:
        finding = "no_measurable_difference"
        verdict = (
            f"on this data the fix made no measurable difference (its check, {checks}, passed)"
        )
    if already:
        verdict += f"; {', '.join(already)} fails for fixed too, so this revert cannot trip it"
    line = (
        f"{rc.id} ({rc.cause}): reverting it costs {_cost_text(cost)} and trips checks "
        f"[{', '.join(tripped)}]: {verdict}."
    )
    return {
        "root_cause": rc.id,
        "cause": rc.cause,
        "variant": rc.variant,
        "checks_written_for_it": list(rc.checks),
        "cost": cost,
        "tripped": tripped,
        "own_checks_tripped": own,
        "failing_for_fixed_too": already,
        "finding": finding,
        "line": line,
    }


def pre_fix_finding(fixed: dict, pre_fix: dict) -> dict:
    cost = paired_cost(fixed, pre_fix)
    verdict = "PASS" if pre_fix["passed"] else "FAIL"
    line = (
        f"pre-fix (every fix reverted): costs {_cost_text(cost)}; verdict {verdict}, failing "
        f"[{', '.join(pre_fix['failed_checks'])}] (fixed: {'PASS' if fixed['passed'] else 'FAIL'}"
        + (f", failing [{', '.join(fixed['failed_checks'])}]" if fixed["failed_checks"] else "")
        + ")."
    )
    return {"cost": cost, "passed": pre_fix["passed"], "line": line}


def diagnose(fold_results: list[dict], base: Config) -> dict:
    """The whole report from every (variant, fold) result; ``base`` is the run's configuration."""
    by_variant: dict[str, list] = {}
    for result in fold_results:
        by_variant.setdefault(result["variant"], []).append(result)
    missing = [v for v in VARIANTS if v not in by_variant]
    if missing:
        raise ValueError(f"diagnose results lack the variants {missing}")
    variants = {v: summarize_variant(v, by_variant[v], base) for v in VARIANTS}
    fixed = variants[FIXED]
    return {
        "modalities": base.modalities,
        "folds": sorted({r["fold"] for r in fold_results}),
        "measurable": MEASURABLE_RULE,
        "variants": list(variants.values()),
        "pre_fix": pre_fix_finding(fixed, variants[PRE_FIX]),
        "root_causes": [
            root_cause_finding(rc.id, fixed, variants[rc.variant]) for rc in ROOT_CAUSES
        ],
        "config": base.to_dict(),
    }


# --- text, Markdown, HTML and the plot ---------------------------------------------------------
def _per_fold(values) -> str:
    return "/".join(str(v) for v in values)


def _symptom_row(v: dict) -> dict:
    folds = v["folds"]

    def worst_pretrain(key, fold):
        values = [x for x in fold[key].values() if x is not None]
        return min(values) if values else None

    def stage_epochs(fold):
        pre = min(e for k, e in fold["best_epoch"].items() if k.startswith("pretrain"))
        return f"{pre},{fold['best_epoch']['stage1']},{fold['best_epoch']['stage2']}"

    moved = [f["fusion_rf_weight"]["moved"] for f in folds]
    return {
        "pre kappa": _per_fold(f"{worst_pretrain('pretrain_kappa', f):.2f}" for f in folds),
        "pre classes": _per_fold(worst_pretrain("pretrain_predicted_classes", f) for f in folds),
        "best epoch pre,s1,s2": _per_fold(stage_epochs(f) for f in folds),
        "params s1/s2": "/".join(
            f"{min(f['trainable_params'][s] for f in folds):,}" for s in ("stage1", "stage2")
        ),
        "steps pre/s1/s2": "/".join(
            str(min(f["steps_per_epoch"][s] for f in folds))
            for s in ("pretrain", "stage1", "stage2")
        ),
        "fusion alpha max/min": _per_fold(
            f"{max(a) / min(a):.2f}" for a in (f["alpha"]["fusion"] for f in folds)
        ),
        "w_rf moved": _per_fold("-" if m is None else f"{m:+.3f}" for m in moved),
        "stage 2": _per_fold(
            {"improved": "better", "kept Stage 1": "kept S1", "overrode Stage 1": "override"}[
                f["stage2"]
            ]
            for f in folds
        ),
    }


def _rows(diagnosis: dict) -> list[dict]:
    rows = []
    for v in diagnosis["variants"]:
        k = v["kappa"]
        rows.append(
            {
                "variant": v["variant"],
                "kappa": f"{k['mean']:.3f} +/- {k['std']:.3f}",
                "per fold": _per_fold(f"{x:.3f}" for x in k["per_fold"].values()),
                "verdict": "PASS" if v["passed"] else "FAIL",
                **_symptom_row(v),
                "failing checks": ", ".join(v["failed_checks"]) or "-",
            }
        )
    return rows


def _text_table(rows: list[dict], columns: list[str]) -> str:
    widths = {c: max(len(c), *(len(str(r[c])) for r in rows)) for c in columns}
    lines = [" | ".join(c.ljust(widths[c]) for c in columns)]
    lines.append("-+-".join("-" * widths[c] for c in columns))
    lines += [" | ".join(str(r[c]).ljust(widths[c]) for c in columns) for r in rows]
    return "\n".join(lines)


MAIN_COLUMNS = ["variant", "kappa", "per fold", "verdict", "failing checks"]
SYMPTOM_COLUMNS = [
    "variant",
    "pre kappa",
    "pre classes",
    "best epoch pre,s1,s2",
    "params s1/s2",
    "steps pre/s1/s2",
    "fusion alpha max/min",
    "w_rf moved",
    "stage 2",
]


def format_report(diagnosis: dict) -> str:
    """The console report: the variants, their symptoms (per fold, a/b), and one line per root
    cause."""
    rows = _rows(diagnosis)
    return "\n".join(
        [
            (
                f"Diagnose: {', '.join(diagnosis['modalities'])}; folds {diagnosis['folds']}; "
                "final quadratic kappa per image-set row"
            ),
            _text_table(rows, MAIN_COLUMNS),
            "",
            "Symptoms (per fold a/b; pre = the weakest image modality's pre-training)",
            _text_table(rows, SYMPTOM_COLUMNS),
            "",
            format_root_causes(diagnosis),
        ]
    )


def format_root_causes(diagnosis: dict) -> str:
    lines = ["Root causes (cost = kappa(fixed) - kappa(variant); " + diagnosis["measurable"] + ")"]
    lines.append("  " + diagnosis["pre_fix"]["line"])
    lines += ["  " + f["line"] for f in diagnosis["root_causes"]]
    return "\n".join(lines)


def _markdown_table(rows: list[dict], columns: list[str]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(str(r[c]) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def report_markdown(diagnosis: dict) -> str:
    """The report as Markdown (the KFP UI's Markdown preview)."""
    rows = _rows(diagnosis)
    root_causes = "\n".join(f"- {f['line']}" for f in diagnosis["root_causes"])
    return (
        f"# dfu-kfp diagnose: {', '.join(diagnosis['modalities'])}\n\n"
        f"Folds {diagnosis['folds']}; final quadratic kappa per image-set row.\n\n"
        f"{_markdown_table(rows, MAIN_COLUMNS)}\n\n## Symptoms\n\n"
        f"{_markdown_table(rows, SYMPTOM_COLUMNS)}\n\n## Root causes\n\n"
        f"Cost = kappa(fixed) - kappa(variant); {diagnosis['measurable']}.\n\n"
        f"- {diagnosis['pre_fix']['line']}\n{root_causes}\n"
    )


def plot_kappa(diagnosis: dict) -> bytes:
    """Final kappa per variant: each fold a point, the mean a bar with its standard deviation."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    variants = diagnosis["variants"]
    fig, ax = plt.subplots(figsize=(1.1 * len(variants) + 2, 3.5))
    for i, v in enumerate(variants):
        colour = "#4a8" if v["passed"] else "#c55"
        ax.bar(i, v["kappa"]["mean"], yerr=v["kappa"]["std"], color=colour, alpha=0.5, capsize=3)
        points = list(v["kappa"]["per_fold"].values())
        offsets = np.linspace(-0.15, 0.15, len(points)) if len(points) > 1 else [0.0]
        ax.scatter(i + np.asarray(offsets), points, color="black", s=14, zorder=3)
    fixed = next(v for v in variants if v["variant"] == FIXED)
    ax.axhline(fixed["kappa"]["mean"], color="grey", linestyle="--", linewidth=1, label="fixed")
    threshold = diagnosis["config"]["health_min_kappa"]
    ax.axhline(threshold, color="#c55", linestyle=":", linewidth=1, label="health threshold")
    ax.set_xticks(range(len(variants)), [v["variant"] for v in variants], rotation=30, ha="right")
    ax.set_ylabel("final quadratic kappa")
    ax.set_title("per variant: folds (points), mean +/- std (bars; red: verdict FAIL)")
    ax.legend(fontsize=7)
    png = _figure_png(fig)
    plt.close(fig)
    return png


def render_html(diagnosis: dict, plot: bytes) -> str:
    e = html.escape

    def table(rows, columns):
        head = "".join(f"<th>{e(c)}</th>" for c in columns)
        body = "".join(
            "<tr>" + "".join(f"<td>{e(str(r[c]))}</td>" for c in columns) + "</tr>" for r in rows
        )
        return f"<table><tr>{head}</tr>{body}</table>"

    rows = _rows(diagnosis)
    settings = [
        {
            "variant": v["variant"],
            "reverts": ", ".join(v["reverts"]) or "-",
            "settings": ", ".join(f"{k}={val}" for k, val in v["settings"].items()) or "-",
        }
        for v in diagnosis["variants"]
    ]
    findings = "".join(
        f"<li class='{f['finding']}'>{e(f['line'])}</li>" for f in diagnosis["root_causes"]
    )
    image = base64.b64encode(plot).decode()
    return "\n".join(
        [
            "<!doctype html><html><head><meta charset='utf-8'><title>dfu-kfp diagnose</title>",
            (
                "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}"
                "td,th{border:1px solid #ccc;padding:3px 8px}.flagged{color:#070}"
                ".missed,.fix_costs_kappa{color:#b00;font-weight:bold}</style></head><body>"
            ),
            f"<h1>dfu-kfp diagnose: {e(', '.join(diagnosis['modalities']))}</h1>",
            (
                f"<p>Folds {e(str(diagnosis['folds']))}; final quadratic kappa per image-set row; "
                f"profile {e(str(diagnosis['config'].get('profile')))}.</p>"
            ),
            "<h2>Root causes</h2>",
            f"<p>Cost = kappa(fixed) - kappa(variant); {e(diagnosis['measurable'])}.</p>",
            f"<ul><li>{e(diagnosis['pre_fix']['line'])}</li>{findings}</ul>",
            "<h2>Variants</h2>" + table(rows, MAIN_COLUMNS),
            f"<img alt='kappa per variant' src='data:image/png;base64,{image}'>",
            "<h2>Symptoms</h2><p>Per fold a/b; pre = the weakest image modality's pre-training."
            "</p>" + table(rows, SYMPTOM_COLUMNS),
            "<h2>Settings</h2>" + table(settings, ["variant", "reverts", "settings"]),
            "</body></html>",
        ]
    )


def write_report(diagnosis: dict, out_dir: Path) -> dict:
    """Write diagnose.json (with ``files``: every file's path), diagnose.html, diagnose.md and
    the kappa plot into ``out_dir``; return the paths."""
    import json

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    files = {name: str(out_dir / file) for name, file in {**FILES, "plot": PLOT_FILE}.items()}
    diagnosis["files"] = files
    plot = plot_kappa(diagnosis)
    Path(files["plot"]).write_bytes(plot)
    Path(files["html"]).write_text(render_html(diagnosis, plot))
    Path(files["md"]).write_text(report_markdown(diagnosis))
    Path(files["json"]).write_text(json.dumps(diagnosis, indent=2, default=float))
    return files
