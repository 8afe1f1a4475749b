"""``train``: fit a model on a store's splits through H5Sequence and leave a complete run folder.

A run is a short sequence of steps, each a function of its own: check the store and the
settings (:func:`check_store`), make the run folder and its ``config.json``
(:func:`prepare_run_dir`, :func:`write_config`), build the data (:func:`build_data`),
build and compile the model (:func:`build_model`), fit (:func:`fit`), evaluate
(:func:`evaluate`) and write the results (:func:`write_results`).

Every read of a run comes from the one store it started on: the store stays open for the
whole run, every sequence is checked to be that store, and a store replaced at its path
during the run stops the run with one line instead of mixing two stores.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path

import keras
import numpy as np

from loader import H5Sequence, Store, open_store
from loader.command import SettingError, check_settings, option
from loader.schema import SUBJECT_ID, SUBJECT_LABEL, SUBJECT_SPLIT
from loader.store import StoreChangedError
from training.metrics import evaluate_outputs
from training.model import build
from training.plots import plot_confusions, plot_curves, read_history

# What a run folder holds; --overwrite removes these and nothing else.
RUN_FILES = (
    "model.keras",
    "history.csv",
    "metrics.json",
    "config.json",
    "curves.png",
    "confusion.png",
)
MONITOR = "val_accuracy"  # early stopping and the saved model follow it, higher is better
FEW_SUBJECTS = 3  # a validation class with fewer subjects than this gets a warning


@dataclass(frozen=True)
class Settings:
    """Every setting of a run (written to ``config.json``).

    Each field is also an option of ``python -m training``, generated from the
    declaration below (``--multiprocessing`` for ``use_multiprocessing``).

    Raises:
        SettingError: (a ValueError) a value outside its rule.
        TypeError: a value of the wrong type.
    """

    epochs: int = option(100, "at most this many epochs", metavar="N", at_least=1)
    batch_size: int = option(256, "slices per batch", metavar="N", at_least=1)
    patience: int = option(
        10, f"early stopping patience on `{MONITOR}` (epochs)", metavar="N", at_least=0
    )
    learning_rate: float = option(1e-3, "Adam's learning rate", metavar="LR")
    seed: int = option(0, "seed of the weights and the batch order", metavar="S", at_least=0)
    train_split: tuple[str, ...] = option(
        ("train",), "one or more splits to train on, e.g. fold0 fold1 fold2", metavar="SPLIT"
    )
    val_split: str = option("val", "split for early stopping and validation", metavar="SPLIT")
    test_split: str | None = option(
        None, "split to test on", metavar="SPLIT", kind=str,
        default_text="`test` when the store has one",
    )  # fmt: skip
    workers: int = option(1, "threads (or processes) reading batches", metavar="N", at_least=1)
    use_multiprocessing: bool = option(
        False, "read batches in processes instead of threads", flag="--multiprocessing"
    )
    channels: str = option("last", "tensor layout", choices=("last", "first"))

    def __post_init__(self):
        if isinstance(self.train_split, str | list):  # one name, or a list, from the API
            names = [self.train_split] if isinstance(self.train_split, str) else self.train_split
            object.__setattr__(self, "train_split", tuple(names))
        check_settings(self)
        if not self.learning_rate > 0:
            raise SettingError("{learning_rate} must be positive", learning_rate=self.learning_rate)
        for name in ("val_split", "test_split"):
            if getattr(self, name) in self.train_split:
                raise SettingError(
                    f"{{{name}}} must not be one of {{train_split}}: it would score the model "
                    "on slices it was trained on",
                    train_split=self.train_split,
                    **{name: getattr(self, name)},
                )
        if self.test_split is not None and self.test_split == self.val_split:
            raise SettingError(
                "{test_split} must differ from {val_split}: early stopping chose the model on it",
                test_split=self.test_split,
            )


@dataclass
class Result:
    """What a run produced."""

    run_dir: Path
    metrics: dict = field(default_factory=dict)
    epochs_run: int = 0
    best_epoch: int | None = None
    interrupted: bool = False


class TrainingError(ValueError):
    """A run that cannot start or go on; the message is the one line to show."""


def train(
    store: str | os.PathLike,
    run_dir: str | os.PathLike,
    overwrite: bool = False,
    model_fn=build,
    progress: bool | None = None,
    callbacks=(),
    report=None,
    **settings,
) -> Result:
    """Train and evaluate a model on a store; everything lands in ``run_dir``.

    Args:
        store: a labelled store.
        run_dir: the run folder; an existing non-empty one is refused unless ``overwrite``.
        overwrite: replace the files of an earlier run in ``run_dir``.
        model_fn: ``model_fn(num_classes, input_shape, data_format) -> keras.Model`` whose
            output is class probabilities: one sigmoid unit for two classes, or one unit
            per class (softmax). Defaults to :func:`training.model.build`.
        progress: a tqdm bar per epoch; None shows one on a terminal, else one line per epoch.
        callbacks: more Keras callbacks, run after the run's own.
        report: called with each warning line (e.g. a validation split with few subjects
            per class). Defaults to printing on stderr.
        **settings: the fields of :class:`Settings`.

    Returns:
        The result; ``result.metrics`` is what ``metrics.json`` holds.

    Raises:
        TrainingError: the store is unusable (not a store, unfinished, unlabelled, no such
            split, empty split), the model's output does not fit the classes, or the store
            was replaced during the run.
        SettingError: a setting outside its rule.
        FileExistsError: ``run_dir`` is not empty and ``overwrite`` is False.
    """
    settings = Settings(**settings)
    report = report or (lambda line: print(line, file=sys.stderr))
    run_dir = Path(run_dir)
    with _open(store) as opened:
        test_split = check_store(opened, settings, report)
        prepare_run_dir(run_dir, overwrite)
        write_config(run_dir, opened, settings, test_split, model_fn)
        keras.utils.set_random_seed(settings.seed)
        data = build_data(opened, settings, test_split)
        model = build_model(model_fn, opened, settings)
        result = Result(run_dir)
        started = time.perf_counter()
        result.interrupted = _same_store(
            opened, fit, model, data, settings, run_dir, progress, callbacks
        )
        if not result.interrupted:
            result.metrics = _same_store(opened, evaluate, model, data, opened)
        write_results(result, opened.class_names, time.perf_counter() - started)
    return result


def _open(path: str | os.PathLike) -> Store:
    try:
        return open_store(path)
    except (FileNotFoundError, ValueError) as exc:
        raise TrainingError(str(exc)) from exc


def _same_store(store: Store, step, *args):
    """Run ``step(*args)``; if the store was replaced meanwhile, stop with one line.

    A sequence that opens the replaced file raises inside Keras, which may wrap the error;
    the file's identity tells what happened whatever the wrapping.
    """
    try:
        return step(*args)
    except Exception as exc:
        if isinstance(exc, StoreChangedError) or store.replaced():
            raise TrainingError(
                f"{store.path}: the store changed during the run (another store was written "
                f"at its path); the run read only store {store.uuid} until then and stops "
                "here: start it again"
            ) from exc
        raise


def check_store(store: Store, settings: Settings, report) -> str | None:
    """Check that the store can be trained on with these settings.

    Returns:
        The test split: ``settings.test_split``, else ``test`` when the store has one.

    Raises:
        TrainingError: unlabelled, one class, an unknown, empty or unlabelled split.
    """
    if not store.labelled:
        raise TrainingError(f"{store.path}: the store has no labels: nothing to train on")
    if len(store.class_names) < 2:
        raise TrainingError(
            f"{store.path}: the store has one class ({store.class_names[0]}): nothing to tell apart"
        )
    test_split = settings.test_split
    if test_split is None and "test" in store.splits and "test" not in settings.train_split:
        test_split = "test"
    table = store.subjects_table()
    for name in [*settings.train_split, settings.val_split, *([test_split] if test_split else [])]:
        try:
            split = store.select(name)[0]
        except ValueError as exc:
            raise TrainingError(str(exc)) from exc
        in_split = table[SUBJECT_SPLIT] == name
        if len(split) == 0:
            raise TrainingError(f"{store.path}: split {name!r} has no slices")
        if np.all(table[SUBJECT_LABEL][in_split] < 0):
            raise TrainingError(
                f"{store.path}: split {name!r} has no labels: train and score on labelled splits"
            )
    in_val = table[SUBJECT_SPLIT] == settings.val_split
    for index, class_name in enumerate(store.class_names):
        count = len(set(table[SUBJECT_ID][in_val & (table[SUBJECT_LABEL] == index)]))
        if count < FEW_SUBJECTS:
            report(
                f"warning: {store.path}: split {settings.val_split!r} has {count} subject(s) of "
                f"class {class_name!r}: early stopping and its scores will be noisy"
            )
    return test_split


def prepare_run_dir(run_dir: Path, overwrite: bool) -> None:
    """Make the run folder; an earlier run's files in it only with ``overwrite``."""
    if run_dir.exists() and not run_dir.is_dir():
        raise FileExistsError(f"{run_dir}: exists and is not a folder")
    if run_dir.is_dir() and any(run_dir.iterdir()):
        if not overwrite:
            raise FileExistsError(
                f"{run_dir}: exists and is not empty; use --overwrite to replace its run"
            )
        for name in RUN_FILES:
            (run_dir / name).unlink(missing_ok=True)
    run_dir.mkdir(parents=True, exist_ok=True)


