"""Shared fixtures: nibabel's bundled scans, seeded synthetic volumes, small phantom stores."""

from __future__ import annotations

import os
import subprocess
import uuid
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import pytest
from helpers import COARSE_VOXELS
from make_phantoms import write_bids

from preprocess.cli import main as preprocess_main


@pytest.fixture(scope="session")
def phantom_bids(tmp_path_factory) -> Path:
    """A small BIDS tree of 12 coarse head phantoms (16 scans), two groups."""
    out = tmp_path_factory.mktemp("phantoms") / "bids"
    out.mkdir()
    write_bids(out, subjects=12, seed=3, voxel_sizes=COARSE_VOXELS)
    return out


@pytest.fixture(scope="session")
def phantom_store(phantom_bids, tmp_path_factory) -> Path:
    """The phantom tree as a store with train/val/test splits, chunks of 8 slices."""
    out = tmp_path_factory.mktemp("store") / "phantoms.h5"
    args = [str(phantom_bids), "-o", str(out), "--label-column", "group", "--workers", "1"]
    args += ["--val-fraction", "0.25", "--test-fraction", "0.25", "--chunk-slices", "8"]
    assert preprocess_main(args) == 0
    return out


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
