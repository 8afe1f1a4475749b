"""The preprocessing run: worker processes turn scans into slices, this process writes them.

``run`` is what ``python -m preprocess`` calls; it never raises for a bad scan (each is
reported with its reason) and keeps ``<store>.partial/`` when it stops early, so
``resume=True`` continues where it was.
"""

from __future__ import annotations

import concurrent.futures as futures
import contextlib
import ctypes
import functools
import itertools
import multiprocessing
import os
import re
import signal
import sys
import threading
import time
import warnings
from collections import Counter
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import threadpoolctl
from tqdm import tqdm

from loader import schema, table
from loader.options import SettingError, check_settings, option
from loader.schema import SPACES, UNLABELLED_SPLIT
from loader.store import open_store
from loader.table import NUMERIC, class_indices, column_kind, numeric_values
from preprocess import dicom
from preprocess.discover import (
    LAYOUTS,
    Scan,
    column_of,
    discover,
    find_layout,
    match_labels,
    pair_files,
    read_subjects_table,
)
from preprocess.errors import PreprocessError, ScanError
from preprocess.shards import parse_shard, subjects_of_shard
from preprocess.slices import AXES, kept_positions, label_slices, slices_at
from preprocess.splits import assign_splits, quantile_strata, split_names
from preprocess.standard import load_template, moved, register
from preprocess.volume import (
    MAX_VOXELS,
    NORMALIZATIONS,
    coverage,
    foreground,
    load_volume,
    normalization,
    on_grid,
)
from preprocess.writer import Partial, partial_path, scan_record

FINDING = "finding scans and labels"
SLICES = "slices"
STORAGE = "storage"
SPLITS = "splits (per subject, stratified by label)"
SHARDS = "shards (one store per part of the subjects, e.g. a scheduler's array job)"
SPACE = "space (--space mni needs: pip install 'slicestore[mni]')"
RUNNING = "running"
DICOM = "DICOM series (converted by dcm2niix; no patient identifiers stored)"