def write_config(
    run_dir: Path, store: Store, settings: Settings, test_split: str | None, model_fn
) -> None:
    """``config.json``: every setting, the model function, library versions, the store read."""
    config = {
        "settings": {**asdict(settings), "test_split": test_split},
        "store": {
            "path": os.path.abspath(store.path),
            "uuid": store.uuid,
            "created": store.created,
            "class_names": store.class_names,
            "splits": {name: [s.start, s.stop] for name, s in store.splits.items()},
            "config": store.config,
        },
        "model": f"{getattr(model_fn, '__module__', '')}.{getattr(model_fn, '__qualname__', '')}",
        "versions": _versions(),
        "command": sys.argv,
    }
    (run_dir / "config.json").write_text(json.dumps(config, indent=2))


def build_data(store: Store, settings: Settings, test_split: str | None) -> dict[str, H5Sequence]:
    """``train`` (shuffled), ``val`` and, when there is one, ``test`` sequences of the store.

    Raises:
        StoreChangedError: a sequence opened another store than ``store``.
    """
    common = {
        "batch_size": settings.batch_size,
        "channels": settings.channels,
        "workers": settings.workers,
        "use_multiprocessing": settings.use_multiprocessing,
    }
    data = {
        "train": H5Sequence(
            store.path, split=list(settings.train_split), shuffle=True, seed=settings.seed, **common
        ),
        "val": H5Sequence(store.path, split=settings.val_split, **common),
    }
    if test_split:
        data["test"] = H5Sequence(store.path, split=test_split, **common)
    for sequence in data.values():
        if sequence.store_uuid != store.uuid:
            raise StoreChangedError(f"{store.path}: the store changed")
    return data


