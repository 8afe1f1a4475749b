"""Finding scans: image files, BIDS trees, class-folder trees, and the labels that go with them.

An image file is NIfTI (``.nii``, ``.nii.gz``), FreeSurfer's MGH (``.mgz``, ``.mgh``) or an
Analyze 7.5 pair (``NAME.hdr`` with ``NAME.img`` beside it; an ``.img`` alone is not a
scan); BIDS trees take NIfTI only, as BIDS has it. DICOM files are found here too
(:func:`is_dicom`) and converted by ``preprocess.dicom``.

Three layouts of an input folder, told apart by ``auto`` (or named with ``--layout``):

* ``bids``: the folder holds ``participants.tsv``, ``dataset_description.json`` or
  ``sub-*`` folders. Scans are ``sub-<id>/[ses-<id>/]anat/*_<suffix>.nii[.gz]``;
  ``derivatives/``, ``sourcedata/`` and ``code/`` are skipped.
* ``classes``: no image file at the top and at least two sub-folders that hold some
  (folders of DICOM series alone are not taken for classes: an archive's folders are
  patients; say ``--layout classes``),
  like ``keras.utils.image_dataset_from_directory``: the sub-folder names are the classes.
* ``plain``: every NIfTI file below the folder.

Several BIDS suffixes (``--suffix T1w FLAIR``) pair each scan of the first with the
files of the others beside it (same name but the suffix); ``--masks DESC`` pairs it with
``derivatives/*/sub-<id>/[ses-<id>/]anat/*_desc-DESC_mask|dseg.nii[.gz]`` of the same
entities, ``--masks-suffix _mask`` with ``NAME_mask.nii[.gz]`` beside ``NAME.nii[.gz]``.

A scan's subject is the ``sub-<id>`` entity of its file name where it has one (so every
scan of one person lands in one split), else its path inside the input without extension.
"""

from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass
from pathlib import Path

from loader import table
from preprocess.errors import InputError

NIFTI_SUFFIXES = (".nii", ".nii.gz")
IMAGE_SUFFIXES = (*NIFTI_SUFFIXES, ".mgz", ".mgh", ".hdr")  # .hdr: an Analyze (or NIfTI) pair
DICOM_MARKER_OFFSET, DICOM_MARKER = 128, b"DICM"  # a DICOM Part 10 file: 128 bytes, then DICM
LAYOUTS = ("auto", "bids", "classes", "plain")
BIDS_SKIP = {"derivatives", "sourcedata", "code"}
_ENTITY = re.compile(r"(?:^|_)(sub|ses)-([a-zA-Z0-9]+)")


@dataclass(frozen=True)
class Scan:
    """One input file.

    Attributes:
        path: where the file is.
        source: its path as stored: relative to the input's parent folder.
        subject_id: the subject, without ``sub-``.
        session: the session, without ``ses-``; "" when none.
        label: the class name, or None when unlabelled.
        others: the files of the further modalities (channels), in ``--suffix`` order.
        mask: the file of its label mask, or None.
        notes: what was noticed while finding it (a DICOM conversion's warnings).
        origin: for a DICOM series, its folder and series, as messages name it.
    """

    path: Path
    source: str
    subject_id: str
    session: str
    label: str | None = None
    others: tuple[Path, ...] = ()
    mask: Path | None = None
    notes: tuple[str, ...] = ()
    origin: str = ""

    @property
    def shown(self) -> str:
        """How messages name the scan: its file, or a DICOM series' folder and number."""
        return self.origin or str(self.path)


def is_nifti(path: Path) -> bool:
    """Whether the name ends like a NIfTI file.

    >>> is_nifti(Path("sub-01_T1w.nii.gz")), is_nifti(Path("notes.txt"))
    (True, False)
    """
    return path.name.lower().endswith(NIFTI_SUFFIXES) and not path.name.startswith(".")


def is_image(path: Path) -> bool:
    """Whether the name ends like an image file this project reads (NIfTI, MGH, Analyze).

    >>> is_image(Path("brain.mgz")), is_image(Path("OAS1_0001.hdr")), is_image(Path("x.img"))
    (True, True, False)
    """
    return path.name.lower().endswith(IMAGE_SUFFIXES) and not path.name.startswith(".")


def is_dicom(path: Path, opener=open) -> bool:
    """Whether a file starts like DICOM: 128 bytes, then ``DICM`` (a DICOMDIR index is not
    an image and does not count). ``opener=gzip.open`` asks it of a gzipped file."""
    if path.name.upper() == "DICOMDIR":
        return False
    try:
        with opener(path, "rb") as handle:
            return handle.read(DICOM_MARKER_OFFSET + 4)[DICOM_MARKER_OFFSET:] == DICOM_MARKER
    except (OSError, EOFError):
        return False


