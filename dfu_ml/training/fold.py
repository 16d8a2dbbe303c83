"""One fold of the staged training, as building blocks the pipeline steps call one at a time.

Rows: with image modalities, one training row per image set that has every selected modality;
metadata-only, one row per visit. Folds are drawn over visits (grouped by patient, stratified),
so a metadata-only run and a fusion run with the same seed validate on the same patients.
``fold = -1`` is the final fit: every (sampled) patient trains, nothing validates.

Keras (and its backend) is imported only by the functions that build model inputs or train, so
the steps that only plan folds or fit the clinical model start without TensorFlow.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from dfu_ml.config import Config
from dfu_ml.data.prepare import PreparedDataset
from dfu_ml.data.schema import PATIENT_COLUMN
from dfu_ml.errors import DataError
from dfu_ml.folds import patient_folds, sample_patients
from dfu_ml.training.clinical_rf import ClinicalModelSpec, clinical_probabilities
from dfu_ml.training.metrics import evaluate_predictions
from dfu_ml.training.resampling import class_counts, focal_alpha, resample_indices

# Keras (TensorFlow: about 7 s of CPU to import) is imported only where a stage builds or trains
# a model: the split, forest and evaluation steps import this module too, each in its own process.
if TYPE_CHECKING:
    from dfu_ml.training.stages import StageData

FINAL_FIT = -1


def training_rows(
    dataset: PreparedDataset, config: Config, labelled_only: bool = True
) -> pd.DataFrame:
    """The rows a run trains and validates on: ``visit_index``, ``set_index``, ``patient``,
    ``label`` (-1 where unknown). ``labelled_only=False`` keeps unlabelled visits (prediction)."""
    visits = dataset.visits
    labelled = visits["label"].to_numpy() >= 0
    if not labelled_only:
        labelled = np.ones(len(visits), dtype=bool)
    if config.image_modalities:
        missing = [m for m in config.image_modalities if m not in dataset.images]
        if missing:
            raise DataError(
                f"the prepared dataset has no {missing} images; prepare it with those "
                "modalities or change 'modalities'"
            )
        sets = dataset.sets
        keep = np.ones(len(sets), dtype=bool)
        for m in config.image_modalities:
            keep &= sets[f"has_{m}"].to_numpy().astype(bool)
        keep &= labelled[sets["visit_index"].to_numpy()] if len(sets) else keep
        rows = pd.DataFrame(
            {"visit_index": sets["visit_index"].to_numpy()[keep], "set_index": np.flatnonzero(keep)}
        )
    else:
        rows = pd.DataFrame({"visit_index": np.flatnonzero(labelled), "set_index": -1})
    rows["patient"] = visits[PATIENT_COLUMN].to_numpy()[rows["visit_index"]]
    rows["label"] = visits["label"].to_numpy()[rows["visit_index"]]
    if rows.empty:
        raise DataError(
            f"no {'labelled ' if labelled_only else ''}rows remain for modalities "
            f"{config.modalities}; check the data report (images missing?)"
        )
    return rows.reset_index(drop=True)


def fold_patients(
    dataset: PreparedDataset, config: Config, fold: int, rows: pd.DataFrame | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """The fold's training and validation patients, drawn (and sampled by ``data_percentage``)
    over the visits that have ``config``'s rows; the final fit trains every sampled patient."""
    rows = training_rows(dataset, config) if rows is None else rows
    visits = dataset.visits
    visit_ids = np.unique(rows["visit_index"])
    visit_labels = visits["label"].to_numpy()[visit_ids]
    visit_patients = visits[PATIENT_COLUMN].to_numpy()[visit_ids]
    sampled = sample_patients(visit_labels, visit_patients, config.data_percentage, config.seed)
    visit_labels, visit_patients = visit_labels[sampled], visit_patients[sampled]
    if fold == FINAL_FIT:
        return np.unique(visit_patients), np.array([], dtype=int)
    if not 0 <= fold < config.cv_folds:
        raise DataError(
            f"fold {fold} is outside 0..{config.cv_folds - 1} (cv_folds="
            f"{config.cv_folds}); use -1 for the final fit"
        )
    splits = patient_folds(visit_labels, visit_patients, config.cv_folds, config.seed)
    train_idx, val_idx = splits[fold]
    return np.unique(visit_patients[train_idx]), np.unique(visit_patients[val_idx])