@dataclass(frozen=True)
class Settings:
    """Every setting that changes what a store holds (stored as its ``config``).

    Each field is also an option of ``python -m preprocess`` (``--label-column`` for
    ``label_column``), generated from the declaration below.

    Raises:
        SettingError: (a ValueError) a value outside its rule.
        TypeError: a value of the wrong type.
    """

    layout: str = option("auto", "how input folders are laid out", choices=LAYOUTS, group=FINDING)
    suffix: tuple[str, ...] = option(
        ("T1w",),
        "BIDS suffixes (modalities) taken from BIDS trees; several become the "
        "channels of each slice, resampled onto the first's grid",
        metavar="SUFFIX",
        group=FINDING,
    )
    masks: str | None = option(
        None,
        "pair each scan with its BIDS-derivatives mask *_desc-DESC_mask (or _dseg)",
        metavar="DESC",
        kind=str,
        group=FINDING,
    )
    masks_suffix: str | None = option(
        None,
        "pair NAME.nii[.gz] with the mask NAME<SUFFIX>.nii[.gz] beside it (plain "
        "folders), e.g. _mask",
        metavar="SUFFIX",
        kind=str,
        group=FINDING,
    )
    labels: str | None = option(
        None,
        "a .tsv or .csv of subject labels",
        metavar="FILE",
        kind=str,
        default_text="participants.tsv of BIDS inputs",
        group=FINDING,
    )
    label_column: str | None = option(
        None,
        "the column with each subject's class",
        metavar="NAME",
        kind=str,
        default_text="none (unlabelled)",
        group=FINDING,
    )
    id_column: str = option(
        table.ID_COLUMN, "the column with subject ids", metavar="NAME", group=FINDING
    )
    volume: int | None = option(
        None,
        "take volume K (from 0) of 4-D files, else they are rejected",
        metavar="K",
        kind=int,
        at_least=0,
        group=FINDING,
    )
    max_voxels: int = option(
        MAX_VOXELS,
        "reject a scan whose header claims more voxels per volume, before reading it",
        metavar="N",
        at_least=1,
        group=FINDING,
    )
    series: str | None = option(
        None,
        "take the DICOM series whose description or protocol name matches this regular "
        "expression (case-insensitive), e.g. mprage",
        metavar="REGEX",
        kind=str,
        default_text="every 3-D series but localizers and derived ones",
        group=DICOM,
    )
    dicom_subject: str = option(
        "patient-id",
        "what names a DICOM series' subject: its PatientID, or the first folder below the "
        "input (for archives that removed PatientID)",
        choices=dicom.SUBJECT_SOURCES,
        group=DICOM,
    )
    keep_patient_ids: bool = option(
        False,
        "store DICOM subject ids as given (PatientID or folder name), not as a keyed hash",
        group=DICOM,
    )
    normalize: str = option(
        "percentile", "intensity scaling per volume", choices=NORMALIZATIONS, group=SLICES
    )
    axis: str = option(
        "axial", "slicing direction", choices=("axial", "coronal", "sagittal"), group=SLICES
    )
    min_foreground: float = option(
        0.05, "drop slices with less foreground", metavar="F", at_least=0, below=1, group=SLICES
    )
    size: int = option(64, "side of the square slices", metavar="N", at_least=8, group=SLICES)
    context: int = option(
        0,
        "store K neighbouring slices on each side as channels (2.5-D)",
        metavar="K",
        at_least=0,
        group=SLICES,
    )
    space: str = option(
        "native",
        "native: each scan's own grid; mni: N4 bias correction and an affine registration "
        "to the MNI152 template, slices cut from its grid (slice k = template plane k)",
        choices=SPACES,
        group=SPACE,
    )
    min_similarity: float = option(
        0.0,
        "with --space mni, leave out a scan whose correlation with the template after "
        "registration is below this (0: keep all; low ones are listed)",
        metavar="R",
        at_least=0,
        below=1,
        group=SPACE,
    )
    dtype: str = option(
        "uint8",
        "stored type (uint8 needs percentile)",
        choices=schema.STORED_DTYPES,
        group=STORAGE,
    )
    compression: str = option(
        "none", "HDF5 compression of the slices", choices=schema.COMPRESSIONS, group=STORAGE
    )
    chunk_slices: int = option(64, "slices per HDF5 chunk", metavar="C", at_least=1, group=STORAGE)
    val_fraction: float = option(
        0.2,
        "share of each class's subjects for `val`",
        metavar="F",
        at_least=0,
        below=1,
        group=SPLITS,
    )
    test_fraction: float = option(
        0.0, "share for `test`", metavar="F", at_least=0, below=1, group=SPLITS
    )
    folds: int = option(
        0, "K folds instead of train/val/test (0: none)", metavar="K", at_least=0, group=SPLITS
    )
    seed: int = option(0, "seed of splits and row order", metavar="S", at_least=0, group=SPLITS)
    shard: str | None = option(
        None,
        "write only part I of N (from 0) of the subjects, or auto: from a SLURM array "
        "job or a Kubernetes Indexed Job",
        metavar="I/N",
        kind=str,
        default_text="none (every subject)",
        group=SHARDS,
    )
    shard_count: int | None = option(
        None,
        "the shards of a Kubernetes Indexed Job, with --shard auto",
        metavar="N",
        kind=int,
        at_least=1,
        group=SHARDS,
    )

    def __post_init__(self):
        if isinstance(self.suffix, str):
            object.__setattr__(self, "suffix", (self.suffix,))
        check_settings(self)
        if len(set(self.suffix)) != len(self.suffix):
            raise SettingError("{suffix} names a modality twice", suffix=" ".join(self.suffix))
        if self.masks and self.masks_suffix:
            raise SettingError(
                "{masks} (BIDS derivatives) and {masks_suffix} (plain folders) exclude each other",
                masks=self.masks,
                masks_suffix=self.masks_suffix,
            )
        if self.folds == 1:
            raise SettingError("{folds} must be 0 (none) or at least 2", folds=self.folds)
        if self.val_fraction + self.test_fraction >= 1:
            raise SettingError(
                "{val_fraction} plus {test_fraction} must be below 1",
                val_fraction=self.val_fraction,
                test_fraction=self.test_fraction,
            )
        if self.series is not None:
            try:
                re.compile(self.series)
            except re.error as exc:
                raise SettingError(
                    f"{{series}} is not a regular expression ({exc})", series=self.series
                ) from exc
        if self.min_similarity and self.space != "mni":
            raise SettingError(
                "{min_similarity} applies to {space} mni only",
                min_similarity=self.min_similarity,
                space=self.space,
            )
        if self.dtype == "uint8" and self.normalize != "percentile":
            raise SettingError(
                "{dtype} uint8 holds intensities in [0, 1] only: it needs {normalize} "
                "percentile (or use {dtype} float16 or float32)",
                normalize=self.normalize,
            )


