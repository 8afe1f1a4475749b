"""The model of a run, compiled for its target, and the fit with early stopping."""

from __future__ import annotations

import gc
import io
import sys
from pathlib import Path

import keras
import numpy as np

from loader import H5Sequence, Store, files
from loader.target import CLASSIFICATION, REGRESSION, SEGMENTATION, Target
from training import run_folder, segmentation, tensorboard
from training.checkpoints import Rest, RunState, stop_at_batch_end
from training.data import training_values
from training.errors import TrainingError
from training.model import FROM_STORED, augmentation
from training.settings import Settings

# What early stopping and the saved model follow, per task: (metric, mode).
MONITORS = {
    CLASSIFICATION: ("val_accuracy", "max"),
    REGRESSION: ("val_mae", "min"),
    SEGMENTATION: ("val_dice", "max"),
}


def best_epoch(history: dict[str, list[float]], monitor: tuple[str, str]) -> int | None:
    """The best epoch (numbered from 1) of a history by ``monitor`` (name, mode); None
    when the history has no value of it.

    >>> history = {"val_mae": [3.0, 2.0, 2.5]}
    >>> best_epoch(history, ("val_mae", "min")), best_epoch(history, ("val_accuracy", "max"))
    (2, None)
    """
    values = history.get(monitor[0])
    if not values:
        return None
    pick = np.argmax if monitor[1] == "max" else np.argmin
    return int(pick(values)) + 1


# --channels first: the model takes (C, h, w) slices but computes channels last behind a
# Permute layer. TensorFlow's CPU convolutions take channels last alone where its oneDNN
# kernels are off (the default on AMD and older Intel CPUs): the gradient of a
# channels-first convolution stops with "Conv2DCustomBackpropInputOp only supports NHWC".
# A model built this way trains and predicts on any CPU or GPU, and a saved model reads
# the layout it was trained on wherever it is loaded.
CHANNELS_FIRST = "channels_first_to_last"


def build_model(
    model_fn, stores: list[Store], settings: Settings, targets: list[Target]
) -> keras.Model:
    """The model from ``model_fn``, with scaling and augmentation, compiled for its output.

    With ``feed="stored"`` (the default) batches carry the stored values (uint8) and a
    ``Rescaling`` layer named :data:`FROM_STORED` turns them into intensities first, on the
    accelerator: the host does no conversion and sends a quarter of the bytes.

    Classification: one output unit (a sigmoid) for two classes gets binary cross-entropy,
    one unit per class (a softmax) sparse categorical cross-entropy. Regression:
    ``model_fn(0, ...)`` must give one linear unit; it learns the target standardised on
    the training splits, and a ``Rescaling`` layer after it turns that back into the
    target's units, so the loss (mean squared error), MAE, RMSE and every saved
    prediction are in those units. Segmentation: a softmax over the labels per pixel,
    ``(None, h, w, labels)``, with :func:`training.segmentation.dice_cross_entropy` and
    the Dice of the labels other than background.

    Raises:
        TrainingError: the output fits none of them.
    """
    target = targets[0]
    height, width = stores[0].slice_shape
    count = stores[0].num_channels
    shape = (height, width, count)
    if target.task == SEGMENTATION:
        base, loss, metrics = _segmentation_model(model_fn, shape, settings, target)
    else:
        num_classes = 0 if target.task == REGRESSION else len(target.class_names)
        base = model_fn(num_classes, shape, "channels_last")
        loss, metrics = _loss_and_metrics(base.output_shape, target, num_classes)
    model = base
    regression, first = target.task == REGRESSION, settings.channels == "first"
    if settings.feed == "stored" or settings.augment != "none" or regression or first:
        inputs = keras.Input((count, height, width) if first else shape)
        x = inputs
        if settings.feed == "stored":
            x = keras.layers.Rescaling(
                float(stores[0].scale), float(stores[0].offset), name=FROM_STORED
            )(x)
        if first:  # the batches' layout outside, channels last inside (see CHANNELS_FIRST)
            x = keras.layers.Permute((2, 3, 1), name=CHANNELS_FIRST)(x)
        if settings.augment != "none":
            x = augmentation("channels_last", flip=settings.augment == "flip")(x)
        outputs = base(x)
        if regression:
            values = training_values(stores, settings, targets)
            mean, std = float(np.mean(values)), float(np.std(values)) or 1.0
            outputs = keras.layers.Rescaling(std, offset=mean, name="to_target_units")(outputs)
        model = keras.Model(inputs, outputs, name=base.name)
    weighted = target.task != SEGMENTATION  # rows without a target value have weight 0
    model.compile(
        optimizer=keras.optimizers.Adam(settings.learning_rate),
        loss=loss,
        **{"weighted_metrics" if weighted else "metrics": metrics},
    )
    # Adam's moments made now, not inside the first step (see _build_state)
    model.optimizer.build(model.trainable_variables)
    return model


