"""Write a BIDS tree of synthetic T1-weighted head phantoms in two groups a CNN can tell apart.

Each head has scalp, skull, CSF, grey and white matter and ventricles, with Gaussian noise,
a smooth bias field, a random voxel order (any of the 48 axis orders and flips), uneven
voxel sizes and a random stored data type. "patient" heads have a smaller brain inside the
skull (atrophy), enlarged ventricles and dark white-matter lesions; "control" heads do not.
Age (20 to 80, in participants.tsv) drives the anatomy too: older heads have larger
ventricles and a smaller brain, so age can be learnt from the slices (brain-age
regression). participants.tsv also has `sex` (F/M, not in the anatomy) and an `iq` column
left `n/a` for every fifth subject. Every third subject has two sessions. With `--flair`,
each session also gets a FLAIR image (on another voxel grid and order: the modalities are
aligned only through their affines) and its lesion mask as a BIDS derivative.

    python scripts/make_phantoms.py OUT --subjects 48 --seed 0 [--flair]

Import it for tests: ``head_phantom`` and ``write_bids`` are pure functions of their seeds.
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import shutil
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
from nibabel import orientations

GROUPS = ("control", "patient")
VOXEL_SIZES = ((2.0, 2.0, 2.0), (1.5, 1.5, 3.0), (2.5, 1.6, 1.6), (1.8, 2.6, 1.8), (1.2, 1.2, 2.4))
AXCODES = [
    "".join(codes)
    for order in itertools.permutations(("RL", "AP", "SI"))
    for codes in itertools.product(*order)
]


def head_phantom(
    rng: np.random.Generator,
    group: str,
    voxel_size=(2.0, 2.0, 2.0),
    fov_mm: float = 200.0,
    age: float = 50.0,
    extras: dict | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """A T1-like head in RAS voxel order.

    Args:
        rng: the random generator (head size, position, noise, lesions).
        group: ``control`` or ``patient``.
        voxel_size: mm along x, y, z.
        fov_mm: side of the field of view.
        age: years; from 20 to 80 the ventricles triple in size and the brain shrinks by 10%.
        extras: a dict to receive ``flair`` (a FLAIR-like image of the same head: dark
            CSF, bright lesions) and ``lesions`` (uint8, 1 on the white-matter lesions).
            The T1 image is the same with or without it.

    Returns:
        ``(data, affine)``: float32 intensities around 0..1000 and the RAS affine.
    """
    voxel_size = np.asarray(voxel_size, dtype=float)
    shape = np.round(fov_mm / voxel_size).astype(int)
    axes = [(np.arange(n) - (n - 1) / 2) * v for n, v in zip(shape, voxel_size, strict=True)]
    x, y, z = np.meshgrid(*axes, indexing="ij", sparse=True)
    centre = rng.normal(0, 4, 3)
    radii = np.array([70, 88, 75]) * rng.uniform(0.9, 1.08)
    x, y, z = x - centre[0], y - centre[1], z - centre[2]

    def inside(scale, r=radii, c=(0, 0, 0)):
        return ((x - c[0]) / (r[0] * scale)) ** 2 + ((y - c[1]) / (r[1] * scale)) ** 2 + (
            (z - c[2]) / (r[2] * scale)
        ) ** 2 <= 1

    data = np.zeros(shape, dtype=np.float32)
    flair = np.zeros(shape, dtype=np.float32)  # the same tissues, FLAIR-like contrast
    for scale, t1, value in ((1.0, 800, 500), (0.94, 150, 100), (0.88, 250, 80)):
        region = inside(scale)  # scalp and fat, skull, CSF
        data[region], flair[region] = t1, value
    patient = group == "patient"
    ageing = (age - 50.0) / 60.0  # -0.5 at 20, +0.5 at 80
    brain = rng.uniform(0.88, 0.92) if patient else rng.uniform(0.98, 1.02)  # atrophy
    brain *= 1 - 0.1 * ageing
    for scale, t1, value in ((0.84, 620, 600), (0.74, 900, 450)):
        region = inside(scale * brain)  # grey matter, white matter
        data[region], flair[region] = t1, value
    size = rng.uniform(1.6, 2.0) if patient else rng.uniform(0.8, 1.1)
    size *= 1 + ageing
    for side in (-1, 1):
        region = inside(1.0, np.array([9, 24, 14]) * size, (side * 7, 4, 8))  # ventricles
        data[region], flair[region] = 250, 80
    lesions = np.zeros(shape, dtype=bool)
    if patient:
        for _ in range(30):  # white-matter lesions: dark in T1, bright in FLAIR
            spot = rng.uniform(-1, 1, 3) * radii * 0.55
            region = inside(1.0, np.full(3, rng.uniform(4, 8)), spot) & (data == 900)
            data[region], flair[region] = 420, 950
            lesions |= region
    bias = (1 + 0.15 * (x / radii[0] + 0.5 * y / radii[1] - 0.5 * z / radii[2])).astype(np.float32)
    data *= bias
    data += rng.normal(0, 25, shape).astype(np.float32)
    np.abs(data, out=data)
    if extras is not None:  # drawn after the T1's noise: the T1 stays the same
        flair *= bias
        flair += rng.normal(0, 25, shape).astype(np.float32)
        extras["flair"] = np.abs(flair)
        extras["lesions"] = lesions.astype(np.uint8)
    affine = np.diag([*voxel_size, 1.0])
    affine[:3, 3] = -(shape - 1) / 2 * voxel_size
    return data, affine


def reorder(data: np.ndarray, affine: np.ndarray, axcodes: str) -> tuple[np.ndarray, np.ndarray]:
    """The same image stored in another voxel order (e.g. ``"PSL"``)."""
    transform = orientations.ornt_transform(
        orientations.io_orientation(affine), orientations.axcodes2ornt(tuple(axcodes))
    )
    return (
        orientations.apply_orientation(data, transform),
        affine @ orientations.inv_ornt_aff(transform, data.shape),
    )


def save(path: Path, data: np.ndarray, affine: np.ndarray, dtype: str) -> None:
    """Save as NIfTI in ``dtype`` (int16 and uint16 with a scale factor where it helps)."""
    image = nib.Nifti1Image(data.astype(np.float32), affine)
    image.set_data_dtype(np.dtype(dtype))
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(image, path)


def write_bids(
    out: Path, subjects: int, seed: int, voxel_sizes=VOXEL_SIZES, flair: bool = False
) -> list[dict]:
    """Write the BIDS tree; returns the participants' rows.

    Args:
        out: the folder.
        subjects: how many; groups alternate, every third subject has two sessions.
        seed: the seed of everything random.
        voxel_sizes: the voxel sizes (mm) to draw from. Defaults to ``VOXEL_SIZES``.
        flair: also write each session's FLAIR (``*_FLAIR.nii.gz``, another voxel grid and
            order of the same space) and its lesion mask as a BIDS derivative
            (``derivatives/lesions/sub-*/[ses-*/]anat/*_desc-lesion_mask.nii.gz``, in the
            T1's space, another voxel order). The T1 scans are the same either way.
    """
    rng = np.random.default_rng(seed)
    other = np.random.default_rng(seed + 1_000_003)  # FLAIR grids and orders
    rows = []
    for index in range(subjects):
        subject = f"{index + 1:03d}"
        group = GROUPS[index % 2]
        age = int(rng.integers(20, 81))
        sessions = ["01", "02"] if index % 3 == 2 else [""]
        for session in sessions:
            voxel_size = voxel_sizes[rng.integers(len(voxel_sizes))]
            same_head = copy.deepcopy(rng)  # the same draws: the same head on other grids
            data, affine = head_phantom(rng, group, voxel_size, age=age)
            data, affine = reorder(data, affine, AXCODES[rng.integers(len(AXCODES))])
            where = Path(f"sub-{subject}") / (f"ses-{session}" if session else "") / "anat"
            name = "_".join(filter(None, [f"sub-{subject}", session and f"ses-{session}"]))
            dtype = ("int16", "float32", "uint16")[rng.integers(3)]
            save(out / where / f"{name}_T1w.nii.gz", data, affine, dtype)
            if flair:
                _write_flair(out, where, name, (same_head, group, voxel_size, age), other)
        rows.append(
            {
                "participant_id": f"sub-{subject}",
                "group": group,
                "age": age,
                "sex": "FM"[int(rng.integers(2))],
                "iq": "n/a" if index % 5 == 4 else int(rng.integers(85, 130)),
            }
        )
    with open(out / "participants.tsv", "w") as handle:
        handle.write("\t".join(rows[0]) + "\n")
        for row in rows:
            handle.write("\t".join(str(value) for value in row.values()) + "\n")
    (out / "dataset_description.json").write_text(
        json.dumps(
            {"Name": "slicestore head phantoms", "BIDSVersion": "1.9.0", "DatasetType": "raw"}
        )
    )
    return rows


def _write_flair(out: Path, where: Path, name: str, head: tuple, other) -> None:
    """A session's FLAIR on another grid and its lesion mask on the T1's grid."""
    rng, group, voxel_size, age = head
    extras: dict = {}
    _, affine = head_phantom(copy.deepcopy(rng), group, voxel_size, age=age, extras=extras)
    mask, affine = reorder(extras["lesions"], affine, AXCODES[other.integers(len(AXCODES))])
    save(
        out / "derivatives" / "lesions" / where / f"{name}_desc-lesion_mask.nii.gz",
        mask,
        affine,
        "uint8",
    )
    grid = VOXEL_SIZES[other.integers(len(VOXEL_SIZES))]
    extras = {}
    _, affine = head_phantom(rng, group, grid, age=age, extras=extras)
    data, affine = reorder(extras["flair"], affine, AXCODES[other.integers(len(AXCODES))])
    save(out / where / f"{name}_FLAIR.nii.gz", data, affine, "int16")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("out", type=Path, help="the BIDS folder to write")
    parser.add_argument("--subjects", type=int, default=48, help="number of subjects (default: 48)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing folder")
    parser.add_argument(
        "--flair",
        action="store_true",
        help="also a FLAIR per session and lesion masks under derivatives/lesions",
    )
    args = parser.parse_args(argv)
    if args.subjects < 1:
        print("error: --subjects must be at least 1", file=sys.stderr)
        return 2
    if args.out.exists():
        if not args.overwrite:
            print(f"error: {args.out}: exists; use --overwrite to replace it", file=sys.stderr)
            return 2
        shutil.rmtree(args.out)
    args.out.mkdir(parents=True)
    rows = write_bids(args.out, args.subjects, args.seed, flair=args.flair)
    print(f"wrote {len(rows)} subjects to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
