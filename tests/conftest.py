"""Shared fixtures: nibabel's bundled scans, seeded synthetic volumes, small phantom stores."""

from __future__ import annotations

import contextlib
import fcntl
import os
import subprocess
import tempfile
import uuid
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")
# as `python -m training` runs (training/cli.py); `TF_ENABLE_ONEDNN_OPTS=0 make test` tests
# the kernels TensorFlow picks by itself on CPUs without AVX-512 VNNI
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")
# one TensorFlow thread per process: two pytest-xdist workers share two cores, and a pool of
# two threads in each made them wait on each other (the suite 7 min 58 s -> 7 min 10 s)
os.environ.setdefault("TF_NUM_INTRAOP_THREADS", "1")
# JAX processes the tests start (two at a time, beside the other pytest-xdist worker): one
# XLA thread each, not a pool per core spinning against the others
os.environ.setdefault(
    "XLA_FLAGS", "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
)
# and one compilation cache on disk for all of them: a resumed run, the second process of a
# distributed run and a prediction reuse what an earlier process compiled (the same
# executables, so the same numbers)
os.environ.setdefault(
    "JAX_COMPILATION_CACHE_DIR",
    os.path.join(tempfile.gettempdir(), f"slicestore-tests-jax-cache-{os.getuid()}"),
)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")

import numpy as np
import pytest
from helpers import COARSE_VOXELS, MNI_SETTINGS, write_moved_heads
from make_phantoms import write_bids

from preprocess.cli import main as preprocess_main
from preprocess.pipeline import run as preprocess_run
from preprocess.settings import RunOptions, Settings


@pytest.fixture(scope="session")
def phantom_bids(tmp_path_factory) -> Path:
    """A small BIDS tree of 12 coarse head phantoms (16 scans), two groups."""
    out = tmp_path_factory.mktemp("phantoms") / "bids"
    out.mkdir()
    write_bids(out, subjects=12, seed=3, voxel_sizes=COARSE_VOXELS)
    return out


def _phantom_store(bids: Path, out: Path, *more: str) -> Path:
    """``bids`` preprocessed to ``out`` with train/val/test splits and chunks of 8 slices;
    ``more`` are further arguments of ``python -m preprocess``."""
    args = [str(bids), "-o", str(out), "--label-column", "group", "--workers", "1"]
    args += ["--val-fraction", "0.25", "--test-fraction", "0.25", "--chunk-slices", "8"]
    assert preprocess_main([*args, *more]) == 0
    return out


@pytest.fixture(scope="session")
def phantom_store(phantom_bids, tmp_path_factory) -> Path:
    """The phantom tree as a store with train/val/test splits, chunks of 8 slices."""
    return _phantom_store(phantom_bids, tmp_path_factory.mktemp("store") / "phantoms.h5")


@pytest.fixture(scope="session")
def small_phantom_store(phantom_bids, tmp_path_factory) -> Path:
    """The phantom store's scans and splits in slices of 32 x 32 (a quarter of the pixels),
    for the tests that train and assert nothing of the slice size (resuming, comparing,
    predicting, the run folder, its files and signals): a run costs about half of one
    on 64 x 64 (2.5 s against 4.4 s in this process)."""
    out = tmp_path_factory.mktemp("store") / "phantoms32.h5"
    return _phantom_store(phantom_bids, out, "--size", "32")


