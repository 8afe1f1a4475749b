"""The scans of a run's inputs and their labels: files and BIDS trees (``discover``), DICOM
series converted and named (``dicom``), the labels table matched, the splits assigned.
"""

from __future__ import annotations

import gzip
import os
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path

from loader import table
from loader.schema import UNLABELLED_SPLIT
from loader.table import NUMERIC, class_indices, column_kind, numeric_values
from preprocess import dicom
from preprocess.discover import (
    Scan,
    column_of,
    discover,
    find_layout,
    is_dicom,
    is_image,
    match_labels,
    pair_files,
    read_subjects_table,
    strip_nifti_suffix,
    walk_files,
)
from preprocess.errors import PreprocessError
from preprocess.settings import Settings
from preprocess.splits import assign_splits, quantile_strata, split_names

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
    inputs: list[str],
    settings: Settings,
    report=print,
    salt: str | None = None,
    listing: bool = False,
) -> Found:
    """The scans of the inputs with their labels, the labels table, and inputs rejected up front.

    The labels table is ``--labels FILE``, else the ``participants.tsv`` of BIDS inputs;
    every column of it is kept. How it matched the scans' subjects is reported. DICOM
    series are converted into a temporary folder: ``close()`` the result when done.

    Args:
        salt: the secret of the hash naming DICOM subjects; defaults to
            ``$SLICESTORE_ID_SALT``.
        listing: for ``--list-series``: the scans as found, unlabelled, even none (the
            listing says why a series is not stored). Defaults to False.

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
        converted = dicom.convert(folders, naming, settings.series, classes, settings.suffix)
        scans = sorted(scans + converted.scans, key=lambda scan: scan.source)
        rejected += converted.rejected
        for line in converted.skipped:
            report(f"note: {line}")
    if listing:
        return Found(scans, [], rejected, converted=converted)
    try:
        found = _labelled(scans, rejected, inputs, settings, report, naming, converted)
    except BaseException:
        if converted is not None:
            converted.close()
        raise
    found.converted = converted
    return found


def _dicom_naming(folders, settings: Settings, salt: str | None) -> dicom.Naming:
    """How the DICOM series' subjects are named; refuses what DICOM cannot do.

    Raises:
        PreprocessError: masks (paired by NIfTI file names), or no secret for the hash.
    """
    where = folders[0][1]
    if settings.masks or settings.masks_suffix:
        raise PreprocessError(
            f"{where}: DICOM series: --masks and --masks-suffix pair NIfTI files by name: "
            "convert the DICOM series first"
        )
    salt = salt if salt is not None else os.environ.get(dicom.SALT_VARIABLE) or None
    if not settings.keep_patient_ids and not salt:
        raise PreprocessError(
            f"{where}: DICOM inputs: subject ids are stored as a keyed hash of PatientID: give "
            f"--id-salt SECRET (or set {dicom.SALT_VARIABLE}); the same secret gives the same "
            "ids; or --keep-patient-ids to store them as they are"
        )
    return dicom.Naming(settings.dicom_subject, settings.keep_patient_ids, salt)


def _labelled(scans, rejected, inputs, settings: Settings, report, naming, converted) -> Found:
    """The scans with their labels and the labels table (its ids hashed as the DICOM
    subjects' are, when ``naming`` hashes them)."""
    if not scans:
        raise PreprocessError(
            f"no scans found in {', '.join(map(str, inputs))}"
            f"{_none_stored(converted, settings) or _other_files(inputs, settings)}"
        )
    if len(settings.suffix) > 1 or settings.masks or settings.masks_suffix:
        files = [scan for scan in scans if not scan.origin]  # DICOM series come paired
        paired, unpaired = pair_files(files, settings.suffix, settings.masks, settings.masks_suffix)
        scans = sorted([*paired, *(s for s in scans if s.origin)], key=lambda scan: scan.source)
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


def _none_stored(converted: dicom.Converted | None, settings: Settings) -> str:
    """Why DICOM series were found and none is a scan: their kinds, against ``--suffix``.

    >>> rows = [{"kind": "dwi"}, {"kind": "dwi"}, {"kind": "derived"}]
    >>> print(_none_stored(dicom.Converted(listing=rows), Settings()).split(" (each")[0])
    : 3 DICOM series (2 dwi, 1 derived), none stored with --suffix T1w
    """
    if converted is None or not converted.listing:
        return ""
    kinds = Counter(row["kind"] for row in converted.listing)
    counted = ", ".join(f"{count} {kind}" for kind, count in kinds.items())
    return (
        f": {len(converted.listing)} DICOM series ({counted}), none stored with --suffix "
        f"{' '.join(settings.suffix)} (each is a note above; --list-series lists them)"
    )


def _other_files(inputs, settings: Settings) -> str:
    """What the input folders hold instead of scans: the suffixes of BIDS images that are
    not ``--suffix``; else how many other files, one named, and whether it is gzipped DICOM
    (which dcm2niix does not read)."""
    files = [path for item in map(Path, inputs) if item.is_dir() for path in walk_files(item)]
    images = [path for path in files if is_image(path)]
    if images:  # a BIDS tree without the suffix asked for
        suffixes = sorted({strip_nifti_suffix(path.name).rsplit("_", 1)[-1] for path in images})
        return (
            f": {len(images)} image file(s), none named *_{'/'.join(settings.suffix)} "
            f"(their suffixes: {', '.join(suffixes[:8])}; --suffix chooses)"
        )
    others = [path for path in files if not is_dicom(path)]
    if not others:
        return ""
    gzipped = is_dicom(others[0], gzip.open)
    return (
        f": {len(others)} file(s), none NIfTI, MGZ, Analyze or DICOM (such as {others[0]}"
        f"{'; it is gzipped DICOM: gunzip the files first' if gzipped else ''})"
    )


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
