"""Standard space on real heads: slicestore's registration against ANTsPy's, scan by scan.

The real scans of ``../shared/real`` (T1 heads as NIfTI, and the T1w series of DICOM exams,
converted and classified as ``python -m preprocess`` does) and moved copies of them are
registered with slicestore (``preprocess.standard.register``, as ``--space mni`` runs it).
The reference is ANTsPy (N4, then ``type_of_transform="Affine"``) onto the same MNI152 head
with skull (``preprocess.standard.HEAD``): for each scan, the distance between where the two
registrations put the template's brain (mean and worst over its voxels, mm), slicestore's
seconds and similarity, and whether the run would list it under ``check registration``.

A moved copy is the scan under a known affine map written into its header (rotation, shift,
scale; a head turned 90 or 180 degrees, as a patient on a side or prone whose header does
not say so), or its bottom planes cut off, or the scan reduced to its brain (outside ANTs' brain
mask set to 0), or averaged into 5 mm slices: its reference is the scan's, moved the same way.
ANTsPy is a dependency of this script only (``pip install antspyx``).

    python scripts/bench_real_heads.py [--real ../shared/real] [--copies]
    python scripts/bench_real_heads.py --write-reference tests/data/real_heads_ants.json
    python scripts/bench_real_heads.py --copies --reference tests/data/real_heads_ants.json
    python scripts/bench_real_heads.py --more T2w.nii.gz chris_PD.nii.gz  # other contrasts
    python scripts/bench_real_heads.py --offsets  # the similarity 6-20 mm off, per scan
"""

from __future__ import annotations

import os

os.environ.setdefault("ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS", "1")  # read once, at import
os.environ.setdefault("ANTS_RANDOM_SEED", "1")

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
from machine import machine_line
from scipy import ndimage

from preprocess import dicom, standard
from preprocess.standard import CHECK_FLOOR
from preprocess.volume import Volume, load_volume

REAL = Path(__file__).resolve().parents[1].parent / "shared" / "real"
LPS = np.diag([-1.0, -1.0, 1.0])  # ITK's world is LPS, nibabel's RAS


def real_scans(root: Path) -> dict[str, Path]:
    """name -> NIfTI file: the heads, and each DICOM exam's T1w series (converted into a
    temporary folder that lives as long as the process)."""
    scans = {path.name.split(".")[0]: path for path in sorted((root / "heads").glob("*.nii*"))}
    folders, _ = dicom.find_folders(sorted((root / "dicom").glob("*")))
    converted = dicom.convert(folders, dicom.Naming(keep=True), None)
    for scan in converted.scans:
        parts = Path(scan.source).parts  # exam / subject / session / series
        scans[f"{parts[0]}/{parts[-1]}"] = scan.path
    return scans


def ants_reference(path: Path) -> tuple[np.ndarray, float]:
    """``(template world -> scan world in RAS, seconds)``: ANTsPy's N4 and affine onto the head."""
    import ants

    files, name = standard.HEAD
    fixed = ants.image_read(str(files.path(name)))
    started = time.perf_counter()
    moving = ants.n4_bias_field_correction(ants.image_read(str(path)))
    with tempfile.TemporaryDirectory() as folder:
        result = ants.registration(
            fixed, moving, "Affine", random_seed=1, outprefix=f"{folder}/reg_"
        )
        transform = ants.read_transform(result["fwdtransforms"][0])
    seconds = time.perf_counter() - started
    parameters, centre = np.array(transform.parameters), np.array(transform.fixed_parameters)
    matrix = parameters[:9].reshape(3, 3)
    offset = parameters[9:12] + centre - matrix @ centre  # fixed LPS -> moving LPS
    result = np.eye(4)
    result[:3, :3], result[:3, 3] = LPS @ matrix @ LPS, LPS @ offset
    return result, seconds


def motion(degrees=(0, 0, 0), shift=(0, 0, 0), scale: float = 1.0) -> np.ndarray:
    """A rigid map (degrees about x, then y, then z), scaled, then shifted (mm)."""
    result = np.eye(4)
    for axis, angle in enumerate(np.radians(degrees)):
        c, s = np.cos(angle), np.sin(angle)
        i, j = [k for k in range(3) if k != axis]
        turn = np.eye(4)
        turn[i, i], turn[i, j], turn[j, i], turn[j, j] = c, -s, s, c
        result = turn @ result
    result[:3, :3] *= scale
    result[:3, 3] = shift
    return result


