"""Describe a store: slices, subjects, splits and classes, the settings it was made with, its size.

With --preview, also draw a grid of random slices with their subject and label; with --qc,
the registrations of a standard-space store (--space mni) under the template's outline.
``python -m loader verify STORE...`` checks every chunk against its checksum instead.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from dataclasses import dataclass

import numpy as np

from loader import files
from loader.exits import run_main
from loader.options import add_options, check_settings, option, settings_from_args
from loader.qc import mark_sides, registration_picture
from loader.schema import (
    OLD_SIMILARITY,
    SIMILARITY,
    SOURCE_PATH,
    SUBJECT_ID,
    SUBJECT_SPLIT,
    VIEW_SIDES,
)
from loader.store import Store, open_store
from loader.stores import check_agree, store_paths


@dataclass(frozen=True)
class PreviewSettings:
    """What ``--preview`` draws."""

    preview: str | None = option(
        None, "draw a grid of random slices into this PNG", metavar="OUT.png", kind=str
    )
    count: int = option(36, "slices in the preview", metavar="N", at_least=1)
    qc: str | None = option(
        None,
        "a --space mni store: draw its worst registrations and two random ones in three "
        "planes under the template's brain outline into this PNG",
        metavar="OUT.png",
        kind=str,
    )
    seed: int = option(0, "which random slices", metavar="S", at_least=0)

    def __post_init__(self):
        check_settings(self)


def _parser() -> tuple[argparse.ArgumentParser, dict[str, str]]:
    parser = argparse.ArgumentParser(prog="python -m loader", description=__doc__)
    parser.add_argument(
        "store",
        nargs="+",
        metavar="STORE",
        help="a store written by python -m preprocess; several, or a folder of them",
    )
    return parser, add_options(parser, PreviewSettings)


def main(argv: list[str] | None = None) -> int:
    """Run ``python -m loader`` (or ``python -m loader verify``); returns the exit status."""
    arguments = sys.argv[1:] if argv is None else argv
    if arguments[:1] == ["verify"]:
        from loader.verify import main as verify_main

        return verify_main(arguments[1:])
    parser, flags = _parser()

    def body(args: argparse.Namespace) -> int:
        settings = settings_from_args(PreviewSettings, args)
        for picture in (settings.preview, settings.qc):
            folder = os.path.dirname(os.path.abspath(picture or "."))
            if not os.path.isdir(folder):
                raise FileNotFoundError(f"{picture}: no such folder for the picture")
        paths = store_paths(args.store)
        with contextlib.ExitStack() as stack:
            stores = [stack.enter_context(open_store(path)) for path in paths]
            print("\n\n".join(describe(store) for store in stores))
            if len(stores) > 1:
                check_agree(stores)
                total = sum(store.num_slices for store in stores)
                print(
                    f"\n{len(stores)} stores read as one: {total} slices; they agree on "
                    "what a slice means"
                )
            if settings.preview:
                preview(stores[0], settings.preview, settings.count, settings.seed)
                print(f"preview: {settings.preview} (of {stores[0].path})")
            if settings.qc:
                drawn = registration_picture(stores[0], settings.qc, seed=settings.seed)
                print(f"registration check: {settings.qc} ({len(drawn)} scans of {stores[0].path})")
        return 0

    return run_main(parser, argv, body, flags)


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
        f"channels: {', '.join(store.channel_names)}"
        + (f"; masks with labels {store.mask_labels}" if store.masks is not None else ""),
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
    if store.template is not None:
        similarity = table[SIMILARITY]
        worst = int(np.argmin(similarity))
        first, last = store.template["slab"]
        measure = store.template.get("similarity", OLD_SIMILARITY)
        lines.append(
            f"space: {store.space} ({store.template['name']}, {store.template['axis']} planes "
            f"{first} to {last}); registration similarity ({measure}): median "
            f"{np.median(similarity):.2f}, lowest {similarity[worst]:.2f} "
            f"({table[SOURCE_PATH][worst]})"
        )
    else:
        lines.append(f"space: {store.space}")
    columns = [f"{name} ({kind})" for name, (kind, _) in store.participants().items()]
    lines.append(f"labels table: {', '.join(columns) if columns else '(none)'}")
    config = {k: v for k, v in store.config.items() if k != "inputs"}
    lines.append("settings: " + json.dumps(config, sort_keys=True))
    lines.append("inputs: " + ", ".join(store.config.get("inputs", [])))
    return "\n".join(lines)


def preview(store: Store, path: str, count: int = 36, seed: int = 0) -> None:
    """Save a grid of ``count`` random slices.

    Each tile is titled with its subject, label, split and slice position, and carries the
    patient's sides at its edges (A/P, S/I, L/R) as a radiology viewer shows them. A slice
    of several channels shows them side by side, named below; a store with masks draws
    each slice's mask contours (red) over every channel.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rng = np.random.default_rng(seed)
    rows = np.sort(rng.choice(store.num_slices, size=min(count, store.num_slices), replace=False))
    table = store.subjects_table()
    sides = VIEW_SIDES.get(store.config.get("axis", ""))
    channels = store.channel_names
    columns = max(1, int(np.ceil(np.sqrt(len(rows) / len(channels)))))
    lines = int(np.ceil(len(rows) / columns))
    width = 2.0 * len(channels) * columns
    figure, axes = plt.subplots(lines, columns, figsize=(width, 2.3 * lines), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, row in zip(axes.flat, rows, strict=False):
        image = store.images[row] * store.scale + store.offset  # one slice at a time
        label = int(store.labels[row])
        scan = int(store.subject[row])
        parts = [image] if image.ndim == 2 else [image[..., c] for c in range(image.shape[-1])]
        ax.imshow(np.hstack(parts), cmap="gray")
        if store.masks is not None:
            mask = np.hstack([store.masks[row] > 0] * len(parts))
            if mask.any():
                ax.contour(mask, levels=[0.5], colors="red", linewidths=0.8)
        if len(parts) > 1:
            size = image.shape[1]
            for index, name in enumerate(channels):
                ax.text(
                    (index + 0.5) * size,
                    image.shape[0] - 2,
                    name,
                    color="cyan",
                    fontsize=6,
                    ha="center",
                    va="bottom",
                )
        title = f"sub-{table[SUBJECT_ID][scan]}"
        if label >= 0:
            title += f" {store.class_names[label]}"
        title += f"\n{table[SUBJECT_SPLIT][scan]}, slice {int(store.slice_index[row])}"
        ax.set_title(title, fontsize=7)
        if sides:
            mark_sides(ax, sides)
    axis = store.config.get("axis", "?")
    figure.suptitle(f"{store.path}: {len(rows)} random {axis} slices", fontsize=9)
    figure.tight_layout()
    files.save_png(figure, path)
    plt.close(figure)
