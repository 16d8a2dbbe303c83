"""What a search publishes: the final fit's members, their epochs, the blessing and the bundle.

``final_model`` (:class:`dfu_ml.search.SearchSettings`) decides what the final fit trains on all
patients and what the bundle holds:

- ``ensemble``: every combination, averaged per visit (the ensemble row of the table);
- ``best``: the combination with the best mean per-visit kappa over the folds; its honest expected
  figure is the nested choice's, not its own row's;
- a combination's name: that combination.

A single-combination bundle has the layout of the main job's (``predict`` loads it unchanged). An
ensemble bundle holds one such bundle per member under ``members/<combination>/`` and a manifest
naming them; ``predict`` averages the members' per-visit probabilities.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from dataclasses import dataclass
from pathlib import Path

from dfu_ml import __version__
from dfu_ml.bundle import MANIFEST, assemble_bundle, file_digests
from dfu_ml.config import Config
from dfu_ml.errors import DataError
from dfu_ml.evaluation import final_fit_epochs as stage_epochs
from dfu_ml.search import BEST, ENSEMBLE, SearchSettings, parse_combination, view_config
from dfu_ml.search.compare import SELECTION_METRIC

MEMBERS_DIR = "members"
SEARCH_FILE = "search.json"
KAPPA_CHECK = "final_kappa_above_threshold"


def final_members(settings: SearchSettings, comparison: dict) -> list[str]:
    """The combinations the final fit trains and the bundle holds."""
    if settings.final_model == ENSEMBLE:
        return list(settings.combinations)
    if settings.final_model == BEST:
        return [comparison["best_on_same_folds"]["combination"]]
    return [settings.final_model]


def final_fit_epochs(folds: list[dict], config: Config, settings: SearchSettings) -> dict:
    """Epochs of each final-fit step, per view: the median best epoch over the folds of each
    modality's shared pre-training, and of each image combination's Stage 1 and Stage 2."""
    epochs = {}
    for modality in settings.pretrain_modalities:
        # Every combination with this modality used the same encoder of a fold: take one each.
        encoders = {
            f["fold"]: r["pretrain"][modality]
            for f in folds
            for r in f["results"].values()
            if modality in r.get("pretrain", {})
        }
        figures = [{"pretrain": {modality: s}} for s in encoders.values()]
        epochs.setdefault(modality, {})["pretrain"] = stage_epochs(
            figures, view_config(config, modality)
        )["pretrain"]
    for combination in settings.image_combinations:
        fitted = stage_epochs(
            [f["results"][combination] for f in folds], view_config(config, combination)
        )
        # A one-modality combination shares its view's name with that modality's pre-training.
        epochs.setdefault(combination, {}).update(stage1=fitted["stage1"], stage2=fitted["stage2"])
    return epochs


def _check(name: str, passed: bool, figure, detail: str) -> dict:
    return {"check": name, "passed": bool(passed), "figure": figure, "detail": detail}


def final_verdict(comparison: dict, members: list[str], config: Config) -> dict:
    """The blessing of what is published, in the health verdict's format.

    One combination: its own training-health verdict. The ensemble: every member's training
    checks (the kappa threshold left out: a weak member may still add to the average), and the
    ensemble's mean per-visit kappa above ``health_min_kappa``.
    """
    summaries = comparison["combination_summaries"]
    if len(members) == 1:
        return summaries[members[0]]["health"]
    checks = []
    for member in members:
        failed = [
            c["check"]
            for c in summaries[member]["health"]["checks"]
            if not c["passed"] and c["check"] != KAPPA_CHECK
        ]
        checks.append(
            _check(
                f"member_training_health[{member}]",
                not failed,
                ", ".join(failed) or "all passed",
                "the member's training-health checks, kappa threshold aside",
            )
        )
    level, metric = SELECTION_METRIC
    kappa = comparison["rows"][ENSEMBLE]["mean"][level][metric]["mean"]
    checks.append(
        _check(
            "ensemble_kappa_above_threshold",
            kappa > config.health_min_kappa,
            round(float(kappa), 4),
            f"the ensemble's mean per-visit quadratic kappa; threshold {config.health_min_kappa}",
        )
    )
    return {"passed": all(c["passed"] for c in checks), "checks": checks}


@dataclass(frozen=True)
class MemberFiles:
    """A final-fit member's artifacts: the clinical model, and the fusion model (image members)."""

    rf_dir: Path
    model_dir: Path | None = None


