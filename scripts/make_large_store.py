"""Write a valid store of about X GiB of synthetic slices, through the project's own writer.

The slices are real preprocessed phantom slices (a bank of a few hundred, from
``make_phantoms``), drawn at random, so sizes, compression and reading behave like MRI.
Labels are the phantoms' groups (control 0 / patient 1); all rows form a ``train`` split.
Memory stays at the writer's buffer (``--buffer-mb``) whatever the size.

    python scripts/make_large_store.py --gb 4 -o /data/large.h5
"""

from __future__ import annotations

import argparse
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
from make_phantoms import GROUPS, head_phantom, save

from loader.exits import run_main
from loader.options import add_options, settings_from_args
from preprocess.discover import Scan
from preprocess.scan import process_scan
from preprocess.settings import RunOptions, Settings
from preprocess.writer import Partial, scan_record

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
            _, slices, _ = process_scan(Scan(path, path.name, str(index), "", group), settings)
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
    config = {**asdict(settings), "inputs": ["synthetic"], "gib": gib}
    partial = Partial(path, config, overwrite=True)
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
    flags = add_options(parser, Settings, only=("dtype", "compression", "chunk_slices"))
    flags |= add_options(parser, RunOptions, only=("buffer_mb", "overwrite"))

    def body(args: argparse.Namespace) -> int:
        if args.gb <= 0:
            raise ValueError(f"--gb must be positive; received --gb {args.gb}")
        settings = settings_from_args(Settings, args)
        options = settings_from_args(RunOptions, args)
        if args.output.exists() and not options.overwrite:
            raise FileExistsError(f"{args.output}: exists; use --overwrite to replace it")
        started = time.perf_counter()
        num_slices = write_large_store(
            args.output,
            args.gb,
            settings.dtype,
            settings.compression,
            settings.chunk_slices,
            options.buffer_mb << 20,
        )
        seconds = time.perf_counter() - started
        size = args.output.stat().st_size
        print(
            f"wrote {args.output}: {num_slices} slices, {size / 2**30:.2f} GiB in {seconds:.1f} s "
            f"({size / 2**20 / seconds:.0f} MiB/s)"
        )
        return 0

    return run_main(parser, argv, body, flags)


if __name__ == "__main__":
    raise SystemExit(main())