# name -> (map written into the header, mm cut off the bottom)
MOVES = {
    "rotated 20 about x": (motion((20, 0, 0)), 0),
    "rotated -15 y, 12 z, shifted 25 mm": (motion((0, -15, 12), (15, -20, 25)), 0),
    "scaled +7 %": (motion(scale=1.07), 0),
    "scaled -7 %, rotated 10": (motion((10, 5, 0), scale=0.93), 0),
    "bottom 20 mm cut off": (motion(), 20),
    "rotated 15, bottom 10 mm cut off": (motion((-15, 0, 8), (0, 10, -10)), 10),
    "turned 90 about z (on its side)": (motion((0, 0, 90)), 0),
    "turned 180 about z (prone)": (motion((0, 0, 180), (0, 15, 0)), 0),
    "bent 60 about x": (motion((60, 0, 0)), 0),
}


def moved(volume: Volume, change: np.ndarray, cut_mm: float) -> Volume:
    """The volume with ``change`` written into its affine, its bottom ``cut_mm`` removed."""
    voxels, affine = volume.voxels, volume.affine.copy()
    if cut_mm:
        planes = round(cut_mm / volume.voxel_size[2])
        voxels = voxels[:, :, planes:]
        affine[:3, 3] += affine[:3, 2] * planes
    return Volume(voxels, change @ affine, volume.voxel_size, [], volume.slope, volume.inter)


def brain_only(volume: Volume, reference: np.ndarray, template) -> Volume:
    """The volume with every voxel outside the template's brain (through ANTs' map, dilated
    by 1 mm) set to 0: a skull-stripped scan."""
    matrix = np.linalg.inv(template.affine) @ np.linalg.inv(reference) @ volume.affine
    brain = ndimage.binary_dilation(template.brain).astype(np.uint8)
    inside = ndimage.affine_transform(brain, matrix, output_shape=volume.shape, order=0) > 0
    voxels = np.where(inside, volume.voxels, 0).astype(volume.voxels.dtype)
    return Volume(voxels, volume.affine, volume.voxel_size, [], volume.slope, volume.inter)


def thick_slices(volume: Volume, mm: float = 5.0) -> Volume:
    """The volume averaged into ``mm`` slices along its third axis (a 2-D acquisition)."""
    factor = max(1, round(mm / volume.voxel_size[2]))
    planes = volume.shape[2] // factor
    shape = (*volume.shape[:2], planes, factor)
    voxels = volume.voxels[:, :, : planes * factor].reshape(shape).mean(axis=3, dtype=np.float32)
    affine = volume.affine.copy()
    affine[:3, 3] += volume.affine[:3, 2] * (factor - 1) / 2
    affine[:3, 2] *= factor
    size = volume.voxel_size * [1, 1, factor]
    return Volume(voxels, affine, size, [], volume.slope, volume.inter)


def distance_mm(to_template: np.ndarray, reference: np.ndarray, points: np.ndarray):
    """``(mean, worst)`` distance between where two registrations send the template's points."""
    gap = np.linalg.inv(to_template) @ points - reference @ points
    distances = np.linalg.norm(gap[:3], axis=0)
    return float(distances.mean()), float(distances.max())


def brain_points(template, count: int = 5000) -> np.ndarray:
    inside = np.argwhere(template.brain)
    picked = inside[np.random.default_rng(0).choice(len(inside), count, replace=False)]
    return template.affine @ np.c_[picked, np.ones(count)].T


OFFSETS_MM = (0, 6, 9, 12, 20)


