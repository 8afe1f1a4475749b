"""python -m preprocess end to end: the store, exit codes, refusals, crashes and resume."""

from __future__ import annotations

import concurrent.futures
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
from helpers import NIBABEL_DATA, assert_same_store_content, blob_volume, write_nifti
from make_phantoms import write_bids

from loader import schema
from loader.store import open_store
from preprocess import workers
from preprocess.cli import main
from preprocess.discover import Scan
from preprocess.settings import Settings
from preprocess.workers import _start_pool
from preprocess.writer import Partial, partial_path

ROOT = Path(__file__).resolve().parents[1]


def _run(*args) -> int:
    return main([str(a) for a in args])


def test_the_store_follows_the_schema(phantom_store):
    with h5py.File(phantom_store, "r") as h5:
        assert h5.attrs[schema.ATTR_SCHEMA] == schema.SCHEMA_VERSION
        assert h5.attrs[schema.ATTR_COMPLETE]
        images = h5[schema.IMAGES]
        num_rows = images.shape[0]
        assert images.shape[1:] == (64, 64)
        assert images.dtype == np.uint8
        assert images.chunks == (8, 64, 64)
        assert images.compression is None
        assert images.attrs[schema.ATTR_SCALE] == pytest.approx(1 / 255)
        assert h5[schema.LABELS].dtype == np.int32
        assert h5[schema.LABELS].shape == (num_rows,)
        assert h5[schema.SUBJECT].dtype == np.int32
        assert h5[schema.SLICE].dtype == np.int16
        table = h5[schema.SUBJECTS]
        assert set(table) == set(schema.SUBJECT_COLUMNS)
        assert table[schema.AFFINE].shape == (16, 4, 4)
        assert json.loads(h5.attrs[schema.ATTR_CLASS_NAMES]) == ["control", "patient"]
        config = json.loads(h5.attrs[schema.ATTR_CONFIG])
        assert config["chunk_slices"] == 8
        assert config["label_column"] == "group"
        splits = json.loads(h5.attrs[schema.ATTR_SPLITS])
        assert list(splits) == ["train", "val", "test"]
        edges = [edge for start_stop in splits.values() for edge in start_stop]
        assert edges[0] == 0
        assert edges[-1] == num_rows
        assert edges == sorted(edges)
        sources = table[schema.SOURCE_PATH].asstr()[()]
        assert all(s.startswith("bids/sub-") for s in sources)


def test_no_subject_on_two_sides_and_every_class_in_every_split(phantom_store):
    with open_store(phantom_store) as store:
        table = store.subjects_table()
        seen = {}
        for name, split in store.splits.items():
            scans = store.subject[split.start : split.stop]
            subjects = set(table[schema.SUBJECT_ID][scans])
            assert not any(subjects & other for other in seen.values())
            seen[name] = subjects
            assert set(store.labels[split.start : split.stop]) == {0, 1}
            assert set(table[schema.SUBJECT_SPLIT][np.unique(scans)]) == {name}
        # rows inside a split are shuffled: consecutive rows rarely share a scan
        train = store.splits["train"]
        scans = store.subject[train.start : train.stop]
        assert np.mean(scans[1:] == scans[:-1]) < 0.3


def test_same_settings_same_content_whatever_the_workers_and_buffer(phantom_bids, tmp_path):
    common = [phantom_bids, "--label-column", "group", "--chunk-slices", "8", "--seed", "5"]
    assert _run(*common, "-o", tmp_path / "one.h5", "--workers", "1") == 0
    assert _run(*common, "-o", tmp_path / "two.h5", "--workers", "2") == 0
    # a 1 MB buffer deals the rows into bucket files before writing them
    assert _run(*common, "-o", tmp_path / "small.h5", "--workers", "2", "--buffer-mb", "1") == 0
    assert_same_store_content(tmp_path / "one.h5", tmp_path / "two.h5")
    assert_same_store_content(tmp_path / "one.h5", tmp_path / "small.h5")
    with open_store(tmp_path / "one.h5") as a, open_store(tmp_path / "two.h5") as b:
        assert a.uuid != b.uuid
    assert not partial_path(tmp_path / "small.h5").exists()


