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

import contextlib
import json
import os
import platform
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path

import keras
import numpy as np

from loader import H5Sequence, Store, open_store
from loader.command import SettingError
from loader.schema import SUBJECT_ID, SUBJECT_SPLIT
from loader.store import StoreChangedError
from loader.stores import check_agree, store_paths
from loader.target import CLASSIFICATION, REGRESSION, Target, resolve_all
from training import distributed
from training.model import augmentation, build
from training.plots import read_history
from training.results import evaluate, write_results
from training.settings import Settings

# What a run folder holds; --overwrite removes these and nothing else.
RUN_FILES = (
    "model.keras",
    "history.csv",
    "metrics.json",
    "config.json",
    "curves.png",
    "confusion.png",
    "scatter.png",
    "predictions.csv",
)
# What early stopping and the saved model follow, per task: (metric, mode).
MONITORS = {CLASSIFICATION: ("val_accuracy", "max"), REGRESSION: ("val_mae", "min")}
FEW_SUBJECTS = 3  # a validation class with fewer subjects than this gets a warning


@dataclass
class Result:
    """What a run produced.

    ``model`` is the trained model (the best epoch's weights). With several processes
    (``distributed``), only process 0 (``process == (0, count)``) keeps a run folder.
    """

    run_dir: Path
    metrics: dict = field(default_factory=dict)
    epochs_run: int = 0
    best_epoch: int | None = None
    interrupted: bool = False
    model: keras.Model | None = None
    process: tuple[int, int] = (0, 1)


class TrainingError(ValueError):
    """A run that cannot start or go on; the message is the one line to show."""


