"""Data-parallel training over two local processes with keras.distribution on JAX."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
from helpers import free_port

from loader.store import open_store
from training.cli import main as training_main

ROOT = Path(__file__).resolve().parents[1]
PROCESS = """
import sys, numpy as np, training.cli
from loader import H5Sequence
try:  # JAX writes its compilation cache from process 0 only; on CPU a program's key holds
    from jax._src import compiler, distributed  # its devices, so process 1 compiled its ~190
    write = compiler._cache_write  # programs again in every run (~16 s): let it write too
    def write_from_any_process(*args, **kwargs):
        state, saved = distributed.global_state, distributed.global_state.process_id
        state.process_id = 0
        try:
            return write(*args, **kwargs)
        finally:
            state.process_id = saved
    compiler._cache_write = write_from_any_process
except (ImportError, AttributeError):  # another JAX: process 1 compiles, slower, as correct
    pass
index, port, store, run_dir, out = int(sys.argv[1]), sys.argv[2], *sys.argv[3:]
served = []  # (epoch, row) of every training slice this process read
read = H5Sequence.__getitem__
def logged(self, i):
    if self.shard is not None:  # the training data: validation is read whole
        served.extend((self.epoch, int(row)) for row in self.rows(i))
    return read(self, i)
H5Sequence.__getitem__ = logged
results = []
train = training.cli.train
training.cli.train = lambda *args, **kwargs: results.append(train(*args, **kwargs)) or results[0]
code = training.cli.main([
    store, "-o", run_dir, "--target", "mask", "--epochs", "2", "--batch-size", "32",
    "--patience", "5", "--seed", "3", "--distributed", "--coordinator", f"127.0.0.1:{port}",
    "--num-processes", "2", "--process-id", str(index),
])
assert code == 0 and results[0].process == (index, 2)
np.save(out, np.concatenate([np.ravel(w) for w in results[0].model.get_weights()]))
np.save(out.replace("weights", "rows"), np.array(served))
print("TensorFlow imported:", "tensorflow" in sys.modules)  # a JAX run needs none of it
"""


def test_two_processes_train_one_model_on_their_own_shares(small_lesion_store, tmp_path):
    """Two JAX processes segment lesions (the U-Net, its Dice metric reset on every
    backend): one model kept in step, each process reading its own rows of every epoch."""
    port, run_dir = free_port(), tmp_path / "run"
    env = {**os.environ, "KERAS_BACKEND": "jax", "JAX_PLATFORMS": "cpu"}
    processes = [
        subprocess.Popen(
            [
                sys.executable,
                "-c",
                PROCESS,
                str(index),
                str(port),
                str(small_lesion_store),
                str(run_dir),
                str(tmp_path / f"weights{index}.npy"),
            ],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for index in range(2)
    ]
    outputs = [process.communicate(timeout=600) for process in processes]
    for process, (_, err) in zip(processes, outputs, strict=True):
        assert process.returncode == 0, err[-3000:]
    assert "process 1 of 2: done" in outputs[1][0]
    assert all("TensorFlow imported: False" in out for out, _ in outputs)
    first, second = (np.load(tmp_path / f"weights{index}.npy") for index in range(2))
    np.testing.assert_array_equal(first, second)  # one model, kept in step
    served = [np.load(tmp_path / f"rows{index}.npy") for index in range(2)]
    with open_store(small_lesion_store) as store:
        train = store.splits["train"]
    # Keras reads one batch to learn the shapes, then two epochs: per epoch of the plan, each
    # process read its own rows (disjoint), and together every row but < one batch a process
    epochs = np.unique(np.concatenate([pairs[:, 0] for pairs in served]))
    for epoch in epochs:
        rows = [set(pairs[pairs[:, 0] == epoch, 1].tolist()) for pairs in served]
        assert rows[0]
        assert rows[1]
        assert not rows[0] & rows[1]
        assert rows[0] | rows[1] <= set(range(train.start, train.stop))
    for epoch in epochs[-2:]:
        both = {int(row) for pairs in served for e, row in pairs if e == epoch}
        assert len(train) - 2 * 16 < len(both)
    config = json.loads((run_dir / "config.json").read_text())
    assert config["processes"] == 2
    assert config["versions"]["keras_backend"] == "jax"
    assert config["settings"]["distributed"] is True
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["epochs_run"] == 2
    assert metrics["task"] == "segmentation"
    assert set(metrics["splits"]) == {"val"}
    assert set(metrics["splits"]["val"]["slices"]["dice"]) == {"1"}
    with open(run_dir / "history.csv") as handle:
        assert len(handle.read().splitlines()) == 3  # one writer: a header and two epochs


def test_distributed_needs_the_jax_backend(phantom_store, tmp_path, capsys):
    args = [str(phantom_store), "-o", str(tmp_path / "run"), "--distributed"]
    assert training_main(args) == 2
    assert "--distributed needs the JAX backend: run with KERAS_BACKEND=jax" in (
        capsys.readouterr().err
    )
    assert training_main([*args[:3], "--process-id", "1"]) == 2
    assert "--process-id need --distributed" in capsys.readouterr().err
