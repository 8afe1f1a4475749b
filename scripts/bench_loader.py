"""Benchmark the loader against the other ways of feeding slices to Keras, side by side.

All readers see the same slices (a store from ``make_large_store``, copied into a .npy,
TFRecord files and PNG class folders) and hand out float32 batches in [0, 1]:

1. the limit: ``np.memmap`` of the .npy, contiguous batches, the same uint8 -> float32 conversion
2. ``H5Sequence``, shuffled and unshuffled
3. what people write first: a PyDataset that shuffles sample indices and reads them with
   h5py fancy indexing
4. TensorFlow's own answer: TFRecord files through ``tf.data`` (parse, shuffle buffer,
   batch, prefetch)
5. PNG slices in class folders through ``keras.utils.image_dataset_from_directory``
6. ``model.fit`` through ``H5Sequence`` against ``model.fit(x, y)`` with the same slices
   in memory, for a tiny model (Flatten + Dense: the data path shows) and for the
   project's CNN (on 8192 slices)

Warm: the files are in the page cache. Cold: each file is dropped from the page cache
(``posix_fadvise(POSIX_FADV_DONTNEED)``) before the pass. A second table reads stores of
the same slices in each dtype and compression. Ratios are to (1) in the same run.

    python scripts/bench_loader.py --gb 0.25
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import h5py
import keras
import numpy as np
from machine import machine_line
from make_large_store import write_large_store

from loader import H5Sequence, open_store

BATCH = 256


def evict(*paths: Path) -> None:
    """Drop the files (or every file below a folder) from the page cache."""
    for path in paths:
        files = [p for p in Path(path).rglob("*") if p.is_file()] if Path(path).is_dir() else [path]
        for file in files:
            fd = os.open(file, os.O_RDONLY)
            try:
                os.fsync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def warm(*paths: Path) -> None:
    """Read the files once so they sit in the page cache."""
    for path in paths:
        files = [p for p in Path(path).rglob("*") if p.is_file()] if Path(path).is_dir() else [path]
        for file in files:
            with open(file, "rb") as handle:
                while handle.read(1 << 24):
                    pass


def rate(fn, files, cold: bool, repeats: int) -> float:
    """Best slices/s of ``fn()`` (which returns the slices it read) over ``repeats`` passes."""
    best = 0.0
    for _ in range(repeats):
        evict(*files) if cold else warm(*files)
        started = time.perf_counter()
        count = fn()
        best = max(best, count / (time.perf_counter() - started))
    return best


class FancyIndexSequence(keras.utils.PyDataset):
    """What people write first: shuffled sample indices, h5py fancy indexing per batch."""

    def __init__(self, path, batch_size, seed=0, **kwargs):
        super().__init__(**kwargs)
        self.path, self.batch_size = path, batch_size
        with h5py.File(path, "r") as h5:
            self.num_rows = h5["images"].shape[0]
        self.order = np.random.default_rng(seed).permutation(self.num_rows)
        self.h5 = None

    def __len__(self):
        return -(-self.num_rows // self.batch_size)

    def __getitem__(self, index):
        if self.h5 is None:  # locking=False: the one setting every reader here shares
            self.h5 = h5py.File(self.path, "r", locking=False)
        rows = np.sort(self.order[index * self.batch_size : (index + 1) * self.batch_size])
        x = self.h5["images"][rows].astype(np.float32) / np.float32(255)
        return x[..., None], self.h5["labels"][rows]


def export_npy(store: Path, out: Path) -> tuple[Path, Path]:
    """The store's slices and labels as .npy files, copied block by block."""
    with open_store(store) as opened:
        images = np.lib.format.open_memmap(out / "images.npy", "w+", np.uint8, opened.images.shape)
        labels = np.empty(opened.num_slices, np.int32)
        for start in range(0, opened.num_slices, 8192):
            stop = min(start + 8192, opened.num_slices)
            images[start:stop] = opened.images[start:stop]
            labels[start:stop] = opened.labels[start:stop]
        images.flush()
        del images
    np.save(out / "labels.npy", labels)
    return out / "images.npy", out / "labels.npy"


