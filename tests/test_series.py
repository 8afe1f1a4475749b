"""The DICOM series rule table: a series per rule, each vendor's naming, and the real
Philips exam in ../shared/real (its MPRAGE stored, its perfusion and field map notes)."""

from __future__ import annotations

import gzip
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from dicom_series import patient, write_report, write_series, write_volumes
from helpers import assert_same_store_content, blob_volume, read_rows
from make_heads import known_motion, moved_head, scanner_grid

from loader import open_store
from preprocess import series
from preprocess.cli import main as preprocess_main
from preprocess.dicom import keyed_hash
from preprocess.pipeline import run as preprocess_run
from preprocess.settings import RunOptions, Settings
from preprocess.writer import Partial, partial_path

REAL = Path(__file__).resolve().parents[2] / "shared" / "real"
EXAM = REAL / "dicom" / "philips-exam"


def _facts(volumes: int = 1, bvalues=(), **sidecar) -> dict:
    return series.series_facts(sidecar, volumes, bvalues)


# One series per row of series.RULES, in the table's order: the rule it must meet first.
ONE_PER_RULE = [
    _facts(ImageType=["ORIGINAL", "PRIMARY", "LOCALIZER"], SeriesDescription="t1"),
    _facts(SeriesDescription="AAHead_Scout_64ch-head-coil"),
    _facts(ImageType=["DERIVED", "SECONDARY", "MPR"], SeriesDescription="t1_mprage_tra"),
    _facts(ImageType=["ORIGINAL", "PRIMARY", "B0", "FIELDMAP"], SeriesDescription="x"),
    _facts(SeriesDescription="fcMRI Field Mapping", ImageType=["ORIGINAL", "PRIMARY", "P"]),
    _facts(volumes=13, bvalues=(0, 1000, 1000), SeriesDescription="series 7"),
    _facts(SeriesDescription="ep2d_diff_mddw_30"),
    _facts(SeriesDescription="M0_pcasl"),
    _facts(SeriesDescription="3DpCASL"),
    _facts(SeriesDescription="rs_fMRI_200"),
    _facts(volumes=120, ScanningSequence="EP", SeriesDescription="run 1"),
    _facts(SeriesDescription="Sag CUBE FLAIR"),
    _facts(InversionTime=2.5, EchoTime=0.1, RepetitionTime=9.0, SeriesDescription="ax 5"),
    _facts(SeriesDescription="t2_swi_tra_p2"),
    _facts(SeriesDescription="ADNI_Sag3D MPRAGE"),
    _facts(SeriesDescription="PD_tse_cor"),
    _facts(SeriesDescription="t2_tse_tra"),
    _facts(ScanningSequence="EP", EchoTime=0.06, RepetitionTime=6.1, SeriesDescription="AP"),
    _facts(InversionTime=0.9, EchoTime=0.003, RepetitionTime=2.3, SeriesDescription="sag 3d"),
    _facts(EchoTime=0.0023, RepetitionTime=2.3, FlipAngle=9, SeriesDescription="head"),
    _facts(ScanningSequence="SE", EchoTime=0.015, RepetitionTime=0.5, FlipAngle=90),
    _facts(ScanningSequence="SE", EchoTime=0.012, RepetitionTime=3.0, FlipAngle=90),
    _facts(ScanningSequence="SE", EchoTime=0.09, RepetitionTime=4.0, FlipAngle=90),
    _facts(ScanningSequence="GR", EchoTime=0.02, RepetitionTime=0.6, FlipAngle=40),
]


def test_the_examples_are_one_per_rule():
    assert len(ONE_PER_RULE) == len(series.RULES)


@pytest.mark.parametrize("index", range(len(series.RULES)))
def test_each_rule_decides_its_series(index):
    kind, rule = series.classify(ONE_PER_RULE[index])
    assert rule is series.RULES[index], (kind, rule)
    assert kind == series.RULES[index].kind
    assert kind in series.KINDS


