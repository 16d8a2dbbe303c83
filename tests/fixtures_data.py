"""Session-wide synthetic datasets for the training tests (registered in conftest.py).

One small synthetic dataset with a real class signal is generated and prepared once per test
session (24 patients, 32 px crops), so every training test shares the same few seconds of setup.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import numpy as np
import pytest

# Before anything imports TensorFlow/Keras.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")

SYNTH_PATIENTS = 24
SYNTH_SEED = 1
SYNTH_IMAGE_SCALE = 0.2
SYNTH_IMAGE_SIZE = 32
REPO = Path(__file__).resolve().parents[1]
REAL_DEV = REPO.parent / "shared" / "data" / "dfu_real_dev"


@pytest.fixture(scope="session")
def synthetic_dir(tmp_path_factory) -> Path:
    """A generated synthetic dataset folder (study layout) with the generator's default signals."""
    from dfu_ml.data.synthetic import generate_synthetic_dataset

    out = tmp_path_factory.mktemp("synthetic") / "dataset"
    generate_synthetic_dataset(
        out, patients=SYNTH_PATIENTS, seed=SYNTH_SEED, image_scale=SYNTH_IMAGE_SCALE
    )
    return out


@pytest.fixture(scope="session")
def prepared_synthetic(synthetic_dir):
    """The synthetic dataset prepared at 32 px with the default crop margins (read-only: copy
    before changing it)."""
    from dfu_ml.config import Config
    from dfu_ml.data.prepare import prepare_dataset

    return prepare_dataset(
        synthetic_dir, image_size=SYNTH_IMAGE_SIZE, crop_margins=Config().crop_margins
    )


def with_permuted_labels(dataset, seed: int):
    """A copy of a prepared dataset whose visit labels are randomly permuted (no signal left)."""
    visits = dataset.visits.copy()
    labels = visits["label"].to_numpy().copy()
    visits["label"] = np.random.default_rng(seed).permutation(labels)
    return dataclasses.replace(dataset, visits=visits)


def smoke_config(*overrides: str):
    """The smoke profile with overrides."""
    from dfu_ml.config import load_config

    return load_config("smoke", list(overrides))