def similarities_moved(volume: Volume, reference: np.ndarray, template, shifts) -> list[float]:
    """The similarity (as ``register`` scores it) of the reference registration moved on
    purpose by each shift (mm along the template's axes; ``--offsets``: each of
    :data:`OFFSETS_MM` along each axis): what the check floor must tell apart."""
    sitk = standard._simpleitk()
    work, work_affine = standard.working_image(volume)
    _, log_bias = standard._corrected(sitk, work, work_affine)
    planes = template.planes()
    result = []
    for shift in shifts:
        to_scan = reference.copy()
        to_scan[:3, 3] += to_scan[:3, :3] @ np.asarray(shift, dtype=float)
        data = standard._on_template(volume, log_bias, work_affine, to_scan, template, planes)
        result.append(standard.similarity_to_template(data, template, planes))
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--real", type=Path, default=REAL, help=f"default: {REAL}")
    parser.add_argument("--copies", action="store_true", help="also the moved copies")
    parser.add_argument(
        "--more",
        type=Path,
        nargs="+",
        default=[],
        metavar="FILE",
        help="more real scans, NIfTI (e.g. other contrasts from niivue's demo images)",
    )
    parser.add_argument(
        "--offsets",
        action="store_true",
        help="also the similarity of each scan's reference moved 6-20 mm (the check's margin)",
    )
    parser.add_argument(
        "--reference", type=Path, metavar="FILE.json", help="ANTs' maps saved before: no ANTs run"
    )
    parser.add_argument(
        "--write-reference", type=Path, metavar="FILE.json", help="save ANTs' maps (the tests')"
    )
    args = parser.parse_args(argv)
    template = standard.load_template("axial", 0.05)
    points = brain_points(template)
    print(machine_line("SimpleITK", "antspyx", "nimare"))
    print(
        "| scan | copy | slicestore s | ANTs s | distance to ANTs, mean / worst (mm) | "
        "similarity | flagged |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- |")
    saved = json.loads(args.reference.read_text()) if args.reference else {}
    references, rows = {}, []
    scans = real_scans(args.real) | {path.name.split(".")[0]: path for path in args.more}
    for name, path in scans.items():
        if name in saved:
            reference, ants_seconds = np.array(saved[name]), float("nan")
        else:
            reference, ants_seconds = ants_reference(path)
        references[name] = reference.tolist()
        volume = load_volume(path)
        copies = {"as is": (volume, reference)}
        if args.copies:
            for move, (change, cut) in MOVES.items():
                copies[move] = (moved(volume, change, cut), change @ reference)
            copies["skull-stripped"] = (brain_only(volume, reference, template), reference)
            copies["5 mm slices"] = (thick_slices(volume), reference)
        for copy, (scan, truth) in copies.items():
            started = time.perf_counter()
            registration = standard.register(scan, template)
            seconds = time.perf_counter() - started
            mean, worst = distance_mm(registration.to_template, truth, points)
            flagged = registration.similarity < CHECK_FLOOR
            rows.append((mean, worst, registration.similarity, flagged, seconds))
            ants = f"{ants_seconds:.1f}" if copy == "as is" and ants_seconds == ants_seconds else ""
            print(
                f"| {name} | {copy} | {seconds:.1f} | {ants} | {mean:.1f} / {worst:.1f} | "
                f"{registration.similarity:.2f} | {'yes' if flagged else 'no'} |",
                flush=True,
            )
    means, worsts, similarities, flags, seconds = zip(*rows, strict=True)
    print(
        f"\n{len(rows)} registrations: mean distance {min(means):.1f}-{max(means):.1f} mm, "
        f"worst {max(worsts):.1f} mm; similarity {min(similarities):.2f}-"
        f"{max(similarities):.2f}; {sum(flags)} flagged (below {CHECK_FLOOR}); "
        f"slicestore {statistics.median(seconds):.1f} s a scan (median, one thread)"
    )
    if args.offsets:
        print("\n| scan | " + " | ".join(f"{mm} mm off" for mm in OFFSETS_MM) + " |")
        print("| --- |" + " --- |" * len(OFFSETS_MM))
        offsets = [
            (mm, np.eye(3)[axis] * mm) for mm in OFFSETS_MM for axis in range(3 if mm else 1)
        ]
        for name, path in scans.items():
            reference, shifts = np.array(references[name]), [shift for _, shift in offsets]
            values = similarities_moved(load_volume(path), reference, template, shifts)
            off = {}
            for (mm, _), value in zip(offsets, values, strict=True):
                off.setdefault(mm, []).append(value)
            cells = [
                f"{min(v):.2f}-{max(v):.2f}" if len(v) > 1 else f"{v[0]:.2f}" for v in off.values()
            ]
            print(f"| {name} | " + " | ".join(cells) + " |", flush=True)
    if args.write_reference:
        args.write_reference.write_text(json.dumps(references, indent=1) + "\n")
        print(f"wrote ANTs' maps (template world -> scan world, RAS) to {args.write_reference}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