def _loss_and_metrics(output_shape: tuple, target: Target, num_classes: int) -> tuple:
    """The loss and metrics for a model's output shape; a shape that fits none is refused."""
    units = output_shape[-1]
    if target.task == REGRESSION:
        fits, loss, wanted = units == 1, "mean_squared_error", "(None, 1) (one linear unit)"
        metrics = [
            keras.metrics.MeanAbsoluteError(name="mae"),
            keras.metrics.RootMeanSquaredError(name="rmse"),
        ]
    else:
        two = units == 1 and num_classes == 2
        fits = two or units == num_classes
        loss = "binary_crossentropy" if two else "sparse_categorical_crossentropy"
        wanted = f"(None, {num_classes}) (softmax)"
        wanted += " or (None, 1) (sigmoid)" if num_classes == 2 else ""
        metrics = ["accuracy"]
    if not fits or len(output_shape) != 2:
        raise TrainingError(
            f"model_fn's output has shape {output_shape}; for {target.task} of "
            f"{target.name or 'the labels'} it must be {wanted}"
        )
    return loss, metrics


def _segmentation_model(model_fn, shape, settings, target) -> tuple:
    """``(model, loss, metrics)`` for segmentation; settings it cannot take are refused."""
    if settings.augment != "none":
        raise TrainingError(
            "--augment moves the images but not their masks: train segmentation without it"
        )
    if settings.class_weight != "none" or settings.channels != "last":
        raise TrainingError(
            "segmentation weighs its labels with the Dice loss and reads channels last: "
            "leave out --class-weight and --channels first"
        )
    labels = len(target.class_names)
    try:
        model = model_fn(labels, shape, "channels_last")
    except ValueError as exc:
        raise TrainingError(str(exc)) from exc
    if tuple(model.output_shape) != (None, *shape[:2], labels):
        raise TrainingError(
            f"model_fn's output has shape {model.output_shape}; for segmentation it must be "
            f"(None, {shape[0]}, {shape[1]}, {labels}) (a softmax over the labels per pixel)"
        )
    return model, segmentation.dice_cross_entropy, [segmentation.Dice(labels)]


class _History(keras.callbacks.CSVLogger):
    """``history.csv`` with epochs numbered from 1, as the console and the curves number them.

    Keras' rows are kept in memory and the whole file is written again at each epoch end
    (through :func:`loader.files.replacing`): a kill never leaves half a row. A resumed run
    adds to the rows restored.
    """

    def __init__(self, path: Path):
        super().__init__(path, append=True)
        self.path = path

    def on_train_begin(self, logs=None):
        earlier = self.path.read_bytes().decode() if self.path.is_file() else ""
        self.append_header = not earlier
        self.csv_file = io.StringIO(newline="")  # as a file opened for appending: \r\n kept
        self.csv_file.write(earlier)
        self.writer, self.keys = None, None

    def on_epoch_end(self, epoch, logs=None):
        super().on_epoch_end(epoch + 1, logs)
        files.write_text(self.path, self.csv_file.getvalue())


