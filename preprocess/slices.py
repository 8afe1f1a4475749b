"""Cutting a canonical volume into square 2-D slices that keep their physical aspect ratio."""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from preprocess.errors import ScanError

# Axis of the canonical (RAS) volume that each slicing direction walks along.
AXES = {"sagittal": 0, "coronal": 1, "axial": 2}


def cut_slices(
    data: np.ndarray,
    mask: np.ndarray,
    voxel_size: np.ndarray,
    axis: str = "axial",
    size: int = 64,
    min_foreground: float = 0.05,
) -> tuple[np.ndarray, np.ndarray]:
    """Cut a volume into ``size`` x ``size`` slices, dropping near-empty ones.

    Each kept slice is turned to the usual viewing orientation (anterior or superior up,
    the patient's left on the left), padded with the volume's minimum to a square field
    of view in millimetres, smoothed with a Gaussian where it is shrunk (anti-aliasing,
    sigma = (factor - 1) / 2 pixels, as ``skimage.transform.resize``) and resampled
    linearly. A sphere scanned with any voxel size comes out round.

    Args:
        data: a canonical volume ``(x, y, z)``.
        mask: its foreground.
        voxel_size: mm along x, y, z.
        axis: ``axial``, ``coronal`` or ``sagittal``. Defaults to ``axial``.
        size: the side of the output slices. Defaults to 64.
        min_foreground: keep slices with at least this fraction of foreground pixels.
            Defaults to 0.05.

    Returns:
        ``(slices, positions)``: float32 ``(n, size, size)`` and the int16 index of each
        slice along the axis.

    Raises:
        ScanError: no slice has enough foreground.
    """
    along = AXES[axis]
    in_plane = tuple(a for a in range(3) if a != along)
    fraction = mask.mean(axis=in_plane)
    positions = np.flatnonzero(fraction >= min_foreground).astype(np.int16)
    if positions.size == 0:
        raise ScanError(
            f"empty: no {axis} slice has {min_foreground:.0%} foreground "
            f"(the most is {fraction.max():.1%}); lower --min-foreground"
        )
    stack = np.take(data, positions, axis=along)
    stack = np.moveaxis(stack, along, 0)  # (n, a, b), a < b in RAS axis order
    stack = np.rot90(stack, axes=(1, 2))  # (n, b, a): b decreasing downwards, a rightwards
    spacing = np.array([voxel_size[in_plane[1]], voxel_size[in_plane[0]]], dtype=np.float64)
    stack, block = _pad_to_square(stack, spacing, float(data.min()), size)
    return _resample(_block_mean(stack, block), size), positions


def _pad_to_square(
    stack: np.ndarray, spacing: np.ndarray, fill: float, size: int
) -> tuple[np.ndarray, np.ndarray]:
    """Pad rows and columns so both span the same millimetres, centred.

    Each side is also padded to a multiple of its block: the integer factor (half the
    shrink factor, at least 1) by which :func:`_block_mean` first averages, which changes
    the field of view by less than one block (under 1% for a 1 mm scan to 64 pixels).

    Returns:
        The padded stack and the block of each in-plane axis.
    """
    extent = np.array(stack.shape[1:]) * spacing
    target = np.maximum(np.round(extent.max() / spacing).astype(int), stack.shape[1:])
    block = np.maximum(1, target // size // 2)
    target = -(-target // block) * block
    before = (target - stack.shape[1:]) // 2
    after = target - stack.shape[1:] - before
    widths = ((0, 0), (before[0], after[0]), (before[1], after[1]))
    return np.pad(stack, widths, mode="constant", constant_values=fill), block


def _block_mean(stack: np.ndarray, block: np.ndarray) -> np.ndarray:
    """Average blocks of ``block`` pixels (area averaging): a cheap first shrink.

    >>> _block_mean(np.arange(16.0).reshape(1, 4, 4), np.array([2, 2]))[0].tolist()
    [[2.5, 4.5], [10.5, 12.5]]
    """
    if (block == 1).all():
        return stack
    rows, columns = (int(b) for b in block)
    total = np.zeros(
        (stack.shape[0], stack.shape[1] // rows, stack.shape[2] // columns), np.float32
    )
    for row in range(rows):  # strided adds: several times faster than reshape(...).mean()
        for column in range(columns):
            total += stack[:, row::rows, column::columns]
    total *= np.float32(1 / (rows * columns))
    return total


def _resample(stack: np.ndarray, size: int) -> np.ndarray:
    """Resize each slice of ``(n, h, w)`` to ``(size, size)`` with anti-aliasing."""
    factors = np.array(stack.shape[1:]) / size  # > 1 shrinks
    sigma = np.maximum(0, (factors - 1) / 2)
    stack = np.ascontiguousarray(stack, dtype=np.float32)
    if sigma.any():
        stack = ndimage.gaussian_filter(stack, sigma=(0, *sigma), mode="nearest")
    zoom = (1, size / stack.shape[1], size / stack.shape[2])
    out = ndimage.zoom(stack, zoom, order=1, mode="nearest", grid_mode=True, prefilter=False)
    return out[:, :size, :size]
