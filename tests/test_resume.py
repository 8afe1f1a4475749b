"""Kill a training run for real (SIGKILL, SIGTERM), resume it, get the uninterrupted run."""

from __future__ import annotations

import csv
import gc
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import keras
import numpy as np
import pytest
from helpers import write_id_store
from run_helpers import StopAt, interrupted_and_resumed

from training.cli import main as training_main
from training.inference import predict
from training.run import TrainingError, train
from training.tensorboard import read_events

ROOT = Path(__file__).resolve().parents[1]
# Three epochs of 32-slice batches, early stopping with a short patience (its state must
# survive the kill too), a checkpoint every 3 batches; on the phantoms in slices of 32 x 32
# (small_phantom_store: a run costs about half of one on 64 x 64, and what resuming keeps
# does not depend on the slice size).
OPTIONS = ["--epochs", "3", "--batch-size", "32", "--patience", "1", "--seed", "2"]
OPTIONS += ["--checkpoint-every", "3"]
SETTINGS = {"epochs": 3, "batch_size": 32, "patience": 1, "seed": 2, "checkpoint_every": 3}

# A run that kills itself with SIGKILL: after batch BATCH of epoch EPOCH (0-based), or in
# the middle of writing its checkpoint number WRITE (after the bytes, before the rename);
# with REFERENCE set, after the same command uninterrupted into that folder (one process
# start less where starting costs most: JAX).
KILLED_RUN = (
    textwrap.dedent("""
    import os, signal, sys
    import keras
    import training
    from training import checkpoints

    store, run_dir, where, at = sys.argv[1:5]
    at = int(at)
    more = {name: True for name in sys.argv[5:]}  # flags: tensorboard

    class KillAfterBatch(keras.callbacks.Callback):
        epoch = 0
        def on_epoch_begin(self, epoch, logs=None):
            self.epoch = epoch
        def on_train_batch_end(self, batch, logs=None):
            if where == "batch" and (self.epoch, batch) == (1, at):
                os.kill(os.getpid(), signal.SIGKILL)

    written = [0]
    savez = checkpoints.np.savez
    def savez_then_die(*args, **kwargs):
        savez(*args, **kwargs)
        written[0] += 1
        if where == "write" and written[0] == at:
            os.kill(os.getpid(), signal.SIGKILL)
    checkpoints.np.savez = savez_then_die

    if os.environ.get("REFERENCE"):  # the uninterrupted run first, in this process
        from training.cli import main
        assert main([store, "-o", os.environ["REFERENCE"], *{options}]) == 0
    training.train(
        store, run_dir, progress=False, callbacks=[KillAfterBatch()], **{settings}, **more
    )
""")
    .replace("{settings}", repr(SETTINGS))
    .replace("{options}", repr(OPTIONS))
)


def _training(store: Path, run_dir: Path, *more: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "training", str(store), "-o", str(run_dir), *OPTIONS, *more],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
        **kwargs,
    )


def _train_here(store: Path, run_dir: Path, *more: str) -> int:
    """The same command as :func:`_training`, in this process (no second TensorFlow start)."""
    return training_main([str(store), "-o", str(run_dir), *OPTIONS, *more])


def _assert_same_run(run_dir: Path, reference: Path) -> None:
    """The same best weights, history (each epoch once) and scores as the reference run."""
    assert (run_dir / "history.csv").read_bytes() == (reference / "history.csv").read_bytes()
    # compile=False: a model saved under JAX asks for XLA, which TensorFlow may refuse
    mine = keras.models.load_model(run_dir / "model.keras", compile=False).get_weights()
    theirs = keras.models.load_model(reference / "model.keras", compile=False).get_weights()
    assert all(np.array_equal(a, b) for a, b in zip(mine, theirs, strict=True))
    metrics = json.loads((run_dir / "metrics.json").read_text())
    expected = json.loads((reference / "metrics.json").read_text())
    assert metrics["splits"] == expected["splits"]
    assert metrics["epochs_run"] == expected["epochs_run"]
    assert (run_dir / "predictions.csv").read_text() == (reference / "predictions.csv").read_text()
    assert not (run_dir / "checkpoint.npz").exists()  # a complete run keeps none


@pytest.fixture(scope="module")
def reference(small_phantom_store, tmp_path_factory) -> Path:
    """The run never interrupted."""
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    assert _train_here(small_phantom_store, run_dir) == 0
    return run_dir


