"""Cutting a canonical volume into square 2-D slices that keep their physical aspect ratio."""

from __future__ import annotations

import functools

import numpy as np
from scipy import ndimage

from preprocess.errors import ScanError

# A slice's field of view may be at most this many times as wide as tall.
MAX_ASPECT = 50
# Axis of the canonical (RAS) volume that each slicing direction walks along.
AXES = {"sagittal": 0, "coronal": 1, "axial": 2}


def cut_slices(
    data: np.ndarray,
    mask: np.ndarray,
    voxel_size: np.ndarray,
    axis: str = "axial",
    size: int = 64,
    min_foreground: float = 0.05,
    scale: tuple[float, float, bool] = (1.0, 0.0, False),
) -> tuple[np.ndarray, np.ndarray]:
    """Cut a volume into ``size`` x ``size`` slices, dropping near-empty ones.

    Each kept slice is turned to the usual viewing orientation (anterior or superior up,
    the patient's left on the left), padded with the volume's minimum to a square field
    of view in millimetres, averaged over blocks of half the shrink factor (area averaging),
    smoothed with a Gaussian where it is still shrunk (anti-aliasing, sigma = (factor - 1) / 2
    pixels, as ``skimage.transform.resize``) and resampled linearly. A sphere scanned with
    any voxel size comes out round.

    Only the kept slices are converted to float32 and scaled. Padding, averaging, smoothing
    and resampling are linear and act on rows and columns separately, so they are applied
    as one matrix per axis (:func:`axis_operator`): two matrix products per stack.

    Args:
        data: a canonical volume ``(x, y, z)``, as stored or as float intensities.
        mask: its foreground.
        voxel_size: mm along x, y, z.
        axis: ``axial``, ``coronal`` or ``sagittal``. Defaults to ``axial``.
        size: the side of the output slices. Defaults to 64.
        min_foreground: keep slices with at least this fraction of foreground pixels.
            Defaults to 0.05.
        scale: ``(a, b, clip)``: intensity = ``data * a + b``, clipped to [0, 1] when
            ``clip`` (see ``preprocess.volume.normalization``). Defaults to the identity.

    Returns:
        ``(slices, positions)``: float32 ``(n, size, size)`` and the int16 index of each
        slice along the axis.

    Raises:
        ScanError: no slice has enough foreground.
    """
    positions = kept_positions(mask, axis, min_foreground)
    return slices_at(data, positions, voxel_size, axis, size, scale), positions


def kept_positions(mask: np.ndarray, axis: str, min_foreground: float) -> np.ndarray:
    """The int16 positions along ``axis`` of the slices with enough foreground.

    Raises:
        ScanError: no slice has enough foreground.
    """
    along = AXES[axis]
    in_plane = tuple(a for a in range(3) if a != along)
    plane = mask.shape[in_plane[0]] * mask.shape[in_plane[1]]
    fraction = np.count_nonzero(mask, axis=in_plane) / plane
    positions = np.flatnonzero(fraction >= min_foreground).astype(np.int16)
    if positions.size == 0:
        raise ScanError(
            f"empty: no {axis} slice has {min_foreground:.0%} foreground "
            f"(the most is {fraction.max():.1%}); lower --min-foreground"
        )
    return positions


def slices_at(
    data: np.ndarray,
    positions: np.ndarray,
    voxel_size: np.ndarray,
    axis: str = "axial",
    size: int = 64,
    scale: tuple[float, float, bool] = (1.0, 0.0, False),
    context: int = 0,
) -> np.ndarray:
    """The slices at ``positions``, as :func:`cut_slices` makes them.

    Args:
        context: with K > 0, each slice comes with its K neighbours on each side as
            channels, ``(n, size, size, 2K + 1)`` from the lowest position up; past the
            volume's edge a channel is 0.

    Returns:
        float32 ``(n, size, size)``, or ``(n, size, size, 2K + 1)`` with a context.
    """
    if context == 0:
        return _slices(data, positions, voxel_size, axis, size, scale)
    depth = data.shape[AXES[axis]]
    offsets = np.arange(-context, context + 1)
    wanted = positions[:, None].astype(np.int64) + offsets
    needed = np.unique(wanted[(wanted >= 0) & (wanted < depth)])
    made = _slices(data, needed, voxel_size, axis, size, scale)
    out = np.zeros((len(positions), size, size, len(offsets)), np.float32)
    for channel in range(len(offsets)):
        inside = (wanted[:, channel] >= 0) & (wanted[:, channel] < depth)
        out[inside, :, :, channel] = made[np.searchsorted(needed, wanted[inside, channel])]
    return out


