"""The loader against the contiguous memmap, warm, with checksums on, at 1 GiB and more.

Side by side in one run, warm (the files in the page cache), batches of 256 uint8 slices
to float32: ``np.memmap`` of the same slices as a .npy read contiguously (the limit, paying
the same uint8 -> float32 multiply), and ``H5Sequence`` shuffled with ``verify=True`` (the
default) and ``verify=False``, with float32 output, and with ``output="stored"`` (uint8
batches, as ``python -m training`` reads them: its model scales them). The readers take
turns in every repeat (drift on a shared machine hits all of them alike) and the median of
the repeats counts. A second table says where one batch's time goes: the plan's lookup,
the reads, the CRC, the conversion to float32, and the rest (Python).

    python scripts/bench_verify.py --gb 1 4 --repeats 5
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
import zlib
from pathlib import Path

import numpy as np
from bench_loader import BATCH, export_npy, memmap_reader, sequence_reader, warm
from machine import machine_line
from make_large_store import write_large_store

from loader import H5Sequence, schema
from loader.rows import read_rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--gb", type=float, nargs="+", default=[1.0], help="GiB of slices")
    parser.add_argument("--repeats", type=int, default=5, help="passes; the median counts")
    args = parser.parse_args(argv)
    print(f"{machine_line()}\nwarm; batches of {BATCH}")
    print(f"median of {args.repeats} passes (lowest-highest)\n")
    print("| GiB | reader | slices/s | vs memmap |")
    print("|---|---|---|---|")
    profiles = {}
    for gib in args.gb:
        with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_DIR")) as folder:
            store = Path(folder) / "store.h5"
            write_large_store(store, gib)
            images, _ = export_npy(store, Path(folder))
            checked = H5Sequence(store, batch_size=BATCH, shuffle=True)
            readers = [
                ("np.memmap .npy, contiguous (the limit)", memmap_reader(images), images),
                ("H5Sequence, shuffled, verify=True (default)", sequence_reader(checked), store),
                (
                    'H5Sequence, shuffled, verify=True, output="stored" (uint8)',
                    sequence_reader(
                        H5Sequence(store, batch_size=BATCH, shuffle=True, output="stored")
                    ),
                    store,
                ),
                (
                    "H5Sequence, shuffled, verify=True, read_mib=0 (chunk by chunk)",
                    sequence_reader(H5Sequence(store, batch_size=BATCH, shuffle=True, read_mib=0)),
                    store,
                ),
                (
                    "H5Sequence, shuffled, verify=False",
                    sequence_reader(
                        H5Sequence(store, batch_size=BATCH, shuffle=True, verify=False)
                    ),
                    store,
                ),
            ]
            rates = {name: [] for name, _, _ in readers}
            for _ in range(args.repeats):
                for name, read, path in readers:
                    warm(path)
                    started = time.perf_counter()
                    count = read()
                    rates[name].append(count / (time.perf_counter() - started))
            limit = statistics.median(rates[readers[0][0]])
            for name, values in rates.items():
                middle = statistics.median(values)
                spread = f"{min(values):,.0f}-{max(values):,.0f}"
                print(f"| {gib:g} | {name} | {middle:,.0f} ({spread}) | {middle / limit:.2f}x |")
            warm(store)
            profiles[gib] = batch_profile(checked)
    print("\nOne batch of 256, verify=True, µs (median over the epoch's batches):\n")
    stages = list(next(iter(profiles.values())))
    print("| GiB | " + " | ".join(stages) + " |")
    print("|---|" + "---|" * len(stages))
    for gib, profile in profiles.items():
        print(f"| {gib:g} | " + " | ".join(f"{profile[s]:.0f}" for s in stages) + " |")
    print("\nCRC implementations at hand, GB/s over one batch's bytes (1 MiB), median of 50:\n")
    print("| implementation | checksum | GB/s |\n|---|---|---|")
    for name, kind, speed in crc_speeds():
        print(f"| {name} | {kind} | {speed:.1f} |")
    return 0


def crc_speeds(size: int = 1 << 20, repeats: int = 50) -> list[tuple[str, str, float]]:
    """GB/s of each CRC implementation installed, over ``size`` random bytes."""
    data = np.random.default_rng(0).integers(0, 256, size, dtype=np.uint8).tobytes()
    found = [("zlib.crc32", "CRC-32", zlib.crc32)]
    try:
        from isal import isal_zlib

        found.append(("isal.isal_zlib.crc32 (what verify uses)", "CRC-32", isal_zlib.crc32))
    except ImportError:
        pass
    try:
        import google_crc32c

        found.append(("google_crc32c.value", "CRC-32C", google_crc32c.value))
    except ImportError:
        pass
    speeds = []
    for name, kind, crc in found:
        times = []
        for _ in range(repeats):
            tick = time.perf_counter()
            crc(data)
            times.append(time.perf_counter() - tick)
        speeds.append((name, kind, size / statistics.median(times) / 1e9))
    return speeds


def batch_profile(sequence: H5Sequence) -> dict[str, float]:
    """Median µs per batch of each stage of ``sequence[i]`` (one store, raw rows)."""
    part = sequence._parts[0]
    stages = {"plan": [], "reads": [], "CRC": [], "to float32": [], "__getitem__": []}
    fd = os.open(part.path, os.O_RDONLY)
    try:
        for index in range(len(sequence)):
            tick = time.perf_counter()
            runs = sequence._local_runs(sequence._plan_batch(index))
            stages["plan"].append(time.perf_counter() - tick)
            num_rows = sum(stop - start for _, start, stop in runs)
            stored = np.empty((num_rows, *part.slice_shape, 1), np.uint8)
            chunks, position, tick = [], 0, time.perf_counter()
            for _, start, stop in runs:
                read_rows(part.images, start, stop, stored[position : position + stop - start], fd)
                chunks.append(stored[position : position + stop - start])
                position += stop - start
            stages["reads"].append(time.perf_counter() - tick)
            tick = time.perf_counter()
            for rows in chunks:
                schema.checksum(rows)
            stages["CRC"].append(time.perf_counter() - tick)
            x = np.empty(stored.shape, np.float32)
            tick = time.perf_counter()
            np.multiply(stored, part.scale, out=x, casting="unsafe")
            stages["to float32"].append(time.perf_counter() - tick)
            tick = time.perf_counter()
            sequence[index]
            stages["__getitem__"].append(time.perf_counter() - tick)
    finally:
        os.close(fd)
    medians = {name: statistics.median(values) * 1e6 for name, values in stages.items()}
    parts = sum(value for name, value in medians.items() if name != "__getitem__")
    medians["rest (Python)"] = medians["__getitem__"] - parts
    return medians


if __name__ == "__main__":
    raise SystemExit(main())
