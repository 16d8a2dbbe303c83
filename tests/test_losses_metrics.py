"""Focal loss, quadratic kappa and the whole-validation-set kappa callback."""

import keras
import numpy as np
import pytest
from keras import layers, ops
from sklearn.metrics import cohen_kappa_score

from dfu_ml.training.metrics import (
    KAPPA,
    classification_metrics,
    evaluate_predictions,
    quadratic_kappa,
)
from dfu_ml.training.stages import ValidationKappa, one_hot, predict_all


def focal_by_hand(y_true_idx, proba, alpha, gamma):
    proba = np.asarray(proba, "float64")
    proba = proba / proba.sum(axis=1, keepdims=True)
    proba = np.clip(proba, 1e-7, 1 - 1e-7)
    p_true = proba[np.arange(len(y_true_idx)), y_true_idx]
    a = np.asarray(alpha)[y_true_idx]
    return float(np.mean(-a * (1 - p_true) ** gamma * np.log(p_true)))


@pytest.mark.parametrize("alpha", [[1.0, 1.0, 1.0], [0.974, 0.506, 1.519], [0.599, 0.311, 2.090]])
@pytest.mark.parametrize("gamma", [0.0, 2.0])
def test_focal_loss_matches_hand_computation(alpha, gamma):
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, 50)
    proba = rng.dirichlet([1, 1, 1], size=50).astype("float32")
    # As the stages build it.
    loss = keras.losses.CategoricalFocalCrossentropy(alpha=list(alpha), gamma=gamma)
    value = float(ops.convert_to_numpy(loss(one_hot(labels), proba)))
    assert value == pytest.approx(focal_by_hand(labels, proba, alpha, gamma), rel=1e-4)


def test_focal_alpha_is_per_class():
    """Two rows with the same confidence in their true class weigh alpha[c] each: the alpha list is
    applied per class, not as one scalar."""
    alpha = [0.5, 1.0, 2.0]
    loss = keras.losses.CategoricalFocalCrossentropy(alpha=alpha, gamma=2.0)
    p = np.array([[0.6, 0.3, 0.1]], "float32")
    rare = np.array([[0.3, 0.1, 0.6]], "float32")
    l_i = float(ops.convert_to_numpy(loss(one_hot([0]), p)))
    l_r = float(ops.convert_to_numpy(loss(one_hot([2]), rare)))
    assert l_r / l_i == pytest.approx(alpha[2] / alpha[0], rel=1e-5)


# -------------------------------------------------------------------------------------- kappa


def test_quadratic_kappa_equals_sklearn():
    rng = np.random.default_rng(1)
    for trial in range(200):
        n = int(rng.integers(2, 60))
        y = rng.integers(0, 3, n)
        # Mix of random, partly right and two-class predictions.
        pred = np.where(rng.random(n) < trial / 200, y, rng.integers(0, 3, n))
        if trial % 5 == 0:
            pred = np.minimum(pred, 1)
        if len(np.unique(np.concatenate([y, pred]))) < 2:
            continue
        expected = cohen_kappa_score(y, pred, weights="quadratic", labels=[0, 1, 2])
        assert quadratic_kappa(y, pred) == pytest.approx(expected, abs=1e-12)


def test_quadratic_kappa_is_quadratic_not_unweighted():
    y = np.array([0, 0, 1, 1, 2, 2, 0, 1, 2, 2])
    pred = np.array([1, 0, 1, 2, 2, 1, 0, 1, 2, 0])
    assert quadratic_kappa(y, pred) != pytest.approx(cohen_kappa_score(y, pred))
    assert quadratic_kappa(y, pred) == pytest.approx(
        cohen_kappa_score(y, pred, weights="quadratic")
    )


def test_quadratic_kappa_degenerate_cases():
    assert quadratic_kappa([1, 1, 1], [1, 1, 1]) == 0.0  # sklearn: nan
    assert (
        quadratic_kappa([0, 1, 2], [1, 1, 1]) == 0.0
    )  # one predicted class: no agreement beyond chance
    assert np.isnan(quadratic_kappa([], []))
    assert quadratic_kappa([0, 1, 2, 2], [0, 1, 2, 2]) == pytest.approx(1.0)


def test_classification_metrics_and_per_visit():
    y = np.array([0, 0, 1, 1, 2, 2])
    proba = np.array(
        [
            [0.8, 0.1, 0.1],
            [0.2, 0.7, 0.1],
            [0.1, 0.8, 0.1],
            [0.1, 0.6, 0.3],
            [0.1, 0.2, 0.7],
            [0.5, 0.4, 0.1],
        ]
    )
    m = classification_metrics(y, proba)
    pred = proba.argmax(1)
    assert m["quadratic_kappa"] == pytest.approx(cohen_kappa_score(y, pred, weights="quadratic"))
    assert m["accuracy"] == pytest.approx((pred == y).mean())
    assert m["rows"] == 6 and m["predicted_classes"] == 3
    assert np.array(m["confusion_matrix"]).sum() == 6
    # Two image sets per visit: the visit's probabilities are averaged.
    visits = np.array([10, 10, 11, 11, 12, 12])
    labels = np.array([0, 0, 1, 1, 2, 2])
    out = evaluate_predictions(visits, labels, proba)
    assert out["per_visit"]["rows"] == 3
    assert out["per_row"]["rows"] == 6


