"""The modality-combination search's library (dfu_ml/search): combinations, the shared fold plan,
the paired comparison, the ensemble, the nested choice, the final model and the report. Fold
results are built by hand here (no training); tests/test_search_pipeline.py trains for real."""

import dataclasses

import numpy as np
import pytest

from dfu_ml.config import load_config
from dfu_ml.data.schema import NUM_CLASSES
from dfu_ml.errors import ConfigError, DataError
from dfu_ml.search import (
    BASELINE,
    SearchSettings,
    all_combinations,
    canonical,
    image_combinations,
    pretrain_modalities,
    resolve_combinations,
)
from dfu_ml.search.compare import (
    ENSEMBLE,
    NESTED,
    PatientBootstrap,
    VisitPredictions,
    average_predictions,
    compare_search,
    confusion_figures,
    nested_choice,
    paired_difference,
)
from dfu_ml.training.metrics import KAPPA, classification_metrics, evaluate_predictions


# --- combinations ---------------------------------------------------------------------------------
def test_combinations_are_canonical_and_the_study_has_fifteen():
    assert canonical("thermal_map+metadata") == "metadata+thermal_map"
    combos = all_combinations()
    assert len(combos) == 15 and len(set(combos)) == 15
    assert combos[0] == "metadata" and combos[-1] == "metadata+depth_rgb+depth_map+thermal_map"
    assert resolve_combinations(["depth_rgb", "depth_rgb+metadata"]) == [
        "metadata",
        "depth_rgb",
        "metadata+depth_rgb",
    ]
    assert pretrain_modalities(combos) == ["depth_rgb", "depth_map", "thermal_map"]
    assert len(image_combinations(combos)) == 14


@pytest.mark.parametrize(
    "text, message",
    [
        ("metadata+depth", "unknown modality 'depth'"),
        ("metadata++depth_rgb", "empty part"),
        ("depth_rgb+depth_rgb", "names a modality twice"),
    ],
)
def test_a_bad_combination_is_an_error_naming_it(text, message):
    with pytest.raises(ConfigError, match=message):
        resolve_combinations([text])


def test_search_settings_check_the_final_model_and_the_bootstrap():
    settings = SearchSettings.from_values(["depth_rgb"], "depth_rgb", 0)
    assert (
        settings.combinations == ("metadata", "depth_rgb") and settings.final_model == "depth_rgb"
    )
    with pytest.raises(ConfigError, match="not among the combinations"):
        SearchSettings.from_values(["depth_rgb"], "thermal_map")
    with pytest.raises(ConfigError, match="ensemble"):
        SearchSettings.from_values(["depth_rgb"], "everything")
    with pytest.raises(ConfigError, match="given more than once"):
        SearchSettings.from_values(["depth_rgb", "depth_rgb"])
    with pytest.raises(ConfigError, match="bootstrap"):
        SearchSettings.from_values(["depth_rgb"], bootstrap=-1)


# --- the shared fold plan -------------------------------------------------------------------------
COMBOS = ["metadata", "depth_rgb", "thermal_map", "metadata+depth_rgb+thermal_map"]


def test_every_view_is_planned_from_one_patient_split(prepared_synthetic):
    from dfu_ml.search.folds import split_fold, views
    from dfu_ml.training.fold import training_rows

    config = load_config("smoke", ["cv_folds=2"])
    dataset = prepared_synthetic
    for fold in (0, 1):
        split = split_fold(dataset, config, fold, COMBOS)
        train, val = set(split["train_patients"]), set(split["val_patients"])
        assert train and val and not train & val
        assert set(split["views"]) == set(views(COMBOS))
        for view, plan in split["views"].items():
            rows = training_rows(dataset, config.replace(modalities=view.split("+")))
            patients = rows["patient"].to_numpy()
            # Each view's rows are exactly its rows of the split's patients.
            assert set(patients[plan["train_rows"]]) <= train
            assert set(patients[plan["val_rows"]]) <= val
            assert (
                len(plan["train_rows"]) + len(plan["val_rows"])
                == np.isin(patients, list(train | val)).sum()
            )
        metadata = split["views"][BASELINE]
        assert len(split["val_visit_patient"]) == len(metadata["val_rows"])


