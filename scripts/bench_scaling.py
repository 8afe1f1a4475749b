"""Training throughput of one process against two data-parallel processes (JAX), side by side.

Writes a phantom store, then trains the project's CNN from it for a few epochs, first in
one process (KERAS_BACKEND=jax, no --distributed) and then as two processes on 127.0.0.1
(--distributed), and prints training slices per second of each from their metrics.json.

    python scripts/bench_scaling.py --subjects 24 --epochs 3
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

from machine import machine_line
from make_phantoms import write_bids

from loader import open_store
from preprocess.cli import main as preprocess_main

ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _train(store: Path, run_dir: Path, epochs: int, processes: int) -> float:
    """Seconds that process 0 spent fitting and scoring."""
    command = [sys.executable, "-m", "training", str(store), "-o", str(run_dir)]
    command += ["--epochs", str(epochs), "--patience", str(epochs), "--batch-size", "64"]
    env = {**os.environ, "KERAS_BACKEND": "jax", "JAX_PLATFORMS": "cpu"}
    if processes == 1:
        subprocess.run(command, check=True, env=env, capture_output=True, cwd=ROOT)
    else:
        port = _free_port()
        running = [
            subprocess.Popen(
                [
                    *command,
                    "--distributed",
                    "--coordinator",
                    f"127.0.0.1:{port}",
                    "--num-processes",
                    str(processes),
                    "--process-id",
                    str(index),
                ],
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                cwd=ROOT,
            )
            for index in range(processes)
        ]
        for process in running:
            _, err = process.communicate()
            if process.returncode:
                raise SystemExit(f"a process failed:\n{err.decode()[-2000:]}")
    return json.loads((run_dir / "metrics.json").read_text())["seconds"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--subjects", type=int, default=24, help="phantoms (default: 24)")
    parser.add_argument("--epochs", type=int, default=3, help="epochs per run (default: 3)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        write_bids(root / "bids", args.subjects, seed=0)
        store = root / "store.h5"
        preprocess_main([str(root / "bids"), "-o", str(store), "--label-column", "group"])
        with open_store(store) as opened:
            rows = len(opened.splits["train"])
        seconds = {n: _train(store, root / f"run{n}", args.epochs, n) for n in (1, 2)}
    print(
        f"{machine_line()}\n{rows} training slices, "
        f"{args.epochs} epochs, batches of 64 (32 per process with two)"
    )
    print("| run | processes | seconds (fit and scoring) | training slices/s | vs one |")
    print("| --- | --- | --- | --- | --- |")
    for count, spent in seconds.items():
        rate = rows * args.epochs / spent
        ratio = seconds[1] / spent
        print(
            f"| {'one process' if count == 1 else 'data parallel'} | {count} | {spent:.1f} | "
            f"{rate:,.0f} | {ratio:.2f}x |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
