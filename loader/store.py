"""The read-only view of a store: ``open_store`` checks a file against the schema and opens it.

A store is an HDF5 file of ``N`` 2-D slices, laid out split by split, each split a
contiguous range of rows in a seeded random order. Its datasets and attributes are
declared in :mod:`loader.schema`; this module reads them by those declarations, filling
the defaults of what an older store lacks. Only numpy and h5py are imported here.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import cached_property

import h5py
import numpy as np

from loader import schema, table
from loader.schema import (
    IMAGES,
    LABELS,
    SLICE,
    SUBJECT,
    SUBJECT_COLUMNS,
    SUBJECTS,
)

# Every read-only open in a process uses these settings: h5py refuses to open one file
# twice with different locking flags, and locking breaks on shared and network filesystems.
SUBJECT_BLOCK = 1 << 20  # rows of /subject read at a time while finding scans' rows
CHUNK_CACHE_BYTES = 32 * 1024**2
CHUNK_CACHE_SLOTS = 10007


def open_h5(path: str | os.PathLike) -> h5py.File:
    """Open an HDF5 file read-only with the settings every reader of this project uses.

    Args:
        path: the file.

    Returns:
        An open ``h5py.File`` without file locking and with a chunk cache larger than
        one batch of chunks.
    """
    return h5py.File(
        path,
        "r",
        locking=False,
        rdcc_nbytes=CHUNK_CACHE_BYTES,
        rdcc_nslots=CHUNK_CACHE_SLOTS,
    )


@dataclass(frozen=True)
class Split:
    """A named, contiguous range of rows ``[start, stop)``."""

    name: str
    start: int
    stop: int

    def __len__(self) -> int:
        return self.stop - self.start


class StoreError(ValueError):
    """A file that cannot be read as a finished store of a known schema."""


class StoreDamagedError(StoreError):
    """Rows whose bytes no longer match their chunk's checksum."""


class StoreChangedError(StoreError):
    """The file at a store's path is no longer the one a reader started on."""


def file_identity(stat: os.stat_result) -> tuple[int, int, int, int]:
    """What tells one file from another at the same path: device, inode, size, mtime."""
    return (stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns)


