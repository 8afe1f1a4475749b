"""Benchmark ``python -m training predict`` on 1 mm T1-sized scans, as a user runs it.

Two runs are trained first (one epoch each, on small phantom stores of 64 x 64 slices): a
classifier of T1w slices and a U-Net of T1w + FLAIR slices with lesion masks. Each then
predicts ``--scans`` T1-sized sessions (176 x 256 x 256 int16, gzipped; the segmentation
run's sessions have a FLAIR of the same size), as a new process, start-up included, beside
``python -m preprocess`` of the same scans into a store (the preprocessing part alone).
The segmentation writes every scan's labels back on its own 1 mm grid.

    python scripts/bench_predict.py --scans 8
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from bench_preprocess import command_seconds
from machine import machine_line
from make_phantoms import GROUPS, head_phantom, save, write_bids

ROOT = Path(__file__).resolve().parents[1]


def write_sessions(folder: Path, count: int, flair: bool) -> None:
    """``count`` BIDS sessions of 1 mm T1-sized heads (and a FLAIR of the same grid)."""
    rng = np.random.default_rng(0)
    rows = ["participant_id\tgroup"]
    for index in range(count):
        data, affine = head_phantom(rng, GROUPS[index % 2], (1.0, 1.0, 1.0), fov_mm=256)
        affine = affine.copy()
        affine[0, 3] += 40
        anat = folder / f"sub-{index:03d}" / "anat"
        save(anat / f"sub-{index:03d}_T1w.nii.gz", data[40:216], affine, "int16")
        if flair:
            save(anat / f"sub-{index:03d}_FLAIR.nii.gz", data[40:216], affine, "int16")
        rows.append(f"sub-{index:03d}\t{GROUPS[index % 2]}")
    (folder / "participants.tsv").write_text("\n".join(rows) + "\n")


def train_run(folder: Path, segmentation: bool) -> Path:
    """A one-epoch run on a small phantom store."""
    bids, store, run = folder / "phantoms", folder / "store.h5", folder / "run"
    write_bids(bids, subjects=8, seed=0, flair=segmentation)
    preprocess = [sys.executable, "-m", "preprocess", str(bids), "-o", str(store)]
    preprocess += ["--label-column", "group"]
    if segmentation:
        preprocess += ["--suffix", "T1w", "FLAIR", "--masks", "lesion"]
    subprocess.run(preprocess, check=True, capture_output=True, cwd=ROOT)
    training = [sys.executable, "-m", "training", str(store), "-o", str(run), "--epochs", "1"]
    training += ["--target", "mask", "--batch-size", "16"] if segmentation else []
    subprocess.run(training, check=True, capture_output=True, cwd=ROOT)
    return run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--scans", type=int, default=8, help="T1-sized sessions (default: 8)")
    parser.add_argument("--workers", type=int, default=2, help="preprocessing workers")
    args = parser.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for task, segmentation in (("classification", False), ("segmentation", True)):
            work = Path(folder) / task
            run = train_run(work, segmentation)
            sessions = work / "sessions"
            write_sessions(sessions, args.scans, segmentation)
            store, out = work / "new.h5", work / "out"
            preprocess = [sys.executable, "-m", "preprocess", str(sessions), "-o", str(store)]
            preprocess += ["--workers", str(args.workers), "--overwrite"]
            preprocess += ["--suffix", "T1w", "FLAIR"] if segmentation else []
            predict = [sys.executable, "-m", "training", "predict", str(run), str(sessions)]
            predict += ["-o", str(out), "--workers", str(args.workers), "--overwrite"]
            for path in sessions.rglob("*.nii.gz"):  # warm
                path.read_bytes()
            preprocessing = command_seconds(preprocess)
            predicting = command_seconds(predict)
            written = sorted(out.glob("*_pred.nii.gz"))
            rows.append((task, preprocessing, predicting, len(written)))
            shutil.rmtree(out, ignore_errors=True)
    print(machine_line())
    print(
        f"{args.scans} sessions of 176 x 256 x 256 int16 (gzipped), --workers {args.workers}, "
        "warm cache, each command a new process\n"
    )
    print(
        "| task | python -m preprocess (s) | python -m training predict (s) | scans/s "
        "| predict vs preprocess | segmentations written |"
    )
    print("|---|---|---|---|---|---|")
    for task, preprocessing, predicting, written in rows:
        print(
            f"| {task} | {preprocessing:.1f} | {predicting:.1f} | {args.scans / predicting:.2f} "
            f"| {predicting / preprocessing:.2f}x | {written} |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
