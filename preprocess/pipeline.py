"""The preprocessing run: worker processes turn scans into slices, this process writes them.

``run`` is what ``python -m preprocess`` calls; it never raises for a bad scan (each is
reported with its reason) and keeps ``<store>.partial/`` when it stops early, so
``resume=True`` continues where it was. The pieces it calls: :mod:`preprocess.settings`
(what to make), :mod:`preprocess.find` (the scans and labels), :mod:`preprocess.workers`
(the processes) running :mod:`preprocess.scan` (one scan to slices), and
:mod:`preprocess.writer` (the store).
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
import warnings
from collections import Counter
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from loader.store import open_store
from preprocess.discover import Scan
from preprocess.errors import PreprocessError
from preprocess.find import find_scans, split_assignment
from preprocess.settings import RunOptions, Settings
from preprocess.shards import parse_shard, subjects_of_shard
from preprocess.standard import CHECK_FLOOR, load_template
from preprocess.workers import processed
from preprocess.writer import Partial, partial_path


@dataclass
class Summary:
    """What a run did."""

    store: Path
    written: int = 0
    resumed: int = 0
    rejected: list[tuple[str, str]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    splits: dict[str, list[int]] = field(default_factory=dict)
    slices_per_split_class: dict[str, Counter] = field(default_factory=dict)
    size_bytes: int = 0
    seconds: float = 0.0
    check_registration: list[tuple[str, float]] = field(default_factory=list)


def run(
    inputs: list[str],
    output: str | os.PathLike,
    settings: Settings,
    options: RunOptions | None = None,
    progress: bool | None = None,
    report=print,
) -> Summary:
    """Make a store from scans.

    Args:
        inputs: scan files (NIfTI, MGZ, Analyze, DICOM) or folders of them.
        output: the store to write.
        settings: what to make.
        options: workers, overwrite, resume, buffer. Defaults to ``RunOptions()``.
        progress: show a progress bar; None shows one on a terminal.
        report: called with each line about a rejected scan or a warning.

    Returns:
        The summary. ``summary.rejected`` lists ``(path, reason)``.

    Raises:
        PreprocessError: nothing could be written (no store).
        FileExistsError: ``output`` or its partial folder exists without ``overwrite``/``resume``.
    """
    started = time.perf_counter()
    options = RunOptions() if options is None else options
    output = Path(output)
    summary = Summary(output)
    _check_output(output, options)
    shard = parse_shard(settings.shard, settings.shard_count)
    found = find_scans(inputs, settings, report, options.id_salt)
    with contextlib.closing(found):  # DICOM series' images, converted for this run
        with warnings.catch_warnings(record=True) as caught:  # e.g. a class too small for a split
            warnings.simplefilter("always")
            assignment = split_assignment(found, settings)
        scans = _scans_of_shard(found.scans, shard)
        for path, reason in found.rejected:
            _reject(summary, report, path, reason)
        config = store_config(settings, inputs, shard)
        template = _standard_template(settings, report)
        with Partial(output, config, resume=options.resume, overwrite=options.overwrite) as partial:
            done = partial.done()
            summary.resumed = sum(scan.source in done for scan in scans)
            todo = [scan for scan in scans if scan.source not in done]
            if todo:
                _compute(todo, settings, options, partial, summary, report, progress)
            _check_written(partial, summary, report)
            summary.splits = partial.finalize(
                found.class_names, options.buffer_mb << 20, found.participants, assignment, template
            )
        for warning in caught:
            summary.warnings.append(f"{output}: {warning.message}")
            report(f"warning: {output}: {warning.message}")
    _count_slices(summary)
    summary.size_bytes = output.stat().st_size
    summary.seconds = time.perf_counter() - started
    return summary


def _standard_template(settings: Settings, report) -> tuple | None:
    """With ``--space mni``, the template's facts, planes and brain slices, decided once for
    every scan (and reported); None in native space."""
    if settings.space != "mni":
        return None
    standard = load_template(settings.axis, settings.min_foreground, settings.template)
    facts = standard.facts()
    first, last = facts["slab"]
    report(
        f"standard space: {facts['name']}, {settings.axis} planes {first} to {last} "
        f"({len(standard.positions)} slices a scan)"
    )
    return facts, standard.positions, standard.brain_slices(settings.size)


def _check_written(partial: Partial, summary: Summary, report) -> None:
    """Before finalising: refuse a run that wrote nothing (its partial folder removed), and
    list files stored under two subjects and registrations to check.

    Raises:
        PreprocessError: every scan was rejected.
    """
    records = partial.done().values()
    if not records:
        partial.remove()
        raise PreprocessError(
            f"no usable scans: all {len(summary.rejected)} were rejected; no store written"
        )
    for line in same_files(records):
        summary.warnings.append(line)
        report(f"warning: {line}")
    summary.check_registration = poor_registrations(records)


def _check_output(output: Path, options: RunOptions) -> None:
    """Refuse a store path that is a folder, in no folder, or taken (unless told)."""
    if output.is_dir():
        raise PreprocessError(f"{output}: is a folder; give the store's file name")
    if not output.parent.is_dir():
        raise PreprocessError(f"{output.parent}: no such folder for the store")
    resumable = options.resume and partial_path(output).exists()
    if output.exists() and not options.overwrite and not resumable:
        left = f" and no {partial_path(output)} is left to resume" if options.resume else ""
        raise FileExistsError(f"{output}: exists{left}; use --overwrite to replace it")


def _scans_of_shard(scans: list[Scan], shard: tuple[int, int] | None) -> list[Scan]:
    """The scans this shard writes (all without shards): every shard saw every subject, so
    all agree on splits and classes."""
    if shard is None:
        return scans
    mine = subjects_of_shard([s.subject_id for s in scans], *shard)
    if not mine:
        raise PreprocessError(
            f"--shard {shard[0]}/{shard[1]} has no subjects: "
            f"{len({s.subject_id for s in scans})} subjects for {shard[1]} shards"
        )
    return [scan for scan in scans if scan.subject_id in mine]


def store_config(settings: Settings, inputs: list[str], shard) -> dict:
    """Every setting that changes the store's content, as JSON gives it back: the store's
    ``config`` attribute, and what ``--resume`` must match."""
    config = {**asdict(settings), "inputs": [os.path.abspath(item) for item in inputs]}
    config["suffix"] = list(settings.suffix)
    config["labels"] = settings.labels and os.path.abspath(settings.labels)
    config["shard"] = shard and f"{shard[0]}/{shard[1]}"
    config["template"] = settings.template if settings.space == "mni" else None
    return config


def poor_registrations(records) -> list[tuple[str, float]]:
    """``(source, similarity)`` of the scans whose registration is below
    :data:`CHECK_FLOOR`, worst first.

    >>> poor_registrations([{"source": f"{k}.nii", "similarity": s}
    ...                     for k, s in enumerate([0.6, 0.53, 0.3, 0.39, None])])
    [('2.nii', 0.3), ('3.nii', 0.39)]
    """
    scored = [(r["source"], r["similarity"]) for r in records if r.get("similarity") is not None]
    limit = CHECK_FLOOR
    return sorted(((source, s) for source, s in scored if s < limit), key=lambda item: item[1])


def same_files(records) -> list[str]:
    """One line per file that appears under two subjects (same sha256): a leak between splits.

    >>> same_files([{"source": "a.nii", "subject_id": "1", "sha256": "x"},
    ...             {"source": "b.nii", "subject_id": "2", "sha256": "x"}])[0][:52]
    'a.nii and b.nii are the same file (sha256 x) under s'
    """
    first: dict[str, dict] = {}
    lines = []
    for record in sorted(records, key=lambda r: r["source"]):
        earlier = first.setdefault(record["sha256"], record)
        if earlier is not record and earlier["subject_id"] != record["subject_id"]:
            lines.append(
                f"{earlier['source']} and {record['source']} are the same file (sha256 "
                f"{record['sha256'][:12]}) under subjects {earlier['subject_id']!r} and "
                f"{record['subject_id']!r}: its slices may sit on both sides of a split"
            )
    return lines


def _compute(todo, settings, options, partial, summary, report, progress) -> None:
    """Process ``todo``, writing each scan as it finishes (see :func:`processed`)."""
    show = sys.stderr.isatty() if progress is None else progress
    with tqdm(total=len(todo), unit="scan", disable=not show, file=sys.stderr) as bar:
        say = bar.write if show else report
        try:
            results = contextlib.closing(processed(todo, settings, options))
            with results as pairs:  # on any error here, the pool's scans are cancelled
                for scan, result in pairs:
                    if isinstance(result, str):
                        _reject(summary, say, scan.shown, result)
                    else:
                        record, slices, masks = result
                        partial.add(record, slices, masks)
                        summary.written += 1
                        for note in record["notes"]:
                            summary.warnings.append(f"{scan.shown}: {note}")
                            say(f"warning: {scan.shown}: {note}")
                    bar.update()
        except BrokenProcessPool as exc:
            raise PreprocessError(
                f"a worker process died (out of memory?); {summary.written} scans are kept in "
                f"{partial.path}: rerun with --resume"
            ) from exc


def _reject(summary: Summary, report, path: str, reason: str) -> None:
    summary.rejected.append((path, reason))
    report(f"rejected: {path}: {reason}")


def _count_slices(summary: Summary) -> None:
    """Slices per split and class, read from the finished store's labels."""
    with open_store(summary.store) as store:
        for name, split in store.splits.items():
            labels = store.labels[split.start : split.stop]
            values, counts = np.unique(labels, return_counts=True)
            summary.slices_per_split_class[name] = Counter(
                {
                    (store.class_names[value] if value >= 0 else "unlabelled"): int(count)
                    for value, count in zip(values, counts, strict=True)
                }
            )