def test_a_combination_whose_modality_the_data_lacks_is_an_error_before_training(
    prepared_synthetic,
):
    from dfu_ml.search.folds import split_fold

    sets = prepared_synthetic.sets.copy()
    sets["has_depth_map"] = False
    images = {m: a for m, a in prepared_synthetic.images.items() if m != "depth_map"}
    without = dataclasses.replace(prepared_synthetic, sets=sets, images=images)
    with pytest.raises(DataError, match=r"metadata\+depth_map needs depth_map images"):
        split_fold(without, load_config("smoke"), 0, ["metadata", "metadata+depth_map"])


# --- comparison figures ---------------------------------------------------------------------------
def test_confusion_figures_agree_with_the_reported_metrics():
    rng = np.random.default_rng(0)
    cases = [(rng.integers(0, 3, 40), rng.integers(0, 3, 40)) for _ in range(20)]
    cases += [(np.zeros(5, int), np.zeros(5, int)), (np.array([0, 1, 1]), np.array([2, 2, 2]))]
    for labels, predicted in cases:
        expected = classification_metrics(labels, np.eye(NUM_CLASSES)[predicted])
        confusion = np.zeros((NUM_CLASSES, NUM_CLASSES))
        np.add.at(confusion, (labels, predicted), 1)
        figures = confusion_figures(confusion[None])
        for key in ("quadratic_kappa", "accuracy", "macro_f1"):
            assert figures[key][0] == pytest.approx(expected[key], abs=1e-9), key


def _stage(name: str) -> dict:
    return {
        "stage": name,
        "best_epoch": 2,
        "best_val_kappa": 0.5,
        "trainable_params": 5000,
        "steps_per_epoch": 5,
        "batch_size": 16,
        "epochs_run": 3,
        "seconds": 2.0,
        "history": {"loss": [1.0, 0.8, 0.7], KAPPA: [0.3, 0.5, 0.4]},
        "improved_on_stage1": True,
        "kept_stage1_weights": False,
        "fusion_rf_weight": 0.6,
        "fusion_rf_weight_initial": 0.7,
    }


def _fold_result(fold: int, visits, labels, accuracy: float, rng, sets_per_visit: int = 1):
    """A fold result whose rows predict the label with probability ``accuracy``."""
    visit_index = np.repeat(visits, sets_per_visit)
    row_labels = np.repeat(labels, sets_per_visit)
    right = rng.random(len(row_labels)) < accuracy
    predicted = np.where(
        right, row_labels, (row_labels + 1 + rng.integers(0, 2, len(row_labels))) % 3
    )
    proba = np.full((len(row_labels), NUM_CLASSES), 0.1)
    proba[np.arange(len(row_labels)), predicted] = 0.8
    result = {
        "fold": fold,
        "visit_index": visit_index.tolist(),
        "labels": row_labels.tolist(),
        "proba": proba.tolist(),
        "metrics": evaluate_predictions(visit_index, row_labels, proba),
        "pretrain": {},
    }
    if sets_per_visit > 1:  # an image combination: its stages and the shared encoder
        result.update(
            pretrain={"depth_rgb": {**_stage("pretrain[depth_rgb]"), "best_epoch": 3 + fold}},
            stage1=_stage("stage1"),
            stage2=_stage("stage2"),
            encoders={"depth_rgb": {"digest": f"enc{fold}", "fold": fold}},
        )
    return result


ACCURACY = {"metadata": 0.55, "depth_rgb": 0.7, "metadata+depth_rgb": 0.85}