def train(
    store: str | os.PathLike | list,
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
        store: a store; a list of stores or a folder of them (shards, cohorts), read as one.
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
    process = _start_processes(settings)
    with _open(store) as opened, _own_run_dir(run_dir, process) as run_dir:
        targets = choose_target(opened, settings)
        target = targets[0]
        test_split = check_store(opened, settings, targets, report)
        prepare_run_dir(run_dir, overwrite)
        write_config(run_dir, opened, settings, test_split, model_fn, target, process)
        keras.utils.set_random_seed(settings.seed)
        data = build_data(opened, settings, target, test_split, process)
        model = build_model(model_fn, opened, settings, targets)
        monitor = MONITORS[target.task]
        weights = (
            class_weights(opened, settings, targets) if settings.class_weight != "none" else None
        )
        result = Result(run_dir, process=process)
        started = time.perf_counter()
        result.interrupted = _same_store(
            opened, fit, model, data, settings, monitor, run_dir, progress, callbacks, weights
        )
        predictions = []
        if process[1] > 1:
            model = distributed.local_copy(model)
        if not result.interrupted and process[0] == 0:
            result.metrics, predictions = _same_store(
                opened, evaluate, model, data, opened, targets
            )
        history = read_history(run_dir / "history.csv")
        result.epochs_run = len(history.get("loss", []))
        if history.get(monitor[0]):
            pick = np.argmax if monitor[1] == "max" else np.argmin
            result.best_epoch = int(pick(history[monitor[0]])) + 1
        summary = {
            "epochs_run": result.epochs_run,
            "best_epoch": result.best_epoch,
            "interrupted": result.interrupted,
            "seconds": round(time.perf_counter() - started, 1),
        }
        write_results(run_dir, summary, result.metrics, predictions, target, monitor[0])
        result.model = model
    return result


def _start_processes(settings: Settings) -> tuple[int, int]:
    """``(index, count)`` of this process among those training together; (0, 1) alone."""
    if not settings.distributed:
        return 0, 1
    try:
        index, count = distributed.start(
            settings.coordinator, settings.num_processes, settings.process_id
        )
    except distributed.DistributedError as exc:
        raise TrainingError(str(exc)) from exc
    if settings.batch_size % count:
        raise SettingError(
            f"{{batch_size}} must be a multiple of the {count} processes: each reads "
            "batch_size / processes rows a step",
            batch_size=settings.batch_size,
        )
    return index, count


@contextlib.contextmanager
def _own_run_dir(run_dir, process: tuple[int, int]) -> Iterator[Path]:
    """The run folder for process 0; a scratch folder, removed at the end, for the others."""
    if process[0] == 0:
        yield Path(run_dir)
        return
    with tempfile.TemporaryDirectory(prefix=f"slicestore-process{process[0]}-") as scratch:
        yield Path(scratch) / "run"


@contextlib.contextmanager
def _open(paths) -> Iterator[list[Store]]:
    """The run's stores, open for the whole run."""
    with contextlib.ExitStack() as stack:
        try:
            stores = [stack.enter_context(open_store(path)) for path in store_paths(paths)]
            check_agree(stores)
        except (FileNotFoundError, ValueError, TypeError) as exc:
            raise TrainingError(str(exc)) from exc
        yield stores


def _same_store(stores: list[Store], step, *args):
    """Run ``step(*args)``; if a store was replaced meanwhile, stop with one line.

    A sequence that opens the replaced file raises inside Keras, which may wrap the error;
    the files' identity tells what happened whatever the wrapping.
    """
    try:
        return step(*args)
    except Exception as exc:
        changed = [store for store in stores if store.replaced()]
        if isinstance(exc, StoreChangedError) or changed:
            store = (changed or stores)[0]
            raise TrainingError(
                f"{store.path}: the store changed during the run (another store was written "
                f"at its path); the run read only store {store.uuid} until then and stops "
                "here: start it again"
            ) from exc
        raise


def choose_target(stores: list[Store], settings: Settings) -> list[Target]:
    """The target of each store: ``settings.target``, else the stores' labels (or their
    numeric label column); one task, classes merged by name.

    Raises:
        TrainingError: an unknown column (the store's columns are listed), a text column
            for regression, or nothing to predict.
    """
    name = settings.target
    if name is None and not stores[0].labelled:
        name = stores[0].config.get("label_column")  # a numeric label column: no classes
        if name is None:
            raise TrainingError(
                f"{stores[0].path}: the store has no labels: give --target COLUMN (its labels "
                f"table has {list(stores[0].participants()) or 'no columns'})"
            )
    try:
        return resolve_all(stores, name, settings.task, settings.labels, settings.id_column)
    except ValueError as exc:
        raise TrainingError(str(exc)) from exc


def _in_splits(store: Store, names) -> np.ndarray:
    """Per scan of ``store``, whether it lies in one of the splits ``names``."""
    return np.isin(store.subjects_table()[SUBJECT_SPLIT], list(names))


def check_store(
    stores: list[Store], settings: Settings, targets: list[Target], report
) -> str | None:
    """Check that the stores can be trained on for this target with these settings.

    Returns:
        The test split: ``settings.test_split``, else ``test`` when the stores have one.

    Raises:
        TrainingError: one class, an unknown or empty split, a split where no subject has
            a value for the target, a constant regression target.
    """
    target = targets[0]
    where = stores[0].path if len(stores) == 1 else f"{len(stores)} stores"
    what = f"target {target.name!r}" if target.name else "the store's labels"
    if target.task == CLASSIFICATION and len(target.class_names) < 2:
        raise TrainingError(
            f"{where}: {what} has {len(target.class_names)} class(es) "
            f"{target.class_names}: nothing to tell apart"
        )
    test_split = settings.test_split
    if (
        test_split is None
        and all("test" in store.splits for store in stores)
        and "test" not in settings.train_split
    ):
        test_split = "test"
    for name in [*settings.train_split, settings.val_split, *([test_split] if test_split else [])]:
        try:
            rows = sum(len(store.select(name)[0]) for store in stores)
        except ValueError as exc:
            raise TrainingError(str(exc)) from exc
        if rows == 0:
            raise TrainingError(f"{where}: split {name!r} has no slices")
        if not any(
            t.present[_in_splits(s, [name])].any() for s, t in zip(stores, targets, strict=True)
        ):
            raise TrainingError(
                f"{where}: split {name!r} has no subject with a value for {what}: "
                "train and score on splits that have them"
            )
    if target.task == REGRESSION and np.ptp(_training_values(stores, settings, targets)) == 0:
        raise TrainingError(f"{where}: {what} has one value in the training splits")
    for index, class_name in enumerate(target.class_names):
        count = 0
        for store, store_target in zip(stores, targets, strict=True):
            ids = store.subjects_table()[SUBJECT_ID]
            mine = _in_splits(store, [settings.val_split]) & (store_target.values == index)
            count += len(set(ids[mine]))
        if count < FEW_SUBJECTS:
            report(
                f"warning: {where}: split {settings.val_split!r} has {count} subject(s) of "
                f"class {class_name!r}: early stopping and its scores will be noisy"
            )
    return test_split


def _training_values(stores: list[Store], settings: Settings, targets: list[Target]) -> np.ndarray:
    """The target's values of the scans in the training splits that have one."""
    return np.concatenate(
        [
            t.values[_in_splits(store, settings.train_split) & t.present]
            for store, t in zip(stores, targets, strict=True)
        ]
    )


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
    run_dir: Path,
    stores: list[Store],
    settings: Settings,
    test_split: str | None,
    model_fn,
    target: Target,
    process: tuple[int, int] = (0, 1),
) -> None:
    """``config.json``: every setting, the target, the model function, versions, the stores read.

    ``store`` is the store's identity (path, uuid, creation time, splits, preprocessing
    config); a list of them when several stores were read as one.
    """
    facts = [
        {
            "path": os.path.abspath(store.path),
            "uuid": store.uuid,
            "created": store.created,
            "class_names": store.class_names,
            "splits": {name: [s.start, s.stop] for name, s in store.splits.items()},
            "config": store.config,
        }
        for store in stores
    ]
    config = {
        "settings": {**asdict(settings), "test_split": test_split},
        "target": {"name": target.name, "task": target.task, "class_names": target.class_names},
        "store": facts[0] if len(facts) == 1 else facts,
        "model": f"{getattr(model_fn, '__module__', '')}.{getattr(model_fn, '__qualname__', '')}",
        "versions": _versions(),
        "processes": process[1],
        "command": sys.argv,
    }
    (run_dir / "config.json").write_text(json.dumps(config, indent=2))


