"""``train``: fit a model on one store (or several read as one) and leave a complete run folder.

A run is a short sequence of steps, each a function of its own: choose the target and
check the stores against it (``training.data``: :func:`choose_target`,
:func:`check_store`), make the run folder and its ``config.json``
(:func:`prepare_run_dir`, :func:`run_config`), build the data (``training.data``:
:func:`build_data`), build and compile the model and fit it (``training.fitting``:
:func:`build_model`, :func:`fit`), evaluate and write the results (``training.results``).

Every read of a run comes from the stores it started on: they stay open for the whole
run, every sequence is checked to read them, and a store replaced at its path during the
run stops the run with one line instead of mixing two stores.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path

import keras

from loader import Store, files, open_store
from loader.options import SettingError
from loader.store import StoreChangedError
from loader.stores import check_agree, store_paths
from loader.target import SEGMENTATION, Target
from training import distributed, run_folder, tensorboard
from training.data import build_data, check_store, choose_target, class_weights
from training.errors import TrainingError
from training.fitting import MONITORS, best_epoch, build_model, fit
from training.model import build, unet
from training.plots import read_history
from training.results import evaluate, write_results
from training.settings import NOT_COMPUTED, Settings, saved_settings

__all__ = ["Result", "Settings", "TrainingError", "train"]


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


def train(
    store: str | os.PathLike | list,
    run_dir: str | os.PathLike,
    overwrite: bool = False,
    resume: bool = False,
    model_fn=None,
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
        resume: continue the run in ``run_dir`` from its last checkpoint (the same
            settings and stores; ``workers``, ``use_multiprocessing`` and
            ``checkpoint_every`` may differ); start it when ``run_dir`` holds none.
        model_fn: ``model_fn(num_classes, input_shape, data_format) -> keras.Model`` whose
            output is class probabilities: one sigmoid unit for two classes, or one unit
            per class (softmax); one linear unit for regression (``num_classes`` 0); a
            softmax per pixel for segmentation. It is always asked for a channels-last
            model; with ``channels="first"`` the run puts a transpose in front of it.
            Defaults to :func:`training.model.build`, and :func:`training.model.unet` for
            ``target="mask"``.
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
        FileExistsError: ``run_dir`` is not empty and neither ``overwrite`` nor ``resume``.
    """
    settings = Settings(**settings)
    if resume and (overwrite or settings.distributed):
        raise SettingError(
            "{resume} continues a run on one process: leave out --overwrite and --distributed",
            resume=resume,
        )
    report = report or (lambda line: print(line, file=sys.stderr))
    if settings.tensorboard:
        tensorboard.check_available()
    process = _start_processes(settings)
    with _open(store) as opened, _own_run_dir(run_dir, process) as run_dir:
        targets = choose_target(opened, settings)
        if model_fn is None:
            model_fn = unet if targets[0].task == SEGMENTATION else build
        test_split = check_store(opened, settings, targets, report)
        config = run_config(opened, settings, test_split, model_fn, targets[0], process)
        resume = resume and _resumable(run_dir, config)
        if not resume:
            prepare_run_dir(run_dir, overwrite)
            files.write_text(run_dir / run_folder.CONFIG, json.dumps(config, indent=2))
        return _fit_and_score(
            opened,
            settings,
            targets,
            test_split,
            model_fn,
            run_dir,
            process,
            resume,
            progress=progress,
            callbacks=callbacks,
        )


def _fit_and_score(
    stores: list[Store],
    settings: Settings,
    targets: list[Target],
    test_split: str | None,
    model_fn,
    run_dir: Path,
    process: tuple[int, int],
    resume: bool,
    progress: bool | None,
    callbacks,
) -> Result:
    """Build the data and the model, fit, score, and write the results into ``run_dir``."""
    target = targets[0]
    keras.utils.set_random_seed(settings.seed)
    _deterministic_ops()
    data = build_data(stores, settings, target, test_split, process)
    model = build_model(model_fn, stores, settings, targets)
    monitor = MONITORS[target.task]
    weights = class_weights(stores, settings, targets) if settings.class_weight != "none" else None
    result = Result(run_dir, process=process)
    started = time.perf_counter()
    result.interrupted = _same_store(
        stores,
        fit,
        model,
        data,
        settings,
        monitor,
        run_dir,
        progress,
        callbacks,
        weights,
        resume,
        process[1] == 1,
    )
    predictions, examples = [], {}
    if process[1] > 1:
        model = distributed.local_copy(model)
    if not result.interrupted and process[0] == 0:
        try:
            result.metrics, predictions, examples = _same_store(
                stores, evaluate, model, data, stores, targets
            )
        except KeyboardInterrupt:  # the checkpoint says training is done: --resume scores
            result.interrupted = True
    result.epochs_run, result.best_epoch = _epochs(run_dir, monitor)
    summary = {
        "epochs_run": result.epochs_run,
        "best_epoch": result.best_epoch,
        "interrupted": result.interrupted,
        "seconds": round(time.perf_counter() - started, 1),
    }
    write_results(run_dir, summary, result.metrics, predictions, target, monitor[0], examples)
    if not result.interrupted:
        (run_dir / run_folder.CHECKPOINT).unlink(missing_ok=True)  # the run is complete
    result.model = model
    return result


