"""The question asked of a store at load time: which value ``y`` each row has, and what kind.

A target is a column of the labels table kept in the store (or of a table joined at load
time), or None for the store's own labels. Its values are one per scan (row of the
subjects table); a batch's ``y`` is the value of each row's scan. Numeric columns are
regression targets unless classification is asked for; text columns are classes, sorted
as the store sorts its own.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from loader import table
from loader.schema import SUBJECT_ID, SUBJECT_LABEL, SUBJECTS
from loader.store import Store

CLASSIFICATION = "classification"
REGRESSION = "regression"
SEGMENTATION = "segmentation"
TASKS = (CLASSIFICATION, REGRESSION, SEGMENTATION)
MASK = "mask"  # the target of segmentation: each slice's label mask


@dataclass(frozen=True)
class Target:
    """What ``y`` is.

    Attributes:
        name: the column, or None for the store's labels.
        task: ``classification`` or ``regression``.
        class_names: the classes (classification), else empty.
        values: one per scan: int32 class index (-1 where missing) or float32 (NaN where
            missing).
    """

    name: str | None
    task: str
    class_names: list[str]
    values: np.ndarray

    @property
    def present(self) -> np.ndarray:
        """Per scan, whether it has a value."""
        if self.task == REGRESSION:
            return ~np.isnan(self.values)
        return self.values >= 0


def resolve(
    store: Store,
    target: str | None = None,
    task: str | None = None,
    labels: str | os.PathLike | None = None,
    id_column: str = table.ID_COLUMN,
) -> Target:
    """The target of a store: a column's values per scan, typed for the task.

    Args:
        store: the open store.
        target: a column of the store's labels table (or of ``labels``); None for the
            store's own labels.
        task: ``classification`` or ``regression``; None follows the column: numbers are
            regression, text is classification.
        labels: a ``.tsv``/``.csv`` table joined by subject id instead of the store's; a
            subject it lacks has no value.
        id_column: the subject-id column of ``labels``. Defaults to ``participant_id``.

    Raises:
        ValueError: an unknown column (the columns are listed), a text column asked to be
            a regression target, an unknown task, or ``labels`` without ``target``.
    """
    if task is not None and task not in TASKS:
        raise ValueError(f"`task` must be one of {', '.join(TASKS)}; received task={task!r}")
    if target == MASK or task == SEGMENTATION:
        return _masks(store, target, task)
    if target is None:
        if labels is not None:
            raise ValueError("`labels` needs `target`: the column of the table to read")
        if task == REGRESSION:
            raise ValueError("the store's labels are classes: give a numeric `target` to regress")
        label = store.file[f"{SUBJECTS}/{SUBJECT_LABEL}"][()].astype(np.int32)
        return Target(None, CLASSIFICATION, store.class_names, label)
    kind, raw = _column(store, target, labels, id_column)
    if task is None:
        task = REGRESSION if kind == table.NUMERIC else CLASSIFICATION
    if task == REGRESSION:
        if kind != table.NUMERIC:
            raise ValueError(
                f"{store.path}: column {target!r} holds text, not numbers: it cannot be a "
                "regression target (use task='classification')"
            )
        return Target(target, REGRESSION, [], raw.astype(np.float32))
    if kind == table.NUMERIC:
        raw = np.array([None if np.isnan(v) else f"{v:g}" for v in raw], dtype=object)
    names = table.class_names(raw)
    return Target(target, CLASSIFICATION, names, table.class_indices(raw, names))


def _masks(store: Store, target, task) -> Target:
    """The segmentation target: every scan has its masks; the classes are the labels 0..max."""
    if target != MASK or task not in (None, SEGMENTATION):
        raise ValueError(
            f"segmentation reads target='mask', and target='mask' is segmentation; received "
            f"target={target!r}, task={task!r}"
        )
    if store.masks is None:
        raise ValueError(
            f"{store.path}: the store has no masks: preprocess with --masks DESC (BIDS) or "
            "--masks-suffix SUFFIX"
        )
    names = ["background", *(str(n) for n in range(1, max(store.mask_labels) + 1))]
    scans = len(store.subjects_table()[SUBJECT_ID])
    return Target(MASK, SEGMENTATION, names, np.zeros(scans, dtype=np.int32))


def _column(store: Store, target: str, labels, id_column: str) -> tuple[str, np.ndarray]:
    """``(kind, values per scan)`` of a column of the store's table or of ``labels``."""
    if labels is None:
        participants = store.participants()
        if target not in participants:
            raise ValueError(
                f"{store.path}: no column {target!r} in the store's labels table; its columns "
                f"are {list(participants)}"
            )
        return participants[target]
    try:
        rows = table.read_table(labels, id_column)
    except table.TableError as exc:
        raise ValueError(str(exc)) from exc
    if target not in table.columns_of(rows):
        raise ValueError(
            f"{labels}: no column {target!r}; its columns are {table.columns_of(rows)}"
        )
    subject_ids = store.subjects_table()[SUBJECT_ID]
    cells = [rows.get(subject_id, {}).get(target) for subject_id in subject_ids]
    kind = table.column_kind(cell for row in rows.values() for cell in [row.get(target)])
    if kind == table.NUMERIC:
        return kind, table.numeric_values(cells)
    return kind, np.array(cells, dtype=object)


def resolve_all(
    stores: list[Store],
    target: str | None = None,
    task: str | None = None,
    labels=None,
    id_column: str = table.ID_COLUMN,
) -> list[Target]:
    """The target of each of several stores read as one: one task, classes merged by name.

    Raises:
        ValueError: as :func:`resolve`, or stores whose column is numbers in one and text
            in another.
    """
    targets = [resolve(store, target, task, labels, id_column) for store in stores]
    if len({t.task for t in targets}) > 1:
        raise ValueError(
            f"column {target!r} is numbers in some stores and text in others: give `task`"
        )
    if targets[0].task == SEGMENTATION:  # as many classes as the most labels of one store
        names = max((t.class_names for t in targets), key=len)
        return [Target(t.name, t.task, names, t.values) for t in targets]
    if targets[0].task == CLASSIFICATION and len(targets) > 1:
        names, values = table.merge_classes([(t.class_names, t.values) for t in targets])
        targets = [Target(t.name, t.task, names, v) for t, v in zip(targets, values, strict=True)]
    return targets
