"""What checking every chunk against its checksum costs the loader, on a store of 1 GiB or more.

Side by side in one run, warm (the files in the page cache), batches of 256 uint8 slices
to float32: ``np.memmap`` of the same slices as a .npy read contiguously (the limit), and
``H5Sequence`` shuffled with ``verify=True`` (the default) and ``verify=False``.

    python scripts/bench_verify.py --gb 1
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
from pathlib import Path

from bench_loader import BATCH, export_npy, memmap_reader, rate, sequence_reader
from make_large_store import write_large_store

from loader import H5Sequence


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--gb", type=float, default=1.0, help="GiB of slices (default: 1)")
    parser.add_argument("--repeats", type=int, default=3, help="passes; the best counts")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as folder:
        store = Path(folder) / "store.h5"
        write_large_store(store, args.gb)
        images, _ = export_npy(store, Path(folder))
        readers = [
            ("np.memmap .npy, contiguous (the limit)", memmap_reader(images), [images]),
            (
                "H5Sequence, shuffled, verify=True (default)",
                sequence_reader(H5Sequence(store, batch_size=BATCH, shuffle=True)),
                [store],
            ),
            (
                "H5Sequence, shuffled, verify=False",
                sequence_reader(H5Sequence(store, batch_size=BATCH, shuffle=True, verify=False)),
                [store],
            ),
        ]
        rates = [(name, rate(fn, files, False, args.repeats)) for name, fn, files in readers]
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} cores; {args.gb:g} GiB, warm, "
        f"best of {args.repeats}"
    )
    print("| reader | slices/s | vs memmap |")
    print("|---|---|---|")
    for name, value in rates:
        print(f"| {name} | {value:,.0f} | {value / rates[0][1]:.2f}x |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
