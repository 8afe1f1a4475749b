"""H5Sequence: a ``keras.utils.PyDataset`` that reads one batch of a store per ``__getitem__``."""

from __future__ import annotations

import os
import signal
import threading
from dataclasses import dataclass

import keras
import numpy as np

from loader import schema, table
from loader.options import SettingError, check_settings, option
from loader.plan import MIX_GROUPS, READ_MIB, EpochPlan
from loader.rows import prefetch_rows, prefetch_span, read_rows
from loader.store import StoreChangedError, StoreDamagedError, file_identity, open_h5
from loader.stores import open_parts, store_paths
from loader.target import SEGMENTATION, Target

# How many batches ahead to ask the kernel for (prefetch=True): cold shuffled reads,
# slices/s on a 0.25 GiB store: 1 ahead 348 k, 2 ahead 435 k, 4 ahead 443 k (warm unchanged).
PREFETCH_AHEAD = 2
GROUP_BITS = 40  # a read group's number: its store's index above these bits
OUTPUTS = ("float32", "stored")  # what ``x`` holds: intensities, or the store's own values


@dataclass(frozen=True)
class ReadSettings:
    """How a sequence reads, declared once like every setting: checked (and its mistakes
    worded) as the command lines' settings are."""

    batch_size: int = option(32, "rows per batch", at_least=1)
    shuffle: bool = option(False, "permute the runs each epoch")
    seed: int = option(0, "seed of the permutation", at_least=0)
    channels: str = option("last", "tensor layout", choices=("last", "first"))
    prefetch: bool = option(True, "ask the kernel to read a batch ahead")
    verify: bool = option(True, "check every chunk read against its checksum")
    output: str = option(
        "float32", "what x holds: float32 intensities or the stored bytes", choices=OUTPUTS
    )
    read_mib: float = option(
        READ_MIB,
        "MiB of adjacent chunks a shuffled epoch reads at once (0: chunk by chunk)",
        at_least=0,
    )

    def __post_init__(self):
        check_settings(self)


