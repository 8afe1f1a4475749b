"""Which registration library for standard space: ANTsPy or SimpleITK, on the same heads.

Two measurements. The first (below) runs each library's usual whole-image schedule on the
template moved by known affines. The second, ``--schedule slicestore``, runs the schedule
``--space mni`` ships (``preprocess.standard``: ~2 mm working images, N4 at ~8 mm, a
similarity then an affine stage sampled inside the template's brain) in both libraries on
``make_heads`` heads (skull, scalp, neck, scanner grids of 1 mm, 176 x 256 x 256): SimpleITK
through slicestore's own code, ANTsPy through the same steps in its API.

The first measurement: the fixed image is the MNI152
2009a T1 template that ships inside nilearn's wheel (1 mm, skull-stripped); moving heads
are that brain under known affine maps (rotations up to 15 degrees, scaling up to 10 %,
shifts up to 20 mm, a little shear) with a smooth multiplicative bias field and noise.
Each library, with one thread (as one preprocessing worker would have), does N4 bias
correction of the moving head, then a 12-parameter affine registration at reduced
resolution (Mattes mutual information, 20 % random sampling, a fixed seed). The error is
the distance in mm between where the estimated and the true transform send 2,000 points
of the template's brain. (``make_phantoms`` heads, smooth and nearly symmetric, do not
register to a few mm with either library: a poor test of registration.)

    pip install antspyx SimpleITK nilearn
    python scripts/bench_registration.py --heads 3 [--coarse]
    python scripts/bench_registration.py --heads 4 --schedule slicestore
"""

from __future__ import annotations

import os

os.environ.setdefault("ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS", "1")  # read once, at import
os.environ.setdefault("ANTS_RANDOM_SEED", "1")

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
from machine import machine_line
from scipy import ndimage

SHRINK, SIGMAS, ITERATIONS, N4_SHRINK = (4, 2), (2.0, 1.0), (200, 100), 4  # --schedule
TEMPLATE = "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz"


def fixed_head() -> np.ndarray:
    """The MNI152 2009a T1 template that ships inside nilearn's wheel (1 mm, skull-stripped,
    197 x 233 x 189), as float32 in 0..1000."""
    import nibabel as nib
    import nilearn

    path = Path(nilearn.__file__).parent / "datasets" / "data" / TEMPLATE
    return np.asarray(nib.load(path).dataobj, dtype=np.float32) * (1000 / 255)


def known_motion(rng: np.random.Generator, shape) -> tuple[np.ndarray, np.ndarray]:
    """``(matrix, offset)`` in voxels: the moving head at voxel p shows the fixed head at
    M p + o (``make_heads.known_motion`` about the grid's centre)."""
    from make_heads import known_motion as motion

    moved = motion(rng)
    matrix = moved[:3, :3]
    centre = (np.array(shape) - 1) / 2
    return matrix, centre - matrix @ centre + moved[:3, 3]


def moving_head(fixed: np.ndarray, matrix, offset, rng: np.random.Generator) -> np.ndarray:
    moved = ndimage.affine_transform(fixed, matrix, offset, order=1, output=np.float32)
    grid = np.meshgrid(*[np.linspace(-1, 1, n) for n in moved.shape], indexing="ij", sparse=True)
    bias = np.exp(0.25 * grid[0] - 0.2 * grid[1] * grid[2] + 0.15 * grid[2] ** 2)
    noisy = moved * bias.astype(np.float32) + rng.normal(0, 8, moved.shape).astype(np.float32)
    return np.clip(noisy, 0, None)


