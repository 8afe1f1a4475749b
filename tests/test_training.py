"""python -m training: a complete run folder, metrics that match the saved model, refusals."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pytest
from conftest import write_id_store

from loader import H5Sequence, open_store
from training.cli import main
from training.metrics import evaluate_outputs
from training.run import RUN_FILES, train

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def trained(phantom_store, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("runs") / "run"
    result = train(
        phantom_store, run_dir, epochs=3, batch_size=64, patience=3, seed=1, progress=False
    )
    return phantom_store, run_dir, result


def test_the_run_folder_is_complete(trained):
    _, run_dir, result = trained
    assert sorted(p.name for p in run_dir.iterdir()) == sorted(RUN_FILES)
    with open(run_dir / "history.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == result.epochs_run == 3
    assert {"loss", "accuracy", "val_loss", "val_accuracy"} <= set(rows[0])
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert set(metrics["splits"]) == {"val", "test"}  # test: the store has one
    for split in metrics["splits"].values():
        assert set(split) == {"slices", "subjects"}
        assert split["slices"]["roc_auc"] is not None
        assert np.sum(split["subjects"]["confusion"]) == split["subjects"]["count"]
    for picture in ("curves.png", "confusion.png"):
        assert (run_dir / picture).read_bytes().startswith(b"\x89PNG")


def test_metrics_agree_with_evaluating_the_saved_model(trained):
    store, run_dir, _ = trained
    metrics = json.loads((run_dir / "metrics.json").read_text())["splits"]
    model = keras.models.load_model(run_dir / "model.keras")
    for split in ("val", "test"):
        evaluated = model.evaluate(
            H5Sequence(store, split=split, batch_size=50), verbose=0, return_dict=True
        )
        assert metrics[split]["slices"]["loss"] == pytest.approx(evaluated["loss"], abs=1e-4)
        assert metrics[split]["slices"]["accuracy"] == pytest.approx(
            evaluated["accuracy"], abs=1e-6
        )
        assert metrics[split]["slices"]["count"] == H5Sequence(store, split=split).num_slices


def test_early_stopping_restores_the_best_weights(trained):
    _, run_dir, result = trained
    with open(run_dir / "history.csv", newline="") as handle:
        accuracy = [float(row["val_accuracy"]) for row in csv.DictReader(handle)]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["best_epoch"] == result.best_epoch == int(np.argmax(accuracy)) + 1
    # the model evaluated at the end is the best epoch's, not the last one's
    assert metrics["splits"]["val"]["slices"]["accuracy"] == pytest.approx(max(accuracy), abs=1e-6)


def test_config_names_the_store_it_read(trained):
    store, run_dir, _ = trained
    config = json.loads((run_dir / "config.json").read_text())
    with open_store(store) as opened:
        assert config["store"]["uuid"] == opened.uuid
        assert config["store"]["config"] == opened.config
    assert config["store"]["path"] == os.path.abspath(store)
    assert config["settings"]["epochs"] == 3
    assert config["settings"]["test_split"] == "test"
    assert config["versions"]["keras"] == keras.__version__


def test_subject_level_scores_average_slice_probabilities():
    outputs = np.array([[0.9], [0.2], [0.3], [0.1], [0.8], [0.7]])
    labels = np.array([1, 1, 1, 0, 0, 0])
    subjects = np.array(["a", "a", "a", "b", "b", "b"])
    result = evaluate_outputs(outputs, labels, subjects)
    assert result["slices"]["accuracy"] == pytest.approx(2 / 6)
    assert result["subjects"]["count"] == 2
    # a: mean 0.467 -> class 0 (wrong); b: mean 0.533 -> class 1 (wrong)
    assert result["subjects"]["confusion"] == [[0, 1], [1, 0]]
    assert result["slices"]["roc_auc"] == pytest.approx(5 / 9)  # 5 of 9 pairs ranked right


def test_ctrl_c_leaves_a_usable_run_folder(phantom_store, tmp_path):
    class Interrupt(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            if epoch == 1:
                raise KeyboardInterrupt

    run_dir = tmp_path / "run"
    result = train(
        phantom_store, run_dir, epochs=5, batch_size=64, progress=False, callbacks=[Interrupt()]
    )
    assert result.interrupted
    assert result.epochs_run == 2
    assert {"model.keras", "history.csv", "config.json", "metrics.json", "curves.png"} <= {
        p.name for p in run_dir.iterdir()
    }
    assert json.loads((run_dir / "metrics.json").read_text())["interrupted"] is True
    keras.models.load_model(run_dir / "model.keras")


def test_an_existing_run_folder_is_refused_unless_overwrite(trained, tmp_path, capsys):
    store, _, _ = trained
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "notes.txt").write_text("mine")
    assert main([str(store), "-o", str(run_dir), "--epochs", "1"]) == 2
    assert f"{run_dir}: exists and is not empty" in capsys.readouterr().err
    assert (
        main(
            [
                str(store),
                "-o",
                str(run_dir),
                "--epochs",
                "1",
                "--batch-size",
                "128",
                "--overwrite",
                "--channels",
                "first",
            ]
        )
        == 0
    )
    assert (run_dir / "notes.txt").read_text() == "mine"  # only a run's own files are replaced
    assert (run_dir / "model.keras").is_file()


def test_unlabelled_or_broken_stores_exit_2(tmp_path, capsys):
    unlabelled = write_id_store(tmp_path / "u.h5", scans=4, labelled=False)
    assert main([str(unlabelled), "-o", str(tmp_path / "r1")]) == 2
    assert "has no labels" in capsys.readouterr().err
    (tmp_path / "junk.h5").write_text("junk")
    assert main([str(tmp_path / "junk.h5"), "-o", str(tmp_path / "r2")]) == 2
    assert "not a store" in capsys.readouterr().err
    labelled = write_id_store(tmp_path / "l.h5", scans=4)
    assert main([str(labelled), "-o", str(tmp_path / "r3"), "--val-split", "nope"]) == 2
    assert "no split 'nope'" in capsys.readouterr().err
    assert not (tmp_path / "r1").exists()
    assert not (tmp_path / "r3").exists()


def test_python_dash_m_training_runs(phantom_store, tmp_path):
    command = [sys.executable, "-m", "training", str(phantom_store), "-o", str(tmp_path / "run")]
    result = subprocess.run(
        [*command, "--epochs", "1"], cwd=ROOT, capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "subject accuracy" in result.stdout
    assert (tmp_path / "run" / "metrics.json").is_file()