def search_model_id(settings: SearchSettings, member_ids: list[str]) -> str:
    """The published id: the members' own ids (configuration, code, data) and what the search
    compared, so that a search's model never takes the id of a single run's."""
    text = json.dumps(
        [list(settings.combinations), settings.final_model, sorted(member_ids)], sort_keys=True
    )
    return f"dfu-{__version__}-search-{hashlib.sha256(text.encode()).hexdigest()[:16]}"


def assemble_final_model(
    out: Path,
    summary: dict,
    members: dict[str, MemberFiles],
    config: Config,
    settings: SearchSettings,
    data: str = "",
    data_digest: str = "",
    code_version: str = "",
) -> dict:
    """Bundle the final model into ``out`` and return its manifest (see the module docstring).

    ``summary`` is the search summary (``search.json``); ``config`` the search's configuration.
    """
    out = Path(out)
    names = summary["final_model"]["members"]
    absent = [n for n in names if n not in members]
    if absent:
        raise DataError(f"the final fit produced no model for {absent}; did its step run?")
    single = len(names) == 1
    member_manifests = {}
    with tempfile.TemporaryDirectory(prefix="dfu-search-bundle-") as scratch:
        for name in names:
            summary_dir = Path(scratch) / name
            summary_dir.mkdir()
            (summary_dir / "summary.json").write_text(
                json.dumps(summary["combination_summaries"][name], default=float)
            )
            files = members[name]
            member_manifests[name] = assemble_bundle(
                out if single else out / MEMBERS_DIR / name,
                view_config(config, name),
                rf_dir=Path(files.rf_dir),
                summary_dir=summary_dir,
                model_dir=files.model_dir,
                data=data,
                data_digest=data_digest,
                code_version=code_version,
            )
    (out / SEARCH_FILE).write_text(json.dumps(summary, indent=2, default=float))
    level, metric = SELECTION_METRIC
    row = summary["rows"][ENSEMBLE if not single else names[0]]
    manifest = {
        **(member_manifests[names[0]] if single else {}),
        "model_id": search_model_id(settings, [m["model_id"] for m in member_manifests.values()]),
        "kind": "combination" if single else ENSEMBLE,
        "members": names,
        "member_model_ids": {n: m["model_id"] for n, m in member_manifests.items()},
        "final_model": settings.final_model,
        "version": __version__,
        "code_version": code_version,
        "data": data,
        "data_digest": data_digest,
        "modalities": sorted(
            {m for n in names for m in parse_combination(n)}, key=config.modalities.index
        ),
        "image_size": config.image_size,
        "blessed": bool(summary["final_model"]["verdict"]["passed"]),
        "mean_per_visit_quadratic_kappa": row["mean"][level][metric]["mean"],
    }
    # Every file below, the members' own manifests included: the one digest pins the ensemble.
    manifest["files"] = file_digests(out)
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2))
    return manifest


def bundle_members(folder: Path) -> list[Path]:
    """The bundle folders whose predictions a final model averages: the members of an ensemble
    bundle, or the folder itself."""
    folder = Path(folder)
    manifest_path = folder / MANIFEST
    if not manifest_path.is_file():
        return [folder]
    try:
        manifest = json.loads(manifest_path.read_text())
    except ValueError:
        return [folder]  # loading it says what is wrong (dfu_ml.bundle.verify_bundle)
    if not isinstance(manifest, dict) or manifest.get("kind") != ENSEMBLE:
        return [folder]
    return [folder / MEMBERS_DIR / name for name in manifest["members"]]
