"""One store, many questions: any column of the labels table is a target at training time."""

from __future__ import annotations

import csv
import hashlib
import json
import shutil
from pathlib import Path

import h5py
import keras
import numpy as np
import pytest
from helpers import write_id_store
from make_phantoms import write_bids

from loader import H5Sequence, open_store, schema
from loader.target import REGRESSION, resolve
from preprocess.cli import main as preprocess_main
from training.cli import main as training_main
from training.data import class_weights
from training.run import TrainingError, train
from training.settings import Settings

DATA = Path(__file__).parent / "data"


@pytest.fixture(scope="module")
def aged_store(tmp_path_factory) -> Path:
    """40 coarse phantoms whose ventricles grow and brains shrink with age; 32x32 slices."""
    root = tmp_path_factory.mktemp("aged")
    write_bids(root / "bids", subjects=40, seed=5, voxel_sizes=((4.0, 4.0, 4.0), (3.0, 3.0, 6.0)))
    store = root / "aged.h5"
    args = [str(root / "bids"), "-o", str(store), "--label-column", "group", "--size", "32"]
    assert preprocess_main([*args, "--val-fraction", "0.3", "--workers", "1"]) == 0
    return store


def _sha256(path: Path) -> str:
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def test_the_store_keeps_every_column_of_the_participants_table(aged_store):
    with open_store(aged_store) as store:
        participants = store.participants()
        assert {name: kind for name, (kind, _) in participants.items()} == {
            "group": "categorical",
            "age": "numeric",
            "sex": "categorical",
            "iq": "numeric",
        }
        ids = store.subjects_table()[schema.SUBJECT_ID]
        rows = {
            line.split("\t")[0].removeprefix("sub-"): line.split("\t")
            for line in (aged_store.parent / "bids" / "participants.tsv").read_text().splitlines()
        }
        for scan, subject_id in enumerate(ids):  # every scan carries its subject's row
            _, group, age, sex, iq = rows[subject_id]
            assert participants["group"][1][scan] == group
            assert participants["age"][1][scan] == float(age)
            assert participants["sex"][1][scan] == sex
            assert np.isnan(participants["iq"][1][scan]) if iq == "n/a" else float(iq)


