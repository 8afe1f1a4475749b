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
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable

import numpy as np


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
    """

    def __init__(
        self,
        blocks: np.ndarray,
        batch_size: int,
        shuffle: bool,
        seed: int,
        epoch: int,
        chunk_rows: int | np.ndarray | None = None,
    ):
        if shuffle and len(blocks):
            order = np.random.default_rng([seed, epoch]).permutation(len(blocks))
            if chunk_rows is not None:
                chunks = np.broadcast_to(chunk_rows, len(blocks))[order]
                short = blocks[order, 1] - blocks[order, 0] < chunks
                order = np.concatenate([order[~short], order[short]])
            blocks = blocks[order]
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

    def runs(self, index: int) -> list[tuple[int, int]]:
        """The ``[start, stop)`` row runs of batch ``index``, in the batch's order.

        Raises:
            IndexError: ``index`` outside ``[0, len(plan))``.
        """
        if not 0 <= index < len(self):
            raise IndexError(f"batch index must be in [0, {len(self)}); received {index}")
        begin = index * self._batch_size
        end = min(begin + self._batch_size, self._num_rows)
        first = int(self._ends.searchsorted(begin, side="right"))  # the block of row `begin`
        last = int(self._ends.searchsorted(end - 1, side="right"))  # the block of row `end - 1`
        runs = []
        blocks = self._blocks[first : last + 1].tolist()  # plain ints: numpy scalars cost
        ends = self._ends[first : last + 1].tolist()  # more than the few sums below
        for (block_start, block_stop), block_end in zip(blocks, ends, strict=True):
            block_begin = block_end - (block_stop - block_start)
            start = block_start + max(begin - block_begin, 0)
            stop = block_stop - max(block_end - end, 0)
            runs.append((start, stop))
        return runs
