"""Splits per subject, stratified by label, and the row layout of the store they give."""

from __future__ import annotations

import warnings

import numpy as np

from loader.schema import UNLABELLED_SPLIT


def quantile_strata(values: dict[str, float], bins: int = 4) -> dict[str, int]:
    """Subject -> the quantile bin of its value (-1 where missing): strata for a quantity.

    >>> quantile_strata({"a": 20.0, "b": 30.0, "c": 40.0, "d": 50.0, "e": float("nan")}, 2)
    {'a': 0, 'b': 0, 'c': 1, 'd': 1, 'e': -1}
    """
    present = np.array([v for v in values.values() if not np.isnan(v)], dtype=np.float64)
    edges = np.quantile(present, np.linspace(0, 1, bins + 1)[1:-1]) if present.size else []
    return {
        subject_id: -1 if np.isnan(value) else int(np.searchsorted(edges, value, side="right"))
        for subject_id, value in values.items()
    }


def split_names(val_fraction: float, test_fraction: float, folds: int) -> list[str]:
    """The splits, in row order.

    >>> split_names(0.2, 0.0, 0)
    ['train', 'val']
    >>> split_names(0.0, 0.0, 3)
    ['fold0', 'fold1', 'fold2']
    """
    if folds:
        return [f"fold{k}" for k in range(folds)]
    return ["train"] + ["val"] * (val_fraction > 0) + ["test"] * (test_fraction > 0)


def assign_splits(
    subject_labels: dict[str, int],
    val_fraction: float = 0.2,
    test_fraction: float = 0.0,
    folds: int = 0,
    seed: int = 0,
) -> dict[str, str]:
    """Give every subject one split, so no subject is on two sides.

    Subjects are grouped by label (stratified): every class gets the same share of each
    split, and at least one subject in each split where it has enough subjects. In a
    store with labels, unlabelled subjects (label -1) go to the split ``unlabelled``.
    The result depends only on the subjects, their labels and ``seed``.

    Args:
        subject_labels: subject id -> label index, -1 for unlabelled.
        val_fraction: share of each class for ``val``. Defaults to 0.2.
        test_fraction: share of each class for ``test``. Defaults to 0.
        folds: when > 0, ``fold0`` .. ``fold{folds-1}`` instead of train/val/test.
        seed: the seed. Defaults to 0.

    Returns:
        Subject id -> split name.
    """
    labelled = any(label >= 0 for label in subject_labels.values())
    groups: dict[int, list[str]] = {}
    for subject_id in sorted(subject_labels):
        groups.setdefault(subject_labels[subject_id] if labelled else 0, []).append(subject_id)
    names = split_names(val_fraction, test_fraction, folds)
    splits = {}
    dealt = 0
    for label in sorted(groups):
        subjects = groups[label]
        if label < 0:
            splits.update(dict.fromkeys(subjects, UNLABELLED_SPLIT))
            continue
        order = np.random.default_rng([seed, label + 1]).permutation(len(subjects))
        subjects = [subjects[i] for i in order]
        if folds:
            for i, subject_id in enumerate(subjects):
                splits[subject_id] = names[(dealt + i) % folds]
            dealt += len(subjects)
            counts = [min(len(subjects), folds)]
        else:
            counts = _split_counts(len(subjects), val_fraction, test_fraction)
            start = 0
            for name, count in zip(names, counts, strict=True):
                splits.update(dict.fromkeys(subjects[start : start + count], name))
                start += count
        if min(counts) == 0 or (folds and len(subjects) < folds):
            warnings.warn(
                f"class {label} has {len(subjects)} subject(s): too few for one in every split",
                stacklevel=2,
            )
    return splits


def _split_counts(num_subjects: int, val_fraction: float, test_fraction: float) -> list[int]:
    """Subjects for train, [val], [test]: rounded shares, at least one each where possible.

    >>> _split_counts(10, 0.2, 0.0), _split_counts(3, 0.1, 0.1), _split_counts(1, 0.2, 0.0)
    ([8, 2], [1, 1, 1], [1, 0])
    """
    shares = [share for share in (val_fraction, test_fraction) if share > 0]
    held_out = [round(num_subjects * share) for share in shares]
    held_out = [max(count, 1) if num_subjects > len(shares) else count for count in held_out]
    while sum(held_out) >= num_subjects and sum(held_out) > 0:  # keep one for training
        largest = held_out.index(max(held_out))
        held_out[largest] -= 1
    return [num_subjects - sum(held_out), *held_out]


def row_order(row_splits: np.ndarray, names: list[str], seed: int) -> tuple[np.ndarray, dict]:
    """Where each row goes: split by split, in a seeded random order inside each split.

    Args:
        row_splits: the split index (into ``names``) of each row, in canonical order.
        names: the split names, in row order.
        seed: the seed.

    Returns:
        ``(destination, ranges)``: the store row of each canonical row, and split name ->
        ``[start, stop)``.
    """
    destination = np.empty(len(row_splits), dtype=np.int64)
    ranges = {}
    start = 0
    for index, name in enumerate(names):
        rows = np.flatnonzero(row_splits == index)
        order = np.random.default_rng([seed, 1000 + index]).permutation(len(rows))
        destination[rows[order]] = np.arange(start, start + len(rows))
        ranges[name] = [start, start + len(rows)]
        start += len(rows)
    return destination, ranges
