"""Standard space (``--space mni``): heads moved by known affines come back onto the template.

The heads are one head image (the MNI152 template given a skull, scalp and neck,
``scripts/make_heads.py``) moved by known maps and sampled on scanner grids of different
voxel orders and sizes, with a bias field and noise: the stored transform is compared with
the truth in millimetres over the template's brain.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import h5py
import numpy as np
import pytest
from helpers import (
    LESION_MM,
    LESION_RADIUS,
    MNI_SETTINGS,
    NIBABEL_DATA,
    assert_same_store_content,
    write_nifti,
)
from make_heads import known_motion, moved_head, scanner_grid, template_head
from scipy import ndimage

from loader import H5Sequence, open_store, schema
from loader.cli import main as loader_main
from loader.qc import chosen_scans
from loader.stores import first_difference
from preprocess import standard
from preprocess.cli import main
from preprocess.pipeline import run
from preprocess.scan import process_scan
from preprocess.settings import RunOptions, Settings
from preprocess.slices import label_slices
from preprocess.standard import load_template
from preprocess.volume import load_volume

SCHEMA3 = Path(__file__).parent / "data" / "schema3.h5"  # written before standard space
# two make_heads phantoms in standard space (16 x 16), written before the similarity was the
# correlation ratio: their similarity is the Pearson correlation, and the store does not say
SCHEMA4_CORRELATION = Path(__file__).parent / "data" / "schema4_mni.h5"


def _brain_points(count: int = 2000) -> np.ndarray:
    template = load_template("axial", 0.05)
    inside = np.argwhere(template.brain)
    picked = inside[np.random.default_rng(0).choice(len(inside), count, replace=False)]
    return picked @ template.affine[:3, :3].T + template.affine[:3, 3]


def _error_mm(estimate: np.ndarray, truth: np.ndarray) -> float:
    """Mean distance over the brain between where two scanner-to-template maps send points."""
    points = np.c_[_brain_points(), np.ones(2000)]
    scanner = points @ np.linalg.inv(truth).T  # where the truth puts each template point
    return float(np.linalg.norm((scanner @ estimate.T - points)[:, :3], axis=1).mean())


def test_the_stored_transform_is_within_2_mm_of_the_truth(study):
    _, truths, store = study
    template = load_template("axial", 0.05)
    with open_store(store) as opened:
        table = opened.subjects_table()
        assert opened.space == "mni"
        assert opened.template["name"] == "MNI152NLin6Asym"
        assert opened.template["similarity"] == "correlation ratio"
        assert opened.template["slab"] == [int(template.positions[0]), int(template.positions[-1])]
        for subject, estimate, similarity in zip(
            table[schema.SUBJECT_ID],
            table[schema.TO_TEMPLATE],
            table[schema.SIMILARITY],
            strict=True,
        ):
            assert _error_mm(estimate, truths[subject]) < 2.0
            assert similarity > 0.7  # coarse grids (3 mm) blur: below 1
        # every scan gives the same planes: the template's slab
        subjects, planes = opened.subject[()], opened.slice_index[()]
        for scan in range(len(table[schema.SUBJECT_ID])):
            assert np.array_equal(np.sort(planes[subjects == scan]), template.positions)
        brain_planes, brain = opened.template_brain()
        assert np.array_equal(brain_planes, template.positions)
        assert brain.shape == (len(template.positions), 32, 32)


def _slices_by_plane(store, channel: int = 0) -> dict[int, dict[int, np.ndarray]]:
    """plane -> scan -> the stored slice (small stores only)."""
    with open_store(store) as opened:
        images = opened.images[()]
        subjects, planes = opened.subject[()], opened.slice_index[()]
    if images.ndim == 4:
        images = images[..., channel]
    result: dict[int, dict[int, np.ndarray]] = {}
    for row, (scan, plane) in enumerate(zip(subjects, planes, strict=True)):
        result.setdefault(int(plane), {})[int(scan)] = images[row].astype(np.float64)
    return result


def _agreement(store) -> float:
    """The mean correlation between two scans' slices at the same /slice number."""
    values = []
    for by_scan in _slices_by_plane(store).values():
        scans = sorted(by_scan)
        for a, b in itertools.pairwise(scans):
            x, y = by_scan[a].ravel(), by_scan[b].ravel()
            if x.std() > 0 and y.std() > 0:
                values.append(np.corrcoef(x, y)[0, 1])
    return float(np.mean(values))