def with_ants(fixed: np.ndarray, moving: np.ndarray, points: np.ndarray) -> dict:
    import ants

    fixed_image, moving_image = ants.from_numpy(fixed), ants.from_numpy(moving)
    started = time.perf_counter()
    mask = ants.from_numpy((moving > 100).astype(np.float32))
    corrected = ants.n4_bias_field_correction(moving_image, mask=mask, shrink_factor=N4_SHRINK)
    n4 = time.perf_counter() - started
    with tempfile.TemporaryDirectory() as folder:
        started = time.perf_counter()
        result = ants.registration(
            fixed_image,
            corrected,
            type_of_transform="Affine",
            aff_metric="mattes",
            aff_sampling=32,
            aff_random_sampling_rate=0.2,
            aff_iterations=ITERATIONS,
            aff_shrink_factors=SHRINK,
            aff_smoothing_sigmas=SIGMAS,
            outprefix=str(Path(folder) / "reg_"),
        )
        affine = time.perf_counter() - started
        transform = ants.read_transform(result["fwdtransforms"][0])
        mapped = np.array([transform.apply_to_point(tuple(p)) for p in points])
    return {"N4 s": n4, "affine s": affine, "mapped": mapped}


def with_simpleitk(fixed: np.ndarray, moving: np.ndarray, points: np.ndarray) -> dict:
    import SimpleITK as sitk

    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(1)
    as_image = lambda a: sitk.GetImageFromArray(np.ascontiguousarray(a.transpose(2, 1, 0)))  # noqa: E731
    fixed_image, moving_image = as_image(fixed), as_image(moving)
    started = time.perf_counter()
    mask = as_image((moving > 100).astype(np.uint8))
    shrunk = sitk.Shrink(moving_image, [N4_SHRINK] * 3)
    corrector = sitk.N4BiasFieldCorrectionImageFilter()
    corrector.Execute(shrunk, sitk.Shrink(mask, [N4_SHRINK] * 3))
    bias = corrector.GetLogBiasFieldAsImage(moving_image)
    corrected = sitk.Cast(moving_image / sitk.Exp(bias), sitk.sitkFloat32)
    n4 = time.perf_counter() - started
    started = time.perf_counter()
    initial = sitk.CenteredTransformInitializer(
        fixed_image,
        corrected,
        sitk.AffineTransform(3),
        sitk.CenteredTransformInitializerFilter.MOMENTS,
    )
    method = sitk.ImageRegistrationMethod()
    method.SetMetricAsMattesMutualInformation(32)
    method.SetMetricSamplingStrategy(method.RANDOM)
    method.SetMetricSamplingPercentage(0.2, 1)
    method.SetInterpolator(sitk.sitkLinear)
    method.SetOptimizerAsRegularStepGradientDescent(1.0, 1e-4, max(ITERATIONS))
    method.SetOptimizerScalesFromPhysicalShift()
    method.SetShrinkFactorsPerLevel(list(SHRINK))
    method.SetSmoothingSigmasPerLevel(list(SIGMAS))
    method.SetInitialTransform(initial, inPlace=True)
    method.Execute(fixed_image, corrected)
    affine = time.perf_counter() - started
    mapped = np.array([initial.TransformPoint(tuple(float(v) for v in p)) for p in points])
    return {"N4 s": n4, "affine s": affine, "mapped": mapped}


COLUMNS = "N4 s | affine s | total s | mean error mm | max error mm | worst head's mean mm"
LPS = np.diag([-1.0, -1.0, 1.0, 1.0])  # ITK's world (ANTsPy's images) from nibabel's RAS


def _ants_image(data: np.ndarray, affine: np.ndarray):
    """An ANTsPy image of a RAS volume, placed in ITK's LPS world."""
    import ants

    world = LPS @ affine
    spacing = np.sqrt((world[:3, :3] ** 2).sum(axis=0))
    return ants.from_numpy(
        np.ascontiguousarray(data, dtype=np.float32),
        origin=tuple(world[:3, 3]),
        spacing=tuple(spacing),
        direction=world[:3, :3] / spacing,
    )