def export_tfrecords(
    images: np.ndarray, labels: np.ndarray, out: Path, shards: int = 8
) -> list[Path]:
    import tensorflow as tf

    paths = []
    for shard in range(shards):
        path = out / f"slices-{shard}.tfrecord"
        with tf.io.TFRecordWriter(str(path)) as writer:
            for row in range(shard, len(images), shards):
                feature = {
                    "image": tf.train.Feature(
                        bytes_list=tf.train.BytesList(value=[images[row].tobytes()])
                    ),
                    "label": tf.train.Feature(
                        int64_list=tf.train.Int64List(value=[int(labels[row])])
                    ),
                }
                writer.write(
                    tf.train.Example(
                        features=tf.train.Features(feature=feature)
                    ).SerializeToString()
                )
        paths.append(path)
    return paths


def tfrecord_reader(paths: list[Path], size: int):
    import tensorflow as tf

    description = {
        "image": tf.io.FixedLenFeature([], tf.string),
        "label": tf.io.FixedLenFeature([], tf.int64),
    }

    def parse(record):
        example = tf.io.parse_single_example(record, description)
        image = tf.reshape(tf.io.decode_raw(example["image"], tf.uint8), (size, size, 1))
        return tf.cast(image, tf.float32) / 255.0, tf.cast(example["label"], tf.int32)

    def read() -> int:
        dataset = tf.data.TFRecordDataset(
            [str(p) for p in paths], num_parallel_reads=tf.data.AUTOTUNE
        )
        dataset = dataset.map(parse, num_parallel_calls=tf.data.AUTOTUNE)
        dataset = dataset.shuffle(10000, seed=0).batch(BATCH).prefetch(tf.data.AUTOTUNE)
        return sum(int(x.shape[0]) for x, _ in dataset)

    return read


def export_png(images: np.ndarray, labels: np.ndarray, out: Path, count: int) -> Path:
    from PIL import Image

    for row in range(count):
        folder = out / f"class{labels[row]}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(images[row]).save(folder / f"{row:07d}.png")
    return out


def png_reader(folder: Path, size: int):
    def read() -> int:
        dataset = keras.utils.image_dataset_from_directory(
            folder,
            color_mode="grayscale",
            image_size=(size, size),
            batch_size=BATCH,
            shuffle=True,
            seed=0,
            verbose=False,
        )
        return sum(int(x.shape[0]) for x, _ in dataset.map(lambda x, y: (x / 255.0, y)))

    return read


def sequence_reader(sequence):
    def read() -> int:
        return sum(len(sequence[i][0]) for i in range(len(sequence)))

    return read


def memmap_reader(path: Path):
    def read() -> int:
        images = np.load(path, mmap_mode="r")
        for start in range(0, len(images), BATCH):
            block = images[start : start + BATCH]
            x = np.empty((*block.shape, 1), np.float32)
            np.multiply(block, np.float32(1 / 255), out=x[..., 0], casting="unsafe")
        return len(images)

    return read


def disk_read_rate(path: Path) -> float:
    """Sequential read MB/s of a file from a cold cache (the disk's speed)."""
    evict(path)
    started = time.perf_counter()
    with open(path, "rb", buffering=0) as handle:
        total = 0
        while chunk := handle.read(1 << 23):
            total += len(chunk)
    return total / 4096 / (time.perf_counter() - started)  # in 64x64 uint8 slices/s


def tiny_model():
    """Flatten + Dense: a step costs almost nothing, so the data path shows."""
    return keras.Sequential(
        [
            keras.Input((64, 64, 1)),
            keras.layers.Flatten(),
            keras.layers.Dense(1, activation="sigmoid"),
        ]
    )


def project_cnn():
    """The CNN python -m training trains."""
    from training.model import build

    return build(2)


