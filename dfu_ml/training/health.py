"""The training-health verdict (TRAINING.md): each check with pass/fail and the figure behind it.

It is computed for every run, shown in the report and gates the model: only a run whose every
check passes is blessed for publishing.
"""

from __future__ import annotations

import numpy as np

from dfu_ml.config import Config
from dfu_ml.training.metrics import KAPPA

# Validation kappa that moves less than this over a whole stage never changed what the model
# predicts: a flat curve, whatever its best epoch.
FLAT_KAPPA_SPREAD = 0.01


def _check(name: str, passed: bool, figure, detail: str) -> dict:
    return {"check": name, "passed": bool(passed), "figure": figure, "detail": detail}


def _used_stages(fold: dict) -> list[tuple[dict, dict | None]]:
    """Stages whose weights end up in the fold's model (Stage 2's only if it was used), each
    with the stage it continued from (Stage 2 starts from Stage 1's weights; the others from
    scratch or from another stage's encoders: ``None``)."""
    stages = [(s, None) for s in fold.get("pretrain", {}).values()]
    if fold.get("stage1"):
        stages.append((fold["stage1"], None))
    stage2 = fold.get("stage2")
    if stage2 and not stage2.get("kept_stage1_weights"):
        stages.append((stage2, fold.get("stage1")))
    return stages


def stopped_learning(stage: dict, min_loss_drop: float, start: dict | None = None) -> bool:
    """Whether a stage whose best epoch is 1 stopped learning (the study's failure) rather than
    peaked early.

    The study restored epoch-1 weights everywhere because nothing moved: a learning rate too low,
    one update per epoch, a collapsed pre-training. Such a stage's training loss stays where epoch
    1 left it, or its validation kappa never changes. A stage that keeps lowering its training
    loss while validation kappa, which did move, falls from an epoch-1 peak is learning, and
    keeping its epoch-1 weights is early stopping doing its job, provided that peak is above
    chance (kappa > 0).

    ``start`` is the summary of the stage this one continued from (Stage 1 for Stage 2): where
    the stage started counts as its epoch 0, so a fine-tuning whose first epoch already lowered
    the loss and moved kappa from Stage 1's best is learning, while Stage 2 at the study's 1e-6
    (RC4) stays where Stage 1 left it.
    """
    if stage["best_epoch"] != 1 or stage["epochs_run"] <= 1:
        return False
    history = stage.get("history", {})
    loss, kappa = list(history.get("loss", [])), list(history.get(KAPPA, []))
    if start is not None and start.get("history", {}).get("loss"):
        loss.insert(0, start["history"]["loss"][start["best_epoch"] - 1])
        kappa.insert(0, start["best_val_kappa"])
    if len(loss) < 2 or not kappa or loss[0] <= 0:
        return True
    loss_drop = (loss[0] - min(loss[1:])) / loss[0]
    flat = max(kappa) - min(kappa) < FLAT_KAPPA_SPREAD
    # A "peak" at or below chance is no peak: the stage never predicted better than chance.
    return loss_drop < min_loss_drop or flat or max(kappa) <= 0


def _early_peaks(stages: list[tuple], min_loss_drop: float) -> list:
    """(fold, stage name) of the stages that returned epoch-1 weights but kept learning;
    ``stages`` holds (fold, summary, the summary it started from or None)."""
    return [
        (fold, s["stage"])
        for fold, s, start in stages
        if s["best_epoch"] == 1
        and s["epochs_run"] > 1
        and not stopped_learning(s, min_loss_drop, start)
    ]


def _stage_minimum(folds: list[dict], key: str, minimum: int, name: str, what: str) -> dict:
    """Check that every stage of every fold has at least ``minimum`` of ``key``."""
    figures = [
        (f["fold"], s["stage"], s[key])
        for f in folds
        for s in [*f["pretrain"].values(), f["stage1"], f["stage2"]]
    ]
    fold, stage, lowest = min(figures, key=lambda t: t[2])
    return _check(
        name, lowest >= minimum, lowest, f"{what} ({stage}, fold {fold}); minimum {minimum}"
    )