@pytest.mark.parametrize(
    ("description", "kind"),
    [
        ("t1_mprage_sag_p2_iso", "T1w"),  # Siemens
        ("t1_mp2rage_sag_UNI-DEN", "T1w"),
        ("t2_space_sag_p2_iso", "T2w"),
        ("t2_spc_da-fl_sag_p2_iso", "FLAIR"),  # Siemens' 3-D FLAIR: 'darkfluid' abbreviated
        ("t2_flair_tra_p2", "FLAIR"),
        ("ep2d_bold_moco", "bold"),
        ("Sag IR-FSPGR BRAVO", "T1w"),  # GE
        ("Ax T2 FSE", "T2w"),
        ("Ax T2 FLAIR", "FLAIR"),
        ("Ax DWI 1000", "dwi"),
        ("3D ASL (non-contrast)", "asl"),
        ("Ax SWAN", "T2starw"),
        ("3-Plane Loc", "localizer"),
        ("sT1W_3D_TFE", "T1w"),  # Philips
        ("T2W_TSE", "T2w"),
        ("3D_Brain_VIEW_FLAIR_SAG", "FLAIR"),
        ("DTI_high_iso", "dwi"),
        ("Survey_32ch_HeadCoil", "localizer"),
        ("3D MPRAGE", "T1w"),  # Canon
        ("FFE T2* Hemo", "T2starw"),
        ("Head Scan", "unknown"),  # a name and no timing: nothing to go by
    ],
)
def test_every_vendors_naming(description, kind):
    assert series.classify(_facts(SeriesDescription=description))[0] == kind


def test_the_rule_table_lists_every_rule_in_order():
    table = series.rules_table().splitlines()
    assert len(table) == 2 + len(series.RULES)
    assert table[2].startswith("| 1 | `localizer` | ImageType has LOCALIZER")


def _real_exam():
    if not EXAM.is_dir():
        pytest.skip(f"needs the real Philips exam in {EXAM} (present on developer machines and CI)")
    return EXAM


def test_the_real_philips_exam_stores_its_mprage_alone_with_a_note_per_other_series(
    tmp_path, capsys
):
    exam = _real_exam()
    store = tmp_path / "exam.h5"
    assert preprocess_main([str(exam), "-o", str(store), "--id-salt", "K", "--workers", "1"]) == 0
    err = capsys.readouterr().err
    assert "rejected" not in err
    notes = [line for line in err.splitlines() if line.startswith("note: ")]
    assert any("series 1901 '3DpCASL': skipped: asl" in line for line in notes), err
    assert any("series 2001 'fcMRI Field Mapping': skipped: fmap" in line for line in notes), err
    assert len(notes) == 2, notes
    with open_store(store) as opened:
        paths = list(opened.subjects_table()["path"])
    assert len(paths) == 1
    assert paths[0].endswith("/1301-ADNI-Sag3D-MPRAGE")


def test_the_preprocess_guide_has_the_rule_table():
    guide = Path(__file__).resolve().parents[1] / "preprocess" / "README.md"
    assert series.rules_table() in guide.read_text()


def test_list_series_classifies_the_real_exam_and_writes_nothing_but_its_csv(tmp_path, capsys):
    exam = _real_exam()
    listing = tmp_path / "series.csv"
    args = [str(exam), "--list-series", str(listing), "--id-salt", "K"]
    assert preprocess_main(args) == 0
    out = capsys.readouterr().out
    assert "3 DICOM series, 1 would be stored" in out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["series.csv"]
    rows = {row["series"]: row for row in read_rows(listing)}
    assert {number: row["kind"] for number, row in rows.items()} == {
        "1301": "T1w",
        "1901": "asl",
        "2001": "fmap",
    }
    assert rows["1301"]["stored"] == "yes"
    assert rows["1301"]["dimensions"] == "170x256x256"
    assert rows["1901"]["stored"] == "no"
    assert "only --suffix T1w is stored" in rows["1901"]["why_not"]
    assert "d2n_Philips" not in listing.read_text()  # the patient's id, hashed
    assert len({row["subject"] for row in rows.values()}) == 1


def test_list_series_without_a_secret_hashes_subjects_with_a_one_off_one(
    tmp_path, capsys, monkeypatch
):
    """Listing writes nothing, so it needs no --id-salt: series of one patient still share
    a subject, no PatientID is printed, and a line says how to get the store's ids."""
    monkeypatch.delenv("SLICESTORE_ID_SALT", raising=False)
    data, affine = blob_volume(1), np.diag([2.0, 2.0, 2.0, 1.0])
    exam = tmp_path / "exam"
    for number, who in enumerate([patient(33), patient(33), patient(34)]):
        write_series(exam / f"p{number}", data, affine, who, number=3 + number)
    listings = []
    for _ in range(2):
        listing = tmp_path / "l.csv"
        assert preprocess_main([str(exam), "--list-series", str(listing)]) == 0
        out = capsys.readouterr().out
        assert out.strip().endswith(
            "give --id-salt SECRET (or set SLICESTORE_ID_SALT) for the ids a store gets"
        )
        assert patient(33)["PatientID"] not in out + listing.read_text()
        listings.append([row["subject"] for row in read_rows(listing)])
    for subjects in listings:
        assert subjects[0] == subjects[1] != subjects[2]
    assert listings[0][0] != listings[1][0]  # one-off: not the ids of any store
    assert preprocess_main([str(exam), "--list-series", "--id-salt", "K"]) == 0
    assert "one-off" not in capsys.readouterr().out