def build_model(model_fn, store: Store, settings: Settings) -> keras.Model:
    """The model from ``model_fn``, compiled with the loss its output shape calls for.

    One output unit (a sigmoid) for two classes: binary cross-entropy; one unit per class
    (a softmax): sparse categorical cross-entropy.

    Raises:
        TrainingError: the output fits neither.
    """
    num_classes = len(store.class_names)
    height, width = store.slice_shape
    shape = (height, width, 1) if settings.channels == "last" else (1, height, width)
    model = model_fn(num_classes, shape, f"channels_{settings.channels}")
    units = model.output_shape[-1]
    if units == 1 and num_classes == 2:
        loss = "binary_crossentropy"
    elif units == num_classes and len(model.output_shape) == 2:
        loss = "sparse_categorical_crossentropy"
    else:
        raise TrainingError(
            f"model_fn's output has shape {model.output_shape}; for {num_classes} classes it "
            f"must be (None, {num_classes}) (softmax)"
            + (" or (None, 1) (sigmoid)" if num_classes == 2 else "")
        )
    model.compile(
        optimizer=keras.optimizers.Adam(settings.learning_rate), loss=loss, metrics=["accuracy"]
    )
    return model


class _History(keras.callbacks.CSVLogger):
    """``history.csv`` with epochs numbered from 1, as the console and the curves number them."""

    def on_epoch_end(self, epoch, logs=None):
        super().on_epoch_end(epoch + 1, logs)


