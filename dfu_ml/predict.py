"""Predicting healing phases for new visits with a model bundle: one row per visit."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pandas as pd

from dfu_ml.bundle import load_bundle
from dfu_ml.data import schema
from dfu_ml.data.prepare import prepare_for_config
from dfu_ml.features import unseen_category_values
from dfu_ml.training.metrics import per_visit


def _warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr, flush=True)


def predict_folder(
    model_dir: Path, data_dir: Path, expected_digest: str = "", warn=_warn
) -> tuple[pd.DataFrame, dict | None]:
    """Probabilities and the predicted phase per visit; metrics too when labels are present.

    The bundle is verified before it is loaded (``dfu_ml.bundle.verify_bundle``), against
    ``expected_digest`` too when one is given. A text value outside its column's fixed category
    list is read as missing, and ``warn`` gets one line naming the column and the value."""
    from dfu_ml.training.fold import model_inputs, training_rows
    from dfu_ml.training.metrics import classification_metrics
    from dfu_ml.training.stages import predict_all

    bundle = load_bundle(model_dir, expected_digest)
    config = bundle.config
    dataset = prepare_for_config(data_dir, config, require_labels=False)
    clinical = bundle.clinical_model
    for column, value, count in unseen_category_values(dataset.visits, clinical.categories):
        warn(
            f"column {column!r}: value {value!r} ({count} visit(s)) is not one of the known "
            "categories; the model reads it as missing"
        )
    rf_proba = clinical.predict_proba(dataset.visits)
    # Unlabelled visits are scored too (label -1).
    rows = training_rows(dataset, config, labelled_only=False)
    if bundle.model is None:
        proba = rf_proba[rows["visit_index"].to_numpy()]
    else:
        inputs = model_inputs(dataset, config, rows, np.arange(len(rows)), rf_proba)
        proba = predict_all(bundle.model, inputs, 256)
    visits, true, visit_proba, image_sets = per_visit(
        rows["visit_index"].to_numpy(), rows["label"].to_numpy(), proba
    )
    table = dataset.visits.iloc[visits]
    out = pd.DataFrame(
        {
            "patient": table[schema.PATIENT_COLUMN].to_numpy(),
            "appointment": table[schema.APPT_COLUMN].to_numpy(),
            "ulcer": table[schema.DFU_COLUMN].to_numpy(),
            "image_sets": image_sets,
            **{f"p_{name}": visit_proba[:, i] for i, name in enumerate(schema.CLASS_NAMES)},
            "predicted_phase": [schema.CLASS_NAMES[i] for i in visit_proba.argmax(1)],
            "predicted_phase_name": [schema.CLASS_LONG_NAMES[i] for i in visit_proba.argmax(1)],
        }
    )
    metrics = None
    known = true >= 0
    if known.any():
        out["true_phase"] = [schema.CLASS_NAMES[t] if t >= 0 else "" for t in true]
        metrics = classification_metrics(true[known], visit_proba[known])
    return out, metrics
