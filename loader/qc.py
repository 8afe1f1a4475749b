"""The registration check of a standard-space store: scans in three planes under the
template's brain outline, as fMRIPrep's reports draw them.

Everything comes from the store: a scan's stored slices, stacked by template plane, are a
volume on the template's grid (1 mm between planes, the slice's pixels within a plane),
cut through its middle the other two ways; the outline is the template's brain cut the
same way (``/template/brain``). A failed registration shows as anatomy off the outline.
"""

from __future__ import annotations

import numpy as np

from loader import files
from loader.schema import SIMILARITY, SOURCE_PATH, SUBJECT_ID
from loader.store import Store

# The planes drawn, by slicing axis: the stored plane, then across its rows and its columns.
VIEWS = {
    "axial": ("axial", "coronal", "sagittal"),
    "coronal": ("coronal", "axial", "sagittal"),
    "sagittal": ("sagittal", "axial", "coronal"),
}


def chosen_scans(similarity: np.ndarray, worst: int, random: int, seed: int) -> list[int]:
    """The ``worst`` scans by similarity (lowest first), then ``random`` others.

    >>> chosen_scans(np.array([0.9, 0.2, 0.8, 0.95]), worst=2, random=1, seed=0)
    [1, 2, 3]
    """
    order = [int(k) for k in np.argsort(similarity, kind="stable")]
    rest = order[worst:]
    picked = np.random.default_rng(seed).choice(len(rest), min(random, len(rest)), replace=False)
    return order[:worst] + sorted(rest[k] for k in picked)


def registration_picture(
    store: Store, path: str, worst: int = 4, random: int = 2, seed: int = 0
) -> list[int]:
    """Draw the worst registrations and a few random ones into a PNG.

    Each row is one scan: its similarity with the template in the title, three planes
    through the middle of the slab, the template's brain outlined in red.

    Returns:
        The scans drawn (rows of the subjects table).

    Raises:
        ValueError: a store in native space.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if store.space != "mni":
        raise ValueError(
            f"{store.path}: --qc draws registrations: it needs a store made with --space mni "
            f"(this one is in {store.space} space)"
        )
    table = store.subjects_table()
    scans = chosen_scans(table[SIMILARITY], worst, random, seed)
    planes, brain = store.template_brain()
    rows_of = store.rows_of_scans(scans)
    axis = store.template["axis"]
    aspect = _plane_aspect(store.template, store.slice_shape[0])
    figure, axes = plt.subplots(len(scans), 3, figsize=(7.5, 2.6 * len(scans)), squeeze=False)
    for line, scan in zip(axes, scans, strict=True):
        volume = _volume(store, rows_of[scan], planes)
        for ax, name, image, outline, ratio in zip(
            line, VIEWS[axis], _cuts(volume), _cuts(brain), (1.0, aspect, aspect), strict=True
        ):
            ax.imshow(image, cmap="gray", aspect=ratio, vmin=0, vmax=1)
            ax.contour(outline, levels=[0.5], colors="red", linewidths=0.7)
            ax.set_title(name, fontsize=7)
            ax.axis("off")
        line[0].set_title("")
        line[0].set_title(
            f"sub-{table[SUBJECT_ID][scan]} ({table[SOURCE_PATH][scan]})\n"
            f"similarity {table[SIMILARITY][scan]:.2f}: {VIEWS[axis][0]}",
            fontsize=7,
            loc="left",
        )
    figure.suptitle(
        f"{store.path}: the {min(worst, len(scans))} lowest similarities, then random scans; "
        f"red: the template's brain ({store.template['name']})",
        fontsize=8,
    )
    # the title above the first row's two lines: tight_layout alone lets them touch
    figure.tight_layout(rect=(0, 0, 1, 1 - 0.3 / figure.get_figheight()))
    files.save_png(figure, path)
    plt.close(figure)
    return scans


def _volume(store: Store, rows: np.ndarray, planes: np.ndarray) -> np.ndarray:
    """A scan's first channel stacked by template plane: ``(P, S, S)`` in [0, 1]."""
    size = store.slice_shape[0]
    volume = np.zeros((len(planes), size, size), np.float32)
    for row in rows:
        image = store.images[int(row)] * store.scale + store.offset
        plane = int(store.slice_index[int(row)])
        volume[np.searchsorted(planes, plane)] = image if image.ndim == 2 else image[..., 0]
    return volume


def _cuts(volume: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The middle plane, and the cuts through the middle row and column (the last plane up)."""
    count, size, _ = volume.shape
    return volume[count // 2], volume[::-1, size // 2, :], volume[::-1, :, size // 2]


def _plane_aspect(template: dict, size: int) -> float:
    """Height over width of one pixel in the cuts across planes: the planes' spacing over
    the slice's pixel (the template's square field of view over ``size``)."""
    affine = np.array(template["affine"])
    voxel = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))
    along = {"sagittal": 0, "coronal": 1, "axial": 2}[template["axis"]]
    extent = max(template["shape"][k] * voxel[k] for k in range(3) if k != along)
    return float(voxel[along] / (extent / size))


def mark_sides(ax, sides: tuple[str, str, str, str]) -> None:
    """Write the patient's sides at the top, bottom, left and right edge of a tile."""
    top, bottom, left, right = sides
    style = {"color": "yellow", "fontsize": 7, "transform": ax.transAxes}
    ax.text(0.5, 0.98, top, ha="center", va="top", **style)
    ax.text(0.5, 0.02, bottom, ha="center", va="bottom", **style)
    ax.text(0.02, 0.5, left, ha="left", va="center", **style)
    ax.text(0.98, 0.5, right, ha="right", va="center", **style)
