"""Preprocessing in shards: which part of the subjects one run writes, from a scheduler's array job.

Every shard lists all the inputs and reads the whole labels table, so the shards agree,
without talking to each other, on every subject's split and on the class names; each
writes a complete store of its own subjects. Subjects are dealt round-robin in sorted
order, so a subject's sessions never straddle shards and the shards differ in size by at
most one subject.
"""

from __future__ import annotations

import os
import re

from preprocess.errors import InputError

_SHARD = re.compile(r"(\d+)/(\d+)")


def parse_shard(text: str | None, shard_count: int | None = None, environ=None) -> tuple | None:
    """``(index, count)`` from ``I/N`` or ``auto``; None when not sharded.

    ``auto`` reads a SLURM array job (``SLURM_ARRAY_TASK_ID`` less
    ``SLURM_ARRAY_TASK_MIN``, of ``SLURM_ARRAY_TASK_COUNT``) or a Kubernetes Indexed Job
    (``JOB_COMPLETION_INDEX``, of ``shard_count``).

    >>> parse_shard("2/4"), parse_shard(None)
    ((2, 4), None)
    >>> parse_shard("auto", environ={"SLURM_ARRAY_TASK_ID": "5", "SLURM_ARRAY_TASK_MIN": "1",
    ...                              "SLURM_ARRAY_TASK_COUNT": "8"})
    (4, 8)
    >>> parse_shard("auto", 3, environ={"JOB_COMPLETION_INDEX": "2"})
    (2, 3)

    Raises:
        InputError: not ``I/N`` or ``auto``, an index out of range, or ``auto`` outside an
            array job.
    """
    if text is None:
        return None
    environ = os.environ if environ is None else environ
    if text == "auto":
        if "SLURM_ARRAY_TASK_ID" in environ:
            first = int(environ.get("SLURM_ARRAY_TASK_MIN", 0))
            index = int(environ["SLURM_ARRAY_TASK_ID"]) - first
            count = int(environ.get("SLURM_ARRAY_TASK_COUNT", 0))
        elif "JOB_COMPLETION_INDEX" in environ and shard_count:
            index, count = int(environ["JOB_COMPLETION_INDEX"]), shard_count
        else:
            raise InputError(
                "--shard auto needs a SLURM array job (SLURM_ARRAY_TASK_ID, "
                "SLURM_ARRAY_TASK_COUNT) or a Kubernetes Indexed Job (JOB_COMPLETION_INDEX) "
                "with --shard-count N; give --shard I/N elsewhere"
            )
    else:
        match = _SHARD.fullmatch(text)
        if not match:
            raise InputError(f"--shard must be I/N (e.g. 0/4) or auto; received --shard {text}")
        index, count = int(match.group(1)), int(match.group(2))
    if not 0 <= index < count:
        raise InputError(
            f"--shard index must be in [0, {count}) for {count} shards; received index {index}"
        )
    return index, count


def subjects_of_shard(subject_ids, index: int, count: int) -> set[str]:
    """The subjects that shard ``index`` of ``count`` writes: every count-th in sorted order.

    >>> sorted(subjects_of_shard(["c", "a", "b", "a", "d"], 1, 2))
    ['b', 'd']
    """
    return {s for position, s in enumerate(sorted(set(subject_ids))) if position % count == index}
