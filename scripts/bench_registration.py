"""Which registration library for standard space: ANTsPy or SimpleITK, on the same heads.

A first measurement for ``--space mni`` (not built yet). The fixed image is the MNI152
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
"""

from __future__ import annotations

import os

os.environ.setdefault("ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS", "1")  # read once, at import
os.environ.setdefault("ANTS_RANDOM_SEED", "1")

import argparse
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
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
    """``(matrix, offset)``: the moving head at point p shows the fixed head at M p + o."""
    angles = np.radians(rng.uniform(-15, 15, 3))
    rotation = np.eye(3)
    for axis, angle in enumerate(angles):
        c, s = np.cos(angle), np.sin(angle)
        turn = np.eye(3)
        i, j = [k for k in range(3) if k != axis]
        turn[i, i], turn[i, j], turn[j, i], turn[j, j] = c, -s, s, c
        rotation = rotation @ turn
    shear = np.eye(3)
    shear[0, 1], shear[1, 2] = rng.uniform(-0.05, 0.05, 2)
    matrix = rotation @ np.diag(rng.uniform(0.9, 1.1, 3)) @ shear
    centre = (np.array(shape) - 1) / 2
    offset = centre - matrix @ centre + rng.uniform(-20, 20, 3)
    return matrix, offset


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
    args = parser.parse_args(argv)
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
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, one thread each")
    print(
        f"{args.heads} moving heads of {fixed.shape} voxels at 1 mm; medians over the heads; "
        f"affine: shrink {SHRINK}, sigmas {SIGMAS}, iterations {ITERATIONS}; "
        f"N4 shrink {N4_SHRINK}\n"
    )
    columns = "N4 s | affine s | total s | mean error mm | max error mm | worst head's mean mm"
    print(f"| library | {columns} |")
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
