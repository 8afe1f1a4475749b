"""DICOM series as scans: found by their ``DICM`` marker, converted by dcm2niix, and named
without patient identifiers.

Every folder below an input that holds DICOM files (any depth, with or without ``.dcm``,
a DICOMDIR or not) is converted by dcm2niix (the binary of the ``dcm2niix`` wheel) into a
temporary folder, removed when the run ends; each series it writes (each echo or image
type of one, where dcm2niix splits them) is one scan. What dcm2niix says about a series
(missing slices, varying slice spacing, gantry tilt, dimensions that differ between
slices) becomes the scan's note or its ``rejected:`` line, never stray output.

Subjects are the series' ``PatientID`` (or, with ``--dicom-subject folder``, the first
folder below the input); sessions are the study (``StudyInstanceUID``). Neither is stored
as it is: both become a keyed hash (HMAC-SHA256 with the run's secret ``--id-salt``,
12 and 8 hex digits), the same for the same secret; ``--keep-patient-ids`` stores
``PatientID`` (or the folder name) as given, and an unkeyed hash for the study. A scan's
stored name is built from those ids and the series number and description, never from the
DICOM's folder or file names.
"""

from __future__ import annotations

import concurrent.futures as futures
import functools
import hashlib
import hmac
import importlib.util
import json
import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path

import nibabel as nib

from preprocess import series
from preprocess.discover import BIDS_SKIP, Scan, find_layout, is_dicom, is_image, walk_files

SUFFIX = ".dcm"
TEXT_ENDINGS = (".json", ".tsv", ".csv", ".txt", ".img")  # never DICOM: not opened
SUBJECT_SOURCES = ("patient-id", "folder")
SALT_VARIABLE = "SLICESTORE_ID_SALT"  # the secret, when --id-salt is not given
# dcm2niix's lines that leave a series out: the image would not be the scan
REJECTING = {
    "Missing images": "missing slices",
    "Interslice distance varies": "the slice spacing varies",
    "Slices not stacked": "its slices disagree in size or orientation",
}
FILE_PROBLEM = re.compile(r"(?:Warning|Error): (.*?):? (/\S+|\S+/\S+)\s*$")
NO_IMAGES = "No valid DICOM images were found"  # dcm2niix, on a folder of reports
# what dcm2niix says of a file it cannot read (its other lines naming a file, such as
# "Unable to determine GE Slice timing", are about the series, not the file)
UNREADABLE = re.compile(
    r"not large enough|unable to (?:read|open|load|decode|decompress)|corrupt|truncat",
    re.IGNORECASE,
)


def find_folders(
    inputs: list[str | os.PathLike],
) -> tuple[list[tuple[Path, Path]], list[tuple[str, str]]]:
    """The folders holding DICOM files, each with the input it was found in, and the
    ``.dcm`` files that are not DICOM. In a BIDS tree, ``sourcedata/`` (where the DICOM
    its NIfTI came from is kept), ``derivatives/`` and ``code/`` are not searched.

    Returns:
        ``(input, folder)`` pairs in folder order, and ``(path, reason)`` rejections.
    """
    found: dict[Path, Path] = {}  # folder -> input
    rejected = []
    for item in map(Path, inputs):
        if item.is_file():
            if is_dicom(item):
                found.setdefault(item.parent, item.parent)
            continue
        if not item.is_dir():
            continue
        skip = BIDS_SKIP if find_layout(item) == "bids" else set()
        for path in walk_files(item, skip):
            if is_image(path) or path.name.lower().endswith(TEXT_ENDINGS):
                continue
            if is_dicom(path):
                found.setdefault(path.parent, item)
            elif path.name.lower().endswith(SUFFIX):
                rejected.append((str(path), "not DICOM: no DICM marker at byte 128"))
    return [(found[folder], folder) for folder in sorted(found)], rejected


def dcm2niix_path() -> str | None:
    """The dcm2niix binary: the ``dcm2niix`` wheel's, else one on the PATH."""
    spec = importlib.util.find_spec("dcm2niix")
    if spec is not None and spec.origin:
        binary = Path(spec.origin).parent / "dcm2niix"
        if binary.is_file() and os.access(binary, os.X_OK):
            return str(binary)
    return shutil.which("dcm2niix")


