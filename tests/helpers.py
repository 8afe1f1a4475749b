"""What several test modules build: scans, stores whose rows carry their ids, free ports.
Fixtures stay in ``conftest.py``; test modules import these by name (runs stopped and
resumed are in ``run_helpers.py``, which loads Keras)."""

from __future__ import annotations

import csv
import socket
from dataclasses import asdict
from pathlib import Path

import h5py
import nibabel as nib
import numpy as np
from make_heads import moved_head, scanner_grid, write_head

from preprocess.settings import Settings
from preprocess.writer import Partial, scan_record

NIBABEL_DATA = Path(nib.__file__).parent / "tests" / "data"
COARSE_VOXELS = ((4.0, 4.0, 4.0), (3.0, 3.0, 6.0), (5.0, 3.2, 3.2))


def write_nifti(path: Path, data: np.ndarray, affine=None, dtype=None) -> Path:
    """Save ``data`` as NIfTI (``affine`` defaults to 1 mm voxels)."""
    image = nib.Nifti1Image(np.asarray(data), np.eye(4) if affine is None else affine)
    if dtype is not None:
        image.set_data_dtype(np.dtype(dtype))
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(image, path)
    return path


def blob_volume(seed: int, shape=(40, 44, 36), value: float = 100.0) -> np.ndarray:
    """A seeded volume: a bright ellipsoid with noise in a dark background."""
    rng = np.random.default_rng(seed)
    grid = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    radii = rng.uniform(0.5, 0.8, 3)
    inside = sum((g / r) ** 2 for g, r in zip(grid, radii, strict=True)) <= 1
    data = rng.normal(0, 2, shape).astype(np.float32)
    data[inside] += value * rng.uniform(0.8, 1.2)
    return data


def iter_rows(dataset: h5py.Dataset, block: int = 512):
    """A dataset in blocks of rows, never whole."""
    for start in range(0, dataset.shape[0], block):
        yield dataset[start : start + block]


def assert_same_store_content(path_a: Path, path_b: Path) -> None:
    """The two stores hold identical /images and /labels."""
    with h5py.File(path_a, "r") as a, h5py.File(path_b, "r") as b:
        for name in ("images", "labels"):
            assert a[name].shape == b[name].shape
            for block_a, block_b in zip(iter_rows(a[name]), iter_rows(b[name]), strict=True):
                np.testing.assert_array_equal(block_a, block_b)


