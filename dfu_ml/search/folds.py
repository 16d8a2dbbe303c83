"""The shared fold plan of a modality-combination search.

A single run draws its folds over its own rows: an image run over the visits that have every
selected modality. Combinations trained that way would validate on different patients and their
figures could not be paired. A search therefore assigns **patients once per fold**, over every
labelled visit (the clinical rows), and plans every **view** from that split:

- the clinical view (``metadata``): the clinical model is fitted once per fold, on the training
  patients' visits, and is also the metadata-only combination;
- one view per image modality: its encoder is pre-trained once per fold on the training patients'
  image sets that have that modality, and every combination containing it reuses it;
- one view per image combination: Stage 1 and Stage 2 train on the image sets that have every
  modality of the combination, of the same training patients, and validate on the same
  validation patients.

``data_percentage`` samples patients once too (over the clinical rows). Each view's plan is the
ordinary fold plan of :func:`dfu_ml.training.fold.plan_fold` for that view's configuration, so the
training steps read it exactly as in a single run.
"""

from __future__ import annotations

import numpy as np

from dfu_ml.config import Config
from dfu_ml.data.prepare import PreparedDataset
from dfu_ml.data.schema import MODALITY_FOLDERS, PATIENT_COLUMN
from dfu_ml.errors import DataError, FoldError
from dfu_ml.search import (
    BASELINE,
    image_combinations,
    parse_combination,
    pretrain_modalities,
    view_config,
)
from dfu_ml.training.fold import FINAL_FIT, fold_patients, plan_fold


def views(combinations) -> list[str]:
    """Every view a search plans per fold: the clinical one, each modality, each combination."""
    ordered = [BASELINE, *pretrain_modalities(combinations), *image_combinations(combinations)]
    return list(dict.fromkeys(ordered))


def check_combinations_against_data(dataset: PreparedDataset, combinations) -> None:
    """Raise DataError, naming the combinations and the modality, when the prepared data has no
    labelled image set with a modality some combination needs (before anything trains)."""
    labelled = dataset.visits["label"].to_numpy() >= 0
    sets = dataset.sets
    for modality in pretrain_modalities(combinations):
        needing = [c for c in combinations if modality in parse_combination(c)]
        column = f"has_{modality}"
        usable = 0
        if modality in dataset.images and column in sets and len(sets):
            has = sets[column].to_numpy().astype(bool)
            usable = int((has & labelled[sets["visit_index"].to_numpy()]).sum())
        if not usable:
            raise DataError(
                f"combination {', '.join(needing)} needs {modality} images, but the data has "
                f"no labelled image set with one (folder {MODALITY_FOLDERS[modality]}/ missing "
                "or empty, or every image skipped); add the images or drop those combinations"
            )


def split_fold(dataset: PreparedDataset, config: Config, fold: int, combinations) -> dict:
    """One fold's shared plan: the patients, and every view's fold plan from that split.

    Returns ``{"fold", "train_patients", "val_patients", "val_visit_patient", "views"}``;
    ``views`` maps each view (see :func:`views`) to its fold plan.
    """
    check_combinations_against_data(dataset, combinations)
    train_patients, val_patients = fold_patients(dataset, view_config(config, BASELINE), fold)
    plans = {}
    for view in views(combinations):
        plan = plan_fold(dataset, view_config(config, view), fold, (train_patients, val_patients))
        if not plan["train_rows"] or (fold != FINAL_FIT and not plan["val_rows"]):
            side = "training" if not plan["train_rows"] else "validation"
            raise FoldError(
                f"fold {fold}: {view} has no {side} rows (none of that side's patients has an "
                f"image set with {', '.join(parse_combination(view))}); use fewer folds "
                "(cv_folds), more data (data_percentage) or drop the combination"
            )
        plans[view] = plan
    visits = dataset.visits
    val_visits = np.flatnonzero(
        visits[PATIENT_COLUMN].isin(val_patients).to_numpy() & (visits["label"].to_numpy() >= 0)
    )
    return {
        "fold": fold,
        "train_patients": np.asarray(train_patients).tolist(),
        "val_patients": np.asarray(val_patients).tolist(),
        # Which patient each validation visit belongs to: the paired bootstrap resamples patients.
        "val_visit_patient": {
            str(v): int(p)
            for v, p in zip(val_visits, visits[PATIENT_COLUMN].to_numpy()[val_visits])
        },
        "views": plans,
    }