def default_workers() -> int:
    """The CPU count, at most 8."""
    return min(8, len(os.sched_getaffinity(0)))


@dataclass(frozen=True)
class RunOptions:
    """How a run goes, without changing what the store holds."""

    workers: int = option(
        default_factory=default_workers,
        help="processes that compute slices",
        metavar="N",
        at_least=1,
        default_text="CPUs, at most 8",
        group=RUNNING,
    )
    overwrite: bool = option(
        False, "replace an existing store once the new one is complete", group=RUNNING
    )
    resume: bool = option(False, "continue an interrupted run", group=RUNNING)
    buffer_mb: int = option(
        1024, "memory for the final shuffle", metavar="MB", at_least=1, group=RUNNING
    )
    scan_timeout: float = option(
        600.0,
        "leave out a scan still not done after this many seconds (0: no limit)",
        metavar="SECONDS",
        at_least=0,
        group=RUNNING,
    )
    id_salt: str | None = option(
        None,
        "the secret that keys the hash naming DICOM subjects and sessions (never stored; "
        "the same secret gives the same ids)",
        metavar="SECRET",
        kind=str,
        default_text=f"${dicom.SALT_VARIABLE}",
        group=RUNNING,
    )

    def __post_init__(self):
        check_settings(self)


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


def process_scan(scan: Scan, settings: Settings) -> tuple[dict, np.ndarray, np.ndarray | None]:
    """Load, check, normalise and slice one scan (runs in a worker process).

    In native space the first modality's foreground chooses the slices; every further
    modality is resampled onto its grid and normalised on its own; the mask is resampled
    by label. In standard space (``--space mni``) the first modality is registered to the
    template and every slice is a plane of the template's slab; further modalities and the
    mask follow its transform.

    Returns:
        ``(record, slices, masks)``: the JSON-able facts of the scan, its slices in the stored
        dtype (``(n, S, S)``, or ``(n, S, S, C)`` for several channels) and its uint8 masks
        ``(n, S, S)`` (None without ``--masks``).

    Raises:
        ScanError: the scan cannot be used.
    """
    volume = load_volume(scan.path, settings.volume, max_voxels=settings.max_voxels, digest=True)
    depth = volume.shape[AXES[settings.axis]]
    if settings.context and settings.context >= depth and settings.space == "native":
        raise ScanError(
            f"--context {settings.context} but the volume has only {depth} {settings.axis} slices"
        )
    notes = [*scan.notes, *volume.notes]
    others = []
    for suffix, path in zip(settings.suffix[1:], scan.others, strict=True):
        other = _named(path, load_volume, path, settings.volume, False, settings.max_voxels)
        covered = coverage(other, volume)
        if covered < MIN_COVERAGE:
            notes.append(f"{suffix} {path.name} covers only {covered:.0%} of the reference grid")
        notes += [f"{path.name}: {note}" for note in other.notes]
        others.append(other)
    labels = None if scan.mask is None else _named(scan.mask, _mask_volume, scan.mask, settings)
    if labels is not None and (covered := coverage(labels, volume)) < 0.999:
        raise ScanError(
            f"{scan.mask.name}: the mask covers only {covered:.0%} of the scan's field of view"
        )
    if settings.space == "mni":
        positions, channels, masks, facts = _standard(volume, others, labels, settings)
    else:
        positions, channels, masks, facts = _native(volume, others, labels, settings)
    slices = channels[0] if len(channels) == 1 else _channels_last(channels)
    slices = schema.encode_intensities(slices, settings.dtype)
    record = scan_record(
        scan.source,
        scan.subject_id,
        positions,
        session=scan.session,
        label=scan.label,
        sha256=volume.sha256,
        affine=volume.affine,
        shape=volume.shape,
        voxel_size=volume.voxel_size,
        notes=notes,
        **facts,
    )
    if masks is not None:
        record["mask_labels"] = np.unique(masks).tolist()
    return record, slices, masks


