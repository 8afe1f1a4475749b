"""python -m loader (summary, preview) and the scripts that make data."""

from __future__ import annotations

import mmap
import os

import bench_out_of_core
import numpy as np
from bench_out_of_core import MemoryCgroup, _reads_text, block_device, disk_line, disk_reads
from make_large_store import write_large_store
from make_phantoms import main as make_phantoms_main

from loader.cli import main as loader_main
from loader.store import open_store


def test_loader_summary_and_preview(phantom_store, tmp_path, capsys):
    picture = tmp_path / "preview.png"
    assert loader_main([str(phantom_store), "--preview", str(picture), "--count", "9"]) == 0
    out = capsys.readouterr().out
    with open_store(phantom_store) as store:
        assert f"{store.num_slices} slices 64x64 uint8" in out
        assert f"uuid {store.uuid}" in out
        for name, split in store.splits.items():
            assert f"{name}  " in out
            assert str(len(split)) in out
    assert "classes: control, patient" in out
    assert (
        "labels table: group (categorical), age (numeric), sex (categorical), iq (numeric)" in out
    )
    assert '"label_column": "group"' in out
    assert picture.read_bytes().startswith(b"\x89PNG")


def test_loader_refuses_what_is_not_a_store(tmp_path, capsys):
    (tmp_path / "x.h5").write_text("no")
    assert loader_main([str(tmp_path / "x.h5")]) == 2
    assert "not a store" in capsys.readouterr().err
    assert loader_main([str(tmp_path / "missing.h5")]) == 2


def test_make_large_store_writes_a_valid_store_of_the_asked_size(tmp_path):
    path = tmp_path / "large.h5"
    num_slices = write_large_store(path, 0.01, chunk_slices=64)
    assert num_slices == int(0.01 * 2**30) // 4096
    with open_store(path) as store:
        assert store.num_slices == num_slices
        assert list(store.splits) == ["train"]
        assert store.class_names == ["control", "patient"]
        assert set(np.unique(store.labels[:])) == {0, 1}
        assert store.images[:64].max() > 200  # real phantom slices, not zeros


def test_make_phantoms_refuses_to_overwrite(tmp_path, capsys):
    out = tmp_path / "bids"
    assert make_phantoms_main([str(out), "--subjects", "2", "--seed", "1"]) == 0
    rows = [line.split("\t")[:2] for line in (out / "participants.tsv").read_text().splitlines()]
    assert rows == [["participant_id", "group"], ["sub-001", "control"], ["sub-002", "patient"]]
    assert len(list(out.rglob("*_T1w.nii.gz"))) == 2
    assert make_phantoms_main([str(out), "--subjects", "2"]) == 2
    assert "exists" in capsys.readouterr().err


def test_loader_names_a_folder_and_a_missing_preview_folder(phantom_store, tmp_path, capsys):
    assert loader_main([str(tmp_path)]) == 2
    assert "a folder without stores (*.h5)" in capsys.readouterr().err
    assert loader_main([str(phantom_store), "--preview", str(tmp_path / "no" / "p.png")]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""  # nothing printed before the one-line error
    assert captured.err == f"error: {tmp_path / 'no' / 'p.png'}: no such folder for the picture\n"


def test_the_out_of_core_benchmark_counts_the_reads_of_the_disk_under_its_stores(tmp_path):
    """The disk reads of a pass are the requests ``/proc/diskstats`` counts on the device
    holding the store (read with O_DIRECT here, so the page cache cannot serve them)."""
    device = block_device(tmp_path)
    if device is None:  # tmpfs or overlay: nothing to count, and the table says so
        assert disk_reads(None) == (0, 0)
        assert "no disk reads counted" in disk_line(None)
        return
    assert disk_line(device).startswith(f"disk: {device} (")
    path = tmp_path / "data"
    path.write_bytes(np.random.default_rng(0).bytes(1 << 20))
    os.sync()
    before = disk_reads(device)
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    try:
        buffer = mmap.mmap(-1, 1 << 20)  # page-aligned, as O_DIRECT needs
        assert os.preadv(fd, [buffer], 0) == 1 << 20
    finally:
        os.close(fd)
    count, size = (after - first for after, first in zip(disk_reads(device), before, strict=True))
    assert count >= 1
    assert size >= 1 << 20


def test_the_reads_column_gives_the_median_turns_count_size_and_rate():
    turns = [(4000, 4000 * 262144, 2.0), (100, 100 * 4 << 20, 1.0), (5000, 5000 * 262144, 4.0)]
    assert _reads_text(turns) == "4,000 x 256 KiB, 2,000/s"
    assert _reads_text([(0, 0, 1.0)]) == "0 (all from memory)"


def test_the_out_of_core_benchmark_limits_memory_with_cgroup_v2_where_there_is_no_v1(
    tmp_path, monkeypatch
):
    """Machines without cgroup v1's memory controller (most of today's) get the limit
    through the v2 hierarchy: memory.max, memory.peak and memory.stat's anon (v1 has
    memory.limit_in_bytes, max_usage_in_bytes and total_rss).
    A folder stands in for /sys/fs/cgroup (this machine's memory controller is on v1)."""
    monkeypatch.setattr(bench_out_of_core, "CGROUP_ROOT", tmp_path / "memory")
    monkeypatch.setattr(bench_out_of_core, "CGROUP_V2_ROOT", tmp_path)
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    (tmp_path / "cgroup.controllers").write_text("cpuset cpu io pids\n")
    assert not MemoryCgroup.available()
    (tmp_path / "cgroup.controllers").write_text("cpuset cpu io memory pids\n")
    assert MemoryCgroup.available()
    group = MemoryCgroup(1536 << 20)
    assert group.version == 2
    assert (tmp_path / "cgroup.subtree_control").read_text() == "+memory"
    assert (group.path / "memory.max").read_text() == str(1536 << 20)
    (group.path / "memory.stat").write_text("anon 12345\nfile 999999\nshmem 7\n")
    (group.path / "memory.peak").write_text("4096\n")
    assert (group.anonymous, group.peak) == (12345, 4096)