def keyed_hash(value: str, salt: str | None, digits: int) -> str:
    """A value as hex digits of HMAC-SHA256 under ``salt`` (SHA-256 without one).

    >>> keyed_hash("MRN0001", "secret", 12), keyed_hash("MRN0001", "other", 12)
    ('106a3b591974', 'c969cecf6cb4')
    """
    if salt is None:
        return hashlib.sha256(value.encode()).hexdigest()[:digits]
    return hmac.new(salt.encode(), value.encode(), "sha256").hexdigest()[:digits]


@dataclass
class Naming:
    """How DICOM-derived subjects and sessions are named.

    Attributes:
        subject: ``patient-id`` or ``folder``.
        keep: store the ids as given instead of hashed.
        salt: the secret of the hash (None only with ``keep``).
    """

    subject: str = "patient-id"
    keep: bool = False
    salt: str | None = None

    def subject_id(self, value: str) -> str:
        return value if self.keep else keyed_hash(value, self.salt, 12)

    def session(self, study_uid: str) -> str:
        return keyed_hash(study_uid, None if self.keep else self.salt, 8)


@dataclass
class Converted:
    """The scans of DICOM series, converted into a temporary folder (removed by ``close``)."""

    scans: list[Scan] = field(default_factory=list)
    rejected: list[tuple[str, str]] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # note lines: series left out by choice
    folder: Path | None = None
    listing: list[dict] = field(default_factory=list)  # one row per series: --list-series
    kinds: dict[str, tuple[str, int]] = field(default_factory=dict)  # source -> kind, number

    def close(self) -> None:
        if self.folder is not None:
            shutil.rmtree(self.folder, ignore_errors=True)
            self.folder = None


def convert(
    folders: list[tuple[Path, Path]],
    naming: Naming,
    series: str | None,
    class_inputs: frozenset[Path] = frozenset(),
    kinds: tuple[str, ...] = ("T1w",),
) -> Converted:
    """Convert each folder's series with dcm2niix; the scans, rejections and skipped series.

    Args:
        folders: ``(input, folder)`` from :func:`find_folders`.
        naming: how subjects and sessions are named.
        series: a regular expression a series' description or protocol name must match
            (case-insensitive); None takes the 3-D series whose kind
            (:func:`preprocess.series.classify`) is one of ``kinds``.
        class_inputs: inputs laid out as class folders: the first folder below the input
            is a series' label (and ``--dicom-subject folder`` takes the one below it).
        kinds: the kinds of series stored (``--suffix``); every other series is a note.
            Defaults to T1w.
    """
    result = Converted()
    binary = dcm2niix_path()
    if binary is None:
        for _, folder in folders:
            result.rejected.append(
                (str(folder), "DICOM series need dcm2niix: pip install dcm2niix")
            )
        return result
    result.folder = Path(tempfile.mkdtemp(prefix="slicestore-dicom-"))
    pattern = re.compile(series, re.IGNORECASE) if series else None
    outs = [result.folder / f"{index:05d}" for index in range(len(folders))]
    found = []  # (place, out, written, kind, header): every series, before any is added
    cores = min(8, len(os.sched_getaffinity(0)))
    with futures.ThreadPoolExecutor(cores) as pool:  # a dcm2niix process per folder
        runs = pool.map(functools.partial(_run, binary), [f for _, f in folders], outs)
        for (item, folder), out, (outputs, problems, note) in zip(folders, outs, runs, strict=True):
            result.rejected += problems
            result.skipped += [f"{folder}: skipped: {note}"] if note else []
            by_series: dict[str, list] = {}
            for name, lines in outputs:
                facts = _sidecar(out / f"{name}.json")
                uid = str(facts.get("SeriesInstanceUID", name))
                by_series.setdefault(uid, []).append((name, lines, facts))
            for written in by_series.values():
                name, _, facts = written[0]
                image = _written_image(out, name)
                header = _header(image) if image is not None else None
                kind = _kind(facts, header, out / f"{name}.bval")
                found.append(((item, folder, item in class_inputs), out, written, kind, header))
    strays, exams = _patient_folders([(entry[0], entry[2][0][2]) for entry in found])
    result.skipped += exams
    for index, (place, out, written, kind, header) in enumerate(found):
        facts = written[0][2]
        counts = len(result.scans), len(result.rejected), len(result.skipped)
        _add_series(result, place, out, written, naming, pattern or kinds, kind)
        if index in strays and len(result.scans) > counts[0]:
            what = _series_name(place[1], facts)
            _another_patient(result, counts[0], what, strays[index], naming)
        result.listing.append(_listing_row(result, counts, place, facts, naming, kind, header))
    if len(kinds) > 1:
        _pair_kinds(result, kinds)
    return result