def test_a_synthetic_exam_stores_the_asked_kind_and_lists_the_rest(tmp_path, capsys):
    data, affine = blob_volume(1), np.diag([2.0, 2.0, 2.0, 1.0])
    exam, who = tmp_path / "exam", patient(30)
    study = write_series(exam / "t1", data, affine, who, number=3, description="Sag IR-FSPGR BRAVO")
    write_series(exam / "flair", data, affine, who, study, 4, "Ax T2 FLAIR")
    write_series(exam / "loc", data[:, :, :4], affine, who, study, 1, "3-Plane Loc")
    write_series(exam / "what", data, affine, who, study, 9, "cor", image_type=("ORIGINAL",))
    listing = tmp_path / "l.csv"
    assert preprocess_main([str(exam), "--list-series", str(listing), "--id-salt", "K"]) == 0
    kinds = {row["series"]: (row["kind"], row["stored"]) for row in read_rows(listing)}
    assert kinds == {
        "1": ("localizer", "no"),
        "3": ("T1w", "yes"),
        "4": ("FLAIR", "no"),
        "9": ("T1w", "yes"),  # no name to go by: its timing (TE 2.3 ms, flip 9°) is a T1w's
    }
    capsys.readouterr()
    assert preprocess_main([str(exam), "--id-salt", "K"]) == 2  # no store named, no listing
    assert "error: -o/--output STORE.h5 is required" in capsys.readouterr().err
    store = tmp_path / "s.h5"
    args = [str(exam), "-o", str(store), "--id-salt", "K", "--suffix", "FLAIR", "--workers", "1"]
    assert preprocess_main(args) == 0
    err = capsys.readouterr().err
    assert "series 3 'Sag IR-FSPGR BRAVO': skipped: T1w" in err
    with open_store(store) as opened:
        paths = list(opened.subjects_table()["path"])
    assert len(paths) == 1
    assert paths[0].endswith("004-Ax-T2-FLAIR")


def test_an_exam_without_the_kind_asked_for_is_listed_and_its_run_says_why(tmp_path, capsys):
    """An exam of FLAIR series only (as dcm_qa_canon_61's diffusion-only exports): the
    listing that says why nothing would be stored works, and the run's error counts kinds."""
    data, affine = blob_volume(1), np.diag([2.0, 2.0, 2.0, 1.0])
    exam, who = tmp_path / "exam", patient(31)
    study = write_series(exam / "a", data, affine, who, number=3, description="Ax T2 FLAIR")
    write_series(exam / "b", data, affine, who, study, 4, "Sag T2 FLAIR")
    assert preprocess_main([str(exam), "--list-series", "--id-salt", "K"]) == 0
    out = capsys.readouterr().out
    assert "2 DICOM series, 0 would be stored" in out
    assert out.count("only --suffix T1w is stored") == 2
    store = tmp_path / "s.h5"
    assert preprocess_main([str(exam), "-o", str(store), "--id-salt", "K"]) == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error == (
        f"error: no scans found in {exam}: 2 DICOM series (2 FLAIR), none stored with "
        "--suffix T1w (each is a note above; --list-series lists them)"
    )
    assert not store.exists()


def test_gzipped_dicom_is_named_as_such(tmp_path, capsys):
    data, affine = blob_volume(1), np.diag([2.0, 2.0, 2.0, 1.0])
    write_series(tmp_path / "exam", data, affine, patient(32), number=3)
    for path in sorted((tmp_path / "exam").iterdir()):
        path.with_name(path.name + ".gz").write_bytes(gzip.compress(path.read_bytes()))
        path.unlink()
    first = sorted((tmp_path / "exam").iterdir())[0]
    assert preprocess_main([str(tmp_path / "exam"), "-o", str(tmp_path / "s.h5")]) == 2
    assert (
        capsys.readouterr()
        .err.strip()
        .endswith(
            f"none NIfTI, MGZ, Analyze or DICOM (such as {first}; it is gzipped DICOM: gunzip "
            "the files first)"
        )
    )


