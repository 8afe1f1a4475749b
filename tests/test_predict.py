"""Predicting new scans: the same preprocessing code, the same answers as evaluation, and
segmentations back on each scan's own grid."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from dicom_series import patient, write_series
from helpers import MNI_SETTINGS, NIBABEL_DATA, blob_volume, lesion_mask, read_rows, write_nifti
from make_phantoms import write_bids

from loader import open_store, schema
from preprocess.cli import main as preprocess_main
from preprocess.dicom import keyed_hash
from preprocess.settings import Settings as PreprocessSettings
from preprocess.slices import label_slices, unslice
from training import predict, train
from training.cli import main as training_main
from training.inference import on_scan_grid, preprocess_settings

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def classification_run(small_phantom_store, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("run") / "run"
    train(small_phantom_store, run_dir, epochs=1, batch_size=64, progress=False)
    return run_dir


def test_predicting_the_stores_own_scans_gives_the_runs_own_answers(
    classification_run, phantom_bids, tmp_path
):
    out = tmp_path / "out"
    result = predict(classification_run, [phantom_bids], out, workers=2, report=lambda _: None)
    own = {row["subject"]: row for row in read_rows(classification_run / "predictions.csv")}
    mine = {row["subject"]: row for row in read_rows(out / "predictions.csv")}
    assert own  # val and test subjects
    for subject, row in own.items():
        assert mine[subject]["split"] == row["split"]
        assert mine[subject]["predicted"] == row["predicted"]
        assert float(mine[subject]["probability"]) == pytest.approx(
            float(row["probability"]), abs=2e-4
        )
        assert int(mine[subject]["slices"]) == int(row["slices"])
        assert mine[subject]["true"] == row["true"]  # from the tree's participants.tsv
    # every scan was in the training store: each is flagged, with its split
    scans = read_rows(out / "scans.csv")
    assert len(scans) == len(result.scans) == 16
    assert all(row["seen_in_training"] in ("train", "val", "test") for row in scans)
    assert len(result.seen) == 16
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["scores"]["subjects"]["count"] == 12


def test_a_regression_run_predicts_its_validation_subjects_as_it_scored_them(tmp_path):
    write_bids(tmp_path / "bids", subjects=10, seed=2, voxel_sizes=((4.0, 4.0, 4.0),))
    store = tmp_path / "s.h5"
    args = [str(tmp_path / "bids"), "-o", str(store), "--size", "32", "--workers", "1"]
    assert preprocess_main([*args, "--label-column", "group", "--val-fraction", "0.4"]) == 0
    run_dir = tmp_path / "run"
    train(store, run_dir, target="age", epochs=1, batch_size=32, progress=False)
    predict(run_dir, [tmp_path / "bids"], tmp_path / "out", workers=1, report=lambda _: None)
    mine = {row["subject"]: row for row in read_rows(tmp_path / "out" / "predictions.csv")}
    for row in read_rows(run_dir / "predictions.csv"):
        assert float(mine[row["subject"]]["predicted"]) == pytest.approx(
            float(row["predicted"]), rel=1e-3
        )
        assert float(mine[row["subject"]]["true"]) == float(row["true"])


def test_slices_put_back_on_the_volume_cover_what_was_cut(tmp_path):
    # any grid: anisotropic voxels, not square slices
    mask = (blob_volume(4, shape=(60, 44, 30)) > 50).astype(np.uint8)
    voxel_size = np.array([1.0, 1.5, 3.0])
    for axis in ("axial", "coronal", "sagittal"):
        along = {"sagittal": 0, "coronal": 1, "axial": 2}[axis]
        positions = np.flatnonzero(mask.any(axis=tuple(a for a in range(3) if a != along)))
        cut = label_slices(mask, positions.astype(np.int16), voxel_size, axis, 64)
        maps = np.stack([cut == 0, cut == 1], -1).astype(np.float32)
        back = unslice(maps, positions, mask.shape, voxel_size, axis, np.array([1.0, 0.0]))
        found = back.argmax(-1) == 1
        dice = 2 * (found & (mask == 1)).sum() / (found.sum() + mask.sum())
        assert dice > 0.9, axis


def test_standard_space_maps_go_back_onto_the_scans_own_grid(study):
    """The lesion masks of a --space mni store, as a perfect model would give them, land on
    the lesion drawn on each scan's own grid (three grids of other voxel orders and sizes)."""
    _, truths, store = study
    settings = PreprocessSettings(**MNI_SETTINGS)
    with open_store(store) as opened:
        table = opened.subjects_table()
        subjects, planes, masks = opened.subject[()], opened.slice_index[()], opened.masks[()]
    for scan, subject in enumerate(table[schema.SUBJECT_ID]):
        rows = np.flatnonzero(subjects == scan)
        rows = rows[np.argsort(planes[rows])]
        record = {
            "positions": planes[rows],
            "shape": table[schema.SHAPE][scan],
            "affine": table[schema.AFFINE][scan],
            "voxel_size": table[schema.VOXEL_SIZE][scan],
            "to_template": table[schema.TO_TEMPLATE][scan],
        }
        maps = np.stack([masks[rows] == 0, masks[rows] == 1], -1).astype(np.float32)
        found = on_scan_grid(maps, record, settings).argmax(-1) == 1
        shape = tuple(record["shape"])
        lesion = lesion_mask(np.asarray(record["affine"]), shape, truths[subject]) == 1
        assert 2 * (found & lesion).sum() / (found.sum() + lesion.sum()) > 0.7, subject


