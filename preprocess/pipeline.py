"""The preprocessing run: worker processes turn scans into slices, this process writes them.

``run`` is what ``python -m preprocess`` calls; it never raises for a bad scan (each is
reported with its reason) and keeps ``<store>.partial/`` when it stops early, so
``resume=True`` continues where it was.
"""

from __future__ import annotations

import concurrent.futures as futures
import hashlib
import multiprocessing
import os
import shutil
import sys
import time
import warnings
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from loader.store import open_store
from preprocess.discover import Scan, class_names, discover, read_label_table
from preprocess.slices import AXES, cut_slices
from preprocess.volume import NORMALIZATIONS, ScanError, foreground, load_volume, normalize
from preprocess.writer import Partial, partial_path, scan_record

DTYPES = ("uint8", "float16", "float32")
COMPRESSIONS = ("none", "lzf", "gzip")


@dataclass(frozen=True)
class Settings:
    """Every setting that changes what a store holds (stored as its ``config``).

    Attributes mirror the command-line options of ``python -m preprocess``.
    """

    axis: str = "axial"
    size: int = 64
    normalize: str = "percentile"
    min_foreground: float = 0.05
    volume: int | None = None
    dtype: str = "uint8"
    compression: str = "none"
    chunk_slices: int = 64
    val_fraction: float = 0.2
    test_fraction: float = 0.0
    folds: int = 0
    seed: int = 0
    layout: str = "auto"
    suffix: str = "T1w"
    labels: str | None = None
    label_column: str | None = None
    id_column: str = "participant_id"

    def __post_init__(self):
        _choice("axis", self.axis, tuple(AXES))
        _choice("normalize", self.normalize, NORMALIZATIONS)
        _choice("dtype", self.dtype, DTYPES)
        _choice("compression", self.compression, COMPRESSIONS)
        if self.size < 8:
            raise ValueError(f"--size must be at least 8; received {self.size}")
        if not 0 <= self.min_foreground < 1:
            raise ValueError(f"--min-foreground must be in [0, 1); received {self.min_foreground}")
        if self.chunk_slices < 1:
            raise ValueError(f"--chunk-slices must be at least 1; received {self.chunk_slices}")
        if self.volume is not None and self.volume < 0:
            raise ValueError(f"--volume must be >= 0; received {self.volume}")
        if self.folds < 0 or self.folds == 1:
            raise ValueError(f"--folds must be 0 (none) or at least 2; received {self.folds}")
        for name in ("val_fraction", "test_fraction"):
            if not 0 <= getattr(self, name) < 1:
                raise ValueError(
                    f"--{name.replace('_', '-')} must be in [0, 1); received {getattr(self, name)}"
                )
        if self.val_fraction + self.test_fraction >= 1:
            raise ValueError("--val-fraction plus --test-fraction must be below 1")
        if self.dtype == "uint8" and self.normalize != "percentile":
            raise ValueError(
                f"--dtype uint8 holds intensities in [0, 1] only: it needs --normalize percentile; "
                f"received --normalize {self.normalize} (use --dtype float16 or float32)"
            )
        if self.labels and not self.label_column:
            raise ValueError("--labels needs --label-column: the column that holds the labels")


def _choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"--{name} must be one of {', '.join(choices)}; received {value!r}")


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


class RunError(Exception):
    """The run cannot go on; the message is the one line to show."""


def process_scan(scan: Scan, settings: Settings) -> tuple[dict, np.ndarray]:
    """Load, check, normalise and slice one scan (runs in a worker process).

    Returns:
        ``(record, slices)``: the JSON-able facts of the scan and its slices in the stored dtype.

    Raises:
        ScanError: the scan cannot be used.
    """
    volume = load_volume(scan.path, settings.volume)
    mask = foreground(volume.data)
    data = normalize(volume.data, mask, settings.normalize)
    slices, positions = cut_slices(
        data, mask, volume.voxel_size, settings.axis, settings.size, settings.min_foreground
    )
    if settings.dtype == "uint8":
        slices = np.rint(np.clip(slices, 0, 1) * 255).astype(np.uint8)
    else:
        slices = slices.astype(settings.dtype)
    with open(scan.path, "rb") as handle:
        sha256 = hashlib.file_digest(handle, "sha256").hexdigest()
    record = scan_record(
        scan.source,
        scan.subject_id,
        positions,
        session=scan.session,
        label=scan.label,
        sha256=sha256,
        affine=volume.affine,
        shape=volume.data.shape,
        voxel_size=volume.voxel_size,
        notes=volume.notes,
    )
    return record, slices


def _process_or_reason(scan: Scan, settings: Settings):
    """``process_scan``, with every failure turned into a one-line reason."""
    try:
        return process_scan(scan, settings)
    except ScanError as exc:
        return str(exc)
    except MemoryError:
        return "out of memory while processing"
    except Exception as exc:  # a damaged file can fail deep inside nibabel or scipy
        return f"unreadable ({type(exc).__name__}: {exc})"