def test_t1_and_flair_of_an_exam_become_channels_a_repeat_is_chosen_a_gap_rejected(
    tmp_path, capsys
):
    """Two patients with a T1, a FLAIR and a localizer (the second's FLAIR repeated), and
    a third without a FLAIR: a two-channel store of the first two."""
    data, affine = blob_volume(2), np.diag([2.0, 2.0, 2.0, 1.0])
    flair = np.where(data > 0, 150.0 - data, 0.0)  # another contrast of the same head
    exam = tmp_path / "exams"
    for number in (40, 41, 42):
        who, folder = patient(number), exam / f"p{number}"
        study = write_series(folder / "t1", data, affine, who, number=2, description="t1_mprage")
        write_series(folder / "loc", data[:, :, :4], affine, who, study, 1, "localizer")
        if number != 42:
            write_series(folder / "flair", flair, affine, who, study, 5, "t2_flair_tra")
        if number == 41:
            write_series(folder / "again", flair, affine, who, study, 7, "t2_flair_tra_rpt")
    store = tmp_path / "s.h5"
    args = [str(exam), "-o", str(store), "--suffix", "T1w", "FLAIR", "--id-salt", "K"]
    assert preprocess_main([*args, "--workers", "1", "--size", "32"]) == 1  # the third: rejected
    err = capsys.readouterr().err
    rejected = [line for line in err.splitlines() if line.startswith("rejected: ")]
    assert len(rejected) == 1
    assert "no FLAIR series in this session (--suffix T1w FLAIR" in rejected[0]
    assert "p42" in rejected[0]
    taken = [line for line in err.splitlines() if "taken as the session's FLAIR" in line]
    assert len(taken) == 1
    assert "series 7 't2_flair_tra_rpt'" in taken[0]
    assert "also FLAIR, left out: series 5 't2_flair_tra'" in taken[0]
    with open_store(store) as opened:
        assert opened.num_channels == 2
        assert len(opened.subjects_table()["path"]) == 2
        images = opened.images[:64]  # the first chunk is plenty
    t1, second = images[..., 0].astype(float), images[..., 1].astype(float)
    inside = t1 > 0
    assert np.corrcoef(t1[inside], second[inside])[0, 1] < 0  # FLAIR is the inverted blob


def _exams(root: Path) -> None:
    """Two patients' folders as exports make them. p60: a T1, a FLAIR, a diffusion series
    and an fMRI series (4-D, named for neither: the b-values and the echo-planar volumes
    tell), a series of no known kind, a protocol report (no image), and a FLAIR of another
    patient misfiled among them. p62: two visits (studies)."""
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    for number, seed in ((60, 3), (62, 4)):
        data = blob_volume(seed)
        flair = np.where(data > 0, 150.0 - data, 0.0)
        who, folder = patient(number), root / f"p{number}"
        for visit in range((number == 62) + 1):
            study = write_series(folder / f"t1_{visit}", data, affine, who, number=2,
                                 description="t1_mprage")  # fmt: skip
            write_series(folder / f"flair_{visit}", flair, affine, who, study, 5, "t2_flair_tra")
        if number == 60:
            small = np.stack([data[::2, ::2, ::3]] * 4, axis=-1)
            write_volumes(folder / "dwi", small, affine, who, study, 8, "Axial 3dir",
                          bvalues=(0, 1000, 1000, 1000))  # fmt: skip
            write_volumes(folder / "epi", np.concatenate([small] * 3, axis=-1), affine, who,
                          study, 9, "Axial EPI", timing=(30.0, 2000.0))  # fmt: skip
            write_series(folder / "other", flair, affine, patient(61), None, 5, "t2_flair_tra")
            write_report(folder / "report" / "SR0001", who, study)
            write_series(folder / "odd", data, affine, who, study, 11, "Head 7",
                         timing=(40.0, 1200.0, 90.0))  # fmt: skip


