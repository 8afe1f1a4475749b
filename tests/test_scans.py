"""One scan to slices: loading, orientation, checks, normalisation, slicing, resampling."""

from __future__ import annotations

import gzip
import hashlib

import nibabel as nib
import numpy as np
import pytest
from helpers import NIBABEL_DATA, blob_volume, write_nifti
from make_phantoms import reorder

from preprocess.discover import Scan
from preprocess.scan import process_scan
from preprocess.settings import Settings
from preprocess.slices import cut_slices
from preprocess.volume import ScanError, foreground, load_volume, normalization, percentiles


def _slices(path, **settings):
    scan = Scan(path, path.name, "x", "")
    return process_scan(scan, Settings(**settings))[:2]


def test_big_endian_las_file_loads_as_ras_float32():
    volume = load_volume(NIBABEL_DATA / "anatomical.nii")
    assert volume.data.dtype == np.float32
    assert nib.aff2axcodes(volume.affine) == ("R", "A", "S")
    assert volume.data.shape == (33, 41, 25)
    raw = nib.load(NIBABEL_DATA / "anatomical.nii").get_fdata()
    np.testing.assert_array_equal(volume.data, raw[::-1].astype(np.float32))  # L->R flip


@pytest.mark.parametrize("axcodes", ["LPS", "SAR", "PIL", "ILA"])
@pytest.mark.parametrize("axis", ["axial", "coronal", "sagittal"])
def test_same_anatomy_in_any_voxel_order_gives_the_same_slices(tmp_path, axcodes, axis):
    image = nib.load(NIBABEL_DATA / "anatomical.nii")
    data = image.get_fdata().astype(np.float32)
    moved, affine = reorder(data, image.affine, axcodes)
    assert nib.aff2axcodes(affine) == tuple(axcodes)
    original = write_nifti(tmp_path / "original.nii", data, image.affine)
    reordered = write_nifti(tmp_path / "reordered.nii.gz", moved, affine)
    record_a, slices_a = _slices(original, axis=axis)
    record_b, slices_b = _slices(reordered, axis=axis)
    np.testing.assert_array_equal(slices_a, slices_b)
    assert record_a["positions"] == record_b["positions"]
    np.testing.assert_allclose(record_a["affine"], record_b["affine"])


def _sphere(voxel_size, radius_mm=40.0, fov_mm=120.0):
    shape = np.round(fov_mm / np.asarray(voxel_size)).astype(int)
    axes = [(np.arange(n) - (n - 1) / 2) * v for n, v in zip(shape, voxel_size, strict=True)]
    x, y, z = np.meshgrid(*axes, indexing="ij", sparse=True)
    data = ((x**2 + y**2 + z**2) <= radius_mm**2).astype(np.float32) * 100
    return data, np.diag([*voxel_size, 1.0])


