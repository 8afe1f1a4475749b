"""Every setting of a preprocessing run: what the store holds (:class:`Settings`, its
``config``) and how the run goes (:class:`RunOptions`).

Each field is an option of ``python -m preprocess``, generated from its declaration here.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

from loader import schema, table
from loader.options import SettingError, check_settings, option
from loader.schema import SPACES
from preprocess import dicom
from preprocess.discover import LAYOUTS
from preprocess.standard import TEMPLATE_NAME, TEMPLATES
from preprocess.volume import MAX_VOXELS, NORMALIZATIONS

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
        "BIDS suffixes (modalities) taken from BIDS trees, and the kinds of DICOM series "
        "stored (T1w, T2w, FLAIR, PDw, T2starw, dwi, bold, asl, m0scan, fmap); several "
        "become the channels of each slice, resampled onto the first's grid",
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
        default_text="the 3-D series of the --suffix kinds",
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
    template: str = option(
        TEMPLATE_NAME,
        "with --space mni, the template whose grid the slices are cut from: MNI152NLin6Asym "
        "(FSL's, with skull) or MNI152NLin2009aSym (nilearn's, brain only; the stores of "
        "slicestore before 2026-12); every scan is registered to MNI152NLin6Asym's head",
        choices=tuple(TEMPLATES),
        group=SPACE,
    )
    min_similarity: float = option(
        0.0,
        "with --space mni, leave out a scan whose similarity with the template after "
        "registration (the correlation ratio, 0-1) is below this (0: keep all; low ones are "
        "listed)",
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
        if self.template != TEMPLATE_NAME and self.space != "mni":
            raise SettingError(
                "{template} applies to {space} mni only", template=self.template, space=self.space
            )
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