def strip_nifti_suffix(name: str) -> str:
    """The file name without its image ending (``.nii``, ``.nii.gz``, ``.mgz``, ...).

    >>> strip_nifti_suffix("sub-01_T1w.nii.gz"), strip_nifti_suffix("OAS1_0001_MR1.hdr")
    ('sub-01_T1w', 'OAS1_0001_MR1')
    """
    for suffix in (".nii.gz", *sorted(IMAGE_SUFFIXES, key=len, reverse=True)):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def bids_entities(name: str) -> dict[str, str]:
    """The ``sub`` and ``ses`` entities of a BIDS file name.

    >>> bids_entities("sub-07_ses-pre_T1w.nii.gz")
    {'sub': '07', 'ses': 'pre'}
    """
    return {key: value for key, value in _ENTITY.findall(name)}


def all_entities(name: str) -> dict[str, str]:
    """Every ``key-value`` entity of a BIDS file name.

    >>> all_entities("sub-07_ses-pre_acq-fast_desc-lesion_mask.nii.gz")
    {'sub': '07', 'ses': 'pre', 'acq': 'fast', 'desc': 'lesion'}
    """
    parts = strip_nifti_suffix(name).split("_")
    return dict(part.split("-", 1) for part in parts if re.fullmatch(r"[a-zA-Z]+-[^-]+", part))


def find_layout(folder: Path) -> str:
    """Guess the layout of an input folder: ``bids``, ``classes`` or ``plain``."""
    names = {entry.name for entry in folder.iterdir()}
    if {"participants.tsv", "dataset_description.json"} & names or any(
        name.startswith("sub-") and (folder / name).is_dir() for name in names
    ):
        return "bids"
    if any(is_image(folder / name) for name in names):
        return "plain"
    with_scans = [
        name
        for name in names
        if (folder / name).is_dir()
        and not name.startswith(".")
        and any(is_image(p) for p in walk_files(folder / name))
    ]
    return "classes" if len(with_scans) >= 2 else "plain"


def walk_files(folder: Path, skip: set[str] = frozenset(), unreadable: list | None = None):
    """Every file below ``folder`` in sorted order, skipping hidden entries and ``skip``.

    A folder that cannot be listed adds ``(path, reason)`` to ``unreadable``.
    """

    def note(exc: OSError) -> None:
        if unreadable is not None:
            reason = (exc.strerror or type(exc).__name__).lower()
            unreadable.append(
                (str(exc.filename), f"cannot list the folder ({reason}): its scans are left out")
            )

    for root, dirs, files in os.walk(folder, followlinks=True, onerror=note):
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and d not in skip)
        for name in sorted(files):
            if not name.startswith("."):
                yield Path(root) / name


def discover(
    inputs: list[str | os.PathLike],
    layout: str = "auto",
    suffix: str = "T1w",
    masks_suffix: str | None = None,
) -> tuple[list[Scan], list[tuple[str, str]]]:
    """Find the scans of the inputs.

    Args:
        inputs: NIfTI files or folders.
        layout: ``auto``, ``bids``, ``classes`` or ``plain``. Defaults to ``auto``.
        suffix: the BIDS suffix (modality) taken from BIDS trees. Defaults to ``T1w``.
        masks_suffix: files whose name ends in it (before the extension) are masks, not
            scans. Defaults to None.

    Returns:
        The scans sorted by ``source``, and ``(path, reason)`` for inputs that are files
        but not NIfTI and for folders that cannot be listed.

    Raises:
        InputError: an input that does not exist, or two files with one source name.
    """
    if layout not in LAYOUTS:
        raise InputError(
            f"`layout` must be one of {', '.join(LAYOUTS)}; received layout={layout!r}"
        )
    scans: dict[str, Scan] = {}
    seen: set[str] = set()
    rejected = []
    for item in inputs:
        path = Path(item)
        if not path.exists():
            raise InputError(f"{path}: no such file or folder")
        if path.is_file():
            found = _file_scans(path, rejected)
        else:
            found = _scan_folder(path, layout, suffix, rejected)
        if masks_suffix:
            found = [s for s in found if not strip_nifti_suffix(s.path.name).endswith(masks_suffix)]
        for scan in found:
            real = os.path.realpath(scan.path)
            if real in seen:
                continue
            seen.add(real)
            if scan.source in scans:
                raise InputError(
                    f"{scan.path}: has the same name as {scans[scan.source].path}; "
                    "give the inputs as their parent folders"
                )
            scans[scan.source] = scan
    return [scans[source] for source in sorted(scans)], rejected


