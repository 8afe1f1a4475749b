"""``python -m loader verify STORE...``: read every chunk and every table once, report damage.

Each /images chunk is compared with its checksum (schema 3); every other dataset is read
whole (in blocks of rows), so an unreadable one is found too. Exit 0: healthy; 1: damaged
(one line per damage: dataset, chunk, rows); 2: not a store.
"""

from __future__ import annotations

import argparse
import os

import h5py
import numpy as np

from loader import schema
from loader.exits import run_main
from loader.store import StoreError, open_store

BLOCK_BYTES = 64 << 20  # what a table is read in at a time


def verify(path: str | os.PathLike) -> list[str]:
    """The damage of a store, one line each; empty for a healthy store.

    Raises:
        StoreError: not a store (no schema, unfinished, a newer schema).
    """
    path = os.fspath(path)
    size = os.path.getsize(path)
    try:
        store = open_store(path)
    except StoreError as exc:
        if "truncated" in str(exc) or "eof" in str(exc).lower():
            return [f"{path}: truncated: the file ends at byte {size}"]
        raise
    with store:
        found = []
        images = store.images
        chunk = images.chunks[0] if images.chunks else max(store.num_slices, 1)
        sums = store.file.get(schema.CHECKSUMS)
        expected = sums[()] if sums is not None else None
        for index, start in enumerate(range(0, store.num_slices, chunk)):
            stop = min(start + chunk, store.num_slices)
            where = f"/images chunk {index} (rows {start}-{stop - 1})"
            try:
                rows = images[start:stop]
            except (OSError, RuntimeError) as exc:
                found.append(f"{path}: {where}: unreadable ({_first_line(exc)})")
                continue
            if expected is not None and schema.checksum(rows) != int(expected[index]):
                found.append(f"{path}: {where}: the checksum does not match: changed bytes")
        return found + _tables(store.file, path)


def _tables(h5: h5py.File, path: str) -> list[str]:
    """Read every dataset but /images in blocks of rows; one line per unreadable block."""
    names = []
    h5.visititems(
        lambda name, obj: (
            names.append(name) if isinstance(obj, h5py.Dataset) and name != schema.IMAGES else None
        )
    )
    found = []
    for name in names:
        dataset = h5[name]
        length = dataset.shape[0] if dataset.shape else 1
        row_bytes = dataset.dtype.itemsize * int(np.prod(dataset.shape[1:], dtype=np.int64))
        block = max(1, BLOCK_BYTES // max(row_bytes, 1))  # /masks: 16,384 rows, not more
        for start in range(0, max(length, 1), block):
            try:
                dataset[start : start + block] if dataset.shape else dataset[()]
            except (OSError, RuntimeError) as exc:
                stop = min(start + block, length)
                found.append(
                    f"{path}: /{name} rows {start}-{stop - 1}: unreadable ({_first_line(exc)})"
                )
    return found


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


def main(argv: list[str] | None = None) -> int:
    """Run ``python -m loader verify``; returns the exit status."""
    parser = argparse.ArgumentParser(prog="python -m loader verify", description=__doc__)
    parser.add_argument("store", nargs="+", metavar="STORE", help="the stores to check")

    def body(args: argparse.Namespace) -> int:
        damaged = False
        for path in args.store:
            lines = verify(path)
            for line in lines:
                print(line)
            damaged |= bool(lines)
            if not lines:
                with open_store(path) as store:
                    checked = (
                        "every chunk matches its checksum"
                        if schema.CHECKSUMS in store.file
                        else f"readable; schema {store.version} keeps no checksums"
                    )
                    print(f"{path}: healthy ({store.num_slices} slices, {checked})")
        return 1 if damaged else 0

    return run_main(parser, argv, body)
