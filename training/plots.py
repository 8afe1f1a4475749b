"""Pictures of a run: learning curves and confusion matrices (matplotlib, no screen needed)."""

from __future__ import annotations

import csv
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from loader import files
from loader.qc import mark_sides


def read_history(path: Path) -> dict[str, list[float]]:
    """``history.csv`` (Keras' CSVLogger) as column -> values; empty when there is none."""
    if not path.is_file():
        return {}
    with open(path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    if not rows:
        return {}
    return {name: [float(row[name]) for row in rows] for name in rows[0]}


def plot_curves(
    history: dict[str, list[float]],
    path: Path,
    best_epoch: int | None = None,
    metric: str = "accuracy",
) -> None:
    """Loss and ``metric`` per epoch (numbered from 1), training and validation, side by side.

    The best epoch (the weights kept) is marked with a dashed line.
    """
    figure, axes = plt.subplots(1, 2, figsize=(10, 4))
    epochs = np.arange(1, len(history.get("loss", [])) + 1)
    for ax, panel in zip(axes, ("loss", metric), strict=True):
        for prefix, style in (("", "-o"), ("val_", "-s")):
            name = prefix + panel
            if name in history:
                ax.plot(epochs, history[name], style, markersize=3, label=name)
        if best_epoch is not None:
            ax.axvline(best_epoch, color="grey", linestyle="--", label=f"best epoch ({best_epoch})")
        ax.set_xlabel("epoch")
        ax.set_ylabel(panel)
        ax.set_title(panel)
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.grid(alpha=0.3)
        ax.legend()
    figure.tight_layout()
    _save(figure, path)


def plot_confusions(metrics: dict, class_names: list[str], path: Path) -> None:
    """One confusion matrix per split and level (slices, subjects).

    Cells show counts, shaded by the share of their true class (rows sum to 1), so a
    small class reads as clearly as a large one; the title gives the accuracy.
    """
    panels = [
        (f"{split} {level}", results[level])
        for split, results in metrics.items()
        for level in ("slices", "subjects")
    ]
    figure, axes = plt.subplots(1, len(panels), figsize=(3.6 * len(panels), 3.8), squeeze=False)
    for ax, (title, scores) in zip(axes[0], panels, strict=True):
        matrix = np.asarray(scores["confusion"])
        shares = matrix / np.maximum(matrix.sum(axis=1, keepdims=True), 1)
        ax.imshow(shares, cmap="Blues", vmin=0, vmax=1)
        for (row, column), count in np.ndenumerate(matrix):
            colour = "white" if shares[row, column] > 0.5 else "black"
            ax.text(column, row, str(count), ha="center", va="center", color=colour)
        ticks = np.arange(len(class_names))
        ax.set_xticks(ticks, class_names, rotation=45, ha="right")
        ax.set_yticks(ticks, class_names)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        accuracy = scores["accuracy"]
        ax.set_title(f"{title}\naccuracy {accuracy:.3f}" if accuracy is not None else title)
    figure.tight_layout()
    _save(figure, path)


def plot_scatter(points: dict[str, tuple[np.ndarray, np.ndarray]], target: str, path: Path) -> None:
    """Predicted against true value per subject, one colour per split, with the identity line.

    Args:
        points: split -> ``(true, predicted)`` per subject.
        target: the target's name, for the axes.
        path: the PNG to write.
    """
    figure, ax = plt.subplots(figsize=(5, 5))
    values = np.concatenate([np.concatenate(pair) for pair in points.values()])
    low, high = float(values.min()), float(values.max())
    ax.plot([low, high], [low, high], "--", color="grey", label="identity")
    for split, (true, predicted) in points.items():
        mae = float(np.mean(np.abs(predicted - true)))
        ax.scatter(true, predicted, s=18, label=f"{split} (MAE {mae:.2f}, {len(true)} subjects)")
    ax.set_xlabel(f"true {target}")
    ax.set_ylabel(f"predicted {target}")
    ax.set_title(f"{target}: one point per subject")
    ax.set_aspect("equal", adjustable="datalim")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    figure.tight_layout()
    _save(figure, path)


def plot_segmentation(examples: dict, path: Path) -> None:
    """Validation slices with their true (green) and predicted (red) mask contours.

    Args:
        examples: ``image`` (``(h, w, C)``: the middle channel is drawn), ``true`` and
            ``predicted`` label masks, one per slice.
        path: the PNG to write.
    """
    count = len(examples["image"])
    figure, axes = plt.subplots(1, count, figsize=(2.4 * count, 2.8), squeeze=False)
    for ax, image, true, predicted in zip(
        axes[0], examples["image"], examples["true"], examples["predicted"], strict=True
    ):
        ax.imshow(image[..., image.shape[-1] // 2], cmap="gray")
        for mask, colour in ((true, "lime"), (predicted, "red")):
            if mask.any() and not mask.all():
                ax.contour(mask > 0, levels=[0.5], colors=colour, linewidths=1)
        ax.set_axis_off()
    axes[0][0].set_title("true: green, predicted: red", fontsize=8, loc="left")
    figure.tight_layout()
    _save(figure, path)


def plot_written_back(examples: list[tuple[str, np.ndarray, np.ndarray]], path: Path) -> None:
    """Written-back segmentations over their scans, each in the file's own voxel order.

    Args:
        examples: ``(title, plane, labels)``: a plane of a scan as its file stores it
            (first voxel axis to the right, second up) and the written labels on it.
        path: the PNG to write.
    """
    count = len(examples)
    figure, axes = plt.subplots(1, count, figsize=(3.0 * count, 3.4), squeeze=False)
    for ax, (title, plane, labels) in zip(axes[0], examples, strict=True):
        ax.imshow(plane.T, cmap="gray", origin="lower")
        if labels.any() and not labels.all():
            ax.contour(labels.T > 0, levels=[0.5], colors="red", linewidths=1, origin="lower")
        ax.set_title(title, fontsize=7)
        ax.set_axis_off()
    figure.suptitle("written segmentations (red) on the scans' own voxel grids", fontsize=8)
    figure.tight_layout()
    _save(figure, path)


def _save(figure, path: Path) -> None:
    files.save_png(figure, path)
    plt.close(figure)


def plot_maps(lines: list, title: str, sides: tuple | None, path: Path) -> None:
    """Saliency maps over their slices: one row per subject or group, one tile per slice.

    Red pixels raised the explained score (hiding them lowers it), blue ones lowered it;
    the colour scale is shared by the whole picture and the overlay's opacity follows the
    map's size, so quiet pixels show the slice.

    Args:
        lines: ``(row label, tiles)``; a tile is ``(title, image, map)``, both ``(S, S)``
            in the viewing orientation.
        title: the picture's title.
        sides: the patient's sides at the tiles' (top, bottom, left, right), or None.
        path: the PNG to write.
    """
    columns = max(1, max(len(tiles) for _, tiles in lines))
    maps = np.concatenate([np.ravel(m) for _, tiles in lines for _, _, m in tiles])
    scale = float(np.nanpercentile(np.abs(maps), 99.5)) if maps.size else 0.0
    scale = scale or 1.0
    figure, axes = plt.subplots(
        len(lines), columns, figsize=(1.9 * columns + 0.6, 2.1 * len(lines) + 0.5), squeeze=False
    )
    for row, (label, tiles) in zip(axes, lines, strict=True):
        for ax in row:
            ax.axis("off")
        for ax, (name, image, saliency) in zip(row, tiles, strict=False):
            ax.imshow(image, cmap="gray")
            opacity = np.clip(np.nan_to_num(np.abs(saliency)) / scale, 0, 1) * 0.85
            ax.imshow(saliency, cmap="RdBu_r", vmin=-scale, vmax=scale, alpha=opacity)
            ax.set_title(name, fontsize=7)
            if sides:
                mark_sides(ax, sides)
        row[0].text(
            -0.08, 0.5, label, transform=row[0].transAxes, rotation=90, fontsize=7,
            ha="right", va="center",
        )  # fmt: skip
    figure.suptitle(f"{title}\ncolour scale: +-{scale:.3g}", fontsize=8)
    figure.tight_layout()
    _save(figure, path)


def plot_compared_curves(curves: list[tuple[str, dict, str]], path: Path) -> None:
    """The validation curves of several runs side by side: the loss, then each task's
    monitored score (accuracy, MAE, Dice), one line per run.

    Args:
        curves: ``(run name, history, task)`` per run (``history`` from :func:`read_history`).
        path: the PNG to write.
    """
    panels = ["val_loss"]
    for _, history, _ in curves:
        panels += [name for name in history if name.startswith("val_") and name not in panels]
    panels = [p for p in panels if p in ("val_loss", "val_accuracy", "val_mae", "val_dice")]
    figure, axes = plt.subplots(1, len(panels), figsize=(4.6 * len(panels), 3.8), squeeze=False)
    for ax, panel in zip(axes[0], panels, strict=True):
        for name, history, _ in curves:
            if history.get(panel):
                epochs = np.arange(1, len(history[panel]) + 1)
                ax.plot(epochs, history[panel], "-o", markersize=3, label=name)
        ax.set_xlabel("epoch")
        ax.set_title(panel)
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    figure.tight_layout()
    _save(figure, path)
