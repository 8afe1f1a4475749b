"""Scans as they arrive: DICOM series (written here with pydicom), FreeSurfer's MGZ and
Analyze pairs store the slices of the NIfTI they came from, and no patient identifier
reaches a store."""

from __future__ import annotations

import math
import shutil
from dataclasses import replace
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from dicom_series import patient, write_enhanced, write_series
from helpers import NIBABEL_DATA, assert_same_store_content, blob_volume
from make_heads import known_motion, moved_head, scanner_grid

from loader import open_store
from preprocess import dicom
from preprocess.cli import main as preprocess_main
from preprocess.pipeline import run as preprocess_run
from preprocess.settings import RunOptions, Settings
from preprocess.writer import Partial, partial_path

SALT = "a long random secret"
SMALL = dict(size=32, val_fraction=0.25)


def _anatomical() -> tuple[np.ndarray, np.ndarray]:
    image = nib.load(NIBABEL_DATA / "anatomical.nii")  # big-endian LAS, 2 mm
    return np.asarray(image.dataobj, dtype=np.int16), image.affine


def _reoriented(data: np.ndarray, affine: np.ndarray, codes: str):
    """The same image stored in another voxel order (``codes``: where each voxel axis runs)."""
    image = nib.Nifti1Image(data, affine)
    ornt = nib.orientations.ornt_transform(
        nib.orientations.io_orientation(affine), nib.orientations.axcodes2ornt(tuple(codes))
    )
    moved = image.as_reoriented(ornt)
    return np.asarray(moved.dataobj), moved.affine


def _oblique(affine: np.ndarray, degrees: float = 15.0) -> np.ndarray:
    angle = math.radians(degrees)
    rotation = np.eye(4)
    rotation[1:3, 1:3] = [[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]]
    return rotation @ affine


def _blob() -> tuple[np.ndarray, np.ndarray]:
    data = (blob_volume(7, (36, 40, 30)) * 20).astype(np.int16)
    return data, scanner_grid(data.shape, (1.5, 1.5, 2.0), "RAS")


# name -> (patient, volume, how it is written)
SERIES = {
    "axial": (1, "anatomical", "files"),
    "sagittal": (1, "sagittal", "files"),
    "oblique": (1, "oblique", "files"),
    "jpegls": (2, "anatomical", "jpeg-ls"),
    "enhanced": (2, "blob", "enhanced"),
    "third": (3, "blob", "shared folder"),
    "fourth": (4, "anatomical", "shared folder"),
}


def _volumes() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    data, affine = _anatomical()
    return {
        "anatomical": (data, affine),
        "sagittal": _reoriented(data, affine, "ASL"),
        "oblique": (data, _oblique(affine)),
        "blob": _blob(),
    }