def _another_patient(result: Converted, added: int, what: str, why: str, naming) -> None:
    """A series of another patient than its folder's, just added as ``result.scans[added:]``:
    a note where subjects are PatientIDs (it is that patient's scan), a rejection where they
    are folders (it would be stored as the folder's patient)."""
    if naming.subject != "folder":
        result.skipped.append(f"{what}: {why}: it counts as that patient's")
        return
    for scan in result.scans[added:]:
        result.kinds.pop(scan.source, None)
    del result.scans[added:]
    result.rejected.append((what, f"{why}: with --dicom-subject folder it would be the folder's"))


def _patient_folders(series: list[tuple]) -> tuple[dict[int, str], list[str]]:
    """What the folders of patients hold that the user should know: a series of another
    patient among one patient's series, and several exams (studies) of one patient.

    A patient's folder is the first folder below an input (below the class folder in class
    folders), or the input itself when its series lie in it or each in a folder of its own
    just below it (an exam given as the input). A series is another patient's when one
    patient has more than half of the folder's series and the series' ``PatientID`` is not
    that patient's.

    Args:
        series: ``(place, facts)`` of every series: ``place`` is ``(input, folder,
            classes)``, ``facts`` its sidecar.

    Returns:
        the reason, by index in ``series``, for each series of another patient, and one
        note line for each folder holding several exams of one patient.
    """
    per_folder: dict[Path, int] = {}
    for (_, folder, _), _ in series:
        per_folder[folder] = per_folder.get(folder, 0) + 1
    exam: dict[Path, bool] = {}  # input -> it is one exam: its series each in a folder of its own
    for (item, folder, classes), _ in series:
        depth = len(folder.relative_to(item).parts) - bool(classes)
        alone = depth <= 0 or (depth == 1 and per_folder[folder] == 1)
        exam[item] = exam.get(item, True) and alone
    groups: dict[Path, list] = {}
    for index, ((item, folder, classes), facts) in enumerate(series):
        top, parts = item, folder.relative_to(item).parts
        if classes and parts:
            top, parts = item / parts[0], parts[1:]
        where = top if exam[item] or not parts else top / parts[0]
        groups.setdefault(where, []).append((index, facts))
    strays, exams = {}, []
    for where, members in groups.items():
        patients: dict[str, list] = {}
        for index, facts in members:
            patients.setdefault(str(facts.get("PatientID") or ""), []).append((index, facts))
        owner, owned = max(patients.items(), key=lambda entry: len(entry[1]))
        if len(patients) > 1 and 2 * len(owned) > len(members):
            for patient, theirs in patients.items():
                for index, _ in theirs if patient != owner else ():
                    strays[index] = (
                        f"a series of another patient than the other {len(owned)} series of "
                        f"{where} (PatientID differs)"
                    )
        studies = {str(facts.get("StudyInstanceUID") or "") for _, facts in owned} - {""}
        if len(studies) > 1:
            exams.append(
                f"{where}: {len(studies)} exams (studies) of one patient: each is a session"
            )
    return strays, exams