def write_id_store(
    path: Path,
    scans: int = 12,
    slices_per_scan: int = 20,
    chunk_slices: int = 8,
    dtype: str = "uint8",
    compression: str = "none",
    labelled: bool = True,
    val_fraction: float = 0.25,
    seed: int = 0,
    classes: str = "ab",
    unlabelled: int = 0,
    size: int = 64,
) -> Path:
    """A store, written by the project's writer, whose slices (``size`` x ``size``) carry
    their canonical row id.

    Canonical row ``r`` (scan ``r // slices_per_scan``) holds ``r`` in pixels ``[0, 0:3]``
    as base-256 digits (``decode_ids`` reads them back); scans take the ``classes`` in turn
    (one letter each), one subject per scan; the last ``unlabelled`` scans have no label.
    """
    settings = Settings(
        size=size,
        dtype=dtype,
        normalize="percentile" if dtype == "uint8" else "none",
        compression=compression,
        chunk_slices=chunk_slices,
        val_fraction=val_fraction,
        seed=seed,
    )
    partial = Partial(path, {**asdict(settings), "inputs": []})
    rng = np.random.default_rng(seed)
    for scan in range(scans):
        ids = scan * slices_per_scan + np.arange(slices_per_scan)
        slices = rng.integers(0, 256, (slices_per_scan, size, size)).astype(dtype)
        slices[:, 0, :3] = np.stack([ids // 65536, ids // 256 % 256, ids % 256], axis=1)
        label = classes[scan % len(classes)] if labelled and scan < scans - unlabelled else None
        record = scan_record(f"s{scan:03d}.nii", f"{scan:03d}", range(slices_per_scan), label=label)
        partial.add(record, slices)
    partial.finalize(sorted(set(classes)) if labelled else [])
    return path


def decode_ids(x: np.ndarray, scale: float = 255.0) -> np.ndarray:
    """The row ids carried by a batch ``x`` of shape ``(b, h, w, 1)`` or ``(b, 1, h, w)``."""
    digits = np.rint(x.reshape(len(x), -1)[:, :3] * scale).astype(np.int64)
    return digits[:, 0] * 65536 + digits[:, 1] * 256 + digits[:, 2]


def read_rows(path: Path) -> list[dict]:
    """A CSV file's rows, as dicts by its header."""
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


# Heads for standard space (--space mni): (shape, voxel size, voxel order) of each subject's
# T1, no two alike
GRIDS = [
    ((88, 110, 100), (2.0, 2.0, 2.0), "RAS"),
    ((120, 150, 60), (1.5, 1.5, 3.0), "LPS"),
    ((110, 70, 130), (1.6, 2.6, 1.6), "PIR"),
]
FLAIR_GRID = ((70, 90, 60), (2.5, 2.5, 3.0), "LAS")
LESION_MM = np.array([30.0, -20.0, 20.0])  # template world: a sphere of label 1 around it
LESION_RADIUS = 12.0


def lesion_mask(affine: np.ndarray, shape, to_template: np.ndarray) -> np.ndarray:
    """The lesion sphere on a grid (``affine``, ``shape``) of a head moved by ``to_template``."""
    grid = np.indices(shape).reshape(3, -1).T
    world = grid @ affine[:3, :3].T + affine[:3, 3]
    in_template = world @ to_template[:3, :3].T + to_template[:3, 3]
    inside = np.linalg.norm(in_template - LESION_MM, axis=1) < LESION_RADIUS
    return inside.reshape(shape).astype(np.uint8)


def write_moved_heads(
    root, seed: int = 0, grids=GRIDS, flair: bool = True
) -> dict[str, np.ndarray]:
    """A BIDS tree of heads moved by known affines (``make_heads``): T1w on ``grids``, FLAIR
    on another grid, a lesion mask (a sphere at ``LESION_MM`` of the template) on a third;
    returns subject id -> the true scanner-to-template map."""
    rng = np.random.default_rng(seed)
    truths = {}
    (root / "participants.tsv").parent.mkdir(parents=True, exist_ok=True)
    rows = ["participant_id\tgroup"]
    for index, (shape, voxel, order) in enumerate(grids):
        subject = f"{index + 1:02d}"
        anat = root / f"sub-{subject}" / "anat"
        anat.mkdir(parents=True)
        truths[subject] = write_head(anat / f"sub-{subject}_T1w.nii.gz", rng, shape, voxel, order)
        rows.append(f"sub-{subject}\t{'ab'[index % 2]}")
        if not flair:
            continue
        flair_shape, flair_voxel, flair_order = FLAIR_GRID
        affine = scanner_grid(flair_shape, flair_voxel, flair_order)
        t1_like = moved_head(truths[subject], affine, flair_shape, rng).astype(np.float32)
        write_nifti(anat / f"sub-{subject}_FLAIR.nii.gz", np.sqrt(t1_like) * 50, affine, np.int16)
        masks = root / "derivatives" / "lesions" / f"sub-{subject}" / "anat"
        masks.mkdir(parents=True)
        mask_affine = scanner_grid((90, 100, 90), (3.0, 3.0, 3.0), "RPI")  # covers the T1
        lesion = lesion_mask(mask_affine, (90, 100, 90), truths[subject])
        write_nifti(masks / f"sub-{subject}_desc-lesion_mask.nii.gz", lesion, mask_affine, np.uint8)
    (root / "participants.tsv").write_text("\n".join(rows) + "\n")
    return truths


MNI = dict(space="mni", suffix=("T1w", "FLAIR"), masks="lesion", label_column="group", size=32)


MNI_SETTINGS = dict(
    space="mni", suffix=("T1w", "FLAIR"), masks="lesion", label_column="group", size=32
)
