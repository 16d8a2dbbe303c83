"""The modality-combination search end to end through kfp.local on a tiny dataset (it really
trains: few epochs, 2 folds, metadata, depth_rgb and metadata+depth_rgb), then predict with the
ensemble it bundles; a combination whose modality the data lacks fails before anything trains;
every compiled search variant passes the backend acceptance check (tests/test_acceptance.py)."""

import json
import re
import shutil

import numpy as np
import pandas as pd
import pytest

from dfu_ml.bundle import CLINICAL_MODEL_FILE
from dfu_ml.config import load_config
from dfu_ml.data.schema import CLASS_NAMES, CLINICAL_CSV, MODALITY_FOLDERS
from dfu_ml.data.synthetic import generate_synthetic_dataset

FAST = [
    "cv_folds=2",
    "pretrain_epochs=3",
    "stage1_epochs=3",
    "stage2_epochs=2",
    "rf_n_estimators=40",
]
COMBINATIONS = ["metadata", "depth_rgb", "metadata+depth_rgb"]
FOLDS = 2


def _executed(log_text: str, component: str) -> int:
    """How many times a task of ``component`` ran (``-2`` copies are the final fit's)."""
    return len(re.findall(rf"Executing task '{component}'", log_text))


@pytest.mark.slow
def test_search_end_to_end_then_predict_with_its_ensemble(tmp_path, capsys):
    from dfu_ml.search import SearchSettings
    from dfu_ml.search.compare import ENSEMBLE, NESTED
    from pipelines.cli import main
    from pipelines.search import run_search_local

    data = tmp_path / "data"
    generate_synthetic_dataset(data, patients=14, seed=3, image_scale=0.12)
    settings = SearchSettings.from_values(COMBINATIONS, "ensemble", 200)
    out = tmp_path / "out"
    run_search_local(load_config("smoke", FAST), settings, str(data), out, log=print)
    summary = json.loads((out / "search.json").read_text())
    printed = capsys.readouterr().out

    # Pre-training ran once per modality and fold, and both depth_rgb combinations loaded that
    # one encoder; the final fit pre-trained once more.
    log = (out / "logs" / "pipeline.log").read_text()
    assert _executed(log, "pretrain-shared-encoder") == FOLDS
    assert _executed(log, "pretrain-shared-encoder-2") == 1
    assert _executed(log, "clinical-forest") == FOLDS
    assert _executed(log, "fuse-combination") == FOLDS * 2
    sharing = summary["sharing"]
    assert sharing["pretrain_runs"] == FOLDS and sharing["pretrain_runs_unshared"] == 2 * FOLDS
    for fold in map(str, range(FOLDS)):
        assert len(sharing["encoders"][fold]["depth_rgb"]) == 1
    assert len({d for f in sharing["encoders"].values() for d in f["depth_rgb"]}) == FOLDS

    rows = summary["rows"]
    assert list(rows) == [*COMBINATIONS, ENSEMBLE, NESTED]
    per_fold = {
        name: {p["fold"]: p["per_visit"]["quadratic_kappa"] for p in row["per_fold"]}
        for name, row in rows.items()
    }
    for name, row in rows.items():
        figure = row["mean"]["per_visit"]["quadratic_kappa"]
        assert figure["mean"] == pytest.approx(np.mean(list(per_fold[name].values())))
        assert -1 <= figure["mean"] <= 1
        if name == "metadata":
            continue
        # The table's paired differences are the per-fold figures' differences.
        for p in row["paired"]["per_fold"]:
            assert p["model"]["quadratic_kappa"] == pytest.approx(per_fold[name][p["fold"]])
            if row["coverage"] == 1.0:
                assert p["baseline"]["quadratic_kappa"] == pytest.approx(
                    per_fold["metadata"][p["fold"]]
                )
            assert p["difference"]["quadratic_kappa"] == pytest.approx(
                p["model"]["quadratic_kappa"] - p["baseline"]["quadratic_kappa"]
            )
        differences = [p["difference"]["quadratic_kappa"] for p in row["paired"]["per_fold"]]
        assert row["paired"]["mean"]["quadratic_kappa"] == pytest.approx(np.mean(differences))
        low, high = row["paired"]["ci"]["quadratic_kappa"]
        assert -2 <= low <= high <= 2
    # The nested choice scores each fold with the combination chosen on the other fold only.
    for choice in rows[NESTED]["choices"]:
        assert choice["fold"] not in choice["chosen_on_folds"]
        (other,) = choice["chosen_on_folds"]
        best_elsewhere = max(per_fold[c][other] for c in COMBINATIONS)
        assert per_fold[choice["chosen"]][other] == pytest.approx(best_elsewhere)
        assert choice["score"] == pytest.approx(per_fold[choice["chosen"]][choice["fold"]])
    assert "optimistic" in printed and "nested choice" in printed
    for name in ("search.md", "search.html", "search.png"):
        assert (out / name).stat().st_size > 0
    assert "<img" in (out / "search.html").read_text()

    # The final model is the ensemble of the three combinations, trained on all patients.
    manifest = json.loads((out / "final_model" / "manifest.json").read_text())
    assert manifest["kind"] == "ensemble" and manifest["members"] == COMBINATIONS
    assert manifest["blessed"] == summary["blessed"]
    assert (out / "final_model" / "members" / "metadata+depth_rgb" / "model.keras").is_file()
    published = sorted(p.name for p in (out / "store" / "models").glob("*"))
    assert published == ([manifest["model_id"]] if summary["blessed"] else [])

    new = tmp_path / "new"
    generate_synthetic_dataset(new, patients=4, seed=99, image_scale=0.12)
    clinical = pd.read_csv(new / CLINICAL_CSV, encoding="utf-8-sig")
    visits = len(clinical.drop_duplicates(["Patient#", "Appt#", "DFU#"]))
    csv = tmp_path / "pred.csv"
    model = out / "final_model"
    assert main(["predict", "--model", str(model), "--data", str(new), "--out", str(csv)]) == 0
    predictions = pd.read_csv(csv)
    assert len(predictions) == visits
    proba = predictions[[f"p_{c}" for c in CLASS_NAMES]].to_numpy()
    assert np.allclose(proba.sum(axis=1), 1.0, atol=1e-4)
    assert set(predictions["predicted_phase"]) <= set(CLASS_NAMES)


