"""The honest comparison of a modality-combination search.

Input: per fold, every combination's validation predictions (the fold results the training steps
write), all on the same validation patients (:mod:`dfu_ml.search.folds`). Output: one row per
model with mean +/- std over folds of quadratic kappa, accuracy, macro F1 and per-class F1, per
image-set row and per visit, and for every row but the baseline the **paired** per-fold difference
to metadata-only with a patient-bootstrap confidence interval.

Rows:

- one per combination;
- **ensemble**: the late-fusion average of every combination's out-of-fold per-visit
  probabilities (a visit is averaged over the combinations that scored it). Nothing is chosen or
  fitted on validation results, so its figure is not selection-biased;
- **nested choice**: for each outer fold, the combination with the best mean per-visit kappa on
  the *other* folds (the inner folds), scored on this fold. Its mean is the honest figure for
  "pick the best combination"; the best row of the table, chosen on the same folds it is scored
  on, is optimistic (the maximum of N noisy estimates). A fold's choice never sees that fold's
  validation results; the other folds' models did train on its patients, which a full nested
  cross-validation (every combination retrained inside each outer training set, K - 1 times the
  training) would avoid.

Everything is compared **per visit**: the combinations score different image-set rows (a visit's
image sets that have the combination's modalities), but every one of them scores visits of the
same patients. A paired difference is taken on the visits both models scored; the bootstrap
resamples the fold's validation patients with replacement (the same draws for every row), recomputes
both models' figures per fold, and averages over folds.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from dfu_ml.config import Config
from dfu_ml.data.schema import CLASS_NAMES, NUM_CLASSES
from dfu_ml.evaluation import HEADLINE, summarize_folds
from dfu_ml.search import BASELINE, ENSEMBLE, SearchSettings, parse_combination, view_config
from dfu_ml.training.metrics import classification_metrics, mean_std, per_visit

NESTED = "nested choice"
LEVELS = ("per_row", "per_visit")
# The figure a search ranks combinations by (the nested choice and "best").
SELECTION_METRIC = ("per_visit", "quadratic_kappa")
SELECTION_LABEL = "per-visit quadratic kappa"
CONFIDENCE = 0.95


@dataclass(frozen=True)
class VisitPredictions:
    """One model's validation predictions on one fold, one row per visit."""

    visits: np.ndarray
    labels: np.ndarray
    proba: np.ndarray

    @classmethod
    def from_fold_result(cls, result: dict) -> VisitPredictions:
        visits, labels, proba, _ = per_visit(
            result["visit_index"], result["labels"], result["proba"]
        )
        return cls(visits, labels, proba)

    def restricted_to(self, visits: np.ndarray) -> VisitPredictions:
        keep = np.isin(self.visits, visits)
        return VisitPredictions(self.visits[keep], self.labels[keep], self.proba[keep])


def average_predictions(members: list[VisitPredictions]) -> VisitPredictions:
    """Late fusion: each visit's probabilities averaged over the members that scored it."""
    visits = np.unique(np.concatenate([m.visits for m in members]))
    position = {v: i for i, v in enumerate(visits)}
    total = np.zeros((len(visits), NUM_CLASSES))
    count = np.zeros(len(visits))
    labels = np.full(len(visits), -1)
    for member in members:
        index = np.array([position[v] for v in member.visits], dtype=int)
        total[index] += member.proba
        count[index] += 1
        labels[index] = member.labels
    return VisitPredictions(visits, labels, total / count[:, None])


# --- figures from confusion matrices (vectorised over bootstrap replicates) ------------------------
def confusion_figures(confusion: np.ndarray) -> dict[str, np.ndarray]:
    """Quadratic kappa, accuracy and macro F1 of a stack of confusion matrices (..., K, K).

    The same definitions as :func:`dfu_ml.training.metrics.classification_metrics` (kappa 0.0
    when fewer than two classes occur or it is undefined; F1 0 for a class never seen or
    predicted), computed for thousands of weighted replicates at once.
    """
    cm = np.asarray(confusion, dtype=float)
    k = cm.shape[-1]
    total = cm.sum(axis=(-2, -1))
    rows, cols = cm.sum(axis=-1), cm.sum(axis=-2)
    weights = (np.subtract.outer(np.arange(k), np.arange(k)) ** 2) / (k - 1) ** 2
    with np.errstate(divide="ignore", invalid="ignore"):
        expected = rows[..., :, None] * cols[..., None, :] / total[..., None, None]
        kappa = 1 - (weights * cm).sum(axis=(-2, -1)) / (weights * expected).sum(axis=(-2, -1))
        present = ((rows + cols) > 0).sum(axis=-1)
        kappa = np.where((present < 2) | ~np.isfinite(kappa), 0.0, kappa)
        accuracy = np.trace(cm, axis1=-2, axis2=-1) / total
        diagonal = np.diagonal(cm, axis1=-2, axis2=-1)
        denominator = rows + cols
        f1 = np.where(denominator > 0, 2 * diagonal / np.where(denominator > 0, denominator, 1), 0)
    return {"quadratic_kappa": kappa, "accuracy": accuracy, "macro_f1": f1.mean(axis=-1)}