def test_one_slice_number_is_one_anatomy_far_better_than_in_native_space(study, tmp_path):
    root, _, store = study
    native = tmp_path / "native.h5"
    run([str(root / "bids")], native, Settings(label_column="group", size=32), report=print)
    mni, scanner = _agreement(store), _agreement(native)
    assert mni > 0.9
    assert mni > scanner + 0.3


def test_the_second_modality_and_the_mask_land_on_the_t1s_anatomy(study):
    _, _, store = study
    template = load_template("axial", 0.05)
    with open_store(store) as opened:
        images, masks = opened.images[()], opened.masks[()]
        planes = opened.slice_index[()]
        assert opened.channel_names == ["T1w", "FLAIR"]
    # FLAIR is a monotone function of the same head, on another grid: aligned, it correlates
    t1, flair = images[..., 0].astype(float), images[..., 1].astype(float)
    inside = (t1 > 0) | (flair > 0)
    assert np.corrcoef(t1[inside], flair[inside])[0, 1] > 0.9
    # the lesion is a sphere at a known place of the template: its slices are where it is
    grid = np.indices(template.image.shape).reshape(3, -1).T
    world = grid @ template.affine[:3, :3].T + template.affine[:3, 3]
    sphere = (np.linalg.norm(world - LESION_MM, axis=1) < LESION_RADIUS).reshape(
        template.image.shape
    )
    expected = label_slices(sphere.astype(np.uint8), planes, template.voxel_size, "axial", 32)
    overlap = (
        2 * np.sum((masks == 1) & (expected == 1)) / (np.sum(masks == 1) + np.sum(expected == 1))
    )
    assert overlap > 0.8


def test_a_second_run_with_one_worker_stopped_and_resumed_writes_the_same_store(
    study, tmp_path, monkeypatch
):
    root, _, store = study
    inputs = [str(root / "bids")]
    resumed = tmp_path / "resumed.h5"
    real = process_scan
    calls = []

    def stop_second(scan, settings):
        calls.append(scan)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(scan, settings)

    monkeypatch.setattr("preprocess.scan.process_scan", stop_second)
    with pytest.raises(KeyboardInterrupt):
        run(inputs, resumed, Settings(**MNI_SETTINGS), RunOptions(workers=1), report=print)
    monkeypatch.setattr("preprocess.scan.process_scan", real)
    summary = run(
        inputs, resumed, Settings(**MNI_SETTINGS), RunOptions(workers=1, resume=True), report=print
    )
    assert summary.resumed == 1
    assert summary.written == 2
    # the study's store was written by two workers in one go: the same bytes
    assert_same_store_content(store, resumed)
    with h5py.File(store, "r") as a, h5py.File(resumed, "r") as b:
        for name in ("masks", "slice", "subjects/to_template", "subjects/similarity"):
            np.testing.assert_array_equal(a[name][()], b[name][()])


def test_a_shard_writes_the_rows_of_the_whole_store(study, tmp_path):
    root, _, store = study
    shard = tmp_path / "shard1.h5"
    run([str(root / "bids")], shard, Settings(**MNI_SETTINGS, shard="1/2"), RunOptions(workers=1))
    with open_store(store) as whole, open_store(shard) as part:
        ids = list(part.subjects_table()[schema.SUBJECT_ID])
        assert 0 < len(ids) < 3
        for subject in ids:
            assert np.array_equal(_rows_of(part, subject), _rows_of(whole, subject))


def _rows_of(store, subject: str) -> np.ndarray:
    """A subject's slices in plane order."""
    index = list(store.subjects_table()[schema.SUBJECT_ID]).index(subject)
    rows = np.flatnonzero(store.subject[()] == index)
    rows = rows[np.argsort(store.slice_index[()][rows])]
    return store.images[()][rows]