def _native(volume, others, labels, settings: Settings):
    """``(positions, channels, masks, facts)`` cut from the scan's own grid."""
    mask = foreground(volume.voxels)
    positions = kept_positions(mask, settings.axis, settings.min_foreground)
    cut = functools.partial(
        slices_at,
        positions=positions,
        voxel_size=volume.voxel_size,
        axis=settings.axis,
        size=settings.size,
        context=settings.context,
    )
    scale = normalization(volume.voxels, mask, settings.normalize, volume.slope, volume.inter)
    channels = [cut(volume.voxels, scale=scale)]
    for other in others:
        data = on_grid(other, volume)
        channels.append(cut(data, scale=normalization(data, foreground(data), settings.normalize)))
    masks = None
    if labels is not None:
        on_reference = on_grid(labels, volume, order=0, data=labels.voxels)
        masks = label_slices(
            on_reference.astype(np.uint8),
            positions,
            volume.voxel_size,
            settings.axis,
            settings.size,
        )
    return positions, channels, masks, {}


def _standard(volume, others, labels, settings: Settings):
    """``(positions, channels, masks, facts)`` cut from the template's grid: the scan
    registered, its other modalities and mask moved with it."""
    template = load_template(settings.axis, settings.min_foreground)
    registration = register(volume, template, settings.context)
    if registration.similarity < settings.min_similarity:
        raise ScanError(
            f"registration similarity {registration.similarity:.2f} is below "
            f"--min-similarity {settings.min_similarity:g}: left out (check the scan)"
        )
    to_template, planes = registration.to_template, registration.planes
    positions = template.positions
    cut = functools.partial(
        slices_at,
        positions=positions - planes[0],
        voxel_size=template.voxel_size,
        axis=settings.axis,
        size=settings.size,
        context=settings.context,
    )
    brain = template.slab(template.brain, planes)
    data = registration.data
    channels = [cut(data, scale=normalization(data, brain, settings.normalize))]
    for other in others:
        data = moved(other, to_template, template, planes)
        channels.append(cut(data, scale=normalization(data, brain, settings.normalize)))
    masks = None
    if labels is not None:
        on_template = moved(labels, to_template, template, planes, labels=True)
        masks = label_slices(
            on_template, positions - planes[0], template.voxel_size, settings.axis, settings.size
        )
    facts = {"to_template": to_template, "similarity": registration.similarity}
    return positions, channels, masks, facts


MIN_COVERAGE = 0.5  # a further modality covering less of the reference grid gets a warning


def _channels_last(channels: list[np.ndarray]) -> np.ndarray:
    """``(n, S, S[, K])`` stacks of each modality as ``(n, S, S, C)``, modality-major."""
    return np.concatenate([c if c.ndim == 4 else c[..., None] for c in channels], axis=-1)


def _named(path: Path, function, *args):
    """``function(*args)``, a :class:`ScanError` naming the file ``path`` (not the scan's)."""
    try:
        return function(*args)
    except ScanError as exc:
        raise ScanError(f"{path.name}: {exc}") from exc


def _mask_volume(path: Path, settings: Settings):
    """A label mask as a volume of uint8 labels.

    Raises:
        ScanError: not integer-valued, or labels outside 0 to 255.
    """
    labels = load_volume(path, settings.volume, True, settings.max_voxels)
    values = labels.data
    if not np.array_equal(values, np.round(values)):
        raise ScanError("the mask is not integer-valued (labels 0, 1, ...)")
    if values.min() < 0 or values.max() > 255:
        raise ScanError(f"mask labels must be 0 to 255; found {values.min():g} to {values.max():g}")
    return replace(labels, voxels=values.astype(np.uint8), slope=1.0, inter=0.0)