def build_data(
    stores: list[Store],
    settings: Settings,
    target: Target,
    test_split: str | None,
    process: tuple[int, int] = (0, 1),
) -> dict[str, H5Sequence]:
    """``train`` (shuffled), ``val`` and, when there is one, ``test`` sequences of the target.

    With ``count`` processes, each reads ``batch_size / count`` rows a step: its own share
    of every training epoch (``shard=process``), and all of validation and test, so that
    every process scores the same rows and early stopping decides the same everywhere.

    Raises:
        StoreChangedError: a sequence opened other stores than ``stores``.
    """
    paths = [store.path for store in stores]
    common = {
        "batch_size": settings.batch_size,
        "channels": settings.channels,
        "workers": settings.workers,
        "use_multiprocessing": settings.use_multiprocessing,
        "target": target.name,
        "task": target.task,
        "labels": settings.labels,
        "id_column": settings.id_column,
    }
    common["batch_size"] = settings.batch_size // process[1]
    shard = process if process[1] > 1 else None
    data = {
        "train": H5Sequence(
            paths,
            split=list(settings.train_split),
            shuffle=True,
            seed=settings.seed,
            shard=shard,
            **common,
        ),
        "val": H5Sequence(paths, split=settings.val_split, **common),
    }
    if test_split:
        data["test"] = H5Sequence(paths, split=test_split, **common)
    uuids = "+".join(store.uuid for store in stores)
    for sequence in data.values():
        if sequence.store_uuid != uuids:
            raise StoreChangedError(f"{paths[0]}: the store changed")
    return data