def test_what_cannot_be_predicted_is_one_line_and_writes_nothing(
    classification_run, phantom_bids, tmp_path, capsys
):
    def run(*args) -> tuple[int, str]:
        status = training_main(["predict", *map(str, args)])
        return status, capsys.readouterr().err

    out = tmp_path / "out"
    status, err = run(tmp_path, phantom_bids, "-o", out)
    assert (status, err) == (2, f"error: {tmp_path}: not a run folder (no config.json)\n")
    bad = tmp_path / "bad"
    bad.mkdir()
    write_nifti(bad / "flat.nii.gz", np.zeros((20, 20, 20)))
    status, err = run(classification_run, bad, "-o", out)
    assert status == 2
    assert err.splitlines()[-1] == "error: no usable scans: all 1 were rejected; nothing written"
    labels = tmp_path / "labels.tsv"
    labels.write_text("participant_id\tgroup\nsub-99\tcontrol\n")
    status, err = run(classification_run, phantom_bids, "-o", out, "--labels", labels)
    assert status == 2
    assert err.splitlines()[-1].startswith(f"error: {labels}: no subject of the scans has a value")
    assert "Traceback" not in err
    assert not out.exists()
    assert not out.with_name("out.partial").exists()
    out.mkdir()
    status, err = run(classification_run, phantom_bids, "-o", out)
    assert (status, err) == (2, f"error: {out}: exists; use --overwrite to replace it\n")


def test_a_run_trained_on_tensorflow_predicts_on_jax(classification_run, phantom_bids, tmp_path):
    out = tmp_path / "on_jax"
    command = [sys.executable, "-m", "training", "predict", str(classification_run)]
    command += [str(phantom_bids), "-o", str(out), "--workers", "1"]
    env = {**os.environ, "KERAS_BACKEND": "jax", "JAX_PLATFORMS": "cpu"}
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    on_jax = {row["subject"]: row for row in read_rows(out / "predictions.csv")}
    for row in read_rows(classification_run / "predictions.csv"):
        assert on_jax[row["subject"]]["predicted"] == row["predicted"]
        assert float(on_jax[row["subject"]]["probability"]) == pytest.approx(
            float(row["probability"]), abs=1e-3
        )


def test_a_dicom_series_is_predicted_as_the_nifti_it_came_from(classification_run, tmp_path):
    image = nib.load(NIBABEL_DATA / "anatomical.nii")
    data, affine = np.asarray(image.dataobj, dtype=np.int16), image.affine
    folder = tmp_path / "new"
    write_nifti(folder / "nifti" / "scan.nii.gz", data, affine)
    write_series(folder / "dicom" / "scan", data, affine, patient(6), description="scan")
    out = tmp_path / "predicted"
    result = predict(classification_run, [folder / "nifti", folder / "dicom"], out,
                     id_salt="secret", report=lambda _: None)  # fmt: skip
    rows = {row["path"].rsplit("/", 1)[-1]: row for row in result.scans}
    assert sorted(rows) == ["scan.nii.gz", "scan: series 3 'scan'"]
    nifti, from_dicom = rows["scan.nii.gz"], rows["scan: series 3 'scan'"]
    assert from_dicom["subject"] == keyed_hash(patient(6)["PatientID"], "secret", 12)
    assert float(from_dicom["probability"]) == pytest.approx(float(nifti["probability"]), abs=1e-4)