def test_a_regression_on_age_beats_predicting_the_training_mean(aged_store, tmp_path):
    before = _sha256(aged_store)
    run_dir = tmp_path / "age"
    args = [str(aged_store), "-o", str(run_dir), "--target", "age", "--epochs", "6"]
    args += ["--learning-rate", "0.002"]  # MAE 0.64 of the baseline's here, r 0.75
    assert training_main([*args, "--batch-size", "32", "--patience", "6"]) == 0
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["task"] == REGRESSION
    val = metrics["splits"]["val"]
    assert set(val["slices"]) == {"count", "loss", "mae", "rmse", "r"}
    with open(run_dir / "predictions.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == val["subjects"]["count"]
    with open_store(aged_store) as store:
        ages = store.participants()["age"][1]
        split = store.subjects_table()[schema.SUBJECT_SPLIT]
    mean = np.mean(ages[split == "train"])
    baseline = np.mean([abs(float(row["true"]) - mean) for row in rows])
    assert val["subjects"]["mae"] == pytest.approx(
        np.mean([abs(float(row["true"]) - float(row["predicted"])) for row in rows]), rel=1e-3
    )
    assert val["subjects"]["mae"] < 0.7 * baseline
    assert val["subjects"]["r"] > 0.5
    assert (run_dir / "scatter.png").read_bytes().startswith(b"\x89PNG")
    model = keras.models.load_model(run_dir / "model.keras")
    assert model.layers[-1].name == "to_target_units"  # predictions come out in years
    assert _sha256(aged_store) == before  # the store is only read


def test_another_categorical_column_trains_without_preprocessing_again(aged_store, tmp_path):
    before = _sha256(aged_store)
    result = train(aged_store, tmp_path / "sex", target="sex", epochs=1, progress=False)
    assert result.metrics["val"]["slices"]["count"] > 0
    config = json.loads((tmp_path / "sex" / "config.json").read_text())
    assert config["target"] == {"name": "sex", "task": "classification", "class_names": ["F", "M"]}
    assert (tmp_path / "sex" / "confusion.png").is_file()
    assert _sha256(aged_store) == before


def test_subjects_without_a_value_are_never_trained_on_or_scored(aged_store, tmp_path):
    sequence = H5Sequence(aged_store, split="train", batch_size=64, target="iq", shuffle=True)
    assert sequence.weighted
    with open_store(aged_store) as store:
        iq = store.participants()["iq"][1]
        for index in range(len(sequence)):
            _, y, weight = sequence[index]
            rows = np.sort(sequence.rows(index))
            order = np.argsort(sequence.rows(index))
            scans = store.subject[rows]
            expected = (~np.isnan(iq[scans])).astype(np.float32)
            np.testing.assert_array_equal(weight[order], expected)
            np.testing.assert_array_equal(y[order][expected == 1], iq[scans][expected == 1])
        val = store.splits["val"]
        scans = store.subject[val.start : val.stop]
        with_value = int(np.sum(~np.isnan(iq[scans])))
    assert 0 < with_value < len(val)
    result = train(aged_store, tmp_path / "iq", target="iq", epochs=1, progress=False)
    assert result.metrics["val"]["slices"]["count"] == with_value


def test_a_table_joined_at_load_time(tmp_path):
    path = write_id_store(tmp_path / "s.h5", scans=6)
    rows = "sub-000\t1.5\n001\t2\n002\t3\n003\tn/a\n004\t5\n"  # 005 is missing
    (tmp_path / "late.tsv").write_text(f"participant_id\tscore\n{rows}")
    sequence = H5Sequence(path, batch_size=200, target="score", labels=tmp_path / "late.tsv")
    _, y, weight = sequence[0]
    with open_store(path) as store:
        scans = store.subject[np.sort(sequence.rows(0))]
    order = np.argsort(sequence.rows(0))
    expected = {0: 1.5, 1: 2.0, 2: 3.0, 4: 5.0}
    np.testing.assert_array_equal(weight[order], [float(s in expected) for s in scans])
    np.testing.assert_array_equal(
        y[order][weight[order] == 1], [expected[s] for s in scans if s in expected]
    )
    assert y.dtype == np.float32
    train(
        path,
        tmp_path / "run",
        target="score",
        labels=tmp_path / "late.tsv",
        epochs=1,
        progress=False,
    )
    with open(tmp_path / "run" / "predictions.csv", newline="") as handle:
        scored = {row["subject"] for row in csv.DictReader(handle)}
    assert scored <= {"000", "001", "002", "004"}  # only subjects the table gives a value
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["settings"]["labels"] == str(tmp_path / "late.tsv")


def test_a_store_written_before_the_table_was_kept_trains_with_its_label(tmp_path):
    path = tmp_path / "old.h5"
    shutil.copy(DATA / "schema1.h5", path)
    with open_store(path) as store:
        assert store.version == 1
        assert list(store.participants()) == ["group"]
        assert resolve(store, "group").class_names == ["control", "patient"]
    result = train(path, tmp_path / "run", epochs=1, batch_size=8, progress=False)
    assert result.metrics["val"]["slices"]["count"] == 22
    target = train(path, tmp_path / "run2", target="group", epochs=1, batch_size=8, progress=False)
    assert target.metrics["val"]["slices"]["count"] == 22


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["--target", "height"],
            "no column 'height' in the store's labels table; its columns "
            "are ['group', 'age', 'sex', 'iq']",
        ),
        (["--target", "sex", "--task", "regression"], "column 'sex' holds text, not numbers"),
        (
            [
                "--target",
                "age",
                "--test-split",
                "val",
                "--val-split",
                "train",
                "--train-split",
                "test",
            ],
            "no split 'test'",
        ),
    ],
)
def test_bad_targets_are_refused_before_training(aged_store, tmp_path, capsys, args, message):
    assert training_main([str(aged_store), "-o", str(tmp_path / "run"), *args]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_a_target_with_one_class_or_no_value_in_a_split_is_refused(tmp_path):
    path = write_id_store(tmp_path / "s.h5", scans=8)
    with h5py.File(path, "r+") as h5:  # add a labels table: one class, and a column empty in val
        ids = h5["subjects/id"].asstr()[()]
        split = h5["subjects/split"].asstr()[()]
        h5.create_dataset(
            "participants/site",
            data=np.array(["A"] * len(ids), dtype=object),
            dtype=h5py.string_dtype(),
        )
        h5.create_dataset("participants/score", data=np.where(split == "val", np.nan, 1.0))
        h5.attrs["participant_columns"] = json.dumps(
            [["site", "categorical"], ["score", "numeric"]]
        )
    with pytest.raises(TrainingError, match=r"target 'site' has 1 class\(es\) \['A'\]"):
        train(path, tmp_path / "a", target="site")
    with pytest.raises(TrainingError, match="split 'val' has no subject with a value for target"):
        train(path, tmp_path / "b", target="score")
    assert not (tmp_path / "a").exists()
    assert not (tmp_path / "b").exists()


def test_balanced_class_weights_and_augmentation(tmp_path):
    path = write_id_store(tmp_path / "s.h5", scans=12, classes="aab", val_fraction=0.25)
    with open_store(path) as store:
        target = resolve(store)
        weights = class_weights([store], Settings(class_weight="balanced"), [target])
        train_rows = store.splits["train"]
        labels = store.labels[train_rows.start : train_rows.stop]
    counts = np.bincount(labels)
    assert weights == pytest.approx({k: len(labels) / (2 * n) for k, n in enumerate(counts)})
    assert weights[1] > weights[0]  # the rarer class weighs more
    run = train(
        path, tmp_path / "run", epochs=1, augment="flip", class_weight="balanced", progress=False
    )
    assert run.epochs_run == 1
    model = keras.models.load_model(tmp_path / "run" / "model.keras")
    augmentation = model.get_layer("augmentation")
    assert [type(layer).__name__ for layer in augmentation.layers] == [
        "RandomRotation",
        "RandomTranslation",
        "RandomZoom",
        "RandomContrast",
        "RandomFlip",
    ]
    x = np.random.default_rng(0).random((2, 64, 64, 1)).astype(np.float32)
    np.testing.assert_array_equal(augmentation(x, training=False), x)  # off outside training
