"""The one way the project writes a file, and how a full disk is recognised.

Every file slicestore leaves behind (the store, a scan's slices in ``STORE.partial/``, a
checkpoint, a model, ``config.json``, ``metrics.json``, ``predictions.csv``,
``history.csv``, the pictures) is written by :func:`replacing`: under a temporary name
beside the target, flushed to disk, renamed over the target in one step, and the folder's
entry flushed too. A kill at any moment leaves the old file or the new one, whole, never
half of one; an error while writing removes the temporary file and leaves the target as
it was. A full disk is an ``OSError(ENOSPC)`` that names the target, which every command
line prints as ``PATH: the disk is full``.
"""

from __future__ import annotations

import contextlib
import csv
import errno
import io
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np

TEMPORARY_ENDING = ".partial"  # the temporary file's name: the target's name and this


@contextlib.contextmanager
def replacing(
    path: str | os.PathLike, temporary: str | os.PathLike | None = None
) -> Iterator[Path]:
    """Write ``path`` whole or not at all: yields the temporary path to write instead.

    Args:
        path: the file to write (its old version, if any, stays until the new one is whole).
        temporary: where to write first, on the same filesystem. Defaults to ``path`` with
            :data:`TEMPORARY_ENDING` added (``model.keras`` -> ``model.keras.partial``).

    Raises:
        OSError: writing failed; with ``errno.ENOSPC`` and ``filename`` set to ``path``
            when the disk is full.

    Example:
        >>> import tempfile
        >>> target = Path(tempfile.mkdtemp()) / "notes.txt"
        >>> with replacing(target) as temporary:
        ...     _ = temporary.write_text("whole")
        >>> target.read_text(), temporary.exists()
        ('whole', False)
    """
    path = Path(path)
    temporary = Path(temporary) if temporary else path.with_name(path.name + TEMPORARY_ENDING)
    try:
        yield temporary
        fsync_path(temporary)  # the bytes on disk before the name: a power loss keeps one whole
        os.replace(temporary, path)
    except BaseException as exc:
        temporary.unlink(missing_ok=True)
        if isinstance(exc, OSError) and is_disk_full(exc):
            raise OSError(errno.ENOSPC, "No space left on device", str(path)) from exc
        raise
    fsync_path(path.parent)


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` through :func:`replacing`."""
    with replacing(path) as temporary:
        temporary.write_bytes(data)


def write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` (UTF-8, line endings as given) to ``path`` through :func:`replacing`."""
    write_bytes(path, text.encode())


def write_rows(path: str | os.PathLike, rows: list[dict]) -> None:
    """Rows as a CSV file with a header: every key of any row is a column, in order of
    first appearance; a row without one leaves it empty."""
    columns: list[str] = []
    for row in rows:
        columns += [key for key in row if key not in columns]
    text = io.StringIO(newline="")
    writer = csv.DictWriter(text, columns, restval="")
    writer.writeheader()
    writer.writerows(rows)
    write_text(path, text.getvalue())


def save_array(path: str | os.PathLike, array) -> None:
    """A numpy array as a ``.npy`` file (no pickles) through :func:`replacing`."""
    with replacing(path) as temporary, open(temporary, "wb") as handle:  # np.save would add
        np.save(handle, array, allow_pickle=False)  # ".npy" to a path: a handle keeps it


def save_png(figure, path: str | os.PathLike, dpi: int = 100) -> None:
    """A matplotlib figure as a PNG file through :func:`replacing`.

    A figure laid out once by ``tight_layout()`` keeps a placeholder layout engine, and
    ``savefig`` draws a figure with any engine twice (once to lay it out). The placeholder
    lays out nothing, so it is dropped first: the same bytes, ~10 % less time.
    """
    from matplotlib.layout_engine import PlaceHolderLayoutEngine

    if isinstance(figure.get_layout_engine(), PlaceHolderLayoutEngine):
        figure.set_layout_engine(None)
    with replacing(path) as temporary, open(temporary, "wb") as handle:
        figure.savefig(handle, format="png", dpi=dpi)


def fsync_path(path: str | os.PathLike) -> None:
    """Flush a file, or a folder's entries (a rename in it), to disk."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def fresh_folder(output: str | os.PathLike) -> Path:
    """An empty ``<output>.partial`` folder to write a folder of results into, before
    :func:`publish_folder` puts it in place of ``output`` (a leftover is emptied)."""
    output = Path(output)
    partial = output.with_name(output.name + TEMPORARY_ENDING)
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    return partial


def publish_folder(partial: str | os.PathLike, output: str | os.PathLike) -> None:
    """Put a finished folder in place of ``output``: an older ``output`` goes only then."""
    partial, output = Path(partial), Path(output)
    old = output.with_name(output.name + ".old")
    if output.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(output, old)
    os.replace(partial, output)
    fsync_path(output.parent)
    shutil.rmtree(old, ignore_errors=True)


def is_disk_full(exc: BaseException) -> bool:
    """Whether an error says the disk (or the user's quota) is full.

    numpy's ``tofile`` reports a short write as ``N requested and M written`` without an
    errno, and HDF5 puts the errno inside its message; both count.

    >>> is_disk_full(OSError(errno.ENOSPC, "No space left on device"))
    True
    >>> is_disk_full(OSError("245760 requested and 61312 written"))
    True
    """
    text = str(exc)
    return (
        getattr(exc, "errno", None) in (errno.ENOSPC, errno.EDQUOT)
        or "No space left on device" in text
        or "errno = 28" in text
        or re.fullmatch(r"\d+ requested and \d+ written", text) is not None
    )


def written_file(exc: OSError) -> str | None:
    """The file an OSError names: its ``filename``, or HDF5's ``filename = '...'``."""
    if exc.filename:
        return str(exc.filename)
    match = re.search(r"filename = '([^']+)'", str(exc))
    return match.group(1) if match else None