# ------------------------------------------------------------------ whole-validation-set kappa


@keras.saving.register_keras_serializable(package="dfu_kfp_tests")
class RowCounter(layers.Layer):
    """Counts the rows it sees at inference (training=False)."""

    def build(self, input_shape):
        self.seen = self.add_weight(name="seen", shape=(), initializer="zeros", trainable=False)

    def call(self, x, training=None):
        if not training:
            self.seen.assign_add(ops.cast(ops.shape(x)[0], self.seen.dtype))
        return x


def tiny_model(features: int) -> keras.Model:
    inputs = keras.Input((features,), name="x")
    x = RowCounter(name="counter")(inputs)
    x = layers.Dense(8, activation="relu")(x)
    outputs = layers.Dense(3, activation="softmax")(x)
    return keras.Model({"x": inputs}, outputs)


class Checker(keras.callbacks.Callback):
    """Runs after ValidationKappa: recomputes the kappa over every validation row and records
    how many rows ValidationKappa scored this epoch."""

    def __init__(self, x_val, y_val):
        super().__init__()
        self.x_val, self.y_val = x_val, y_val
        self.records, self.last = [], 0.0

    def _seen(self):
        return float(ops.convert_to_numpy(self.model.get_layer("counter").seen))

    def on_epoch_end(self, epoch, logs=None):
        scored = self._seen() - self.last
        proba = self.model.predict(self.x_val, batch_size=1000, verbose=0)
        self.records.append(
            {
                "logged": logs[KAPPA],
                "scored": scored,
                "expected": quadratic_kappa(self.y_val, proba.argmax(1)),
                "accuracy": float((proba.argmax(1) == self.y_val).mean()),
                "logged_accuracy": logs["val_accuracy"],
            }
        )
        self.last = self._seen()


def test_validation_kappa_is_over_the_whole_validation_set():
    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    n_train, n_val, batch = 120, 101, 16  # 101 is not a multiple of the batch size
    centres = rng.normal(size=(3, 6)) * 1.5
    y_train, y_val = rng.integers(0, 3, n_train), rng.integers(0, 3, n_val)
    x_train = {"x": (centres[y_train] + rng.normal(size=(n_train, 6))).astype("float32")}
    x_val = {"x": (centres[y_val] + rng.normal(size=(n_val, 6))).astype("float32")}
    model = tiny_model(6)
    model.compile(optimizer=keras.optimizers.Adam(0.01), loss="categorical_crossentropy")
    callback = ValidationKappa(
        x_val, y_val, batch_size=batch, stage="test", log=lambda m: None, epochs=4
    )
    checker = Checker(x_val, y_val)
    history = model.fit(
        x_train,
        one_hot(y_train),
        batch_size=batch,
        epochs=4,
        verbose=0,
        callbacks=[callback, checker],
    )
    assert callback.rows_scored == n_val
    assert len(checker.records) == 4
    # The model ran on the validation rows padded to equal batches (FixedBatches: less than one
    # batch of padding, dropped): every row was scored exactly once.
    padded = n_val + callback.rows.padding
    assert callback.rows.padding < batch and padded % callback.rows.batch == 0
    for r in checker.records:
        assert r["scored"] == padded
        assert r["logged"] == pytest.approx(r["expected"], abs=1e-12)
        assert r["logged_accuracy"] == pytest.approx(r["accuracy"])
    assert history.history[KAPPA] == pytest.approx([r["expected"] for r in checker.records])
    assert max(history.history[KAPPA]) > 0.3  # the model learned something


def test_predict_all_scores_every_row_once():
    keras.utils.set_random_seed(0)
    model = tiny_model(4)
    x = {"x": np.random.default_rng(0).normal(size=(37, 4)).astype("float32")}
    proba = predict_all(model, x, batch_size=8)
    assert proba.shape == (37, 3)
    # 37 rows in 5 batches of 8: 3 repeated rows of padding went through, and were dropped.
    assert float(ops.convert_to_numpy(model.get_layer("counter").seen)) == 40
    np.testing.assert_allclose(proba, model.predict(x, batch_size=37, verbose=0), rtol=1e-5)
    assert predict_all(model, {"x": np.zeros((0, 4), "float32")}, 8).shape == (0, 3)