def build_model(
    model_fn, stores: list[Store], settings: Settings, targets: list[Target]
) -> keras.Model:
    """The model from ``model_fn``, with augmentation and scaling, compiled for its output.

    Classification: one output unit (a sigmoid) for two classes gets binary cross-entropy,
    one unit per class (a softmax) sparse categorical cross-entropy. Regression:
    ``model_fn(0, ...)`` must give one linear unit; it learns the target standardised on
    the training splits, and a ``Rescaling`` layer after it turns that back into the
    target's units, so the loss (mean squared error), MAE, RMSE and every saved
    prediction are in those units.

    Raises:
        TrainingError: the output fits neither.
    """
    target = targets[0]
    height, width = stores[0].slice_shape
    shape = (height, width, 1) if settings.channels == "last" else (1, height, width)
    data_format = f"channels_{settings.channels}"
    regression = target.task == REGRESSION
    num_classes = 0 if regression else len(target.class_names)
    base = model_fn(num_classes, shape, data_format)
    units = base.output_shape[-1]
    if regression:
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
    if not fits or len(base.output_shape) != 2:
        raise TrainingError(
            f"model_fn's output has shape {base.output_shape}; for {target.task} of "
            f"{target.name or 'the labels'} it must be {wanted}"
        )
    model = base
    if settings.augment != "none" or regression:
        inputs = keras.Input(shape)
        x = inputs
        if settings.augment != "none":
            x = augmentation(data_format, flip=settings.augment == "flip")(x)
        outputs = base(x)
        if regression:
            values = _training_values(stores, settings, targets)
            mean, std = float(np.mean(values)), float(np.std(values)) or 1.0
            outputs = keras.layers.Rescaling(std, offset=mean, name="to_target_units")(outputs)
        model = keras.Model(inputs, outputs, name=base.name)
    model.compile(
        optimizer=keras.optimizers.Adam(settings.learning_rate),
        loss=loss,
        weighted_metrics=metrics,  # rows without a target value have weight 0
    )
    return model


def class_weights(
    stores: list[Store], settings: Settings, targets: list[Target]
) -> dict[int, float]:
    """``balanced`` weights: slices / (classes x slices of the class), in the training splits.

    Counts slices per scan by reading ``/subject`` of the training rows in blocks.
    """
    per_class = np.zeros(len(targets[0].class_names))
    for store, target in zip(stores, targets, strict=True):
        counts = np.zeros(len(target.values), dtype=np.int64)
        for split in store.select(list(settings.train_split)):
            for start in range(split.start, split.stop, 1 << 20):
                block = store.subject[start : min(start + (1 << 20), split.stop)]
                counts += np.bincount(block, minlength=len(counts))
        present = target.present
        per_class += np.bincount(
            target.values[present], weights=counts[present], minlength=len(per_class)
        )
    total = per_class.sum()
    return {k: float(total / (len(per_class) * n)) if n else 0.0 for k, n in enumerate(per_class)}


class _History(keras.callbacks.CSVLogger):
    """``history.csv`` with epochs numbered from 1, as the console and the curves number them."""

    def on_epoch_end(self, epoch, logs=None):
        super().on_epoch_end(epoch + 1, logs)


def fit(
    model: keras.Model,
    data: dict[str, H5Sequence],
    settings: Settings,
    monitor: tuple[str, str],
    run_dir: Path,
    progress: bool | None,
    callbacks=(),
    class_weight: dict[int, float] | None = None,
) -> bool:
    """Fit with early stopping on ``monitor`` (name, mode), the best model saved, history logged.

    Returns:
        Whether the fit was interrupted (Ctrl-C or SIGTERM); the folder then holds the
        best model and the history so far.
    """
    show = sys.stderr.isatty() if progress is None else progress
    history_log = _History(run_dir / "history.csv")
    name, mode = monitor
    own = [
        keras.callbacks.EarlyStopping(
            monitor=name, mode=mode, patience=settings.patience, restore_best_weights=True
        ),
        keras.callbacks.ModelCheckpoint(
            run_dir / "model.keras", monitor=name, mode=mode, save_best_only=True
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
            class_weight=class_weight,
        )
    except KeyboardInterrupt:
        history_log.on_train_end()  # Keras skips it on an interrupt: close history.csv
        return True
    return False


def _versions() -> dict:
    versions = {"python": platform.python_version()}
    for package in ("slicestore", "keras", "tensorflow", "numpy", "h5py", "nibabel", "scipy"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    versions["keras_backend"] = keras.backend.backend()
    return versions
