"""Fuzz preprocessing with damaged NIfTI files: mutated header fields and damaged data.

Each case takes a small real file (nibabel's bundled scans, a seeded synthetic volume),
changes one header field (dims, datatype, bitpix, vox_offset, scl_slope, scl_inter, pixdim,
qform and sform, magic) or damages its data (truncation, flipped bytes in the gzip stream)
and preprocesses it. Every case must end, within a time bound, as a stored scan or a
one-line reason: never an exception, a hang or unbounded memory. Prints a table of
outcomes; exit 1 when a case broke the rule.

    python scripts/fuzz_preprocess.py --cases 5000 --seed 0
"""

from __future__ import annotations

import argparse
import gzip
import signal
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import nibabel as nib
import numpy as np

from preprocess.discover import Scan
from preprocess.scan import process_or_reason
from preprocess.settings import Settings

NIBABEL_DATA = Path(nib.__file__).parent / "tests" / "data"
SOURCES = ("anatomical.nii", "standard.nii.gz", "example_nifti2.nii.gz", "functional.nii")
FIELDS = (
    "dim",
    "datatype",
    "bitpix",
    "vox_offset",
    "scl_slope",
    "scl_inter",
    "pixdim",
    "qform",
    "sform",
    "magic",
    "truncate",
    "gzip",
)
NASTY = (0, -1, 1, 2, 3, 7, 255, 32767, -32768, 2**31 - 1, 1e30, -1e30, float("nan"), float("inf"))
SECONDS_PER_SCAN = 20  # the time bound of one case


def sources(folder: Path) -> list[Path]:
    """The files the cases start from: nibabel's and a seeded int16 volume with a scaling."""
    rng = np.random.default_rng(0)
    data = rng.normal(100, 20, (24, 28, 20)).astype(np.float32)
    data[6:18, 6:22, 4:16] += 300
    image = nib.Nifti1Image(data, np.diag([1.5, 1.2, 2.0, 1.0]))
    image.set_data_dtype(np.int16)
    own = folder / "blob.nii.gz"
    nib.save(image, own)
    return [NIBABEL_DATA / name for name in SOURCES] + [own]


def mutate(source: Path, rng: np.random.Generator, out: Path) -> str:
    """Write a damaged copy of ``source`` to ``out``; returns what was changed."""
    raw = source.read_bytes()
    zipped = raw[:2] == b"\x1f\x8b"
    plain = gzip.decompress(raw) if zipped else raw
    field = FIELDS[rng.integers(len(FIELDS))]
    if field == "gzip":  # damage the compressed stream itself
        data = bytearray(gzip.compress(plain, compresslevel=1))
        for _ in range(int(rng.integers(1, 8))):
            position = int(rng.integers(10, len(data)))
            data[position] ^= int(rng.integers(1, 256))
        out.write_bytes(bytes(data))
        return field
    if field == "truncate":
        plain = plain[: int(rng.integers(0, len(plain)))]
    else:
        image = nib.load(source)
        header = image.header.copy()
        size = header.sizeof_hdr
        value = NASTY[rng.integers(len(NASTY))]
        try:
            if field == "dim":
                dims = header["dim"].copy()
                dims[int(rng.integers(0, 8))] = (
                    int(np.clip(value, -32768, 32767)) if np.isfinite(value) else 0
                )
                header["dim"] = dims
            elif field in ("datatype", "bitpix"):
                header[field] = int(rng.choice([0, 1, 2, 4, 8, 16, 32, 64, 128, 256, 511, 2304]))
            elif field == "vox_offset" or field in ("scl_slope", "scl_inter"):
                header[field] = value
            elif field == "pixdim":
                pixdim = header["pixdim"].copy()
                pixdim[int(rng.integers(0, 8))] = value
                header["pixdim"] = pixdim
            elif field in ("qform", "sform"):
                header[f"{field}_code"] = int(rng.integers(0, 5))
                if field == "sform":
                    row = f"srow_{'xyz'[rng.integers(3)]}"
                    values = header[row].copy()
                    values[int(rng.integers(0, 4))] = value
                    header[row] = values
                else:
                    header[f"quatern_{'bcd'[rng.integers(3)]}"] = value
            elif field == "magic":
                header["magic"] = bytes(rng.integers(0, 256, 4, dtype=np.uint8))
        except (ValueError, OverflowError, TypeError):
            pass  # a value the field cannot hold: keep the original
        plain = header.binaryblock + plain[size:]
    out.write_bytes(gzip.compress(plain, compresslevel=1) if zipped else plain)
    return field


class Timeout(Exception):
    pass


def _alarm(signum, frame):
    raise Timeout


def run_case(path: Path, settings: Settings):
    """``process_or_reason`` of one file under the time bound; raises what escapes it."""
    previous = signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(SECONDS_PER_SCAN)
    try:
        return process_or_reason(Scan(path, path.name, "x", ""), settings)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def fuzz(cases: int, seed: int, folder: Path) -> tuple[Counter, list[str]]:
    """Run ``cases`` cases; returns outcomes by (field, kind) and the broken cases."""
    rng = np.random.default_rng(seed)
    starts = sources(folder)
    settings = Settings(volume=0)
    outcomes: Counter = Counter()
    broken = []
    for index in range(cases):
        source = starts[rng.integers(len(starts))]
        out = folder / f"case{index}{''.join(source.suffixes)}"
        field = mutate(source, rng, out)
        try:
            result = run_case(out, settings)
        except Timeout:
            broken.append(f"case {index} ({field} of {source.name}): over {SECONDS_PER_SCAN} s")
            continue
        except BaseException as exc:
            broken.append(f"case {index} ({field} of {source.name}): {type(exc).__name__}: {exc}")
            continue
        kind = "rejected" if isinstance(result, str) else "stored"
        if kind == "rejected" and "\n" in result:
            broken.append(f"case {index} ({field} of {source.name}): a reason of several lines")
        outcomes[field, kind] += 1
        out.unlink()
    return outcomes, broken


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--cases", type=int, default=2000, help="how many (default: 2000)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as folder:
        outcomes, broken = fuzz(args.cases, args.seed, Path(folder))
    print(f"{args.cases} cases in {time.perf_counter() - started:.0f} s, seed {args.seed}")
    print("| mutation | stored | rejected |")
    print("|---|---|---|")
    for field in FIELDS:
        print(f"| {field} | {outcomes[field, 'stored']} | {outcomes[field, 'rejected']} |")
    for line in broken:
        print(f"BROKEN: {line}")
    return 1 if broken else 0


if __name__ == "__main__":
    sys.exit(main())