def test_a_standard_space_prediction_says_how_each_scan_registered(
    study, tmp_path, monkeypatch, capsys
):
    """scans.csv gives each scan's registration similarity, the number its store would hold,
    and a scan below the check floor gets preprocess's `check registration` line."""
    root, _, store = study
    run_dir = tmp_path / "run"
    train(store, run_dir, epochs=1, batch_size=64, progress=False, report=lambda _: None)
    head = sorted((root / "bids").glob("sub-01/anat/*_T1w.nii.gz"))
    lines = []
    result = predict(run_dir, head, tmp_path / "out", workers=1, report=lines.append)
    with open_store(store) as opened:
        table = opened.subjects_table()
    stored = float(table[schema.SIMILARITY][list(table[schema.SUBJECT_ID]).index("01")])
    (row,) = read_rows(tmp_path / "out" / "scans.csv")
    assert float(row["similarity"]) == pytest.approx(stored, abs=1e-4)
    assert stored > 0.6  # a head moved by a known map: no check
    assert result.check == []
    assert not [line for line in lines if line.startswith("check registration")]
    monkeypatch.setattr("training.inference.CHECK_FLOOR", 0.99)  # the same head, judged poor
    capsys.readouterr()
    command = ["predict", str(run_dir), str(head[0]), "-o", str(tmp_path / "cli"), "--workers", "1"]
    assert training_main(command) == 0  # a scan to check is predicted: not a rejection
    out, err = capsys.readouterr()
    assert f"check registration: {head[0]} (similarity {stored:.2f})" in err.splitlines()
    # the count is len(Prediction.check)
    assert out.splitlines()[0].endswith("0 rejected, 1 seen in training, 1 to check (registration)")


def test_a_standard_space_store_from_before_the_head_template_predicts_on_its_own_grid():
    """Stores written before 2026-12 name no template in their config: their runs cut new
    scans from the 2009a grid they were trained on; native-space stores need none."""
    old = {"space": "mni", "axis": "axial", "size": 64, "suffix": ["T1w"]}
    assert preprocess_settings(old).template == "MNI152NLin2009aSym"
    assert preprocess_settings({**old, "template": "MNI152NLin6Asym"}).template == "MNI152NLin6Asym"
    native = preprocess_settings({"space": "native", "template": None, "size": 64})
    assert native.template == PreprocessSettings().template


def test_a_run_on_an_exams_t1_and_flair_predicts_exam_folders_with_both(tmp_path):
    """A run trained on the T1w and FLAIR series of exams (class folders) predicts the same
    exam folders: predict takes the kinds its store took, paired as channels."""
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    exams = tmp_path / "exams"
    for number in range(6):
        data = blob_volume(number, (32, 32, 24))
        who, folder = patient(80 + number), exams / ("AD" if number % 2 else "CN") / f"p{number}"
        study = write_series(folder / "t1", data, affine, who, number=2, description="t1_mprage")
        flair = np.where(data > 0, 150.0 - data, 0.0)
        write_series(folder / "flair", flair, affine, who, study, 4, "Ax T2 FLAIR")
        write_series(folder / "loc", data[:, :, :3], affine, who, study, 1, "localizer")
    store = tmp_path / "s.h5"
    args = [str(exams), "-o", str(store), "--suffix", "T1w", "FLAIR", "--layout", "classes"]
    assert preprocess_main([*args, "--id-salt", "K", "--size", "32", "--val-fraction", "0.34"]) == 0
    run_dir = tmp_path / "run"
    train(store, run_dir, epochs=1, batch_size=32, progress=False)
    out = tmp_path / "out"
    result = predict(run_dir, [exams], out, workers=1, id_salt="K", report=lambda _: None)
    assert len(result.scans) == 6  # one per exam: its T1w and FLAIR, the localizer left out
    mine = {row["subject"]: row for row in read_rows(out / "predictions.csv")}
    own = read_rows(run_dir / "predictions.csv")
    assert own
    for row in own:
        assert float(mine[row["subject"]]["probability"]) == pytest.approx(
            float(row["probability"]), abs=2e-4
        )
        assert int(mine[row["subject"]]["slices"]) == int(row["slices"])