def test_this_process_computes_scans_while_the_workers_start(tmp_path):
    """The pool's first submit waits for its server to start (here: 0.5 s); meanwhile the
    main process computes the scans after the ones handed to the pool."""
    scans = []
    for index in range(8):
        path = write_nifti(tmp_path / f"s{index}.nii.gz", blob_volume(index))
        scans.append(Scan(path, path.name, f"{index:02d}", "", None))

    class SlowToStart(concurrent.futures.ThreadPoolExecutor):
        def submit(self, *args, **kwargs):
            if not getattr(self, "started", False):
                time.sleep(0.5)
                self.started = True
            return super().submit(*args, **kwargs)

    pending = {}
    with SlowToStart(1) as pool:
        queue = iter(scans)
        here = [scan for scan, _ in _start_pool(pool, queue, pending, 2, Settings(), 0.0)]
        assert sorted(scan.subject_id for scan in pending.values()) == ["00", "01"]
        assert len(here) >= 1  # computed here while the pool was starting
        assert here == scans[2 : 2 + len(here)]  # the scans after the pool's, in order
        results = [future.result() for future in pending]
    assert all(not isinstance(result, str) for result in results)  # computed, not rejected
    assert list(queue) == scans[2 + len(here) :]  # the rest is left for the loop


def test_rejected_scans_are_named_and_the_rest_is_written(tmp_path, capsys):
    good = tmp_path / "in"
    for seed in range(3):
        write_nifti(good / f"ok{seed}.nii.gz", blob_volume(seed))
    write_nifti(good / "constant.nii", np.ones((10, 10, 10), np.float32))
    (good / "garbage.nii.gz").write_bytes(b"\x1f\x8b not really gzip")
    shutil.copy(NIBABEL_DATA / "example4d.nii.gz", good / "fourd.nii.gz")
    cut = good / "cut.nii"
    cut.write_bytes(write_nifti(tmp_path / "whole.nii", blob_volume(9)).read_bytes()[:4000])
    nan = blob_volume(4)
    nan[0, 0, 0] = np.nan
    write_nifti(good / "nan.nii", nan)
    (tmp_path / "notes.txt").write_text("not a scan")
    code = _run(good, tmp_path / "notes.txt", "-o", tmp_path / "s.h5", "--workers", "2")
    err = capsys.readouterr().err
    assert code == 1
    lines = [line for line in err.splitlines() if line.startswith("rejected: ")]
    assert len(lines) == 5
    assert any("notes.txt: not an image" in line for line in lines)
    assert any("constant.nii: constant" in line for line in lines)
    assert any("garbage.nii.gz: " in line for line in lines)
    assert any("fourd.nii.gz: 4-D with 2 volumes" in line for line in lines)
    assert any("cut.nii: truncated" in line for line in lines)
    assert "warning: " in err
    assert "nan.nii: 1 NaN or infinite voxels set to 0" in err
    assert "Traceback" not in err
    with open_store(tmp_path / "s.h5") as store:
        assert len(store.subjects_table()[schema.SOURCE_PATH]) == 4


def test_a_four_d_file_is_taken_with_volume(tmp_path):
    code = _run(NIBABEL_DATA / "example4d.nii.gz", "-o", tmp_path / "s.h5", "--volume", "1")
    assert code == 0
    with open_store(tmp_path / "s.h5") as store:
        assert store.num_slices > 0
        assert store.config["volume"] == 1


def test_nothing_usable_means_exit_2_and_no_store(tmp_path, capsys):
    write_nifti(tmp_path / "in/constant.nii", np.zeros((8, 8, 8), np.float32))
    assert _run(tmp_path / "in", "-o", tmp_path / "s.h5") == 2
    err = capsys.readouterr().err
    assert "constant" in err
    assert "no usable scans" in err
    assert not (tmp_path / "s.h5").exists()
    assert not partial_path(tmp_path / "s.h5").exists()
    assert _run(tmp_path / "empty-folder-missing", "-o", tmp_path / "s.h5") == 2


