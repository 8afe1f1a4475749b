"""The one writer: scans stream into `<store>.partial/`, then the store is renamed into place.

``<store>.partial/`` holds ``manifest.json`` (the settings) and, per finished scan, a
``<key>.npy`` of its slices followed by a ``<key>.json`` that marks it done: each file is
written under a temporary name and renamed, so a kill at any moment leaves whole scans
only, and ``--resume`` takes the ``.json`` files as the scans already written.

:meth:`Partial.finalize` lays the rows out split by split in a seeded random order without
holding more than ``buffer_bytes`` of slices: when the slices are larger, it first deals
them into bucket files, one per window of destination rows, then fills each window in
memory and writes it (two sequential passes over the data). The store is written as
``<store>.partial/store.h5``, completed (``complete`` set last), flushed, and renamed over
the target in one step.
"""

from __future__ import annotations

import dataclasses
import fcntl
import functools
import hashlib
import json
import os
import shutil
import socket
import uuid
from datetime import UTC, datetime
from pathlib import Path

import h5py
import numpy as np

from loader import files, schema, table
from loader.schema import UNLABELLED_SPLIT
from preprocess.errors import PreprocessError
from preprocess.splits import assign_splits, row_order, split_names

MANIFEST = "manifest.json"
OWNER = "owner"  # the live run's pid, host and start time, beside its lock
STORE_NAME = "store.h5"
MASK_ENDING = ".mask.npy"  # beside a scan's slices: its label masks


def partial_path(target: str | os.PathLike) -> Path:
    """The folder a run of ``target`` streams into."""
    return Path(f"{os.fspath(target)}.partial")


def scan_key(source: str) -> str:
    """A file-name-safe key of a scan's source path.

    >>> scan_key("ds/sub-01/anat/sub-01_T1w.nii.gz")
    'be4b7b858015d0844068feca'
    """
    return hashlib.sha256(source.encode()).hexdigest()[:24]


def scan_record(
    source: str,
    subject_id: str,
    positions,
    *,
    session: str = "",
    label: str | None = None,
    sha256: str = "",
    affine=None,
    shape=(0, 0, 0),
    voxel_size=(0.0, 0.0, 0.0),
    notes=(),
    to_template=None,
    similarity: float | None = None,
) -> dict:
    """The JSON-able facts of one scan that :meth:`Partial.add` keeps beside its slices.

    Args:
        source: the scan's path as stored; it names the scan.
        subject_id: its subject.
        positions: the index of each slice along the slicing axis.
        session: its session. Defaults to "".
        label: its class name, None when unlabelled.
        sha256: of the source file.
        affine: of the canonical volume. Defaults to the identity.
        shape: of the canonical volume.
        voxel_size: of the canonical volume, mm.
        notes: warnings about the scan.
        to_template: scanner world -> template world (``--space mni``). Defaults to None.
        similarity: the registered scan's similarity with the template (its correlation
            ratio). Defaults to None.
    """
    positions = [int(p) for p in positions]
    return {
        "source": source,
        "subject_id": subject_id,
        "session": session,
        "label": label,
        "sha256": sha256,
        "affine": np.eye(4).tolist() if affine is None else np.asarray(affine).tolist(),
        "shape": [int(n) for n in shape],
        "voxel_size": [float(v) for v in voxel_size],
        "num_slices": len(positions),
        "positions": positions,
        "notes": list(notes),
        "to_template": None if to_template is None else np.asarray(to_template).tolist(),
        "similarity": None if similarity is None else float(similarity),
    }


