"""Training runs stopped where a test says and resumed (loads Keras: kept out of helpers.py,
which conftest.py and every worker's start import)."""

from __future__ import annotations

from pathlib import Path

import keras

from training.run import train


class StopAt(keras.callbacks.Callback):
    """Ctrl-C raised after batch ``batch`` of epoch ``epoch``: the process dies there as far
    as the checkpoint knows (it saves nothing more)."""

    def __init__(self, epoch: int, batch: int):
        super().__init__()
        self.at, self.epoch = (epoch, batch), 0

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        if (self.epoch, batch) == self.at:
            raise KeyboardInterrupt


def interrupted_and_resumed(store, run_dir: Path, at: tuple[int, int], **settings):
    """A run stopped after batch ``at[1]`` of epoch ``at[0]``, then resumed: the result."""
    stopped = train(store, run_dir, progress=False, callbacks=[StopAt(*at)], **settings)
    assert stopped.interrupted
    return train(store, run_dir, resume=True, progress=False, **settings)