def label_slices(
    labels: np.ndarray, positions: np.ndarray, voxel_size: np.ndarray, axis: str, size: int
) -> np.ndarray:
    """A label volume's slices at ``positions``, resampled by label, never blurred.

    Each label's share of every output pixel is resampled as the images are (padding with
    background, averaging, smoothing, zooming), and the pixel takes the label with the
    largest share: a majority vote weighted like the image's pixels.

    Returns:
        uint8 ``(n, size, size)``.
    """
    cut = _kept_stack(labels, positions, AXES[axis])
    values = np.unique(cut)
    if values.size == 1:
        return np.full((len(positions), size, size), values[0], np.uint8)
    spacing = _spacing(voxel_size, axis)
    best = np.full((len(positions), size, size), -1.0, np.float32)
    out = np.zeros((len(positions), size, size), np.uint8)
    for value in values:
        share = _resample((cut == value).astype(np.float32), spacing, float(value == 0), size)
        better = share > best
        out[better], best[better] = value, share[better]
    if 0 not in values:  # the padding is background too
        share = _resample(np.zeros(cut.shape, np.float32), spacing, 1.0, size)
        out[share > best] = 0
    return out


def _kept_stack(data: np.ndarray, positions: np.ndarray, along: int) -> np.ndarray:
    """The slices at ``positions`` as ``(n, rows, columns)`` in viewing orientation (a view
    where the positions are one run)."""
    first, last = int(positions[0]), int(positions[-1])
    if last - first + 1 == positions.size:  # one run of slices (the usual case): a view
        stack = np.moveaxis(data, along, 0)[first : last + 1]
    else:
        stack = np.moveaxis(np.take(data, positions, axis=along), along, 0)
    return np.rot90(stack, axes=(1, 2))  # (n, b, a): b decreasing downwards, a rightwards


def _spacing(voxel_size: np.ndarray, axis: str) -> np.ndarray:
    in_plane = [a for a in range(3) if a != AXES[axis]]
    return np.array([voxel_size[in_plane[1]], voxel_size[in_plane[0]]], dtype=np.float64)


def _slices(data, positions, voxel_size, axis, size, scale) -> np.ndarray:
    stack = _kept_stack(data, positions, AXES[axis])
    values = np.empty(stack.shape, np.float32)
    np.copyto(values, stack, casting="unsafe")  # the one conversion to float
    fill = _scaled(values, scale, data.min())
    return _resample(values, _spacing(voxel_size, axis), fill, size)


def _scaled(values: np.ndarray, scale: tuple[float, float, bool], lowest) -> float:
    """Apply ``scale`` to ``values`` in place; returns the scaled ``lowest`` (the padding)."""
    a, b, clip = scale
    if a != 1:
        np.multiply(values, np.float32(a), out=values)
    if b != 0:
        np.add(values, np.float32(b), out=values)
    fill = float(np.float32(lowest) * np.float32(a) + np.float32(b))
    if clip:
        np.clip(values, 0, 1, out=values)
        fill = min(max(fill, 0.0), 1.0)
    return fill