@pytest.mark.slow
def test_a_metadata_only_search_runs_without_image_steps(tmp_path):
    from pipelines.cli import main

    data = tmp_path / "data"
    generate_synthetic_dataset(data, patients=10, seed=4, image_scale=0.05)
    out = tmp_path / "out"
    arguments = ["search", "--data", str(data), "--out", str(out), "--combinations", "metadata"]
    assert main([*arguments, "--bootstrap", "50", "--set", "cv_folds=2", "rf_n_estimators=20"]) == 0
    summary = json.loads((out / "search.json").read_text())
    assert summary["combinations"] == ["metadata"]
    # The ensemble and the nested choice of one combination are that combination.
    rows = summary["rows"]
    for name in ("ensemble", "nested choice"):
        assert rows[name]["mean"]["per_visit"] == rows["metadata"]["mean"]["per_visit"]
        assert rows[name]["paired"]["mean"]["quadratic_kappa"] == 0
    log = (out / "logs" / "pipeline.log").read_text()
    assert _executed(log, "pretrain-shared-encoder") == _executed(log, "fuse-combination") == 0
    manifest = json.loads((out / "final_model" / "manifest.json").read_text())
    assert manifest["kind"] == "combination" and manifest["members"] == ["metadata"]
    assert "model.keras" not in manifest["files"] and CLINICAL_MODEL_FILE in manifest["files"]


def test_a_modality_missing_from_the_data_fails_before_anything_trains(tmp_path, capsys):
    from pipelines.cli import main

    data = tmp_path / "data"
    generate_synthetic_dataset(data, patients=6, seed=5, image_scale=0.05)
    shutil.rmtree(data / MODALITY_FOLDERS["depth_map"])
    out = tmp_path / "out"
    code = main(
        [
            "search",
            "--data",
            str(data),
            "--out",
            str(out),
            "--combinations",
            "metadata+depth_map",
            "--set",
            *FAST,
        ]
    )
    error = capsys.readouterr().err
    assert code == 2
    assert "depth_map" in error and MODALITY_FOLDERS["depth_map"] in error
    log = (out / "logs" / "pipeline.log").read_text()
    for step in ("clinical-forest", "pretrain-shared-encoder", "fuse-combination"):
        assert _executed(log, step) == 0


def test_a_bad_combination_is_one_error_line(capsys):
    from pipelines.cli import main

    assert main(["search", "--combinations", "metadata+depth"]) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("error: combination 'metadata+depth': unknown modality 'depth'")
    assert main(["search"]) == 2
    assert "--combinations" in capsys.readouterr().err
