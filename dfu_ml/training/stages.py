"""The training stages: image pre-training, Stage 1 and Stage 2, with every root-cause fix.

Each stage is a function with explicit inputs and outputs. Every stage:
- monitors quadratic kappa over the whole validation set, once per epoch (:data:`KAPPA`), with
  early stopping and best-weight restore, and reports the epoch whose weights it returns;
- computes steps per epoch from the array it trains on, with the batch size clipped so that an
  epoch has several updates (RC6), and scores every validation row exactly once;
- feeds batches of one fixed shape (:class:`EpochBatches`, :class:`FixedBatches`), so that a
  compiled step (XLA, ``torch.compile``) is built once per stage, not again for the last partial
  batch or the validation pass;
- logs its trainable parameter count (RC3) and returns its per-epoch history;
- seeds Keras first, so the same seed gives the same weights on CPU.

With no validation rows (the final fit on all patients) a stage trains a fixed number of epochs,
which the caller takes from the cross-validation folds.
"""

from __future__ import annotations

import math
import time
import zlib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Callable

import keras
import numpy as np

from dfu_ml.config import Config
from dfu_ml.data.schema import NUM_CLASSES
from dfu_ml.training import models
from dfu_ml.training.metrics import KAPPA, quadratic_kappa

Log = Callable[[str], None]


@dataclass
class StageResult:
    """What a stage returns: the trained model and the figures the health verdict needs."""

    stage: str
    model: keras.Model
    history: dict
    best_epoch: int
    best_val_kappa: float
    trainable_params: int
    batch_size: int
    steps_per_epoch: int
    train_rows: int
    val_rows_scored: int
    epochs_run: int
    seconds: float
    extra: dict = field(default_factory=dict)
    # Probabilities of the returned weights for the validation rows, in order (None without them).
    val_proba: np.ndarray | None = None

    @classmethod
    def from_summary(cls, summary: dict, model: keras.Model) -> "StageResult":
        """The inverse of :meth:`summary`, given the model saved beside it."""
        names = {f.name for f in fields(cls)} - {"model", "extra", "val_proba"}
        known = {k: v for k, v in summary.items() if k in names}
        extra = {k: v for k, v in summary.items() if k not in names}
        return cls(model=model, extra=extra, **known)

    def summary(self) -> dict:
        """JSON-ready figures (everything but the model)."""
        return {
            "stage": self.stage,
            "best_epoch": self.best_epoch,
            "best_val_kappa": self.best_val_kappa,
            "trainable_params": self.trainable_params,
            "batch_size": self.batch_size,
            "steps_per_epoch": self.steps_per_epoch,
            "train_rows": self.train_rows,
            "val_rows_scored": self.val_rows_scored,
            "epochs_run": self.epochs_run,
            "seconds": round(self.seconds, 2),
            "history": self.history,
            **self.extra,
        }


