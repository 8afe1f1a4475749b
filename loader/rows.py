"""Reading runs of rows of one HDF5 dataset, straight from the file where its bytes allow it.

An uncompressed, native-endian dataset keeps each chunk as plain bytes at a fixed file
offset. For those, :class:`RowLayout` records the offsets once and :func:`read_rows`
reads a run of rows with one ``os.preadv`` per chunk: no HDF5 call, no global h5py lock,
no chunk cache, at the speed of ``np.memmap`` (measured in ``scripts/bench_loader.py``).
Every other dataset (compressed, filtered, big-endian) is read through h5py.

A layout holds only plain numbers, so it pickles, and a file descriptor opened for it
is never shared across a fork (the caller keys descriptors by process).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import h5py
import numpy as np


@dataclass(frozen=True)
class RowLayout:
    """Where the rows of a dataset lie in its file, or ``offsets=None`` when not plain bytes.

    Attributes:
        name: the dataset's name in the file.
        num_rows: rows along the first axis.
        row_bytes: bytes of one row.
        chunk_rows: rows per chunk (all rows for a contiguous dataset).
        offsets: file offset of each chunk's bytes, or None: read through h5py.
    """

    name: str
    num_rows: int
    row_bytes: int
    chunk_rows: int
    offsets: np.ndarray | None

    @property
    def raw(self) -> bool:
        """Whether rows are read with ``os.preadv`` instead of h5py."""
        return self.offsets is not None


def row_layout(dataset: h5py.Dataset) -> RowLayout:
    """Find where the rows of ``dataset`` lie in its file.

    Args:
        dataset: an open dataset of at least one dimension.

    Returns:
        The layout, raw when every chunk is allocated, unfiltered and whole in its
        trailing dimensions, and the dtype is native.
    """
    shape = dataset.shape
    num_rows = int(shape[0])
    row_bytes = int(np.prod(shape[1:], dtype=np.int64)) * dataset.dtype.itemsize
    chunks = dataset.chunks
    chunk_rows = int(chunks[0]) if chunks else max(num_rows, 1)
    layout = RowLayout(dataset.name, num_rows, row_bytes, chunk_rows, None)
    if not _plain_bytes(dataset):
        return layout
    if chunks is None:
        offset = dataset.id.get_offset()
        if offset is None:  # never written
            return layout
        return RowLayout(dataset.name, num_rows, row_bytes, chunk_rows, np.array([offset]))
    num_chunks = -(-num_rows // chunk_rows)
    offsets = np.full(num_chunks, -1, dtype=np.int64)

    def record(info) -> None:
        offsets[info.chunk_offset[0] // chunk_rows] = info.byte_offset

    dataset.id.chunk_iter(record)
    if num_chunks and offsets.min() < 0:  # an unallocated chunk reads as the fill value
        return layout
    return RowLayout(dataset.name, num_rows, row_bytes, chunk_rows, offsets)


def _plain_bytes(dataset: h5py.Dataset) -> bool:
    if not dataset.dtype.isnative or dataset.dtype.kind not in "iuf":
        return False
    if dataset.chunks and tuple(dataset.chunks[1:]) != tuple(dataset.shape[1:]):
        return False
    return dataset.id.get_create_plist().get_nfilters() == 0


def _pieces(layout: RowLayout, start: int, stop: int):
    """``(row, piece_stop, file_offset)`` of the parts of rows ``[start, stop)`` in each chunk."""
    row = start
    while row < stop:
        chunk = row // layout.chunk_rows
        piece_stop = min(stop, (chunk + 1) * layout.chunk_rows)
        offset = int(layout.offsets[chunk]) + (row - chunk * layout.chunk_rows) * layout.row_bytes
        yield row, piece_stop, offset
        row = piece_stop


def prefetch_rows(layout: RowLayout, start: int, stop: int, fd: int) -> None:
    """Ask the kernel to start reading rows ``[start, stop)`` now (no-op unless raw).

    Reads of the next batch then overlap with the work on this one: a shuffled epoch
    jumps between chunks, which defeats the kernel's own read-ahead.
    """
    if layout.raw:
        for row, piece_stop, offset in _pieces(layout, start, stop):
            length = (piece_stop - row) * layout.row_bytes
            os.posix_fadvise(fd, offset, length, os.POSIX_FADV_WILLNEED)


def prefetch_span(layout: RowLayout, start: int, stop: int, fd: int) -> None:
    """Ask the kernel to read rows ``[start, stop)`` as one span of the file, from the first
    chunk's bytes to the last's (no-op unless raw): one large read instead of one per
    chunk. Chunks out of order in the file, or far apart, are asked for one by one.
    """
    if not layout.raw or stop <= start:
        return
    first, last = start // layout.chunk_rows, (stop - 1) // layout.chunk_rows
    begin = int(layout.offsets[first])
    end = int(layout.offsets[last]) + layout.chunk_rows * layout.row_bytes
    used = (stop - start) * layout.row_bytes
    if np.all(np.diff(layout.offsets[first : last + 1]) > 0) and end - begin <= 2 * used:
        os.posix_fadvise(fd, begin, end - begin, os.POSIX_FADV_WILLNEED)
    else:
        prefetch_rows(layout, start, stop, fd)


def read_rows(
    layout: RowLayout,
    start: int,
    stop: int,
    out: np.ndarray,
    fd: int | None = None,
    dataset: h5py.Dataset | None = None,
) -> None:
    """Read rows ``[start, stop)`` into ``out``.

    Args:
        layout: the dataset's layout.
        start: first row.
        stop: one past the last row.
        out: a C-contiguous array of ``stop - start`` rows of the dataset's dtype and row size
            (a row of ``(h, w)`` may be read into ``(h, w, 1)``).
        fd: a descriptor of the file opened for reading, used when ``layout.raw``.
        dataset: the open dataset, used when not ``layout.raw``.

    Raises:
        OSError: the file ended before the rows (a truncated file).
    """
    if not layout.raw:
        rows = out.reshape((stop - start, *dataset.shape[1:]))  # a view
        dataset.read_direct(rows, np.s_[start:stop], np.s_[0 : stop - start])
        return
    buffer = memoryview(out.reshape(-1).view(np.uint8))
    for row, piece_stop, offset in _pieces(layout, start, stop):
        begin = (row - start) * layout.row_bytes
        end = (piece_stop - start) * layout.row_bytes
        if os.preadv(fd, [buffer[begin:end]], offset) != end - begin:
            raise OSError(f"{layout.name}: the file ends inside rows {row}..{piece_stop - 1}")
