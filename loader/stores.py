"""Several stores read as one: which files, whether they agree, and one set of classes.

Stores written separately (one per cohort, or the shards of one preprocessing run) read
as one data set when they agree on everything that changes what a slice means. Classes
are merged by name: the union of every store's classes, sorted as one store sorts its
own, and each store's class indices remapped to it. :func:`open_parts` gathers what
``H5Sequence`` keeps of each store (plain facts that pickle) and the chunk-aligned blocks
of all of them in one row space.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from loader import schema
from loader.plan import aligned_blocks
from loader.rows import RowLayout, row_layout
from loader.schema import UNLABELLED_SPLIT
from loader.store import Store, open_store
from loader.target import MASK, resolve_all

# Preprocessing settings (store `config`) that change what a pixel means.
PIXEL_SETTINGS = ("axis", "size", "normalize", "volume")  # and the channels' names
STORE_SUFFIXES = (".h5", ".hdf5")


def store_paths(paths) -> list[str]:
    """The store files named by ``paths``: one path, a list, or a folder (its stores, by name).

    Raises:
        FileNotFoundError: a folder without stores.
        TypeError: not a path or a list of paths.
    """
    items = [paths] if isinstance(paths, str | os.PathLike) else paths
    if not isinstance(items, list | tuple) or not items:
        raise TypeError(f"`path` must be a path, a folder or a list of paths; received {paths!r}")
    found = []
    for item in items:
        if not isinstance(item, str | os.PathLike):
            raise TypeError(f"`path` must hold paths; received {item!r}")
        if os.path.isdir(item):
            inside = sorted(
                str(p) for p in Path(item).iterdir() if p.suffix.lower() in STORE_SUFFIXES
            )
            if not inside:
                raise FileNotFoundError(f"{item}: a folder without stores (*.h5)")
            found += inside
        else:
            found.append(os.fspath(item))
    return found


def first_difference(a: Store, b: Store) -> str | None:
    """What two stores disagree on that changes what a slice means; None when they agree."""
    facts = [
        ("space", a.space, b.space),
        ("slice shape", a.slice_shape, b.slice_shape),
        ("channels", a.channel_names, b.channel_names),
        ("stored type", str(a.dtype), str(b.dtype)),
        ("intensity scale", (a.scale, a.offset), (b.scale, b.offset)),
    ]
    facts += [(f"setting `{k}`", a.config.get(k), b.config.get(k)) for k in PIXEL_SETTINGS]
    for what, left, right in facts:
        if left != right:
            return f"{what}: {left!r} in {a.path}, {right!r} in {b.path}"
    return None


def check_agree(stores: list[Store]) -> None:
    """Refuse stores that cannot be read as one.

    Raises:
        ValueError: the first difference, naming the two stores.
    """
    for other in stores[1:]:
        difference = first_difference(stores[0], other)
        if difference:
            raise ValueError(
                f"stores read as one must agree on what a slice means; they differ in {difference}"
            )


@dataclass(frozen=True)
class Part:
    """One store of a sequence: plain facts only, so the sequence pickles."""

    path: str
    uuid: str
    identity: tuple
    first_row: int  # where its rows start in the sequence's row space
    slice_shape: tuple
    dtype: np.dtype
    scale: np.float32
    offset: np.float32
    images: RowLayout
    subjects: RowLayout
    values: np.ndarray | None  # target value per scan
    present: np.ndarray | None
    masks: RowLayout | None = None  # read as the target of segmentation
    channel_names: tuple[str, ...] = ()
    checksums: np.ndarray | None = None  # per /images chunk; None before schema 3
    chunk_rows: int = 1
    num_rows: int = 0


def open_parts(paths, split, target, task, labels, id_column):
    """The parts, the chunk-aligned blocks of all of them and the chunk rows of each block's
    store, the target, and whether weighted.

    Raises:
        ValueError: stores that do not agree, splits empty in every store, a bad target.
    """
    stores = [open_store(path) for path in paths]
    try:
        check_agree(stores)
        chosen = [
            store.select(split) if target else _labelled_rows(store, split) for store in stores
        ]
        labelled = [
            store.labelled and s[0].name != UNLABELLED_SPLIT
            for store, s in zip(stores, chosen, strict=True)
        ]
        if target is None and len(set(labelled)) > 1:
            raise ValueError(f"stores read as one must all have labels, or none; received {paths}")
        if all(len(s) == 0 for selected in chosen for s in selected):
            raise ValueError(f"{', '.join(paths)}: split {split!r} has no rows")
        if target or labelled[0]:
            targets = resolve_all(stores, target, task, labels, id_column)
        else:
            targets = [None] * len(stores)
        parts, blocks, chunk_rows, first_row, weighted = [], [], [], 0, False
        for store, selected, store_target in zip(stores, chosen, targets, strict=True):
            ranges = [(s.start, s.stop) for s in selected if len(s)]
            blocks.append(aligned_blocks(ranges, store.chunk_slices) + first_row)
            chunk_rows.append(np.full(len(blocks[-1]), store.chunk_slices))
            if store_target is not None:  # some scan of the selected splits without a value?
                names = None if target and split is None else [s.name for s in selected]
                weighted |= not store_target.present[store.scans_in(names)].all()
            parts.append(
                Part(
                    store.path,
                    store.uuid,
                    store.identity,
                    first_row,
                    store.slice_shape,
                    store.dtype,
                    np.float32(store.scale),
                    np.float32(store.offset),
                    row_layout(store.images),
                    row_layout(store.subject),
                    None if store_target is None else store_target.values,
                    None if store_target is None else store_target.present,
                    row_layout(store.masks) if target == MASK else None,
                    tuple(store.channel_names),
                    _checksums(store),
                    store.chunk_slices,
                    store.num_slices,
                )
            )
            first_row += store.num_slices
    finally:
        for store in stores:
            store.close()
    return parts, np.concatenate(blocks), np.concatenate(chunk_rows), targets[0], weighted


def _checksums(store: Store) -> np.ndarray | None:
    sums = store.file.get(schema.CHECKSUMS)
    return None if sums is None else sums[()]


def _labelled_rows(store, split) -> list:
    """The splits to read; in a labelled store, unlabelled rows only when asked for alone.

    ``split=None`` in a labelled store means every labelled split: the unlabelled split
    holds exactly the subjects without a label. Named alone it is read as ``x`` only.

    Raises:
        ValueError: the unlabelled split named beside labelled ones.
    """
    selected = store.select(split)
    if not store.labelled:
        return selected
    if split is None:
        return [s for s in store.splits.values() if s.name != UNLABELLED_SPLIT]
    if len(selected) > 1 and UNLABELLED_SPLIT in {s.name for s in selected}:
        raise ValueError(
            f"{store.path}: split {UNLABELLED_SPLIT!r} has no labels: name it alone (batches "
            f"of x only) or leave it out; received split={split!r}"
        )
    return selected
