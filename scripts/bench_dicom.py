"""Benchmark DICOM inputs against NIfTI: ``python -m preprocess`` as a user runs it.

``--scans`` 1 mm T1-sized heads (176 x 256 x 256 int16, as ``make_phantoms`` draws them)
are written twice: as ``.nii.gz`` and as DICOM series of 176 single-frame files (what a
scanner exports; pydicom writes them, as the tests do). Each folder is preprocessed by a
new ``python -m preprocess`` process (start-up included), with one worker and with two, in
turns (``--repeats``, medians shown), so the table's ratio is the cost of reading DICOM
through dcm2niix.

    python scripts/bench_dicom.py --scans 8
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
from pathlib import Path

import h5py
import numpy as np
from bench_preprocess import command_seconds
from make_phantoms import GROUPS, head_phantom, save

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from dicom_series import patient, write_series  # noqa: E402
from machine import machine_line  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scans", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3, help="turns; medians are shown")
    args = parser.parse_args()
    os.environ.setdefault("SLICESTORE_ID_SALT", "bench")  # the commands' DICOM subjects
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch)
        for index in range(args.scans):
            data, affine = head_phantom(rng, GROUPS[index % 2], (1.0, 1.0, 1.0), fov_mm=256)
            data, affine = data[40:216], affine.copy()
            affine[:3, 3] += affine[:3, 0] * 40
            values = np.clip(data, 0, 32767).astype(np.int16)
            save(folder / "nifti" / f"scan{index}.nii.gz", values, affine, "int16")
            write_series(folder / "dicom" / f"scan{index}", values, affine, patient(index))
        print(machine_line())
        print(f"# {platform.node()}, python -m preprocess on {args.scans} T1-sized scans "
              "(176 x 256 x 256), start-up included")  # fmt: skip
        print("| workers | NIfTI (s) | DICOM (s) | DICOM / NIfTI |")
        print("| --- | --- | --- | --- |")
        for workers in (1, 2):
            runs: dict[str, list[float]] = {"nifti": [], "dicom": []}
            for turn in range(args.repeats):  # the two inputs take turns
                for kind in runs:
                    out = folder / f"{kind}-{workers}-{turn}.h5"
                    command = [sys.executable, "-m", "preprocess", str(folder / kind)]
                    command += ["-o", str(out), "--workers", str(workers)]
                    runs[kind].append(command_seconds(command))
                    with h5py.File(out, "r") as store:  # every scan made it, from either input
                        assert len(store["subjects/id"]) == args.scans, kind
            times = {kind: float(np.median(seconds)) for kind, seconds in runs.items()}
            print(f"| {workers} | {times['nifti']:.1f} | {times['dicom']:.1f} | "
                  f"{times['dicom'] / times['nifti']:.2f} |")  # fmt: skip


if __name__ == "__main__":
    main()