def _file_scans(path: Path, rejected: list) -> list[Scan]:
    """The scan of a file given as an input (none for a DICOM file: its folder's series
    are :mod:`preprocess.dicom`'s); a file that is no image goes into ``rejected``."""
    if is_dicom(path):
        return []
    if not is_image(path):
        rejected.append(
            (str(path), "not an image: the name does not end in .nii, .nii.gz, .mgz, "
             ".mgh or .hdr, and it is not DICOM")
        )  # fmt: skip
        return []
    problem = _unpaired(path)
    if problem:
        rejected.append((str(path), problem))
        return []
    return [_plain_scan(path, path.name)]


def _plain_scan(path: Path, source: str, label: str | None = None) -> Scan:
    entities = bids_entities(path.name)
    subject_id = entities.get("sub") or strip_nifti_suffix(source)
    return Scan(path, source, subject_id, entities.get("ses", ""), label)


def _scan_folder(folder: Path, layout: str, suffix: str, unreadable: list) -> list[Scan]:
    folder = Path(os.path.normpath(folder))
    layout = find_layout(folder) if layout == "auto" else layout
    base = folder.name or "input"
    if layout == "bids":
        wanted = tuple(f"_{suffix}{ext}".lower() for ext in NIFTI_SUFFIXES)
        return [
            _plain_scan(path, f"{base}/{path.relative_to(folder).as_posix()}")
            for path in walk_files(folder, BIDS_SKIP, unreadable)
            if is_nifti(path)
            and path.name.lower().endswith(wanted)
            and "sub" in bids_entities(path.name)
        ]
    scans = []
    for path in walk_files(folder, unreadable=unreadable):
        if not is_image(path):
            continue
        problem = _unpaired(path)
        if problem:
            unreadable.append((str(path), problem))
            continue
        relative = path.relative_to(folder)
        label = relative.parts[0] if layout == "classes" and len(relative.parts) > 1 else None
        if layout == "classes" and label is None:
            continue
        scans.append(_plain_scan(path, f"{base}/{relative.as_posix()}", label))
    return scans


def _unpaired(path: Path) -> str | None:
    """Why an Analyze header cannot be read: its ``.img`` is missing; None otherwise."""
    if not path.name.lower().endswith(".hdr"):
        return None
    if any(path.with_suffix(end).is_file() for end in (".img", ".IMG", ".img.gz")):
        return None
    return "an Analyze header without its image: no .img beside it"


def read_subjects_table(
    path: str | os.PathLike, id_column: str = table.ID_COLUMN, notes: list | None = None
) -> dict:
    """Read a table of subjects (``participants.tsv`` or a CSV): id -> {column: value or None}.

    ``notes`` gets a line per subject listed more than once (see
    :func:`loader.table.read_table`).

    Raises:
        InputError: the file is missing or unreadable, or has no ``id_column``.
    """
    try:
        return table.read_table(path, id_column, notes)
    except table.TableError as exc:
        raise InputError(str(exc)) from exc


def column_of(rows: dict[str, dict], column: str, where, id_column: str) -> dict:
    """One column of a table from :func:`read_subjects_table`: subject id -> value or None.

    Raises:
        InputError: the table has no such column (its columns are listed).
    """
    columns = table.columns_of(rows)
    if column not in columns:
        raise InputError(
            f"{where}: no column {column!r}; the columns are {sorted([*columns, id_column])}"
        )
    return {subject_id: row[column] for subject_id, row in rows.items()}


def _some(ids, count: int = 3) -> str:
    """A few ids, for a message.

    >>> _some(["1", "2", "3", "4", "5"])
    "'1', '2', '3', ... (5 in all)"
    """
    ids = sorted(ids)
    shown = ", ".join(map(repr, ids[:count]))
    return shown + (f", ... ({len(ids)} in all)" if len(ids) > count else "")


