"""Describe a store: slices, subjects, splits and classes, the settings it was made with, its size.

With --preview, also draw a grid of random slices with their subject and label.
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np

from loader.store import (
    SOURCE_PATH,
    SUBJECT_ID,
    SUBJECT_SPLIT,
    Store,
    StoreError,
    open_store,
)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m loader", description=__doc__)
    parser.add_argument("store", metavar="STORE", help="a store written by python -m preprocess")
    parser.add_argument("--preview", metavar="OUT.png", help="draw a grid of random slices")
    parser.add_argument("--count", type=int, default=36, help="slices in the preview (default: 36)")
    parser.add_argument("--seed", type=int, default=0, help="which random slices (default: 0)")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run ``python -m loader``; returns the exit status."""
    try:
        args = _parser().parse_args(argv)
    except SystemExit as exc:
        return int(exc.code or 0)
    if args.count < 1:
        print("error: --count must be at least 1", file=sys.stderr)
        return 2
    try:
        with open_store(args.store) as store:
            print(describe(store))
            if args.preview:
                preview(store, args.preview, args.count, args.seed)
                print(f"preview: {args.preview}")
    except (FileNotFoundError, StoreError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


def describe(store: Store) -> str:
    """A few lines about a store."""
    table = store.subjects_table()
    labels = store.labels
    names = store.class_names
    lines = [
        f"{store.path}: {store.num_slices} slices {store.slice_shape[0]}x{store.slice_shape[1]} "
        f"{store.dtype}, {len(set(table[SUBJECT_ID]))} subjects, {len(table[SOURCE_PATH])} scans, "
        f"{store.size_bytes / 1e6:.1f} MB",
        f"uuid {store.uuid}, created {store.created}, chunks of {store.chunk_slices} slices, "
        f"compression {store.images.compression or 'none'}",
        f"classes: {', '.join(names) if names else '(none: unlabelled)'}",
    ]
    header = ["split", "rows", "subjects", *names]
    rows = [header]
    for name, split in store.splits.items():
        subjects = set(table[SUBJECT_ID][table[SUBJECT_SPLIT] == name])
        counts = np.bincount(
            labels[split.start : split.stop].clip(-1) + 1, minlength=len(names) + 1
        )
        rows.append([name, str(len(split)), str(len(subjects)), *map(str, counts[1:])])
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines += [
        "  " + "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in rows
    ]
    config = {k: v for k, v in store.config.items() if k != "inputs"}
    lines.append("settings: " + json.dumps(config, sort_keys=True))
    lines.append("inputs: " + ", ".join(store.config.get("inputs", [])))
    return "\n".join(lines)


def preview(store: Store, path: str, count: int = 36, seed: int = 0) -> None:
    """Save a grid of ``count`` random slices, each titled with its subject and label."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rng = np.random.default_rng(seed)
    rows = np.sort(rng.choice(store.num_slices, size=min(count, store.num_slices), replace=False))
    table = store.subjects_table()
    columns = int(np.ceil(np.sqrt(len(rows))))
    lines = int(np.ceil(len(rows) / columns))
    figure, axes = plt.subplots(lines, columns, figsize=(1.8 * columns, 2.0 * lines), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, row in zip(axes.flat, rows, strict=False):
        image = store.images[row] * store.scale + store.offset  # one slice at a time
        label = int(store.labels[row])
        scan = int(store.subject[row])
        ax.imshow(image, cmap="gray")
        title = f"sub-{table[SUBJECT_ID][scan]}"
        if label >= 0:
            title += f"\n{store.class_names[label]}"
        ax.set_title(title, fontsize=8)
    figure.suptitle(f"{store.path}: {len(rows)} random slices", fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
