"""Checksummed chunks: `python -m loader verify` finds changed bytes and truncation."""

from __future__ import annotations

import shutil

import h5py
import numpy as np
import pytest

from loader import H5Sequence
from loader.cli import main as loader_main
from loader.store import StoreDamagedError, open_store


def _chunk_offset(path, index: int) -> tuple[int, int]:
    """Where chunk ``index`` of /images lies in the file: (byte offset, size)."""
    with h5py.File(path, "r", locking=False) as h5:
        info = h5["images"].id.get_chunk_info(index)
        return info.byte_offset, info.size


@pytest.fixture
def copy(phantom_store, tmp_path):
    target = tmp_path / "copy.h5"
    shutil.copy(phantom_store, target)
    return target


def test_a_healthy_store_verifies(copy, capsys):
    assert loader_main(["verify", str(copy)]) == 0
    assert "healthy (507 slices, every chunk matches its checksum)" in capsys.readouterr().out


def test_changed_bytes_are_named_by_dataset_chunk_and_rows(copy, capsys):
    offset, size = _chunk_offset(copy, 5)
    with open(copy, "r+b") as handle:  # one flipped bit in the middle of chunk 5
        handle.seek(offset + size // 2)
        byte = handle.read(1)[0]
        handle.seek(offset + size // 2)
        handle.write(bytes([byte ^ 1]))
    assert loader_main(["verify", str(copy)]) == 1
    out = capsys.readouterr().out.strip().splitlines()
    assert out == [
        f"{copy}: /images chunk 5 (rows 40-47): the checksum does not match: changed bytes"
    ]


def test_a_truncated_store_is_damage(copy, capsys):
    size = copy.stat().st_size
    with open(copy, "r+b") as handle:
        handle.truncate(size // 2)
    assert loader_main(["verify", str(copy)]) == 1
    out = capsys.readouterr().out
    assert "truncated" in out
    assert "Traceback" not in out


def test_a_file_that_is_no_store_is_exit_2(tmp_path, capsys):
    path = tmp_path / "x.h5"
    path.write_bytes(b"not an hdf5 file at all")
    assert loader_main(["verify", str(path)]) == 2
    assert capsys.readouterr().err.startswith("error: ")


def _flip(path, chunk: int) -> None:
    offset, size = _chunk_offset(path, chunk)
    with open(path, "r+b") as handle:
        handle.seek(offset + size // 2)
        byte = handle.read(1)[0]
        handle.seek(offset + size // 2)
        handle.write(bytes([byte ^ 1]))


def test_the_sequence_never_serves_damaged_rows(copy):
    _flip(copy, 5)  # rows 40-47, in the train split
    sequence = H5Sequence(copy, split="train", batch_size=8)
    for index in range(5):  # chunks 0-4 are whole
        assert sequence[index][0].shape == (8, 64, 64, 1)
    with pytest.raises(StoreDamagedError, match=r"rows 40-47 \(/images chunk 5\) are damaged"):
        sequence[5]
    unchecked = H5Sequence(copy, split="train", batch_size=8, verify=False)
    assert unchecked[5][0].shape == (8, 64, 64, 1)  # verify=False reads what is there


def test_a_chunk_read_in_part_is_checked_whole(copy):
    with open_store(copy) as store:
        val = store.splits["val"]
    chunk = val.start // 8  # the chunk where val begins, shared with train
    assert val.start % 8  # the split starts inside it
    _flip(copy, chunk)
    with pytest.raises(StoreDamagedError, match=f"/images chunk {chunk}"):
        H5Sequence(copy, split="val", batch_size=4)[0]


def test_a_batch_across_chunks_checks_each_chunk_it_reads(copy):
    """An unshuffled batch that starts and ends inside chunks: the rows are those read
    without checks, and a damaged chunk in its middle is found."""
    with open_store(copy) as store:
        val = store.splits["val"]
    assert val.start % 8
    assert val.stop - val.start >= 20
    checked, plain = (H5Sequence(copy, split="val", batch_size=20, verify=v) for v in (True, False))
    np.testing.assert_array_equal(checked[0][0], plain[0][0])
    middle = val.start // 8 + 1  # a whole chunk between the two the batch covers in part
    _flip(copy, middle)
    with pytest.raises(StoreDamagedError, match=f"/images chunk {middle}"):
        H5Sequence(copy, split="val", batch_size=20)[0]