def _process_or_reason(scan: Scan, settings: Settings, timeout: float = 0.0):
    """``process_scan``, with every failure turned into a one-line reason, within ``timeout``
    seconds (0: no limit)."""
    try:
        with _time_bound(timeout):
            return process_scan(scan, settings)
    except _TimeUp:
        return f"not done after {timeout:g} s (--scan-timeout): left out"
    except ScanError as exc:
        return str(exc)
    except MemoryError:
        return "out of memory while processing"
    except Exception as exc:  # a damaged file can fail deep inside nibabel or scipy
        lines = str(exc).strip().splitlines() or [""]
        return f"unreadable ({type(exc).__name__}: {lines[0]})"


class _TimeUp(BaseException):
    """A scan ran past its time (a BaseException: code that catches every Exception in
    the libraries it passes through lets it by)."""


@contextlib.contextmanager
def _time_bound(seconds: float):
    """Raise :class:`_TimeUp` in the block after ``seconds`` (SIGALRM, main thread only).

    Python code is stopped at once; a call into C (inflating, a filter) is stopped when it
    returns. Where Python drops the exception (it lands in a garbage collector's callback),
    the alarm rings again 50 ms later, and the dropped one is not reported. Off for 0, or
    outside the main thread (the API called from a thread).
    """
    if not seconds or threading.current_thread() is not threading.main_thread():
        yield
        return

    def time_up(signum, frame):
        signal.setitimer(signal.ITIMER_REAL, 0.05)
        raise _TimeUp

    def unraisable(report) -> None:
        if not isinstance(report.exc_value, _TimeUp):
            hook(report)

    hook, sys.unraisablehook = sys.unraisablehook, unraisable
    previous = signal.signal(signal.SIGALRM, time_up)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        sys.unraisablehook = hook


# A numeric label column with more distinct values than this is a quantity (age), not
# classes: the store gets no classes for it, and splits are stratified by its quantiles.
MAX_CLASSES = 10


@dataclass
class Found:
    """The scans of a run's inputs and what goes with them.

    Attributes:
        scans: the scans, with their labels.
        class_names: the classes of the labels; empty for a numeric label column.
        rejected: ``(path, reason)`` of inputs rejected before processing.
        participants: the labels table (every column): subject id -> {column: value}.
        strata: subject id -> the group splits are stratified by, for a numeric label
            column (its quantile bin); None to stratify by class.
    """

    scans: list[Scan]
    class_names: list[str]
    rejected: list[tuple[str, str]]
    participants: dict[str, dict] = field(default_factory=dict)
    strata: dict[str, int] | None = None
    converted: dicom.Converted | None = None

    def close(self) -> None:
        """Remove the images converted from DICOM (once the scans are processed)."""
        if self.converted is not None:
            self.converted.close()


def find_scans(
    inputs: list[str], settings: Settings, report=print, salt: str | None = None
) -> Found:
    """The scans of the inputs with their labels, the labels table, and inputs rejected up front.

    The labels table is ``--labels FILE``, else the ``participants.tsv`` of BIDS inputs;
    every column of it is kept. How it matched the scans' subjects is reported. DICOM
    series are converted into a temporary folder: ``close()`` the result when done.

    Args:
        salt: the secret of the hash naming DICOM subjects; defaults to
            ``$SLICESTORE_ID_SALT``.

    Raises:
        PreprocessError: no scans, or a problem with the inputs or the label file.
    """
    scans, rejected = discover(inputs, settings.layout, settings.suffix[0], settings.masks_suffix)
    folders, not_dicom = dicom.find_folders(inputs)
    rejected += not_dicom
    converted, naming = None, None
    if folders:
        naming = _dicom_naming(folders, settings, salt)
        classes = frozenset(
            Path(item)
            for item in inputs
            if Path(item).is_dir()
            and (settings.layout if settings.layout != "auto" else find_layout(Path(item)))
            == "classes"
        )
        converted = dicom.convert(folders, naming, settings.series, classes)
        scans = sorted(scans + converted.scans, key=lambda scan: scan.source)
        rejected += converted.rejected
        for line in converted.skipped:
            report(f"note: {line}")
    try:
        found = _labelled(scans, rejected, inputs, settings, report, naming)
    except BaseException:
        if converted is not None:
            converted.close()
        raise
    found.converted = converted
    return found