def test_a_bids_tree_without_the_suffix_says_which_suffixes_it_has(tmp_path, capsys):
    write_nifti(tmp_path / "bids/sub-01/anat/sub-01_T2w.nii.gz", blob_volume(0))
    write_nifti(tmp_path / "bids/sub-02/anat/sub-02_FLAIR.nii.gz", blob_volume(1))
    assert _run(tmp_path / "bids", "-o", tmp_path / "s.h5") == 2
    assert (
        capsys.readouterr()
        .err.strip()
        .endswith(
            "2 image file(s), none named *_T1w (their suffixes: FLAIR, T2w; --suffix chooses)"
        )
    )
    assert not (tmp_path / "s.h5").exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--dtype", "uint8", "--normalize", "zscore"], "needs --normalize percentile"),
        (["--labels", "x.tsv"], "x.tsv: no such label file"),
        (["--label-column", "group"], "no input folder has a participants.tsv"),
        (["--val-fraction", "0.6", "--test-fraction", "0.5"], "must be below 1"),
        (["--folds", "1"], "--folds must be 0"),
        (["--size", "0"], "--size must be at least 8"),
        (["--axis", "oblique"], "invalid choice"),
    ],
)
def test_usage_errors_exit_2_with_one_line(tmp_path, capsys, args, message):
    write_nifti(tmp_path / "in/a.nii", blob_volume(0))
    assert _run(tmp_path / "in", "-o", tmp_path / "s.h5", *args) == 2
    err = capsys.readouterr().err
    assert message in err
    assert "Traceback" not in err
    assert not (tmp_path / "s.h5").exists()


def test_an_existing_store_is_kept_unless_overwrite(tmp_path, capsys):
    write_nifti(tmp_path / "in/a.nii", blob_volume(0))
    target = tmp_path / "s.h5"
    target.write_bytes(b"precious")
    assert _run(tmp_path / "in", "-o", target) == 2
    assert f"{target}: exists; use --overwrite" in capsys.readouterr().err
    assert target.read_bytes() == b"precious"
    assert _run(tmp_path / "in", "-o", target, "--overwrite") == 0
    with open_store(target) as store:
        assert store.num_slices > 0


def test_a_failure_while_finalising_leaves_the_previous_store(tmp_path, monkeypatch, capsys):
    write_nifti(tmp_path / "in/a.nii", blob_volume(0))
    target = tmp_path / "s.h5"
    target.write_bytes(b"previous")

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("preprocess.writer._write_subjects", broken)
    assert main([str(tmp_path / "in"), "-o", str(target), "--overwrite"]) == 2
    err = capsys.readouterr().err
    assert "error: disk full; finished scans are kept in" in err
    assert "Traceback" not in err
    assert target.read_bytes() == b"previous"
    monkeypatch.undo()
    assert _run(tmp_path / "in", "-o", target, "--overwrite", "--resume") == 0
    with open_store(target) as store:
        assert store.num_slices > 0
    assert not partial_path(target).exists()


# python -m preprocess as a process that starts its workers from a forkserver (as one
# that has loaded TensorFlow does), computing no scan itself while the server starts (so
# that the run is still young when its workers are there to be found)
SERVED = """
import itertools, sys
from preprocess import cli, scan, workers
def submit_only(pool, queue, pending, count, settings, timeout):
    for one in itertools.islice(queue, count):
        pending[pool.submit(scan.process_or_reason, one, settings, timeout)] = one
    return iter(())
workers.start_method = lambda: "forkserver"
workers._start_pool = submit_only
raise SystemExit(cli.main(sys.argv[1:]))
"""


