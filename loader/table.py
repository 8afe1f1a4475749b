"""Tables of subjects (BIDS ``participants.tsv``, or any ``.tsv``/``.csv``) and their columns.

Preprocessing keeps the whole table in the store; training picks any column of it as the
target. A column is *numeric* when every value it has parses as a number (stored as
float64, NaN where missing), else *categorical* (stored as strings, "" where missing).
Only the standard library and numpy are used here.
"""

from __future__ import annotations

import csv
import os
from pathlib import Path

import numpy as np

from loader.schema import UNLABELLED

ID_COLUMN = "participant_id"  # BIDS participants.tsv: the subject-id column, by default

MISSING_VALUES = {"", "n/a", "na", "nan", "none", "null"}
NUMERIC = "numeric"
CATEGORICAL = "categorical"


class TableError(ValueError):
    """A table that cannot be read, or lacks a column; the message names the file."""


def is_missing(value: str | None) -> bool:
    """Whether a cell means "no value" (BIDS ``n/a``, empty, ``NaN``, ...).

    >>> is_missing("n/a"), is_missing(" "), is_missing("0")
    (True, True, False)
    """
    return value is None or value.strip().lower() in MISSING_VALUES


def read_table(
    path: str | os.PathLike, id_column: str = ID_COLUMN, notes: list | None = None
) -> dict[str, dict]:
    """Read a table of subjects: subject id (without ``sub-``) -> {column: cell or None}.

    A subject on several rows keeps the cells they agree on; where they differ it has no
    value (neither row can be trusted), and a line for ``notes`` says so.

    Args:
        path: a ``.tsv`` (tab-separated) or ``.csv`` (comma-separated) file with a header.
        id_column: the column of subject ids, with or without ``sub-``.
            Defaults to ``participant_id``.
        notes: a list that gets one line per subject listed more than once.

    Raises:
        TableError: the file is missing or unreadable, or has no ``id_column``.
    """
    path = Path(path)
    delimiter = "," if path.suffix.lower() == ".csv" else "\t"
    try:
        with open(path, newline="", encoding="utf-8-sig") as handle:
            reader = csv.DictReader(handle, delimiter=delimiter)
            rows = list(reader)
            columns = list(reader.fieldnames or [])
    except FileNotFoundError as exc:
        raise TableError(f"{path}: no such label file") from exc
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise TableError(f"{path}: unreadable label file ({exc})") from exc
    if id_column not in columns:
        raise TableError(f"{path}: no column {id_column!r}; the columns are {sorted(columns)}")
    table, repeats, differ = {}, {}, {}
    for row in rows:
        subject_id = (row[id_column] or "").strip().removeprefix("sub-")
        if not subject_id:
            continue
        cells = {
            name: None if is_missing(row.get(name)) else row[name].strip()
            for name in columns
            if name != id_column and name is not None
        }
        if subject_id not in table:
            table[subject_id] = cells
            continue
        repeats[subject_id] = repeats.get(subject_id, 1) + 1
        kept, differing = table[subject_id], differ.setdefault(subject_id, set())
        differing.update(name for name, value in cells.items() if kept[name] != value)
        kept.update((name, None) for name in differing)
    if notes is not None:
        for subject_id, count in repeats.items():
            names = ", ".join(sorted(differ[subject_id]))
            notes.append(
                f"{path}: subject {subject_id!r} has {count} rows; they differ in {names}: "
                "no value there (n/a)"
                if names
                else f"{path}: subject {subject_id!r} has {count} identical rows"
            )
    return table


def columns_of(table: dict[str, dict]) -> list[str]:
    """The columns of a table from :func:`read_table`, in the file's order."""
    return list(next(iter(table.values()), {}))


def column_kind(values) -> str:
    """``numeric`` when every value present parses as a number, else ``categorical``.

    >>> column_kind(["34", "n/a", "51.5"]), column_kind(["F", "M", None])
    ('numeric', 'categorical')
    """
    present = [value for value in values if not is_missing(value)]
    try:
        [float(value) for value in present]
    except ValueError:
        return CATEGORICAL
    return NUMERIC if present else CATEGORICAL


def numeric_values(values) -> np.ndarray:
    """float64 values, NaN where missing.

    >>> numeric_values(["1", None, "2.5"]).tolist()
    [1.0, nan, 2.5]
    """
    return np.array([np.nan if is_missing(v) else float(v) for v in values], dtype=np.float64)


def class_names(labels) -> list[str]:
    """The sorted distinct values: numerically when all are numbers.

    >>> class_names(["10", "2", None, "2"])
    ['2', '10']
    >>> class_names(["patient", "control"])
    ['control', 'patient']
    """
    names = {label for label in labels if not is_missing(label)}
    try:
        return sorted(names, key=float)
    except ValueError:
        return sorted(names)


def class_indices(values, names: list[str]) -> np.ndarray:
    """int32 index of each value in ``names``; -1 where missing or not a class.

    >>> class_indices(["b", None, "a", "z"], ["a", "b"]).tolist()
    [1, -1, 0, -1]
    """
    index = {name: position for position, name in enumerate(names)}
    return np.array(
        [index.get(v, UNLABELLED) if v is not None else UNLABELLED for v in values], np.int32
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
    names = class_names({name for store_names, _ in per_store for name in store_names})
    position = {name: index for index, name in enumerate(names)}
    remapped = []
    for store_names, indices in per_store:
        mapping = np.array([position[name] for name in store_names] + [UNLABELLED], np.int32)
        remapped.append(mapping[np.asarray(indices)])  # -1 picks the last entry: UNLABELLED
    return names, remapped