def _dicom_naming(folders, settings: Settings, salt: str | None) -> dicom.Naming:
    """How the DICOM series' subjects are named; refuses what DICOM cannot do.

    Raises:
        PreprocessError: several modalities or masks (paired by NIfTI file names), or no
            secret for the hash.
    """
    where = folders[0][1]
    if len(settings.suffix) > 1 or settings.masks or settings.masks_suffix:
        raise PreprocessError(
            f"{where}: DICOM series are chosen with --series; --suffix (several), --masks and "
            "--masks-suffix pair NIfTI files by name: convert the DICOM series first"
        )
    salt = salt if salt is not None else os.environ.get(dicom.SALT_VARIABLE) or None
    if not settings.keep_patient_ids and not salt:
        raise PreprocessError(
            f"{where}: DICOM inputs: subject ids are stored as a keyed hash of PatientID: give "
            f"--id-salt SECRET (or set {dicom.SALT_VARIABLE}); the same secret gives the same "
            "ids; or --keep-patient-ids to store them as they are"
        )
    return dicom.Naming(settings.dicom_subject, settings.keep_patient_ids, salt)


def _labelled(scans, rejected, inputs, settings: Settings, report, naming) -> Found:
    """The scans with their labels and the labels table (its ids hashed as the DICOM
    subjects' are, when ``naming`` hashes them)."""
    if not scans:
        raise PreprocessError(f"no scans found in {', '.join(map(str, inputs))}")
    if len(settings.suffix) > 1 or settings.masks or settings.masks_suffix:
        scans, unpaired = pair_files(scans, settings.suffix, settings.masks, settings.masks_suffix)
        rejected += unpaired
        if not scans:
            raise PreprocessError(f"no scan has all its files: {unpaired[0][0]}: {unpaired[0][1]}")
    paths = (
        [settings.labels]
        if settings.labels
        else [
            Path(item) / "participants.tsv"
            for item in inputs
            if (Path(item) / "participants.tsv").is_file()
        ]
    )
    if settings.label_column and not paths:
        raise PreprocessError(
            "--label-column needs --labels FILE: no input folder has a participants.tsv"
        )
    participants: dict[str, dict] = {}
    for path in paths:
        notes: list[str] = []
        try:
            rows = read_subjects_table(path, settings.id_column, notes)
            if naming is not None and not naming.keep:  # ids are PatientIDs: hashed too
                rows = {naming.subject_id(subject): row for subject, row in rows.items()}
            participants.update(rows)
        except PreprocessError as exc:
            if settings.labels or settings.label_column:
                raise
            report(f"warning: {exc}; the store keeps no labels table")
        for line in notes:
            report(f"warning: {line}")
    found = Found(scans, table.class_names(s.label for s in scans), rejected, participants)
    if settings.label_column:
        column, files = settings.label_column, ", ".join(map(str, paths))
        values = column_of(participants, column, files, settings.id_column)
        where = f"{files} (column {column!r})"
        labels, lines = match_labels([s.subject_id for s in scans], values, where)
        for line in lines:
            report(line)
        found.scans = [replace(s, label=labels[s.subject_id]) for s in scans]
        distinct = {value for value in labels.values() if value is not None}
        if column_kind(labels.values()) == NUMERIC and len(distinct) > MAX_CLASSES:
            found.class_names = []
            found.strata = quantile_strata(
                {subject_id: numeric_values([value])[0] for subject_id, value in labels.items()}
            )
        else:
            found.class_names = table.class_names(labels.values())
    return found