@pytest.mark.parametrize("workers", ["1", "2 forked", "2 from a forkserver"])
def test_kill_9_leaves_no_store_and_resume_finishes_identically(slow_bids, tmp_path, workers):
    """Workers die with the run (a forked one at once) and keep no lock."""
    target = tmp_path / "killed.h5"
    command = [sys.executable, "-m", "preprocess"]
    if workers.endswith("forkserver"):
        command = [sys.executable, "-c", SERVED]
    command += [str(slow_bids), "-o", str(target)]
    command += ["--label-column", "group", "--workers", workers[0]]
    process = subprocess.Popen(
        command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    expected = 0 if workers == "1" else 2
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        assert process.poll() is None, "the run ended before it could be killed"
        children = _children(process.pid)
        if workers.endswith("forkserver"):  # the workers are the server's children
            children = [pid for child in children for pid in _children(child)]
        if len(list(partial_path(target).glob("*.json"))) >= 4 and len(children) == expected:
            break
        time.sleep(0.005)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert len(children) == expected
    deadline = time.monotonic() + 30
    while (alive := [pid for pid in children if _alive(pid)]) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not alive, "workers outlived the killed run"
    assert not target.exists()
    written = len(list(partial_path(target).glob("*.json"))) - 1  # less the manifest
    assert 3 <= written < 32  # stopped before its last scan

    again = [str(slow_bids), "-o", str(target), "--label-column", "group", "--workers", "2"]
    assert main(again) == 2  # refuses to start over silently
    assert main([*again, "--resume"]) == 0
    assert main([str(slow_bids), "-o", str(tmp_path / "clean.h5"), "--label-column", "group"]) == 0
    assert_same_store_content(target, tmp_path / "clean.h5")
    with open_store(target) as store:
        assert len(store.subjects_table()[schema.SOURCE_PATH]) == 32


def _children(pid: int) -> list[int]:
    """The processes whose parent is ``pid`` (from /proc)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and _stat(entry.name)[1] == pid:
            found.append(int(entry.name))
    return found


def _stat(pid) -> tuple[str, int]:
    """State letter and parent pid of a process ("X", 0 when it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return "X", 0
    return fields[0], int(fields[1])


def _alive(pid: int) -> bool:
    return _stat(pid)[0] not in "XZ"  # gone, or dead and not yet reaped


def test_a_forked_child_keeps_no_copy_of_the_runs_lock(tmp_path):
    partial = Partial(tmp_path / "s.h5", {"size": 64})
    started, ready = os.pipe()
    child = os.fork()
    if child == 0:  # a worker that lives on
        os.write(ready, b"!")
        time.sleep(5)
        os._exit(0)
    try:
        assert os.read(started, 1) == b"!"  # the child runs
        partial.close()
        again = Partial(tmp_path / "s.h5", {"size": 64}, resume=True)  # the lock is free
        again.close()
    finally:
        os.kill(child, signal.SIGKILL)
        os.waitpid(child, 0)
        os.close(started)
        os.close(ready)


def test_workers_are_forked_unless_a_library_that_forbids_it_is_loaded(monkeypatch):
    for name in workers.NOT_FORK_SAFE:
        monkeypatch.delitem(sys.modules, name, raising=False)
    assert workers.start_method() == "fork"
    monkeypatch.setitem(sys.modules, "tensorflow", sys)
    assert workers.start_method() == "forkserver"


def test_forked_and_served_workers_write_the_same_store(tmp_path, monkeypatch):
    bids = tmp_path / "bids"
    bids.mkdir()
    write_bids(bids, subjects=6, seed=3)
    args = [str(bids), "-o", "served.h5", "--label-column", "group", "--workers", "2"]
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(workers, "start_method", lambda: "forkserver")
    assert main(args) == 0
    forked = [*args[:2], "forked.h5", *args[3:]]  # a new process: no TensorFlow, so fork
    result = subprocess.run(
        [sys.executable, "-m", "preprocess", *forked],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=False,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert result.returncode == 0, result.stderr
    assert_same_store_content(tmp_path / "served.h5", tmp_path / "forked.h5")


def test_resume_with_other_settings_is_refused(tmp_path, capsys):
    write_nifti(tmp_path / "in/a.nii", blob_volume(0))
    target = tmp_path / "s.h5"
    partial = partial_path(target)
    partial.mkdir()
    (partial / "manifest.json").write_text(json.dumps({"size": 128}))
    assert _run(tmp_path / "in", "-o", target, "--resume") == 2
    assert "cannot resume with other settings" in capsys.readouterr().err


def test_python_dash_m_preprocess_runs(tmp_path):
    write_nifti(tmp_path / "in/a.nii.gz", blob_volume(1))
    write_nifti(tmp_path / "in/b.nii.gz", blob_volume(2))
    result = subprocess.run(
        [sys.executable, "-m", "preprocess", str(tmp_path / "in"), "-o", str(tmp_path / "s.h5")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
        env={**os.environ, "PYTHONWARNINGS": "error"},
    )
    assert result.returncode == 0, result.stderr
    assert "wrote " in result.stdout
    assert "2 scans" in result.stdout
    assert (tmp_path / "s.h5").is_file()


def _run_with_dx_table(tmp_path: Path, subjects: int, table: str) -> int:
    """Preprocess ``subjects`` folders sub-01.. (no participants.tsv) with ``dx.csv`` labels."""
    for index in range(1, subjects + 1):
        name = f"sub-{index:02d}/anat/sub-{index:02d}_T1w.nii.gz"
        write_nifti(tmp_path / "in" / name, blob_volume(index))
    (tmp_path / "dx.csv").write_text(table)
    args = [tmp_path / "in", "-o", tmp_path / "s.h5", "--labels", tmp_path / "dx.csv"]
    return _run(*args, "--label-column", "dx", "--id-column", "subject", "--workers", "1")


def test_a_label_table_that_matches_no_subject_is_an_error(tmp_path, capsys):
    assert _run_with_dx_table(tmp_path, 3, "subject,dx\n1,a\n2,b\n3,a\n") == 2
    err = capsys.readouterr().err
    assert "dx.csv (column 'dx'): no subject id in the table matches a scan's subject" in err
    assert "table: '1', '2'" in err
    assert "scans: '01', '02'" in err
    assert not (tmp_path / "s.h5").exists()
    assert not partial_path(tmp_path / "s.h5").exists()


def test_how_the_label_table_matched_is_reported_and_the_labels_file_works(tmp_path, capsys):
    table = "subject,dx\nsub-01,a\n02,b\n03,a\n04,n/a\nsub-99,b\n"
    assert _run_with_dx_table(tmp_path, 5, table) == 0
    err = capsys.readouterr().err
    assert "labels: 3 of 5 subjects have a label in" in err
    assert "warning: 2 subject(s) have no label in" in err
    assert "'04', '05'" in err
    assert "warning: 1 row(s) of" in err
    assert "match no scan's subject: '99'" in err
    with open_store(tmp_path / "s.h5") as store:
        table = store.subjects_table()
        labels = dict(zip(table[schema.SUBJECT_ID], table[schema.SUBJECT_LABEL], strict=True))
        assert labels == {"01": 0, "02": 1, "03": 0, "04": -1, "05": -1}
        assert store.class_names == ["a", "b"]
        assert "unlabelled" in store.splits


def test_one_file_under_two_subjects_is_named(tmp_path, capsys):
    inputs = tmp_path / "in"
    for index in range(1, 4):
        write_nifti(inputs / f"sub-{index:02d}/anat/sub-{index:02d}_T1w.nii.gz", blob_volume(index))
    shutil.copy(inputs / "sub-01/anat/sub-01_T1w.nii.gz", inputs / "sub-03/anat/sub-03_T1w.nii.gz")
    assert _run(inputs, "-o", tmp_path / "s.h5", "--workers", "1") == 0
    err = capsys.readouterr().err
    assert "warning: in/sub-01/anat/sub-01_T1w.nii.gz and in/sub-03/anat/sub-03_T1w.nii.gz " in err
    assert "are the same file" in err
    assert "under subjects '01' and '03'" in err


def test_a_second_run_on_a_store_being_written_touches_nothing(slow_bids, tmp_path, capsys):
    target = tmp_path / "s.h5"
    command = [sys.executable, "-m", "preprocess", str(slow_bids), "-o", str(target)]
    process = subprocess.Popen(
        [*command, "--workers", "1"],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 120
        while len(list(partial_path(target).glob("*.json"))) < 3:
            assert process.poll() is None, "the first run ended too soon"
            assert time.monotonic() < deadline
            time.sleep(0.01)
        for extra in ([], ["--overwrite"], ["--resume"]):
            before = sorted(p.name for p in partial_path(target).glob("*.json"))
            assert _run(slow_bids, "-o", target, "--workers", "1", *extra) == 2
            err = capsys.readouterr().err
            assert f"another preprocess run is writing this store (process {process.pid} " in err
            assert not target.exists()
            assert set(before) <= {p.name for p in partial_path(target).iterdir()}
    finally:
        process.wait(timeout=300)
    assert process.returncode == 0
    with open_store(target) as store:  # the first run finished unharmed
        assert len(store.subjects_table()[schema.SOURCE_PATH]) == 32
