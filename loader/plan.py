"""The epoch plan: which contiguous runs of store rows make up each batch of an epoch.

Rows were shuffled inside each split when the store was written. Each epoch, the
chunk-aligned blocks of the selected splits are permuted with ``rng(seed, epoch)``, laid
end to end (whole chunks first, the few shorter blocks at split edges after them), and
that order is cut into batches of ``batch_size`` rows (the last one shorter). Every row
comes once per epoch, every batch is a union of a few contiguous runs, and the plan is a
pure function of ``(splits, chunk_rows, batch_size, shuffle, seed, epoch)``.

Whole chunks first: with ``batch_size`` a multiple of the chunk, every shuffled batch but
the last then starts and ends on chunk edges, so it reads only whole chunks, and checking
each chunk against its checksum reads nothing it does not use (a block short of a chunk
anywhere earlier would move every later batch edge into the middle of a chunk).

Read groups (``groups``): blocks of adjacent chunks are grouped (a few MiB of file each),
the groups are permuted, taken ``window`` at a time, and the blocks permuted inside each
window. A batch then draws its chunks from the ``window`` groups of its window, and the
reader can ask the disk for each group as one read of a few MiB instead of one read per
chunk: a shuffled epoch makes far fewer, larger requests, which a disk that limits requests
per second needs. The rows inside a split were shuffled when the
store was written, so a group is a random sample of its split; which groups share a window
changes every epoch.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable

import numpy as np

# Read groups of a shuffled epoch: this many MiB of adjacent chunks are asked of the disk
# at once, and each window mixes this many groups. Disk requests per GiB read out of core
# (4 GiB store, 1.5 GiB limit, scripts/bench_out_of_core.py): one a 256 KiB chunk ~4,400,
# groups of 4 MiB ~1,560 (a contiguous pass ~270). Stores whose chunks hold half of this
# already are read chunk by chunk.
READ_MIB = 4.0
MIX_GROUPS = 8


def aligned_blocks(ranges: Iterable[tuple[int, int]], chunk_rows: int) -> np.ndarray:
    """Cut row ranges at chunk boundaries.

    Args:
        ranges: ``(start, stop)`` row ranges.
        chunk_rows: rows per chunk.

    Returns:
        ``(k, 2)`` int64 array of ``[start, stop)`` blocks, none crossing a chunk boundary.

    Example:
        >>> aligned_blocks([(5, 20), (20, 24)], 8).tolist()
        [[5, 8], [8, 16], [16, 20], [20, 24]]
        >>> aligned_blocks([(0, 20)], 8).tolist()
        [[0, 8], [8, 16], [16, 20]]
    """
    blocks = []
    for start, stop in ranges:
        next_edge = (start // chunk_rows + 1) * chunk_rows  # the first one after start
        edges = [start, *range(next_edge, stop, chunk_rows), stop]
        blocks.extend(itertools.pairwise(edges))
    return np.array(blocks, dtype=np.int64).reshape(-1, 2)


class EpochPlan:
    """The batches of one epoch as runs of rows.

    Args:
        blocks: ``(k, 2)`` row blocks, from :func:`aligned_blocks`.
        batch_size: rows per batch.
        shuffle: permute the blocks.
        seed: the seed of the permutation.
        epoch: the epoch, mixed into the seed.
        chunk_rows: rows per chunk, one number or one per block: shuffled blocks shorter
            than their chunk go after the whole ones. None keeps the permutation as it is.
        groups: the read group of each block (adjacent chunks of one store share one), or
            None: shuffled blocks are then permuted freely. Ignored without ``shuffle``.
        window: how many groups each window of a shuffled plan mixes.
    """

    def __init__(
        self,
        blocks: np.ndarray,
        batch_size: int,
        shuffle: bool,
        seed: int,
        epoch: int,
        chunk_rows: int | np.ndarray | None = None,
        groups: np.ndarray | None = None,
        window: int = MIX_GROUPS,
    ):
        windows, self._groups = None, None
        if shuffle and len(blocks):
            rng = np.random.default_rng([seed, epoch])
            if groups is None:
                order = rng.permutation(len(blocks))
            else:
                names, which = np.unique(groups, return_inverse=True)
                place = rng.permutation(len(names))  # each group's place in the epoch
                # windows of `window` groups, the blocks in random order inside each
                windows = place[which] // window
                order = np.lexsort((rng.random(len(blocks)), windows))
            if chunk_rows is not None:
                chunks = np.broadcast_to(chunk_rows, len(blocks))[order]
                short = blocks[order, 1] - blocks[order, 0] < chunks
                order = np.concatenate([order[~short], order[short]])
                if windows is not None:  # the short blocks: one last window of their own
                    last = np.arange(len(order)) >= len(order) - np.count_nonzero(short)
                    windows = np.where(last, windows.max() + 1, windows[order])
            elif windows is not None:
                windows = windows[order]
            if windows is not None:
                self._groups = np.asarray(groups)[order]
            blocks = blocks[order]
        self._windows = windows  # each block's window, non-decreasing; None: no groups
        self._blocks = blocks
        self._batch_size = batch_size
        lengths = blocks[:, 1] - blocks[:, 0]
        self._ends = np.cumsum(lengths)  # plan position one past each block
        self._num_rows = int(self._ends[-1]) if len(blocks) else 0

    @property
    def num_rows(self) -> int:
        """Rows in the epoch."""
        return self._num_rows

    def __len__(self) -> int:
        return -(-self._num_rows // self._batch_size)

    @property
    def num_windows(self) -> int:
        """Windows of read groups in the epoch; 0 for a plan without groups."""
        return 0 if self._windows is None else int(self._windows[-1]) + 1

    def window(self, index: int) -> int:
        """The window of batch ``index``'s first block (a plan with groups)."""
        return int(self._windows[self._span(index)[2]])

    def window_groups(self, window: int) -> np.ndarray:
        """The read groups of ``window``'s blocks, each once, in increasing order."""
        start, stop = self._windows.searchsorted([window, window + 1])
        return np.unique(self._groups[start:stop])

    def _span(self, index: int) -> tuple[int, int, int, int]:
        """``(begin, end, first, last)``: batch ``index``'s plan rows and its first and
        last block.

        Raises:
            IndexError: ``index`` outside ``[0, len(plan))``.
        """
        if not 0 <= index < len(self):
            raise IndexError(f"batch index must be in [0, {len(self)}); received {index}")
        begin = index * self._batch_size
        end = min(begin + self._batch_size, self._num_rows)
        first = int(self._ends.searchsorted(begin, side="right"))  # the block of row `begin`
        last = int(self._ends.searchsorted(end - 1, side="right"))  # the block of row `end - 1`
        return begin, end, first, last

    def runs(self, index: int) -> list[tuple[int, int]]:
        """The ``[start, stop)`` row runs of batch ``index``, in the batch's order.

        Raises:
            IndexError: ``index`` outside ``[0, len(plan))``.
        """
        begin, end, first, last = self._span(index)
        runs = []
        blocks = self._blocks[first : last + 1].tolist()  # plain ints: numpy scalars cost
        ends = self._ends[first : last + 1].tolist()  # more than the few sums below
        for (block_start, block_stop), block_end in zip(blocks, ends, strict=True):
            block_begin = block_end - (block_stop - block_start)
            start = block_start + max(begin - block_begin, 0)
            stop = block_stop - max(block_end - end, 0)
            runs.append((start, stop))
        return runs
