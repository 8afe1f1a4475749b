"""Several stores read as one: which files, whether they agree, and one set of classes.

Stores written separately (one per cohort, or the shards of one preprocessing run) read
as one data set when they agree on everything that changes what a slice means. Classes
are merged by name: the union of every store's classes, sorted as one store sorts its
own, and each store's class indices remapped to it.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from loader import table
from loader.store import Store

# Preprocessing settings (store `config`) that change what a pixel means.
PIXEL_SETTINGS = ("axis", "size", "normalize", "suffix", "volume")
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
        ("slice shape", a.slice_shape, b.slice_shape),
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


def merge_classes(per_store: list[tuple[list[str], np.ndarray]]) -> tuple[list[str], list]:
    """One list of classes for several stores, and each store's indices remapped to it.

    Args:
        per_store: ``(class_names, indices)`` of each store (-1: no class).

    Returns:
        ``(class_names, [indices, ...])``.

    Example:
        >>> names, (a, b) = merge_classes([(["ad", "cn"], np.array([0, 1, -1])),
        ...                                (["cn", "mci"], np.array([1, 0]))])
        >>> names, a.tolist(), b.tolist()
        (['ad', 'cn', 'mci'], [0, 1, -1], [2, 1])
    """
    names = table.class_names({name for store_names, _ in per_store for name in store_names})
    position = {name: index for index, name in enumerate(names)}
    remapped = []
    for store_names, indices in per_store:
        mapping = np.array([position[name] for name in store_names] + [-1], dtype=np.int32)
        remapped.append(mapping[np.asarray(indices)])  # -1 picks the last entry: -1
    return names, remapped