def split_assignment(found: Found, settings: Settings) -> tuple[list[str], dict[str, str]]:
    """The split names in row order and every subject's split, from all the discovered scans.

    Computed before any scan is processed, from the subjects and their labels (or strata)
    alone, so shards of one run agree and a scan that fails does not move others.
    """
    strata = found.strata
    if strata is None:
        labels = class_indices([s.label for s in found.scans], found.class_names)
        strata = {s.subject_id: int(label) for s, label in zip(found.scans, labels, strict=True)}
    assignment = assign_splits(
        strata, settings.val_fraction, settings.test_fraction, settings.folds, settings.seed
    )
    names = split_names(settings.val_fraction, settings.test_fraction, settings.folds)
    if UNLABELLED_SPLIT in assignment.values():
        names.append(UNLABELLED_SPLIT)
    return names, assignment


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
        inputs: NIfTI files or folders.
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
        template = None
        if settings.space == "mni":  # the template and its slab, decided once for every scan
            standard = load_template(settings.axis, settings.min_foreground)
            template = (standard.facts(), standard.positions, standard.brain_slices(settings.size))
            first, last = template[0]["slab"]
            report(
                f"standard space: {template[0]['name']}, {settings.axis} planes {first} to {last} "
                f"({len(standard.positions)} slices a scan)"
            )
        with Partial(output, config, resume=options.resume, overwrite=options.overwrite) as partial:
            done = partial.done()
            summary.resumed = sum(scan.source in done for scan in scans)
            todo = [scan for scan in scans if scan.source not in done]
            if todo:
                _compute(todo, settings, options, partial, summary, report, progress)
            if not partial.done():
                partial.remove()
                raise PreprocessError(
                    f"no usable scans: all {len(summary.rejected)} were rejected; no store written"
                )
            for line in same_files(partial.done().values()):
                summary.warnings.append(line)
                report(f"warning: {line}")
            summary.check_registration = poor_registrations(partial.done().values())
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
    return config


# A registration is listed for checking when its similarity is below CHECK_FLOOR, or
# CHECK_MARGIN below the median of the run's scans (when there are CHECK_AMONG or more).
CHECK_FLOOR, CHECK_MARGIN, CHECK_AMONG = 0.5, 0.15, 3


def poor_registrations(records) -> list[tuple[str, float]]:
    """``(source, similarity)`` of the scans whose registration is far below the rest,
    worst first.

    >>> poor_registrations([{"source": f"{k}.nii", "similarity": s}
    ...                     for k, s in enumerate([0.9, 0.88, 0.91, 0.6, None])])
    [('3.nii', 0.6)]
    """
    scored = [(r["source"], r["similarity"]) for r in records if r.get("similarity") is not None]
    if not scored:
        return []
    limit = CHECK_FLOOR
    if len(scored) >= CHECK_AMONG:
        limit = max(limit, float(np.median([s for _, s in scored])) - CHECK_MARGIN)
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


def processed(scans: list[Scan], settings: Settings, options: RunOptions):
    """``(scan, result)`` for every scan as it finishes: the result of :func:`process_scan`,
    or the one-line reason it was left out. At most 2 x workers scans are in flight.

    Workers are forked from this process (:func:`start_method`); where that is not safe,
    they come from a server that starts a Python and imports this package (~0.4 s), and
    this process computes scans itself while it starts.

    Raises:
        BrokenProcessPool: a worker process died.
    """
    workers, timeout = options.workers, options.scan_timeout
    if workers <= 1:
        for scan in scans:
            yield scan, _process_or_reason(scan, settings, timeout)
        return
    method = start_method()
    context = multiprocessing.get_context(method)
    if method == "forkserver":
        context.set_forkserver_preload(["preprocess.pipeline"])
    queue = iter(scans)
    with futures.ProcessPoolExecutor(
        workers, mp_context=context, initializer=_worker_start, initargs=(os.getpid(),)
    ) as pool:
        pending = {}
        try:
            if method == "forkserver":
                yield from _start_pool(pool, queue, pending, 2 * workers, settings, timeout)
            while True:
                while len(pending) < 2 * workers and (scan := next(queue, None)) is not None:
                    with _forking_quietly():  # the first submit forks every worker
                        pending[pool.submit(_process_or_reason, scan, settings, timeout)] = scan
                if not pending:
                    break
                finished, _ = futures.wait(pending, return_when=futures.FIRST_COMPLETED)
                for future in finished:
                    yield pending.pop(future), future.result()
        except BaseException:  # also the consumer stopping (GeneratorExit)
            for future in list(pending):  # the start-up thread may still be adding
                future.cancel()
            raise


# Libraries whose own threads make a forked copy of this process unsafe (a child can
# deadlock on a lock one of them held at the fork): where one is loaded (predict, a
# notebook that trained a model), workers come from a forkserver instead.
NOT_FORK_SAFE = ("tensorflow", "jax", "torch")


