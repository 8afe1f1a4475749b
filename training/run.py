"""``train``: fit a model on a store's splits through H5Sequence and leave a complete run folder."""

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

from loader import H5Sequence, open_store
from loader.store import SUBJECT_ID
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


@dataclass(frozen=True)
class Settings:
    """Every setting of a run (written to ``config.json``)."""

    epochs: int = 100
    batch_size: int = 256
    patience: int = 10
    learning_rate: float = 1e-3
    seed: int = 0
    train_split: tuple[str, ...] = ("train",)
    val_split: str = "val"
    test_split: str | None = None  # None: "test" when the store has it
    workers: int = 1
    use_multiprocessing: bool = False
    channels: str = "last"

    def __post_init__(self):
        for name in ("epochs", "batch_size", "workers"):
            if getattr(self, name) < 1:
                raise ValueError(
                    f"--{name.replace('_', '-')} must be at least 1; received {getattr(self, name)}"
                )
        if self.patience < 0:
            raise ValueError(f"--patience must be >= 0; received {self.patience}")
        if not self.learning_rate > 0:
            raise ValueError(f"--learning-rate must be positive; received {self.learning_rate}")
        if self.channels not in ("last", "first"):
            raise ValueError(f'--channels must be "last" or "first"; received {self.channels!r}')


@dataclass
class Result:
    """What a run produced."""

    run_dir: Path
    metrics: dict = field(default_factory=dict)
    epochs_run: int = 0
    best_epoch: int | None = None
    interrupted: bool = False


class TrainingError(ValueError):
    """A run that cannot start; the message is the one line to show."""


