"""Benchmark ``python -m training explain`` as a user runs it: a new process, start-up included.

A one-epoch classifier is trained on a phantom store of 64 x 64 slices (``--subjects``
heads); then the validation subjects are explained with patches of 8 pixels (the default:
225 predictions a slice) and of 16 (49), one after the other in one run, and the
predictions per second are printed beside the times.

    python scripts/bench_explain.py --subjects 48
"""

from __future__ import annotations

import argparse
import csv
import json
import platform
import sys
import tempfile
from pathlib import Path

from bench_preprocess import command_seconds
from machine import machine_line
from make_phantoms import write_bids

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--subjects", type=int, default=48)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch)
        write_bids(folder / "bids", subjects=args.subjects, seed=0)
        store, run = folder / "store.h5", folder / "run"
        python = [sys.executable, "-m"]
        labels = ["--label-column", "group"]
        command_seconds([*python, "preprocess", str(folder / "bids"), "-o", str(store), *labels])
        command_seconds([*python, "training", str(store), "-o", str(run), "--epochs", "1"])
        print(machine_line())
        print(f"# {platform.node()}, {platform.processor() or platform.machine()}, "
              f"python -m training explain on {args.subjects} phantom subjects' run")  # fmt: skip
        print("| patch | predictions a slice | subjects | slices | seconds | predictions/s |")
        print("| --- | --- | --- | --- | --- | --- |")
        for patch in (8, 16):
            out = folder / f"explain-{patch}"
            explain = [*python, "training", "explain", str(run), "-o", str(out)]
            seconds = command_seconds([*explain, "--patch", str(patch)])
            with open(out / "subjects.csv", newline="") as handle:
                rows = list(csv.DictReader(handle))
            slices = sum(int(row["slices"]) for row in rows)
            positions = len(range(0, 64 - patch + 1, patch // 2)) ** 2
            assert json.loads((out / "explain.json").read_text())["patch"] == patch
            print(f"| {patch} | {positions} | {len(rows)} | {slices} | {seconds:.1f} | "
                  f"{slices * (positions + 1) / seconds:,.0f} |")  # fmt: skip


if __name__ == "__main__":
    main()
