"""Several images per slice: modalities as channels, label masks, neighbouring slices."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import h5py
import keras
import nibabel as nib
import numpy as np
import pytest
from helpers import blob_volume, write_nifti
from make_phantoms import reorder, write_bids
from nibabel.processing import resample_from_to
from run_helpers import interrupted_and_resumed

from loader import H5Sequence
from loader.store import open_store
from preprocess.cli import main
from preprocess.slices import label_slices
from training.cli import main as training_main
from training.run import train

ROOT = Path(__file__).resolve().parents[1]

CENTRE = np.array([10.0, -8.0, 5.0])  # mm: a sphere seen by every modality and the mask


def _run(*args) -> int:
    return main([str(a) for a in args])


def _scene(voxel_size, axcodes: str, head: float, sphere: float, radius: float = 9.0):
    """A head with a sphere at CENTRE, sampled on a grid of ``voxel_size`` in ``axcodes`` order."""
    voxel_size = np.asarray(voxel_size, dtype=float)
    shape = np.round(90 / voxel_size).astype(int)
    affine = np.diag([*voxel_size, 1.0])
    affine[:3, 3] = -(shape - 1) / 2 * voxel_size + np.array([1.3, -0.7, 2.1])
    world = np.meshgrid(
        *[np.arange(n) * v + o for n, v, o in zip(shape, voxel_size, affine[:3, 3], strict=True)],
        indexing="ij",
    )
    data = np.zeros(shape, np.float32)
    data[sum((w / 36) ** 2 for w in world) <= 1] = head
    data[sum((w - c) ** 2 for w, c in zip(world, CENTRE, strict=True)) <= radius**2] = sphere
    if head:  # an image: noise (a mask has none)
        data = np.abs(data + np.random.default_rng(0).normal(0, 2, shape).astype(np.float32))
    return reorder(data, affine, axcodes)


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2 * np.count_nonzero(a & b) / (np.count_nonzero(a) + np.count_nonzero(b))


def _rows(path: Path, name: str) -> np.ndarray:
    """A small test store's dataset, in the order of the slices' positions."""
    with h5py.File(path, "r", locking=False) as h5:
        order = np.argsort(h5["slice"][()], kind="stable")
        return h5[name][()][order]


@pytest.fixture(scope="module")
def two_modalities(tmp_path_factory) -> Path:
    """One BIDS session: T1w (1.5 mm, LPS), FLAIR (2 x 2.5 x 1.8 mm, SAR), and a lesion mask
    (3 mm, PIL) under derivatives: the same sphere in the same space on three grids."""
    root = tmp_path_factory.mktemp("modalities") / "bids"
    anat = root / "sub-01" / "anat"
    write_nifti(anat / "sub-01_T1w.nii.gz", *_scene((1.5, 1.5, 1.5), "LPS", 100, 300))
    write_nifti(anat / "sub-01_FLAIR.nii.gz", *_scene((2.0, 2.5, 1.8), "SAR", 200, 500))
    mask, affine = _scene((3.0, 3.0, 3.0), "PIL", 0, 1, radius=9.0)
    mask = np.rint(np.clip(mask, 0, 1)).astype(np.uint8)
    derivative = root / "derivatives" / "lesions" / "sub-01" / "anat"
    write_nifti(derivative / "sub-01_desc-sphere_mask.nii.gz", mask, affine, "uint8")
    return root


@pytest.fixture(scope="module")
def modality_store(two_modalities, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("store") / "two.h5"
    args = [two_modalities, "-o", out, "--suffix", "T1w", "FLAIR", "--masks", "sphere"]
    assert _run(*args, "--dtype", "float32", "--val-fraction", "0", "--workers", "1") == 0
    return out


def test_two_modalities_on_other_grids_and_orders_land_on_the_same_pixels(modality_store):
    images = _rows(modality_store, "images")
    assert images.shape[1:] == (64, 64, 2)
    t1, flair = images[..., 0] > 0.6, images[..., 1] > 0.6  # the sphere, bright in both
    assert t1.sum() > 200
    assert _dice(t1, flair) > 0.85
    shifted = np.roll(flair, 3, axis=2)  # 3 pixels off: what a misalignment looks like
    assert _dice(t1, shifted) < _dice(t1, flair) - 0.2
    with open_store(modality_store) as store:
        assert store.channel_names == ["T1w", "FLAIR"]
        assert store.mask_labels == [0, 1]


def test_a_mask_lands_on_the_structure_it_marks_and_keeps_its_labels(modality_store):
    images, masks = _rows(modality_store, "images"), _rows(modality_store, "masks")
    assert masks.dtype == np.uint8
    assert set(np.unique(masks)) == {0, 1}  # labels, never blurred into fractions
    assert _dice(masks == 1, images[..., 0] > 0.6) > 0.8


def test_the_sequence_gives_every_channel_and_the_masks(modality_store):
    seq = H5Sequence(modality_store, batch_size=16, target="mask")
    assert seq.channel_names == ["T1w", "FLAIR"]
    x, y = seq[1]
    assert x.shape == (16, 64, 64, 2)
    assert y.shape == (16, 64, 64, 1)
    with h5py.File(modality_store, "r", locking=False) as h5:
        rows = seq.rows(1)
        np.testing.assert_array_equal(y[..., 0], h5["masks"][rows[0] : rows[-1] + 1])
        np.testing.assert_array_equal(x, h5["images"][rows[0] : rows[-1] + 1])
    first = H5Sequence(modality_store, batch_size=16, channels="first")[1]
    np.testing.assert_array_equal(first, x.transpose(0, 3, 1, 2))


def test_a_store_without_masks_is_no_segmentation_target(phantom_store):
    with pytest.raises(ValueError, match="has no masks: preprocess with --masks"):
        H5Sequence(phantom_store, target="mask")


def test_context_channels_are_the_neighbouring_slices(tmp_path):
    scan = write_nifti(tmp_path / "in" / "a.nii.gz", blob_volume(4))
    common = ["--dtype", "float32", "--min-foreground", "0", "--val-fraction", "0"]
    assert _run(scan, "-o", tmp_path / "one.h5", *common) == 0
    assert _run(scan, "-o", tmp_path / "three.h5", "--context", "1", *common) == 0
    one, three = _rows(tmp_path / "one.h5", "images"), _rows(tmp_path / "three.h5", "images")
    assert three.shape == (*one.shape, 3)
    np.testing.assert_array_equal(three[:, :, :, 1], one)
    np.testing.assert_array_equal(three[1:, :, :, 0], one[:-1])
    np.testing.assert_array_equal(three[:-1, :, :, 2], one[1:])
    assert not three[0, :, :, 0].any()  # past the volume's edge: zeros
    assert not three[-1, :, :, 2].any()
    with open_store(tmp_path / "three.h5") as store:
        assert store.channel_names == ["T1w-1", "T1w+0", "T1w+1"]


def test_masks_beside_plain_scans_are_paired_by_name_and_not_taken_as_scans(tmp_path):
    data, affine = _scene((2.0, 2.0, 2.0), "RAS", 100, 300)
    write_nifti(tmp_path / "in" / "a.nii.gz", data, affine)
    mask, mask_affine = _scene((2.5, 2.5, 2.5), "ASR", 0, 3)
    mask = np.rint(np.clip(mask, 0, 3)).astype(np.int16)
    write_nifti(tmp_path / "in" / "a_mask.nii.gz", mask, mask_affine)
    args = [tmp_path / "in", "-o", tmp_path / "s.h5", "--masks-suffix", "_mask"]
    assert _run(*args, "--val-fraction", "0") == 0
    with open_store(tmp_path / "s.h5") as store:
        assert len(store.subjects_table()["path"]) == 1  # the mask is no scan
        assert store.mask_labels == [0, 3]
        assert store.masks.shape == (store.num_slices, 64, 64)


def test_label_slices_vote_among_the_labels_present():
    labels = np.zeros((40, 40, 3), np.uint8)
    labels[10:30, 10:30] = 2
    labels[18:22, 18:22] = 7
    out = label_slices(labels, np.array([1]), np.ones(3), "axial", 16)
    assert set(np.unique(out)) <= {0, 2, 7}
    assert (out == 2).sum() > (out == 7).sum() > 0


def test_bad_sessions_masks_and_contexts_are_named_and_the_rest_written(tmp_path, capsys):
    root = tmp_path / "bids"
    for index in (1, 2, 3, 4):
        anat = root / f"sub-0{index}" / "anat"
        write_nifti(anat / f"sub-0{index}_T1w.nii.gz", blob_volume(index))
        if index != 2:  # sub-02 has no FLAIR
            write_nifti(anat / f"sub-0{index}_FLAIR.nii.gz", blob_volume(index + 10))
        mask = (blob_volume(index) > 50).astype(np.float32)
        if index == 3:
            mask *= 0.5  # not integer-valued
        if index == 4:
            mask = mask[:20]  # covers half of the scan
        derivative = root / "derivatives" / "x" / f"sub-0{index}" / "anat"
        write_nifti(derivative / f"sub-0{index}_desc-blob_mask.nii.gz", mask)
    args = [root, "-o", tmp_path / "s.h5", "--suffix", "T1w", "FLAIR", "--masks", "blob"]
    assert _run(*args, "--val-fraction", "0", "--workers", "1") == 1
    err = capsys.readouterr().err
    assert "rejected: " in err
    assert "sub-02_T1w.nii.gz: no FLAIR of this session (sub-02_FLAIR.nii.gz)" in err
    assert "sub-03_desc-blob_mask.nii.gz: the mask is not integer-valued" in err
    assert "sub-04_desc-blob_mask.nii.gz: the mask covers only 50% of the scan" in err
    assert "Traceback" not in err
    with open_store(tmp_path / "s.h5") as store:
        assert store.subjects_table()["id"].tolist() == ["01"]
    args = [root / "sub-01", "-o", tmp_path / "c.h5", "--context", "36", "--val-fraction", "0"]
    assert _run(*args) == 2  # the only scan rejected: no store
    assert "--context 36 but the volume has only 36 axial slices" in capsys.readouterr().err


def test_phantom_lesions_are_bright_in_flair_under_their_masks(tmp_path):
    write_bids(tmp_path / "bids", subjects=2, seed=5, flair=True)
    args = [tmp_path / "bids", "-o", tmp_path / "s.h5", "--suffix", "T1w", "FLAIR"]
    assert _run(*args, "--masks", "lesion", "--val-fraction", "0", "--workers", "1") == 0
    images, masks = _rows(tmp_path / "s.h5", "images"), _rows(tmp_path / "s.h5", "masks")
    lesion = masks == 1
    assert lesion.sum() > 50  # the patient's lesions survive the resampling
    brain = images[..., 0] > 128  # grey and white matter in T1 (uint8)
    flair = images[..., 1].astype(float) / 255
    assert flair[lesion].mean() > flair[brain & ~lesion].mean() + 0.2


def test_a_short_segmentation_run_finds_the_phantom_lesions(lesion_store, tmp_path, capsys):
    run = tmp_path / "run"
    args = [lesion_store, "-o", run, "--target", "mask", "--epochs", "6", "--batch-size", "8"]
    args += ["--learning-rate", "0.003"]  # val Dice 0.83-0.89, oneDNN on or off, 1 or 2 threads
    assert training_main([str(a) for a in args]) == 0
    out = capsys.readouterr().out
    assert "val: Dice " in out
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["task"] == "segmentation"
    assert metrics["splits"]["val"]["slices"]["dice"]["1"] > 0.5  # untrained: about 0
    assert metrics["splits"]["val"]["subjects"]["count"] == 2
    assert (run / "segmentation.png").is_file()
    with open(run / "predictions.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert [row["split"] for row in rows] == ["val", "val"]
    assert {"true_pixels", "predicted_pixels", "dice"} <= set(rows[0])
    model = keras.saving.load_model(run / "model.keras")  # loss and metric registered
    assert model.output_shape == (None, 32, 32, 2)
    assert model.input_shape == (None, 32, 32, 2)
    # predict the validation subject with lesions twice: its scans as they are, and stored
    # in another voxel order on a coarser, anisotropic grid. The mask comes back on each
    # scan's own grid, and as good on the moved grid as on the original one (both scored at
    # the scans' resolution, finer than the 32 x 32 slices the model saw: the val Dice
    # above is scored on those slices, so it is not the reference here)
    subject = max(rows, key=lambda row: int(row["true_pixels"]))["subject"]
    bids = lesion_store.parent / "bids"
    truth = {}  # T1 path -> its true mask on its grid
    for folder, moved in (("as-stored", False), ("moved", True)):
        for source in sorted(bids.glob(f"sub-{subject}/**/*.nii.gz")):
            image = nib.load(source)
            data, affine = np.asarray(image.dataobj), image.affine
            if moved:
                data, affine = reorder(data, affine, "PSL")
                data, affine = data[:, :, ::2], affine @ np.diag([1, 1, 2, 1])  # every other
            target = tmp_path / folder / source.relative_to(bids)
            target.parent.mkdir(parents=True, exist_ok=True)
            nib.save(nib.Nifti1Image(data, affine), target)
            if source.name.endswith("_T1w.nii.gz"):
                lesion = next(
                    bids.glob(f"derivatives/*/**/{source.name[:-11]}_desc-lesion_mask.nii.gz")
                )
                true = resample_from_to(nib.load(lesion), (data.shape, affine), order=0)
                truth[target] = np.asarray(true.dataobj) > 0
        (tmp_path / folder / "participants.tsv").write_text((bids / "participants.tsv").read_text())
    out = tmp_path / "predicted"
    inputs = [str(tmp_path / "as-stored"), str(tmp_path / "moved")]
    assert training_main(["predict", str(run), *inputs, "-o", str(out)]) == 0
    counts = {"as-stored": [0, 0], "moved": [0, 0]}  # pixels in both, pixels found + true
    for t1, true in truth.items():
        name = str(t1.relative_to(tmp_path)).removesuffix(".nii.gz").replace(os.sep, "__")
        written = nib.load(out / f"{name}_pred.nii.gz")
        original = nib.load(t1)
        assert written.shape == original.shape
        np.testing.assert_allclose(written.affine, original.affine)
        found = np.asarray(written.dataobj) == 1
        tally = counts[t1.relative_to(tmp_path).parts[0]]
        tally[0] += (found & true).sum()
        tally[1] += found.sum() + true.sum()
    as_stored, moved_dice = (2 * both / total for both, total in counts.values())
    assert as_stored > 0.5  # untrained: about 0
    assert moved_dice > as_stored - 0.1


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--augment"], "--augment moves the images but not their masks"),
        (["--task", "regression"], "segmentation reads target='mask'"),
    ],
)
def test_segmentation_refuses_what_would_misalign_masks(
    lesion_store, tmp_path, capsys, extra, message
):
    args = [lesion_store, "-o", tmp_path / "run", "--target", "mask", *extra]
    assert training_main([str(a) for a in args]) == 2
    err = capsys.readouterr().err
    assert message in err
    assert "Traceback" not in err


def test_classification_reads_every_channel(lesion_store, tmp_path):
    result = train(lesion_store, tmp_path / "run", epochs=1, target="group", progress=False)
    assert result.model.input_shape == (None, 32, 32, 2)


def test_the_preview_shows_every_channel_and_the_mask_contours(modality_store, tmp_path, capsys):
    from matplotlib import image as mpimg

    from loader.cli import main as loader_main

    picture = tmp_path / "p.png"
    assert loader_main([str(modality_store), "--preview", str(picture), "--count", "40"]) == 0
    assert "channels: T1w, FLAIR; masks with labels [0, 1]" in capsys.readouterr().out
    pixels = mpimg.imread(picture)
    red = (pixels[..., 0] > 0.9) & (pixels[..., 1] < 0.2) & (pixels[..., 2] < 0.2)
    assert red.sum() > 20  # the sphere's contours


def test_a_segmentation_run_resumes_exactly(small_lesion_store, tmp_path):
    """The U-Net's batch-normalisation statistics and the Dice totals come back too."""
    store = small_lesion_store
    settings = {"target": "mask", "epochs": 1, "batch_size": 16, "checkpoint_every": 2}
    whole = train(store, tmp_path / "whole", progress=False, **settings)
    resumed = interrupted_and_resumed(store, tmp_path / "resumed", (0, 3), **settings)
    for a, b in zip(whole.model.get_weights(), resumed.model.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)
    history = (tmp_path / "resumed" / "history.csv").read_bytes()
    assert history == (tmp_path / "whole" / "history.csv").read_bytes()
    assert resumed.metrics == whole.metrics
