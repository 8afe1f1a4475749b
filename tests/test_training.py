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
from helpers import decode_ids, write_id_store

import training
from loader import H5Sequence, open_store
from loader.target import resolve
from training.cli import main
from training.data import check_store
from training.fitting import build_model
from training.metrics import evaluate_outputs
from training.results import evaluate
from training.run import TrainingError, train
from training.run_folder import RUN_FILES
from training.settings import Settings

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def trained(small_phantom_store, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("runs") / "run"
    result = train(
        small_phantom_store, run_dir, epochs=3, batch_size=64, patience=3, seed=1, progress=False
    )
    return small_phantom_store, run_dir, result


def test_the_run_folder_is_complete(trained):
    _, run_dir, result = trained
    # a complete run keeps no checkpoint
    classification = set(RUN_FILES) - {"scatter.png", "segmentation.png", "checkpoint.npz"}
    assert sorted(p.name for p in run_dir.iterdir()) == sorted(classification)
    with open(run_dir / "predictions.csv", newline="") as handle:
        predictions = list(csv.DictReader(handle))
    metrics = json.loads((run_dir / "metrics.json").read_text())["splits"]
    for split in ("val", "test"):
        mine = [row for row in predictions if row["split"] == split]
        assert len(mine) == metrics[split]["subjects"]["count"]
        assert sum(int(row["slices"]) for row in mine) == metrics[split]["slices"]["count"]
        right = sum(row["true"] == row["predicted"] for row in mine)
        assert right / len(mine) == pytest.approx(metrics[split]["subjects"]["accuracy"])
        assert all(0.5 <= float(row["probability"]) <= 1 for row in mine)
    with open(run_dir / "history.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == result.epochs_run == 3
    assert {"loss", "accuracy", "val_loss", "val_accuracy"} <= set(rows[0])
    assert [row["epoch"] for row in rows] == ["1", "2", "3"]  # as the console numbers them
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
        batches = H5Sequence(store, split=split, batch_size=50, output="stored")
        evaluated = model.evaluate(batches, verbose=0, return_dict=True)
        assert metrics[split]["slices"]["loss"] == pytest.approx(evaluated["loss"], abs=1e-4)
        assert metrics[split]["slices"]["accuracy"] == pytest.approx(
            evaluated["accuracy"], abs=1e-6
        )
        assert metrics[split]["slices"]["count"] == H5Sequence(store, split=split).num_slices


def test_a_run_fed_stored_values_equals_one_fed_float32(small_phantom_store, trained, tmp_path):
    """The default run's batches are uint8 scaled by the model's first layer; the same run
    fed float32 intensities (scaled on the host) learns and scores the same."""
    _, stored_run, result = trained
    assert result.model.layers[1].name == "from_stored"
    train(
        small_phantom_store,
        tmp_path / "f",
        epochs=3,
        batch_size=64,
        patience=3,
        seed=1,
        progress=False,
        feed="float32",
    )
    assert "from_stored" not in [
        layer.name for layer in keras.models.load_model(tmp_path / "f" / "model.keras").layers
    ]
    histories = []
    for run_dir in (stored_run, tmp_path / "f"):
        with open(run_dir / "history.csv", newline="") as handle:
            histories.append(list(csv.DictReader(handle)))
    assert len(histories[0]) == len(histories[1]) == 3
    for stored, floats in zip(*histories, strict=True):
        for name in ("loss", "accuracy", "val_loss", "val_accuracy"):
            assert float(stored[name]) == pytest.approx(float(floats[name]), abs=1e-5), name
    metrics = [
        json.loads((d / "metrics.json").read_text())["splits"] for d in (stored_run, tmp_path / "f")
    ]
    for split in ("val", "test"):
        for level in ("slices", "subjects"):
            for name, value in metrics[0][split][level].items():
                if isinstance(value, float):
                    assert value == pytest.approx(metrics[1][split][level][name], abs=1e-5), name


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


def test_ctrl_c_leaves_a_usable_run_folder(small_phantom_store, tmp_path):
    class Interrupt(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            if epoch == 1:
                raise KeyboardInterrupt

    run_dir = tmp_path / "run"
    result = train(
        small_phantom_store,
        run_dir,
        epochs=5,
        batch_size=64,
        progress=False,
        callbacks=[Interrupt()],
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
    model = keras.models.load_model(run_dir / "model.keras")
    assert model.input_shape == (None, 1, 32, 32)  # --channels first (slices of 32)


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


def test_python_dash_m_training_runs_and_prints_only_what_the_user_needs(
    small_phantom_store, tmp_path
):
    command = [
        sys.executable,
        "-m",
        "training",
        str(small_phantom_store),
        "-o",
        str(tmp_path / "run"),
    ]
    quiet_by_us = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    result = subprocess.run(
        [*command, "--epochs", "1"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
        env=quiet_by_us,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "per subject" in result.stdout
    assert (tmp_path / "run" / "metrics.json").is_file()
    for noise in ("absl", "cuInit", "oneDNN", "I0000", "E0000", "W0000"):
        assert noise not in result.stderr + result.stdout


def test_training_train_is_importable_as_the_readme_says():
    assert training.train is train
    assert training.Settings is Settings
    assert issubclass(training.TrainingError, ValueError)


def _two_unit_softmax(num_classes, input_shape, data_format):
    inputs = keras.Input(input_shape)
    x = keras.layers.Flatten()(inputs)
    return keras.Model(inputs, keras.layers.Dense(2, activation="softmax")(x))


def test_the_loss_follows_the_models_output_not_the_class_count(tmp_path):
    two = write_id_store(tmp_path / "two.h5", scans=4)
    three = write_id_store(tmp_path / "three.h5", scans=6, classes="abc")
    with open_store(two) as store:
        labels = resolve(store)
        assert build_model(training.model.build, [store], Settings(), [labels]).loss == (
            "binary_crossentropy"
        )
        softmax = build_model(_two_unit_softmax, [store], Settings(), [labels])
        assert softmax.loss == "sparse_categorical_crossentropy"
    with open_store(three) as store, pytest.raises(TrainingError, match=r"must be \(None, 3\)"):
        build_model(_two_unit_softmax, [store], Settings(), [resolve(store)])
    result = train(two, tmp_path / "run", epochs=1, model_fn=_two_unit_softmax, progress=False)
    assert result.metrics["val"]["slices"]["count"] > 0


def test_three_classes_train_with_a_softmax_and_score_three_by_three(tmp_path):
    store = write_id_store(tmp_path / "three.h5", scans=9, classes="abc", val_fraction=0.34)
    result = train(store, tmp_path / "run", epochs=1, batch_size=32, progress=False)
    model = keras.models.load_model(tmp_path / "run" / "model.keras")
    assert model.output_shape == (None, 3)
    for level in ("slices", "subjects"):
        confusion = np.array(result.metrics["val"][level]["confusion"])
        assert confusion.shape == (3, 3)
        assert confusion.sum() == result.metrics["val"][level]["count"]
        assert result.metrics["val"][level]["roc_auc"] is None
    assert (tmp_path / "run" / "confusion.png").is_file()


def test_check_store_refuses_unlabelled_and_empty_splits_and_warns_of_few_subjects(tmp_path):
    path = write_id_store(tmp_path / "s.h5", scans=8, unlabelled=2)
    lines = []
    with open_store(path) as store:
        assert "unlabelled" in store.splits
        labels = resolve(store)
        assert check_store([store], Settings(), [labels], lines.append) is None
        message = "split 'unlabelled' has no subject with a value for the store's labels"
        with pytest.raises(TrainingError, match=message):
            check_store([store], Settings(val_split="unlabelled"), [labels], lines.append)
        with pytest.raises(TrainingError, match="no split 'nope'"):
            check_store([store], Settings(test_split="nope"), [labels], lines.append)
    assert any("split 'val' has 1 subject(s) of class 'a'" in line for line in lines)


def test_a_labelled_store_with_unlabelled_subjects_trains_on_the_labelled_ones(tmp_path):
    path = write_id_store(tmp_path / "s.h5", scans=10, unlabelled=2)
    every = H5Sequence(path, batch_size=16)
    with open_store(path) as store:
        unlabelled = store.splits["unlabelled"]
        assert every.num_slices == store.num_slices - len(unlabelled)
        assert set(store.labels[unlabelled.start : unlabelled.stop]) == {-1}
    ys = np.concatenate([every[i][1] for i in range(len(every))])
    assert ys.min() >= 0  # never a -1 where labels are expected
    alone = H5Sequence(path, split="unlabelled", batch_size=8)[0]
    assert isinstance(alone, np.ndarray)  # x only, for predict
    with pytest.raises(ValueError, match="split 'unlabelled' has no labels: name it alone"):
        H5Sequence(path, split=["train", "unlabelled"])
    result = train(path, tmp_path / "run", epochs=1, batch_size=32, progress=False)
    assert set(result.metrics) == {"val"}


def test_folds_train_on_some_and_validate_on_another(phantom_bids, tmp_path, capsys):
    store = tmp_path / "folds.h5"
    args = [str(phantom_bids), "-o", str(store), "--label-column", "group", "--folds", "3"]
    from preprocess.cli import main as preprocess_main

    assert preprocess_main([*args, "--workers", "1"]) == 0
    run_dir = tmp_path / "run"
    cli = [str(store), "-o", str(run_dir), "--epochs", "1", "--batch-size", "64"]
    assert main([*cli, "--train-split", "fold0", "fold1", "--val-split", "fold2"]) == 0
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert set(metrics["splits"]) == {"fold2"}
    with open_store(store) as opened:
        assert metrics["splits"]["fold2"]["slices"]["count"] == len(opened.splits["fold2"])
    config = json.loads((run_dir / "config.json").read_text())
    assert config["settings"]["train_split"] == ["fold0", "fold1"]
    assert "1 epoch," in capsys.readouterr().out  # not "1 epochs"


class _ReplaceStore(keras.callbacks.Callback):
    """Writes another store at the run's store path after the first epoch."""

    def __init__(self, path: Path, other: Path):
        super().__init__()
        self.path, self.other = path, other

    def on_epoch_end(self, epoch, logs=None):
        if epoch == 0:
            os.replace(self.other, self.path)


def test_a_store_replaced_during_the_run_stops_it_instead_of_mixing_two_stores(
    small_phantom_store, tmp_path, capsys
):
    import shutil

    path = tmp_path / "store.h5"
    shutil.copy(small_phantom_store, path)
    with open_store(path) as store:
        uuid = store.uuid
    other = write_id_store(tmp_path / "other.h5", scans=8, size=32)  # a store of the same kind
    run_dir = tmp_path / "run"
    with pytest.raises(TrainingError, match="the store changed during the run"):
        train(
            path,
            run_dir,
            epochs=3,
            batch_size=64,
            progress=False,
            callbacks=[_ReplaceStore(path, other)],
        )
    assert json.loads((run_dir / "config.json").read_text())["store"]["uuid"] == uuid
    assert not (run_dir / "metrics.json").exists()  # no scores of a mix of two stores


def test_evaluation_reads_labels_from_the_file_the_predictions_came_from(tmp_path):
    """Labels come through the open store, so a file replaced at the path cannot mix in."""
    path = write_id_store(tmp_path / "ids.h5", scans=8)
    with open_store(path) as store:
        data = {"val": H5Sequence(path, split="val", batch_size=7)}
        data["val"][0]  # this process has opened the file
        os.replace(write_id_store(tmp_path / "other.h5", scans=12, classes="ba"), path)

        class RowIds(keras.Model):
            def predict(self, sequence, verbose=0):
                ids = np.concatenate([decode_ids(sequence[i][0]) for i in range(len(sequence))])
                return (ids // 20 % 2).astype(np.float32)[:, None]  # the true class, from x

        results, _, _ = evaluate(RowIds(), data, [store], [resolve(store)])
    assert results["val"]["slices"]["accuracy"] == 1.0


# Trains with channels last and channels first in a process whose TensorFlow runs without
# oneDNN (as it does on AMD CPUs, where a channels-first convolution's gradient stops with
# "Conv2DCustomBackpropInputOp only supports NHWC"), and prints both runs' histories.
CHANNELS_FIRST_RUN = """
import json, sys
import keras
from training.run import train
store, out = sys.argv[1:]
for channels in ("last", "first"):
    train(store, f"{out}/{channels}", epochs=1, batch_size=64, seed=1, progress=False,
          channels=channels)
shape = keras.models.load_model(f"{out}/first/model.keras").input_shape
print(json.dumps(shape))
"""


def test_channels_first_trains_without_onednn_and_learns_as_channels_last(
    small_phantom_store, tmp_path
):
    result = subprocess.run(
        [sys.executable, "-c", CHANNELS_FIRST_RUN, str(small_phantom_store), str(tmp_path)],
        capture_output=True,
        text=True,
        check=False,
        env={**os.environ, "TF_ENABLE_ONEDNN_OPTS": "0", "TF_CPP_MIN_LOG_LEVEL": "3"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads(result.stdout.splitlines()[-1]) == [None, 1, 32, 32]
    histories = []
    for channels in ("last", "first"):
        with open(tmp_path / channels / "history.csv", newline="") as handle:
            histories.append(list(csv.DictReader(handle)))
    last, first = histories
    for name in ("loss", "accuracy", "val_loss", "val_accuracy"):
        assert float(first[0][name]) == pytest.approx(float(last[0][name]), abs=1e-5), name
