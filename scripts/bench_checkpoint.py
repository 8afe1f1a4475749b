"""What checkpoints cost a training run: one write, and whole runs side by side.

A store of phantom scans is trained with the project's CNN for a few epochs with
``--checkpoint-every`` 0 (epoch ends only), 20, 5 and 1 batches, in turn in one process;
the table gives each run's seconds and its ratio to the first. A second table times one
checkpoint write and one best-model write of the default CNN on 64x64 slices.

    python scripts/bench_checkpoint.py --subjects 24 --epochs 2
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras
import numpy as np
from machine import machine_line
from make_phantoms import write_bids

from preprocess.cli import main as preprocess_main
from training import train
from training.checkpoints import RunState
from training.model import build
from training.run_folder import CHECKPOINT, MODEL


def _time_writes(folder: Path) -> list[tuple[str, float, float]]:
    """``(file, MiB, seconds)`` of one checkpoint and one best-model write of the default CNN
    (trained a step, so Adam's moments exist)."""
    model = build(2)
    model.compile(optimizer=keras.optimizers.Adam(), loss="binary_crossentropy")
    x = np.random.default_rng(0).random((32, 64, 64, 1), dtype=np.float32)
    model.fit(x, np.arange(32) % 2, epochs=1, verbose=0)
    state = RunState(folder, _OneBatch(), ("val_accuracy", "max"), 1, 0)
    state.set_model(model)
    state.best_weights = model.get_weights()
    rows = []
    for name, write in ((CHECKPOINT, state.save), (MODEL, state._save_best_model)):
        started = time.perf_counter()
        write()
        seconds = time.perf_counter() - started
        rows.append((name, (folder / name).stat().st_size / 2**20, seconds))
    return rows


class _OneBatch:
    epoch = 0

    def __len__(self) -> int:
        return 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--subjects", type=int, default=24, help="phantom subjects (default: 24)")
    parser.add_argument("--epochs", type=int, default=2, help="epochs per run (default: 2)")
    parser.add_argument("--batch-size", type=int, default=32, help="slices a batch (default: 32)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        (folder / "bids").mkdir()
        write_bids(folder / "bids", subjects=args.subjects, seed=0)
        store = folder / "s.h5"
        preprocess_main([str(folder / "bids"), "-o", str(store), "--label-column", "group"])
        runs = []
        for every in (0, 20, 5, 1):
            started = time.perf_counter()
            result = train(
                store,
                folder / f"run-{every}",
                epochs=args.epochs,
                patience=args.epochs,
                batch_size=args.batch_size,
                checkpoint_every=every,
                progress=False,
            )
            runs.append((every, result.epochs_run, time.perf_counter() - started))
        writes = _time_writes(folder)
    print(f"{machine_line()}\n{args.subjects} phantom subjects, batches of {args.batch_size}")
    print("| --checkpoint-every | epochs | seconds | vs epoch ends only |")
    print("|---|---|---|---|")
    for every, epochs, seconds in runs:
        label = "0 (epoch ends only)" if every == 0 else str(every)
        print(f"| {label} | {epochs} | {seconds:.1f} | {seconds / runs[0][2]:.2f}x |")
    print()
    print("| one write of | MiB | ms |")
    print("|---|---|---|")
    for name, mib, seconds in writes:
        print(f"| {name} | {mib:.1f} | {seconds * 1e3:.0f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