def _pair_kinds(result: Converted, kinds: tuple[str, ...]) -> None:
    """One scan per session with the series of every kind as its channels, in ``kinds``
    order: of several series of one kind in a session (a repeat, MP2RAGE's images, echoes)
    the last acquired is taken (the highest series number), with a note naming the others;
    a session without a series of a kind is rejected with a line naming the kind."""
    sessions: dict[tuple, list[Scan]] = {}
    for scan in result.scans:
        sessions.setdefault((scan.subject_id, scan.session, scan.label), []).append(scan)
    paired = []
    for (subject, session, _), scans in sessions.items():
        chosen, missing = [], []
        for kind in kinds:
            candidates = sorted(
                (s for s in scans if result.kinds[s.source][0] == kind),
                key=lambda s: (result.kinds[s.source][1], s.source),
            )
            if not candidates:
                missing.append(kind)
                continue
            if len(candidates) > 1:
                others = ", ".join(c.origin.rsplit(": ", 1)[-1] for c in candidates[:-1])
                result.skipped.append(
                    f"{candidates[-1].origin}: taken as the session's {kind} (the last "
                    f"acquired); also {kind}, left out: {others}"
                )
            chosen.append(candidates[-1])
        if missing:
            where = scans[0].origin.rsplit(": series", 1)[0]
            result.rejected.append(
                (
                    f"{where}: sub-{subject} ses-{session or 'none'}",
                    f"no {' or '.join(missing)} series in this session "
                    f"(--suffix {' '.join(kinds)} stores one of each as channels)",
                )
            )
            continue
        first = chosen[0]
        notes = [*first.notes]
        for other in chosen[1:]:
            notes += [f"{other.origin.rsplit(': ', 1)[-1]}: {note}" for note in other.notes]
        paired.append(replace(first, others=tuple(s.path for s in chosen[1:]), notes=tuple(notes)))
    result.scans = paired


def _run(binary: str, folder: Path, out: Path) -> tuple[list, list[tuple[str, str]], str]:
    """dcm2niix on one folder (not its sub-folders): ``(output name, its lines)`` per
    series written, rejections for files or the whole folder, and a note when the folder's
    DICOM files hold no image (a report, as Siemens' PhoenixZIPReport): not a problem."""
    out.mkdir()
    command = [binary, "-g", "i", "-b", "y", "-ba", "n", "-z", "n", "-d", "0"]
    command += ["-f", "%s_%j", "-o", str(out), str(folder)]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=600, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return [], [(str(folder), f"dcm2niix failed: {exc}")], ""
    outputs, pending, problems = [], [], []
    for line in (done.stdout + done.stderr).splitlines():
        line = line.strip()
        converted = re.match(r"Convert \d+ DICOM as (\S+) \(", line)
        if converted:
            outputs.append((Path(converted.group(1)).name, pending))
            pending = []
            continue
        bad_file = FILE_PROBLEM.match(line)
        if (
            bad_file
            and UNREADABLE.search(bad_file.group(1))
            and Path(bad_file.group(2)).name in _names(folder)
        ):
            path = folder / Path(bad_file.group(2)).name
            problems.append((str(path), f"unreadable DICOM file (dcm2niix: {bad_file.group(1)})"))
        elif line.startswith(("Warning:", "Error:", "Slices not stacked")) or "not stacked" in line:
            pending.append(line)
    if not outputs and not problems and NO_IMAGES in done.stdout + done.stderr:
        return [], [], "its DICOM files hold no image (a report or another non-image object)"
    if not outputs and not problems:
        errors = [line for line in pending if line.startswith("Error")] or pending
        reason = errors[-1] if errors else f"exit status {done.returncode}"
        problems.append((str(folder), f"dcm2niix converted no series ({reason})"))
    return outputs, problems, ""


def _names(folder: Path) -> set[str]:
    try:
        return {entry.name for entry in folder.iterdir()}
    except OSError:
        return set()