def test_a_store_written_before_standard_space_reads_as_native():
    with open_store(SCHEMA3) as opened:
        assert opened.version == 3
        assert opened.space == "native"
        assert opened.template is None
        assert opened.template_brain() is None
        table = opened.subjects_table()
        assert table[schema.TO_TEMPLATE].shape == (8, 4, 4)
        assert np.isnan(table[schema.TO_TEMPLATE]).all()
        assert np.isnan(table[schema.SIMILARITY]).all()
        assert opened.channel_names == ["T1w", "FLAIR"]


def test_odd_inputs_register_or_get_one_line_each(tmp_path, capsys):
    rng = np.random.default_rng(5)
    folder = tmp_path / "scans"
    folder.mkdir()
    head, head_affine = template_head()
    # a skull-stripped scan, moved: registers
    stripped_truth = known_motion(rng)
    template = load_template("axial", 0.05)
    affine = scanner_grid((90, 110, 90), (2.0, 2.0, 2.0), "RAS")
    matrix = np.linalg.inv(template.affine) @ stripped_truth @ affine
    brain = template.image * template.brain / template.image.max() * 255
    stripped = ndimage.affine_transform(brain, matrix, output_shape=(90, 110, 90), order=1)
    write_nifti(folder / "stripped.nii.gz", stripped * 8, affine, np.int16)
    # a scan already in MNI space (the head on the template's own grid, 2 mm): registers
    write_nifti(
        folder / "in_mni.nii.gz",
        head[::2, ::2, ::2] * 8,
        head_affine @ np.diag([2, 2, 2, 1]),
        np.int16,
    )
    # a huge field of view: the head in a 400 mm box of 4 mm voxels: registers
    huge_truth = known_motion(rng, 0.5)
    huge_affine = scanner_grid((100, 100, 100), (4.0, 4.0, 4.0), "LAS")
    write_nifti(
        folder / "huge.nii.gz", moved_head(huge_truth, huge_affine, (100,) * 3, rng), huge_affine
    )
    # a sphere and noise: not heads; a scan of two slices: not a volume to register
    grid = np.indices((64, 64, 64)) - 31.5
    write_nifti(
        folder / "sphere.nii.gz",
        (np.sqrt((grid**2).sum(0)) < 25) * 1000.0,
        np.diag([2, 2, 2, 1]),
        np.int16,
    )
    write_nifti(
        folder / "noise.nii.gz", rng.normal(500, 100, (60, 70, 60)), np.diag([3, 3, 3, 1]), np.int16
    )
    write_nifti(folder / "thin.nii.gz", rng.normal(500, 100, (128, 128, 2)), np.eye(4), np.int16)
    store = tmp_path / "odd.h5"
    args = [str(folder), "-o", str(store), "--space", "mni", "--size", "32", "--workers", "2"]
    # noise lands anywhere (similarity 0.06; as a correlation 0.02-0.11), the sphere 0.27
    status = main([*args, "--min-similarity", "0.15", "--context", "1"])
    out, err = capsys.readouterr()
    assert status == 1
    lines = (out + err).splitlines()
    rejected = {line.split(": ")[1].split("/")[-1]: line for line in lines if "rejected: " in line}
    assert sorted(rejected) == ["noise.nii.gz", "thin.nii.gz"], lines
    assert ": cannot register a scan of 128 x 128 x 2 mm" in rejected["thin.nii.gz"]
    assert "is below --min-similarity 0.15: left out" in rejected["noise.nii.gz"]
    check = [line for line in lines if line.startswith("check registration: ")]
    assert len(check) == 1, lines
    assert check[0].startswith("check registration: scans/sphere.nii.gz (similarity 0.")
    assert "traceback" not in (out + err).lower()
    with open_store(store) as opened:
        table = opened.subjects_table()
        found = {
            path.split("/")[-1]: m
            for path, m in zip(table[schema.SOURCE_PATH], table[schema.TO_TEMPLATE], strict=True)
        }
        assert opened.channel_names == ["T1w-1", "T1w+0", "T1w+1"]
        scan = list(found).index("stripped.nii.gz")
        rows = np.flatnonzero(opened.subject[()] == scan)
        planes = opened.slice_index[()][rows]
        images = opened.images[()][rows]
    assert _error_mm(found["stripped.nii.gz"], stripped_truth) < 2.0
    assert _error_mm(found["in_mni.nii.gz"], np.eye(4)) < 2.0
    assert _error_mm(found["huge.nii.gz"], huge_truth) < 2.0
    # --context 1: a slice's neighbours are the template's next planes, as stored there
    by_plane = {int(p): image for p, image in zip(planes, images, strict=True)}
    middle = sorted(by_plane)[len(by_plane) // 2]
    np.testing.assert_array_equal(by_plane[middle][..., 0], by_plane[middle - 1][..., 1])
    np.testing.assert_array_equal(by_plane[middle][..., 2], by_plane[middle + 1][..., 1])


def test_a_turned_start_itk_cannot_fit_is_screened_last_not_an_error(monkeypatch):
    volume = load_volume(NIBABEL_DATA / "anatomical.nii")
    sitk = standard._simpleitk()
    work, work_affine = standard.working_image(volume)
    moving = standard._image(sitk, work, work_affine)

    def no_samples(*args, **kwargs):
        raise RuntimeError("ITK ERROR: All samples map outside moving image buffer")

    monkeypatch.setattr(standard, "_stage", no_samples)
    assert standard._screen(sitk, moving, work_affine, standard.TURNS[0]) == float("inf")


def test_the_registration_picture_draws_the_worst_scans_first(study, tmp_path, capsys):
    _, _, store = study
    picture = tmp_path / "qc.png"
    assert loader_main([str(store), "--qc", str(picture)]) == 0
    assert picture.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    out = capsys.readouterr().out
    assert f"registration check: {picture} (3 scans of {store})" in out
    assert (
        "space: mni (MNI152NLin6Asym, axial planes 13 to 148); registration similarity "
        "(correlation ratio): median 0." in out
    )
    with open_store(store) as opened:
        similarity = opened.subjects_table()[schema.SIMILARITY]
    assert chosen_scans(similarity, 1, 0, 0) == [int(np.argmin(similarity))]


def test_a_store_from_before_the_correlation_ratio_says_its_similarity_is_a_correlation(
    tmp_path, capsys
):
    picture = tmp_path / "qc.png"
    assert loader_main([str(SCHEMA4_CORRELATION), "--qc", str(picture)]) == 0
    assert picture.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    out = capsys.readouterr().out
    assert "registration similarity (correlation): median 0.85, lowest 0.82" in out
    with open_store(SCHEMA4_CORRELATION) as opened:
        assert "similarity" not in opened.template
        assert opened.version == 4
    sequence = H5Sequence(SCHEMA4_CORRELATION, split="train", batch_size=64)
    assert sequence[0].shape == (64, 16, 16, 1)  # unlabelled: images only


def test_the_registration_picture_of_a_native_store_is_one_line(tmp_path, capsys):
    picture = tmp_path / "qc.png"
    native = SCHEMA3
    assert loader_main([str(native), "--qc", str(picture)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ")
    assert "needs a store made with --space mni" in err
    assert len(err.splitlines()) == 1
    assert not picture.exists()


def test_stores_in_different_spaces_are_not_read_as_one(study):
    _, _, store = study
    with open_store(store) as mni, open_store(SCHEMA3) as old:
        assert first_difference(mni, old).startswith("space: 'mni' in")


def test_without_simpleitk_space_mni_is_one_line_naming_what_to_install(
    tmp_path, capsys, monkeypatch
):
    find_spec = standard.importlib.util.find_spec
    monkeypatch.setattr(
        standard.importlib.util,
        "find_spec",
        lambda name, *a: None if name == "SimpleITK" else find_spec(name, *a),
    )
    standard.load_template.cache_clear()
    write_nifti(tmp_path / "scan.nii.gz", np.random.default_rng(0).normal(size=(50, 50, 50)))
    store = tmp_path / "s.h5"
    assert main([str(tmp_path / "scan.nii.gz"), "-o", str(store), "--space", "mni"]) == 2
    err = capsys.readouterr().err
    assert err == (
        "error: --space mni needs SimpleITK: pip install 'slicestore[mni]' (SimpleITK, and the "
        "MNI152 templates of nimare and nilearn)\n"
    )
    assert not store.exists()
    standard.load_template.cache_clear()