def _folds(n_folds: int = 3, visits_per_fold: int = 30, coverage: float = 1.0, seed: int = 0):
    rng = np.random.default_rng(seed)
    folds = []
    for fold in range(n_folds):
        visits = np.arange(fold * 100, fold * 100 + visits_per_fold)
        labels = rng.integers(0, 3, visits_per_fold)
        results = {}
        for name, accuracy in ACCURACY.items():
            keep = slice(None) if name == BASELINE else slice(0, int(coverage * visits_per_fold))
            results[name] = _fold_result(
                fold, visits[keep], labels[keep], accuracy, rng, 1 if name == BASELINE else 3
            )
        folds.append(
            {
                "fold": fold,
                "val_visit_patient": {str(v): int(v // 3) for v in visits},
                "results": results,
            }
        )
    return folds


def _compare(folds, **settings):
    from dfu_ml.search.summary import summarize_search

    search = SearchSettings.from_values(list(ACCURACY), **settings)
    return summarize_search(folds, load_config("smoke", ["cv_folds=3"]), search)


@pytest.mark.parametrize("coverage", [1.0, 0.7])
def test_paired_differences_are_the_per_fold_figures_differences(coverage):
    folds = _folds(coverage=coverage)
    summary = _compare(folds, bootstrap=200)
    rows = summary["rows"]
    baseline = {p["fold"]: p["per_visit"] for p in rows[BASELINE]["per_fold"]}
    for name, row in rows.items():
        if name == BASELINE:
            assert "paired" not in row
            continue
        paired = row["paired"]
        own = {p["fold"]: p["per_visit"] for p in row["per_fold"]}
        for p in paired["per_fold"]:
            for key in ("quadratic_kappa", "accuracy", "macro_f1"):
                assert p["difference"][key] == pytest.approx(p["model"][key] - p["baseline"][key])
                # The model's side is the table's own per-fold figure.
                assert p["model"][key] == pytest.approx(own[p["fold"]][key])
                if coverage == 1.0:
                    assert p["baseline"][key] == pytest.approx(baseline[p["fold"]][key])
        if coverage < 1.0 and name in ACCURACY:
            # The baseline side is metadata-only on the visits this model scored.
            fold0 = next(f for f in folds if f["fold"] == 0)
            scored = np.unique(fold0["results"][name]["visit_index"])
            meta = VisitPredictions.from_fold_result(fold0["results"][BASELINE]).restricted_to(
                scored
            )
            expected = classification_metrics(meta.labels, meta.proba)["quadratic_kappa"]
            assert paired["per_fold"][0]["baseline"]["quadratic_kappa"] == pytest.approx(expected)
            assert row["coverage"] == pytest.approx(0.7)
        mean = np.mean([p["difference"]["quadratic_kappa"] for p in paired["per_fold"]])
        assert paired["mean"]["quadratic_kappa"] == pytest.approx(mean)
        low, high = paired["ci"]["quadratic_kappa"]
        assert low <= high and paired["replicates"] == 200
    # The clearly better combination's interval excludes zero.
    assert rows["metadata+depth_rgb"]["paired"]["ci"]["quadratic_kappa"][0] > 0


def test_the_bootstrap_of_a_model_against_itself_is_zero_and_repeatable():
    folds = _folds()
    meta = {f["fold"]: VisitPredictions.from_fold_result(f["results"][BASELINE]) for f in folds}
    draws = PatientBootstrap.draw(folds, 100, seed=5)
    same = paired_difference(meta, meta, draws)
    assert same["ci"]["quadratic_kappa"] == [0.0, 0.0]
    other = {f["fold"]: VisitPredictions.from_fold_result(f["results"]["depth_rgb"]) for f in folds}
    first = paired_difference(other, meta, PatientBootstrap.draw(folds, 100, seed=5))
    again = paired_difference(other, meta, PatientBootstrap.draw(folds, 100, seed=5))
    assert first["ci"] == again["ci"]


def test_the_ensemble_averages_each_visit_over_the_members_that_scored_it():
    a = VisitPredictions(np.array([1, 2]), np.array([0, 1]), np.array([[0.6, 0.4, 0], [0, 1, 0]]))
    b = VisitPredictions(np.array([2, 3]), np.array([1, 2]), np.array([[0, 0, 1], [0, 0, 1]]))
    mean = average_predictions([a, b])
    assert mean.visits.tolist() == [1, 2, 3] and mean.labels.tolist() == [0, 1, 2]
    assert np.allclose(mean.proba, [[0.6, 0.4, 0], [0, 0.5, 0.5], [0, 0, 1]])


def test_the_nested_choice_never_scores_a_fold_with_a_choice_made_on_it():
    order = ["metadata", "depth_rgb", "thermal_map"]
    # thermal_map wins on fold 0 by far, depth_rgb on folds 1 and 2.
    scores = {
        "metadata": {0: 0.40, 1: 0.40, 2: 0.40},
        "depth_rgb": {0: 0.10, 1: 0.70, 2: 0.70},
        "thermal_map": {0: 0.99, 1: 0.60, 2: 0.60},
    }
    choices = {c["fold"]: c for c in nested_choice(scores, order)}
    assert choices[0]["chosen"] == "depth_rgb" and choices[0]["score"] == 0.10
    assert all(c["fold"] not in c["chosen_on_folds"] for c in choices.values())
    rng = np.random.default_rng(1)
    for fold in (0, 1, 2):
        for _ in range(20):
            shuffled = {c: {**s, fold: float(rng.random())} for c, s in scores.items()}
            # Whatever this fold's own figures, its choice stays the same.
            again = {c["fold"]: c["chosen"] for c in nested_choice(shuffled, order)}
            assert again[fold] == choices[fold]["chosen"]


def test_the_summary_flags_the_optimistic_best_and_reports_the_nested_figure():
    from dfu_ml.search.report import format_search_table, search_html, search_markdown

    summary = _compare(_folds(), bootstrap=50)
    rows = summary["rows"]
    assert set(rows) == {*ACCURACY, ENSEMBLE, NESTED}
    assert rows[ENSEMBLE]["mean"]["per_row"] is None
    assert set(rows[ENSEMBLE]["members"]) == set(ACCURACY)
    best = summary["best_on_same_folds"]
    assert best["combination"] == "metadata+depth_rgb" and best["candidates"] == 3
    nested = rows[NESTED]
    for choice, fold in zip(nested["choices"], nested["per_fold"]):
        assert fold["combination"] == choice["chosen"]
        chosen = {p["fold"]: p for p in rows[choice["chosen"]]["per_fold"]}
        assert fold["per_visit"] == chosen[choice["fold"]]["per_visit"]
    table = format_search_table(summary)
    assert "optimistic" in table and "nested choice" in table
    for name in ACCURACY:
        assert name in table
    markdown = search_markdown(summary)
    assert markdown.count("\n| ") >= len(rows) and "ensemble (average of 3)" in markdown
    assert "<table>" in search_html(summary, b"png")
    sharing = summary["sharing"]
    assert sharing["pretrain_runs"] == 3 and sharing["pretrain_runs_unshared"] == 6
    assert sharing["pretrain_seconds_unshared"] == pytest.approx(2 * sharing["pretrain_seconds"])


def test_the_final_model_members_epochs_and_blessing():
    folds = _folds()
    ensemble = _compare(folds)
    assert ensemble["final_model"]["members"] == list(ACCURACY)
    checks = {c["check"] for c in ensemble["final_model"]["verdict"]["checks"]}
    assert "ensemble_kappa_above_threshold" in checks
    assert {f"member_training_health[{n}]" for n in ACCURACY} <= checks
    best = _compare(folds, final_model="best")
    assert best["final_model"]["members"] == ["metadata+depth_rgb"]
    verdict = best["combination_summaries"]["metadata+depth_rgb"]["health"]
    assert best["final_model"]["verdict"] == verdict
    # depth_rgb is both a pre-trained modality and a one-modality combination.
    epochs = ensemble["final_fit_epochs"]
    assert epochs["depth_rgb"] == {"pretrain": 4, "stage1": 2, "stage2": 2}
    assert set(epochs["metadata+depth_rgb"]) == {"stage1", "stage2"}


def test_compare_search_needs_every_combination_of_every_fold():
    folds = _folds()
    del folds[1]["results"]["depth_rgb"]
    with pytest.raises(ValueError, match="depth_rgb"):
        compare_search(folds, load_config("smoke"), SearchSettings.from_values(list(ACCURACY)))


def test_the_search_steps_have_command_lines(tmp_path, prepared_synthetic):
    import json

    from components.search import main
    from dfu_ml.data.prepare import save_prepared

    prepared = tmp_path / "prepared"
    save_prepared(prepared_synthetic, prepared)
    out = tmp_path / "split"
    arguments = ["split", "--prepared", prepared, "--fold", 1, "--out", out]
    arguments += ["--combination", "depth_rgb", "--combination", "metadata+depth_rgb"]
    assert main([str(a) for a in [*arguments, "--set", "cv_folds=2"]]) == 0
    split = json.loads((out / "split.json").read_text())
    assert split["fold"] == 1 and split["combinations"] == [
        "metadata",
        "depth_rgb",
        "metadata+depth_rgb",
    ]
    for view in split["combinations"]:
        plan = json.loads((out / "views" / view / "fold_plan.json").read_text())
        assert plan["fold"] == 1 and plan["val_patients"] == split["val_patients"]
    assert json.loads((out / "fold_plan.json").read_text())["modalities"] == ["metadata"]
    for step in ("split", "pretrain", "fuse", "evaluate"):
        with pytest.raises(SystemExit) as exit_info:
            main([step, "--help"])
        assert exit_info.value.code == 0
