"""Benchmark python -m preprocess against only loading the same scans with nibabel (the floor).

The scans are a phantom BIDS tree (``make_phantoms``: gzipped NIfTI, mixed data types,
random voxel orders, uneven voxels). Everything runs warm (files read once before) in one
run, so the ratios compare like with like. A second table splits one worker's time into
its stages.

    python scripts/bench_preprocess.py --subjects 24
"""

from __future__ import annotations

import argparse
import hashlib
import os
import platform
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import nibabel as nib
import numpy as np
from make_phantoms import GROUPS, head_phantom, save, write_bids

from preprocess import RunOptions, Settings, run
from preprocess.discover import discover
from preprocess.slices import cut_slices
from preprocess.volume import foreground, load_volume, normalization


def warm(paths) -> None:
    for path in paths:
        Path(path).read_bytes()


def nibabel_load(paths) -> None:
    for path in paths:
        nib.load(path).get_fdata(dtype=np.float32)


def _load_one(path) -> None:
    nib.load(path).get_fdata(dtype=np.float32)


def nibabel_load_parallel(paths, workers: int = 2) -> None:
    with ProcessPoolExecutor(workers) as pool:
        list(pool.map(_load_one, paths))


def write_t1_sized(folder: Path, count: int) -> None:
    """``count`` 1 mm head phantoms of 176 x 256 x 256 int16 voxels, gzipped (~19 MB each)."""
    rng = np.random.default_rng(0)
    for index in range(count):
        data, affine = head_phantom(rng, GROUPS[index % 2], (1.0, 1.0, 1.0), fov_mm=256)
        affine = affine.copy()
        affine[0, 3] += 40
        save(folder / f"sub-{index:03d}_T1w.nii.gz", data[40:216], affine, "int16")


def stages(paths, settings: Settings) -> dict[str, float]:
    """Seconds per stage of one worker over all scans."""
    spent = dict.fromkeys(
        (
            "load + reorient + checks",
            "foreground + normalisation's percentiles",
            "slice, scale + resample",
            "uint8 + sha256",
        ),
        0.0,
    )
    for path in paths:
        started = time.perf_counter()
        volume = load_volume(path)
        loaded = time.perf_counter()
        mask = foreground(volume.voxels)
        scale = normalization(volume.voxels, mask, settings.normalize, volume.slope, volume.inter)
        normalised = time.perf_counter()
        slices, _ = cut_slices(
            volume.voxels,
            mask,
            volume.voxel_size,
            settings.axis,
            settings.size,
            settings.min_foreground,
            scale,
        )
        sliced = time.perf_counter()
        np.rint(np.clip(slices, 0, 1) * 255).astype(np.uint8)
        with open(path, "rb") as handle:
            hashlib.file_digest(handle, "sha256")
        done = time.perf_counter()
        for name, seconds in zip(
            spent,
            (loaded - started, normalised - loaded, sliced - normalised, done - sliced),
            strict=True,
        ):
            spent[name] += seconds
    return spent


def best_time(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - started)
    return best


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--subjects", type=int, default=24, help="phantom subjects (default: 24)")
    parser.add_argument(
        "--repeats", type=int, default=3, help="passes per measurement; the best counts"
    )
    parser.add_argument(
        "--t1",
        action="store_true",
        help="1 mm T1-sized scans (176 x 256 x 256 int16, gzipped) instead of the phantom set",
    )
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as folder:
        bids = Path(folder) / "bids"
        bids.mkdir()
        if args.t1:
            write_t1_sized(bids, args.subjects)
        else:
            write_bids(bids, args.subjects, seed=0)
        paths = [scan.path for scan in discover([bids])[0]]
        megabytes = sum(p.stat().st_size for p in paths) / 1e6
        voxels = sum(int(np.prod(nib.load(p).shape)) for p in paths)
        warm(paths)
        settings = Settings() if args.t1 else Settings(label_column="group")
        timings = {
            "nibabel load only (1 process, the floor)": best_time(
                lambda: nibabel_load(paths), args.repeats
            ),
            "nibabel load only (2 processes)": best_time(
                lambda: nibabel_load_parallel(paths), args.repeats
            ),
        }
        for workers in (1, 2):

            def preprocess(workers=workers):
                run(
                    [str(bids)],
                    Path(folder) / "store.h5",
                    settings,
                    RunOptions(workers=workers, overwrite=True),
                    progress=False,
                    report=lambda line: None,
                )

            timings[f"python -m preprocess --workers {workers}"] = best_time(
                preprocess, args.repeats
            )
        spent = stages(paths, settings)

    floor = timings["nibabel load only (1 process, the floor)"]
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} cores, "
        f"Python {platform.python_version()}, nibabel {nib.__version__}"
    )
    print(
        f"{len(paths)} scans, {megabytes:.0f} MB gzipped NIfTI, "
        f"{voxels / len(paths) / 1e6:.1f} M voxels a scan on average; "
        f"warm cache, best of {args.repeats}"
    )
    print()
    print("| what | seconds | scans/s | MB/s of input | time vs nibabel load |")
    print("|---|---|---|---|---|")
    for name, seconds in timings.items():
        rates = f"{len(paths) / seconds:.1f} | {megabytes / seconds:.0f}"
        print(f"| {name} | {seconds:.2f} | {rates} | {seconds / floor:.2f}x |")
    print()
    total = sum(spent.values())
    print("| one worker's stages | seconds | share |")
    print("|---|---|---|")
    for name, seconds in spent.items():
        print(f"| {name} | {seconds:.2f} | {seconds / total:.0%} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