def _sidecar(path: Path) -> dict:
    """A series' header facts, as dcm2niix's JSON sidecar gives them (empty when absent)."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _add_series(result: Converted, place, out: Path, written, naming, chosen, kind: str) -> None:
    """The images dcm2niix wrote for one series of ``kind``: skipped when ``--series`` (a
    pattern) does not choose it or its kind is not one of those asked for (a tuple), all
    rejected when one of them is (a series split because its slices disagree), else each
    added as :func:`_add` says."""
    folder = place[1]
    facts = written[0][2]
    if isinstance(chosen, tuple):
        skipped = _unasked(kind, facts, chosen)
        if skipped:
            result.skipped.append(f"{_series_name(folder, facts)}: skipped: {skipped}")
            return
    elif not any(
        chosen.search(str(facts.get(key) or "")) for key in ("SeriesDescription", "ProtocolName")
    ):
        result.skipped.append(f"{_series_name(folder, facts)}: skipped: --series does not match it")
        return
    for _, lines, facts in written:
        for text, meaning in REJECTING.items():
            if any(text in line for line in lines):
                what = _series_name(folder, facts)
                result.rejected.append((what, f"{meaning} (dcm2niix: {_first(lines, text)})"))
                return
    for name, lines, facts in written:
        _add(result, place, out, name, lines, facts, naming, kind)


# The columns of --list-series, in order.
LISTING_COLUMNS = (
    "folder",
    "series",
    "description",
    "kind",
    "dimensions",
    "voxel_mm",
    "subject",
    "session",
    "stored",
    "why_not",
)


def _listing_row(result: Converted, counts, place, facts, naming, kind: str, header) -> dict:
    """One series' row of ``--list-series``: what it is (its first image's ``header``), and
    what the run did with it (``counts``: the scans, rejections and notes before it)."""
    folder = place[1]
    shape = tuple(header.get_data_shape()) if header is not None else ()
    added = result.scans[counts[0] :]
    given = _given_subject(place, facts, naming)
    why = [reason for _, reason in result.rejected[counts[1] :]]
    why += [
        line.split(": skipped: ", 1)[-1]
        for line in result.skipped[counts[2] :]
        if ": skipped: " in line
    ]
    study = str(facts.get("StudyInstanceUID") or "")
    return {
        "folder": str(folder),
        "series": facts.get("SeriesNumber", ""),
        "description": str(facts.get("SeriesDescription") or facts.get("ProtocolName") or ""),
        "kind": kind,
        "dimensions": "x".join(map(str, shape)),
        "voxel_mm": "x".join(f"{z:.3g}" for z in header.get_zooms()[:3]) if header else "",
        "subject": added[0].subject_id if added else (naming.subject_id(given) if given else ""),
        "session": added[0].session if added else (naming.session(study) if study else ""),
        "stored": "yes" if added else "no",
        "why_not": "; ".join(why),
    }


def _written_image(out: Path, name: str) -> Path | None:
    """The image dcm2niix wrote as ``name`` (its untilted one for a tilted gantry); None
    when it wrote none."""
    images = (out / f"{name}_Tilt_1.nii", out / f"{name}.nii")
    return next((path for path in images if path.is_file()), None)


def _header(image: Path):
    """A NIfTI file's header; None when it cannot be read (the scan's load then says why)."""
    try:
        return nib.load(image).header
    except Exception:
        return None


def _given_subject(place, facts: dict, naming: Naming) -> str:
    """A series' subject as the archive names it (PatientID, or the folder with
    ``--dicom-subject folder``); "" when its header has no PatientID."""
    item, folder, classes = place
    parts = folder.relative_to(item).parts
    label = parts[0] if classes and parts else None
    parts = parts[1:] if classes else parts
    if naming.subject == "folder":
        return parts[0] if parts else (label or item.name)
    return str(facts.get("PatientID") or "").strip()


def _kind(facts: dict, header, bval: Path) -> str:
    """The kind of a series (:mod:`preprocess.series`) from its sidecar's ``facts``, its
    image's ``header`` (4-D: volumes) and the b-values file dcm2niix wrote beside it."""
    shape = tuple(header.get_data_shape()) if header is not None else ()
    volumes = shape[3] if len(shape) > 3 else 1
    return series.classify(series.series_facts(facts, volumes, _bvalues(bval)))[0]


