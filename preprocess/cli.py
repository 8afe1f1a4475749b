"""Turn NIfTI scans into a chunked HDF5 store of square 2-D slices for training.

INPUT is any mix of .nii/.nii.gz files and folders: a BIDS tree (with participants.tsv),
a folder of class sub-folders (the folder names are the labels), or any folder of scans.
Exit status: 0 when every scan was written, 1 when some were rejected (the store holds
the rest), 2 for usage errors or when nothing usable was found (no store written).
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import fields

from preprocess.discover import LAYOUTS, InputError
from preprocess.pipeline import COMPRESSIONS, DTYPES, RunError, Settings, Summary, run
from preprocess.slices import AXES
from preprocess.volume import NORMALIZATIONS
from preprocess.writer import partial_path


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m preprocess",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("inputs", nargs="+", metavar="INPUT", help="NIfTI files or folders")
    parser.add_argument(
        "-o", "--output", required=True, metavar="STORE.h5", help="the store to write"
    )
    found = parser.add_argument_group("finding scans and labels")
    found.add_argument(
        "--layout",
        choices=LAYOUTS,
        default="auto",
        help="how input folders are laid out (default: auto)",
    )
    found.add_argument(
        "--suffix",
        default="T1w",
        help="BIDS suffix (modality) to take from BIDS trees (default: T1w)",
    )
    found.add_argument(
        "--labels",
        metavar="FILE",
        help="a .tsv or .csv of subject labels (default: participants.tsv of BIDS inputs)",
    )
    found.add_argument(
        "--label-column",
        metavar="NAME",
        help="the column of --labels that holds each subject's class",
    )
    found.add_argument(
        "--id-column",
        default="participant_id",
        metavar="NAME",
        help="the column of --labels that holds subject ids (default: participant_id)",
    )
    found.add_argument(
        "--volume",
        type=int,
        metavar="K",
        help="take volume K (from 0) of 4-D files; without it 4-D files are rejected",
    )
    image = parser.add_argument_group("slices")
    image.add_argument(
        "--normalize",
        choices=NORMALIZATIONS,
        default="percentile",
        help="intensity scaling per volume (default: percentile, to [0, 1])",
    )
    image.add_argument(
        "--axis", choices=tuple(AXES), default="axial", help="slicing direction (default: axial)"
    )
    image.add_argument(
        "--min-foreground",
        type=float,
        default=0.05,
        metavar="F",
        help="drop slices with less than this fraction of foreground pixels (default: 0.05)",
    )
    image.add_argument(
        "--size", type=int, default=64, help="side of the square slices in pixels (default: 64)"
    )
    storage = parser.add_argument_group("storage")
    storage.add_argument(
        "--dtype",
        choices=DTYPES,
        default="uint8",
        help="stored type of the slices (default: uint8, the fastest to read)",
    )
    storage.add_argument(
        "--compression",
        choices=COMPRESSIONS,
        default="none",
        help="HDF5 compression of the slices (default: none, the fastest to read)",
    )
    storage.add_argument(
        "--chunk-slices",
        type=int,
        default=64,
        metavar="C",
        help="slices per HDF5 chunk (default: 64)",
    )
    splits = parser.add_argument_group("splits (per subject, stratified by label)")
    splits.add_argument(
        "--val-fraction",
        type=float,
        default=0.2,
        metavar="F",
        help="share of subjects for 'val' (default: 0.2)",
    )
    splits.add_argument(
        "--test-fraction",
        type=float,
        default=0.0,
        metavar="F",
        help="share of subjects for 'test' (default: 0)",
    )
    splits.add_argument(
        "--folds",
        type=int,
        default=0,
        metavar="K",
        help="K cross-validation folds fold0..fold{K-1} instead of train/val/test",
    )
    splits.add_argument(
        "--seed", type=int, default=0, help="seed of the splits and of the row order (default: 0)"
    )
    run_group = parser.add_argument_group("running")
    run_group.add_argument(
        "--workers",
        type=int,
        default=_default_workers(),
        metavar="N",
        help="processes that compute slices (default: the CPU count, at most 8)",
    )
    run_group.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an existing store once the new one is complete",
    )
    run_group.add_argument(
        "--resume", action="store_true", help="continue an interrupted run from STORE.h5.partial"
    )
    run_group.add_argument(
        "--buffer-mb",
        type=int,
        default=1024,
        metavar="MB",
        help="memory for the final shuffle of the rows (default: 1024)",
    )
    return parser


def _default_workers() -> int:
    return min(8, len(os.sched_getaffinity(0)))


def main(argv: list[str] | None = None) -> int:
    """Run ``python -m preprocess``; returns the exit status."""
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse has printed the problem
        return int(exc.code or 0)
    try:
        # every Settings field has an option of the same name
        settings = Settings(**{field.name: getattr(args, field.name) for field in fields(Settings)})
        if args.workers < 1 or args.buffer_mb < 1:
            raise ValueError("--workers and --buffer-mb must be at least 1")
        summary = run(
            args.inputs,
            args.output,
            settings,
            workers=args.workers,
            overwrite=args.overwrite,
            resume=args.resume,
            buffer_bytes=args.buffer_mb << 20,
            report=lambda line: print(line, file=sys.stderr),
        )
    except (ValueError, InputError, RunError, FileExistsError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # e.g. the disk filled up: what was finished is kept
        kept = partial_path(args.output)
        hint = f"; finished scans are kept in {kept}: rerun with --resume" if kept.exists() else ""
        print(f"error: {exc}{hint}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(
            f"interrupted: finished scans are kept; continue with --resume -o {args.output}",
            file=sys.stderr,
        )
        return 130
    print(_format(summary))
    return 1 if summary.rejected else 0


def _format(summary: Summary) -> str:
    """The closing summary: scans, slices per split and class, size, time."""
    classes = sorted(
        {name for counts in summary.slices_per_split_class.values() for name in counts}
    )
    total = sum(sum(counts.values()) for counts in summary.slices_per_split_class.values())
    scans = summary.written + summary.resumed
    lines = [
        f"wrote {summary.store} ({summary.size_bytes / 1e6:.1f} MB) in {summary.seconds:.1f} s: "
        f"{scans} scans ({summary.resumed} from an earlier run), {len(summary.rejected)} rejected, "
        f"{total} slices"
    ]
    header = ["split", "rows", *classes]
    rows = [header]
    for name, (start, stop) in summary.splits.items():
        counts = summary.slices_per_split_class.get(name, {})
        rows.append([name, str(stop - start), *(str(counts.get(c, 0)) for c in classes)])
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines += [
        "  " + "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)) for row in rows
    ]
    if summary.rejected:
        lines.append(f"{len(summary.rejected)} rejected scan(s), each named above with its reason")
    return "\n".join(lines)
