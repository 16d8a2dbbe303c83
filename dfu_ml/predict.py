"""Predicting healing phases for new visits with a model bundle: one row per visit."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pandas as pd

from dfu_ml.bundle import load_bundle, verify_bundle
from dfu_ml.data import schema
from dfu_ml.data.prepare import prepare_for_config
from dfu_ml.errors import DataError
from dfu_ml.features import unseen_category_values
from dfu_ml.training.metrics import per_visit


def _warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr, flush=True)


def predict_folder(
    model_dir: Path, data_dir: Path, expected_digest: str = "", warn=_warn
) -> tuple[pd.DataFrame, dict | None]:
    """Probabilities and the predicted phase per visit; metrics too when labels are present.

    The bundle is verified before anything in it is read (``dfu_ml.bundle.verify_bundle``),
    against ``expected_digest`` too when one is given. An ensemble bundle (a modality-combination
    search's, whose manifest pins every member's files) averages its members' per-visit
    probabilities; the data is prepared once, for every modality a member uses. A text value
    outside its column's fixed category list is read as missing, and ``warn`` gets one line
    naming the column and the value.
    """
    from dfu_ml.search.compare import VisitPredictions, average_predictions
    from dfu_ml.search.final import bundle_members
    from dfu_ml.training.metrics import classification_metrics

    members = bundle_members(model_dir)  # reads the manifest only: nothing that runs code
    if members != [Path(model_dir)]:
        # The ensemble's manifest pins every member's files; each member checks its own too.
        verify_bundle(model_dir, expected_digest)
        expected_digest = ""
    bundles = [load_bundle(folder, expected_digest) for folder in members]
    sizes = {b.config.image_size for b in bundles}
    if len(sizes) > 1:
        raise DataError(f"{model_dir}: its members use different image sizes {sorted(sizes)}")
    modalities = list(dict.fromkeys(m for b in bundles for m in b.config.modalities))
    dataset = prepare_for_config(
        data_dir, bundles[0].config.replace(modalities=modalities), require_labels=False
    )
    said: set[str] = set()

    def warn_once(message: str) -> None:  # an ensemble's members share the clinical columns
        if message not in said:
            said.add(message)
            warn(message)

    scored = [_visit_probabilities(bundle, dataset, warn_once) for bundle in bundles]
    averaged = average_predictions([VisitPredictions(v, t, p) for v, t, p, _ in scored])
    visits, true, visit_proba = averaged.visits, averaged.labels, averaged.proba
    # A visit's image sets: as many as the member that used the most of them scored.
    image_sets = (
        pd.concat([pd.Series(n, index=v) for v, _, _, n in scored])
        .groupby(level=0)
        .max()
        .reindex(visits)
        .to_numpy()
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


def _visit_probabilities(bundle, dataset, warn) -> tuple[np.ndarray, ...]:
    """One bundle's per-visit probabilities: visit indices, labels (-1 unknown), probabilities
    and image-set counts (see :func:`dfu_ml.training.metrics.per_visit`)."""
    from dfu_ml.training.fold import model_inputs, training_rows
    from dfu_ml.training.stages import predict_all

    config = bundle.config
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
        proba = predict_all(bundle.model, inputs, config.predict_batch_size)
    return per_visit(rows["visit_index"].to_numpy(), rows["label"].to_numpy(), proba)
