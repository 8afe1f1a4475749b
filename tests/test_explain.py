"""What a model looked at: occlusion maps land where the answer is, per subject and per group,
for classification and regression; the maps on the template's grid in standard space."""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from helpers import read_rows

from loader import open_store
from preprocess.settings import Settings
from preprocess.standard import load_template
from preprocess.writer import Partial, scan_record
from training import train
from training.cli import main as training_main
from training.explain import explain
from training.explain_folder import _save_on_template
from training.occlusion import occlusion_maps

SIZE = 32
BLOB = (slice(4, 12), slice(20, 28))  # rows, columns of the only region that carries the answer
SUBJECTS = 32
SLICES = 8


def _blob_store(path: Path, seed: int = 0) -> Path:
    """A store where only a bright square at ``BLOB`` carries the answer: its brightness is
    the subject's ``dose`` (0 to 1), and class ``b`` means a dose above one half; the rest
    of each slice is smooth random texture, the same for both classes."""
    settings = Settings(size=SIZE, dtype="float32", normalize="none", val_fraction=0.25, seed=seed)
    partial = Partial(path, {**asdict(settings), "inputs": []})
    rng = np.random.default_rng(seed)
    participants = {}
    for scan in range(SUBJECTS):
        dose = (scan % 8 + rng.uniform(0.1, 0.9)) / 8
        texture = rng.normal(0.4, 0.15, (SLICES, SIZE // 4, SIZE // 4))
        slices = np.kron(texture, np.ones((4, 4))) + rng.normal(0, 0.03, (SLICES, SIZE, SIZE))
        slices[:, BLOB[0], BLOB[1]] += dose
        subject = f"{scan:02d}"
        label = "b" if dose > 0.5 else "a"
        participants[subject] = {"group": label, "dose": f"{dose:.4f}"}
        record = scan_record(f"s{subject}.nii", subject, range(10, 10 + SLICES), label=label)
        partial.add(record, slices.astype(np.float32))
    partial.finalize(["a", "b"], participants=participants)
    return path


@pytest.fixture(scope="module")
def blob_runs(tmp_path_factory):
    """The blob store, a classification run on its classes and a regression run on dose."""
    root = tmp_path_factory.mktemp("blobs")
    store = _blob_store(root / "blobs.h5")
    common = dict(epochs=8, batch_size=32, progress=False, seed=1, learning_rate=3e-3)
    train(store, root / "group", **common)
    train(store, root / "dose", target="dose", **common)
    return store, root / "group", root / "dose"


def _mass_in_blob(maps: np.ndarray) -> float:
    """The share of a map's positive mass inside the blob grown by half a patch."""
    positive = np.clip(maps, 0, None)
    inside = np.zeros(maps.shape[1:], bool)
    inside[BLOB[0].start - 2 : BLOB[0].stop + 2, BLOB[1].start - 2 : BLOB[1].stop + 2] = True
    return float(positive[:, inside].sum() / positive.sum())


def test_occlusion_finds_the_pixels_a_known_score_reads():
    weights = np.zeros((16, 16), np.float32)
    weights[5:9, 10:14] = 1.0  # the score reads these 16 pixels and nothing else

    def score(x):
        value = (x[..., 0] * weights).sum(axis=(1, 2))
        return np.stack([value, -value], axis=1)

    images = np.random.default_rng(0).uniform(0.0, 0.5, (3, 16, 16, 1)).astype(np.float32)
    images[:, 5:9, 10:14] = 1.0  # brighter than the slice's mean, which hides them
    maps = occlusion_maps(score, images, np.array([0, 0, 1]), patch=4, stride=2)
    assert maps.shape == (3, 16, 16)
    assert maps.dtype == np.float32
    near = np.zeros((16, 16), bool)
    near[2:12, 8:16] = True  # the patches (starts 0, 2, .., 12) that hide a read pixel
    assert np.abs(maps[:, ~near]).max() == 0
    assert maps[:2, 5:9, 10:14].min() > 0  # hiding them lowers the score
    assert maps[2, 5:9, 10:14].max() < 0  # column 1 is the negated score: the sign follows


def test_a_classifier_looks_at_the_blob_and_the_maps_are_kept_per_slice(blob_runs, tmp_path):
    store, group_run, _ = blob_runs
    assert json.loads((group_run / "metrics.json").read_text())["splits"]["val"]["subjects"][
        "accuracy"
    ] >= 0.75  # fmt: skip
    out = tmp_path / "explained"
    result = explain(group_run, out, patch=4, progress=False)
    with open_store(store) as opened:
        val = {str(s) for s in opened.subjects_table()["id"][opened.scans_in(["val"])]}
    assert {row["subject"] for row in result.subjects} == val
    shares = []
    for row in result.subjects:
        maps = np.load(out / "maps" / f"{row['subject']}.npy")
        assert maps.shape == (SLICES, SIZE, SIZE)
        assert maps.dtype == np.float32
        assert (int(row["first_slice"]), int(row["last_slice"])) == (10, 10 + SLICES - 1)
        assert (out / "pictures" / f"{row['subject']}.png").is_file()
        if row["explained"] == "b":  # the blob is the evidence for b
            shares.append(_mass_in_blob(maps))
    assert shares
    assert min(shares) > 0.6, shares
    summary = json.loads((out / "explain.json").read_text())
    assert summary["method"] == "occlusion"
    assert summary["approximate"] is True
    assert set(result.groups) <= {"a", "b"}
    assert (out / "groups.png").is_file()
    positions = np.load(out / "average" / "slices.npy")
    assert positions.tolist() == list(range(10, 10 + SLICES))
    average = np.load(out / "average" / "b.npy")
    assert average.shape == (SLICES, SIZE, SIZE)
    assert _mass_in_blob(average) > 0.6


def test_a_regression_on_dose_looks_at_the_blob_and_groups_by_thirds(blob_runs, tmp_path, capsys):
    _, _, dose_run = blob_runs
    out = tmp_path / "explained"
    args = [str(dose_run), "-o", str(out), "--patch", "4", "--subjects", "sub-01", "02", "03"]
    args += ["--split", "train"]
    with open_store(blob_runs[0]) as store:
        table = store.subjects_table()
        train_ids = sorted(str(s) for s in table["id"][store.scans_in(["train"])])[:3]
    args[args.index("--subjects") + 1 : args.index("--split")] = train_ids
    assert training_main(["explain", *args]) == 0
    assert "maps of 3 subjects" in capsys.readouterr().out
    rows = {row["subject"]: row for row in read_rows(out / "subjects.csv")}
    assert sorted(rows) == train_ids
    for subject, row in rows.items():
        assert row["explained"] == "value"
        assert row["true"] != ""
        maps = np.load(out / "maps" / f"{subject}.npy")
        assert _mass_in_blob(maps) > 0.6
    groups = json.loads((out / "explain.json").read_text())["groups"]
    assert len(groups) == 3
    assert all(name.startswith("dose ") for name in groups)


def test_what_cannot_be_explained_is_one_line_and_writes_nothing(blob_runs, tmp_path, capsys):
    _, group_run, _ = blob_runs
    no_model = tmp_path / "no-model"
    shutil.copytree(group_run, no_model)
    (no_model / "model.keras").unlink()
    segmentation = tmp_path / "segmentation"
    shutil.copytree(group_run, segmentation)
    config = json.loads((segmentation / "config.json").read_text())
    config["target"]["task"] = "segmentation"
    (segmentation / "config.json").write_text(json.dumps(config))
    cases = [
        ([str(no_model)], "no model.keras"),
        ([str(group_run), "--split", "test"], "no split 'test'"),
        ([str(group_run), "--subjects", "sub-99"], "subject 'sub-99' is not in split 'val'"),
        ([str(segmentation)], "a segmentation run"),
        ([str(tmp_path)], "not a run folder"),
        ([str(group_run), "--patch", "0"], "--patch must be 1 to 32 pixels; received 0"),
    ]
    for args, message in cases:
        out = tmp_path / "out"
        assert training_main(["explain", *args, "-o", str(out)]) == 2
        err = capsys.readouterr().err.strip()
        assert message in err, err
        assert len(err.splitlines()) == 1, err
        assert not out.exists()
        assert not (tmp_path / "out.partial").exists()


def test_standard_space_maps_land_on_the_template_grid(study, tmp_path):
    _, _, path = study
    with open_store(path) as store:
        planes, brain = store.template_brain()
        template = store.template
        min_foreground = store.config["min_foreground"]
    _save_on_template(tmp_path / "brain.nii.gz", planes, brain.astype(np.float32), template)
    image = nib.load(tmp_path / "brain.nii.gz")
    assert image.shape == tuple(template["shape"])
    assert np.allclose(image.affine, np.array(template["affine"]))
    truth = load_template(template["axis"], min_foreground).brain
    written = np.asanyarray(image.dataobj) > 0.5
    along = {"sagittal": 0, "coronal": 1, "axial": 2}[template["axis"]]
    kept = np.zeros(truth.shape, bool)
    index = [slice(None)] * 3
    index[along] = planes
    kept[tuple(index)] = True
    dice = 2 * (written & truth & kept).sum() / (written.sum() + (truth & kept).sum())
    assert dice > 0.9
    assert not written[~kept].any()


def test_a_standard_space_run_gets_its_maps_on_the_template_grid_too(study, tmp_path):
    _, _, path = study
    run_dir = tmp_path / "run"
    train(path, run_dir, epochs=1, batch_size=64, progress=False, report=lambda _: None)
    out = tmp_path / "explained"
    result = explain(run_dir, out, patch=8, progress=False)
    assert result.approximate is False
    assert json.loads((out / "explain.json").read_text())["space"] == "mni"
    with open_store(path) as store:
        template = store.template
        planes, _ = store.template_brain()
    along = {"sagittal": 0, "coronal": 1, "axial": 2}[template["axis"]]
    for row in result.subjects:
        maps = np.load(out / "maps" / f"{row['subject']}.npy")
        image = nib.load(out / "maps" / f"{row['subject']}.nii.gz")
        assert image.shape == tuple(template["shape"])
        assert np.allclose(image.affine, np.array(template["affine"]))
        volume = np.asanyarray(image.dataobj)
        touched = np.flatnonzero(np.abs(volume).sum(axis=tuple(a for a in range(3) if a != along)))
        assert set(touched) <= set(planes.tolist())  # only the stored planes carry a map
        assert len(maps) == len(planes)  # one map per stored slice, every plane of the slab
    for name in result.groups:
        averaged = nib.load(out / "average" / f"{name}.nii.gz")
        assert averaged.shape == tuple(template["shape"])