class H5Sequence(keras.utils.PyDataset):
    """Batches of ``(x, y)`` from a store, read from disk one batch at a time.

    Each epoch visits every row of the selected splits once, in batches that are unions
    of a few chunk-aligned contiguous runs of rows (``rows(i)`` says which). With
    ``shuffle=True`` the runs are permuted by ``(seed, epoch)``; ``on_epoch_end()`` moves
    to the next epoch. The object holds only its arguments and plain arrays: files are
    opened lazily in each process that reads, so it is safe with ``workers`` threads and
    with ``use_multiprocessing=True``.

    ``y`` is the target of each row's subject: by default the store's class labels (int32).
    Rows without a label are never served with labels: ``split=None`` means every
    labelled split (all rows but the ``unlabelled`` split), and the ``unlabelled`` split
    named alone gives ``x`` only. With ``target="age"`` ``y`` is that column of the labels
    table kept in the store: float32 for numbers (regression), an int32 class index for
    text. Where some rows' subjects have no value for the target, batches are
    ``(x, y, sample_weight)`` with weight 0 for those rows (Keras leaves them out of the
    loss and of weighted metrics); else ``(x, y)``. With ``target="mask"`` (segmentation,
    a store written with ``--masks``) ``y`` is each slice's uint8 label mask,
    ``(b, h, w, 1)``.

    A store of several channels per slice (modalities, neighbouring slices) gives ``x``
    of ``(b, h, w, C)``; ``channel_names`` names them.

    ``x`` holds float32 intensities (``stored * scale + offset``) by default. With
    ``output="stored"`` it holds the store's own values (uint8 or float16, as
    ``stored_dtype``): a quarter of the bytes to move, and no conversion on the host. The
    model then scales them itself, with ``keras.layers.Rescaling(seq.scale, seq.offset)``
    as its first layer (``python -m training`` does).

    Several stores read as one (cohorts, or the shards of one preprocessing run): every
    row of each once per epoch, the chunk-aligned blocks of all stores permuted together
    so batches mix them, splits taken by name from each store (empty in some is fine).
    They must agree on what a slice means (:mod:`loader.stores`); their classes are merged
    by name. ``shard=(index, count)`` takes this host's equal share of every epoch's
    batches (batches ``index``, ``index + count``, ...), dropping fewer than ``count``
    batches at the end so every host runs the same number of steps.

    Args:
        path: the store; a list of stores, or a folder (every ``*.h5`` in it, by name).
        split: a split name, a list of names, or None for every labelled row (every row
            of an unlabelled store). Defaults to None.
        batch_size: rows per batch; the last batch may be shorter. Defaults to 32.
        shuffle: permute the runs each epoch. Defaults to False.
        seed: the seed of the permutation. Defaults to 0.
        channels: ``"last"`` gives ``x`` of shape ``(b, h, w, C)``, ``"first"``
            ``(b, C, h, w)``; ``C`` is 1 but for stores of several channels. Defaults to
            ``"last"``.
        prefetch: after each batch, ask the kernel to start reading a batch ahead
            (``posix_fadvise(WILLNEED)``), which a shuffled order otherwise defeats.
            Defaults to True.
        target: a column of the store's labels table (or of ``labels``) as ``y``, or
            ``"mask"``; None for the store's class labels. Defaults to None.
        task: ``classification``, ``regression`` or ``segmentation``; None follows the
            target (numbers are regression, ``mask`` is segmentation). Defaults to None.
        labels: a ``.tsv``/``.csv`` table joined by subject id at load time, for labels
            that arrived after preprocessing. Defaults to None (the store's table).
        id_column: the subject-id column of ``labels``. Defaults to ``participant_id``.
        shard: ``(index, count)``: read only this host's share of each epoch. Defaults to
            None (every batch).
        verify: check every chunk a batch reads against its checksum (stores of schema 3),
            so damaged bytes never reach a model; a chunk the batch covers only in part is
            read whole for the check. Defaults to True.
        output: ``"float32"`` or ``"stored"`` (see above). Defaults to ``"float32"``.
        read_mib: with ``shuffle``, permute groups of adjacent chunks of about this many
            MiB, and the chunks inside windows of 8 groups (:mod:`loader.plan`): each
            group is asked of the disk as one read, so an epoch makes a few large requests
            instead of one per chunk. 0 permutes chunk by chunk (every version before
            this setting). Defaults to 4.
        **kwargs: ``workers``, ``use_multiprocessing``, ``max_queue_size`` of
            ``keras.utils.PyDataset``.

    Raises:
        FileNotFoundError: no store at ``path``.
        ValueError: the file is not a finished store, a split is unknown or empty, the
            unlabelled split is named beside labelled ones, the target is not a column
            (the columns are listed) or not numeric for regression, stores that disagree on
            what a slice means (the first difference and the two stores are named), or an
            argument is out of range.
        TypeError: an argument of the wrong type.

    Example::

        train = H5Sequence("store.h5", split="train", batch_size=256, shuffle=True)
        model.fit(train, validation_data=H5Sequence("store.h5", split="val"), shuffle=False)
    """

    def __init__(
        self,
        path: str | os.PathLike,
        split: str | list[str] | None = None,
        batch_size: int = 32,
        shuffle: bool = False,
        seed: int = 0,
        channels: str = "last",
        prefetch: bool = True,
        target: str | None = None,
        task: str | None = None,
        labels: str | os.PathLike | None = None,
        id_column: str = table.ID_COLUMN,
        shard: tuple[int, int] | None = None,
        verify: bool = True,
        output: str = "float32",
        read_mib: float = READ_MIB,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self._settings = ReadSettings(
            batch_size, shuffle, seed, channels, prefetch, verify, output, read_mib
        )
        if split is not None and not isinstance(split, str | list | tuple):
            raise TypeError(f"`split` must be a str, a list of str or None; received {split!r}")
        self._shard = None if shard is None else _check_shard(shard)
        if self.use_multiprocessing:
            _quiet_forked_workers()
        paths = store_paths(path)
        one_file = isinstance(path, str | os.PathLike) and not os.path.isdir(path)
        self._path = paths[0] if one_file else paths
        self._split = split
        self._epoch = 0
        self._parts, self._blocks, self._chunk_rows, self._target, self._weighted = open_parts(
            paths, split, target, task, labels, id_column
        )
        first = self._parts[0]
        self._slice_shape, self._dtype = first.slice_shape, first.dtype
        self._num_channels = len(first.channel_names)
        self._scale, self._offset = first.scale, first.offset
        self._first_rows = np.array([part.first_row for part in self._parts], dtype=np.int64)
        self._group_chunks, self._groups = self._read_groups(read_mib)
        self._plan = self._epoch_plan(self._epoch)
        if shard is not None and len(self._plan) < self._shard[1]:
            raise ValueError(
                f"`shard` needs at least one batch per host: {len(self._plan)} batches of "
                f"{batch_size} for {self._shard[1]} hosts; received shard={shard}"
            )
        self._init_process_state()

    def _init_process_state(self) -> None:
        self._lock = threading.Lock()
        self._pid = None
        self._open_files = None  # per part: (fd, images dataset, subjects dataset)
        self._h5 = []
        self._hinted = set()  # windows of read groups asked of the disk this epoch

    def _read_groups(self, read_mib: float) -> tuple[np.ndarray | None, np.ndarray | None]:
        """Chunks per read group in each store, and each block's group (store and group
        index as one number); both None where groups would not make reads larger: no
        shuffle, ``read_mib`` 0, or a store whose chunks hold half of ``read_mib`` already
        (a group of one chunk)."""
        chunk_bytes = [part.images.chunk_rows * part.images.row_bytes for part in self._parts]
        group_chunks = np.array([int(read_mib * 2**20 // size) for size in chunk_bytes])
        if not self._settings.shuffle or not len(self._blocks) or group_chunks.min() < 2:
            return None, None
        parts = np.searchsorted(self._first_rows, self._blocks[:, 0], side="right") - 1
        chunks = (self._blocks[:, 0] - self._first_rows[parts]) // self._chunk_rows
        return group_chunks, (parts << GROUP_BITS) | (chunks // group_chunks[parts])

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        for name in ("_lock", "_pid", "_open_files", "_h5", "_hinted"):
            state.pop(name)
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._init_process_state()

    def __del__(self) -> None:
        if getattr(self, "_pid", None) == os.getpid() and self._open_files:
            for fd, _ in self._open_files:
                os.close(fd)

    def __repr__(self) -> str:
        shard = f", shard={self._shard}" if self._shard else ""
        read = self._settings
        return (
            f"H5Sequence({self._path!r}, split={self._split!r}, batch_size={read.batch_size}, "
            f"shuffle={read.shuffle}, seed={read.seed}, channels={read.channels!r}{shard}, "
            f"output={read.output!r}, read_mib={read.read_mib:g}, "
            f"workers={self.workers}, use_multiprocessing={self.use_multiprocessing})"
        )

    @property
    def path(self) -> str | list[str]:
        """The store's path; the list of paths when reading several stores."""
        return self._path

    @property
    def paths(self) -> list[str]:
        """The stores read, in order (store index i in :meth:`rows` is ``paths[i]``)."""
        return [part.path for part in self._parts]

    @property
    def split(self) -> str | list[str] | None:
        """The split(s) read, as given."""
        return self._split

    @property
    def shard(self) -> tuple[int, int] | None:
        """``(index, count)``: this host's share of every epoch, or None for all of it."""
        return self._shard

    @property
    def batch_size(self) -> int:
        """Rows per batch."""
        return self._settings.batch_size

    @property
    def num_slices(self) -> int:
        """Rows in the selected splits of every store: slices per epoch (over all hosts)."""
        return self._plan.num_rows

    @property
    def channel_names(self) -> list[str]:
        """The name of each channel of ``x`` (modalities, neighbouring slices)."""
        return list(self._parts[0].channel_names)

    @property
    def scale(self) -> float:
        """Intensity = stored value * ``scale`` + ``offset`` (the store's; 1/255 for uint8)."""
        return float(self._scale)

    @property
    def offset(self) -> float:
        """See :attr:`scale`."""
        return float(self._offset)

    @property
    def stored_dtype(self) -> np.dtype:
        """The store's type of a slice value: ``x``'s type with ``output="stored"``."""
        return np.dtype(self._dtype)

    @property
    def output(self) -> str:
        """``"float32"`` (intensities) or ``"stored"`` (the stored values): what ``x`` holds."""
        return self._settings.output

    @property
    def class_names(self) -> list[str]:
        """The classes of the target (the store's own by default); empty for regression."""
        return list(self._target.class_names) if self._target else []

    @property
    def target(self) -> Target | None:
        """What ``y`` is (:class:`loader.target.Target`, values of the first store); None
        when batches are ``x`` alone."""
        return self._target

    @property
    def weighted(self) -> bool:
        """Whether batches are ``(x, y, sample_weight)``: some rows have no target value."""
        return self._weighted

    @property
    def store_uuid(self) -> str:
        """The uuid of the store read; with several stores, their uuids joined by "+"."""
        return "+".join(part.uuid for part in self._parts)

    @property
    def epoch(self) -> int:
        """The epoch whose plan ``__getitem__`` follows; set it to start at a later epoch
        (a resumed run)."""
        return self._epoch

    @epoch.setter
    def epoch(self, value: int) -> None:
        if isinstance(value, bool) or not isinstance(value, int | np.integer):
            raise TypeError(f"`epoch` must be int; received epoch={value!r}")
        if value < 0:
            raise SettingError("{epoch} must be at least 0", epoch=value)
        self._epoch = value
        self._plan = self._epoch_plan(value)
        self._hinted = set()

    def _epoch_plan(self, epoch: int) -> EpochPlan:
        read = self._settings
        return EpochPlan(
            self._blocks,
            read.batch_size,
            read.shuffle,
            read.seed,
            epoch,
            self._chunk_rows,
            self._groups,
            MIX_GROUPS,
        )

    def __len__(self) -> int:
        batches = len(self._plan)
        return batches // self._shard[1] if self._shard else batches

    def _plan_batch(self, index) -> int:
        """The batch of the epoch plan that this sequence's batch ``index`` is."""
        index = _batch_index(index, len(self))
        return index * self._shard[1] + self._shard[0] if self._shard else index

    def _local_runs(self, plan_batch: int) -> list[tuple[int, int, int]]:
        """``(part, start, stop)`` runs of a plan batch, rows local to each store."""
        if len(self._parts) == 1:
            return [(0, start, stop) for start, stop in self._plan.runs(plan_batch)]
        runs = []
        for start, stop in self._plan.runs(plan_batch):
            part = int(np.searchsorted(self._first_rows, start, side="right")) - 1
            first = int(self._first_rows[part])
            runs.append((part, start - first, stop - first))
        return runs

    def rows(self, index: int) -> np.ndarray:
        """The store rows of batch ``index``, in the order the batch holds them.

        With several stores, ``(store index, row)`` pairs, shape ``(b, 2)``.
        """
        runs = self._local_runs(self._plan_batch(index))
        if len(self._parts) == 1:
            return np.concatenate([np.arange(start, stop) for _, start, stop in runs])
        return np.concatenate(
            [
                np.stack([np.full(stop - start, part), np.arange(start, stop)], 1)
                for part, start, stop in runs
            ]
        )

    def on_epoch_end(self) -> None:
        """Move to the next epoch's plan."""
        self.epoch = self._epoch + 1

    def __getitem__(self, index: int):
        plan_batch = self._plan_batch(index)
        runs = self._local_runs(plan_batch)
        num_rows = sum(stop - start for _, start, stop in runs)
        files = self._open()
        if self._hints_windows:
            self._hint_windows(plan_batch, files)
        height, width = self._slice_shape
        count = self._num_channels
        stored = np.empty((num_rows, height, width, count), self._dtype)
        target = self._target is not None
        segmentation = target and self._target.task == SEGMENTATION
        scans = np.empty(num_rows, dtype=np.int32) if target and not segmentation else None
        masks = np.empty((num_rows, height, width, 1), np.uint8) if segmentation else None
        position = 0
        for part_index, start, stop in runs:
            part, (fd, h5) = self._parts[part_index], files[part_index]
            end = position + stop - start
            if self._settings.verify and part.checksums is not None:
                _read_checked(part, start, stop, stored[position:end], fd, h5 and h5[0])
            else:
                read_rows(part.images, start, stop, stored[position:end], fd, h5 and h5[0])
            if segmentation:
                read_rows(part.masks, start, stop, masks[position:end], fd, h5 and h5[2])
            elif target:
                read_rows(part.subjects, start, stop, scans[position:end], fd, h5 and h5[1])
            position = end
        if self._settings.prefetch and not self._hints_windows:
            # hint the batch PREFETCH_AHEAD on (at first all up to it)
            first = index + 1 if index == 0 else index + PREFETCH_AHEAD
            for ahead in range(first, min(index + PREFETCH_AHEAD + 1, len(self))):
                for part_index, start, stop in self._local_runs(self._plan_batch(ahead)):
                    fd = files[part_index][0]
                    prefetch_rows(self._parts[part_index].images, start, stop, fd)
        channels = self._settings.channels
        if self._settings.output == "stored":
            x = channels_as(stored, channels)
        else:
            out = stored if stored.dtype == np.float32 else None
            x = model_input(stored, self._scale, self._offset, channels, out)
        if not target:
            return x
        if segmentation:
            return x, masks
        y, present = self._values(runs, scans)
        if not self._weighted:
            return x, y
        y[~present] = 0  # any value: its weight is 0
        return x, y, present.astype(np.float32)

    @property
    def _hints_windows(self) -> bool:
        """Whether the disk is asked for a window of read groups at a time (else a batch)."""
        return self._settings.prefetch and self._groups is not None and self._shard is None

    def _hint_windows(self, plan_batch: int, files) -> None:
        """Ask the disk for the read groups of this batch's window and of the next, each
        group once an epoch as one read of its span (a window ahead: its reads overlap
        the work on this one). Not with ``shard``: another host reads the rest of a group."""
        target = self._target is not None
        segmentation = target and self._target.task == SEGMENTATION
        window = self._plan.window(plan_batch)
        for ahead in (window, window + 1):
            if ahead in self._hinted or ahead >= self._plan.num_windows:
                continue
            self._hinted.add(ahead)
            for group in self._plan.window_groups(ahead).tolist():
                part_index, index = group >> GROUP_BITS, group & ((1 << GROUP_BITS) - 1)
                part, size = self._parts[part_index], int(self._group_chunks[part_index])
                start = index * size * part.chunk_rows
                stop = min(start + size * part.chunk_rows, part.num_rows)
                layouts = [part.images]  # and what the batch reads beside each row
                layouts += [part.masks] if segmentation else [part.subjects] if target else []
                for layout in layouts:
                    prefetch_span(layout, start, stop, files[part_index][0])

    def _values(self, runs, scans: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """The target value of each row (a fresh array) and, when weighted, whether it has one."""
        if len(self._parts) == 1:
            part = self._parts[0]
            return part.values[scans], part.present[scans] if self._weighted else None
        y = np.empty(len(scans), dtype=self._target.values.dtype)
        present = np.empty(len(scans), dtype=bool)
        position = 0
        for part_index, start, stop in runs:
            end = position + stop - start
            part, mine = self._parts[part_index], scans[position:end]
            y[position:end], present[position:end] = part.values[mine], part.present[mine]
            position = end
        return y, present

    def _open(self) -> list[tuple]:
        """This process's ``(fd, h5)`` per store: ``h5`` is None where rows are plain bytes,
        else the h5py datasets ``(images, subjects, masks)``."""
        pid = os.getpid()
        if self._pid == pid:
            return self._open_files
        with self._lock:
            if self._pid != pid:  # never use what a parent process opened
                files = []
                for part in self._parts:
                    fd = os.open(part.path, os.O_RDONLY)
                    if file_identity(os.fstat(fd)) != part.identity:
                        os.close(fd)
                        raise StoreChangedError(
                            f"{part.path}: the store changed since this H5Sequence was "
                            "created (another store was written at its path); create a new one"
                        )
                    layouts = [part.images, part.subjects, part.masks]
                    if all(layout.raw for layout in layouts if layout is not None):
                        files.append((fd, None))
                    else:
                        h5 = open_h5(part.path)
                        self._h5.append(h5)
                        names = [layout and layout.name for layout in layouts]
                        files.append((fd, tuple(name and h5[name] for name in names)))
                self._open_files = files
                self._pid = pid
        return self._open_files


def _read_checked(part, start: int, stop: int, out: np.ndarray, fd, dataset) -> None:
    """Read rows ``[start, stop)`` into ``out``, each chunk compared with its checksum.

    A chunk the rows cover in part is read whole (once) for the check and the rows copied
    out of it.

    Raises:
        StoreDamagedError: a chunk whose bytes changed, naming the store and its rows.
    """
    chunk = part.chunk_rows
    for index in range(start // chunk, (stop - 1) // chunk + 1):
        first, last = index * chunk, min((index + 1) * chunk, part.num_rows)
        low, high = max(first, start), min(last, stop)
        if low == first and high == last:
            data = out[first - start : last - start]
            read_rows(part.images, first, last, data, fd, dataset)
        else:
            data = np.empty((last - first, *out.shape[1:]), out.dtype)
            read_rows(part.images, first, last, data, fd, dataset)
            out[low - start : high - start] = data[low - first : high - first]
        if schema.checksum(data) != int(part.checksums[index]):
            raise StoreDamagedError(
                f"{part.path}: rows {first}-{last - 1} (/images chunk {index}) are damaged: "
                "their bytes no longer match the checksum; run python -m loader verify "
                f"{part.path}"
            )


def _check_shard(shard) -> tuple[int, int]:
    if (
        not isinstance(shard, tuple | list)
        or len(shard) != 2
        or not all(isinstance(n, int | np.integer) and not isinstance(n, bool) for n in shard)
        or not 0 <= shard[0] < shard[1]
    ):
        raise ValueError(
            f"`shard` must be (index, count) with 0 <= index < count; received shard={shard!r}"
        )
    return int(shard[0]), int(shard[1])


_QUIET_WORKERS = []  # one registration per process


def _quiet_forked_workers() -> None:
    """Let Keras' forked reader processes leave Ctrl-C and SIGTERM to the parent.

    Ctrl-C reaches every process of the terminal's group: a worker that died of it in
    the middle of sending a batch broke the result pipe (``UnpicklingError``) and Keras
    waited for it for ever. Workers ignore SIGINT and die quietly of the SIGTERM with
    which Keras stops them; the parent handles the interrupt.
    """
    if _QUIET_WORKERS:
        return

    def in_child() -> None:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)

    os.register_at_fork(after_in_child=in_child)
    _QUIET_WORKERS.append(in_child)


def model_input(
    stored: np.ndarray,
    scale: float,
    offset: float,
    channels: str = "last",
    out: np.ndarray | None = None,
) -> np.ndarray:
    """Stored slices ``(n, h, w, C)`` as a model reads them: float32 intensities
    (``stored * scale + offset``), channels last ``(n, h, w, C)`` or first ``(n, C, h, w)``.

    Args:
        out: a float32 array of ``stored``'s shape to fill (``stored`` itself when float32).

    >>> model_input(np.full((1, 1, 1, 1), 255, np.uint8), 1 / 255, 0.0).tolist()
    [[[[1.0]]]]
    """
    x = np.empty(stored.shape, np.float32) if out is None else out
    # float32 factors, as the model's Rescaling layer uses: with a Python float numpy runs
    # its float64 loop and casts every value back (2.3x the time of the float32 loop)
    if stored is not x or scale != 1:
        np.multiply(stored, np.float32(scale), out=x, casting="unsafe")
    if offset != 0:
        x += np.float32(offset)
    return channels_as(x, channels)


def channels_as(x: np.ndarray, channels: str) -> np.ndarray:
    """Slices ``(n, h, w, C)`` channels ``"last"`` as they are, or ``"first"``: ``(n, C, h, w)``.

    >>> channels_as(np.zeros((2, 3, 4, 5)), "first").shape
    (2, 5, 3, 4)
    """
    if channels != "first":
        return x
    count, height, width = x.shape[3], x.shape[1], x.shape[2]
    if count == 1:
        return x.reshape(len(x), 1, height, width)
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2))


def _batch_index(index, length: int) -> int:
    if isinstance(index, bool) or not isinstance(index, int | np.integer):
        raise TypeError(f"batch index must be an int; received {index!r}")
    if not 0 <= index < length:
        raise IndexError(f"batch index must be in [0, {length}); received {index}")
    return int(index)
