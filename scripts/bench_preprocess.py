"""Benchmark python -m preprocess against only loading the same scans with nibabel (the floor).

Both run as a user runs them: a new process each (``python -m preprocess ...``, and a
``python -c`` that loads every scan with nibabel in the same number of processes), so
start-up, the worker pool and finalising the store count. The scans are a phantom BIDS
tree (``make_phantoms``: gzipped NIfTI, mixed data types, random voxel orders, uneven
voxels), or with ``--t1`` 1 mm T1-sized heads. Everything runs warm (files read once
before) in one run, the commands take turns in every repeat, and the median counts. A
second table gives the command's fixed costs, a third splits one worker's time into its
stages.

With ``--space mni`` the scans are 1 mm T1-sized heads with a skull and neck, moved by
known affines (``make_heads``), and the command registers them to MNI152: the first table
gains seconds per scan per core, the third splits a scan's time into bias correction,
registration and resampling.

    python scripts/bench_preprocess.py --t1 --subjects 48
    python scripts/bench_preprocess.py --space mni --subjects 8 --repeats 1
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np
from machine import machine_line
from make_phantoms import GROUPS, head_phantom, save, write_bids

from preprocess import RunOptions, Settings, run
from preprocess.discover import discover
from preprocess.slices import cut_slices
from preprocess.volume import foreground, load_volume, normalization
from preprocess.writer import Partial

ROOT = Path(__file__).resolve().parents[1]


def warm(paths) -> None:
    for path in paths:
        Path(path).read_bytes()


# The floor, as a process: load every scan (float32, as a model wants) in N processes.
NIBABEL_LOAD = """
import sys
from concurrent.futures import ProcessPoolExecutor
import nibabel as nib
import numpy as np

def load(path):
    nib.load(path).get_fdata(dtype=np.float32)

workers, paths = int(sys.argv[1]), sys.argv[2:]
if workers == 1:
    for path in paths:
        load(path)
else:
    with ProcessPoolExecutor(workers) as pool:
        list(pool.map(load, paths))
"""


def command_seconds(command: list[str]) -> float:
    """Wall seconds of a command run as a new process."""
    started = time.perf_counter()
    subprocess.run(command, check=True, capture_output=True, cwd=ROOT)
    return time.perf_counter() - started


def fixed_costs(bids: Path, store: Path, settings: Settings) -> dict[str, float]:
    """What the command pays whatever the number of scans: start-up and imports, starting
    two workers (forked, as the command does, and from a forkserver, as a process that
    loaded TensorFlow does), finalising the store (timed inside one more in-process run)."""
    costs = {
        "python -m preprocess --help (start-up, imports)": command_seconds(
            [sys.executable, "-m", "preprocess", "--help"]
        )
    }
    for method in ("fork", "forkserver"):
        seconds = subprocess.run(
            [sys.executable, "-c", POOL_START, method],
            check=True,
            capture_output=True,
            text=True,
            cwd=ROOT,
        ).stdout
        costs[f"two workers started and answering, {method}"] = float(seconds)
    finalize, spent = Partial.finalize, []

    def timed(*args, **kwargs):
        started = time.perf_counter()
        try:
            return finalize(*args, **kwargs)
        finally:
            spent.append(time.perf_counter() - started)

    Partial.finalize = timed
    try:
        options = RunOptions(workers=2, overwrite=True)
        run([str(bids)], store, settings, options, progress=False, report=lambda line: None)
    finally:
        Partial.finalize = finalize
    costs["finalising the store"] = spent[0]
    return costs


# Seconds from a pool's creation until both workers have answered, in a process that has
# imported preprocess.scan (as the command has when it starts its workers).
POOL_START = """
import concurrent.futures, multiprocessing, sys, time
import preprocess.scan
context = multiprocessing.get_context(sys.argv[1])
if sys.argv[1] == "forkserver":
    context.set_forkserver_preload(["preprocess.scan"])
started = time.perf_counter()
with concurrent.futures.ProcessPoolExecutor(2, mp_context=context) as pool:
    list(pool.map(time.sleep, [0.01] * 2))
