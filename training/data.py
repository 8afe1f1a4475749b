"""A run's data: the target, the checks of the stores against it, the sequences, class weights."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from loader import H5Sequence, Store
from loader.schema import SESSION, SUBJECT_ID
from loader.store import StoreChangedError
from loader.target import CLASSIFICATION, REGRESSION, SEGMENTATION, Target, resolve_all
from training.errors import TrainingError
from training.settings import Settings

FEW_SUBJECTS = 3  # a validation class with fewer subjects than this gets a warning


def choose_target(stores: list[Store], settings: Settings) -> list[Target]:
    """The target of each store: ``settings.target``, else the stores' labels (or their
    numeric label column); one task, classes merged by name.

    Raises:
        TrainingError: an unknown column (the store's columns are listed), a text column
            for regression, or nothing to predict.
    """
    name = settings.target
    if name is None and not stores[0].labelled:
        name = stores[0].config.get("label_column")  # a numeric label column: no classes
        if name is None:
            raise TrainingError(
                f"{stores[0].path}: the store has no labels: give --target COLUMN (its labels "
                f"table has {list(stores[0].participants()) or 'no columns'})"
            )
    try:
        return resolve_all(stores, name, settings.task, settings.labels, settings.id_column)
    except ValueError as exc:
        raise TrainingError(str(exc)) from exc


def check_store(
    stores: list[Store], settings: Settings, targets: list[Target], report
) -> str | None:
    """Check that the stores can be trained on for this target with these settings.

    Returns:
        The test split: ``settings.test_split``, else ``test`` when the stores have one.

    Raises:
        TrainingError: one class, an unknown or empty split, a split where no subject has
            a value for the target, a constant regression target.
    """
    target = targets[0]
    where = stores[0].path if len(stores) == 1 else f"{len(stores)} stores"
    what = f"target {target.name!r}" if target.name else "the store's labels"
    if target.task == CLASSIFICATION and len(target.class_names) < 2:
        raise TrainingError(
            f"{where}: {what} has {len(target.class_names)} class(es) "
            f"{target.class_names}: nothing to tell apart"
        )
    test_split = settings.test_split
    if (
        test_split is None
        and all("test" in store.splits for store in stores)
        and "test" not in settings.train_split
    ):
        test_split = "test"
    for name in [*settings.train_split, settings.val_split, *([test_split] if test_split else [])]:
        try:
            rows = sum(len(store.select(name)[0]) for store in stores)
        except ValueError as exc:
            raise TrainingError(str(exc)) from exc
        if rows == 0:
            raise TrainingError(f"{where}: split {name!r} has no slices")
        if not any(
            t.present[s.scans_in([name])].any() for s, t in zip(stores, targets, strict=True)
        ):
            raise TrainingError(
                f"{where}: split {name!r} has no subject with a value for {what}: "
                "train and score on splits that have them"
            )
    if target.task == REGRESSION and np.ptp(training_values(stores, settings, targets)) == 0:
        raise TrainingError(f"{where}: {what} has one value in the training splits")
    names = [] if target.task == SEGMENTATION else target.class_names
    for index, class_name in enumerate(names):
        count = 0
        for store, store_target in zip(stores, targets, strict=True):
            ids = store.subjects_table()[SUBJECT_ID]
            mine = store.scans_in([settings.val_split]) & (store_target.values == index)
            count += len(set(ids[mine]))
        if count < FEW_SUBJECTS:
            report(
                f"warning: {where}: split {settings.val_split!r} has {count} subject(s) of "
                f"class {class_name!r}: early stopping and its scores will be noisy"
            )
    return test_split


def training_values(stores: list[Store], settings: Settings, targets: list[Target]) -> np.ndarray:
    """The target's values of the scans in the training splits that have one."""
    return np.concatenate(
        [
            t.values[store.scans_in(settings.train_split) & t.present]
            for store, t in zip(stores, targets, strict=True)
        ]
    )


def build_data(
    stores: list[Store],
    settings: Settings,
    target: Target,
    test_split: str | None,
    process: tuple[int, int] = (0, 1),
) -> dict[str, H5Sequence]:
    """``train`` (shuffled), ``val`` and, when there is one, ``test`` sequences of the target.

    With ``count`` processes, each reads ``batch_size / count`` rows a step: its own share
    of every training epoch (``shard=process``), and all of validation and test, so that
    every process scores the same rows and early stopping decides the same everywhere.

    Raises:
        StoreChangedError: a sequence opened other stores than ``stores``.
    """
    paths = [store.path for store in stores]
    common = {
        "batch_size": settings.batch_size,
        "channels": settings.channels,
        "output": settings.feed,
        "read_mib": settings.read_mib,
        "workers": settings.workers,
        "use_multiprocessing": settings.use_multiprocessing,
        "target": target.name,
        "task": target.task,
        "labels": settings.labels,
        "id_column": settings.id_column,
    }
    common["batch_size"] = settings.batch_size // process[1]
    shard = process if process[1] > 1 else None
    data = {
        "train": H5Sequence(
            paths,
            split=list(settings.train_split),
            shuffle=True,
            seed=settings.seed,
            shard=shard,
            **common,
        ),
        "val": H5Sequence(paths, split=settings.val_split, **common),
    }
    if test_split:
        data["test"] = H5Sequence(paths, split=test_split, **common)
    uuids = "+".join(store.uuid for store in stores)
    for sequence in data.values():
        if sequence.store_uuid != uuids:
            raise StoreChangedError(f"{paths[0]}: the store changed")
    return data


def class_weights(
    stores: list[Store], settings: Settings, targets: list[Target]
) -> dict[int, float]:
    """``balanced`` weights: slices / (classes x slices of the class), in the training splits.

    Counts slices per scan by reading ``/subject`` of the training rows in blocks.
    """
    per_class = np.zeros(len(targets[0].class_names))
    for store, target in zip(stores, targets, strict=True):
        counts = np.zeros(len(target.values), dtype=np.int64)
        for split in store.select(list(settings.train_split)):
            for start in range(split.start, split.stop, 1 << 20):
                block = store.subject[start : min(start + (1 << 20), split.stop)]
                counts += np.bincount(block, minlength=len(counts))
        present = target.present
        per_class += np.bincount(
            target.values[present], weights=counts[present], minlength=len(per_class)
        )
    total = per_class.sum()
    return {k: float(total / (len(per_class) * n)) if n else 0.0 for k, n in enumerate(per_class)}


def sequence_facts(sequence: H5Sequence, stores: list[Store], targets: list[Target]) -> dict:
    """Per row of an unshuffled epoch: target value, whether present, subject, session."""
    pairs = np.concatenate([sequence.rows(i) for i in range(len(sequence))])
    return row_facts(pairs, stores, targets)


def row_facts(pairs: np.ndarray, stores: list[Store], targets: list[Target]) -> dict:
    """Per row (``rows()`` of a sequence): target value, whether present, subject, session."""
    if pairs.ndim == 1:
        pairs = np.stack([np.zeros_like(pairs), pairs], axis=1)
    facts = {
        "values": np.empty(len(pairs), dtype=targets[0].values.dtype),
        "present": np.empty(len(pairs), dtype=bool),
        "ids": np.empty(len(pairs), dtype=object),
        "sessions": np.empty(len(pairs), dtype=object),
    }
    for index in np.unique(pairs[:, 0]):
        mine = pairs[:, 0] == index
        local = pairs[mine, 1]
        store, target = stores[index], targets[index]
        start, stop = int(local.min()), int(local.max()) + 1  # a split is one contiguous range
        scans = store.subject[start:stop][local - start]
        table = store.subjects_table()
        prefix = f"{Path(store.path).stem}/" if len(stores) > 1 else ""
        facts["values"][mine] = target.values[scans]
        facts["present"][mine] = target.present[scans]
        facts["ids"][mine] = prefix + table[SUBJECT_ID][scans].astype(object)
        facts["sessions"][mine] = table[SESSION][scans]
    return facts
