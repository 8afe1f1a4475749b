"""TensorBoard logs of a run (``--tensorboard``): Keras' own callback, one step per epoch.

Logs go to ``RUN_DIR/tensorboard/`` (``train/`` and ``validation/``, as Keras names them):
the epoch's scalars (loss, metrics, learning rate) at step = epoch index (from 0, as
TensorBoard counts), and the model graph once. They are written before the epoch's
checkpoint; a resumed run first removes from the logs every epoch after its checkpoint
(an epoch whose checkpoint a kill prevented is run again) and the graph (written again),
so each epoch is in the logs once.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import keras

from loader import files
from training.errors import TrainingError

PARTIAL = "prune.partial"  # a rewritten event file before it replaces the old one


def check_available() -> None:
    """Raise when TensorFlow's summary writer or TensorBoard, which it needs, is missing.

    Raises:
        TrainingError: no TensorFlow or no TensorBoard.
    """
    missing = [name for name in ("tensorflow", "tensorboard") if not importlib.util.find_spec(name)]
    if missing:
        raise TrainingError(
            f"--tensorboard writes its logs with TensorFlow's summary writer: pip install "
            f"{' '.join(missing)} (or leave out --tensorboard)"
        )


class EpochLog(keras.callbacks.TensorBoard):
    """Keras' ``TensorBoard`` with scalars per epoch only and the graph written once,
    however many ``fit`` calls a (resumed) run makes."""

    def __init__(self, log_dir: str | os.PathLike):
        super().__init__(log_dir=str(log_dir), write_graph=True, update_freq="epoch")
        self._graph_written = False

    def set_model(self, model):
        self.write_graph = not self._graph_written
        super().set_model(model)
        self.write_graph, self._graph_written = True, True

    def on_test_end(self, logs=None):
        # Keras also logs validation against optimizer steps here: left out, so that a
        # step is an epoch everywhere in the logs
        self._pop_writer()


def prune(log_dir: Path, epoch: int) -> None:
    """Remove from the logs the scalars of epochs from ``epoch`` on, and the graph.

    Each event file is rewritten whole through :func:`loader.files.replacing` (a kill
    leaves the old one or the new one); a file left with no scalars is removed.
    """
    if not log_dir.is_dir():
        return
    for path in sorted(log_dir.rglob("*tfevents*")):
        kept, dropped = [], 0
        for event in read_events(path):
            graph = event.HasField("graph_def") or any(
                value.metadata.plugin_data.plugin_name == "graph_keras_model"
                for value in event.summary.value
            )
            if graph or (event.HasField("summary") and event.step >= epoch):
                dropped += 1
            else:
                kept.append(event)
        if not dropped:
            continue
        if not any(event.HasField("summary") for event in kept):
            path.unlink()
            continue
        import tensorflow as tf

        # the temporary's name has no "tfevents": TensorBoard never reads a half-written one
        with (
            files.replacing(path, path.with_name(PARTIAL)) as temporary,
            tf.io.TFRecordWriter(str(temporary)) as writer,
        ):
            for event in kept:
                writer.write(event.SerializeToString())


def read_events(path: Path) -> list:
    """The events (``Event`` protocol buffers) of one TensorBoard event file, in order."""
    import tensorflow as tf
    from tensorflow.core.util import event_pb2

    return [
        event_pb2.Event.FromString(record.numpy()) for record in tf.data.TFRecordDataset(str(path))
    ]