def health_verdict(folds: list[dict], config: Config, mean_kappa: float) -> dict:
    """Run every check over the cross-validation folds.

    ``folds`` holds, per fold, the stage summaries (``pretrain`` by modality, ``stage1``,
    ``stage2``) and ``metrics`` (per-row metrics of the fold's final predictions).
    """
    checks = []
    image_run = bool(config.image_modalities)
    if image_run:
        pre = [(f["fold"], m, s["best_val_kappa"]) for f in folds for m, s in f["pretrain"].items()]
        worst = min(pre, key=lambda t: t[2]) if pre else None
        checks.append(
            _check(
                "pretraining_kappa_positive",
                bool(pre) and all(k > 0 for _, _, k in pre),
                None if worst is None else round(worst[2], 4),
                "lowest pre-training validation kappa"
                + (f" (fold {worst[0]}, {worst[1]})" if worst else ""),
            )
        )
        drop = config.health_min_loss_drop
        stage1 = [(f["fold"], f["stage1"], None) for f in folds]
        peaks = _early_peaks(stage1, drop)
        checks.append(
            _check(
                "stage1_best_epoch_after_1",
                not [fold for fold, s, _ in stage1 if stopped_learning(s, drop)],
                min(s["best_epoch"] for _, s, _ in stage1),
                "smallest Stage 1 best epoch; epoch 1 passes only as an early peak of a stage "
                f"that kept learning (training loss down >= {drop:.0%}, validation kappa moved)"
                + (f"; early peaks: {peaks}" if peaks else ""),
            )
        )
        s2 = [f["stage2"] for f in folds]
        improved = sum(bool(s.get("improved_on_stage1")) for s in s2)
        kept = sum(bool(s.get("kept_stage1_weights")) for s in s2)
        consistent = all(
            bool(s.get("improved_on_stage1")) != bool(s.get("kept_stage1_weights")) for s in s2
        )
        checks.append(
            _check(
                "stage2_improves_or_stage1_kept",
                consistent,
                f"improved {improved}, kept Stage 1 {kept}",
                "Stage 2 improved on Stage 1, or Stage 1's weights were kept and reported",
            )
        )
        used = [(f["fold"], s, start) for f in folds for s, start in _used_stages(f)]
        stuck = [(fold, s["stage"]) for fold, s, start in used if stopped_learning(s, drop, start)]
        peaks = _early_peaks(used, drop)
        checks.append(
            _check(
                "no_stage_restores_epoch_1",
                not stuck,
                len(stuck),
                "stages that stopped learning and returned their epoch-1 weights"
                + (f": {stuck}" if stuck else "")
                + (f"; early peaks that kept learning: {peaks}" if peaks else ""),
            )
        )
        if config.uses_metadata:
            moved = [
                abs(
                    f["stage2"].get("fusion_rf_weight", 0)
                    - f["stage2"].get("fusion_rf_weight_initial", 0)
                )
                for f in folds
            ]
            checks.append(
                _check(
                    "fusion_weight_learned",
                    all(m > 1e-4 for m in moved),
                    round(min(moved), 5),
                    "smallest change of the RF fusion weight from its initial value "
                    "(0 means a fixed or gradient-starved fusion)",
                )
            )
        checks.append(
            _stage_minimum(
                folds,
                "trainable_params",
                config.health_min_trainable_params,
                "trainable_params_minimum",
                "fewest trainable parameters",
            )
        )
        checks.append(
            _stage_minimum(
                folds,
                "steps_per_epoch",
                config.health_min_steps_per_epoch,
                "steps_per_epoch_minimum",
                "fewest steps per epoch",
            )
        )
    checks.append(
        _check(
            "final_kappa_above_threshold",
            not np.isnan(mean_kappa) and mean_kappa > config.health_min_kappa,
            round(float(mean_kappa), 4),
            f"mean quadratic kappa over folds; threshold {config.health_min_kappa}",
        )
    )
    classes = [f["metrics"]["per_row"]["predicted_classes"] for f in folds]
    checks.append(
        _check(
            "predictions_cover_several_classes",
            all(c > 1 for c in classes),
            min(classes),
            "fewest distinct predicted classes in a fold",
        )
    )
    return {"passed": all(c["passed"] for c in checks), "checks": checks}


def format_verdict(verdict: dict) -> str:
    lines = [f"Training health: {'PASS' if verdict['passed'] else 'FAIL'}"]
    for c in verdict["checks"]:
        lines.append(
            f"  [{'pass' if c['passed'] else 'FAIL'}] {c['check']}: {c['figure']} ({c['detail']})"
        )
    return "\n".join(lines)