def find_scans(
    inputs: list[str], settings: Settings
) -> tuple[list[Scan], list[str], list[tuple[str, str]]]:
    """The scans of the inputs with their labels, the class names, and inputs rejected up front.

    Raises:
        RunError: no scans, or a problem with the inputs or the label file.
    """
    scans, rejected = discover(inputs, settings.layout, settings.suffix)
    if settings.label_column:
        tables = (
            [settings.labels]
            if settings.labels
            else [
                Path(item) / "participants.tsv"
                for item in inputs
                if (Path(item) / "participants.tsv").is_file()
            ]
        )
        if not tables:
            raise RunError(
                "--label-column needs --labels FILE: no input folder has a participants.tsv"
            )
        table = {}
        for path in tables:
            table.update(read_label_table(path, settings.label_column, settings.id_column))
        scans = [
            Scan(s.path, s.source, s.subject_id, s.session, table.get(s.subject_id)) for s in scans
        ]
    if not scans:
        raise RunError(f"no NIfTI scans found in {', '.join(map(str, inputs))}")
    return scans, class_names(s.label for s in scans), rejected


def run(
    inputs: list[str],
    output: str | os.PathLike,
    settings: Settings,
    workers: int = 1,
    overwrite: bool = False,
    resume: bool = False,
    buffer_bytes: int = 1 << 30,
    progress: bool | None = None,
    report=print,
) -> Summary:
    """Make a store from scans.

    Args:
        inputs: NIfTI files or folders.
        output: the store to write.
        settings: what to make.
        workers: processes that compute slices. Defaults to 1 (in this process).
        overwrite: replace an existing store (once the new one is complete).
        resume: continue ``<output>.partial/`` from an interrupted run.
        buffer_bytes: memory for the final shuffle. Defaults to 1 GiB.
        progress: show a progress bar; None shows one on a terminal.
        report: called with each line about a rejected scan or a warning.

    Returns:
        The summary. ``summary.rejected`` lists ``(path, reason)``.

    Raises:
        RunError: nothing could be written (no store).
        FileExistsError: ``output`` or its partial folder exists without ``overwrite``/``resume``.
    """
    started = time.perf_counter()
    output = Path(output)
    summary = Summary(output)
    if output.is_dir():
        raise RunError(f"{output}: is a folder; give the store's file name")
    if not output.parent.is_dir():
        raise RunError(f"{output.parent}: no such folder for the store")
    has_partial = partial_path(output).exists()
    if output.exists() and not overwrite and not (resume and has_partial):
        left = f" and no {partial_path(output)} is left to resume" if resume else ""
        raise FileExistsError(f"{output}: exists{left}; use --overwrite to replace it")

    scans, names, rejected = find_scans(inputs, settings)
    for path, reason in rejected:
        _reject(summary, report, path, reason)
    config = {**asdict(settings), "inputs": [os.path.abspath(item) for item in inputs]}
    config["labels"] = settings.labels and os.path.abspath(settings.labels)
    if overwrite and not resume:
        shutil.rmtree(partial_path(output), ignore_errors=True)
    partial = Partial(output, config, resume=resume)
    done = partial.done()
    summary.resumed = sum(scan.source in done for scan in scans)
    todo = [scan for scan in scans if scan.source not in done]
    if todo:
        _compute(todo, settings, workers, partial, summary, report, progress)
    written = partial.done()
    if not written:
        partial.remove()
        raise RunError(
            f"no usable scans: all {len(summary.rejected)} were rejected; no store written"
        )

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        summary.splits = partial.finalize(names, buffer_bytes)
    for warning in caught:
        summary.warnings.append(f"{output}: {warning.message}")
        report(f"warning: {output}: {warning.message}")
    _count_slices(summary)
    summary.size_bytes = output.stat().st_size
    summary.seconds = time.perf_counter() - started
    return summary


def _compute(todo, settings, workers, partial, summary, report, progress) -> None:
    """Process ``todo``, writing each scan as it finishes; at most 2 x workers in flight."""
    show = sys.stderr.isatty() if progress is None else progress
    with tqdm(total=len(todo), unit="scan", disable=not show, file=sys.stderr) as bar:

        def finish(scan: Scan, result) -> None:
            if isinstance(result, str):
                _reject(summary, bar.write if show else report, str(scan.path), result)
            else:
                record, slices = result
                partial.add(record, slices)
                summary.written += 1
                for note in record["notes"]:
                    summary.warnings.append(f"{scan.path}: {note}")
                    (bar.write if show else report)(f"warning: {scan.path}: {note}")
            bar.update()

        if workers <= 1:
            for scan in todo:
                finish(scan, _process_or_reason(scan, settings))
            return
        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload(["preprocess.pipeline"])
        pending = {}
        queue = iter(todo)
        with futures.ProcessPoolExecutor(workers, mp_context=context) as pool:
            try:
                while True:
                    while len(pending) < 2 * workers and (scan := next(queue, None)) is not None:
                        pending[pool.submit(_process_or_reason, scan, settings)] = scan
                    if not pending:
                        break
                    finished, _ = futures.wait(pending, return_when=futures.FIRST_COMPLETED)
                    for future in finished:
                        finish(pending.pop(future), future.result())
            except futures.process.BrokenProcessPool as exc:
                raise RunError(
                    f"a worker process died (out of memory?); {summary.written} scans are kept in "
                    f"{partial.path}: rerun with --resume"
                ) from exc
            except BaseException:
                for future in pending:
                    future.cancel()
                raise


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
