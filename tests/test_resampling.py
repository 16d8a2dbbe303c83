"""Resampling of training rows and focal-loss alpha (TRAINING.md, stage 1 and RC2)."""

import numpy as np
import pytest

from dfu_ml.config import load_config
from dfu_ml.training.fold import plan_fold, training_rows
from dfu_ml.training.resampling import (
    EQUAL_ALPHA,
    class_counts,
    compute_focal_alpha,
    resample_indices,
)

# The study's training counts (I, P, R) and its published alphas.
STUDY_COUNTS = (157, 302, 45)
STUDY_UNCAPPED = [0.599, 0.311, 2.090]
STUDY_CAPPED = [0.974, 0.506, 1.519]


def labels_from_counts(counts, seed=0):
    labels = np.concatenate([np.full(n, c) for c, n in enumerate(counts)])
    return np.random.default_rng(seed).permutation(labels)


def test_study_alphas_uncapped():
    alpha = compute_focal_alpha(labels_from_counts(STUDY_COUNTS), max_ratio=None)
    np.testing.assert_allclose(alpha, STUDY_UNCAPPED, atol=1e-3)
    assert sum(alpha) == pytest.approx(3.0)
    assert max(alpha) / min(alpha) > 6  # the uncapped, pre-fix ratio that collapsed training


def test_study_alphas_capped():
    alpha = compute_focal_alpha(labels_from_counts(STUDY_COUNTS), max_ratio=3.0)
    np.testing.assert_allclose(alpha, STUDY_CAPPED, atol=1e-3)
    assert sum(alpha) == pytest.approx(3.0)
    assert max(alpha) / min(alpha) <= 3.0 + 1e-9
    # The order of the classes is kept: the rarest class still weighs most.
    assert np.argsort(alpha).tolist() == np.argsort(STUDY_UNCAPPED).tolist()


def test_default_cap_is_three():
    labels = labels_from_counts(STUDY_COUNTS)
    assert compute_focal_alpha(labels) == compute_focal_alpha(labels, 3.0)
    assert load_config().alpha_max_ratio == 3.0


@pytest.mark.parametrize("ratio", [1.0, 1.5, 2.0, 5.0])
def test_cap_is_configurable(ratio):
    alpha = compute_focal_alpha(labels_from_counts(STUDY_COUNTS), max_ratio=ratio)
    assert sum(alpha) == pytest.approx(3.0)
    assert max(alpha) / min(alpha) == pytest.approx(min(ratio, 2.090 / 0.311), rel=1e-2)
    if ratio == 1.0:
        np.testing.assert_allclose(alpha, EQUAL_ALPHA)


def test_cap_not_binding_leaves_alphas_uncapped():
    labels = labels_from_counts((100, 120, 80))
    assert compute_focal_alpha(labels, 3.0) == pytest.approx(compute_focal_alpha(labels, None))


def test_alpha_needs_every_class():
    with pytest.raises(ValueError, match="class"):
        compute_focal_alpha(np.array([0, 0, 1, 1]))


def test_alpha_max_ratio_reaches_the_plan(prepared_synthetic):
    """plan_fold computes alphas from the fold's (original, not resampled) training rows with the
    configured cap; pre-training uses [1, 1, 1] by default."""
    for ratio in (1.5, 3.0):
        config = load_config("smoke", [f"alpha_max_ratio={ratio}"])
        plan = plan_fold(prepared_synthetic, config, 0)
        alpha = plan["alpha_fusion"]
        assert sum(alpha) == pytest.approx(3.0)
        assert max(alpha) / min(alpha) <= ratio + 1e-9
        rows = training_rows(prepared_synthetic, config)
        expected = compute_focal_alpha(rows["label"].to_numpy()[plan["train_rows"]], ratio)
        assert alpha == pytest.approx(expected)
        assert plan["alpha_pretrain"] == EQUAL_ALPHA


# ----------------------------------------------------------------------------------- resampling


