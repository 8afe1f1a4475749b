"""Awkward conditions, created for real: unreadable files, faulty labels tables, a store
replaced while it is read, a store on a read-only filesystem."""

from __future__ import annotations

import ctypes
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from make_phantoms import write_bids

from loader import H5Sequence, open_store
from loader.cli import main as loader_main
from loader.store import StoreChangedError
from preprocess.cli import main as preprocess_main
from training.run import train

ROOT = Path(__file__).resolve().parents[1]
PR_CAPBSET_DROP = 24
CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH = 1, 2


def _without_root_file_access() -> None:
    """In the child, before exec: drop what lets root read any file, so permissions hold."""
    libc = ctypes.CDLL(None, use_errno=True)
    for capability in (CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH):
        if libc.prctl(PR_CAPBSET_DROP, capability, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")


def _as_a_user(command: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """Run ``command`` where file permissions apply: root without its override, else as is."""
    drop = _without_root_file_access if os.geteuid() == 0 else None
    try:
        return subprocess.run(
            command, cwd=cwd, capture_output=True, text=True, check=False, preexec_fn=drop
        )
    except subprocess.SubprocessError as exc:  # prctl refused (a container without it)
        pytest.skip(f"needs root, as CI runs: cannot drop file-access capabilities ({exc})")


@pytest.fixture
def bids(tmp_path) -> Path:
    folder = tmp_path / "bids"
    folder.mkdir()
    write_bids(folder, subjects=6, seed=1, voxel_sizes=((4.0, 4.0, 4.0),))
    return folder


def test_unreadable_files_and_folders_are_named_and_the_rest_stored(bids, tmp_path):
    scan = bids / "sub-005" / "anat" / "sub-005_T1w.nii.gz"
    folder = next(bids.glob("sub-00[1-4]/ses-*/anat"))
    scan.chmod(0)
    folder.chmod(0)
    try:
        done = _as_a_user(
            [
                sys.executable,
                "-m",
                "preprocess",
                str(bids),
                "-o",
                str(tmp_path / "s.h5"),
                "--label-column",
                "group",
                "--workers",
                "1",
                "--size",
                "32",
            ],
            cwd=ROOT,
        )
    finally:
        folder.chmod(0o755)
        scan.chmod(0o644)
    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr
    rejected = [line for line in done.stderr.splitlines() if line.startswith("rejected: ")]
    assert sorted(rejected) == sorted(
        [
            f"rejected: {folder}: cannot list the folder (permission denied): "
            "its scans are left out",
            f"rejected: {scan}: cannot read the file: permission denied",
        ]
    )
    every = {p.name for p in bids.rglob("*_T1w.nii.gz")}
    missing = {scan.name} | {p.name for p in folder.glob("*_T1w.nii.gz")}
    with open_store(tmp_path / "s.h5") as store:
        stored = {Path(source).name for source in store.subjects_table()["path"]}
    assert stored == every - missing


def test_labels_table_faults_are_one_line_each_and_the_rest_processed(bids, tmp_path, capsys):
    table = (bids / "participants.tsv").read_text().splitlines()
    header, rows = table[0], {line.split("\t")[0]: line for line in table[1:]}
    target = tmp_path / "s.h5"
    args = [str(bids), "-o", str(target), "--workers", "1", "--size", "32"]

    assert preprocess_main([*args, "--label-column", "diagnosis"]) == 2  # no such column
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        f"error: {bids / 'participants.tsv'}: no column 'diagnosis'; the columns are "
        "['age', 'group', 'iq', 'participant_id', 'sex']"
    ]
    assert not target.exists()

    flipped = rows["sub-001"].replace("control", "x").replace("patient", "control")
    lines = [header, *rows.values(), flipped.replace("\tx\t", "\tpatient\t"), rows["sub-002"]]
    del lines[lines.index(rows["sub-006"])]  # a subject without a row
    (bids / "participants.tsv").write_text("\n".join(lines) + "\n")
    assert preprocess_main([*args, "--label-column", "group"]) == 0
    err = capsys.readouterr().err
    where = bids / "participants.tsv"
    assert f"warning: {where}: subject '001' has 2 rows; they differ in group: no value" in err
    assert f"warning: {where}: subject '002' has 2 identical rows" in err
    assert "2 subject(s) have no label" in err  # 001 (rows disagree) and 006 (no row)
    assert "Traceback" not in err
    with open_store(target) as store:
        table = store.subjects_table()
        unlabelled = {s for s, label in zip(table["id"], table["label"], strict=True) if label < 0}
        assert unlabelled == {"001", "006"}
        assert store.num_slices > 0


def test_readers_keep_the_store_they_opened_while_overwrite_replaces_it(bids, tmp_path):
    store_path = tmp_path / "s.h5"
    args = [str(bids), "-o", str(store_path), "--workers", "1", "--size", "32"]
    assert preprocess_main([*args, "--label-column", "group"]) == 0
    with open_store(store_path) as store:
        before = store.uuid
    reading = H5Sequence(store_path, batch_size=16, shuffle=True)
    first = reading[0]  # opens the file
    not_yet = H5Sequence(store_path, batch_size=16)  # made before, first read after

    writer = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "preprocess",
            *args,
            "--label-column",
            "sex",
            "--overwrite",
            "--seed",
            "9",
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    seen = []
    while writer.poll() is None:  # python -m loader's view: always a whole store
        with open_store(store_path) as store:
            seen.append(store.uuid)
            assert store.images[store.num_slices - 1].shape == (32, 32)
        time.sleep(0.01)
    _, err = writer.communicate()
    assert writer.returncode == 0, err
    with open_store(store_path) as store:
        after = store.uuid
    assert after != before
    assert set(seen) <= {before, after}
    assert seen.count(before) > 0

    again = reading[0]  # the store it opened, exactly
    np.testing.assert_array_equal(again[0], first[0])
    np.testing.assert_array_equal(again[1], first[1])
    assert len(reading) * 16 >= reading.num_slices
    with pytest.raises(StoreChangedError, match="the store changed since this H5Sequence"):
        not_yet[0]


def test_a_store_on_a_read_only_filesystem_reads(small_disk, bids, tmp_path, capsys):
    disk, remount = small_disk
    store_path = disk / "s.h5"
    args = [str(bids), "-o", str(store_path), "--workers", "1", "--label-column", "group"]
    assert preprocess_main(args) == 0
    remount("ro")
    capsys.readouterr()
    assert loader_main([str(store_path)]) == 0
    assert "group" in capsys.readouterr().out
    assert loader_main(["verify", str(store_path)]) == 0
    sequence = H5Sequence(store_path, split="train", batch_size=32, shuffle=True)
    assert sum(len(sequence[i][0]) for i in range(len(sequence))) == sequence.num_slices
    result = train(store_path, tmp_path / "run", epochs=1, batch_size=64, progress=False)
    assert result.metrics["val"]["slices"]["count"] > 0