def fit_rates(store: Path, images_path: Path, labels_path: Path, repeats: int, model_fn) -> dict:
    """Samples/s of one epoch of model.fit: from arrays in memory, and from the store."""

    def best_epoch(model, *fit_args, count, **fit_kwargs) -> float:
        model.compile("adam", "binary_crossentropy")
        model.fit(*fit_args, epochs=1, verbose=0, **fit_kwargs)  # builds the graph
        best = 0.0
        for _ in range(repeats):
            started = time.perf_counter()
            model.fit(*fit_args, epochs=1, verbose=0, **fit_kwargs)
            best = max(best, count / (time.perf_counter() - started))
        return best

    x = np.load(images_path).astype(np.float32)[..., None] / np.float32(255)  # the baseline
    y = np.load(labels_path)
    results = {
        "model.fit(x, y), x in memory": best_epoch(
            model_fn(), x, y, count=len(x), batch_size=BATCH, shuffle=True
        )
    }
    del x
    for workers in (1, 2):
        sequence = H5Sequence(store, batch_size=BATCH, shuffle=True, workers=workers)
        name = f"model.fit(H5Sequence), workers={workers}"
        results[name] = best_epoch(model_fn(), sequence, count=sequence.num_slices, shuffle=False)
    return results


def table(title: str, rows: list[tuple], header: tuple) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    lines = [
        title,
        "| " + " | ".join(str(h).ljust(w) for h, w in zip(header, widths, strict=True)) + " |",
    ]
    lines.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    lines += [
        "| " + " | ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)) + " |"
        for r in rows
    ]
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--gb", type=float, default=0.25, help="GiB of uint8 slices (default: 0.25)"
    )
    parser.add_argument(
        "--png-slices", type=int, default=16384, help="slices written as PNG (default: 16384)"
    )
    parser.add_argument(
        "--repeats", type=int, default=3, help="passes per measurement; the best counts"
    )
    parser.add_argument(
        "--workdir", type=Path, help="where to write the data (default: a temporary folder)"
    )
    return parser


def _variants(out: Path, gb: float) -> dict[tuple[str, str], Path]:
    """The same slices as stores of other dtypes and compressions."""
    variants = {}
    for dtype, compression in (
        ("uint8", "lzf"),
        ("uint8", "gzip"),
        ("float16", "none"),
        ("float32", "none"),
    ):
        path = out / f"store-{dtype}-{compression}.h5"
        write_large_store(path, gb * np.dtype(dtype).itemsize, dtype, compression)
        variants[(dtype, compression)] = path
    return variants


def _reader_rows(readers, images_path: Path, repeats: int) -> list[tuple]:
    """Warm and cold slices/s of each reader against the first (the limit), and the disk."""
    rows = []
    limit = {}
    for name, reader, files in readers:
        measured = {cold: rate(reader, files, cold, repeats) for cold in (False, True)}
        limit = limit or measured
        rows.append(
            (
                name,
                f"{measured[False]:,.0f}",
                f"{measured[False] / limit[False]:.2f}x",
                f"{measured[True]:,.0f}",
                f"{measured[True] / limit[True]:.2f}x",
            )
        )
        print(f"  {name}: warm {measured[False]:,.0f}/s, cold {measured[True]:,.0f}/s", flush=True)
    disk = max(disk_read_rate(images_path) for _ in range(repeats))
    name = "disk, sequential read of the .npy (cold)"
    rows.append((name, "", "", f"{disk:,.0f}", f"{disk / limit[True]:.2f}x"))
    return rows


def _dtype_rows(stores: list[tuple[tuple[str, str], Path]], repeats: int) -> list[tuple]:
    """Shuffled H5Sequence warm and cold, per stored dtype and compression."""
    rows = []
    base = None
    for (dtype, compression), path in stores:
        sequence = H5Sequence(path, batch_size=BATCH, shuffle=True)
        warm_rate = rate(sequence_reader(sequence), [path], False, repeats)
        cold_rate = rate(sequence_reader(sequence), [path], True, repeats)
        base = base or warm_rate
        size = path.stat().st_size / 2**20
        rows.append(
            (
                dtype,
                compression,
                f"{size:,.0f}",
                f"{warm_rate:,.0f}",
                f"{warm_rate / base:.2f}x",
                f"{cold_rate:,.0f}",
            )
        )
    return rows