def _one_hot(values: np.ndarray) -> np.ndarray:
    return np.eye(NUM_CLASSES)[np.asarray(values, dtype=int)]


def _weighted_confusions(weights: np.ndarray, pred: VisitPredictions) -> np.ndarray:
    """(replicates, K, K) confusion matrices of ``pred`` under per-visit ``weights``."""
    return np.einsum(
        "bv,vt,vp->btp", weights, _one_hot(pred.labels), _one_hot(pred.proba.argmax(axis=1))
    )


@dataclass(frozen=True)
class PatientBootstrap:
    """Patient draws shared by every row of the table: per fold, ``replicates`` resamplings of
    the validation patients with replacement (how often each patient is drawn)."""

    patients: dict  # fold -> array of validation patients
    counts: dict  # fold -> (replicates, patients) draw counts
    visit_patient: dict  # fold -> {visit: patient}

    @classmethod
    def draw(cls, folds: list[dict], replicates: int, seed: int) -> PatientBootstrap:
        patients, counts, visit_patient = {}, {}, {}
        for f in folds:
            mapping = {int(v): int(p) for v, p in f["val_visit_patient"].items()}
            fold_patients = np.unique(list(mapping.values()))
            rng = np.random.default_rng([seed, f["fold"] + 1])
            n = len(fold_patients)
            patients[f["fold"]] = fold_patients
            counts[f["fold"]] = rng.multinomial(n, np.full(n, 1 / n), size=replicates)
            visit_patient[f["fold"]] = mapping
        return cls(patients, counts, visit_patient)

    @property
    def replicates(self) -> int:
        return len(next(iter(self.counts.values()))) if self.counts else 0

    def visit_weights(self, fold: int, visits: np.ndarray) -> np.ndarray:
        """(replicates, visits): each visit weighted by how often its patient was drawn."""
        column = {p: i for i, p in enumerate(self.patients[fold])}
        index = [column[self.visit_patient[fold][int(v)]] for v in visits]
        return self.counts[fold][:, index]


def paired_difference(
    model: dict[int, VisitPredictions],
    baseline: dict[int, VisitPredictions],
    bootstrap: PatientBootstrap | None,
) -> dict:
    """Per-fold model - baseline figures on the visits the model scored, their mean, and a
    patient-bootstrap interval of the mean (``None`` without replicates)."""
    per_fold, replicate_differences = [], []
    for fold in sorted(model):
        common = np.intersect1d(model[fold].visits, baseline[fold].visits)
        mine, theirs = model[fold].restricted_to(common), baseline[fold].restricted_to(common)
        a, b = _figures(mine), _figures(theirs)
        per_fold.append(
            {
                "fold": fold,
                "visits": len(mine.visits),
                "model": a,
                "baseline": b,
                "difference": {k: a[k] - b[k] for k in HEADLINE},
            }
        )
        if bootstrap is not None and bootstrap.replicates:
            weights = bootstrap.visit_weights(fold, mine.visits)
            ma = confusion_figures(_weighted_confusions(weights, mine))
            mb = confusion_figures(_weighted_confusions(weights, theirs))
            replicate_differences.append({k: ma[k] - mb[k] for k in HEADLINE})
    result = {
        "per_fold": per_fold,
        "mean": {k: float(np.mean([p["difference"][k] for p in per_fold])) for k in HEADLINE},
        "ci": None,
    }
    if replicate_differences:
        tail = (1 - CONFIDENCE) / 2 * 100
        result["ci"] = {}
        for k in HEADLINE:
            # A replicate can draw no patient with a scored visit (NaN accuracy): left out.
            mean = np.nanmean(np.stack([d[k] for d in replicate_differences]), axis=0)
            low, high = np.nanpercentile(mean, [tail, 100 - tail])
            result["ci"][k] = [float(low), float(high)]
        result["confidence"] = CONFIDENCE
        result["replicates"] = bootstrap.replicates
    return result


def _figures(pred: VisitPredictions) -> dict:
    """The point figures: the same function as the table's, so the two always agree."""
    metrics = classification_metrics(pred.labels, pred.proba)
    return {k: metrics[k] for k in HEADLINE}


# --- the table ------------------------------------------------------------------------------------
def _level_metrics(metrics: dict) -> dict:
    return {
        **{k: metrics[k] for k in HEADLINE},
        "f1_per_class": metrics["f1_per_class"],
        "rows": metrics["rows"],
    }


def _aggregate(per_fold: list[dict]) -> dict:
    """Mean +/- std over folds of every figure, per level present."""
    out = {}
    for level in LEVELS:
        values = [p[level] for p in per_fold if p.get(level)]
        if not values:
            out[level] = None
            continue
        out[level] = {k: mean_std([v[k] for v in values]) for k in HEADLINE}
        out[level]["f1_per_class"] = {
            c: mean_std([v["f1_per_class"][c] for v in values]) for c in CLASS_NAMES
        }
    return out