def ants_schedule(volume, template) -> tuple[np.ndarray, float, float]:
    """slicestore's schedule in ANTsPy: ``(template world -> scan world, N4 s, affine s)``."""
    import ants

    from preprocess import standard

    fixed, head = standard._head()  # the same 2 mm head and metric mask, as arrays
    import SimpleITK as sitk

    def array_and_affine(image):
        data = sitk.GetArrayFromImage(image).transpose(2, 1, 0).astype(np.float32)
        spacing, origin = np.array(image.GetSpacing()), np.array(image.GetOrigin())
        affine = np.eye(4)
        affine[:3, :3] = np.array(image.GetDirection()).reshape(3, 3) * spacing
        affine[:3, 3] = origin
        return data, affine

    fixed_image = _ants_image(*array_and_affine(fixed))
    fixed_mask = _ants_image(*array_and_affine(head))
    work, work_affine = standard.working_image(volume)
    moving = _ants_image(work, work_affine)
    started = time.perf_counter()
    foreground = _ants_image(standard.foreground(work).astype(np.float32), work_affine)
    corrected = ants.n4_bias_field_correction(
        moving,
        mask=foreground,
        shrink_factor=standard.N4_SHRINK,
        convergence={"iters": list(standard.N4_ITERATIONS), "tol": 1e-3},
    )
    n4 = time.perf_counter() - started
    corrected = _ants_image(*standard.top_of_head(corrected.numpy(), work_affine))  # no neck
    with tempfile.TemporaryDirectory() as folder:
        started = time.perf_counter()
        stages = []
        coarse, fine = standard.AFFINE_COARSE, standard.AFFINE_FINE  # one stage in ANTs
        affine = {key: coarse[key] + fine[key] for key in ("shrink", "sigma", "sampling")}
        affine["iterations"] = fine["iterations"]
        for kind, stage in (("Similarity", standard.SIMILARITY_STAGE), ("Affine", affine)):
            result = ants.registration(
                fixed_image,
                corrected,
                type_of_transform=kind,
                initial_transform=stages[-1] if stages else None,
                mask=fixed_mask,
                aff_metric="mattes",
                aff_sampling=32,
                aff_random_sampling_rate=stage["sampling"][-1],
                aff_iterations=[stage["iterations"]] * len(stage["shrink"]),
                aff_shrink_factors=stage["shrink"],
                aff_smoothing_sigmas=stage["sigma"],
                outprefix=str(Path(folder) / f"{kind}_"),
            )
            stages.append(result["fwdtransforms"][0])
        affine_seconds = time.perf_counter() - started
        transform = ants.read_transform(stages[-1])
        matrix = np.array(transform.parameters[:9]).reshape(3, 3)
        centre = np.array(transform.fixed_parameters)
        to_scan = np.eye(4)
        to_scan[:3, :3] = matrix
        to_scan[:3, 3] = np.array(transform.parameters[9:]) + centre - matrix @ centre
    return LPS @ to_scan @ LPS, n4, affine_seconds


def simpleitk_schedule(volume, template) -> tuple[np.ndarray, float, float]:
    """slicestore's own code: ``(template world -> scan world, N4 s, affine s)``."""
    from preprocess import standard

    sitk = standard._simpleitk()
    standard._head()
    work, work_affine = standard.working_image(volume)
    started = time.perf_counter()
    moving, _ = standard._corrected(sitk, work, work_affine)
    n4 = time.perf_counter() - started
    started = time.perf_counter()
    to_scan = standard._fit(sitk, moving, work_affine)
    return to_scan, n4, time.perf_counter() - started