def fit(
    model: keras.Model,
    data: dict[str, H5Sequence],
    settings: Settings,
    run_dir: Path,
    progress: bool | None,
    callbacks=(),
) -> bool:
    """Fit with early stopping, the best model saved, the history logged.

    Returns:
        Whether the fit was interrupted (Ctrl-C or SIGTERM); the folder then holds the
        best model and the history so far.
    """
    show = sys.stderr.isatty() if progress is None else progress
    history_log = _History(run_dir / "history.csv")
    own = [
        keras.callbacks.EarlyStopping(
            monitor=MONITOR, mode="max", patience=settings.patience, restore_best_weights=True
        ),
        keras.callbacks.ModelCheckpoint(
            run_dir / "model.keras", monitor=MONITOR, mode="max", save_best_only=True
        ),
        history_log,
    ]
    if show:
        from tqdm.keras import TqdmCallback

        own.append(TqdmCallback(verbose=1))
    try:
        model.fit(
            data["train"],
            validation_data=data["val"],
            epochs=settings.epochs,
            callbacks=[*own, *callbacks],
            shuffle=False,  # H5Sequence shuffles, by (seed, epoch)
            verbose=0 if show else 2,
        )
    except KeyboardInterrupt:
        history_log.on_train_end()  # Keras skips it on an interrupt: close history.csv
        return True
    return False


def evaluate(model: keras.Model, data: dict[str, H5Sequence], store: Store) -> dict:
    """Slice- and subject-level results on ``val`` and ``test``, by split name.

    Labels and subjects are read through ``store``, the file the sequences read.
    """
    table_ids = store.subjects_table()[SUBJECT_ID]
    results = {}
    for key in ("val", "test"):
        if key not in data:
            continue
        sequence = data[key]
        outputs = model.predict(sequence, verbose=0)
        rows = np.concatenate([sequence.rows(i) for i in range(len(sequence))])
        start, stop = int(rows.min()), int(rows.max()) + 1  # a split is one contiguous range
        labels = store.labels[start:stop][rows - start]
        scans = store.subject[start:stop][rows - start]
        results[sequence.split] = evaluate_outputs(outputs, labels, table_ids[scans])
    return results


def write_results(result: Result, class_names: list[str], seconds: float) -> None:
    """``metrics.json``, ``curves.png`` and (when evaluated) ``confusion.png``."""
    run_dir = result.run_dir
    history = read_history(run_dir / "history.csv")
    result.epochs_run = len(history.get("loss", []))
    if history.get(MONITOR):
        result.best_epoch = int(np.argmax(history[MONITOR])) + 1
    if history:
        plot_curves(history, run_dir / "curves.png", result.best_epoch)
    summary = {
        "epochs_run": result.epochs_run,
        "best_epoch": result.best_epoch,
        "interrupted": result.interrupted,
        "seconds": round(seconds, 1),
    }
    if result.metrics:
        summary["splits"] = result.metrics
        plot_confusions(result.metrics, class_names, run_dir / "confusion.png")
    (run_dir / "metrics.json").write_text(json.dumps(summary, indent=2))


def _versions() -> dict:
    versions = {"python": platform.python_version()}
    for package in ("slicestore", "keras", "tensorflow", "numpy", "h5py", "nibabel", "scipy"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    versions["keras_backend"] = keras.backend.backend()
    return versions