@pytest.mark.parametrize(
    "strategy, expected",
    [
        ("none", [157, 302, 45]),
        ("random", [302, 302, 302]),  # every class up to the largest count
        ("combined", [157, 157, 157]),  # largest down to the middle count, smallest up to it
    ],
)
def test_strategy_counts_study(strategy, expected):
    labels = labels_from_counts(STUDY_COUNTS)
    idx = resample_indices(labels, strategy, seed=0)
    assert class_counts(labels[idx]).tolist() == expected


def test_combined_counts_when_middle_class_is_not_first():
    # P is the smallest here, R the largest: the middle count is I's.
    labels = labels_from_counts((80, 30, 200))
    idx = resample_indices(labels, "combined", seed=3)
    assert class_counts(labels[idx]).tolist() == [80, 80, 80]


def test_none_keeps_every_row_once():
    labels = labels_from_counts(STUDY_COUNTS)
    assert resample_indices(labels, "none", seed=0).tolist() == list(range(len(labels)))


def test_oversampling_keeps_every_original_row_and_undersampling_has_no_repeats():
    labels = labels_from_counts(STUDY_COUNTS)
    idx = resample_indices(labels, "combined", seed=0)
    rare = np.flatnonzero(labels == 2)
    assert set(rare) <= set(idx.tolist())  # every R row kept, then copies added
    common = idx[labels[idx] == 1]
    assert len(np.unique(common)) == len(common)  # P undersampled without replacement
    idx = resample_indices(labels, "random", seed=0)
    assert set(range(len(labels))) == set(idx.tolist())


def test_resampling_is_seeded():
    labels = labels_from_counts(STUDY_COUNTS)
    a = resample_indices(labels, "combined", seed=7)
    b = resample_indices(labels, "combined", seed=7)
    c = resample_indices(labels, "combined", seed=8)
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)


def test_unknown_strategy():
    with pytest.raises(ValueError, match="strategy"):
        resample_indices(np.array([0, 1, 2]), "smote", seed=0)


@pytest.mark.parametrize("strategy", ["none", "random", "combined"])
def test_plan_resamples_training_rows_only(prepared_synthetic, strategy):
    """Resampled rows come only from the fold's training rows (never a validation row), the counts
    follow the strategy, and the plan is the same for the same seed."""
    config = load_config("smoke", [f"resampling={strategy}"])
    for fold in range(config.cv_folds):
        plan = plan_fold(prepared_synthetic, config, fold)
        train, val = set(plan["train_rows"]), set(plan["val_rows"])
        assert train and val and not train & val
        assert set(plan["train_rows_resampled"]) <= train
        assert not set(plan["train_rows_resampled"]) & val
        assert not set(plan["train_patients"]) & set(plan["val_patients"])
        counts = plan["class_counts_train"]
        resampled = plan["class_counts_resampled"]
        if strategy == "none":
            assert resampled == counts
            assert sorted(plan["train_rows_resampled"]) == sorted(plan["train_rows"])
        elif strategy == "random":
            assert resampled == [max(counts)] * 3
        else:
            assert resampled == [sorted(counts)[1]] * 3
    again = plan_fold(prepared_synthetic, config, 0)
    assert again == plan_fold(prepared_synthetic, config, 0)


@pytest.mark.parametrize("seed", [0, 1, 42])
def test_every_fold_and_the_final_fit_resample_for_any_seed(prepared_synthetic, seed):
    """The final fit is fold -1: a resampling seed of ``seed + fold`` was -1 for seed 0."""
    config = load_config("smoke", ["modalities=metadata,depth_rgb", f"seed={seed}"])
    plans = {fold: plan_fold(prepared_synthetic, config, fold) for fold in (-1, 0, 1)}
    final = plans[-1]
    assert not final["val_rows"] and set(final["train_rows_resampled"]) <= set(final["train_rows"])
    streams = [tuple(p["train_rows_resampled"]) for p in plans.values()]
    assert all(len(s) > 0 for s in streams) and len(set(streams)) == len(streams)