@contextlib.contextmanager
def _shared(tmp_path_factory, name: str):
    """``(folder, make)``: a folder every pytest-xdist worker of this session shares, and
    whether this caller makes what goes in it (the first one; the others wait for it, and
    make it again only where it failed). For fixtures no test changes. Without xdist, a
    folder of the session's own."""
    base = tmp_path_factory.getbasetemp()
    root = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / name
    root.mkdir(exist_ok=True)
    with open(root.parent / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        done = root / ".made"
        make = not done.exists()
        yield root, make
        done.touch()


@pytest.fixture(scope="session")
def slow_bids(tmp_path_factory) -> Path:
    """24 subjects of 100^3 voxels, slow enough to stop a run in the middle; made once for
    the session (:func:`_shared`), as the runs only read it."""
    with _shared(tmp_path_factory, "slow") as (root, make):
        if make:
            (root / "bids").mkdir(exist_ok=True)
            write_bids(root / "bids", subjects=24, seed=8, voxel_sizes=((2.0, 2.0, 2.0),))
    return root / "bids"


@pytest.fixture(scope="session")
def study(tmp_path_factory):
    """A BIDS tree of three moved heads and its standard-space store (two workers), made
    once for the whole test session, whichever pytest-xdist worker comes first."""
    with _shared(tmp_path_factory, "mni-study") as (root, make):
        store = root / "mni.h5"
        if make:
            truths = write_moved_heads(root / "bids")
            np.save(root / "truths.npy", np.stack([truths[k] for k in sorted(truths)]))
            summary = preprocess_run(
                [str(root / "bids")], store, Settings(**MNI_SETTINGS), RunOptions(workers=2)
            )
            assert summary.rejected == []
    stacked = np.load(root / "truths.npy")
    truths = {f"{index + 1:02d}": matrix for index, matrix in enumerate(stacked)}
    return root, truths, store


def _lesion_store(tmp_path_factory, name: str, subjects: int) -> Path:
    """Phantom subjects with T1w and FLAIR as channels and lesion masks, slices of 32 x 32,
    made once for the session (:func:`_shared`)."""
    with _shared(tmp_path_factory, name) as (folder, make):
        if make:
            write_bids(folder / "bids", subjects=subjects, seed=0, flair=True)
            args = [folder / "bids", "-o", folder / "s.h5", "--suffix", "T1w", "FLAIR"]
            args += ["--size", "32", "--masks", "lesion", "--workers", "1"]
            assert preprocess_main([str(a) for a in args]) == 0
    return folder / "s.h5"


@pytest.fixture(scope="session")
def lesion_store(tmp_path_factory) -> Path:
    """Eight phantom subjects with T1w and FLAIR as channels and lesion masks, slices of
    32 x 32 (a U-Net on them costs a quarter of one on 64 x 64)."""
    return _lesion_store(tmp_path_factory, "lesions", subjects=8)


@pytest.fixture(scope="session")
def small_lesion_store(tmp_path_factory) -> Path:
    """As :func:`lesion_store` with four subjects (about half the slices), for the runs
    that test resuming and sharing, not learning."""
    return _lesion_store(tmp_path_factory, "small-lesions", subjects=4)


@pytest.fixture
def small_disk(tmp_path):
    """A tmpfs of 64 MiB at ``tmp_path/disk`` (as root, as CI runs; skipped where mounting
    is not allowed); ``remount(options)`` changes it: ``"size=600k"``, ``"ro"``."""
    disk = tmp_path / f"disk-{uuid.uuid4().hex[:6]}"
    disk.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(disk)], capture_output=True
    )
    if mounted.returncode != 0:
        reason = mounted.stderr.decode().strip()
        pytest.skip(f"needs root, as CI runs: cannot mount a tmpfs ({reason})")

    def remount(options: str) -> None:
        subprocess.run(["mount", "-o", f"remount,{options}", str(disk)], check=True)

    try:
        yield disk, remount
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


# The modules with the longest tests (training runs, JAX processes, registrations), longest
# first. pytest-xdist's worksteal hands each of its N workers one N-th of the items in order,
# and a worker that runs dry steals from the end of another's queue: so these modules are
# dealt to the front of the N parts in turn, and the short tests come after them, where
# they even out the end of the run.
HEAVY_MODULES = (
    "test_resume.py",
    "test_channels.py",
    "test_targets.py",
    "test_standard.py",
    "test_files.py",
    "test_training.py",
    "test_distributed.py",
    "test_predict.py",
    "test_readme.py",
    "test_command.py",
)


def pytest_collection_modifyitems(config, items):
    """Order the tests so that every pytest-xdist worker starts on long ones."""
    count = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    by_module: dict[str, list] = {}
    for item in items:
        by_module.setdefault(item.path.name, []).append(item)
    parts: list[list] = [[] for _ in range(count)]
    for index, name in enumerate(name for name in HEAVY_MODULES if name in by_module):
        parts[index % count].extend(by_module.pop(name))
    light = [item for module in by_module.values() for item in module]
    ordered = []
    for index, part in enumerate(parts):  # each part filled up to its share of the items
        share = len(items) * (index + 1) // count - len(ordered) - len(part)
        ordered += part + light[: max(0, share)]
        light = light[max(0, share) :]
    items[:] = ordered + light