print(time.perf_counter() - started - 0.01)
"""


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
            "read + sha256 + un-gzip + reorient + checks",
            "foreground + normalisation's percentiles",
            "slice, scale + resample",
            "uint8",
        ),
        0.0,
    )
    for path in paths:
        started = time.perf_counter()
        volume = load_volume(path, digest=True)
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
        done = time.perf_counter()
        for name, seconds in zip(
            spent,
            (loaded - started, normalised - loaded, sliced - normalised, done - sliced),
            strict=True,
        ):
            spent[name] += seconds
    return spent


def write_heads(folder: Path, count: int) -> None:
    """``count`` 1 mm heads of 176 x 256 x 256 int16 voxels with a known place in MNI space."""
    from make_heads import write_head

    rng = np.random.default_rng(0)
    for index in range(count):
        write_head(folder / f"sub-{index:03d}_T1w.nii.gz", rng)


def mni_stages(paths, settings: Settings) -> dict[str, float]:
    """Seconds per stage of one worker registering every scan to the template."""
    from preprocess import standard
    from preprocess.slices import slices_at

    template = standard.load_template(settings.axis, settings.min_foreground)
    sitk = standard._simpleitk()
    standard._head()  # made once per worker
    spent = dict.fromkeys(
        (
            "load + reorient + checks",
            "working image (~2 mm blocks)",
            "N4 bias field (~12 mm)",
            "registration: neck cut, similarity, then affine",
            "resampling onto the template (+ bias)",
            "normalisation + slices",
            "uint8 + sha256",
        ),
        0.0,
    )
    for path in paths:
        times = [time.perf_counter()]
        volume = load_volume(path)
        times.append(time.perf_counter())
        work, work_affine = standard.working_image(volume)
        times.append(time.perf_counter())
        moving, log_bias = standard._corrected(sitk, work, work_affine)
        times.append(time.perf_counter())
        to_scan = standard._fit(sitk, moving, work_affine)
        times.append(time.perf_counter())
        planes = template.planes()
        data = standard._on_template(volume, log_bias, work_affine, to_scan, template, planes)
        times.append(time.perf_counter())
        brain = template.slab(template.brain, planes)
        scale = normalization(data, brain, settings.normalize)
        slices = slices_at(
            data,
            template.positions - planes[0],
            template.voxel_size,
            settings.axis,
            settings.size,
            scale,
        )
        times.append(time.perf_counter())
        np.rint(np.clip(slices, 0, 1) * 255).astype(np.uint8)
        with open(path, "rb") as handle:
            hashlib.file_digest(handle, "sha256")
        times.append(time.perf_counter())
        for name, (start, stop) in zip(spent, itertools.pairwise(times), strict=True):
            spent[name] += stop - start
    return spent


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
    parser.add_argument(
        "--space",
        choices=("native", "mni"),
        default="native",
        help="mni: register 1 mm T1-sized heads to MNI152 (needs slicestore[mni])",
    )
    args = parser.parse_args(argv)
    mni = args.space == "mni"
    with tempfile.TemporaryDirectory() as folder:
        bids = Path(folder) / "bids"
        bids.mkdir()
        if mni:
            write_heads(bids, args.subjects)
        elif args.t1:
            write_t1_sized(bids, args.subjects)
        else:
            write_bids(bids, args.subjects, seed=0)
        paths = [scan.path for scan in discover([bids])[0]]
        megabytes = sum(p.stat().st_size for p in paths) / 1e6
        voxels = sum(int(np.prod(nib.load(p).shape)) for p in paths)
        warm(paths)
        settings = Settings() if args.t1 or mni else Settings(label_column="group")
        settings = Settings(space="mni") if mni else settings
        store = Path(folder) / "store.h5"
        labels = [] if args.t1 or mni else ["--label-column", "group"]
        labels += ["--space", "mni"] if mni else []
        commands = {}
        for workers in (1, 2):
            nibabel = [sys.executable, "-c", NIBABEL_LOAD, str(workers), *map(str, paths)]
            preprocess = [sys.executable, "-m", "preprocess", str(bids), "-o", str(store)]
            preprocess += [*labels, "--workers", str(workers), "--overwrite"]
            commands[f"nibabel load only, {workers} process(es) (the floor)"] = nibabel
            commands[f"python -m preprocess --workers {workers}"] = preprocess
        runs = {name: [] for name in commands}
        for _ in range(args.repeats):
            for name, command in commands.items():
                runs[name].append(command_seconds(command))
        timings = {name: statistics.median(values) for name, values in runs.items()}
        costs = fixed_costs(bids, store, settings)
        spent = mni_stages(paths, settings) if mni else stages(paths, settings)

    print(machine_line("nibabel"))
    print(
        f"{len(paths)} scans, {megabytes:.0f} MB gzipped NIfTI, "
        f"{voxels / len(paths) / 1e6:.1f} M voxels a scan on average; "
        f"warm cache, median of {args.repeats}, each a new process"
    )
    print()
    print(
        "| what | seconds | scans/s | MB/s of input | time vs nibabel load, same processes "
        "| seconds per scan per core |"
    )
    print("|---|---|---|---|---|---|")
    floors = list(timings.values())[::2]
    for index, (name, seconds) in enumerate(timings.items()):
        rates = f"{len(paths) / seconds:.1f} | {megabytes / seconds:.0f}"
        per_core = seconds * (index // 2 + 1) / len(paths)
        print(
            f"| {name} | {seconds:.2f} | {rates} | {seconds / floors[index // 2]:.2f}x "
            f"| {per_core:.2f} |"
        )
    print()
    print("| the command's fixed costs | seconds |")
    print("|---|---|")
    for name, seconds in costs.items():
        print(f"| {name} | {seconds:.2f} |")
    print()
    total = sum(spent.values())
    print("| one worker's stages | seconds | share |")
    print("|---|---|---|")
    for name, seconds in spent.items():
        print(f"| {name} | {seconds:.2f} | {seconds / total:.0%} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