def test_an_exams_diffusion_and_fmri_are_notes_and_misfiled_or_repeated_exams_are_named(
    tmp_path, capsys
):
    exams = tmp_path / "exams"
    _exams(exams)
    store = tmp_path / "s.h5"
    args = [str(exams), "--suffix", "T1w", "FLAIR", "--id-salt", "K", "--size", "32"]
    assert preprocess_main([*args, "-o", str(store), "--workers", "1"]) == 1
    err = capsys.readouterr().err
    notes = [line for line in err.splitlines() if line.startswith("note: ")]
    assert f"note: {exams}/p62: 2 exams (studies) of one patient: each is a session" in notes
    assert any("series 8 'Axial 3dir': skipped: dwi, diffusion" in line for line in notes)
    assert any("series 9 'Axial EPI': skipped: bold" in line for line in notes)
    assert f"note: {exams}/p60/report: skipped: its DICOM files hold no image" in "\n".join(notes)
    assert any("series 11 'Head 7': skipped: unknown, its names and timing" in n for n in notes)
    misfiled = [line for line in notes if "/p60/other: series 5" in line]
    assert len(misfiled) == 1
    assert f"of another patient than the other 5 series of {exams}/p60" in misfiled[0]
    rejected = [line for line in err.splitlines() if line.startswith("rejected: ")]
    assert len(rejected) == 1  # the misfiled patient has no T1w: named as a missing kind
    assert "p60/other" in rejected[0]
    assert "no T1w series in this session" in rejected[0]
    with open_store(store) as opened:
        assert opened.num_channels == 2
        table = opened.subjects_table()
    sessions = {}
    for subject, session in zip(table["id"], table["session"], strict=True):
        sessions.setdefault(str(subject), set()).add(str(session))
    assert sorted(len(found) for found in sessions.values()) == [1, 2]  # p60, p62's two visits

    # subjects named by folder: the misfiled series would join p60, so it is rejected
    capsys.readouterr()
    args += ["-o", str(tmp_path / "f.h5"), "--workers", "1", "--dicom-subject", "folder"]
    assert preprocess_main(args) == 1
    rejected = [line for line in capsys.readouterr().err.splitlines() if "rejected: " in line]
    assert len(rejected) == 1
    assert "p60/other: series 5 't2_flair_tra': a series of another patient" in rejected[0]
    with open_store(tmp_path / "f.h5") as opened:
        ids = set(opened.subjects_table()["id"])
    assert ids == {keyed_hash("p60", "K", 12), keyed_hash("p62", "K", 12)}


def test_an_exams_channels_shard_and_resume_as_the_whole_run(tmp_path, monkeypatch):
    exams = tmp_path / "exams"
    _exams(exams)
    settings = Settings(suffix=("T1w", "FLAIR"), size=32, val_fraction=0.25)
    options = RunOptions(workers=1, id_salt="K")
    quiet = {"report": lambda _: None}
    clean = tmp_path / "clean.h5"
    preprocess_run([str(exams)], clean, settings, options, **quiet)
    names = {}
    for shard in ("0/2", "1/2"):
        store = tmp_path / f"shard{shard[0]}.h5"
        preprocess_run([str(exams)], store, replace(settings, shard=shard), options, **quiet)
        with open_store(store) as opened:
            assert opened.num_channels == 2
            names[shard] = [str(path) for path in opened.subjects_table()["path"]]
    with open_store(clean) as opened:
        assert sorted(names["0/2"] + names["1/2"]) == sorted(
            map(str, opened.subjects_table()["path"])
        )

    target, add = tmp_path / "resumed.h5", Partial.add

    def add_then_stop(self, *args, **kwargs):
        add(self, *args, **kwargs)
        raise KeyboardInterrupt  # Ctrl-C after the first session was written

    monkeypatch.setattr(Partial, "add", add_then_stop)
    with pytest.raises(KeyboardInterrupt):
        preprocess_run([str(exams)], target, settings, options, **quiet)
    monkeypatch.undo()
    assert partial_path(target).is_dir()
    summary = preprocess_run([str(exams)], target, settings, replace(options, resume=True), **quiet)
    assert summary.resumed == 1
    assert_same_store_content(target, clean)


def test_an_exams_t1_and_flair_go_to_standard_space_together(tmp_path):
    rng = np.random.default_rng(5)
    shape = (96, 120, 110)  # the whole head in the field of view
    affine = scanner_grid(shape, (2.0, 2.0, 2.0), "LPS")
    t1 = np.clip(moved_head(known_motion(rng), affine, shape, rng), 0, 32000).astype(np.int16)
    flair = (np.sqrt(t1.astype(float)) * 100).astype(np.int16)  # the same head, other contrast
    who, exam = patient(70), tmp_path / "exam"
    study = write_series(exam / "t1", t1, affine, who, number=2, description="t1_mprage")
    write_series(exam / "flair", flair, affine, who, study, 3, "t2_flair_tra")
    store = tmp_path / "s.h5"
    settings = Settings(suffix=("T1w", "FLAIR"), space="mni", size=32, val_fraction=0.25)
    preprocess_run([str(exam)], store, settings, RunOptions(workers=1, id_salt="K"),
                   report=lambda _: None)  # fmt: skip
    with open_store(store) as opened:
        assert opened.num_channels == 2
        assert opened.subjects_table()["similarity"][0] > 0.8  # the T1w was registered
        images = np.asarray(opened.images[:64], dtype=float)  # the first chunk
    first, second = images[..., 0], images[..., 1]
    assert np.abs(first - second).max() > 20  # two contrasts, not one channel twice
    # the FLAIR channel went through the T1's transform: the same anatomy, voxel for voxel
    assert np.corrcoef(first.ravel(), second.ravel())[0, 1] > 0.9
