"""Early stopping, the best model and checkpoints: everything ``--resume`` continues from.

A checkpoint is one file, ``RUN_DIR/checkpoint.npz``, written beside itself, flushed to
disk and renamed over the previous one, so a kill at any moment leaves a whole
checkpoint. It holds the model's variables (weights, normalisation statistics and the
states of its random-seed generators), the optimizer's, the metrics' running totals,
the best epoch's weights, and a JSON state: the position (epoch, batches done in it),
early stopping's best score and wait, and ``history.csv`` so far.

A run resumed from batch ``b`` of epoch ``e`` reads batches ``b`` onward of epoch
``e``'s plan (the plan is a pure function of ``(seed, epoch)``), with every variable as
it was after batch ``b - 1``: on CPU it ends with the weights, history and metrics of
the run that was never interrupted.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import threading
from pathlib import Path

import keras
import numpy as np

from loader import files
from training import run_folder
from training.errors import TrainingError

_GROUPS = ("model", "optimizer", "metrics", "best")


class RunState(keras.callbacks.Callback):
    """Early stopping on a monitored score, the best model saved, checkpoints written.

    Early stopping follows Keras' ``EarlyStopping(restore_best_weights=True)``: an epoch
    better than every earlier one (strictly) is the best and resets the wait; after
    ``patience`` epochs without one, training stops. Unlike Keras' callbacks, its state
    lives in the checkpoint, and ``model.keras`` is replaced atomically.

    Args:
        run_dir: the run folder.
        sequence: the training data; each epoch follows the plan of its own number (Keras
            also moves it on when a fit starts, which a resumed run's second fit must undo).
        monitor: ``(name, mode)``: the score followed, ``"max"`` or ``"min"``.
        patience: epochs without a better score before stopping.
        steps: batches per epoch.
        every: also checkpoint every this many batches; 0 for epoch ends only.
        keep: write checkpoints at all (False for all but one of several processes).
    """

    def __init__(
        self, run_dir: Path, sequence, monitor, patience: int, every: int, keep: bool = True
    ):
        super().__init__()
        self.run_dir = Path(run_dir)
        self.sequence = sequence
        self.monitor, self.mode = monitor
        self.patience = patience
        self.steps = len(sequence)
        self.every = every
        self.keep = keep
        self.epoch = 0  # the epoch being run (or next to run)
        self.batch = 0  # batches of it done
        self.offset = 0  # batches of the first epoch of this fit skipped (done before)
        self.best = None
        self.best_epoch = None
        self.wait = 0
        self.stopped = False
        self.best_weights = None
        self.stop_requested = False
        self._metrics = None  # running totals to restore when resuming inside an epoch

    @property
    def path(self) -> Path:
        """The checkpoint file."""
        return self.run_dir / run_folder.CHECKPOINT

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch
        if self.sequence.epoch != epoch:
            self.sequence.epoch = epoch
        if self._metrics is not None:  # resumed inside this epoch: its totals so far
            _assign(self.model.metrics_variables, self._metrics, "metrics")
            self._metrics = None

    def on_train_batch_end(self, batch, logs=None):
        self.batch = self.offset + batch + 1
        if self.stop_requested and self.batch < self.steps:  # else at the epoch's end
            self.save()
            raise KeyboardInterrupt
        if self.every and self.batch % self.every == 0 and self.batch < self.steps:
            self.save()

    def on_epoch_end(self, epoch, logs=None):
        current = (logs or {}).get(self.monitor)
        if current is not None:
            self.wait += 1
            better = np.greater if self.mode == "max" else np.less
            if self.best is None or better(current, self.best):
                self.best, self.best_epoch, self.wait = float(current), epoch, 0
                self.best_weights = self.model.get_weights()
                self._save_best_model()
            elif self.wait >= self.patience and epoch > 0:
                self.stopped = True
                self.model.stop_training = True
        self.epoch, self.batch, self.offset = epoch + 1, 0, 0
        self.save()
        if self.stop_requested:
            raise KeyboardInterrupt

    def _save_best_model(self) -> None:
        final = self.run_dir / run_folder.MODEL
        with files.replacing(final, final.with_name("model.partial.keras")) as partial:
            self.model.save(partial)  # Keras wants the .keras ending

    def save(self) -> None:
        """Write the checkpoint of the present position, replacing the previous one."""
        if not self.keep:
            return
        optimizer = self.model.optimizer
        groups = {
            "model": self.model.variables,
            "optimizer": optimizer.variables if optimizer.built else [],
            "metrics": self.model.metrics_variables,
        }
        arrays = {
            f"{group}.{i}": keras.ops.convert_to_numpy(variable)
            for group, variables in groups.items()
            for i, variable in enumerate(variables)
        }
        arrays.update({f"best.{i}": w for i, w in enumerate(self.best_weights or [])})
        history = self.run_dir / run_folder.HISTORY
        state = {
            "epoch": self.epoch,
            "batch": self.batch,
            "best": self.best,
            "best_epoch": self.best_epoch,
            "wait": self.wait,
            "stopped": self.stopped,
            "history": history.read_bytes().decode() if history.is_file() else "",
            "variables": {group: len(variables) for group, variables in groups.items()},
        }
        with files.replacing(self.path) as partial, open(partial, "wb") as handle:
            np.savez(handle, state=np.array(json.dumps(state)), **arrays)

    def restore(self, sample_batch) -> bool:
        """Take the position, early stopping's state and every variable from the checkpoint.

        Args:
            sample_batch: one batch, ``(x, y)`` or ``(x, y, weight)``: evaluating it builds
                the metrics' variables (Keras makes them at the first step) without
                changing the model.

        Returns:
            Whether there was a checkpoint; without one, nothing changes.

        Raises:
            TrainingError: the checkpoint is damaged or was written for another model.
        """
        if not self.path.is_file():
            return False
        try:
            with np.load(self.path, allow_pickle=False) as saved:
                state = json.loads(str(saved["state"]))
                arrays = {group: [] for group in _GROUPS}
                for key in saved.files:
                    group, _, index = key.partition(".")
                    if group in arrays:
                        arrays[group].append((int(index), saved[key]))
        except (OSError, ValueError, KeyError) as exc:
            raise TrainingError(f"{self.path}: not a readable checkpoint ({exc})") from exc
        arrays = {
            group: [a for _, a in sorted(pairs, key=lambda p: p[0])]
            for group, pairs in arrays.items()
        }
        x, y, *weight = sample_batch
        self.model.evaluate(x, y, sample_weight=weight[0] if weight else None, verbose=0)
        optimizer = self.model.optimizer
        if arrays["optimizer"] and not optimizer.built:
            optimizer.build(self.model.trainable_variables)
        _assign(self.model.variables, arrays["model"], "model", self.path)
        if arrays["optimizer"]:
            _assign(optimizer.variables, arrays["optimizer"], "optimizer", self.path)
        self.epoch, self.batch = state["epoch"], state["batch"]
        self.best, self.best_epoch = state["best"], state["best_epoch"]
        self.wait, self.stopped = state["wait"], state["stopped"]
        self.best_weights = arrays["best"] or None
        if self.batch:
            self._metrics = arrays["metrics"]
            _check_fits(self.model.metrics_variables, self._metrics, "metrics", self.path)
        files.write_text(self.run_dir / run_folder.HISTORY, state["history"])
        return True


def _check_fits(variables, arrays, group: str, path=None) -> None:
    shapes = [tuple(v.shape) for v in variables]
    if shapes != [a.shape for a in arrays]:
        raise TrainingError(
            f"{path}: the checkpoint's {group} variables do not fit this run's model "
            f"({len(arrays)} saved, {len(shapes)} here): was it written with other options?"
        )


def _assign(variables, arrays, group: str, path=None) -> None:
    _check_fits(variables, arrays, group, path)
    for variable, value in zip(variables, arrays, strict=True):
        variable.assign(value)


class Rest(keras.utils.PyDataset):
    """Batches ``skip`` onward of a sequence's present epoch: the rest of an interrupted one."""

    def __init__(self, sequence: keras.utils.PyDataset, skip: int):
        super().__init__(
            workers=sequence.workers,
            use_multiprocessing=sequence.use_multiprocessing,
            max_queue_size=sequence.max_queue_size,
        )
        self.sequence, self.skip = sequence, skip

    def __len__(self) -> int:
        return len(self.sequence) - self.skip

    def __getitem__(self, index: int):
        return self.sequence[self.skip + index]

    def on_epoch_end(self) -> None:
        self.sequence.on_epoch_end()


@contextlib.contextmanager
def stop_at_batch_end(state: RunState, immediate_terminate: bool):
    """Ctrl-C or SIGTERM finish the batch, write a checkpoint, then stop (KeyboardInterrupt).

    A second signal stops at once. ``immediate_terminate``: SIGTERM stops at once (reader
    processes die of it, so waiting for the batch could wait for ever).
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    owner = os.getpid()

    def request(signum, frame):
        if os.getpid() != owner:  # a reader process forked while this handler was set
            if signum == signal.SIGTERM:  # its pool ending it: die as by default, quietly
                signal.signal(signum, signal.SIG_DFL)
                os.kill(os.getpid(), signum)
            return  # Ctrl-C reaches the whole group: the main process stops the run
        if state.stop_requested or (signum == signal.SIGTERM and immediate_terminate):
            raise KeyboardInterrupt
        state.stop_requested = True

    previous = {s: signal.signal(s, request) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)
