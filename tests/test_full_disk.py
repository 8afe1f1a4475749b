"""A full disk, for real: a small tmpfs (as root, as CI runs), filled by the run itself."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

from helpers import blob_volume, write_nifti

from loader.store import open_store
from preprocess.cli import main as preprocess_main
from training.cli import main as training_main


def _used_kib(folder: Path) -> int:
    return shutil.disk_usage(folder).used // 1024


def test_a_full_disk_keeps_the_previous_store_and_the_scans_for_resume(
    small_disk, tmp_path, capsys
):
    disk, remount = small_disk
    inputs = tmp_path / "in"
    for index in range(8):
        write_nifti(
            inputs / f"sub-{index:02d}" / "anat" / f"sub-{index:02d}_T1w.nii.gz",
            blob_volume(index, shape=(60, 64, 60)),
        )
    target = disk / "s.h5"
    args = [str(inputs), "-o", str(target), "--workers", "1", "--val-fraction", "0"]
    assert preprocess_main([*args, "--dtype", "float32"]) == 0
    with open_store(target) as store:
        before = store.uuid
    remount(f"size={_used_kib(disk) + 600}k")  # room for a few scans, not for all of them
    assert preprocess_main([*args, "--dtype", "float32", "--overwrite"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert ": the disk is full (no space left on device); finished scans are kept in " in err[0]
    assert err[0].endswith("--resume")
    with open_store(target) as store:  # the previous store, whole
        assert store.uuid == before
    kept = list(Path(f"{target}.partial").glob("*.json"))
    assert 0 < len(kept) - 1 < 8  # a manifest and the scans that fitted
    remount("size=64m")  # space freed
    assert preprocess_main([*args, "--dtype", "float32", "--overwrite", "--resume"]) == 0
    with open_store(target) as store:
        assert store.uuid != before
        assert len(store.subjects_table()["id"]) == 8


def test_a_full_disk_during_training_is_one_line(small_disk, phantom_store, capsys):
    disk, remount = small_disk
    remount("size=200k")  # the model alone is larger
    run = disk / "run"
    args = [str(phantom_store), "-o", str(run), "--epochs", "1"]
    assert training_main(args) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if not line.startswith("warning: ")]
    model = run / "model.keras"  # the first file larger than the disk, named exactly
    assert errors == [f"error: {model}: the disk is full (no space left on device)"]
    assert "Traceback" not in err


def test_a_disk_full_at_a_checkpoint_keeps_the_last_one_for_resume(
    small_disk, phantom_store, capsys
):
    disk, remount = small_disk
    remount("size=32m")  # the best model (4.6 MB) and one checkpoint (18 MB), not a second
    run = disk / "run"
    args = [str(phantom_store), "-o", str(run), "--epochs", "3", "--patience", "3"]
    assert training_main(args) == 2
    err = capsys.readouterr().err
    full = r"/(model\.keras|checkpoint\.npz): the disk is full \(no space left on device\)"
    assert re.search(f"error: {re.escape(str(run))}{full}", err)  # the file that did not fit
    assert "Traceback" not in err
    assert sorted(p.name for p in run.iterdir()) == [
        "checkpoint.npz",
        "config.json",
        "history.csv",
        "model.keras",
    ]
    remount("size=128m")  # space freed
    assert training_main([*args, "--resume"]) == 0
    with open(run / "history.csv") as handle:
        assert [line.split(",")[0] for line in handle][1:] == ["1", "2", "3"]
    assert not (run / "checkpoint.npz").exists()