def _epochs(run_dir: Path, monitor: tuple[str, str]) -> tuple[int, int | None]:
    """Epochs run and the best one (numbered from 1), from ``history.csv``."""
    history = read_history(run_dir / run_folder.HISTORY)
    return len(history.get("loss", [])), best_epoch(history, monitor)


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


def prepare_run_dir(run_dir: Path, overwrite: bool) -> None:
    """Make the run folder; an earlier run's files in it only with ``overwrite``."""
    if run_dir.exists() and not run_dir.is_dir():
        raise FileExistsError(f"{run_dir}: exists and is not a folder")
    if run_dir.is_dir() and any(run_dir.iterdir()):
        if not overwrite:
            raise FileExistsError(
                f"{run_dir}: exists and is not empty; use --overwrite to replace its run"
            )
        _remove_run_files(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)


def run_config(
    stores: list[Store],
    settings: Settings,
    test_split: str | None,
    model_fn,
    target: Target,
    process: tuple[int, int] = (0, 1),
) -> dict:
    """What ``config.json`` holds: every setting, the target, the model function,
    versions, the stores read.

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
    return {
        "settings": {**asdict(settings), "test_split": test_split},
        "target": {"name": target.name, "task": target.task, "class_names": target.class_names},
        "store": facts[0] if len(facts) == 1 else facts,
        "model": f"{getattr(model_fn, '__module__', '')}.{getattr(model_fn, '__qualname__', '')}",
        "versions": _versions(),
        "processes": process[1],
        "command": sys.argv,
    }


def _resumable(run_dir: Path, config: dict) -> bool:
    """Whether ``run_dir`` holds a run to continue with this ``config``.

    Returns:
        True with a checkpoint to continue from; False for a folder without a run (or one
        killed before its first checkpoint, whose files are removed): start afresh.

    Raises:
        TrainingError: the run is complete, or was started with other settings, another
            target or model, or other stores.
    """
    saved_path = run_dir / run_folder.CONFIG
    if not saved_path.is_file():
        return False
    try:
        saved = json.loads(saved_path.read_text())
    except (OSError, ValueError) as exc:
        raise TrainingError(f"{saved_path}: unreadable ({exc}): not a run to resume") from exc
    now = json.loads(json.dumps(config))  # tuples as JSON lists, like the saved one
    for key in ("settings", "target", "model"):
        mine, theirs = now.get(key), saved.get(key)
        if key == "settings":
            mine = {k: v for k, v in mine.items() if k not in NOT_COMPUTED}
            theirs = {k: v for k, v in saved_settings(saved).items() if k not in NOT_COMPUTED}
        if mine != theirs:
            differ = (
                sorted(k for k in mine if mine.get(k) != theirs.get(k))
                if isinstance(mine, dict) and isinstance(theirs, dict)
                else [key]
            )
            raise TrainingError(
                f"{run_dir}: --resume needs the run's own settings; these differ: "
                f"{', '.join(differ)} (see its config.json)"
            )
    stores, before = run_folder.stores_read(now), run_folder.stores_read(saved)
    if [s["uuid"] for s in stores] != [s.get("uuid") for s in before]:
        raise TrainingError(
            f"{run_dir}: --resume needs the stores the run read; "
            f"{', '.join(s['path'] for s in stores)} is not (it was rewritten?)"
        )
    if not (run_dir / run_folder.CHECKPOINT).is_file():
        if (run_dir / run_folder.METRICS).is_file() and not _interrupted(run_dir):
            raise TrainingError(f"{run_dir}: the run is complete; nothing to resume")
        _remove_run_files(run_dir, keep=(run_folder.CONFIG,))
        return False
    return True


def _remove_run_files(run_dir: Path, keep=()) -> None:
    """Remove an earlier run's files (and its TensorBoard logs) from ``run_dir``."""
    for name in run_folder.RUN_FILES:
        if name not in keep:
            (run_dir / name).unlink(missing_ok=True)
    shutil.rmtree(run_dir / run_folder.TENSORBOARD, ignore_errors=True)


def _interrupted(run_dir: Path) -> bool:
    try:
        return bool(json.loads((run_dir / run_folder.METRICS).read_text()).get("interrupted"))
    except (OSError, ValueError):
        return True


def _deterministic_ops() -> None:
    """Make TensorFlow's ops deterministic, so a resumed run equals an uninterrupted one."""
    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        tf.config.experimental.enable_op_determinism()


def _versions() -> dict:
    versions = {"python": platform.python_version()}
    for package in ("slicestore", "keras", "tensorflow", "numpy", "h5py", "nibabel", "scipy"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    versions["keras_backend"] = keras.backend.backend()
    return versions