class Partial:
    """The ``<store>.partial/`` folder of one run, locked while the run is alive.

    The run holds an exclusive ``flock`` on the folder from before it changes anything
    until it is closed (the kernel drops it when the process dies, even by ``kill -9``),
    so a second run on the same store stops with a line naming the live one. A process
    forked from the run (a worker) closes its copy of the lock's descriptor at once, so
    the lock never outlives the run in one.

    Args:
        target: the store to make.
        config: every setting that changes the store's content.
        resume: continue a folder left by an earlier run with the same config.
        overwrite: start over, emptying a folder left by an earlier run.

    Raises:
        PreprocessError: another live run holds the folder, or resuming a folder made with
            another config.
        FileExistsError: a folder is there and neither ``resume`` nor ``overwrite``.
    """

    def __init__(
        self,
        target: str | os.PathLike,
        config: dict,
        resume: bool = False,
        overwrite: bool = False,
    ):
        self.target = Path(target)
        self.path = partial_path(target)
        self.config = config
        self.path.mkdir(exist_ok=True)
        self._lock = _lock(self.path)
        try:
            self._prepare(config, resume, overwrite)
        except BaseException:
            self.close()
            raise

    def _prepare(self, config: dict, resume: bool, overwrite: bool) -> None:
        manifest = self.path / MANIFEST
        if resume and manifest.is_file():
            earlier = json.loads(manifest.read_text())
            changed = sorted(
                key for key in config.keys() | earlier.keys() if config.get(key) != earlier.get(key)
            )
            if changed:
                details = "; ".join(
                    f"{k}: {earlier.get(k)!r} then, {config.get(k)!r} now" for k in changed
                )
                raise PreprocessError(
                    f"{self.path}: cannot resume with other settings ({details}); rerun with "
                    "the settings of the interrupted run, or start over with --overwrite"
                )
            return
        left = [entry for entry in self.path.iterdir() if entry.name != OWNER]
        if left and not (resume or overwrite):
            raise FileExistsError(
                f"{self.path}: an interrupted run is there; continue it with --resume, "
                "or start over with --overwrite"
            )
        for entry in left:
            shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
        files.write_text(manifest, json.dumps(config, indent=1))

    def __enter__(self) -> Partial:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def close(self) -> None:
        """Release the lock (the folder stays for --resume unless :meth:`remove` ran)."""
        if self._lock is not None:
            _HELD.discard(self._lock)
            os.close(self._lock)
            self._lock = None

    def done(self) -> dict[str, dict]:
        """The finished scans: source -> record."""
        records = {}
        for path in self.path.glob("*.json"):
            if path.name != MANIFEST:
                record = json.loads(path.read_text())
                records[record["source"]] = record
        return records

    def add(self, record: dict, slices: np.ndarray, masks: np.ndarray | None = None) -> None:
        """Write one finished scan: its slices (and masks), then its record.

        Args:
            record: JSON-able facts of the scan; ``source`` names it.
            slices: ``(n, size, size[, channels])`` in the stored dtype.
            masks: ``(n, size, size)`` uint8 labels, or None.
        """
        key = scan_key(record["source"])
        for ending, rows in ((".npy", slices), (MASK_ENDING, masks)):
            if rows is not None:
                files.save_array(self.path / f"{key}{ending}", rows)
        files.write_text(self.path / f"{key}.json", json.dumps(record))

    def remove(self) -> None:
        """Delete the folder and release the lock."""
        shutil.rmtree(self.path, ignore_errors=True)
        self.close()

    def finalize(
        self,
        class_names: list[str],
        buffer_bytes: int = 1 << 30,
        participants: dict[str, dict] | None = None,
        assignment: tuple[list[str], dict[str, str]] | None = None,
        template: tuple[dict, np.ndarray, np.ndarray] | None = None,
    ) -> dict:
        """Write the store from the finished scans and rename it over the target.

        Args:
            class_names: label index -> name.
            buffer_bytes: the most memory used for slices. Defaults to 1 GiB.
            participants: the labels table, subject id -> {column: value or None}; every
                column is stored for each scan's subject. Defaults to none.
            assignment: the split names in row order and each subject's split, as decided
                for the whole run (all shards); by default, computed from the written
                scans' labels.
            template: a standard-space store's template: its facts (the ``template``
                attribute), the planes kept and its brain cut at them. Defaults to None
                (native space).

        Returns:
            Split name -> ``[start, stop)`` rows.
        """
        records = [record for _, record in sorted(self.done().items())]
        for leftover in [*self.path.glob("bucket-*"), self.path / STORE_NAME]:
            leftover.unlink(missing_ok=True)
        layout = store_layout(records, class_names, self.config, assignment)
        try:
            with (
                files.replacing(self.target, temporary=self.path / STORE_NAME) as temporary,
                h5py.File(temporary, "w", track_order=True) as h5,
            ):
                self._write_images(h5, records, layout, buffer_bytes)
                _write_tables(h5, records, layout, participants or {})
                if template is not None:
                    schema.create_dataset(h5, schema.TEMPLATE_SLICE, template[1])
                    schema.create_dataset(h5, schema.TEMPLATE_BRAIN, template[2])
                _write_attributes(
                    h5, self.config, class_names, layout.ranges, template and template[0]
                )
        except BaseException:  # a full disk, an interrupt: free the space, keep the scans
            for leftover in self.path.glob("bucket-*"):
                leftover.unlink()
            raise
        self.remove()
        return layout.ranges

    def _write_images(self, h5: h5py.File, records, layout: StoreLayout, buffer_bytes) -> None:
        """``/images`` with its checksums and attributes, and ``/masks`` when there are masks."""
        config = self.config
        num_rows, size = layout.num_rows, config["size"]
        chunk = min(config["chunk_slices"], max(num_rows, 1))
        compression = None if config["compression"] == "none" else config["compression"]
        channels = schema.channel_names(config["suffix"], config.get("context", 0))
        row = (size, size) if len(channels) == 1 else (size, size, len(channels))
        images = schema.create_dataset(
            h5,
            schema.IMAGES,
            shape=(num_rows, *row),
            dtype=config["dtype"],
            chunks=(chunk, *row),
            compression=compression,
        )
        set_attribute = functools.partial(schema.set_attribute, h5)
        set_attribute(schema.ATTR_SCALE, schema.intensity_scale(config["dtype"]), schema.IMAGES)
        set_attribute(schema.ATTR_OFFSET, 0.0, schema.IMAGES)
        set_attribute(schema.ATTR_CHANNELS, channels, schema.IMAGES)
        sums = self._write_rows(images, records, layout, buffer_bytes, ".npy")
        schema.create_dataset(h5, schema.CHECKSUMS, np.array(sums, dtype=np.uint32))
        if config.get("masks") or config.get("masks_suffix"):
            masks = schema.create_dataset(
                h5,
                schema.MASKS,
                shape=(num_rows, size, size),
                dtype="uint8",
                chunks=(chunk, size, size),
                compression=compression,
            )
            self._write_rows(masks, records, layout, buffer_bytes, MASK_ENDING)
            found = sorted({label for r in records for label in r.get("mask_labels", [])})
            set_attribute(schema.ATTR_MASK_LABELS, found or [0], schema.MASKS)

    def _write_rows(
        self, images, records, layout: StoreLayout, buffer_bytes: int, ending: str
    ) -> list[int]:
        """Fill ``images`` (or masks: the files ending in ``ending``) so that canonical row r
        lands at ``layout.destination[r]``; returns the checksum of every chunk."""
        first_row, destination = layout.first_row, layout.destination
        sums = []
        num_rows, row = images.shape[0], images.shape[1:]
        row_bytes = int(np.prod(row)) * images.dtype.itemsize
        chunk = images.chunks[0]
        window = max(chunk, buffer_bytes // row_bytes // chunk * chunk)  # chunk-aligned writes
        num_windows = -(-num_rows // window)
        bucket_of = destination // window
        if num_windows > 1:  # deal the rows into one bucket file per window
            buckets = [open(self.path / f"bucket-{k:05d}", "wb") for k in range(num_windows)]  # noqa: SIM115
            try:
                for index, record in enumerate(records):
                    slices = self._slices(record, ending)
                    mine = bucket_of[first_row[index] : first_row[index + 1]]
                    for k in np.unique(mine):
                        buckets[k].write(np.ascontiguousarray(slices[mine == k]).tobytes())
            finally:
                for handle in buckets:
                    handle.close()
        for k in range(num_windows):
            start, stop = k * window, min((k + 1) * window, num_rows)
            block = np.empty((stop - start, *row), dtype=images.dtype)
            if num_windows > 1:
                rows = np.flatnonzero(bucket_of == k)  # ascending: the order they were dealt in
                bucket = self.path / f"bucket-{k:05d}"
                block[destination[rows] - start] = np.fromfile(bucket, dtype=images.dtype).reshape(
                    -1, *row
                )
                bucket.unlink()
            else:
                for index, record in enumerate(records):
                    block[destination[first_row[index] : first_row[index + 1]]] = self._slices(
                        record, ending
                    )
            images[start:stop] = block
            sums += schema.chunk_checksums(block, images.chunks[0])  # windows hold whole chunks
        return sums

    def _slices(self, record: dict, ending: str = ".npy") -> np.ndarray:
        return np.load(self.path / f"{scan_key(record['source'])}{ending}", mmap_mode="r")


@dataclasses.dataclass(frozen=True)
class StoreLayout:
    """Where every row of the store comes from and goes: a pure function of the records."""

    scan_labels: np.ndarray  # the label index of each scan (records in source order)
    scan_splits: list[str]  # the split of each scan
    counts: np.ndarray  # the number of slices of each scan
    destination: np.ndarray  # the store row of each canonical row (scans one after another)
    ranges: dict[str, list[int]]  # split name -> [start, stop)

    @property
    def first_row(self) -> np.ndarray:
        """The canonical row of each scan's first slice, and the number of rows at the end."""
        return np.concatenate([[0], np.cumsum(self.counts)])

    @property
    def num_rows(self) -> int:
        """The number of rows of the store."""
        return int(self.counts.sum())

    @property
    def order(self) -> np.ndarray:
        """The canonical row of each store row."""
        return np.argsort(self.destination)


def store_layout(
    records: list[dict],
    class_names: list[str],
    config: dict,
    assignment: tuple[list[str], dict[str, str]] | None = None,
) -> StoreLayout:
    """Split each subject (or take ``assignment``), then order the rows split by split.

    >>> records = [{"subject_id": s, "label": None, "num_slices": 2} for s in "ab"]
    >>> config = {"val_fraction": 0.0, "test_fraction": 0.0, "folds": 0, "seed": 0}
    >>> layout = store_layout(records, [], config, (["train"], {"a": "train", "b": "train"}))
    >>> layout.ranges, sorted(layout.destination.tolist())
    ({'train': [0, 4]}, [0, 1, 2, 3])
    """
    scan_labels = table.class_indices([r["label"] for r in records], class_names)
    if assignment is None:
        subject_labels = {}
        for record, label in zip(records, scan_labels, strict=True):
            subject_labels.setdefault(record["subject_id"], int(label))
        fractions = (config["val_fraction"], config["test_fraction"], config["folds"])
        subject_split = assign_splits(subject_labels, *fractions, config["seed"])
        names = split_names(*fractions)
        if UNLABELLED_SPLIT in subject_split.values():
            names.append(UNLABELLED_SPLIT)
    else:
        names, subject_split = assignment
    scan_split = np.array([names.index(subject_split[r["subject_id"]]) for r in records])
    counts = np.array([r["num_slices"] for r in records], dtype=np.int64)
    destination, ranges = row_order(np.repeat(scan_split, counts), names, config["seed"])
    return StoreLayout(scan_labels, [names[i] for i in scan_split], counts, destination, ranges)


def _write_tables(h5: h5py.File, records: list[dict], layout: StoreLayout, participants) -> None:
    """The per-row datasets, the subjects table and the participants table."""
    order, counts = layout.order, layout.counts
    schema.create_dataset(h5, schema.LABELS, np.repeat(layout.scan_labels, counts)[order])
    scans = np.repeat(np.arange(len(records)), counts)
    schema.create_dataset(h5, schema.SUBJECT, scans[order])
    positions = np.concatenate([r["positions"] for r in records])
    schema.create_dataset(h5, schema.SLICE, positions[order])
    _write_subjects(h5, records, layout.scan_labels, layout.scan_splits)
    columns = _write_participants(h5, [r["subject_id"] for r in records], participants)
    schema.set_attribute(h5, schema.ATTR_PARTICIPANT_COLUMNS, columns)


def _write_attributes(
    h5: h5py.File, config: dict, class_names: list[str], ranges, template: dict | None
) -> None:
    """The store's root attributes, ``complete`` last (after everything else is flushed)."""
    set_attribute = functools.partial(schema.set_attribute, h5)
    set_attribute(schema.ATTR_SCHEMA, schema.SCHEMA_VERSION)
    set_attribute(schema.ATTR_UUID, uuid.uuid4())
    set_attribute(schema.ATTR_CREATED, datetime.now(UTC).isoformat(timespec="seconds"))
    set_attribute(schema.ATTR_CONFIG, config)
    set_attribute(schema.ATTR_CLASS_NAMES, class_names)
    set_attribute(schema.ATTR_SPLITS, ranges)
    set_attribute(schema.ATTR_SPACE, config.get("space", "native"))
    set_attribute(schema.ATTR_TEMPLATE, template)
    h5.flush()
    set_attribute(schema.ATTR_COMPLETE, True)


def _write_subjects(
    h5: h5py.File, records: list[dict], labels: np.ndarray, splits: list[str]
) -> None:
    """The subjects table: one row per scan, one dataset per column."""
    columns = {
        schema.SUBJECT_ID: [r["subject_id"] for r in records],
        schema.SESSION: [r["session"] for r in records],
        schema.SOURCE_PATH: [r["source"] for r in records],
        schema.SHA256: [r["sha256"] for r in records],
        schema.SUBJECT_LABEL: labels,
        schema.SUBJECT_SPLIT: splits,
        schema.AFFINE: np.reshape([r["affine"] for r in records], (-1, 4, 4)),
        schema.SHAPE: np.reshape([r["shape"] for r in records], (-1, 3)),
        schema.VOXEL_SIZE: np.reshape([r["voxel_size"] for r in records], (-1, 3)),
        schema.TO_TEMPLATE: np.reshape(
            [
                np.full((4, 4), np.nan) if r.get("to_template") is None else r["to_template"]
                for r in records
            ],
            (-1, 4, 4),
        ),
        schema.SIMILARITY: [
            np.nan if r.get("similarity") is None else r["similarity"] for r in records
        ],
    }
    for name in schema.SUBJECT_COLUMNS:
        schema.create_dataset(h5, f"{schema.SUBJECTS}/{name}", columns[name])


def _write_participants(
    h5: h5py.File, subject_ids: list[str], participants: dict[str, dict]
) -> list[list[str]]:
    """The labels table, one dataset per column, one row per scan; returns [[column, kind]]."""
    columns = []
    for column in table.columns_of(participants):
        values = [participants.get(subject_id, {}).get(column) for subject_id in subject_ids]
        kind = table.column_kind(values)
        if kind == table.NUMERIC:
            data = table.numeric_values(values)
        else:
            data = ["" if value is None else value for value in values]
        name = f"{schema.PARTICIPANTS}/{schema.participant_key(column)}"
        schema.create_dataset(h5, name, data, dtype="float64" if kind == table.NUMERIC else None)
        columns.append([column, kind])
    return columns


def _lock(folder: Path) -> int:
    """Take the run's exclusive lock on ``folder``; returns the descriptor that holds it.

    Raises:
        PreprocessError: another live process holds it (named from its owner file).
    """
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        try:
            owner = json.loads((folder / OWNER).read_text())
            who = f"process {owner['pid']} on {owner['host']}, started {owner['started']}"
        except (OSError, ValueError, KeyError):
            who = "another process"
        raise PreprocessError(
            f"{folder}: another preprocess run is writing this store ({who}); wait for it "
            "to finish or stop it first (nothing was changed)"
        ) from None
    owner = {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "started": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    files.write_text(folder / OWNER, json.dumps(owner))
    _HELD.add(fd)
    return fd


_HELD: set[int] = set()  # the descriptors of this process's locks


def _drop_inherited_locks() -> None:
    """In a forked child: close the copies of the parent's lock descriptors. The ``flock``
    stays the parent's (it lives while any copy is open), and dies with the parent only
    when no child keeps a copy."""
    for fd in _HELD:
        os.close(fd)
    _HELD.clear()


os.register_at_fork(after_in_child=_drop_inherited_locks)