def plan_fold(
    dataset: PreparedDataset,
    config: Config,
    fold: int,
    patients: tuple[np.ndarray, np.ndarray] | None = None,
) -> dict:
    """Resampling and alpha for one fold (stage 1 of TRAINING.md), as a JSON-ready plan.

    ``patients`` (training, validation) fixes the split: a modality-combination search assigns
    patients once and plans every combination's rows from that split. By default the split is
    drawn over this configuration's own rows (:func:`fold_patients`). Its alphas are those of
    ``config``; each stage derives its own (:func:`stage_alpha`) from the plan's class counts and
    the stage's configuration, so one plan serves every variant of ``dfu-kfp diagnose``.
    """
    rows = training_rows(dataset, config)
    train_patients, val_patients = (
        fold_patients(dataset, config, fold, rows)
        if patients is None
        else (np.asarray(patients[0]), np.asarray(patients[1]))
    )
    train_rows = np.flatnonzero(rows["patient"].isin(train_patients).to_numpy())
    val_rows = np.flatnonzero(rows["patient"].isin(val_patients).to_numpy())
    labels = rows["label"].to_numpy()
    resampled = train_rows[
        # (seed, fold + 1): a distinct stream per fold, the final fit (-1) included, for any seed.
        resample_indices(labels[train_rows], config.resampling, (config.seed, fold + 1))
    ]
    counts = class_counts(labels[train_rows])
    return {
        "fold": fold,
        "modalities": config.modalities,
        "train_rows": train_rows.tolist(),
        "train_rows_resampled": resampled.tolist(),
        "val_rows": val_rows.tolist(),
        "train_patients": train_patients.tolist(),
        "val_patients": val_patients.tolist(),
        "alpha_fusion": focal_alpha(config.fusion_alpha, counts, config.alpha_max_ratio),
        "alpha_pretrain": focal_alpha(config.pretrain_alpha, counts, config.alpha_max_ratio),
        "class_counts_train": counts.tolist(),
        "class_counts_resampled": class_counts(labels[resampled]).tolist(),
        "class_counts_val": class_counts(labels[val_rows]).tolist(),
    }


def fusion_uses_clinical_model(config: Config) -> bool:
    """Whether a fusion model trains on the clinical model's training-row probabilities."""
    return config.uses_metadata and bool(config.image_modalities)


def fold_rf(dataset: PreparedDataset, config: Config, plan: dict, for_fusion: bool = False):
    """The clinical model for this fold: ``(proba, model)``, per-visit probabilities (validation
    visits from the model fitted on the training visits; training visits out-of-fold, only where
    a fusion trains on them: ``config``'s, or ``for_fusion``, the modality-combination search's
    metadata-only view that its fused combinations read) and that fitted model."""
    rows = training_rows(dataset, config)
    train_visits = rows["visit_index"].to_numpy()[plan["train_rows"]]
    val_visits = rows["visit_index"].to_numpy()[plan["val_rows"]]
    return clinical_probabilities(
        dataset.visits,
        train_visits,
        val_visits,
        ClinicalModelSpec.from_config(config),
        out_of_fold=for_fusion or fusion_uses_clinical_model(config),
    )


def model_inputs(
    dataset: PreparedDataset,
    config: Config,
    rows: pd.DataFrame,
    row_idx,
    rf_proba: np.ndarray | None,
    modalities=None,
) -> dict:
    """Model inputs for the given rows: images (raw [0, 255] as float32) and RF probabilities."""
    from dfu_ml.training import models

    row_idx = np.asarray(row_idx, dtype=int)
    inputs = {}
    set_idx = rows["set_index"].to_numpy()[row_idx]
    for m in config.image_modalities if modalities is None else modalities:
        inputs[models.image_input_name(m)] = dataset.images[m][set_idx].astype("float32")
    if rf_proba is not None and config.uses_metadata:
        inputs[models.RF_INPUT] = rf_proba[rows["visit_index"].to_numpy()[row_idx]].astype(
            "float32"
        )
    return inputs


def _labels(rows: pd.DataFrame, idx) -> np.ndarray:
    return rows["label"].to_numpy()[np.asarray(idx, dtype=int)]


def stage_data(dataset, config, plan, rf_proba, modalities=None) -> StageData:
    """A stage's arrays: resampled training rows and validation rows (none for the final fit)."""
    from dfu_ml.training.stages import StageData

    rows = training_rows(dataset, config)
    train, val = plan["train_rows_resampled"], plan["val_rows"]
    x_train = model_inputs(dataset, config, rows, train, rf_proba, modalities)
    if not val:
        return StageData(x_train, _labels(rows, train))
    x_val = model_inputs(dataset, config, rows, val, rf_proba, modalities)
    return StageData(x_train, _labels(rows, train), x_val, _labels(rows, val))


