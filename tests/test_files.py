"""One way to write a file: whole or not at all, for every file the project leaves behind."""

from __future__ import annotations

import errno
import io
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import matplotlib.pyplot as plt
import pytest
from helpers import blob_volume, write_nifti

from loader import files
from loader.cli import main as loader_main
from loader.store import open_store
from preprocess.cli import main as preprocess_main
from training.cli import main as training_main

ROOT = Path(__file__).resolve().parents[1]

# A process that runs a command and, the time after SKIP times that the one write helper
# is about to publish a file whose temporary path matches PATTERN, cuts that temporary
# copy to half its bytes and kills itself with SIGKILL: a kill in the middle of that file.
KILLED_MID_FILE = textwrap.dedent("""
    import os, re, runpy, signal, sys
    from loader import files

    pattern, skip, package, *argv = sys.argv[1:]
    seen = [0]
    fsync_path = files.fsync_path
    def half_then_die(path):
        path = os.fspath(path)
        if re.search(pattern, path) and os.path.isfile(path):
            seen[0] += 1
            if seen[0] > int(skip):
                os.truncate(path, os.path.getsize(path) // 2)
                os.kill(os.getpid(), signal.SIGKILL)
        fsync_path(path)
    files.fsync_path = half_then_die
    sys.argv = [package, *argv]
    runpy.run_module(package, run_name="__main__")
""")


def _killed_mid_file(pattern: str, package: str, *argv: str, skip: int = 0):
    killed = subprocess.run(
        [sys.executable, "-c", KILLED_MID_FILE, pattern, str(skip), package, *argv],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr


def _preprocess_args(tmp_path: Path, scans: int) -> list[str]:
    """Arguments of a preprocess run of ``scans`` seeded scans into ``tmp_path/s.h5``."""
    inputs = tmp_path / "in"
    for index in range(scans):
        write_nifti(inputs / f"s{index}.nii.gz", blob_volume(index))
    target = tmp_path / "s.h5"
    return [str(inputs), "-o", str(target), "--workers", "1", "--val-fraction", "0"]


def test_an_error_while_writing_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "metrics.json"
    files.write_text(target, "old")

    def write_half():
        with files.replacing(target) as temporary:
            temporary.write_text("half of the new")
            raise RuntimeError("stopped while writing")

    with pytest.raises(RuntimeError):
        write_half()
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.json"]


def test_a_full_disk_names_the_target_and_removes_the_temporary(tmp_path):
    target = tmp_path / "model.keras"

    def fill_the_disk():
        with files.replacing(target) as temporary:
            temporary.write_bytes(b"abc")
            raise OSError("245760 requested and 61312 written")  # numpy's short write

    with pytest.raises(OSError, match="No space left") as caught:
        fill_the_disk()
    assert caught.value.errno == errno.ENOSPC
    assert caught.value.filename == str(target)
    assert list(tmp_path.iterdir()) == []


def test_a_kill_in_the_middle_of_a_store_leaves_the_previous_store_whole(tmp_path):
    args = _preprocess_args(tmp_path, 4)
    target = tmp_path / "s.h5"
    assert preprocess_main(args) == 0
    with open_store(target) as store:
        before = store.uuid
    _killed_mid_file(r"/store\.h5$", "preprocess", *args, "--overwrite")
    with open_store(target) as store:  # the old store, whole and readable
        assert store.uuid == before
    assert preprocess_main([*args, "--resume"]) == 0  # the scans written before the kill
    with open_store(target) as store:
        assert store.uuid != before
        assert len(store.subjects_table()["id"]) == 4


@pytest.mark.parametrize("name", ["manifest.json", "owner"])
def test_a_kill_in_the_middle_of_a_scan_file_leaves_no_half_scan(tmp_path, name):
    args = _preprocess_args(tmp_path, 3)
    _killed_mid_file(f"/{name}\\.partial$", "preprocess", *args)
    partial = tmp_path / "s.h5.partial"
    assert not (partial / name).exists()  # not half of it: none of it
    assert (partial / f"{name}{files.TEMPORARY_ENDING}").exists()
    assert preprocess_main([*args, "--overwrite"]) == 0


def test_a_kill_in_the_middle_of_a_scans_slices_keeps_the_scans_before_it(tmp_path):
    args = _preprocess_args(tmp_path, 3)
    _killed_mid_file(r"\.npy\.partial$", "preprocess", *args, skip=1)  # the second scan's
    partial = tmp_path / "s.h5.partial"
    records = [p for p in partial.glob("*.json") if p.name != "manifest.json"]
    assert len(records) == 1  # the scan finished before the kill, and only it
    assert len(list(partial.glob("*.npy"))) == 1
    assert preprocess_main([*args, "--resume"]) == 0
    with open_store(tmp_path / "s.h5") as store:
        assert len(store.subjects_table()["id"]) == 3


def test_a_kill_in_the_middle_of_a_run_folders_last_file_leaves_no_half_file(
    small_phantom_store, tmp_path
):
    run = tmp_path / "run"
    args = [str(small_phantom_store), "-o", str(run), "--epochs", "1", "--workers", "1"]
    _killed_mid_file(r"/metrics\.json\.partial$", "training", *args)
    assert not (run / "metrics.json").exists()  # never half of one
    assert (run / "predictions.csv").is_file()  # written whole just before
    assert json.loads((run / "config.json").read_text())["settings"]["epochs"] == 1
    assert training_main([*args, "--resume"]) == 0  # the run is not complete: resume scores
    assert json.loads((run / "metrics.json").read_text())["epochs_run"] == 1


def test_every_file_a_store_and_a_run_leave_is_written_by_the_one_helper(
    phantom_bids, tmp_path, monkeypatch
):
    published = []
    replacing = files.replacing

    def spy(path, temporary=None):
        published.append(os.path.abspath(path))
        return replacing(path, temporary)

    monkeypatch.setattr(files, "replacing", spy)
    store = tmp_path / "s.h5"
    args = [str(phantom_bids), "-o", str(store), "--label-column", "group", "--workers", "1"]
    assert preprocess_main(args) == 0
    preview = tmp_path / "preview.png"
    assert loader_main([str(store), "--preview", str(preview)]) == 0
    run = tmp_path / "run"
    assert training_main([str(store), "-o", str(run), "--epochs", "1"]) == 0
    written = [str(store), str(preview)] + [str(p) for p in run.iterdir()]
    assert {"model.keras", "history.csv", "metrics.json", "predictions.csv", "config.json"} <= {
        Path(p).name for p in written
    }
    assert all(os.path.abspath(p) in published for p in written), set(written) - set(published)


def test_a_laid_out_figure_is_drawn_once_and_saved_as_savefig_saves_it(tmp_path):
    def laid_out():
        figure, axes = plt.subplots(1, 2, figsize=(6, 3))
        for ax in axes:
            ax.plot([0, 1, 4], "-o", label="loss")
            ax.set_title("loss")
            ax.legend()
        figure.tight_layout()
        return figure

    expected = io.BytesIO()
    laid_out().savefig(expected, format="png", dpi=100)
    figure = laid_out()
    draws = []
    draw = figure.draw
    figure.draw = lambda renderer: draws.append(renderer) or draw(renderer)
    files.save_png(figure, tmp_path / "curves.png")
    plt.close("all")
    assert len(draws) == 1  # savefig alone draws it twice: its layout, then the pixels
    assert (tmp_path / "curves.png").read_bytes() == expected.getvalue()
