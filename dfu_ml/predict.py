"""Predicting healing phases for new visits with a model bundle: one row per visit."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from dfu_ml.bundle import load_bundle
from dfu_ml.data import schema
from dfu_ml.data.prepare import prepare_dataset
from dfu_ml.training.clinical_rf import ClinicalForest
from dfu_ml.training.metrics import per_visit


def predict_folder(model_dir: Path, data_dir: Path) -> tuple[pd.DataFrame, dict | None]:
    """Probabilities and the predicted phase per visit; metrics too when labels are present."""
    from dfu_ml.training.fold import model_inputs, training_rows
    from dfu_ml.training.metrics import classification_metrics
    from dfu_ml.training.stages import predict_all

    bundle = load_bundle(model_dir)
    config = bundle.config
    dataset = prepare_dataset(
        data_dir,
        image_size=config.image_size,
        modalities=config.image_modalities,
        crop_margins=config.crop_margins,
        on_missing_image=config.on_missing_image,
        require_labels=False,
    )
    forest = ClinicalForest(bundle.transformer, bundle.forest)
    rf_proba = forest.predict_proba(dataset.visits)
    # Unlabelled visits are scored too: give them a placeholder label for row selection only.
    labelled = dataset.visits["label"].to_numpy() >= 0
    dataset.visits["label"] = np.where(labelled, dataset.visits["label"], 0)
    rows = training_rows(dataset, config)
    if bundle.model is None:
        proba = rf_proba[rows["visit_index"].to_numpy()]
    else:
        proba = predict_all(
            bundle.model, model_inputs(dataset, config, rows, np.arange(len(rows)), rf_proba), 256
        )
    visits, _, visit_proba = per_visit(
        rows["visit_index"].to_numpy(), rows["label"].to_numpy(), proba
    )
    table = dataset.visits.iloc[visits]
    out = pd.DataFrame(
        {
            "patient": table[schema.PATIENT_COLUMN].to_numpy(),
            "appointment": table[schema.APPT_COLUMN].to_numpy(),
            "ulcer": table[schema.DFU_COLUMN].to_numpy(),
            "image_sets": np.bincount(
                np.searchsorted(visits, rows["visit_index"].to_numpy()), minlength=len(visits)
            ),
            **{f"p_{name}": visit_proba[:, i] for i, name in enumerate(schema.CLASS_NAMES)},
            "predicted_phase": [schema.CLASS_NAMES[i] for i in visit_proba.argmax(1)],
            "predicted_phase_name": [schema.CLASS_LONG_NAMES[i] for i in visit_proba.argmax(1)],
        }
    )
    metrics = None
    true = np.where(labelled[visits], dataset.visits["label"].to_numpy()[visits], -1)
    if (true >= 0).any():
        out["true_phase"] = [schema.CLASS_NAMES[t] if t >= 0 else "" for t in true]
        known = true >= 0
        metrics = classification_metrics(true[known], visit_proba[known])
    return out, metrics