def _build_state(model: keras.Model, batch) -> None:
    """The loss's and metrics' variables made now, eagerly on one ``batch``, and reset.

    Keras (TensorFlow, no distribution strategy) makes them inside the first training step,
    and a ``tf.function`` that makes variables is traced twice: ~1 s more for a run of the
    small CNN, ~5 s for the U-Net, on a 2-core CPU. Adam's variables are made with the
    model (:func:`build_model`)."""
    x, y, *weight = batch
    predicted = model(x, training=False)
    model.compute_loss(x, y, predicted, weight[0] if weight else None)
    model.compute_metrics(x, y, predicted, weight[0] if weight else None)
    model.reset_metrics()


def fit(
    model: keras.Model,
    data: dict[str, H5Sequence],
    settings: Settings,
    monitor: tuple[str, str],
    run_dir: Path,
    progress: bool | None,
    callbacks=(),
    class_weight: dict[int, float] | None = None,
    resume: bool = False,
    checkpoints: bool = True,
) -> bool:
    """Fit with early stopping on ``monitor`` (name, mode), the best model saved, history
    logged, and checkpoints (:mod:`training.checkpoints`) at epoch ends and every
    ``settings.checkpoint_every`` batches.

    Args:
        resume: continue from the run folder's checkpoint, when it has one.
        checkpoints: write checkpoints (False for all but process 0 of several).

    Returns:
        Whether the fit was interrupted (Ctrl-C or SIGTERM); the folder then holds the
        best model, the history so far and a checkpoint to resume from. The model holds
        the best epoch's weights either way.
    """
    show = sys.stderr.isatty() if progress is None else progress
    train = data["train"]
    state = RunState(
        run_dir, train, monitor, settings.patience, settings.checkpoint_every, checkpoints
    )
    if resume:
        state.set_model(model)
        state.restore(data["val"][0])
    else:
        _build_state(model, data["val"][0])
    common = {
        "validation_data": data["val"],
        "callbacks": [*_own_callbacks(state, settings, run_dir, resume, show), *callbacks],
        "shuffle": False,  # H5Sequence shuffles, by (seed, epoch)
        "verbose": 0 if show else 2,
        "class_weight": class_weight,
    }
    interrupted = False
    try:
        with stop_at_batch_end(state, immediate_terminate=train.use_multiprocessing):
            if state.batch and not _finished(state, settings):  # the rest of an epoch
                state.offset = state.batch
                model.fit(
                    Rest(train, state.batch),
                    epochs=state.epoch + 1,
                    initial_epoch=state.epoch,
                    **common,
                )
            if not _finished(state, settings):
                model.fit(train, epochs=settings.epochs, initial_epoch=state.epoch, **common)
    except KeyboardInterrupt:
        interrupted = True
    if interrupted:
        # The stopped fit's tf.data iterator is left in a reference cycle, freed by
        # whichever garbage collection comes next: in the middle of the next run's tracing
        # its destructor waited ~20 s on the iterator's thread (twice a test suite, one
        # core idle). Freed here it takes ~0.3 s, after the except block: inside it the
        # exception's frames still hold the iterator.
        gc.collect()
    if state.best_weights is not None:
        model.set_weights(state.best_weights)
    return interrupted


def _own_callbacks(state: RunState, settings: Settings, run_dir: Path, resume: bool, show: bool):
    """The run's callbacks in their order: ``history.csv``, TensorBoard's logs (pruned to
    the checkpoint's epoch on resume), the checkpoints (an epoch is logged before its
    checkpoint), and a progress bar on a terminal."""
    own = [_History(run_dir / run_folder.HISTORY)]
    if settings.tensorboard:
        log_dir = run_dir / run_folder.TENSORBOARD
        if resume:
            tensorboard.prune(log_dir, state.epoch)
        own.append(tensorboard.EpochLog(log_dir))
    own.append(state)
    if show:
        from tqdm.keras import TqdmCallback

        own.append(TqdmCallback(verbose=1))
    return own


def _finished(state: RunState, settings: Settings) -> bool:
    return state.stopped or state.epoch >= settings.epochs