@pytest.mark.parametrize(
    "voxel_size", [(1.0, 1.0, 4.0), (3.0, 1.0, 1.5), (1.2, 2.5, 1.2), (0.8, 0.8, 5.0)]
)
@pytest.mark.parametrize("axis", ["axial", "coronal", "sagittal"])
def test_a_sphere_in_anisotropic_voxels_comes_out_round(tmp_path, voxel_size, axis):
    data, affine = _sphere(voxel_size)
    path = write_nifti(tmp_path / "sphere.nii.gz", data, affine)
    _record, slices = _slices(path, axis=axis, dtype="float32")
    middle = slices[len(slices) // 2]
    weights = middle / middle.sum()
    rows, columns = np.mgrid[: middle.shape[0], : middle.shape[1]]
    spread = [
        np.sqrt((weights * (grid - (weights * grid).sum()) ** 2).sum()) for grid in (rows, columns)
    ]
    # round: equal spread both ways (voxels of up to 5 mm quantise the edge by ~1%)
    assert spread[0] / spread[1] == pytest.approx(1, abs=0.03)
    # 80 mm across a 120 mm field of view: a disc of radius ~21 pixels, spread r/2
    assert spread[0] == pytest.approx(64 * 40 / 120 / 2, rel=0.05)
    assert middle.shape == (64, 64)


def test_slices_keep_the_physical_aspect_of_a_long_field_of_view(tmp_path):
    data = np.zeros((100, 50, 10), np.float32)  # 100 mm x 50 mm, a box 80 x 40 mm inside
    data[10:90, 5:45, :] = 1
    path = write_nifti(tmp_path / "box.nii", data)
    _, slices = _slices(path, axis="axial", dtype="float32", size=64)
    image = slices[0]
    rows = np.flatnonzero(image.max(axis=1) > 0.5)  # anterior-posterior (y): 40 mm
    columns = np.flatnonzero(image.max(axis=0) > 0.5)  # left-right (x): 80 mm
    assert len(columns) / len(rows) == pytest.approx(2, abs=0.1)


def test_near_empty_slices_are_dropped(tmp_path):
    data = np.zeros((20, 20, 30), np.float32)
    data[2:18, 2:18, 10:20] = 5  # only slices 10..19 hold anything
    data[10, 10, 25] = 5  # one voxel: below 5% of a slice
    record, slices = _slices(write_nifti(tmp_path / "v.nii", data))
    assert record["positions"] == list(range(10, 20))
    assert len(slices) == 10


def test_uint8_storage_quantises_the_zero_to_one_range(tmp_path):
    path = write_nifti(tmp_path / "blob.nii.gz", blob_volume(1))
    _, as_float = _slices(path, dtype="float32")
    _, as_uint8 = _slices(path, dtype="uint8")
    assert as_uint8.dtype == np.uint8
    assert as_uint8.max() > 200
    np.testing.assert_allclose(as_uint8 / 255, as_float, atol=0.5 / 255 + 1e-6)


def _normalised(data: np.ndarray, mask: np.ndarray, method: str) -> np.ndarray:
    """``data`` through the linear map preprocessing applies to the slices it keeps."""
    a, b, clip = normalization(data, mask, method)
    out = data * np.float32(a) + np.float32(b)
    return np.clip(out, 0, 1) if clip else out


@pytest.mark.parametrize("dtype", ["int8", "uint8", "int16", "uint16", "float32"])
def test_percentiles_equal_numpys_bit_for_bit(dtype):
    """The histogram path gives np.percentile's numbers exactly, wrapping differences too."""
    rng = np.random.default_rng(7)
    info = np.iinfo(dtype) if dtype != "float32" else np.iinfo("int16")
    for _ in range(300):
        low = int(rng.integers(info.min, info.max))
        high = int(rng.integers(low, info.max + 1))
        values = rng.integers(low, high + 1, int(rng.integers(1, 2000))).astype(dtype)
        q = (*rng.uniform(0, 100, 2), 0.0, 0.5, 2.0, 98.0, 99.5, 100.0)
        mine, theirs = percentiles(values, q), np.percentile(values, q)
        assert mine.dtype == theirs.dtype
        np.testing.assert_array_equal(mine, theirs)


def test_percentile_normalisation_maps_foreground_to_unit_range():
    data = blob_volume(2) * 7 + 300
    mask = foreground(data)
    assert 0.1 < mask.mean() < 0.6  # the ellipsoid, not the noise around it
    out = _normalised(data, mask, "percentile")
    assert out.min() == 0
    assert out.max() == 1
    assert np.mean(out[mask] == 1) == pytest.approx(0.005, abs=0.003)


def test_zscore_normalisation_standardises_the_foreground():
    data = blob_volume(3) * 3 + 50
    mask = foreground(data)
    out = _normalised(data, mask, "zscore")
    assert out[mask].mean() == pytest.approx(0, abs=1e-4)
    assert out[mask].std() == pytest.approx(1, abs=1e-4)


def test_scans_of_other_sizes_read_one_after_another_load_exactly(tmp_path):
    """The buffer reused for the gzipped bytes never leaks one scan's bytes into the next."""
    shapes = [(40, 44, 36), (12, 10, 8), (50, 40, 30), (12, 10, 8)]
    paths = [
        write_nifti(tmp_path / f"s{i}.nii.gz", blob_volume(i, shape), dtype="int16")
        for i, shape in enumerate(shapes)
    ]
    for path in paths:
        expected = nib.as_closest_canonical(nib.load(path)).get_fdata(dtype=np.float32)
        volume = load_volume(path)
        intensities = np.asarray(volume.voxels, np.float64) * volume.slope + volume.inter
        np.testing.assert_allclose(intensities, expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", ["uint8", "int16", ">i2", "uint16", "int32", "float32", ">f8"])
@pytest.mark.parametrize("axcodes", ["RAS", "SAR", "PIL"])
@pytest.mark.parametrize("ending", [".nii.gz", ".nii"])
def test_every_stored_type_and_order_loads_as_nibabel_reads_it_with_the_files_sha256(
    tmp_path, dtype, axcodes, ending
):
    """A gzipped scan's voxels are a view of its un-gzipped bytes (no copy): the values,
    the scaling, the byte order and the voxel order are nibabel's. SAR stored is a C-ordered
    volume in RAS: the NaN then lands in the float copy, never in the read-only bytes."""
    data = blob_volume(8) / 50  # fractional: integer types get a scale factor
    if np.dtype(dtype).kind == "f":
        data[3, 4, 5] = np.nan
    moved, affine = reorder(data, np.diag([1.0, 1.2, 0.9, 1.0]), axcodes)
    header = nib.Nifti1Header(endianness=np.dtype(dtype).byteorder.replace("=", "<"))
    image = nib.Nifti1Image(moved, affine, header)
    image.set_data_dtype(np.dtype(dtype))
    path = tmp_path / f"scan{ending}"
    nib.save(image, path)
    expected = nib.as_closest_canonical(nib.load(path)).get_fdata(dtype=np.float32)
    expected[~np.isfinite(expected)] = 0

    volume = load_volume(path, digest=True)
    np.testing.assert_allclose(volume.data, expected, rtol=1e-6, atol=1e-6)
    assert volume.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert load_volume(path).sha256 == ""


def test_four_d_needs_a_volume_choice():
    with pytest.raises(ScanError, match=r"4-D with 2 volumes.*--volume"):
        load_volume(NIBABEL_DATA / "example4d.nii.gz")
    second = load_volume(NIBABEL_DATA / "example4d.nii.gz", volume=1)
    raw = nib.load(NIBABEL_DATA / "example4d.nii.gz").get_fdata()[..., 1]
    assert second.data.shape == raw.shape
    assert nib.aff2axcodes(second.affine) == ("R", "A", "S")
    with pytest.raises(ScanError, match="--volume 2 but the file has 2"):
        load_volume(NIBABEL_DATA / "example4d.nii.gz", volume=2)


def test_a_single_volume_4d_file_is_squeezed(tmp_path):
    data = blob_volume(4)[..., None]
    volume = load_volume(write_nifti(tmp_path / "one.nii", data))
    assert volume.data.shape == data.shape[:3]


def test_uneven_voxels_of_standard_nii_are_measured():
    volume = load_volume(NIBABEL_DATA / "standard.nii.gz")
    np.testing.assert_allclose(volume.voxel_size, [1, 3, 2])


def test_non_finite_voxels_become_zero_with_a_note(tmp_path):
    data = blob_volume(5)
    data[0, 0, :3] = [np.nan, np.inf, -np.inf]
    volume = load_volume(write_nifti(tmp_path / "nan.nii", data))
    assert np.isfinite(volume.data).all()
    assert volume.notes == ["3 NaN or infinite voxels set to 0"]


@pytest.mark.parametrize(
    ("make", "reason"),
    [
        (lambda p: p.write_text("not an image"), "not NIfTI"),
        (
            lambda p: write_nifti(p, np.full((8, 8, 8), 3.0, np.float32)),
            "constant: every voxel is 3",
        ),
        (lambda p: write_nifti(p, np.zeros((8, 8), np.float32)), "expected a 3-D volume"),
        (lambda p: write_nifti(p, np.zeros((8, 0, 8), np.float32)), "empty"),
        (lambda p: write_nifti(p, np.ones((4, 4, 4, 2, 2), np.float32)), "expected a 3-D volume"),
        (lambda p: write_nifti(p, blob_volume(1).astype(np.complex64)), "complex-valued"),
        (
            lambda p: write_nifti(p, np.zeros((4, 4, 4), [("R", "u1"), ("G", "u1"), ("B", "u1")])),
            "unsupported voxel type",
        ),
    ],
)
def test_bad_scans_are_refused_with_a_reason(tmp_path, make, reason):
    path = tmp_path / "bad.nii"
    make(path)
    with pytest.raises(ScanError, match=reason):
        load_volume(path)


def test_truncated_files_are_refused(tmp_path):
    whole = write_nifti(tmp_path / "whole.nii", blob_volume(6))
    cut = tmp_path / "cut.nii"
    cut.write_bytes(whole.read_bytes()[:5000])
    with pytest.raises(ScanError, match="truncated or unreadable"):
        load_volume(cut)
    gz = tmp_path / "cut.nii.gz"
    gz.write_bytes(gzip.compress(whole.read_bytes())[:3000])
    with pytest.raises(ScanError, match=r"truncated or unreadable|unreadable header"):
        load_volume(gz)


def test_singular_affine_is_refused(tmp_path):
    affine = np.eye(4)
    affine[2, 2] = 0
    image = nib.Nifti1Image(blob_volume(7), None)
    image.header.set_sform(affine, code=1)  # a damaged header: nibabel will not save it as affine
    path = tmp_path / "flat.nii"
    nib.save(image, path)
    with pytest.raises(ScanError, match="singular"):
        load_volume(path)


def test_no_slice_with_enough_foreground_is_empty():
    data = np.zeros((30, 30, 30), np.float32)
    data[15, 15, 15] = 1
    with pytest.raises(ScanError, match="empty: no axial slice"):
        cut_slices(data, data > 0, np.ones(3), "axial", 64, 0.05)


@pytest.mark.parametrize(
    ("axis", "marker", "corner"),
    [
        # RAS voxel axes: x to the patient's right, y anterior, z superior
        ("axial", (slice(0, 8), slice(32, 40), slice(None)), ("top", "left")),  # A, L
        ("coronal", (slice(0, 8), slice(None), slice(32, 40)), ("top", "left")),  # S, L
        ("sagittal", (slice(None), slice(32, 40), slice(32, 40)), ("top", "right")),  # S, A
    ],
)
def test_slices_are_oriented_as_the_preview_letters_say(axis, marker, corner):
    from loader.schema import VIEW_SIDES

    data = np.full((40, 40, 40), 10.0, dtype=np.float32)
    data[marker] = 100.0  # a bright block in one corner of the patient
    slices, _ = cut_slices(data, data > 5, np.ones(3), axis, 40, 0.05)
    image = slices[len(slices) // 2]
    rows, columns = np.nonzero(image > 0.5 * image.max())
    vertical = "top" if rows.mean() < 20 else "bottom"
    horizontal = "left" if columns.mean() < 20 else "right"
    assert (vertical, horizontal) == corner
    top, bottom, left, right = VIEW_SIDES[axis]
    sides = {"top": top, "bottom": bottom, "left": left, "right": right}
    expected = {"axial": ("A", "L"), "coronal": ("S", "L"), "sagittal": ("S", "A")}[axis]
    assert (sides[vertical], sides[horizontal]) == expected


def test_area_averaging_first_keeps_the_slices_of_gaussian_resampling(monkeypatch):
    from preprocess import slices

    rng = np.random.default_rng(0)
    volume = np.zeros((200, 256, 24), np.float32)  # 1 mm in-plane: shrunk by 4 to 64 pixels
    grid = np.meshgrid(np.linspace(-1, 1, 200), np.linspace(-1, 1, 256), indexing="ij")
    volume[(grid[0] / 0.8) ** 2 + (grid[1] / 0.9) ** 2 <= 1] = 1.0
    volume += rng.normal(0, 0.05, volume.shape).astype(np.float32)
    mask = volume > 0.5
    fast, _ = cut_slices(volume, mask, np.ones(3), "axial", 64, 0.05)
    original = slices.square_geometry

    def gaussian_only(shape, spacing, size):
        return original(shape, spacing, 10**9)  # the same padding, a block of 1: no averaging

    monkeypatch.setattr(slices, "square_geometry", gaussian_only)
    reference, _ = cut_slices(volume, mask, np.ones(3), "axial", 64, 0.05)
    assert fast.shape == reference.shape
    assert np.mean(np.abs(fast - reference)) < 0.01  # under the uint8 step of 1/255 x 3
    assert np.corrcoef(fast.ravel(), reference.ravel())[0, 1] > 0.999


@pytest.mark.parametrize(
    ("shape", "spacing", "size"),
    [((180, 256), (1.0, 1.0), 64), ((37, 50), (3.0, 1.2), 64), ((90, 77), (1.0, 1.0), 16)],
)
def test_resampling_by_matrices_equals_pad_average_smooth_and_zoom(shape, spacing, size):
    from scipy import ndimage

    from preprocess.slices import _resample, square_geometry

    rng = np.random.default_rng(1)
    stack = rng.random((3, *shape), dtype=np.float32)
    fill = 0.25
    target, before, block = square_geometry(shape, np.array(spacing), size)
    after = target - np.array(shape) - before
    padded = np.pad(
        stack, ((0, 0), (before[0], after[0]), (before[1], after[1])), constant_values=fill
    )
    rows, columns = (int(b) for b in block)
    averaged = padded.reshape(3, target[0] // rows, rows, target[1] // columns, columns)
    averaged = averaged.mean(axis=(2, 4))
    sigma = np.maximum(0, (np.array(averaged.shape[1:]) / size - 1) / 2)
    smoothed = ndimage.gaussian_filter(averaged, (0, *sigma), mode="nearest")
    zoom = (1, size / smoothed.shape[1], size / smoothed.shape[2])
    expected = ndimage.zoom(
        smoothed, zoom, order=1, mode="nearest", grid_mode=True, prefilter=False
    )
    out = _resample(stack, np.array(spacing), fill, size)
    assert out.shape == (3, size, size)
    np.testing.assert_allclose(out, expected[:, :size, :size], atol=1e-5)


def test_only_the_kept_slices_are_scaled_and_the_padding_is_the_scaled_minimum():
    data = np.zeros((20, 30, 10), np.int16)
    data[5:15, 5:25, 2:8] = 1000  # slices 2..7 have foreground
    data[8:12, 10:20, 2:8] = 3000
    slices, positions = cut_slices(
        data, data > 0, np.ones(3), "axial", 30, 0.05, (0.001, -1.0, True)
    )
    assert positions.tolist() == [2, 3, 4, 5, 6, 7]
    image = slices[0]  # 30 x 30: padded 20 -> 30 rows of 0, scaled to -1, clipped to 0
    assert image.min() == 0
    assert image.max() == pytest.approx(1.0, abs=1e-6)
    assert image[15, 15] == pytest.approx(1.0, abs=1e-6)  # the bright block, clipped from 2