def train(
    store: str | os.PathLike,
    run_dir: str | os.PathLike,
    overwrite: bool = False,
    model_fn=build,
    progress: bool | None = None,
    callbacks=(),
    **settings,
) -> Result:
    """Train and evaluate a model on a store; everything lands in ``run_dir``.

    Args:
        store: a labelled store.
        run_dir: the run folder; an existing non-empty one is refused unless ``overwrite``.
        overwrite: replace the files of an earlier run in ``run_dir``.
        model_fn: ``model_fn(num_classes, input_shape, data_format) -> keras.Model``.
            Defaults to :func:`training.model.build`.
        progress: a tqdm bar per epoch; None shows one on a terminal, else one line per epoch.
        callbacks: more Keras callbacks, run after the run's own.
        **settings: the fields of :class:`Settings`.

    Returns:
        The result; ``result.metrics`` is what ``metrics.json`` holds.

    Raises:
        TrainingError: the store is unusable (not a store, unfinished, unlabelled, no such split).
        FileExistsError: ``run_dir`` is not empty and ``overwrite`` is False.
    """
    train_split = settings.pop("train_split", ("train",))
    train_split = (train_split,) if isinstance(train_split, str) else tuple(train_split)
    settings = Settings(**settings, train_split=train_split)
    store_path = Path(store)
    run_dir = Path(run_dir)
    facts = _store_facts(store_path, settings)
    _prepare(run_dir, overwrite)
    test_split = facts["test_split"]
    config = {
        "settings": {**asdict(settings), "test_split": test_split},
        "store": facts["store"],
        "model": f"{getattr(model_fn, '__module__', '')}.{getattr(model_fn, '__qualname__', '')}",
        "versions": _versions(),
        "command": sys.argv,
    }
    (run_dir / "config.json").write_text(json.dumps(config, indent=2))

    keras.utils.set_random_seed(settings.seed)
    common = {
        "batch_size": settings.batch_size,
        "channels": settings.channels,
        "workers": settings.workers,
        "use_multiprocessing": settings.use_multiprocessing,
    }
    train_data = H5Sequence(
        store_path, split=list(settings.train_split), shuffle=True, seed=settings.seed, **common
    )
    val_data = H5Sequence(store_path, split=settings.val_split, **common)
    num_classes = len(facts["store"]["class_names"])
    shape = (
        (*facts["slice_shape"], 1) if settings.channels == "last" else (1, *facts["slice_shape"])
    )
    model = model_fn(num_classes, shape, f"channels_{settings.channels}")
    model.compile(
        optimizer=keras.optimizers.Adam(settings.learning_rate),
        loss="binary_crossentropy" if num_classes == 2 else "sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )
    show = sys.stderr.isatty() if progress is None else progress
    history_log = keras.callbacks.CSVLogger(run_dir / "history.csv")
    own = [
        keras.callbacks.EarlyStopping(
            monitor="val_accuracy",
            mode="max",
            patience=settings.patience,
            restore_best_weights=True,
        ),
        keras.callbacks.ModelCheckpoint(
            run_dir / "model.keras", monitor="val_accuracy", mode="max", save_best_only=True
        ),
        history_log,
    ]
    if show:
        from tqdm.keras import TqdmCallback

        own.append(TqdmCallback(verbose=1))
    result = Result(run_dir)
    started = time.perf_counter()
    try:
        model.fit(
            train_data,
            validation_data=val_data,
            epochs=settings.epochs,
            callbacks=[*own, *callbacks],
            shuffle=False,  # H5Sequence shuffles, by (seed, epoch)
            verbose=0 if show else 2,
        )
    except KeyboardInterrupt:
        history_log.on_train_end()  # Keras skips it on an interrupt: close history.csv
        result.interrupted = True
    history = read_history(run_dir / "history.csv")
    result.epochs_run = len(history.get("loss", []))
    if history.get("val_accuracy"):
        result.best_epoch = int(np.argmax(history["val_accuracy"])) + 1
    if history:
        plot_curves(history, run_dir / "curves.png")
    summary = {
        "epochs_run": result.epochs_run,
        "best_epoch": result.best_epoch,
        "interrupted": result.interrupted,
        "seconds": round(time.perf_counter() - started, 1),
    }
    if result.interrupted:
        (run_dir / "metrics.json").write_text(json.dumps(summary, indent=2))
        return result
    splits = {settings.val_split: val_data}
    if test_split:
        splits[test_split] = H5Sequence(store_path, split=test_split, **common)
    result.metrics = {name: _evaluate(model, data, store_path) for name, data in splits.items()}
    (run_dir / "metrics.json").write_text(
        json.dumps({**summary, "splits": result.metrics}, indent=2)
    )
    plot_confusions(result.metrics, facts["store"]["class_names"], run_dir / "confusion.png")
    return result


def _evaluate(model: keras.Model, data: H5Sequence, store_path: Path) -> dict:
    """Slice- and subject-level results of the model on an unshuffled sequence."""
    outputs = model.predict(data, verbose=0)
    rows = np.concatenate([data.rows(i) for i in range(len(data))])
    with open_store(store_path) as store:
        start, stop = int(rows.min()), int(rows.max()) + 1  # a split is one contiguous range
        labels = store.labels[start:stop][rows - start]
        scans = store.subject[start:stop][rows - start]
        subject_ids = store.subjects_table()[SUBJECT_ID][scans]
    return evaluate_outputs(outputs, labels, subject_ids)


def _store_facts(path: Path, settings: Settings) -> dict:
    """Check the store can be trained on; its identity for config.json."""
    try:
        with open_store(path) as store:
            if not store.labelled:
                raise TrainingError(f"{path}: the store has no labels: nothing to train on")
            if len(store.class_names) < 2:
                raise TrainingError(
                    f"{path}: the store has one class ({store.class_names[0]}): "
                    "nothing to tell apart"
                )
            test_split = settings.test_split
            if test_split is None and "test" in store.splits:
                test_split = "test"
            for name in [
                *settings.train_split,
                settings.val_split,
                *([test_split] if test_split else []),
            ]:
                store.select(name)
                if len(store.splits[name]) == 0:
                    raise TrainingError(f"{path}: split {name!r} has no slices")
            return {
                "test_split": test_split,
                "slice_shape": store.slice_shape,
                "store": {
                    "path": os.path.abspath(path),
                    "uuid": store.uuid,
                    "created": store.created,
                    "class_names": store.class_names,
                    "splits": {name: [s.start, s.stop] for name, s in store.splits.items()},
                    "config": store.config,
                },
            }
    except (FileNotFoundError, ValueError) as exc:
        if isinstance(exc, TrainingError):
            raise
        raise TrainingError(str(exc)) from exc


def _prepare(run_dir: Path, overwrite: bool) -> None:
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


def _versions() -> dict:
    versions = {"python": platform.python_version()}
    for package in ("slicestore", "keras", "tensorflow", "numpy", "h5py", "nibabel", "scipy"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    versions["keras_backend"] = keras.backend.backend()
    return versions