def square_geometry(
    shape: tuple[int, int], spacing: np.ndarray, size: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """How a slice is padded to a square field of view in millimetres, centred.

    Each side is also padded to a multiple of its block: the integer factor (half the
    shrink factor, at least 1) by which the slice is first averaged, which changes the
    field of view by less than one block (under 1% for a 1 mm scan to 64 pixels).

    Returns:
        ``(target, before, block)`` per in-plane axis: the padded length, the padding
        before the slice, the averaging block.
    """
    extent = np.array(shape) * spacing
    if extent.max() > MAX_ASPECT * extent.min():
        raise ScanError(
            f"slices of {extent[0]:g} x {extent[1]:g} mm: more than {MAX_ASPECT} times as wide "
            "as tall (check the voxel sizes)"
        )
    target = np.maximum(np.round(extent.max() / spacing).astype(int), shape)
    block = np.maximum(1, target // size // 2)
    target = -(-target // block) * block
    before = (target - np.array(shape)) // 2
    return target, before, block


@functools.lru_cache(maxsize=256)
def axis_operator(length: int, target: int, before: int, block: int, size: int) -> np.ndarray:
    """The ``(size, length)`` matrix that resamples one axis of a slice.

    It pads ``length`` pixels to ``target`` (``before`` of them first), averages blocks of
    ``block``, smooths with a Gaussian of sigma ``(factor - 1) / 2`` where the rest still
    shrinks by ``factor`` (mode ``nearest``) and resamples linearly to ``size``
    (``scipy.ndimage.zoom``, ``grid_mode``): scipy's own filters run on an identity
    matrix, once per geometry. The padding's value enters separately: every row of the
    full operator sums to 1, so the pixels outside the slice weigh ``1 - rows' sums``.

    >>> m = axis_operator(4, 4, 0, 2, 2)  # average pairs: no smoothing left
    >>> m.tolist()
    [[0.5, 0.5, 0.0, 0.0], [0.0, 0.0, 0.5, 0.5]]
    """
    signals = np.zeros((target, length))
    signals[before : before + length] = np.eye(length)
    signals = signals.reshape(target // block, block, length).mean(axis=1)
    sigma = max(0.0, (signals.shape[0] / size - 1) / 2)
    if sigma:
        signals = ndimage.gaussian_filter1d(signals, sigma, axis=0, mode="nearest")
    zoom = (size / signals.shape[0], 1)
    signals = ndimage.zoom(signals, zoom, order=1, mode="nearest", grid_mode=True, prefilter=False)
    return signals[:size].astype(np.float32)


def _resample(stack: np.ndarray, spacing: np.ndarray, fill: float, size: int) -> np.ndarray:
    """Pad, average, smooth and resize each slice of ``(n, h, w)`` to ``(size, size)``."""
    count, height, width = stack.shape
    target, before, block = square_geometry((height, width), spacing, size)
    rows = axis_operator(height, int(target[0]), int(before[0]), int(block[0]), size)
    columns = axis_operator(width, int(target[1]), int(before[1]), int(block[1]), size)
    out = (stack.reshape(count * height, width) @ columns.T).reshape(count, height, size)
    out = np.matmul(rows, out)
    padding = 1 - np.outer(rows.sum(axis=1), columns.sum(axis=1))
    out += np.float32(fill) * padding.astype(np.float32)
    return out


def unslice(
    maps: np.ndarray,
    positions: np.ndarray,
    shape: tuple[int, int, int],
    voxel_size: np.ndarray,
    axis: str,
    outside: np.ndarray,
) -> np.ndarray:
    """Per-pixel maps of slices put back onto the volume they were cut from: the inverse of
    :func:`slices_at` for what a model outputs (class probabilities).

    Each map is interpolated (linearly) at the centres of the slice's original pixels,
    through the same square field of view, and turned back from the viewing orientation;
    planes that were not kept get ``outside``.

    Args:
        maps: ``(n, size, size, K)``, one map per kept slice.
        positions: the slices' positions along ``axis``.
        shape: the volume's shape.
        voxel_size: mm along each axis of the volume.
        axis: the slicing axis.
        outside: ``(K,)``, the value of every voxel of a plane that was not kept.

    Returns:
        float32 ``(x, y, z, K)``.

    >>> maps = np.zeros((1, 4, 4, 1), np.float32); maps[0, :2, :, 0] = 1  # the top half
    >>> volume = unslice(maps, np.array([0]), (4, 4, 1), np.ones(3), "axial", np.zeros(1))
    >>> volume[..., 0, 0].T.tolist()  # anterior (y high) is up in a slice
    [[0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0], [1.0, 1.0, 1.0, 1.0]]
    """
    along = AXES[axis]
    in_plane = [a for a in range(3) if a != along]
    height, width = shape[in_plane[1]], shape[in_plane[0]]  # a slice's rows and columns
    size = maps.shape[1]
    target, before, _ = square_geometry((height, width), _spacing(voxel_size, axis), size)
    rows = _back_operator(height, int(target[0]), int(before[0]), size)
    columns = _back_operator(width, int(target[1]), int(before[1]), size)
    planes = np.matmul(rows, np.moveaxis(maps.astype(np.float32), 3, 1))  # (n, K, h, size)
    planes = np.moveaxis(planes @ columns.T, 1, 3)  # (n, h, w, K)
    planes = np.rot90(planes, k=-1, axes=(1, 2))  # (n, a, b): the volume's axis order
    volume = np.empty((shape[along], shape[in_plane[0]], shape[in_plane[1]], maps.shape[3]))
    volume[:] = np.asarray(outside, dtype=np.float32)
    volume[np.asarray(positions, dtype=np.intp)] = planes
    return np.moveaxis(volume, 0, along).astype(np.float32)


def _back_operator(length: int, target: int, before: int, size: int) -> np.ndarray:
    """The ``(length, size)`` matrix that interpolates a resampled axis at the centres of
    the original pixels (the padded field of view of ``target`` pixels shown in ``size``).

    >>> _back_operator(2, 2, 0, 4).tolist()  # pixel 0 covers outputs 0 and 1: its centre
    [[0.5, 0.5, 0.0, 0.0], [0.0, 0.0, 0.5, 0.5]]
    """
    where = (np.arange(length) + before + 0.5) * size / target - 0.5
    where = np.clip(where, 0, size - 1)
    low = np.minimum(np.floor(where).astype(int), size - 2) if size > 1 else np.zeros(length, int)
    weight = where - low
    matrix = np.zeros((length, size), np.float32)
    matrix[np.arange(length), low] = 1 - weight
    if size > 1:
        matrix[np.arange(length), low + 1] += weight
    return matrix
