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

import hashlib
import json
import os
import shutil
import uuid
from datetime import UTC, datetime
from pathlib import Path

import h5py
import numpy as np

from loader import store as schema
from preprocess.splits import UNLABELLED, assign_splits, row_order, split_names

MANIFEST = "manifest.json"
STORE_NAME = "store.h5"


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
    }


class Partial:
    """The ``<store>.partial/`` folder of one run.

    Args:
        target: the store to make.
        config: every setting that changes the store's content.
        resume: continue a folder left by an earlier run with the same config.

    Raises:
        FileExistsError: a folder is there and ``resume`` is False.
        ValueError: resuming a folder made with another config.
    """

    def __init__(self, target: str | os.PathLike, config: dict, resume: bool = False):
        self.target = Path(target)
        self.path = partial_path(target)
        self.config = config
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
                raise ValueError(f"{self.path}: cannot resume with other settings ({details})")
        else:
            if self.path.exists() and not resume:
                raise FileExistsError(
                    f"{self.path}: an interrupted run is there; continue it with --resume, "
                    "or start over with --overwrite"
                )
            shutil.rmtree(self.path, ignore_errors=True)
            self.path.mkdir(parents=True)
            _write_atomic(manifest, json.dumps(config, indent=1).encode())

    def done(self) -> dict[str, dict]:
        """The finished scans: source -> record."""
        records = {}
        for path in self.path.glob("*.json"):
            if path.name != MANIFEST:
                record = json.loads(path.read_text())
                records[record["source"]] = record
        return records

    def add(self, record: dict, slices: np.ndarray) -> None:
        """Write one finished scan: its slices, then its record.

        Args:
            record: JSON-able facts of the scan; ``source`` names it.
            slices: ``(n, size, size)`` in the stored dtype.
        """
        key = scan_key(record["source"])
        with open(self.path / f"{key}.npy.tmp", "wb") as handle:
            np.save(handle, slices)
        os.replace(self.path / f"{key}.npy.tmp", self.path / f"{key}.npy")
        _write_atomic(self.path / f"{key}.json", json.dumps(record).encode())

    def remove(self) -> None:
        """Delete the folder."""
        shutil.rmtree(self.path, ignore_errors=True)

    def finalize(self, class_names: list[str], buffer_bytes: int = 1 << 30) -> dict:
        """Write the store from the finished scans and rename it over the target.

        Args:
            class_names: label index -> name.
            buffer_bytes: the most memory used for slices. Defaults to 1 GiB.

        Returns:
            Split name -> ``[start, stop)`` rows.
        """
        config = self.config
        records = [record for _, record in sorted(self.done().items())]
        for leftover in [*self.path.glob("bucket-*"), self.path / STORE_NAME]:
            leftover.unlink(missing_ok=True)
        label_index = {name: index for index, name in enumerate(class_names)}
        scan_labels = np.array([label_index.get(r["label"], -1) for r in records], dtype=np.int32)
        subject_labels = {}
        for record, label in zip(records, scan_labels, strict=True):
            subject_labels.setdefault(record["subject_id"], int(label))
        subject_split = assign_splits(
            subject_labels,
            config["val_fraction"],
            config["test_fraction"],
            config["folds"],
            config["seed"],
        )
        names = split_names(config["val_fraction"], config["test_fraction"], config["folds"])
        if UNLABELLED in subject_split.values():
            names.append(UNLABELLED)
        scan_split = np.array([names.index(subject_split[r["subject_id"]]) for r in records])
        counts = np.array([r["num_slices"] for r in records], dtype=np.int64)
        first_row = np.concatenate([[0], np.cumsum(counts)])
        destination, ranges = row_order(np.repeat(scan_split, counts), names, config["seed"])

        temporary = self.path / STORE_NAME
        with h5py.File(temporary, "w", track_order=True) as h5:
            num_rows = int(first_row[-1])
            size = config["size"]
            chunk = min(config["chunk_slices"], max(num_rows, 1))
            compression = None if config["compression"] == "none" else config["compression"]
            images = h5.create_dataset(
                schema.IMAGES, (num_rows, size, size), dtype=config["dtype"],
                chunks=(chunk, size, size), compression=compression,
            )  # fmt: skip
            images.attrs[schema.ATTR_SCALE] = 1 / 255 if config["dtype"] == "uint8" else 1.0
            images.attrs[schema.ATTR_OFFSET] = 0.0
            self._write_images(images, records, first_row, destination, buffer_bytes)
            order = np.argsort(destination)  # canonical row of each store row
            h5.create_dataset(schema.LABELS, data=np.repeat(scan_labels, counts)[order])
            h5.create_dataset(
                schema.SUBJECT,
                data=np.repeat(np.arange(len(records), dtype=np.int32), counts)[order],
            )
            positions = np.concatenate([r["positions"] for r in records]).astype(np.int16)
            h5.create_dataset(schema.SLICE, data=positions[order])
            _write_subjects(
                h5.create_group(schema.SUBJECTS),
                records,
                scan_labels,
                [names[i] for i in scan_split],
            )
            h5.attrs[schema.ATTR_SCHEMA] = schema.SCHEMA_VERSION
            h5.attrs[schema.ATTR_UUID] = str(uuid.uuid4())
            h5.attrs[schema.ATTR_CREATED] = datetime.now(UTC).isoformat(timespec="seconds")
            h5.attrs[schema.ATTR_CONFIG] = json.dumps(config)
            h5.attrs[schema.ATTR_CLASS_NAMES] = json.dumps(class_names)
            h5.attrs[schema.ATTR_SPLITS] = json.dumps(ranges)
            h5.flush()
            h5.attrs[schema.ATTR_COMPLETE] = True
        _fsync(temporary)
        os.replace(temporary, self.target)
        _fsync(self.target.parent)
        self.remove()
        return ranges

    def _write_images(self, images, records, first_row, destination, buffer_bytes) -> None:
        """Fill ``images`` so that canonical row r lands at ``destination[r]``."""
        num_rows, size = images.shape[0], images.shape[1]
        row_bytes = size * size * images.dtype.itemsize
        chunk = images.chunks[0]
        window = max(chunk, buffer_bytes // row_bytes // chunk * chunk)  # chunk-aligned writes
        num_windows = -(-num_rows // window)
        bucket_of = destination // window
        if num_windows > 1:  # deal the rows into one bucket file per window
            buckets = [open(self.path / f"bucket-{k:05d}", "wb") for k in range(num_windows)]  # noqa: SIM115
            try:
                for index, record in enumerate(records):
                    slices = self._slices(record)
                    mine = bucket_of[first_row[index] : first_row[index + 1]]
                    for k in np.unique(mine):
                        buckets[k].write(np.ascontiguousarray(slices[mine == k]).tobytes())
            finally:
                for handle in buckets:
                    handle.close()
        for k in range(num_windows):
            start, stop = k * window, min((k + 1) * window, num_rows)
            block = np.empty((stop - start, size, size), dtype=images.dtype)
            if num_windows > 1:
                rows = np.flatnonzero(bucket_of == k)  # ascending: the order they were dealt in
                bucket = self.path / f"bucket-{k:05d}"
                block[destination[rows] - start] = np.fromfile(bucket, dtype=images.dtype).reshape(
                    -1, size, size
                )
                bucket.unlink()
            else:
                for index, record in enumerate(records):
                    block[destination[first_row[index] : first_row[index + 1]]] = self._slices(
                        record
                    )
            images[start:stop] = block

    def _slices(self, record: dict) -> np.ndarray:
        return np.load(self.path / f"{scan_key(record['source'])}.npy", mmap_mode="r")


def _write_subjects(
    group: h5py.Group, records: list[dict], labels: np.ndarray, splits: list[str]
) -> None:
    text = h5py.string_dtype()
    columns = {
        schema.SUBJECT_ID: np.array([r["subject_id"] for r in records], dtype=object),
        schema.SESSION: np.array([r["session"] for r in records], dtype=object),
        schema.SOURCE_PATH: np.array([r["source"] for r in records], dtype=object),
        schema.SHA256: np.array([r["sha256"] for r in records], dtype=object),
        schema.SUBJECT_LABEL: labels,
        schema.SUBJECT_SPLIT: np.array(splits, dtype=object),
        schema.AFFINE: np.array([r["affine"] for r in records], dtype=np.float64).reshape(-1, 4, 4),
        schema.SHAPE: np.array([r["shape"] for r in records], dtype=np.int32).reshape(-1, 3),
        schema.VOXEL_SIZE: np.array([r["voxel_size"] for r in records], dtype=np.float32).reshape(
            -1, 3
        ),
    }
    for name in schema.SUBJECT_COLUMNS:
        values = columns[name]
        group.create_dataset(
            name, data=values, dtype=text if values.dtype == object else values.dtype
        )


def _write_atomic(path: Path, data: bytes) -> None:
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_bytes(data)
    os.replace(temporary, path)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
