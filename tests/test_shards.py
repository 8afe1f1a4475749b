"""Preprocessing in shards: the union of the shard stores is one unsharded run."""

from __future__ import annotations

import csv
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from loader import H5Sequence, open_store, schema
from preprocess.cli import main


def _content(path: Path) -> dict:
    """(source, slice position) -> (pixels' sha256, label, split), read slice by slice."""
    with open_store(path) as store:
        table = store.subjects_table()
        split_of_row = np.empty(store.num_slices, dtype=object)
        for name, split in store.splits.items():
            split_of_row[split.start : split.stop] = name
        content = {}
        for row in range(store.num_slices):
            scan = int(store.subject[row])
            key = (table[schema.SOURCE_PATH][scan], int(store.slice_index[row]))
            label = int(store.labels[row])
            name = store.class_names[label] if label >= 0 else None
            pixels = hashlib.sha256(store.images[row].tobytes()).hexdigest()
            content[key] = (pixels, name, split_of_row[row])
        return content


@pytest.fixture(scope="module")
def sharded(phantom_bids, tmp_path_factory):
    root = tmp_path_factory.mktemp("shards")
    common = [str(phantom_bids), "--label-column", "group", "--test-fraction", "0.25"]
    common += ["--chunk-slices", "8", "--workers", "1", "--seed", "4"]
    assert main([*common, "-o", str(root / "whole.h5")]) == 0
    (root / "shards").mkdir()
    for index in range(3):
        out = root / "shards" / f"part{index}.h5"
        assert main([*common, "-o", str(out), "--shard", f"{index}/3"]) == 0
    return root


def test_the_union_of_the_shards_is_one_unsharded_run(sharded):
    whole = _content(sharded / "whole.h5")
    union, subjects = {}, []
    for index in range(3):
        part = _content(sharded / "shards" / f"part{index}.h5")
        assert not part.keys() & union.keys()
        union |= part
        subjects.append({source.split("/")[1] for source, _ in part})
        with open_store(sharded / "shards" / f"part{index}.h5") as store:
            assert store.config["shard"] == f"{index}/3"
            assert store.class_names == ["control", "patient"]
            assert list(store.splits) == ["train", "val", "test"]  # the same names everywhere
    assert union == whole  # pixels, labels and splits
    assert not subjects[0] & subjects[1]  # a subject's sessions stay in one shard
    assert not subjects[1] & subjects[2]


def test_the_shard_folder_reads_as_the_whole_store(sharded):
    parts = H5Sequence(sharded / "shards", split="train", batch_size=32, shuffle=True)
    whole = H5Sequence(sharded / "whole.h5", split="train", batch_size=32)
    assert len(parts.paths) == 3
    assert parts.num_slices == whole.num_slices
    assert parts.class_names == whole.class_names


def test_a_shard_index_out_of_range_is_refused(phantom_bids, tmp_path, capsys):
    args = [str(phantom_bids), "-o", str(tmp_path / "s.h5"), "--workers", "1"]
    assert main([*args, "--shard", "3/3"]) == 2
    assert (
        "--shard index must be in [0, 3) for 3 shards; received index 3" in capsys.readouterr().err
    )
    assert main([*args, "--shard", "two"]) == 2
    assert "--shard must be I/N (e.g. 0/4) or auto" in capsys.readouterr().err
    assert main([*args, "--shard", "auto"]) == 2
    assert "--shard auto needs a SLURM array job" in capsys.readouterr().err
    assert not (tmp_path / "s.h5").exists()


def test_shard_auto_follows_a_slurm_array_job(phantom_bids, tmp_path, monkeypatch):
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "2")
    monkeypatch.setenv("SLURM_ARRAY_TASK_MIN", "1")
    monkeypatch.setenv("SLURM_ARRAY_TASK_COUNT", "2")
    out = tmp_path / "s.h5"
    assert main([str(phantom_bids), "-o", str(out), "--workers", "1", "--shard", "auto"]) == 0
    with open_store(out) as store:
        assert store.config["shard"] == "1/2"


def test_training_and_the_summary_read_the_shard_folder(sharded, tmp_path, capsys):
    from loader.cli import main as loader_main
    from training.cli import main as training_main

    assert loader_main([str(sharded / "shards")]) == 0
    out = capsys.readouterr().out
    with open_store(sharded / "whole.h5") as whole:
        assert f"3 stores read as one: {whole.num_slices} slices" in out
        val_rows = len(whole.splits["val"])
    run_dir = tmp_path / "run"
    args = [str(sharded / "shards"), "-o", str(run_dir), "--epochs", "1", "--batch-size", "64"]
    assert training_main(args) == 0
    config = json.loads((run_dir / "config.json").read_text())
    assert [Path(store["path"]).name for store in config["store"]] == [
        "part0.h5",
        "part1.h5",
        "part2.h5",
    ]
    metrics = json.loads((run_dir / "metrics.json").read_text())["splits"]
    assert metrics["val"]["slices"]["count"] == val_rows
    with open(run_dir / "predictions.csv", newline="") as handle:
        subjects = [row["subject"] for row in csv.DictReader(handle)]
    assert all(subject.startswith("part") for subject in subjects)
    assert len(subjects) == len(set(subjects))