def _unasked(kind: str, facts: dict, kinds: tuple[str, ...]) -> str:
    """Why a series whose kind is not one of ``kinds`` is left out ("" when it is one)."""
    if kind in kinds:
        return ""
    if kind == "localizer":
        return "a localizer"
    if kind == "derived":
        image_type = [str(value).upper() for value in facts.get("ImageType", [])]
        return f"derived ({'/'.join(image_type)})"
    asked = " ".join(kinds)
    if kind == "unknown":
        return (
            f"unknown, its names and timing match no rule; only --suffix {asked} is stored "
            "(--series REGEX takes a series by name)"
        )
    return f"{kind}, {series.MEANING[kind]}; only --suffix {asked} is stored"


def _bvalues(path: Path) -> list[float]:
    """The b-values dcm2niix wrote beside a diffusion series (none for other series)."""
    try:
        return [float(value) for value in path.read_text().split()]
    except (OSError, ValueError):
        return []


def _series_name(folder: Path, facts: dict) -> str:
    """How messages name a series: its folder, number and description."""
    description = str(facts.get("SeriesDescription") or facts.get("ProtocolName") or "")
    return f"{folder}: series {facts.get('SeriesNumber', '?')} {description!r}"


def _add(result: Converted, place, out, name, lines, facts, naming, kind: str) -> None:
    """One written image of a series: a scan, a rejection or a skipped note.

    ``place`` is ``(input, folder, classes)``: where the series was found, and whether the
    input's first folders are classes."""
    item, folder, classes = place
    parts = folder.relative_to(item).parts
    label = parts[0] if classes and parts else None
    number = facts.get("SeriesNumber", "")
    description = str(facts.get("SeriesDescription") or facts.get("ProtocolName") or "")
    what = _series_name(folder, facts)
    image = _written_image(out, name)
    if image is None:
        result.rejected.append((what, "dcm2niix wrote no image for it"))
        return
    header = _header(image)
    shape = tuple(header.get_data_shape()) if header is not None else ()
    if shape and (shape[2] if len(shape) > 2 else 1) < 2:
        result.skipped.append(f"{what}: skipped: a 2-D image")
        return
    given = _given_subject(place, facts, naming)
    if not given:
        reason = "no PatientID in its header: name subjects by folder (--dicom-subject folder)"
        result.rejected.append((what, reason))
        return
    subject = naming.subject_id(given)
    study = str(facts.get("StudyInstanceUID") or "")
    session = naming.session(study) if study else ""
    postfix = name.split("_", 1)[1][len(str(facts.get("SeriesInstanceUID", ""))) :]
    described = re.sub(r"[^A-Za-z0-9.+-]+", "-", description).strip("-") or "series"
    series_name = f"{int(number) if str(number).isdigit() else 0:03d}-{described}{postfix}"
    source = f"{item.name}/sub-{subject}/ses-{session or 'none'}/{series_name}"
    notes = [_note(line) for line in lines if line.startswith("Warning")]
    if image.name.endswith("_Tilt_1.nii"):
        notes.append("gantry tilt: dcm2niix resampled the series onto an untilted grid")
    twin = next((scan for scan in result.scans if scan.source == source), None)
    if twin is not None:  # a copy of the series in another folder
        result.rejected.append((what, f"the same series as {twin.origin} (patient, study, number)"))
        return
    scan = Scan(image, source, subject, session, label, notes=tuple(notes), origin=what)
    result.scans.append(scan)
    result.kinds[source] = (kind, int(number) if str(number).isdigit() else 0)


def _note(line: str) -> str:
    """A dcm2niix warning as a stored note: any path in it (folder names may name the
    patient) replaced.

    >>> _note("Warning: Unable to read /data/Doe_Jane/IM0001 (bad tag)")
    'dcm2niix: Unable to read <path> (bad tag)'
    """
    text = line.split(":", 1)[-1].strip()
    return "dcm2niix: " + re.sub(r"\S*/\S*", "<path>", text)


def _first(lines: list[str], text: str) -> str:
    return next(line for line in lines if text in line).removeprefix("Warning: ").strip()
