"""Write a valid store of about X GiB of synthetic slices, through the project's own writer.

The slices are real preprocessed phantom slices (a bank of a few hundred, from
``make_phantoms``), drawn at random, so sizes, compression and reading behave like MRI.
Labels are the phantoms' groups (control 0 / patient 1); all rows form a ``train`` split.
Memory stays at the writer's buffer (``--buffer-mb``) whatever the size.

    python scripts/make_large_store.py --gb 4 -o /data/large.h5
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
from make_phantoms import GROUPS, head_phantom, save

from preprocess.discover import Scan
from preprocess.pipeline import Settings, process_scan
from preprocess.writer import Partial, partial_path, scan_record

SLICES_PER_SCAN = 256


def slice_bank(settings: Settings, heads: int = 8, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Preprocessed phantom slices and their labels, ``heads`` heads of alternating groups."""
    rng = np.random.default_rng(seed)
    banks, labels = [], []
    with tempfile.TemporaryDirectory() as folder:
        for index in range(heads):
            group = GROUPS[index % 2]
            data, affine = head_phantom(rng, group)
            path = Path(folder) / f"head{index}.nii"
            save(path, data, affine, "int16")
            _, slices = process_scan(Scan(path, path.name, str(index), "", group), settings)
            banks.append(slices)
            labels.append(np.full(len(slices), index % 2))
    return np.concatenate(banks), np.concatenate(labels)


def write_large_store(
    path: Path,
    gib: float,
    dtype: str = "uint8",
    compression: str = "none",
    chunk_slices: int = 64,
    buffer_bytes: int = 1 << 30,
    seed: int = 0,
) -> int:
    """Write the store; returns its number of slices."""
    settings = Settings(
        dtype=dtype,
        normalize="percentile",
        compression=compression,
        chunk_slices=chunk_slices,
        val_fraction=0.0,
        seed=seed,
    )
    bank, bank_labels = slice_bank(settings, seed=seed)
    num_slices = max(1, int(gib * 2**30 // bank[0].nbytes))
    partial = Partial(path, {**asdict(settings), "inputs": ["synthetic"], "gib": gib}, resume=False)
    rng = np.random.default_rng(seed)
    for scan, start in enumerate(range(0, num_slices, SLICES_PER_SCAN)):
        count = min(SLICES_PER_SCAN, num_slices - start)
        group = scan % 2
        pool = np.flatnonzero(bank_labels == group)
        slices = bank[rng.choice(pool, count)]
        record = scan_record(
            f"synthetic/{scan:07d}.nii", f"{scan:07d}", range(count), label=GROUPS[group]
        )
        partial.add(record, slices)
    partial.finalize(list(GROUPS), buffer_bytes)
    return num_slices


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--gb", type=float, required=True, help="size of the slices in GiB")
    parser.add_argument("-o", "--output", type=Path, required=True, help="the store to write")
    parser.add_argument("--dtype", choices=("uint8", "float16", "float32"), default="uint8")
    parser.add_argument("--compression", choices=("none", "lzf", "gzip"), default="none")
    parser.add_argument("--chunk-slices", type=int, default=64)
    parser.add_argument("--buffer-mb", type=int, default=1024, help="writer memory (default: 1024)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing store")
    args = parser.parse_args(argv)
    if args.gb <= 0:
        print("error: --gb must be positive", file=sys.stderr)
        return 2
    if args.output.exists() and not args.overwrite:
        print(f"error: {args.output}: exists; use --overwrite to replace it", file=sys.stderr)
        return 2
    if args.overwrite:
        shutil.rmtree(partial_path(args.output), ignore_errors=True)
    started = time.perf_counter()
    num_slices = write_large_store(
        args.output,
        args.gb,
        args.dtype,
        args.compression,
        args.chunk_slices,
        args.buffer_mb << 20,
    )
    seconds = time.perf_counter() - started
    size = args.output.stat().st_size
    print(
        f"wrote {args.output}: {num_slices} slices, {size / 2**30:.2f} GiB in {seconds:.1f} s "
        f"({size / 2**20 / seconds:.0f} MiB/s)"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
