"""One scan to slices, in a worker process: load, check, normalise, cut; in the scan's own
space or the template's (``--space mni``), with its further modalities and mask, within a
time bound.
"""

from __future__ import annotations

import contextlib
import functools
import signal
import sys
import threading
from dataclasses import replace
from pathlib import Path

import numpy as np

from loader import schema
from preprocess.discover import Scan
from preprocess.errors import ScanError
from preprocess.settings import Settings
from preprocess.slices import AXES, kept_positions, label_slices, slices_at
from preprocess.standard import load_template, moved, register
from preprocess.volume import coverage, foreground, load_volume, normalization, on_grid
from preprocess.writer import scan_record


def process_scan(scan: Scan, settings: Settings) -> tuple[dict, np.ndarray, np.ndarray | None]:
    """Load, check, normalise and slice one scan (runs in a worker process).

    In native space the first modality's foreground chooses the slices; every further
    modality is resampled onto its grid and normalised on its own; the mask is resampled
    by label. In standard space (``--space mni``) the first modality is registered to the
    template and every slice is a plane of the template's slab; further modalities and the
    mask follow its transform.

    Returns:
        ``(record, slices, masks)``: the JSON-able facts of the scan, its slices in the stored
        dtype (``(n, S, S)``, or ``(n, S, S, C)`` for several channels) and its uint8 masks
        ``(n, S, S)`` (None without ``--masks``).

    Raises:
        ScanError: the scan cannot be used.
    """
    volume = load_volume(scan.path, settings.volume, max_voxels=settings.max_voxels, digest=True)
    depth = volume.shape[AXES[settings.axis]]
    if settings.context and settings.context >= depth and settings.space == "native":
        raise ScanError(
            f"--context {settings.context} but the volume has only {depth} {settings.axis} slices"
        )
    notes = [*scan.notes, *volume.notes]
    others = []
    for suffix, path in zip(settings.suffix[1:], scan.others, strict=True):
        other = _named(path, load_volume, path, settings.volume, False, settings.max_voxels)
        covered = coverage(other, volume)
        if covered < MIN_COVERAGE:
            notes.append(f"{suffix} {path.name} covers only {covered:.0%} of the reference grid")
        notes += [f"{path.name}: {note}" for note in other.notes]
        others.append(other)
    labels = None if scan.mask is None else _named(scan.mask, _mask_volume, scan.mask, settings)
    if labels is not None and (covered := coverage(labels, volume)) < 0.999:
        raise ScanError(
            f"{scan.mask.name}: the mask covers only {covered:.0%} of the scan's field of view"
        )
    if settings.space == "mni":
        positions, channels, masks, facts = _standard(volume, others, labels, settings)
    else:
        positions, channels, masks, facts = _native(volume, others, labels, settings)
    slices = channels[0] if len(channels) == 1 else _channels_last(channels)
    slices = schema.encode_intensities(slices, settings.dtype)
    record = scan_record(
        scan.source,
        scan.subject_id,
        positions,
        session=scan.session,
        label=scan.label,
        sha256=volume.sha256,
        affine=volume.affine,
        shape=volume.shape,
        voxel_size=volume.voxel_size,
        notes=notes,
        **facts,
    )
    if masks is not None:
        record["mask_labels"] = np.unique(masks).tolist()
    return record, slices, masks


def _native(volume, others, labels, settings: Settings):
    """``(positions, channels, masks, facts)`` cut from the scan's own grid."""
    mask = foreground(volume.voxels)
    positions = kept_positions(mask, settings.axis, settings.min_foreground)
    cut = functools.partial(
        slices_at,
        positions=positions,
        voxel_size=volume.voxel_size,
        axis=settings.axis,
        size=settings.size,
        context=settings.context,
    )
    scale = normalization(volume.voxels, mask, settings.normalize, volume.slope, volume.inter)
    channels = [cut(volume.voxels, scale=scale)]
    for other in others:
        data = on_grid(other, volume)
        channels.append(cut(data, scale=normalization(data, foreground(data), settings.normalize)))
    masks = None
    if labels is not None:
        on_reference = on_grid(labels, volume, order=0, data=labels.voxels)
        masks = label_slices(
            on_reference.astype(np.uint8),
            positions,
            volume.voxel_size,
            settings.axis,
            settings.size,
        )
    return positions, channels, masks, {}


