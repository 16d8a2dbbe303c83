"""``dfu-kfp predict`` with a metadata-only bundle: the same metrics as the pipeline computed for
the same visits, the fitted feature pipeline inside the bundle, and a warning for each unseen
category value."""

import csv
import hashlib
import json

import pytest
from csv_helpers import csv_rows
from fixtures_data import smoke_config

from components.clinical_rf import run_clinical_rf
from components.common import PLAN_FILE, write_json
from components.evaluate import run_evaluate
from dfu_ml.bundle import CLINICAL_MODEL_FILE, assemble_bundle, load_bundle
from dfu_ml.data import schema
from dfu_ml.data.prepare import prepare_for_config, save_prepared
from dfu_ml.predict import predict_folder
from dfu_ml.training.fold import plan_fold
from pipelines.cli import main as cli_main

HEADLINE = ("quadratic_kappa", "accuracy", "macro_f1")


def _write_clinical(source, target, keep, change=None) -> None:
    """The clinical CSV of ``source`` with only the rows ``keep(row)`` accepts."""
    target.mkdir(parents=True, exist_ok=True)
    header, rows = csv_rows(source / schema.CLINICAL_CSV)
    with open(target / schema.CLINICAL_CSV, "w", newline="", encoding="utf-8-sig") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        for row in filter(keep, rows):
            writer.writerow([(change or (lambda r: r))(dict(row))[c] for c in header])


@pytest.fixture(scope="module")
def fold_bundle(synthetic_dir, tmp_path_factory):
    """Fold 0 of a metadata-only run through the real steps, bundled as the final model would
    be, and a labelled folder holding exactly that fold's validation patients."""
    root = tmp_path_factory.mktemp("predict")
    config = smoke_config("modalities=metadata", "rf_n_estimators=40")
    dataset = prepare_for_config(synthetic_dir, config)
    save_prepared(dataset, root / "prepared")
    plan = plan_fold(dataset, config, 0)
    write_json(root / "plan" / PLAN_FILE, plan)
    result = run_clinical_rf(root / "prepared", root / "plan", config, root / "rf")
    run_evaluate([root / "rf"], config, root / "summary")
    assemble_bundle(root / "bundle", config, root / "rf", root / "summary", None)
    validation = set(plan["val_patients"])
    _write_clinical(
        synthetic_dir, root / "val", lambda r: int(r[schema.PATIENT_COLUMN]) in validation
    )
    return root, result, validation


def test_predict_prints_the_pipelines_metrics_for_the_same_visits(fold_bundle, capsys):
    root, result, _ = fold_bundle
    expected = result["metrics"]["per_visit"]
    table, metrics = predict_folder(root / "bundle", root / "val")
    assert len(table) == len(result["visit_index"])
    for key in HEADLINE:
        assert metrics[key] == expected[key], key
    assert metrics["confusion_matrix"] == expected["confusion_matrix"]

    code = cli_main(
        ["predict", "--model", str(root / "bundle"), "--data", str(root / "val"), "--out",
         str(root / "pred.csv")]
    )  # fmt: skip
    assert code == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed == {key: expected[key] for key in HEADLINE}


def test_the_bundle_holds_one_fitted_feature_pipeline(fold_bundle):
    root, _, _ = fold_bundle
    names = {p.name for p in (root / "bundle").iterdir()}
    assert CLINICAL_MODEL_FILE in names
    assert not names & {"forest.joblib", "transformer.json"}
    bundle = load_bundle(root / "bundle")  # verifies every file against the manifest first
    # The pickled pipeline is one of the files the manifest pins with its SHA-256.
    entry = bundle.manifest["files"][CLINICAL_MODEL_FILE]
    assert (
        entry["sha256"]
        == hashlib.sha256((root / "bundle" / CLINICAL_MODEL_FILE).read_bytes()).hexdigest()
    )
    model = bundle.clinical_model
    features = model.pipeline.named_steps["features"]
    assert features.named_steps["encode"].transformers_  # fitted
    assert "Dressing Grouped" not in model.columns_used and schema.WOUND_TEMP in model.columns_used


def test_predict_warns_once_per_unseen_category_value(fold_bundle, synthetic_dir):
    root, _, validation = fold_bundle

    def odd_sex(row):
        if row[schema.APPT_COLUMN] == "0":
            row[schema.SEX] = "Unknown"
        return row

    folder = root / "val_unseen"
    keep = lambda r: int(r[schema.PATIENT_COLUMN]) in validation
    _write_clinical(synthetic_dir, folder, keep, odd_sex)
    warnings = []
    table, _ = predict_folder(root / "bundle", folder, warn=warnings.append)
    assert len(warnings) == 1
    assert schema.SEX in warnings[0] and "'Unknown'" in warnings[0] and "missing" in warnings[0]
    assert len(table) > 0
    warnings.clear()
    predict_folder(root / "bundle", root / "val", warn=warnings.append)
    assert warnings == []