@pytest.fixture(scope="module")
def archive(tmp_path_factory) -> Path:
    """A DICOM archive as exports make them: folders named after the patient, files without
    ``.dcm``; each series also saved as NIfTI (``nifti/<series>.nii.gz``), and the broken
    ones (a missing slice, a truncated file, slices of two sizes, a file named .dcm that
    is not DICOM)."""
    root = tmp_path_factory.mktemp("archive")
    volumes = _volumes()
    studies = {}
    for number, (name, (who, volume, how)) in enumerate(SERIES.items(), start=2):
        data, affine = volumes[volume]
        nib.save(nib.Nifti1Image(data, affine), _path(root / "nifti" / f"{name}.nii.gz"))
        folder = root / "dicom" / f"Doe_Jane{who}" / f"{name}_{number}"
        study = studies.get(who)
        if how == "enhanced":
            path = folder / "f.dcm"
            studies[who] = write_enhanced(path, data, affine, patient(who), study, number, name)
            continue
        if how == "shared folder":  # two patients' series in one folder
            folder = root / "dicom" / "mixed"
        studies[who] = write_series(
            folder, data, affine, patient(who), study, number, name,
            compressed=how == "jpeg-ls", names=f"{name[:2].upper()}{{:04d}}",
        )  # fmt: skip
    data, affine = volumes["anatomical"]
    broken = root / "dicom" / "Doe_Jane1" / "broken"
    write_series(broken / "gap", data, affine, patient(1), studies[1], 20, "gap", skip=(9,))
    write_series(broken / "cut", data, affine, patient(1), studies[1], 21, "cut")
    cut = broken / "cut" / "IM0005"
    cut.write_bytes(cut.read_bytes()[: cut.stat().st_size // 2])
    sizes = broken / "sizes"
    write_series(sizes, data, affine, patient(1), studies[1], 22, "sizes")
    for k in range(5):  # five slices of the series narrower than the rest
        path = sizes / f"IM{k + 1:04d}"
        ds = pydicom.dcmread(path)
        pixels = np.ascontiguousarray(data[:30, :, k].T)
        ds.Rows, ds.Columns = pixels.shape
        ds.PixelData = pixels.tobytes()
        ds.save_as(path)
    (broken / "notes").mkdir()
    (broken / "notes" / "report.dcm").write_text("not a DICOM file\n" * 20)
    return root


def _path(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def _slices_by_name(store_path: Path) -> dict[str, np.ndarray]:
    """Each scan's slices in position order, keyed by the last part of its stored name
    (without ending or series number)."""
    found = {}
    with open_store(store_path) as store:
        table = store.subjects_table()
        scans, positions = np.asarray(store.subject[:]), np.asarray(store.slice_index[:])
        for scan, source in enumerate(table["path"]):
            rows = np.flatnonzero(scans == scan)
            rows = rows[np.argsort(positions[rows])]
            name = str(source).rsplit("/", 1)[-1].split(".")[0]
            name = name.split("-", 1)[1] if name[:3].isdigit() else name
            found[name] = np.stack([store.images[int(row)] for row in rows])
    return found


def test_dicom_series_store_the_slices_of_the_nifti_they_came_from(archive, tmp_path, capsys):
    from_dicom, from_nifti = tmp_path / "dicom.h5", tmp_path / "nifti.h5"
    args = ["--size", "32", "--workers", "2", "--id-salt", SALT]
    assert preprocess_main([str(archive / "dicom"), "-o", str(from_dicom), *args]) == 1
    lines = capsys.readouterr()
    rejected = [line for line in lines.err.splitlines() if line.startswith("rejected:")]
    reasons = {
        "gap": "missing slices",
        "IM0005": "unreadable DICOM file",
        "sizes": "disagree in size",
        "report.dcm": "not DICOM",
    }
    for name, reason in reasons.items():
        mine = [line for line in rejected if name in line]
        assert len(mine) == 1, (name, rejected)
        assert reason in mine[0]
    assert len(rejected) == len(reasons)
    assert "Traceback" not in lines.err
    assert preprocess_main([str(archive / "nifti"), "-o", str(from_nifti), *args]) == 0
    dicom_slices, nifti_slices = _slices_by_name(from_dicom), _slices_by_name(from_nifti)
    assert sorted(dicom_slices) == sorted(SERIES)
    for name, slices in dicom_slices.items():
        expected = nifti_slices[name]
        assert slices.shape == expected.shape, name
        difference = np.abs(slices.astype(int) - expected.astype(int))
        assert difference.max() <= 1, name  # uint8 rounding at most
        assert difference.mean() < 0.01, name
    with open_store(from_dicom) as store:
        table = store.subjects_table()
    subjects = {str(s) for s in table["id"]}
    assert len(subjects) == 4  # four patients, two of them in one folder
    assert all(len(s) == 12 and int(s, 16) >= 0 for s in subjects)  # hashes, not ids
    sessions = {str(s) for s in table["session"]}
    assert len(sessions) == 4  # one study per patient
    assert all(len(s) == 8 for s in sessions)


def test_no_patient_identifier_reaches_the_store(archive, tmp_path):
    labels = tmp_path / "labels.csv"
    rows = [f"{patient(k)['PatientID']},{'ab'[k % 2]}" for k in (1, 2, 3, 4)]
    labels.write_text("participant_id,group\n" + "\n".join(rows) + "\n")
    store = tmp_path / "store.h5"
    settings = Settings(labels=str(labels), label_column="group", **SMALL)
    summary = preprocess_run(
        [str(archive / "dicom")], store, settings, RunOptions(workers=1, id_salt=SALT),
        report=lambda _: None,
    )  # fmt: skip
    assert summary.written == len(SERIES)
    with open_store(store) as opened:
        assert opened.class_names == ["a", "b"]  # the table's PatientIDs matched, hashed
        assert set(opened.participants()["group"][1]) == {"a", "b"}
    content = store.read_bytes()
    for number in (1, 2, 3, 4):
        values = list(patient(number).values())
        values += [patient(number)["PatientName"].replace("^", " ")]
        birth = patient(number)["PatientBirthDate"]
        values += [f"{birth[:4]}-{birth[4:6]}-{birth[6:]}", f"Doe_Jane{number}"]
        for value in values:
            for form in (value.encode(), value.encode("utf-16-le")):
                assert form not in content, value
    # the same secret gives the same ids; another gives others
    again = tmp_path / "again.h5"
    preprocess_run([str(archive / "dicom")], again, settings,
                   RunOptions(workers=1, id_salt=SALT), report=lambda _: None)  # fmt: skip
    other = tmp_path / "other.h5"
    options = RunOptions(workers=1, id_salt="another secret")
    preprocess_run([str(archive / "dicom")], other, settings, options, report=lambda _: None)
    ids = {}
    for path in (store, again, other):
        with open_store(path) as opened:
            ids[path.stem] = sorted(str(s) for s in opened.subjects_table()["id"])
    assert ids["store"] == ids["again"]
    assert not set(ids["store"]) & set(ids["other"])


def test_patient_ids_are_kept_only_when_asked_and_a_secret_is_needed_otherwise(
    archive, tmp_path, capsys, monkeypatch
):
    monkeypatch.delenv(dicom.SALT_VARIABLE, raising=False)
    out = tmp_path / "s.h5"
    assert preprocess_main([str(archive / "dicom"), "-o", str(out), "--size", "32"]) == 2
    err = capsys.readouterr().err.strip()
    assert "--id-salt SECRET" in err
    assert len(err.splitlines()) == 1
    assert not out.exists()
    args = ["--size", "32", "--keep-patient-ids", "--series", "^(axial|third)$"]
    assert preprocess_main([str(archive / "dicom"), "-o", str(out), *args]) == 1  # cut, report
    printed = capsys.readouterr()
    assert "series 20 'gap': skipped: --series does not match it" in printed.err
    assert "missing slices" not in printed.err  # a series not chosen is not checked
    with open_store(out) as store:
        ids = sorted(str(s) for s in store.subjects_table()["id"])
    assert ids == [patient(1)["PatientID"], patient(3)["PatientID"]]
    monkeypatch.setenv(dicom.SALT_VARIABLE, SALT)  # the secret from the environment
    by_folder = tmp_path / "folders.h5"
    args = ["--size", "32", "--dicom-subject", "folder", "--series", "axial|jpegls|third"]
    assert preprocess_main([str(archive / "dicom"), "-o", str(by_folder), *args]) == 1
    with open_store(by_folder) as store:
        ids = {str(s) for s in store.subjects_table()["id"]}
    expected = {dicom.keyed_hash(name, SALT, 12) for name in ("Doe_Jane1", "Doe_Jane2", "mixed")}
    assert ids == expected


def test_localizers_derived_and_2d_series_are_skipped_with_a_note(tmp_path, capsys):
    data, affine = _anatomical()
    who = patient(9)
    folder = tmp_path / "exam"
    study = write_series(folder / "t1", data, affine, who, number=2, description="t1")
    shutil.copytree(folder / "t1", folder / "zcopy")  # the same series again, in one input
    write_series(folder / "loc", data[:, :, :3], affine, who, study, 1, "AAHead_Scout",
                 image_type=("ORIGINAL", "PRIMARY", "M", "ND"))  # fmt: skip
    write_series(folder / "map", data, affine, who, study, 3, "t1_map",
                 image_type=("DERIVED", "SECONDARY", "MAP"))  # fmt: skip
    write_series(folder / "one", data[:, :, 10:11], affine, who, study, 4, "single")
    out = tmp_path / "s.h5"
    assert preprocess_main([str(folder), "-o", str(out), "--size", "32", "--id-salt", SALT]) == 1
    printed = capsys.readouterr().err
    assert f"{folder / 'zcopy'}: series 2 't1': the same series as {folder / 't1'}" in printed
    assert "series 1 'AAHead_Scout': skipped: a localizer" in printed
    assert "series 3 't1_map': skipped: derived" in printed
    assert "series 4 'single': skipped: a 2-D image" in printed
    with open_store(out) as store:
        assert [str(p).rsplit("/", 1)[-1] for p in store.subjects_table()["path"]] == ["002-t1"]


def test_without_dcm2niix_dicom_folders_are_one_line_each_and_nifti_goes_on(
    archive, tmp_path, capsys, monkeypatch
):
    monkeypatch.setattr(dicom, "dcm2niix_path", lambda: None)
    out = tmp_path / "s.h5"
    inputs = [str(archive / "dicom" / "Doe_Jane2"), str(archive / "nifti" / "axial.nii.gz")]
    assert preprocess_main([*inputs, "-o", str(out), "--size", "32", "--id-salt", SALT]) == 1
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if "need dcm2niix" in line]
    assert len(lines) == 2  # its two series folders
    assert all("pip install dcm2niix" in line for line in lines)
    with open_store(out) as store:
        assert store.subjects_table()["id"].tolist() == ["axial"]


def test_mgz_and_analyze_store_the_slices_of_their_nifti(tmp_path, capsys):
    data, affine = _anatomical()
    folder = tmp_path / "scans"
    nib.save(nib.Nifti1Image(data, affine), _path(folder / "nifti.nii.gz"))
    nib.save(nib.MGHImage(data.astype(np.int32), affine), folder / "fs.mgz")
    # Analyze keeps no orientation: the LAS image stored as Analyze assumes LAS too
    nib.save(nib.AnalyzeImage(data, affine), folder / "oasis.hdr")
    (tmp_path / "alone").mkdir()
    (tmp_path / "alone" / "lonely.hdr").write_bytes((folder / "oasis.hdr").read_bytes())
    (tmp_path / "alone" / "other.img").write_bytes(b"\0" * 64)  # an .img alone: not a scan
    out = tmp_path / "s.h5"
    args = [str(folder), str(tmp_path / "alone"), "-o", str(out), "--size", "32"]
    assert preprocess_main(args) == 1
    printed = capsys.readouterr()
    assert "lonely.hdr: an Analyze header without its image" in printed.err
    assert "other.img" not in printed.err + printed.out
    assert "oasis.hdr: an Analyze header has no orientation: LAS assumed" in printed.err
    assert "fs.mgz: an Analyze header" not in printed.err  # MGH keeps its orientation
    slices = _slices_by_name(out)
    assert sorted(slices) == ["fs", "nifti", "oasis"]
    for name in ("fs", "oasis"):
        np.testing.assert_array_equal(slices[name], slices["nifti"])


def test_dicom_heads_register_to_standard_space_as_their_nifti(tmp_path):
    rng = np.random.default_rng(4)
    shape = (96, 120, 110)  # the whole head in the field of view: a good registration
    affine = scanner_grid(shape, (2.0, 2.0, 2.0), "LPS")
    truth = known_motion(rng)
    data = np.clip(moved_head(truth, affine, shape, rng), 0, 32000).astype(np.int16)
    nib.save(nib.Nifti1Image(data, affine), _path(tmp_path / "nifti" / "head.nii.gz"))
    write_series(tmp_path / "dicom" / "head", data, affine, patient(5), description="head")
    settings = Settings(space="mni", **SMALL)
    transforms, similarity = {}, {}
    for kind in ("nifti", "dicom"):
        preprocess_run([str(tmp_path / kind)], tmp_path / f"{kind}.h5", settings,
                       RunOptions(workers=1, id_salt=SALT), report=lambda _: None)  # fmt: skip
        with open_store(tmp_path / f"{kind}.h5") as store:
            transforms[kind] = store.subjects_table()["to_template"][0]
            similarity[kind] = store.subjects_table()["similarity"][0]
    assert similarity["dicom"] > 0.9
    assert similarity["dicom"] == pytest.approx(similarity["nifti"], abs=1e-3)
    corners = np.array([[x, y, z, 1] for x in (-60, 60) for y in (-80, 60) for z in (-40, 70)])
    moved = [corners @ transforms[kind].T for kind in ("nifti", "dicom")]
    assert np.abs(moved[0] - moved[1]).max() < 0.5  # mm: the same registration


def test_shards_of_an_archive_name_every_series_as_the_whole_run(archive, tmp_path):
    """Shards of one archive name every series as the whole run does (what --resume relies
    on too: the same names, the same hashed ids, run after run)."""
    settings = Settings(series="axial|sagittal|oblique|third|fourth", **SMALL)
    options = RunOptions(workers=1, id_salt=SALT)
    names = {}
    for shard in (None, "0/2", "1/2"):
        store = tmp_path / f"{shard or 'all'}.h5".replace("/", "-")
        preprocess_run([str(archive / "dicom")], store, replace(settings, shard=shard), options,
                       report=lambda _: None)  # fmt: skip
        with open_store(store) as opened:
            names[shard] = sorted(str(p) for p in opened.subjects_table()["path"])
    assert sorted(names["0/2"] + names["1/2"]) == names[None]
    assert len(names[None]) == 5


def test_a_dicomdir_export_converts_each_series_once(tmp_path):
    """A CD-style export: a DICOMDIR index and the files in PT*/ST*/SE* folders."""
    from pydicom.fileset import FileSet

    data, affine = _anatomical()
    series = tmp_path / "series"
    write_series(series, data, affine, patient(7), description="cd")
    file_set = FileSet()
    for path in sorted(series.iterdir()):
        file_set.add(path)
    export = tmp_path / "cd"
    file_set.write(export)
    file_set._stage["t"].cleanup()  # pydicom's staging folder, else removed at exit, warning
    assert (export / "DICOMDIR").is_file()
    out = tmp_path / "s.h5"
    assert preprocess_main([str(export), "-o", str(out), "--size", "32", "--id-salt", SALT]) == 0
    slices = _slices_by_name(out)
    assert list(slices) == ["cd"]  # once, though the DICOMDIR lists every file again
    nib.save(nib.Nifti1Image(data, affine), _path(tmp_path / "n" / "cd.nii.gz"))
    preprocess_run([str(tmp_path / "n")], tmp_path / "n.h5", Settings(**SMALL),
                   RunOptions(workers=1), report=lambda _: None)  # fmt: skip
    expected = _slices_by_name(tmp_path / "n.h5")["cd"]
    assert np.abs(slices["cd"].astype(int) - expected.astype(int)).max() <= 1


def test_what_dicom_cannot_do_is_one_line(archive, tmp_path, capsys):
    out = tmp_path / "s.h5"
    masks = ["--masks", "lesion", "--id-salt", SALT]  # several kinds are paired by kind
    assert preprocess_main([str(archive / "dicom"), "-o", str(out), *masks]) == 2
    err = capsys.readouterr().err.strip()
    assert "--masks and --masks-suffix pair NIfTI files by name" in err
    assert len(err.splitlines()) == 1
    failing = tmp_path / "dcm2niix"  # a dcm2niix that fails on everything
    failing.write_text("#!/bin/sh\necho 'Error: Unable to open folder'\nexit 3\n")
    failing.chmod(0o755)
    folder = archive / "dicom" / "Doe_Jane2"
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(dicom, "dcm2niix_path", lambda: str(failing))
        inputs = [str(folder), str(archive / "nifti" / "axial.nii.gz")]
        assert preprocess_main([*inputs, "-o", str(out), "--id-salt", SALT]) == 1
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if "converted no series" in line]
    assert len(lines) == 2  # each of the patient's two series folders
    assert all("Unable to open folder" in line for line in lines)
    assert out.is_file()  # the NIfTI scan was written


def test_the_sourcedata_of_a_bids_tree_is_not_converted_again(tmp_path):
    data, affine = _anatomical()
    tree = tmp_path / "bids"
    nib.save(nib.Nifti1Image(data, affine), _path(tree / "sub-01" / "anat" / "sub-01_T1w.nii.gz"))
    (tree / "participants.tsv").write_text("participant_id\nsub-01\n")
    write_series(tree / "sourcedata" / "sub-01" / "t1", data, affine, patient(8))
    folders, rejected = dicom.find_folders([tree])
    assert folders == []
    assert rejected == []
    assert dicom.find_folders([tree / "sourcedata"])[0] != []  # given on its own, it is read


def test_an_interrupted_dicom_run_resumes_to_the_store_of_an_uninterrupted_one(
    archive, tmp_path, monkeypatch
):
    settings = Settings(series="axial|sagittal|oblique|third|fourth", **SMALL)
    target, clean = tmp_path / "resumed.h5", tmp_path / "clean.h5"
    added = []
    add = Partial.add

    def add_then_stop(self, *args, **kwargs):
        add(self, *args, **kwargs)
        added.append(1)
        if len(added) == 2:
            raise KeyboardInterrupt  # Ctrl-C after two series were written

    monkeypatch.setattr(Partial, "add", add_then_stop)
    with pytest.raises(KeyboardInterrupt):
        preprocess_run([str(archive / "dicom")], target, settings,
                       RunOptions(workers=1, id_salt=SALT), report=lambda _: None)  # fmt: skip
    monkeypatch.undo()
    assert not target.exists()
    assert partial_path(target).is_dir()
    summary = preprocess_run([str(archive / "dicom")], target, settings,
                             RunOptions(workers=1, id_salt=SALT, resume=True),
                             report=lambda _: None)  # fmt: skip
    assert summary.resumed == 2  # converted again, named alike: the two are not redone
    preprocess_run([str(archive / "dicom")], clean, settings,
                   RunOptions(workers=1, id_salt=SALT), report=lambda _: None)  # fmt: skip
    assert_same_store_content(target, clean)


def test_class_folders_of_dicom_series_label_their_scans(tmp_path):
    data, affine = _anatomical()
    tree = tmp_path / "classes"
    for number, group in enumerate(("AD", "AD", "CN", "CN")):
        write_series(tree / group / f"case{number}" / "t1", data, affine, patient(20 + number))
    guessed = tmp_path / "guessed.h5"  # folders of DICOM alone: patients, not classes
    assert preprocess_main([str(tree), "-o", str(guessed), "--size", "32", "--id-salt", SALT]) == 0
    with open_store(guessed) as store:
        assert store.class_names == []
    out = tmp_path / "s.h5"
    args = ["--size", "32", "--id-salt", SALT, "--layout", "classes"]
    assert preprocess_main([str(tree), "-o", str(out), *args]) == 0
    with open_store(out) as store:
        assert store.class_names == ["AD", "CN"]
        table = store.subjects_table()
        labels = [store.class_names[k] for k in table["label"]]
        by_subject = dict(zip((str(s) for s in table["id"]), labels, strict=True))
    for number, group in enumerate(("AD", "AD", "CN", "CN")):
        subject = dicom.keyed_hash(patient(20 + number)["PatientID"], SALT, 12)
        assert by_subject[subject] == group
    by_folder = tmp_path / "folders.h5"
    args += ["--dicom-subject", "folder"]
    assert preprocess_main([str(tree), "-o", str(by_folder), *args]) == 0
    with open_store(by_folder) as store:  # the folder below the class folder names them
        ids = {str(s) for s in store.subjects_table()["id"]}
    assert ids == {dicom.keyed_hash(f"case{number}", SALT, 12) for number in range(4)}