def _standard(volume, others, labels, settings: Settings):
    """``(positions, channels, masks, facts)`` cut from the template's grid: the scan
    registered, its other modalities and mask moved with it."""
    template = load_template(settings.axis, settings.min_foreground, settings.template)
    registration = register(volume, template, settings.context)
    if registration.similarity < settings.min_similarity:
        raise ScanError(
            f"registration similarity {registration.similarity:.2f} is below "
            f"--min-similarity {settings.min_similarity:g}: left out (check the scan)"
        )
    to_template, planes = registration.to_template, registration.planes
    positions = template.positions
    cut = functools.partial(
        slices_at,
        positions=positions - planes[0],
        voxel_size=template.voxel_size,
        axis=settings.axis,
        size=settings.size,
        context=settings.context,
    )
    brain = template.slab(template.brain, planes)
    data = registration.data
    channels = [cut(data, scale=normalization(data, brain, settings.normalize))]
    for other in others:
        data = moved(other, to_template, template, planes)
        channels.append(cut(data, scale=normalization(data, brain, settings.normalize)))
    masks = None
    if labels is not None:
        on_template = moved(labels, to_template, template, planes, labels=True)
        masks = label_slices(
            on_template, positions - planes[0], template.voxel_size, settings.axis, settings.size
        )
    facts = {"to_template": to_template, "similarity": registration.similarity}
    return positions, channels, masks, facts


MIN_COVERAGE = 0.5  # a further modality covering less of the reference grid gets a warning


def _channels_last(channels: list[np.ndarray]) -> np.ndarray:
    """``(n, S, S[, K])`` stacks of each modality as ``(n, S, S, C)``, modality-major."""
    return np.concatenate([c if c.ndim == 4 else c[..., None] for c in channels], axis=-1)


def _named(path: Path, function, *args):
    """``function(*args)``, a :class:`ScanError` naming the file ``path`` (not the scan's)."""
    try:
        return function(*args)
    except ScanError as exc:
        raise ScanError(f"{path.name}: {exc}") from exc


def _mask_volume(path: Path, settings: Settings):
    """A label mask as a volume of uint8 labels.

    Raises:
        ScanError: not integer-valued, or labels outside 0 to 255.
    """
    labels = load_volume(path, settings.volume, True, settings.max_voxels)
    values = labels.data
    if not np.array_equal(values, np.round(values)):
        raise ScanError("the mask is not integer-valued (labels 0, 1, ...)")
    if values.min() < 0 or values.max() > 255:
        raise ScanError(f"mask labels must be 0 to 255; found {values.min():g} to {values.max():g}")
    return replace(labels, voxels=values.astype(np.uint8), slope=1.0, inter=0.0)


def process_or_reason(scan: Scan, settings: Settings, timeout: float = 0.0):
    """``process_scan``, with every failure turned into a one-line reason, within ``timeout``
    seconds (0: no limit)."""
    try:
        with _time_bound(timeout):
            return process_scan(scan, settings)
    except _TimeUp:
        return f"not done after {timeout:g} s (--scan-timeout): left out"
    except ScanError as exc:
        return str(exc)
    except MemoryError:
        return "out of memory while processing"
    except Exception as exc:  # a damaged file can fail deep inside nibabel or scipy
        lines = str(exc).strip().splitlines() or [""]
        return f"unreadable ({type(exc).__name__}: {lines[0]})"


class _TimeUp(BaseException):
    """A scan ran past its time (a BaseException: code that catches every Exception in
    the libraries it passes through lets it by)."""


@contextlib.contextmanager
def _time_bound(seconds: float):
    """Raise :class:`_TimeUp` in the block after ``seconds`` (SIGALRM, main thread only).

    Python code is stopped at once; a call into C (inflating, a filter) is stopped when it
    returns. Where Python drops the exception (it lands in a garbage collector's callback),
    the alarm rings again 50 ms later, and the dropped one is not reported. Off for 0, or
    outside the main thread (the API called from a thread).
    """
    if not seconds or threading.current_thread() is not threading.main_thread():
        yield
        return

    def time_up(signum, frame):
        signal.setitimer(signal.ITIMER_REAL, 0.05)
        raise _TimeUp

    def unraisable(report) -> None:
        if not isinstance(report.exc_value, _TimeUp):
            hook(report)

    hook, sys.unraisablehook = sys.unraisablehook, unraisable
    previous = signal.signal(signal.SIGALRM, time_up)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        sys.unraisablehook = hook