def rank(scores: dict[str, dict[int, float]], folds, order: list[str]) -> list[str]:
    """Combinations by their mean score over ``folds``, best first; ties go to the combination
    with fewer modalities, then to the earlier one in the search's order."""
    return sorted(
        scores,
        key=lambda c: (
            -float(np.mean([scores[c][f] for f in folds])),
            len(parse_combination(c)),
            order.index(c),
        ),
    )


def nested_choice(scores: dict[str, dict[int, float]], order: list[str]) -> list[dict]:
    """For each outer fold, the combination ranked best on the other folds (never on itself)."""
    folds = sorted(next(iter(scores.values())))
    choices = []
    for fold in folds:
        inner = [f for f in folds if f != fold]
        chosen = rank(scores, inner, order)[0]
        choices.append(
            {
                "fold": fold,
                "chosen": chosen,
                "chosen_on_folds": inner,
                "inner_mean": float(np.mean([scores[chosen][f] for f in inner])),
                "score": float(scores[chosen][fold]),
            }
        )
    return choices


def compare_search(folds: list[dict], config: Config, settings: SearchSettings) -> dict:
    """The search's summary: the table rows, selection, per-combination summaries.

    ``folds``: per cross-validation fold ``{"fold", "val_visit_patient", "results"}``, where
    ``results`` maps every combination to its fold result (``visit_index``, ``labels``, ``proba``
    per row, ``metrics``, stage summaries).
    """
    folds = sorted(folds, key=lambda f: f["fold"])
    fold_ids = [f["fold"] for f in folds]
    names = list(settings.combinations)
    missing = [(f["fold"], c) for f in folds for c in names if c not in f["results"]]
    if missing:
        raise ValueError(f"fold results missing for (fold, combination) {missing}")
    results = {c: {f["fold"]: f["results"][c] for f in folds} for c in names}
    visits = {
        c: {k: VisitPredictions.from_fold_result(r) for k, r in by_fold.items()}
        for c, by_fold in results.items()
    }
    combination_summaries = {
        c: summarize_folds(list(results[c].values()), view_config(config, c)) for c in names
    }
    rows = {}
    for c in names:
        rows[c] = {
            "kind": "combination",
            "per_fold": [
                {
                    "fold": k,
                    "per_row": _level_metrics(results[c][k]["metrics"]["per_row"]),
                    "per_visit": _level_metrics(
                        classification_metrics(visits[c][k].labels, visits[c][k].proba)
                    ),
                }
                for k in fold_ids
            ],
            "health": combination_summaries[c]["health"]["passed"],
        }
    level, metric = SELECTION_METRIC
    scores = {c: {p["fold"]: p[level][metric] for p in rows[c]["per_fold"]} for c in names}
    ensemble = {k: average_predictions([visits[c][k] for c in names]) for k in fold_ids}
    rows[ENSEMBLE] = {
        "kind": "ensemble",
        "members": names,
        "per_fold": [
            {
                "fold": k,
                "per_row": None,
                "per_visit": _level_metrics(
                    classification_metrics(ensemble[k].labels, ensemble[k].proba)
                ),
            }
            for k in fold_ids
        ],
    }
    choices = nested_choice(scores, names)
    chosen = {ch["fold"]: ch["chosen"] for ch in choices}
    rows[NESTED] = {
        "kind": "nested",
        "choices": choices,
        "per_fold": [
            {
                **next(p for p in rows[chosen[k]]["per_fold"] if p["fold"] == k),
                "combination": chosen[k],
            }
            for k in fold_ids
        ],
    }
    predictions = {
        **visits,
        ENSEMBLE: ensemble,
        NESTED: {k: visits[chosen[k]][k] for k in fold_ids},
    }
    bootstrap = (
        PatientBootstrap.draw(folds, settings.bootstrap, config.seed)
        if settings.bootstrap
        else None
    )
    baseline_visits = {k: len(visits[BASELINE][k].visits) for k in fold_ids}
    for name, row in rows.items():
        row["mean"] = _aggregate(row["per_fold"])
        row["coverage"] = float(
            np.mean([len(predictions[name][k].visits) / baseline_visits[k] for k in fold_ids])
        )
        if name != BASELINE:
            row["paired"] = paired_difference(predictions[name], predictions[BASELINE], bootstrap)
    best = rank(scores, fold_ids, names)[0]
    return {
        "combinations": names,
        "folds": fold_ids,
        "selection_metric": SELECTION_LABEL,
        "rows": rows,
        "best_on_same_folds": {
            "combination": best,
            "mean": rows[best]["mean"][level][metric]["mean"],
            "nested_mean": rows[NESTED]["mean"][level][metric]["mean"],
            "candidates": len(names),
        },
        "combination_summaries": combination_summaries,
    }