def _fit_rows(out: Path, store: Path, images_path: Path, labels_path: Path, repeats: int):
    """model.fit's samples/s from each input, for a tiny model and the project's CNN."""
    rows = []
    small = out / "small.h5"  # the CNN is ~1000x slower: 8192 slices are plenty
    write_large_store(small, 8192 * 4096 / 2**30)
    (out / "small").mkdir()
    small_images, small_labels = export_npy(small, out / "small")
    for model_name, model_fn, fit_store, fit_images, fit_labels in (
        ("Flatten + Dense", tiny_model, store, images_path, labels_path),
        ("the project's CNN", project_cnn, small, small_images, small_labels),
    ):
        fit = fit_rates(fit_store, fit_images, fit_labels, repeats, model_fn)
        baseline = fit["model.fit(x, y), x in memory"]
        rows += [
            (model_name, name, f"{value:,.0f}", f"{value / baseline:.2f}x")
            for name, value in fit.items()
        ]
    return rows


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    with tempfile.TemporaryDirectory(dir=args.workdir) as folder:
        out = Path(folder)
        print(f"writing {args.gb} GiB of slices in each format to {out} ...", flush=True)
        store = out / "store.h5"
        num_slices = write_large_store(store, args.gb)
        images_path, labels_path = export_npy(store, out)
        images, labels = np.load(images_path, mmap_mode="r"), np.load(labels_path)
        (out / "tfrecords").mkdir()
        records = export_tfrecords(images, labels, out / "tfrecords")
        png = export_png(images, labels, out / "png", min(args.png_slices, num_slices))
        variants = _variants(out, args.gb)
        readers = [
            (
                "1. np.memmap .npy, contiguous (the limit)",
                memmap_reader(images_path),
                [images_path],
            ),
            (
                "2. H5Sequence, shuffled",
                sequence_reader(H5Sequence(store, batch_size=BATCH, shuffle=True)),
                [store],
            ),
            (
                "2. H5Sequence, unshuffled",
                sequence_reader(H5Sequence(store, batch_size=BATCH)),
                [store],
            ),
            (
                "3. fancy-index PyDataset (h5py)",
                sequence_reader(FancyIndexSequence(store, BATCH)),
                [store],
            ),
            ("4. tf.data TFRecord", tfrecord_reader(records, 64), records),
            (
                f"5. image_dataset_from_directory PNG ({len(list(png.rglob('*.png')))} slices)",
                png_reader(png, 64),
                [png],
            ),
        ]
        rows = _reader_rows(readers, images_path, args.repeats)
        dtype_rows = _dtype_rows([(("uint8", "none"), store), *variants.items()], args.repeats)
        fit_rows = _fit_rows(out, store, images_path, labels_path, args.repeats)
    _print_tables(num_slices, args.repeats, rows, dtype_rows, fit_rows)
    return 0


def _print_tables(num_slices: int, repeats: int, rows, dtype_rows, fit_rows) -> None:
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    print(
        f"{machine_line()}\n{memory:.0f} GiB, "
        f"Python {platform.python_version()}, keras {keras.__version__} "
        f"({keras.backend.backend()}); {num_slices:,} slices 64x64, batches of {BATCH}, "
        f"best of {repeats}"
    )
    print()
    print(
        table(
            "Readers, float32 batches (slices/s):",
            rows,
            ("reader", "warm", "vs (1)", "cold", "vs (1) cold"),
        )
    )
    print()
    print(
        table(
            "H5Sequence, shuffled, by stored dtype and compression:",
            dtype_rows,
            ("dtype", "compression", "MiB", "warm slices/s", "vs uint8", "cold slices/s"),
        )
    )
    print()
    print(
        table(
            "model.fit, one epoch (samples/s):",
            fit_rows,
            ("model", "input", "samples/s", "vs in memory"),
        )
    )


if __name__ == "__main__":
    raise SystemExit(main())
