"""What a run's model looked at: ``python -m training explain`` and ``training.explain``.

For each subject of a split, its stored slices go through the run's best model with
patches hidden (:mod:`training.occlusion`); the score explained is the probability of the
subject's class (its true class, the predicted one when the subject has no value) or, for
regression, the predicted value in the target's units. The maps, pictures and the
averages per group (class, or third of the target) land in OUT
(:mod:`training.explain_folder`), subject by subject.
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from loader import Store, files, open_store
from loader.schema import SESSION, SUBJECT_ID
from loader.sequence import model_input
from loader.target import REGRESSION, SEGMENTATION
from training import run_folder
from training.data import choose_target
from training.errors import TrainingError
from training.explain_folder import FOLDERS, Explanation, Writer
from training.inference import load_run_model, preprocess_settings, read_run
from training.occlusion import occlusion_maps, scorer
from training.settings import Settings, saved_settings

__all__ = ["Explanation", "explain"]

QUANTILES = 3  # regression: subjects grouped by thirds of their true value


@dataclass
class _Subject:
    """A subject of the split: its store, scans, name and true value (None when absent)."""

    name: str
    store: int
    scans: list[int]
    value: float | int | None
    sessions: list[str]


def explain(
    run_dir: str | os.PathLike,
    output: str | os.PathLike,
    split: str = "val",
    subjects: list[str] | None = None,
    patch: int | None = None,
    overwrite: bool = False,
    progress: bool | None = None,
) -> Explanation:
    """Occlusion maps of a run's best model on the slices of a split's subjects.

    Args:
        run_dir: a run folder of ``python -m training`` (classification or regression).
        output: the folder to write: ``maps/<subject>.npy`` (and ``.nii.gz`` on the
            template's grid for ``--space mni`` stores), ``average/<group>.npy``,
            ``pictures/<subject>.png``, ``groups.png``, ``subjects.csv``, ``explain.json``.
        split: the store's split whose subjects are explained. Defaults to ``val``.
        subjects: subject ids (with or without ``sub-``). Defaults to every subject of
            the split.
        patch: the side of the hidden square in pixels. Defaults to an eighth of a slice.
        overwrite: replace an existing ``output``.
        progress: a progress bar over subjects; None shows one on a terminal.

    Raises:
        TrainingError: not a run folder, no model, a segmentation run, a store that is
            gone or was rewritten, a split the store lacks, an unknown subject.
        FileExistsError: ``output`` exists and not ``overwrite``.
    """
    started = time.perf_counter()
    run_dir, output = Path(run_dir), Path(output)
    config = read_run(run_dir)
    task = config["target"]["task"]
    if task == SEGMENTATION:
        raise TrainingError(
            f"{run_dir}: a segmentation run: its output is already a map per pixel; explain "
            "answers classification and regression runs"
        )
    if output.exists() and not overwrite:
        raise FileExistsError(f"{output}: exists; use --overwrite to replace it")
    facts = run_folder.stores_read(config)
    settings = _run_settings(config)
    with _RunStores(facts) as stores:
        size = stores[0].slice_shape[0]
        patch = max(2, size // 8) if patch is None else patch
        if not 1 <= patch <= size:
            raise TrainingError(f"--patch must be 1 to {size} pixels; received {patch}")
        model = load_run_model(run_dir, preprocess_settings(facts[0]["config"]), settings.channels)
        targets = choose_target(stores, settings)
        chosen = _chosen(stores, targets, split, subjects)
        score = scorer(model, task, settings.channels)
        result = Explanation(output, approximate=stores[0].space != "mni")
        rows = _rows_of(stores, chosen)
        partial = files.fresh_folder(output)
        try:
            for folder in FOLDERS:
                (partial / folder).mkdir()
            writer = Writer(partial, result, stores[0], config, _grouping(chosen, task, config))
            show = sys.stderr.isatty() if progress is None else progress
            for subject in tqdm(chosen, unit="subject", disable=not show, file=sys.stderr):
                item = _explain_subject(subject, stores, rows, score, task, patch)
                writer.add(item)  # written now: one subject's slices in memory at a time
            writer.finish(stores, split, patch)
            files.publish_folder(partial, output)
        except BaseException:
            shutil.rmtree(partial, ignore_errors=True)
            raise
    result.seconds = time.perf_counter() - started
    return result


def _run_settings(config: dict) -> Settings:
    """The run's settings, as far as this version knows them."""
    known = set(Settings.__dataclass_fields__)
    values = {k: v for k, v in saved_settings(config).items() if k in known}
    try:
        return Settings(**values)
    except (TypeError, ValueError) as exc:
        raise TrainingError(f"the run's settings cannot be read: {exc}") from exc


class _RunStores:
    """The run's stores, opened and checked to be the files the run read."""

    def __init__(self, facts: list[dict]):
        self.facts, self.opened = facts, []

    def __enter__(self) -> list[Store]:
        try:
            for fact in self.facts:
                store = open_store(fact["path"])
                self.opened.append(store)
                if store.uuid != fact["uuid"]:
                    raise TrainingError(
                        f"{fact['path']}: not the store the run read (store {store.uuid}, "
                        f"the run read {fact['uuid']}): it was written again"
                    )
        except (OSError, ValueError) as exc:
            self.__exit__()
            if isinstance(exc, TrainingError):
                raise
            raise TrainingError(f"the run's store cannot be read: {exc}") from exc
        return self.opened

    def __exit__(self, *exc_info) -> None:
        for store in self.opened:
            store.close()


def _chosen(stores, targets, split: str, wanted: list[str] | None) -> list[_Subject]:
    """The subjects of ``split`` (those named in ``wanted``), with their scans and values."""
    found: dict[str, _Subject] = {}
    elsewhere: dict[str, str] = {}
    for index, (store, target) in enumerate(zip(stores, targets, strict=True)):
        try:
            store.select(split)
        except ValueError as exc:
            raise TrainingError(str(exc)) from exc
        table = store.subjects_table()
        inside = store.scans_in([split])
        prefix = f"{Path(store.path).stem}/" if len(stores) > 1 else ""
        for scan, subject_id in enumerate(table[SUBJECT_ID]):
            name = prefix + str(subject_id)
            if not inside[scan]:
                elsewhere.setdefault(name, "another split")
                continue
            value = target.values[scan].item() if target.present[scan] else None
            subject = found.setdefault(name, _Subject(name, index, [], value, []))
            subject.scans.append(scan)
            if table[SESSION][scan]:
                subject.sessions.append(str(table[SESSION][scan]))
    if wanted is None:
        if not found:
            raise TrainingError(f"split {split!r} has no subjects")
        return [found[name] for name in sorted(found)]
    chosen = []
    for name in wanted:
        bare = name.removeprefix("sub-")
        if bare not in found:
            where = f"it is in {elsewhere[bare]}" if bare in elsewhere else "no such subject"
            raise TrainingError(
                f"subject {name!r} is not in split {split!r} ({where}); the split has "
                f"{', '.join(sorted(found)[:5])}{' ...' if len(found) > 5 else ''}"
            )
        chosen.append(found[bare])
    return chosen


def _rows_of(stores, chosen: list[_Subject]) -> dict[tuple[int, int], np.ndarray]:
    """(store, scan) -> the scan's rows, for the chosen subjects' scans."""
    found = {}
    for index, store in enumerate(stores):
        scans = [scan for subject in chosen if subject.store == index for scan in subject.scans]
        if scans:
            found |= {(index, scan): rows for scan, rows in store.rows_of_scans(scans).items()}
    return found


def _subject_slices(store: Store, rows_per_scan: list[np.ndarray]) -> tuple[np.ndarray, ...]:
    """A subject's stored slices as the model reads them, float32 ``(n, S, S, C)``, and
    their ``/slice`` positions, in increasing position (at equal positions, its scans in
    the subjects table's order: sessions)."""
    rows = np.concatenate(rows_per_scan).astype(np.int64)
    scan_rank = np.concatenate([np.full(len(r), k) for k, r in enumerate(rows_per_scan)])
    by_row = np.argsort(rows)
    stored = store.images[rows[by_row]]  # only these rows (h5py reads a sorted list of rows)
    images = model_input(
        stored if stored.ndim == 4 else stored[..., None], store.scale, store.offset
    )
    positions = np.asarray(store.slice_index[rows[by_row]], dtype=np.int64)
    order = np.lexsort((scan_rank[by_row], positions))  # by position, then by scan
    return images[order], positions[order]


def _explain_subject(subject: _Subject, stores, rows, score, task: str, patch: int) -> dict:
    """One subject's maps, slices and answer."""
    store = stores[subject.store]
    mine = [rows[subject.store, scan] for scan in subject.scans]
    images, positions = _subject_slices(store, mine)
    outputs = score(images).mean(axis=0)  # pooled over slices, as evaluation pools
    if task == REGRESSION:
        column, predicted = 0, float(outputs[0])
    else:
        predicted = int(np.argmax(outputs))
        column = predicted if subject.value is None else int(subject.value)
    columns = np.full(len(images), column)
    maps = occlusion_maps(score, images, columns, patch)
    return {
        "subject": subject,
        "images": images,
        "positions": positions,
        "maps": maps,
        "column": column,
        "predicted": predicted,
        "probability": None if task == REGRESSION else float(outputs[predicted]),
    }


def _grouping(chosen: list[_Subject], task: str, config: dict):
    """``group(item) -> name``: the class explained, or for regression the third of the
    true values the subject's value (the predicted one where none) falls in."""
    target = config["target"]
    if task != REGRESSION:
        names = target["class_names"]
        return lambda item: names[item["column"]]
    label = target["name"] or "value"
    values = np.array([s.value for s in chosen if s.value is not None], dtype=np.float64)
    if len(values) < QUANTILES:
        return lambda item: f"{label} (all)"
    edges = np.quantile(values, np.linspace(0, 1, QUANTILES + 1))

    def third(item) -> str:
        value = item["predicted"] if item["subject"].value is None else item["subject"].value
        k = int(np.clip(np.searchsorted(edges, value, side="right") - 1, 0, QUANTILES - 1))
        return f"{label} {edges[k]:.3g}-{edges[k + 1]:.3g}"

    return third