class Store:
    """A read-only view of a store. Create it with :func:`open_store`.

    The datasets are opened, not read: slicing ``store.images`` reads from disk.
    """

    def __init__(self, path: str | os.PathLike, h5file: h5py.File):
        self._path = os.fspath(path)
        self._file = h5file
        self._identity = file_identity(os.fstat(h5file.id.get_vfd_handle()))
        self._subjects_table = None

    def __repr__(self) -> str:
        return f"open_store({self._path!r})"

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def close(self) -> None:
        """Close the file."""
        self._file.close()

    @property
    def path(self) -> str:
        """The store's path."""
        return self._path

    @property
    def identity(self) -> tuple[int, int, int, int]:
        """The open file's device, inode, size and mtime (see :func:`file_identity`)."""
        return self._identity

    def replaced(self) -> bool:
        """Whether the path now names another file than the one open (or none)."""
        try:
            return file_identity(os.stat(self._path)) != self._identity
        except FileNotFoundError:
            return True

    @property
    def file(self) -> h5py.File:
        """The open HDF5 file."""
        return self._file

    @property
    def images(self) -> h5py.Dataset:
        """The slices, ``(num_slices, size, size)`` or ``(num_slices, size, size, channels)``."""
        return self._file[IMAGES]

    @property
    def masks(self) -> h5py.Dataset | None:
        """The label mask of each slice, ``(num_slices, size, size)`` uint8; None without."""
        return self._file.get(schema.MASKS)

    @property
    def mask_labels(self) -> list[int]:
        """The labels that occur in the masks (0 is background); empty without masks."""
        if self.masks is None:
            return []
        return list(schema.read_attribute(self._file, schema.ATTR_MASK_LABELS, schema.MASKS))

    @property
    def channel_names(self) -> list[str]:
        """The name of each channel of a slice (one for stores before schema 3)."""
        names = schema.read_attribute(self._file, schema.ATTR_CHANNELS, IMAGES)
        return names or schema.channel_names(self.config.get("suffix", "image"))

    @property
    def labels(self) -> h5py.Dataset:
        """Class index per slice, -1 where unlabelled."""
        return self._file[LABELS]

    @property
    def subject(self) -> h5py.Dataset:
        """Row in the subjects table per slice."""
        return self._file[SUBJECT]

    @property
    def slice_index(self) -> h5py.Dataset:
        """Position of each slice along the slicing axis of its canonical volume."""
        return self._file[SLICE]

    @property
    def num_slices(self) -> int:
        """Number of slices (rows)."""
        return int(self.images.shape[0])

    @property
    def slice_shape(self) -> tuple[int, int]:
        """Height and width of one slice."""
        return tuple(int(n) for n in self.images.shape[1:3])

    @property
    def num_channels(self) -> int:
        """Channels per slice."""
        return int(self.images.shape[3]) if self.images.ndim == 4 else 1

    @property
    def chunk_slices(self) -> int:
        """Slices per HDF5 chunk of the images: the unit of aligned reads."""
        chunks = self.images.chunks
        return int(chunks[0]) if chunks else self.num_slices

    @property
    def dtype(self) -> np.dtype:
        """The stored dtype of the images."""
        return self.images.dtype

    @property
    def scale(self) -> float:
        """Intensity = stored value * scale + offset."""
        return float(schema.read_attribute(self._file, schema.ATTR_SCALE, IMAGES))

    @property
    def offset(self) -> float:
        """Intensity = stored value * scale + offset."""
        return float(schema.read_attribute(self._file, schema.ATTR_OFFSET, IMAGES))

    @property
    def uuid(self) -> str:
        """Unique id of this store, new for every store written."""
        return str(schema.read_attribute(self._file, schema.ATTR_UUID))

    @property
    def created(self) -> str:
        """When the store was finalised, ISO 8601 UTC."""
        return str(schema.read_attribute(self._file, schema.ATTR_CREATED))

    @cached_property
    def config(self) -> dict:
        """Every preprocessing setting the store was made with."""
        return schema.read_attribute(self._file, schema.ATTR_CONFIG)

    @cached_property
    def space(self) -> str:
        """``native`` (each scan's own grid) or ``mni`` (registered to the template)."""
        return str(schema.read_attribute(self._file, schema.ATTR_SPACE))

    @cached_property
    def template(self) -> dict | None:
        """The template of a standard-space store (name, file, shape, affine, axis, slab);
        None in native space."""
        return schema.read_attribute(self._file, schema.ATTR_TEMPLATE)

    def template_brain(self) -> tuple[np.ndarray, np.ndarray] | None:
        """``(planes, brain)``: the template's brain cut at each kept plane as the slices
        are, ``(P, S, S)`` uint8; None in native space."""
        if schema.TEMPLATE_SLICE not in self._file:
            return None
        return self._file[schema.TEMPLATE_SLICE][()], self._file[schema.TEMPLATE_BRAIN][()]

    @cached_property
    def class_names(self) -> list[str]:
        """Class names; label ``k`` means ``class_names[k]``. Empty without labels."""
        return list(schema.read_attribute(self._file, schema.ATTR_CLASS_NAMES))

    @property
    def labelled(self) -> bool:
        """Whether the store has classes."""
        return bool(self.class_names)

    @cached_property
    def splits(self) -> dict[str, Split]:
        """The splits, by name, in row order."""
        ranges = schema.read_attribute(self._file, schema.ATTR_SPLITS)
        return {name: Split(name, int(a), int(b)) for name, (a, b) in ranges.items()}

    def select(self, split: str | list[str] | tuple[str, ...] | None) -> list[Split]:
        """The splits named by ``split``: one name, a list of names, or None for all rows.

        Raises:
            ValueError: a name the store does not have.
        """
        if split is None:
            return [Split("all", 0, self.num_slices)]
        names = [split] if isinstance(split, str) else list(split)
        if not names:
            raise ValueError("`split` must name at least one split; received split=[]")
        unknown = [name for name in names if name not in self.splits]
        if unknown:
            raise ValueError(
                f"{self._path}: no split {', '.join(map(repr, unknown))}; "
                f"the store has {sorted(self.splits)}"
            )
        if len(set(names)) != len(names):
            raise ValueError(f"`split` names a split twice; received split={names}")
        return [self.splits[name] for name in names]

    def subjects_table(self) -> dict[str, np.ndarray]:
        """The subjects table (one row per scan), read whole once: it is small.

        Returns:
            Column name -> array, strings decoded to ``str`` (shared: do not change them).
        """
        if self._subjects_table is None:
            group = self._file[SUBJECTS]
            table = {}
            for name in SUBJECT_COLUMNS:
                declared = schema.entry(f"{SUBJECTS}/{name}")
                if declared.since > self.version:  # an older store: the declared default
                    rows = (len(group[schema.SUBJECT_ID]), *declared.shape[1:])
                    table[name] = np.full(rows, declared.default, declared.dtypes[0])
                    continue
                dataset = group[name]
                if dataset.dtype.kind in "OS":
                    table[name] = dataset.asstr()[()].astype(object)
                else:
                    table[name] = dataset[()]
            self._subjects_table = table
        return self._subjects_table

    def scans_in(self, names=None) -> np.ndarray:
        """Per scan (row of the subjects table), whether it lies in one of the splits ``names``.

        Args:
            names: split names; None for every scan.
        """
        split = self.subjects_table()[schema.SUBJECT_SPLIT]
        return np.ones(len(split), dtype=bool) if names is None else np.isin(split, list(names))

    def rows_of_scans(self, scans) -> dict[int, np.ndarray]:
        """The rows of each scan (rows of the subjects table), in increasing order: one pass
        over ``/subject``, a block at a time (rows are shuffled within a split, so a
        scan's rows are spread over it). A scan without rows gets an empty array."""
        wanted = np.unique(np.asarray(list(scans), dtype=np.int64))
        found: dict[int, list[np.ndarray]] = {int(scan): [] for scan in wanted}
        for start in range(0, self.num_slices, SUBJECT_BLOCK):
            block = np.asarray(self.subject[start : start + SUBJECT_BLOCK])
            hits = np.flatnonzero(np.isin(block, wanted))
            if not len(hits):
                continue
            order = np.argsort(block[hits], kind="stable")
            scans_hit, first = np.unique(block[hits][order], return_index=True)
            for scan, rows in zip(scans_hit, np.split(start + hits[order], first[1:]), strict=True):
                found[int(scan)].append(rows)
        return {
            scan: np.concatenate(rows) if rows else np.zeros(0, np.int64)
            for scan, rows in found.items()
        }

    @property
    def version(self) -> int:
        """The schema version the store was written with."""
        return schema.store_version(self._file)

    def participants(self) -> dict[str, tuple[str, np.ndarray]]:
        """The labels table kept with the store, one value per scan (row of the subjects table).

        Returns:
            Column -> ``(kind, values)``: ``numeric`` float64 (NaN where missing) or
            ``categorical`` object array of str (None where missing). A store written
            before the table was kept (schema 1) has its label column only.
        """
        columns = schema.read_attribute(self._file, schema.ATTR_PARTICIPANT_COLUMNS)
        if self.version < 2:
            column = self.config.get("label_column")
            if not (column and self.labelled):
                return {}
            labels = self._file[f"{SUBJECTS}/{schema.SUBJECT_LABEL}"][()]
            names = np.array([*self.class_names, None], dtype=object)
            return {column: (table.CATEGORICAL, names[labels])}  # -1 picks None
        result = {}
        for column, kind in columns:
            dataset = self._file[f"{schema.PARTICIPANTS}/{schema.participant_key(column)}"]
            if kind == table.NUMERIC:
                result[column] = (kind, dataset[()].astype(np.float64))
            else:
                values = dataset.asstr()[()].astype(object)
                values[values == ""] = None
                result[column] = (kind, values)
        return result

    @property
    def size_bytes(self) -> int:
        """Size of the file on disk."""
        return os.path.getsize(self._path)


def open_store(path: str | os.PathLike) -> Store:
    """Open a finished store read-only.

    Args:
        path: the store's file.

    Returns:
        The read-only view.

    Raises:
        FileNotFoundError: no such file.
        StoreError: a folder.
        StoreError: (a ValueError) the file is not HDF5, not a store, unfinished, damaged
            (an entry of its schema missing or of the wrong type or shape), or of a newer
            schema than this version reads.
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        raise StoreError(f"{path}: is a folder, not a store; give a store's file (.h5)")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such store file")
    try:
        h5file = open_h5(path)
    except OSError as exc:
        if "locking flag values don't match" in str(exc):
            raise StoreError(
                f"{path}: already open in this process with other file-locking settings; "
                "open stores with loader.open_store (or h5py.File(..., locking=False))"
            ) from exc
        raise StoreError(f"{path}: not a store: not a readable HDF5 file ({exc})") from exc
    try:
        _check(path, h5file)
    except BaseException:
        h5file.close()
        raise
    return Store(path, h5file)


def _check(path: str, h5file: h5py.File) -> None:
    found = schema.problems(h5file)
    if found:
        raise StoreError(f"{path}: {'; '.join(found)}")