def match_labels(
    subject_ids, table: dict[str, str | None], table_name: str
) -> tuple[dict[str, str | None], list[str]]:
    """Join the scans' subjects with a label table, and say how they matched.

    Args:
        subject_ids: the scans' subject ids.
        table: subject id -> label (None where the table says ``n/a``), from
            :func:`column_of`.
        table_name: the table's file and column, for the messages.

    Returns:
        ``(labels, lines)``: subject id -> label or None, and the lines to show: how many
        subjects have a label, and (as warnings) the subjects without one and the table
        rows that match no scan, with a few ids of each.

    Raises:
        InputError: no scan's subject is in the table (an id from each side is shown).

    Example:
        >>> labels, lines = match_labels(["01", "02"], {"01": "a", "99": "b"}, "t.tsv")
        >>> labels
        {'01': 'a', '02': None}
        >>> for line in lines:
        ...     print(line)
        labels: 1 of 2 subjects have a label in t.tsv
        warning: 1 subject(s) have no label in t.tsv and go to the split 'unlabelled': '02'
        warning: 1 row(s) of t.tsv match no scan's subject: '99'
    """
    subjects = set(subject_ids)
    known = subjects & set(table)
    if not known:
        raise InputError(
            f"{table_name}: no subject id in the table matches a scan's subject (table: "
            f"{_some(table, 2) or 'no rows'}; scans: {_some(subjects, 2)}); ids must be the "
            "scans' subject ids, with or without 'sub-'"
        )
    labels = {subject_id: table.get(subject_id) for subject_id in sorted(subjects)}
    without = [subject_id for subject_id, label in labels.items() if label is None]
    labelled = len(subjects) - len(without)
    lines = [f"labels: {labelled} of {len(subjects)} subjects have a label in {table_name}"]
    if without:
        lines.append(
            f"warning: {len(without)} subject(s) have no label in {table_name} and go to the "
            f"split 'unlabelled': {_some(without)}"
        )
    unmatched = set(table) - subjects
    if unmatched:
        lines.append(
            f"warning: {len(unmatched)} row(s) of {table_name} match no scan's subject: "
            f"{_some(unmatched)}"
        )
    return labels, lines


def pair_files(
    scans: list[Scan], suffixes: tuple[str, ...], masks: str | None, masks_suffix: str | None
) -> tuple[list[Scan], list[tuple[str, str]]]:
    """Give each scan the files of its further modalities and its mask.

    Args:
        scans: scans of the first suffix.
        suffixes: every modality, the first being the scans'.
        masks: the ``desc`` of BIDS-derivatives masks, or None.
        masks_suffix: the name ending of masks beside plain scans, or None.

    Returns:
        The scans that have every file, and ``(path, reason)`` for those that do not.
    """
    paired, rejected = [], []
    derivatives: dict[Path, list[Path]] = {}
    for scan in scans:
        stem = strip_nifti_suffix(scan.path.name)
        others, missing = [], []
        for other in suffixes[1:]:
            base = stem[: -len(suffixes[0])] if stem.endswith(suffixes[0]) else stem + "_"
            found = _existing(scan.path.parent, base + other)
            if found is None:
                missing.append(f"no {other} of this session ({base}{other}.nii.gz)")
            others.append(found)
        mask = None
        if masks:
            root = _bids_root(scan.path)
            if root not in derivatives:
                derivatives[root] = (
                    [p for p in walk_files(root / "derivatives") if is_nifti(p)]
                    if (root / "derivatives").is_dir()
                    else []
                )
            wanted = {k: v for k, v in all_entities(scan.path.name).items()}
            matches = [
                p
                for p in derivatives[root]
                if strip_nifti_suffix(p.name).rsplit("_", 1)[-1] in ("mask", "dseg")
                and all_entities(p.name).get("desc") == masks
                and all(all_entities(p.name).get(k) == v for k, v in wanted.items())
            ]
            if len(matches) > 1:
                names = ", ".join(p.name for p in matches)
                missing.append(f"several masks with desc-{masks}: {names}")
            elif not matches:
                missing.append(f"no mask with desc-{masks} under {root / 'derivatives'}")
            else:
                mask = matches[0]
        elif masks_suffix:
            mask = _existing(scan.path.parent, stem + masks_suffix)
            if mask is None:
                missing.append(f"no mask {stem}{masks_suffix}.nii.gz beside it")
        if missing:
            rejected.append((str(scan.path), "; ".join(missing)))
        else:
            paired.append(dataclasses.replace(scan, others=tuple(others), mask=mask))
    return paired, rejected


def _existing(folder: Path, stem: str) -> Path | None:
    for extension in (".nii.gz", ".nii"):
        if (folder / (stem + extension)).is_file():
            return folder / (stem + extension)
    return None


def _bids_root(path: Path) -> Path:
    """The BIDS tree a scan lies in: the parent of its ``sub-*`` folder."""
    for parent in path.parents:
        if parent.name.startswith("sub-"):
            return parent.parent
    return path.parent