def effective_batch_size(
    train_rows: int, batch_size: int, min_steps: int, clip: bool = True
) -> int:
    """Clip the batch size so an epoch has at least ``min_steps`` updates (RC6: a batch of 600 on
    471 rows gave one update per epoch)."""
    if not clip:
        return batch_size
    return max(1, min(batch_size, train_rows // max(1, min_steps)))


def one_hot(labels: np.ndarray) -> np.ndarray:
    return np.eye(NUM_CLASSES, dtype="float32")[np.asarray(labels, int)]


def _rows(inputs: dict) -> int:
    return len(next(iter(inputs.values())))


def on_device(arrays: dict) -> dict:
    """The arrays as backend tensors on the backend's device where batches can be cut there.

    On torch and JAX a batch is then gathered on the accelerator, with no per-batch host copy for
    the GPU to wait on (Keras would slice the NumPy array and copy every batch over); TensorFlow
    reads batches through tf.data, which takes host arrays, so they stay NumPy there.
    """
    if keras.backend.backend() not in ("torch", "jax"):
        return arrays
    return {k: keras.ops.convert_to_tensor(v) for k, v in arrays.items()}


def _repeat_rows(array, extra: int):
    """``array`` followed by ``extra`` of its rows, cycling from the first (padding that is
    dropped or weighted 0)."""
    if not extra:
        return array
    index = np.arange(extra) % len(array)
    if isinstance(array, np.ndarray):
        return np.concatenate([array, array[index]])
    return keras.ops.concatenate([array, array[index]], axis=0)


class FixedBatches:
    """Rows to predict, padded once so that every batch has the same shape (no recompilation of a
    compiled predict step for a last partial batch) and the padding dropped from the result.

    The batch is ``max_batch`` rows, or for fewer rows the power of two that holds them all, so
    that folds of different sizes (and the final fit) run the same few shapes, and a compiled
    program from one GPU step is found in the persistent compilation cache by the next. Every row
    is scored exactly once (RC6); the padding is less than one batch.
    """

    def __init__(self, inputs: dict, max_batch: int):
        self.rows = _rows(inputs)
        max_batch = max(1, max_batch)
        holds_all = 2 ** math.ceil(math.log2(max(self.rows, 1)))
        self.batch = min(max_batch, holds_all)
        self.padding = -self.rows % self.batch
        self.inputs = {k: _repeat_rows(v, self.padding) for k, v in inputs.items()}

    def predict(self, model: keras.Model) -> np.ndarray:
        if self.rows == 0:
            return np.zeros((0, model.output_shape[-1]), "float32")
        # A model with one unnamed input (a backbone) takes the lone array, not a dict.
        x = self.inputs if isinstance(model.input, dict) else next(iter(self.inputs.values()))
        out = np.asarray(model.predict(x, batch_size=self.batch, verbose=0))
        if len(out) != self.rows + self.padding:
            raise RuntimeError(
                f"scored {len(out)} of {self.rows + self.padding} rows; every row must be scored once"
            )
        return out[: self.rows].astype("float32")


def predict_all(model: keras.Model, inputs: dict, batch_size: int) -> np.ndarray:
    """Probabilities for every row, each scored exactly once (no dropped partial batch)."""
    if _rows(inputs) == 0:
        return np.zeros((0, NUM_CLASSES), "float32")
    return FixedBatches(inputs, batch_size).predict(model)


class EpochBatches(keras.utils.PyDataset):
    """The training rows in batches of exactly ``batch`` rows, in a new order every epoch.

    An epoch is a permutation of the rows cut into ``ceil(n / batch)`` batches (RC6: the steps come
    from the array trained on); the last batch is filled up with rows repeated from the epoch's
    start at sample weight 0, and the loss averages over the weighted rows
    (``mean_with_sample_weight``), so every row is trained on once per epoch and the padded batch's
    loss is the mean over its real rows, while every step has the same shape (a compiled step is
    built once). The order comes from ``seed`` and the epoch alone, so two models trained on the
    same rows see the same batches (the cached Stage 1 test relies on this).
    """

    def __init__(self, x: dict, y, batch: int, seed: tuple):
        super().__init__()  # one worker in this thread: batches are cut on the device (on_device)
        self.x, self.y = x, y
        # A batch larger than the rows (clip_batch_size=false) is one step of all the rows, as
        # Keras would run it: never padded up to the batch size.
        self.rows, self.batch = len(y), max(1, min(batch, len(y)))
        self.steps = math.ceil(self.rows / self.batch)
        self.seed, self.epoch = tuple(seed), 0
        self._plan()

    def _plan(self) -> None:
        order = np.random.default_rng([*self.seed, self.epoch]).permutation(self.rows)
        padding = self.steps * self.batch - self.rows
        self.order = np.resize(order, self.rows + padding)  # repeats the order from its start
        self.weight = np.concatenate([np.ones(self.rows), np.zeros(padding)]).astype("float32")

    @property
    def num_batches(self) -> int:
        return self.steps

    def __getitem__(self, index: int):
        rows = slice(index * self.batch, (index + 1) * self.batch)
        idx = self.order[rows]
        return {k: v[idx] for k, v in self.x.items()}, self.y[idx], self.weight[rows]

    def on_epoch_end(self) -> None:
        self.epoch += 1
        self._plan()


class ValidationKappa(keras.callbacks.Callback):
    """Puts the whole-validation-set quadratic kappa into the epoch logs under :data:`KAPPA`.

    It must come before EarlyStopping in the callback list, so that EarlyStopping sees it.
    """

    def __init__(
        self, inputs: dict, labels: np.ndarray, batch_size: int, stage: str, log: Log, epochs: int
    ):
        super().__init__()
        self.rows, self.labels = FixedBatches(inputs, batch_size), np.asarray(labels)
        self.stage, self.log, self.epochs = stage, log, epochs
        self.rows_scored, self.seconds = 0, 0.0

    def on_epoch_end(self, epoch, logs=None):
        logs = logs if logs is not None else {}
        start = time.time()
        proba = self.rows.predict(self.model)
        self.seconds += time.time() - start
        self.rows_scored = len(proba)
        predicted = proba.argmax(axis=1)
        logs[KAPPA] = quadratic_kappa(self.labels, predicted)
        logs["val_accuracy"] = float((predicted == self.labels).mean())
        logs["val_predicted_classes"] = int(len(np.unique(predicted)))
        self.log(
            f"  {self.stage} epoch {epoch + 1}/{self.epochs}: loss {logs.get('loss', 0):.4f} "
            f"{KAPPA} {logs[KAPPA]:.4f} val_accuracy {logs['val_accuracy']:.3f}"
        )


class EpochLog(keras.callbacks.Callback):
    """One line per epoch when there is no validation set (final fit)."""

    def __init__(self, stage: str, log: Log, epochs: int):
        super().__init__()
        self.stage, self.log, self.epochs = stage, log, epochs

    def on_epoch_end(self, epoch, logs=None):
        self.log(
            f"  {self.stage} epoch {epoch + 1}/{self.epochs}: loss {(logs or {}).get('loss', 0):.4f}"
        )


class EpochTimer(keras.callbacks.Callback):
    """Wall seconds of each epoch's training steps (first in the callback list, so validation
    scoring is not counted; Keras reads the epoch's loss back before the callbacks run, so the
    device has finished the epoch's steps). The first epoch includes building (and compiling)
    the train step."""

    def __init__(self):
        super().__init__()
        self.seconds: list[float] = []

    def on_epoch_begin(self, epoch, logs=None):
        self._start = time.time()

    def on_epoch_end(self, epoch, logs=None):
        self.seconds.append(time.time() - self._start)


@dataclass(frozen=True)
class StageData:
    """A stage's arrays: training inputs (by model input name) and labels, and the validation
    pair (``None`` for the final fit, which has no validation rows)."""

    x_train: dict
    y_train: np.ndarray
    x_val: dict | None = None
    y_val: np.ndarray | None = None

    @property
    def has_val(self) -> bool:
        return self.y_val is not None and len(self.y_val) > 0


@dataclass(frozen=True)
class FitSettings:
    """How one stage trains (the training configuration's keys for that stage)."""

    learning_rate: float
    epochs: int
    batch_size: int = 32
    clip_batch_size: bool = True  # RC6: keep several updates per epoch
    min_steps_per_epoch: int = 3
    focal_gamma: float = 2.0
    patience: int = 5
    jit_compile: str = "auto"  # auto (Keras's choice) | compiled | eager: see Config
    predict_batch_size: int = 256
    seed: int = 0  # the batch order's

    @classmethod
    def for_stage(cls, config: Config, stage: str, epochs: int | None = None) -> FitSettings:
        """``stage`` is ``pretrain``, ``stage1`` or ``stage2``; ``epochs`` overrides the config's
        maximum (the final fit's fixed count)."""
        return cls(
            learning_rate=getattr(config, f"{stage}_lr"),
            epochs=epochs or getattr(config, f"{stage}_epochs"),
            batch_size=config.batch_size,
            clip_batch_size=config.clip_batch_size,
            min_steps_per_epoch=config.health_min_steps_per_epoch,
            focal_gamma=config.focal_gamma,
            patience=config.early_stopping_patience,
            jit_compile=config.jit_compile,
            predict_batch_size=config.predict_batch_size,
            seed=config.seed,
        )


JIT_COMPILE = {"auto": "auto", "compiled": True, "eager": False}


def _fit(
    stage: str, model: keras.Model, data: StageData, alpha, settings: FitSettings, log: Log
) -> StageResult:
    start = time.time()
    train_rows = len(data.y_train)
    batch = effective_batch_size(
        train_rows, settings.batch_size, settings.min_steps_per_epoch, settings.clip_batch_size
    )
    train = EpochBatches(
        on_device(data.x_train),
        on_device({"y": one_hot(data.y_train)})["y"],
        batch,
        (settings.seed, zlib.crc32(stage.encode())),
    )
    steps = train.steps
    epochs = settings.epochs
    model.compile(
        optimizer=keras.optimizers.Adam(settings.learning_rate),
        loss=keras.losses.CategoricalFocalCrossentropy(
            alpha=list(alpha), gamma=settings.focal_gamma, reduction="mean_with_sample_weight"
        ),
        jit_compile=JIT_COMPILE[settings.jit_compile],
    )
    params = models.count_trainable_params(model)
    log(
        f"{stage}: {train_rows} training rows, batch {batch}, {steps} steps/epoch, "
        f"{params:,} trainable parameters, lr {settings.learning_rate:g}, alpha "
        f"[{', '.join(f'{a:.3f}' for a in alpha)}]"
    )
    timer = EpochTimer()
    if data.has_val:
        kappa = ValidationKappa(
            on_device(data.x_val),
            data.y_val,
            batch_size=settings.predict_batch_size,
            stage=stage,
            log=log,
            epochs=epochs,
        )
        callbacks = [
            timer,
            kappa,
            keras.callbacks.EarlyStopping(
                monitor=KAPPA,
                mode="max",
                patience=settings.patience,
                restore_best_weights=True,
                verbose=0,
            ),
        ]
    else:
        callbacks = [timer, EpochLog(stage, log, epochs)]
    # The batches are already in a new order every epoch (EpochBatches): Keras must not reorder.
    fitted = model.fit(train, epochs=epochs, shuffle=False, verbose=0, callbacks=callbacks)
    history = {k: [float(v) for v in values] for k, values in fitted.history.items()}
    epochs_run = len(history.get("loss", []))
    if data.has_val:
        # Keras restores the best epoch's weights at the end of fit (first maximum wins, as
        # EarlyStopping only moves on a strict improvement): read it from the history.
        best_epoch = int(np.argmax(history[KAPPA])) + 1
        best_kappa = float(history[KAPPA][best_epoch - 1])
        rows_scored = kappa.rows_scored
    else:
        best_epoch, best_kappa, rows_scored = epochs_run, float("nan"), 0
    log(f"{stage}: best epoch {best_epoch} of {epochs_run}, {KAPPA} {best_kappa:.4f}")
    return StageResult(
        stage=stage,
        model=model,
        history=history,
        best_epoch=best_epoch,
        best_val_kappa=best_kappa,
        trainable_params=params,
        batch_size=batch,
        steps_per_epoch=steps,
        train_rows=train_rows,
        val_rows_scored=rows_scored,
        epochs_run=epochs_run,
        seconds=time.time() - start,
        extra={
            # Speed figures (bench/gpu_stages.py): the first epoch includes building the step.
            "epoch_train_seconds": [round(t, 3) for t in timer.seconds],
            "jit_compile": bool(model.jit_compile),  # what Keras resolved "auto" to
            "validation_seconds": round(kappa.seconds, 3) if data.has_val else 0.0,
        },
    )


def seed_everything(seed: int, model: keras.Model | None = None, jit_compile: str = "auto") -> None:
    """Make a stage repeatable: seed Python, NumPy and the backend, ask the backend for
    deterministic kernels, and (given a ``model``) restart the random generators its layers own.

    On TensorFlow, deterministic kernels and XLA exclude each other (Keras quietly runs eager
    when both are asked for), so ``jit_compile="compiled"`` keeps XLA and gives up the
    deterministic-kernel guarantee; ``auto`` and ``eager`` keep determinism.

    A model loaded from a file (Stage 2 loads Stage 1's) brings Dropout generators seeded when it
    was loaded, before any seed was set: without the restart, two identical runs dropped
    different units from Stage 2's first step on.
    """
    keras.utils.set_random_seed(seed)
    if keras.backend.backend() == "tensorflow":
        from tensorflow.python.framework import config as tf_config

        if jit_compile == "compiled":
            tf_config.disable_op_determinism()
        else:
            tf_config.enable_op_determinism()
    if model is not None:
        generators = [g for layer in _all_layers(model) for g in _seed_generators(layer)]
        states = np.random.default_rng(seed).integers(1, 2**30, size=len(generators))
        for generator, state in zip(generators, states):
            generator.state.assign(np.array([state, 0], dtype=generator.state.dtype))


def _all_layers(model: keras.Model):
    for layer in model.layers:
        yield layer
        if isinstance(layer, keras.Model):
            yield from _all_layers(layer)


def _seed_generators(layer) -> list:
    return [v for v in vars(layer).values() if isinstance(v, keras.random.SeedGenerator)]


def _print(message: str) -> None:
    print(message, flush=True)


def pretrain_image_encoder(
    modality: str,
    data: StageData,
    config: Config,
    alpha=(1.0, 1.0, 1.0),
    epochs: int | None = None,
    log: Log = _print,
) -> StageResult:
    """Pre-train one modality's image encoder as a standalone image model (RC1: equal alpha by
    default, low learning rate, kappa-monitored). ``data`` holds that modality's images only.
    ``result.model`` is the image model; :func:`encoder_of` gives its encoder (everything but the
    ``output`` layer)."""
    seed_everything(config.seed, jit_compile=config.jit_compile)
    with models.precision(config.mixed_precision):
        encoder = models.build_image_encoder(modality, models.EncoderSpec.from_config(config))
        model = models.build_image_model(encoder, modality)
    settings = FitSettings.for_stage(config, "pretrain", epochs)
    return _fit(f"pretrain[{modality}]", model, data, alpha, settings, log)


def encoder_of(image_model: keras.Model, modality: str) -> keras.Model:
    return image_model.get_layer(models.encoder_name(modality))


def build_fusion_for(config: Config) -> keras.Model:
    with models.precision(config.mixed_precision):
        return models.build_fusion_model(models.FusionSpec.from_config(config))


def backbone_features(model: keras.Model, modalities, inputs: dict, batch_size: int) -> dict:
    """Each modality's images replaced by its backbone's output (inference mode: BatchNorm uses
    its moving statistics), the other inputs kept: what the Stage 1 head trains on."""
    out = {k: v for k, v in inputs.items() if k not in map(models.image_input_name, modalities)}
    for modality in modalities:
        images = {"images": inputs[models.image_input_name(modality)]}
        features = FixedBatches(images, batch_size).predict(models.backbone_of(model, modality))
        out[models.feature_input_name(modality)] = features
    return out


def _fit_on_cached_features(
    model: keras.Model, data: StageData, alpha, settings: FitSettings, config: Config, log: Log
) -> StageResult:
    """Stage 1 as one forward pass of the frozen backbones plus a fit of the layers above them.

    With the backbones frozen and no augmentation, their output per image is fixed for the whole
    stage, so the head (:func:`models.build_stage1_head`, sharing the fusion model's layers) is
    trained on it instead of running the backbones every step. The result is the fusion model,
    compiled with the head's optimizer and loss, as a Stage 1 on images would leave it.
    """
    modalities = config.image_modalities
    start = time.time()
    batch = settings.predict_batch_size
    cached = StageData(
        backbone_features(model, modalities, on_device(data.x_train), batch),
        data.y_train,
        backbone_features(model, modalities, on_device(data.x_val), batch)
        if data.has_val
        else None,
        data.y_val,
    )
    feature_seconds = time.time() - start
    head = models.build_stage1_head(model, modalities)
    result = _fit("stage1", head, cached, alpha, settings, log)
    model.compile(optimizer=head.optimizer, loss=head.loss)
    # The verdict's figure is the fusion model's (RC3); the head trains exactly those weights.
    params = models.count_trainable_params(model)
    if params != result.trainable_params:
        raise RuntimeError(
            f"the Stage 1 head trains {result.trainable_params} parameters, the fusion model "
            f"has {params} trainable: they must be the same weights"
        )
    result.model = model
    result.seconds = time.time() - start
    result.extra.update(
        {"stage1_inputs": "cached_backbone_features", "feature_seconds": round(feature_seconds, 3)}
    )
    log(
        f"stage1: backbone features of {len(data.y_train)} + "
        f"{len(data.y_val) if data.has_val else 0} rows computed once in {feature_seconds:.1f} s"
    )
    return result


def train_stage1(
    data: StageData,
    config: Config,
    alpha,
    encoder_dirs: dict | None = None,
    epochs: int | None = None,
    log: Log = _print,
) -> StageResult:
    """Stage 1: the fusion model with pre-trained encoders loaded and the backbone frozen.

    Only the backbone is frozen by default (RC3: freezing the whole encoder left about 195
    trainable parameters); ``stage1_freeze=encoder`` freezes the encoder's head too. Either way
    the frozen backbones run once, on every row, and the layers above them train on their cached
    output (``stage1_cached_features``, :func:`_fit_on_cached_features`); ``false`` runs them on
    every step, as before.
    """
    seed_everything(config.seed, jit_compile=config.jit_compile)
    model = build_fusion_for(config)
    modalities = config.image_modalities
    for modality, directory in (encoder_dirs or {}).items():
        models.load_encoder_into(model, modality, Path(directory))
        log(f"stage1: loaded the {modality} encoder from {directory}")
    if config.stage1_freeze == "encoder":
        models.freeze_encoders(model, modalities)
    else:
        models.set_backbone_trainable(model, modalities, False)
    settings = FitSettings.for_stage(config, "stage1", epochs)
    if config.stage1_cached_features:
        result = _fit_on_cached_features(model, data, alpha, settings, config, log)
    else:
        result = _fit("stage1", model, data, alpha, settings, log)
        result.extra["stage1_inputs"] = "images"
    result.extra.update(fusion_summary(model))
    return result


def train_stage2(
    stage1: StageResult,
    data: StageData,
    config: Config,
    alpha,
    epochs: int | None = None,
    log: Log = _print,
) -> StageResult:
    """Stage 2: unfreeze the top of each backbone (BatchNorm stays frozen), fine-tune at a low
    rate (RC4: 1e-5, not 1e-6), and keep Stage 1's weights when Stage 2 does not improve."""
    model = stage1.model
    seed_everything(config.seed + 1, model, config.jit_compile)
    stage1_weights = model.get_weights()
    models.unfreeze_top_of_backbones(
        model, config.image_modalities, config.stage2_unfreeze_fraction
    )
    settings = FitSettings.for_stage(config, "stage2", epochs)
    result = _fit("stage2", model, data, alpha, settings, log)
    has_val = data.has_val
    improved = has_val and result.best_val_kappa > stage1.best_val_kappa
    if has_val and not improved:
        model.set_weights(stage1_weights)
    # The kappa of the weights actually returned, measured, not assumed (the study logged "kept
    # Stage 1" while using Stage 2's weights).
    if has_val:
        result.val_proba = predict_all(model, data.x_val, settings.predict_batch_size)
    final_kappa = (
        quadratic_kappa(data.y_val, result.val_proba.argmax(1)) if has_val else float("nan")
    )
    kept = bool(has_val and not improved)
    result.extra.update(
        {
            "improved_on_stage1": bool(improved),
            "kept_stage1_weights": kept,
            "stage1_val_kappa": stage1.best_val_kappa,
            "final_val_kappa": final_kappa,
            "weights_from": "stage1" if kept else "stage2",
            **fusion_summary(model),
        }
    )
    log(
        "stage2: "
        + (
            f"improved on Stage 1 ({result.best_val_kappa:.4f} > "
            f"{stage1.best_val_kappa:.4f}); using Stage 2's weights"
            if improved
            else f"did not improve on Stage 1 ({result.best_val_kappa:.4f} <= "
            f"{stage1.best_val_kappa:.4f}); keeping Stage 1's weights"
            if has_val
            else "trained a fixed number of epochs (no validation rows)"
        )
    )
    return result


def fusion_summary(model: keras.Model) -> dict:
    try:
        layer = model.get_layer(models.FUSION_LAYER)
    except ValueError:
        return {}
    return {
        "fusion_rf_weight": layer.rf_weight(),
        "fusion_rf_weight_initial": layer.initial_rf_weight,
        "fusion_learnable": layer.learnable,
    }
