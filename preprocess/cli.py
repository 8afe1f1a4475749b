"""Turn MRI scans into a chunked HDF5 store of square 2-D slices for training.

INPUT is any mix of files and folders of NIfTI (.nii, .nii.gz, .hdr/.img pairs), FreeSurfer
(.mgz, .mgh), Analyze 7.5 (.hdr/.img) and DICOM series (any folder of DICOM files, converted
by dcm2niix, subjects stored as keyed hashes: give --id-salt). A folder is a BIDS tree (with
participants.tsv), a folder of class sub-folders (the folder names are the labels), or any
folder of scans.
Exit status: 0 when every scan was written, 1 when some were rejected (the store holds
the rest), 2 for usage errors or when nothing usable was found (no store written).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import secrets
import sys

from loader import files
from loader.exits import resume_command, run_main
from loader.options import add_options, settings_from_args
from preprocess.dicom import LISTING_COLUMNS, SALT_VARIABLE
from preprocess.errors import PreprocessError
from preprocess.find import find_scans
from preprocess.pipeline import Summary, run
from preprocess.settings import RunOptions, Settings
from preprocess.standard import check_line
from preprocess.workers import keep_freed_memory
from preprocess.writer import partial_path


def _parser() -> tuple[argparse.ArgumentParser, dict[str, str]]:
    """The parser, and setting name -> flag."""
    parser = argparse.ArgumentParser(
        prog="python -m preprocess",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "inputs",
        nargs="+",
        metavar="INPUT",
        help="scan files (NIfTI, MGZ, Analyze, DICOM) or folders of them",
    )
    parser.add_argument(
        "-o", "--output", metavar="STORE.h5", help="the store to write (required unless listing)"
    )
    parser.add_argument(
        "--list-series",
        nargs="?",
        const="-",
        metavar="FILE.csv",
        help="list every DICOM series found (kind, size, whether it would be stored and why "
        "not) and write nothing; with FILE.csv, also as CSV",
    )
    flags = add_options(parser, Settings)
    flags.update(add_options(parser, RunOptions))
    return parser, flags


def main(argv: list[str] | None = None) -> int:
    """Run ``python -m preprocess``; returns the exit status."""
    argv = sys.argv[1:] if argv is None else list(argv)
    parser, flags = _parser()

    def body(args: argparse.Namespace) -> int:
        settings = settings_from_args(Settings, args)
        options = settings_from_args(RunOptions, args)
        if args.list_series is not None:
            return _list_series(args.inputs, settings, options, args.list_series)
        if args.output is None:
            raise PreprocessError("-o/--output STORE.h5 is required (unless --list-series)")
        keep_freed_memory()
        summary = run(
            args.inputs,
            args.output,
            settings,
            options,
            report=lambda line: print(line, file=sys.stderr),
        )
        print(_format(summary))
        return 1 if summary.rejected else 0

    def hint(args: argparse.Namespace) -> str:
        if args.output is None:
            return ""
        kept = partial_path(args.output)
        if not kept.is_dir():
            return ""
        command = resume_command("preprocess", argv)
        return f"; finished scans are kept in {kept}; continue with: {command}"

    return run_main(parser, argv, body, flags, hint)


def _list_series(inputs: list[str], settings: Settings, options: RunOptions, csv: str) -> int:
    """Print the table of every DICOM series of the inputs (and write it as CSV unless
    ``csv`` is ``-``); nothing else is written. Returns 0.

    Without a secret for the subjects' hash the listing hashes them with a one-off one:
    series of one patient still share a subject, and no PatientID is printed."""
    salt = options.id_salt or os.environ.get(SALT_VARIABLE) or None
    one_off = salt is None and not settings.keep_patient_ids
    salt = secrets.token_hex(16) if one_off else salt
    found = find_scans(inputs, settings, lambda line: None, salt, listing=True)
    with contextlib.closing(found):
        rows = found.converted.listing if found.converted is not None else []
    rows = sorted(rows, key=lambda row: (row["folder"], str(row["series"]).zfill(8)))
    if csv != "-":
        files.write_rows(csv, rows)
    print(_table(rows, LISTING_COLUMNS))
    stored = sum(row["stored"] == "yes" for row in rows)
    others = len(found.scans) - stored
    print(f"{len(rows)} DICOM series, {stored} would be stored; {others} other scans")
    if one_off and rows:
        print(
            "subjects hashed with a one-off secret: give --id-salt SECRET (or set "
            f"{SALT_VARIABLE}) for the ids a store gets"
        )
    return 0


def _table(rows: list[dict], columns) -> str:
    """Rows as a plain text table with a header."""
    cells = [list(columns)] + [[str(row[column]) for column in columns] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in cells
    )


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
    lines += [check_line(source, similarity) for source, similarity in summary.check_registration]
    return "\n".join(lines)