def start_method() -> str:
    """``fork`` on Linux when no library of :data:`NOT_FORK_SAFE` is loaded, else
    ``forkserver``.

    A forked worker starts in milliseconds with everything this process imported; the
    server costs a second Python start-up and the same imports (0.4-0.6 s of 4-5 s on 48
    T1-sized scans). Forked workers die with this process (``PR_SET_PDEATHSIG``) and close
    their copy of the run's lock (:class:`~preprocess.writer.Partial`).
    """
    if sys.platform.startswith("linux") and not any(name in sys.modules for name in NOT_FORK_SAFE):
        return "fork"
    return "forkserver"


@contextlib.contextmanager
def _forking_quietly():
    """Python 3.12+ warns at every fork of a process with several threads (numpy's BLAS
    has its own): this fork runs only this package's code in the child, so the warning
    says nothing here."""
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", r".*use of fork\(\) may lead to deadlocks", DeprecationWarning
        )
        yield


def _start_pool(pool, queue, pending: dict, count: int, settings, timeout: float):
    """Hand the pool its first ``count`` scans (into ``pending``: future -> scan) and
    compute more here while it starts, yielding ``(scan, result)`` for those.

    The first ``submit`` waits for the workers' server to start a Python and import this
    package (~0.4 s); a helper thread waits for it instead, and this process computes scans
    (one BLAS thread, like a worker) until the pool has them.
    """
    first = list(itertools.islice(queue, count))
    failed = []

    def submit() -> None:
        try:
            for scan in first:
                pending[pool.submit(_process_or_reason, scan, settings, timeout)] = scan
        except BaseException as exc:  # a broken pool: raised below, in this thread
            failed.append(exc)

    starter = threading.Thread(target=submit, name="start-workers", daemon=True)
    starter.start()
    while starter.is_alive() and (scan := next(queue, None)) is not None:
        with threadpoolctl.threadpool_limits(1, user_api="blas"):
            result = _process_or_reason(scan, settings, timeout)
        yield scan, result
    starter.join()
    if failed:
        raise failed[0]


PR_SET_PDEATHSIG = 1  # prctl(2): the signal a process gets when its parent dies
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # mallopt(3)


def keep_freed_memory() -> None:
    """Have glibc's malloc keep freed memory for the next scan rather than return it.

    A scan allocates and frees tens of MB (the un-gzipped file, masks, slices). By default
    blocks from 128 kB (rising to the largest one freed) are mapped and unmapped each
    time and the heap's free top goes back to the kernel, so every scan faults its memory
    in again. Measured on 48 T1-sized scans, two workers: 420 k page faults and 1.1 s of
    system time without this, 72 k and 0.4 s with it. Blocks over 32 MB are still mapped;
    other C libraries (no ``mallopt``) are left as they are. Called in the workers and by
    ``python -m preprocess`` itself, never on a process that only imports this package.
    """
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except AttributeError:
        return
    mallopt(M_MMAP_THRESHOLD, 32 << 20)
    mallopt(M_TRIM_THRESHOLD, 256 << 20)


def _worker_start(parent: int) -> None:
    """A worker's first step. Workers already fill the cores: one BLAS thread each, or
    their multi-threaded BLAS would fight over them. Ctrl-C reaches the whole process
    group: the run stops its workers itself. A worker dies with the run, even one killed
    by ``kill -9`` (a worker left waiting for work would hold memory for ever): a forked
    one at once, one from a forkserver (whose parent is the server) within a second."""
    threadpoolctl.threadpool_limits(1, user_api="blas")
    keep_freed_memory()
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    if os.getppid() == parent and sys.platform.startswith("linux"):  # forked by the run
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != parent:  # the run died before the line above
            os._exit(1)
    elif os.getppid() != parent:
        threading.Thread(target=_exit_with, args=(parent,), name="watch-run", daemon=True).start()


def _exit_with(parent: int) -> None:
    """End this process once ``parent`` is gone (checked every second)."""
    while True:
        time.sleep(1)
        try:
            os.kill(parent, 0)
        except (ProcessLookupError, PermissionError):  # gone (or its pid another user's)
            os._exit(1)


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