def slicestore_schedule(heads: int) -> int:
    """The second measurement (``--schedule slicestore``); prints its table."""
    from make_heads import write_head

    from preprocess import standard
    from preprocess.volume import load_volume

    template = standard.load_template("axial", 0.05)
    rng = np.random.default_rng(1)
    inside = np.argwhere(template.brain)
    picked = inside[rng.choice(len(inside), 2000, replace=False)]
    points = np.c_[picked @ template.affine[:3, :3].T + template.affine[:3, 3], np.ones(2000)]
    rows = {"ANTsPy (antspyx)": [], "SimpleITK (slicestore's code)": []}
    with tempfile.TemporaryDirectory() as folder:
        for index in range(heads):
            path = Path(folder) / f"head{index}.nii.gz"
            truth = write_head(path, rng)
            volume = load_volume(path)
            for name, register in zip(rows, (ants_schedule, simpleitk_schedule), strict=True):
                to_scan, n4, affine = register(volume, template)
                true_scan = points @ np.linalg.inv(truth).T
                errors = np.linalg.norm((points @ to_scan.T - true_scan)[:, :3], axis=1)
                rows[name].append(
                    {
                        "N4 s": n4,
                        "affine s": affine,
                        "mean mm": errors.mean(),
                        "max mm": errors.max(),
                    }
                )
    print(f"{machine_line('SimpleITK', 'antspyx')}; one thread each")
    print(
        f"{heads} make_heads heads (176 x 256 x 256, 1 mm, skull and neck), slicestore's "
        "schedule in both libraries; medians over the heads\n"
    )
    print(f"| library | {COLUMNS} |")
    print("|---|---|---|---|---|---|---|")
    for name, results in rows.items():
        median = {key: statistics.median(r[key] for r in results) for key in results[0]}
        print(
            f"| {name} | {median['N4 s']:.1f} | {median['affine s']:.1f} "
            f"| {median['N4 s'] + median['affine s']:.1f} | {median['mean mm']:.2f} "
            f"| {median['max mm']:.2f} | {max(r['mean mm'] for r in results):.2f} |"
        )
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--heads", type=int, default=3, help="moving heads (default: 3)")
    parser.add_argument(
        "--coarse",
        action="store_true",
        help="shrink 8 and 4 (sigmas 3, 2), 100 and 50 iterations, N4 on an 8x shrunk head",
    )
    parser.add_argument(
        "--schedule",
        choices=("whole", "slicestore"),
        default="whole",
        help="whole: each library on whole 1 mm images; slicestore: --space mni's schedule",
    )
    args = parser.parse_args(argv)
    if args.schedule == "slicestore":
        return slicestore_schedule(args.heads)
    global SHRINK, SIGMAS, ITERATIONS, N4_SHRINK
    if args.coarse:
        SHRINK, SIGMAS, ITERATIONS, N4_SHRINK = (8, 4), (3.0, 2.0), (100, 50), 8
    fixed = fixed_head()
    rng = np.random.default_rng(1)
    brain = np.argwhere(fixed > 0.5 * fixed.max())
    points = brain[rng.choice(len(brain), 2000, replace=False)].astype(float)
    rows = {"ANTsPy (antspyx)": [], "SimpleITK": []}
    for _ in range(args.heads):
        matrix, offset = known_motion(rng, fixed.shape)
        moving = moving_head(fixed, matrix, offset, rng)
        truth = np.linalg.solve(matrix, (points - offset).T).T  # fixed point -> moving point
        for name, register in (("ANTsPy (antspyx)", with_ants), ("SimpleITK", with_simpleitk)):
            result = register(fixed, moving, points)
            errors = np.linalg.norm(result.pop("mapped") - truth, axis=1)
            rows[name].append(result | {"mean mm": errors.mean(), "max mm": errors.max()})
    print(f"{machine_line('SimpleITK', 'antspyx')}; one thread each")
    print(
        f"{args.heads} moving heads of {fixed.shape} voxels at 1 mm; medians over the heads; "
        f"affine: shrink {SHRINK}, sigmas {SIGMAS}, iterations {ITERATIONS}; "
        f"N4 shrink {N4_SHRINK}\n"
    )
    print(f"| library | {COLUMNS} |")
    print("|---|---|---|---|---|---|---|")
    for name, results in rows.items():
        median = {key: statistics.median(r[key] for r in results) for key in results[0]}
        total = median["N4 s"] + median["affine s"]
        print(
            f"| {name} | {median['N4 s']:.1f} | {median['affine s']:.1f} | {total:.1f} "
            f"| {median['mean mm']:.2f} | {median['max mm']:.2f} "
            f"| {max(r['mean mm'] for r in results):.2f} |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
