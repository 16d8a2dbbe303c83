"""The search summary (``search.json``): the comparison, the final model and what sharing saved."""

from __future__ import annotations

from dfu_ml.config import Config
from dfu_ml.search import SearchSettings, image_combinations, parse_combination
from dfu_ml.search.compare import compare_search
from dfu_ml.search.final import final_fit_epochs, final_members, final_verdict


def sharing_figures(folds: list[dict], settings: SearchSettings) -> dict:
    """What pre-training once per modality and fold, and one clinical model per fold, saved over
    training every combination on its own (as ``dfu-kfp run`` would), measured on the folds.

    Seconds are the training stages' own measured seconds: a combination trained on its own would
    pre-train each of its modalities on exactly the same rows with the same seed, so each of those
    runs costs what the shared run measured. ``encoders`` lists, per fold and modality, the
    distinct encoder files the combinations loaded (one each when the sharing worked).
    """
    pretrain_seconds, encoders, fusion_seconds = {}, {}, 0.0
    for f in folds:
        for name in image_combinations(settings.combinations):
            result = f["results"][name]
            for modality, stage in result["pretrain"].items():
                pretrain_seconds[(f["fold"], modality)] = stage["seconds"]
            for modality, encoder in result.get("encoders", {}).items():
                encoders.setdefault(f["fold"], {}).setdefault(modality, set()).add(
                    encoder["digest"]
                )
            fusion_seconds += result["stage1"]["seconds"] + result["stage2"]["seconds"]
    unshared_runs = [
        (f["fold"], m)
        for f in folds
        for name in settings.combinations
        for m in parse_combination(name)
        if (f["fold"], m) in pretrain_seconds
    ]
    shared = sum(pretrain_seconds.values())
    unshared = sum(pretrain_seconds[key] for key in unshared_runs)
    return {
        "folds": len(folds),
        "pretrain_runs": len(pretrain_seconds),
        "pretrain_runs_unshared": len(unshared_runs),
        "pretrain_seconds": round(shared, 1),
        "pretrain_seconds_unshared": round(unshared, 1),
        "clinical_models": len(folds),
        "clinical_models_unshared": len(folds) * len(settings.combinations),
        "fusion_seconds": round(fusion_seconds, 1),
        "training_seconds": round(shared + fusion_seconds, 1),
        "training_seconds_unshared": round(unshared + fusion_seconds, 1),
        "encoders": {
            str(fold): {m: sorted(d) for m, d in by_modality.items()}
            for fold, by_modality in sorted(encoders.items())
        },
    }


def summarize_search(folds: list[dict], config: Config, settings: SearchSettings) -> dict:
    """Everything the report, ``search.json``, the final fit and the blessing need."""
    summary = compare_search(folds, config, settings)
    members = final_members(settings, summary)
    verdict = final_verdict(summary, members, config)
    summary.update(
        {
            "final_model": {
                "choice": settings.final_model,
                "members": members,
                "verdict": verdict,
            },
            "blessed": bool(verdict["passed"]),
            "final_fit_epochs": final_fit_epochs(folds, config, settings),
            "sharing": sharing_figures(folds, settings),
            "settings": {
                "combinations": list(settings.combinations),
                "final_model": settings.final_model,
                "bootstrap": settings.bootstrap,
            },
            "config": config.to_dict(),
        }
    )
    return summary