@pytest.mark.parametrize(
    ("where", "at", "readers"),
    [
        ("batch", 4, []),
        ("batch", 0, ["--workers", "2", "--multiprocessing"]),
        ("write", 3, ["--tensorboard"]),
    ],
    ids=[
        "after-a-batch",
        "after-an-epoch-end-read-by-processes",
        "while-writing-a-checkpoint-with-tensorboard-logs",
    ],
)
def test_a_killed_run_resumes_to_the_weights_history_and_scores_of_an_uninterrupted_one(
    small_phantom_store, reference, tmp_path, capsys, where, at, readers
):
    run_dir = tmp_path / "run"
    killed = subprocess.run(
        [sys.executable, "-c", KILLED_RUN, str(small_phantom_store), str(run_dir), where, str(at)]
        + [flag[2:] for flag in readers if flag == "--tensorboard"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    state = json.loads(str(np.load(run_dir / "checkpoint.npz")["state"]))
    if where == "batch":  # killed after batch 4 (0) of epoch 1: the checkpoint after 3 (0)
        assert (state["epoch"], state["batch"]) == (1, 3 if at == 4 else 0)
    else:  # killed writing the third checkpoint: the second stands, the half-done one is left
        assert (run_dir / "checkpoint.npz.partial").exists()
        assert (state["epoch"], state["batch"]) == (0, 6)
    if "--tensorboard" in readers:  # epoch 0 reached the logs before its checkpoint did
        assert 0 in _logged_steps(run_dir / "tensorboard" / "train")["epoch_loss"]
    # the readers may differ from the killed run's
    assert _train_here(small_phantom_store, run_dir, "--resume", *readers) == 0
    assert "Traceback" not in capsys.readouterr().err
    _assert_same_run(run_dir, reference)  # TensorBoard's logs change nothing computed
    if "--tensorboard" in readers:
        _assert_each_epoch_logged_once(run_dir)


def test_a_killed_run_resumes_exactly_on_jax_too(small_phantom_store, phantom_bids, tmp_path):
    env = {**os.environ, "KERAS_BACKEND": "jax"}
    reference = tmp_path / "reference"
    run_dir = tmp_path / "run"
    killed = subprocess.run(
        [sys.executable, "-c", KILLED_RUN, str(small_phantom_store), str(run_dir), "batch", "4"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
        env={**env, "REFERENCE": str(reference)},
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    resumed = _training(small_phantom_store, run_dir, "--resume", env=env)
    assert resumed.returncode == 0, resumed.stderr
    assert json.loads((run_dir / "config.json").read_text())["versions"]["keras_backend"] == "jax"
    _assert_same_run(run_dir, reference)
    # the model trained on JAX predicts on TensorFlow (this process) as it scored on JAX
    predict(reference, [phantom_bids], tmp_path / "on_tf", workers=1, report=lambda _: None)
    with open(tmp_path / "on_tf" / "predictions.csv", newline="") as handle:
        on_tf = {row["subject"]: row for row in csv.DictReader(handle)}
    with open(reference / "predictions.csv", newline="") as handle:
        for row in csv.DictReader(handle):
            assert on_tf[row["subject"]]["predicted"] == row["predicted"]
            assert float(on_tf[row["subject"]]["probability"]) == pytest.approx(
                float(row["probability"]), abs=1e-3
            )


def test_sigterm_finishes_the_batch_checkpoints_and_the_printed_command_resumes(
    small_phantom_store, reference, tmp_path
):
    run_dir = tmp_path / "run"
    command = [sys.executable, "-m", "training", str(small_phantom_store), "-o", str(run_dir)]
    command += [*OPTIONS[:-2], "--checkpoint-every", "0"]  # epoch ends only, unless stopped
    process = subprocess.Popen(
        command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    deadline = time.monotonic() + 120
    while not (run_dir / "checkpoint.npz").exists():  # the first epoch's: stop in the next
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=60)
    assert process.returncode == 130, err
    assert "Traceback" not in err
    line = err.strip().splitlines()[-1]
    assert line.startswith("interrupted after "), err
    resume = shlex.split(line.split("continue with: ", 1)[1])
    assert resume[:3] == ["python", "-m", "training"]
    assert resume[-1] == "--resume"
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["interrupted"] is True
    assert training_main(resume[3:]) == 0  # the printed command's arguments, in this process
    _assert_same_run(run_dir, reference)


def test_resume_refuses_other_settings_and_a_complete_run(small_phantom_store, reference):
    with pytest.raises(TrainingError, match=r"these differ: seed"):
        train(small_phantom_store, reference, resume=True, **{**SETTINGS, "seed": 3})
    with pytest.raises(TrainingError, match="the run is complete; nothing to resume"):
        train(small_phantom_store, reference, resume=True, **{**SETTINGS, "workers": 2})


def test_a_run_from_before_feed_resumes_with_feed_float32_only(
    small_phantom_store, reference, tmp_path
):
    """config.json of a run written before --feed existed: its batches were float32."""
    old = tmp_path / "old"
    shutil.copytree(reference, old)
    config = json.loads((old / "config.json").read_text())
    assert config["settings"].pop("feed") == "stored"
    (old / "config.json").write_text(json.dumps(config))
    with pytest.raises(TrainingError, match=r"these differ: feed"):
        train(small_phantom_store, old, resume=True, **SETTINGS)
    with pytest.raises(TrainingError, match="the run is complete; nothing to resume"):
        train(small_phantom_store, old, resume=True, **{**SETTINGS, "feed": "float32"})


def test_a_run_from_before_read_groups_resumes_with_read_mib_0_only(
    small_phantom_store, reference, tmp_path
):
    """config.json of a run written before --read-mib existed: its epochs were permuted
    chunk by chunk, so only read_mib 0 replays them."""
    old = tmp_path / "old"
    shutil.copytree(reference, old)
    config = json.loads((old / "config.json").read_text())
    assert config["settings"].pop("read_mib") == 4
    (old / "config.json").write_text(json.dumps(config))
    with pytest.raises(TrainingError, match=r"these differ: read_mib"):
        train(small_phantom_store, old, resume=True, **SETTINGS)
    with pytest.raises(TrainingError, match="the run is complete; nothing to resume"):
        train(small_phantom_store, old, resume=True, **{**SETTINGS, "read_mib": 0})


def test_resume_in_an_empty_folder_starts_the_run(small_phantom_store, reference, tmp_path):
    assert _train_here(small_phantom_store, tmp_path / "run", "--resume") == 0
    _assert_same_run(tmp_path / "run", reference)


def test_a_stopped_run_leaves_no_data_pipeline_for_a_later_collection(
    small_phantom_store, tmp_path
):
    """A fit stopped by Ctrl-C leaves its tf.data iterator in a reference cycle; freed by
    the garbage collection of a later run (in the middle of its tracing), its destructor
    waited ~20 s. ``train`` frees it before it returns."""
    gc.collect()
    gc.disable()
    try:
        settings = {"epochs": 1, "batch_size": 8, "progress": False}
        stopped = train(small_phantom_store, tmp_path / "r", callbacks=[StopAt(0, 1)], **settings)
        left = [o for o in gc.get_objects() if type(o).__name__ == "OwnedIterator"]
    finally:
        gc.enable()
    assert stopped.interrupted
    assert left == []


def test_several_stores_with_augmentation_resume_exactly(tmp_path):
    """Augmentation's random layers keep their seed states; two stores read as one."""
    stores = [  # slices of 32 x 32: what resuming keeps does not depend on their size
        write_id_store(tmp_path / f"{name}.h5", seed=seed, size=32)
        for name, seed in [("a", 0), ("b", 1)]
    ]
    settings = {"epochs": 2, "batch_size": 16, "augment": "flip", "checkpoint_every": 4, "seed": 5}
    whole = train(stores, tmp_path / "whole", progress=False, **settings)
    resumed = interrupted_and_resumed(stores, tmp_path / "resumed", (1, 5), **settings)
    assert not resumed.interrupted
    for a, b in zip(whole.model.get_weights(), resumed.model.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)
    history = (tmp_path / "resumed" / "history.csv").read_bytes()
    assert history == (tmp_path / "whole" / "history.csv").read_bytes()
    assert resumed.metrics == whole.metrics


def test_an_interrupt_while_scoring_is_resumed_by_scoring(
    small_phantom_store, tmp_path, monkeypatch
):
    """Ctrl-C after the last epoch, during evaluation: --resume trains nothing more."""
    import training.run

    def interrupted(*args):
        raise KeyboardInterrupt

    settings = {**SETTINGS, "epochs": 1}
    with monkeypatch.context() as patch:
        patch.setattr(training.run, "evaluate", interrupted)
        stopped = train(small_phantom_store, tmp_path / "run", progress=False, **settings)
    assert stopped.interrupted
    assert stopped.epochs_run == 1
    assert (tmp_path / "run" / "checkpoint.npz").is_file()
    resumed = train(small_phantom_store, tmp_path / "run", resume=True, progress=False, **settings)
    whole = train(small_phantom_store, tmp_path / "whole", progress=False, **settings)
    assert not resumed.interrupted
    assert resumed.epochs_run == 1
    assert resumed.metrics == whole.metrics


def _logged_steps(folder: Path) -> dict[str, list[int]]:
    """Tag -> the steps logged, over a TensorBoard folder's event files."""
    steps: dict[str, list[int]] = {}
    for path in sorted(folder.glob("*tfevents*")):
        for event in read_events(path):
            for value in event.summary.value:
                steps.setdefault(value.tag, []).append(event.step)
    return steps


def _assert_each_epoch_logged_once(run_dir: Path) -> None:
    """The logs hold each epoch once, with history.csv's values, and the graph once."""
    with open(run_dir / "history.csv", newline="") as handle:
        history = list(csv.DictReader(handle))
    logged = run_dir / "tensorboard"
    for folder, prefix in (("train", ""), ("validation", "val_")):
        assert sorted(_logged_steps(logged / folder)["epoch_loss"]) == list(range(len(history)))
        for path in sorted((logged / folder).glob("*tfevents*")):
            for event in read_events(path):
                for value in event.summary.value:
                    if value.tag == "epoch_loss":
                        number = np.frombuffer(value.tensor.tensor_content, np.float32)[0]
                        expected = float(history[event.step][prefix + "loss"])
                        assert float(number) == pytest.approx(expected)
    assert _logged_steps(logged / "train")["keras"] == [0]  # the model graph, once