def stage_alpha(plan: dict, config: Config, stage: str) -> list[float]:
    """The focal alpha of ``stage`` (``pretrain`` or ``fusion``): ``config``'s setting for it
    (``pretrain_alpha``, RC1; ``fusion_alpha``, RC2) over the plan's training class counts."""
    setting = config.pretrain_alpha if stage == "pretrain" else config.fusion_alpha
    return focal_alpha(setting, plan["class_counts_train"], config.alpha_max_ratio)


def run_pretrain(
    dataset, config, plan, modality, out_dir: Path | None = None, epochs=None, log=print
):
    from dfu_ml.training import models
    from dfu_ml.training.stages import encoder_of, pretrain_image_encoder

    data = stage_data(dataset, config, plan, None, [modality])
    alpha = stage_alpha(plan, config, "pretrain")
    result = pretrain_image_encoder(modality, data, config, alpha, epochs, log)
    if out_dir is not None:
        models.save_encoder(
            encoder_of(result.model, modality),
            out_dir,
            {
                "modality": modality,
                "image_size": config.image_size,
                "backbone": config.backbone,
                "feature_dim": config.feature_dim,
                "fold": plan["fold"],
                "summary": result.summary(),
            },
        )
        models.save_output_layer(result.model, out_dir)
    return result


def run_stage1(dataset, config, plan, rf_proba, encoder_dirs: dict, epochs=None, log=print):
    from dfu_ml.training.stages import train_stage1

    data = stage_data(dataset, config, plan, rf_proba)
    return train_stage1(
        data, config, stage_alpha(plan, config, "fusion"), encoder_dirs, epochs, log
    )


def run_stage2(dataset, config, plan, rf_proba, stage1, epochs=None, log=print):
    from dfu_ml.training.stages import train_stage2

    data = stage_data(dataset, config, plan, rf_proba)
    return train_stage2(stage1, data, config, stage_alpha(plan, config, "fusion"), epochs, log)


def fold_predictions(dataset, config, plan, rf_proba, proba=None) -> dict:
    """The fold's validation predictions with metrics per image-set row and per visit: ``proba``
    (the final model's, in validation-row order, e.g. ``StageResult.val_proba``) or, for
    metadata-only runs, the random forest's."""
    rows = training_rows(dataset, config)
    val = np.asarray(plan["val_rows"], dtype=int)
    if proba is None:
        proba = rf_proba[rows["visit_index"].to_numpy()[val]]
    visit_index = rows["visit_index"].to_numpy()[val]
    labels = _labels(rows, val)
    return {
        "visit_index": visit_index.tolist(),
        "labels": labels.tolist(),
        "proba": np.asarray(proba).tolist(),
        "metrics": evaluate_predictions(visit_index, labels, proba),
    }


def run_fold(dataset: PreparedDataset, config: Config, fold: int, workdir: Path, log=print) -> dict:
    """Every stage of one fold in this process (tests and notebooks; the pipeline runs the same
    blocks as separate steps). Returns stage summaries and the fold's predictions."""
    workdir = Path(workdir)
    plan = plan_fold(dataset, config, fold)
    rf_proba, _ = fold_rf(dataset, config, plan)
    out = {
        "fold": fold,
        "plan": {k: plan[k] for k in ("alpha_fusion", "alpha_pretrain", "class_counts_train")},
        "pretrain": {},
    }
    if not config.image_modalities:
        out.update(fold_predictions(dataset, config, plan, rf_proba))
        return out
    encoder_dirs = {}
    for modality in config.image_modalities:
        encoder_dirs[modality] = workdir / f"fold{fold}_{modality}_encoder"
        out["pretrain"][modality] = run_pretrain(
            dataset, config, plan, modality, encoder_dirs[modality], log=log
        ).summary()
    stage1 = run_stage1(dataset, config, plan, rf_proba, encoder_dirs, log=log)
    out["stage1"] = stage1.summary()
    stage2 = run_stage2(dataset, config, plan, rf_proba, stage1, log=log)
    out["stage2"] = stage2.summary()
    out.update(fold_predictions(dataset, config, plan, rf_proba, stage2.val_proba))
    return out
