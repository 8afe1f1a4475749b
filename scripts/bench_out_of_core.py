"""Prove "bigger than RAM": train from stores larger than a memory limit, memory flat in store size.

For each store size (GiB of uint8 slices, written by ``make_large_store``), a child process
runs one epoch of ``model.fit`` (Flatten + Dense, so the run is about the data, not the
maths) through ``H5Sequence`` inside a memory cgroup (as root: ``/sys/fs/cgroup/memory``
with cgroup v1, else the v2 hierarchy at ``/sys/fs/cgroup``), and reports its peak resident
memory (RSS, which counts the TensorFlow libraries it maps) and the cgroup's peak anonymous
memory (the process's own allocations). The cgroup's limit counts the page cache too, so a
store larger than the limit is read from disk, not from memory: every file is dropped from
the page cache before each child (what writing the store left there is charged to another
group, and a child would read it from memory). Beside the loader, the same slices as a
contiguous ``np.memmap`` pass converted to float32 under the same limit: the disk's pace
for this data, which the loader is measured against. The children run in turns
(``--repeats``, 3 by default) and the medians count: the first pass over a file this
virtual disk read recently can be twice as fast as the next (its host's cache sits below
the page cache). Each pass's reads of the disk under the stores are counted
(``/proc/diskstats``: how many requests, their mean size, how many a second), beside the
loader as it reads by default (read groups) and with ``read_mib=0`` (a read per chunk): a
disk that limits requests per second sees the difference. For contrast, a child that only
holds the 4 GiB store's slices in memory (as uint8, the most compact form;
``model.fit(x, y)`` wants float32, four times as much) runs inside the same limit.

    sudo python scripts/bench_out_of_core.py --sizes 1 2 4 8 --limit-gb 1.5
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from machine import machine_line

CGROUP_ROOT = Path("/sys/fs/cgroup/memory")  # cgroup v1
CGROUP_V2_ROOT = Path("/sys/fs/cgroup")


def child_epoch(store: str, batch_size: int, workers: int) -> None:
    """One epoch of model.fit through H5Sequence; prints a JSON line of what it measured."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import keras

    from loader import H5Sequence

    sequence = H5Sequence(store, batch_size=batch_size, shuffle=True, workers=workers)
    model = keras.Sequential(
        [
            keras.Input((64, 64, 1)),
            keras.layers.Flatten(),
            keras.layers.Dense(1, activation="sigmoid"),
        ]
    )
    model.compile("adam", "binary_crossentropy")
    started = time.perf_counter()
    model.fit(sequence, epochs=1, verbose=0, shuffle=False)
    seconds = time.perf_counter() - started
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"slices": sequence.num_slices, "seconds": seconds, "rss_peak": peak}))


def child_read(
    store: str, batch_size: int, output: str = "float32", read_mib: float | None = None
) -> None:
    """One shuffled, checked epoch through H5Sequence alone, no model: what the loader
    delivers from this disk under the limit; prints a JSON line like :func:`child_epoch`.
    ``read_mib`` None is the loader's default."""
    from loader import H5Sequence

    chosen = {} if read_mib is None else {"read_mib": read_mib}
    sequence = H5Sequence(store, batch_size=batch_size, shuffle=True, output=output, **chosen)
    started = time.perf_counter()
    for index in range(len(sequence)):
        sequence[index]
    seconds = time.perf_counter() - started
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"slices": sequence.num_slices, "seconds": seconds, "rss_peak": peak}))


def child_memmap(images: str, batch_size: int) -> None:
    """The same slices as a .npy read contiguously through ``np.memmap`` and converted to
    float32 batch by batch (the limit the loader is compared with, under the same limit)."""
    import numpy as np

    slices = np.load(images, mmap_mode="r")
    started = time.perf_counter()
    for start in range(0, len(slices), batch_size):
        block = slices[start : start + batch_size]
        x = np.empty((*block.shape, 1), np.float32)
        np.multiply(block, np.float32(1 / 255), out=x[..., 0], casting="unsafe")
    seconds = time.perf_counter() - started
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"slices": len(slices), "seconds": seconds, "rss_peak": peak}))


def child_in_memory(num_slices: int) -> None:
    """Hold the slices in memory as compactly as they can be: their uint8 bytes.

    (``model.fit(x, y)`` would want float32, four times as much.)
    """
    import numpy as np

    x = np.empty((num_slices, 64, 64), dtype=np.uint8)
    x.fill(128)
    print(json.dumps({"bytes": x.nbytes}))


class MemoryCgroup:
    """A memory cgroup with a limit; children join it before they exec. cgroup v1's memory
    controller (``/sys/fs/cgroup/memory``) where the machine has one, else the unified v2
    hierarchy (``/sys/fs/cgroup``, where most machines of today have their controllers)."""

    def __init__(self, limit_bytes: int):
        self.limit = limit_bytes
        self.version = 1 if CGROUP_ROOT.is_dir() else 2
        root = CGROUP_ROOT if self.version == 1 else CGROUP_V2_ROOT
        self.path = root / f"slicestore-bench-{os.getpid()}"
        if self.version == 2:
            (root / "cgroup.subtree_control").write_text("+memory")
        self._create()

    @staticmethod
    def available() -> bool:
        """Root, and a memory controller in v1 or in the v2 hierarchy."""
        if os.geteuid() != 0:
            return False
        if CGROUP_ROOT.is_dir():
            return True
        with contextlib.suppress(OSError):
            return "memory" in (CGROUP_V2_ROOT / "cgroup.controllers").read_text().split()
        return False

    def _create(self) -> None:
        self.path.mkdir()
        if self.version == 1:
            limits = ("memory.limit_in_bytes", "memory.memsw.limit_in_bytes")
        else:
            limits = ("memory.max", "memory.swap.max")
        (self.path / limits[0]).write_text(str(self.limit))
        swap = self.path / limits[1]
        if swap.exists():
            swap.write_text(str(self.limit) if self.version == 1 else "0")

    def join(self) -> None:  # runs in the child, before exec
        (self.path / "cgroup.procs").write_text(str(os.getpid()))

    def reset(self) -> None:
        """Peak back to zero: v1 takes a write; v2's memory.peak cannot be reset on older
        kernels (and on newer ones only for the file handle that writes it), so the empty
        group is made anew."""
        if self.version == 1:
            (self.path / "memory.max_usage_in_bytes").write_text("0")
        else:
            self.remove()
            self._create()

    @property
    def peak(self) -> int:
        """Peak usage, page cache included (the kernel reclaims it at the limit)."""
        name = "memory.max_usage_in_bytes" if self.version == 1 else "memory.peak"
        return int((self.path / name).read_text())

    @property
    def anonymous(self) -> int:
        """Anonymous memory now (the processes' own, no page cache)."""
        wanted = "total_rss" if self.version == 1 else "anon"
        for line in (self.path / "memory.stat").read_text().splitlines():
            name, value = line.split()
            if name == wanted:
                return int(value)
        return 0

    def remove(self) -> None:
        self.path.rmdir()


def run_child(arguments: list[str], cgroup: MemoryCgroup | None) -> tuple[int, dict | None, int]:
    """Run this script as a child in the cgroup.

    Returns:
        Its exit status, its JSON line, and the cgroup's peak anonymous memory, sampled
        every 20 ms (0 without a cgroup).
    """
    command = [sys.executable, __file__, *arguments]
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        child = subprocess.Popen(
            command, stdout=out, stderr=err, text=True, preexec_fn=cgroup.join if cgroup else None
        )
        anonymous = 0
        while child.poll() is None:
            anonymous = max(anonymous, cgroup.anonymous if cgroup else 0)
            time.sleep(0.02)
        out.seek(0)
        err.seek(0)
        lines = [line for line in out.read().splitlines() if line.startswith("{")]
        if child.returncode not in (0, -9):
            print(err.read()[-3000:], file=sys.stderr)
    return child.returncode, json.loads(lines[-1]) if lines else None, anonymous


def block_device(path: str | os.PathLike) -> str | None:
    """The block device holding ``path``, as ``/proc/diskstats`` names it; None where there
    is none (tmpfs, overlay)."""
    stat = os.stat(path)
    uevent = Path(f"/sys/dev/block/{os.major(stat.st_dev)}:{os.minor(stat.st_dev)}/uevent")
    try:
        for line in uevent.read_text().splitlines():
            if line.startswith("DEVNAME="):
                return line.removeprefix("DEVNAME=")
    except OSError:
        pass
    return None


def disk_reads(device: str | None) -> tuple[int, int]:
    """Reads completed and bytes read on ``device`` since boot, by every process
    (``/proc/diskstats``: the requests the disk served, after the kernel merged them)."""
    if device is not None:
        with open("/proc/diskstats") as stats:
            for line in stats:
                fields = line.split()
                if fields[2] == device:
                    return int(fields[3]), int(fields[5]) * 512
    return 0, 0


def disk_line(device: str | None) -> str:
    """The disk the stores are on and how the kernel reads it ahead (a machine's disk is
    as much a part of these numbers as its CPU)."""
    if device is None:
        return "disk: no block device (tmpfs or overlay): no disk reads counted"
    queue = Path(f"/sys/class/block/{device}").resolve()
    queue = queue / "queue" if (queue / "queue").is_dir() else queue.parent / "queue"
    facts = []
    for name, what in (("read_ahead_kb", "read-ahead"), ("max_sectors_kb", "largest request")):
        with contextlib.suppress(OSError, ValueError):
            facts.append(f"{what} {int((queue / name).read_text()):,} KiB")
    return f"disk: {device} ({', '.join(facts) or 'queue settings unreadable'})"


def _mib(value: int | None) -> str:
    return f"{value / 2**20:,.0f}" if value else "-"


def _in_turns(children, gib: float, num_slices: int, args, cgroup) -> list[tuple]:
    """Run every child ``args.repeats`` times, in turns (drift on a shared machine, and the
    virtual disk's own cache below the page cache, hit all of them alike; every file is
    evicted before each child). A row per child: its median speed (lowest-highest), the
    ratio of the medians to the memmap pass's, and the highest peaks of its turns."""
    from bench_loader import evict  # imports Keras: never in a child

    speeds: dict[str, list[float]] = {}
    peaks: dict[str, list[tuple[int, int, int]]] = {}
    reads: dict[str, list[tuple[int, int, float]]] = {}  # count, bytes, seconds per turn
    failed: dict[str, int] = {}
    device = block_device(children[0][1])
    for turn in range(args.repeats):
        for mode, path, what in children:
            evict(*{child[1] for child in children})  # from the disk, not from memory
            if cgroup:
                cgroup.reset()
            options = ["--batch-size", str(args.batch_size), "--workers", str(args.workers)]
            before = disk_reads(device)
            status, measured, anonymous = run_child([mode, str(path), *options], cgroup)
            after = disk_reads(device)
            if status != 0 or not measured:
                failed[what] = status
                continue
            speeds.setdefault(what, []).append(measured["slices"] / measured["seconds"])
            count, size = after[0] - before[0], after[1] - before[1]
            reads.setdefault(what, []).append((count, size, measured["seconds"]))
            group_peak = cgroup.peak if cgroup else 0
            peaks.setdefault(what, []).append((measured["rss_peak"], anonymous, group_peak))
            print(f"  turn {turn + 1}: {what}: {speeds[what][-1]:,.0f}", file=sys.stderr)
    limit = statistics.median(speeds.get(children[0][2], [float("nan")]))
    rows = []
    for _, _, what in children:
        name = f"{gib:g} GiB store, {what}"
        if what in failed:
            rows.append((name, f"{num_slices:,}", f"failed ({failed[what]})", *"------"))
            continue
        median = statistics.median(speeds[what])
        rate = f"{median:,.0f} ({min(speeds[what]):,.0f}-{max(speeds[what]):,.0f})"
        highest = [max(values) for values in zip(*peaks[what], strict=True)]
        peak_text = [_mib(value) for value in highest]
        ratio = f"{median / limit:.2f}x"
        rows.append((name, f"{num_slices:,}", "finished", rate, ratio, *peak_text))
        rows[-1] += (_reads_text(reads[what]) if device else "-",)
    return rows


def _reads_text(turns: list[tuple[int, int, float]]) -> str:
    """The disk reads of the median turn (by count): how many, their mean size, how many a
    second while the child read (the reads of its start-up count too)."""
    count, size, seconds = sorted(turns)[len(turns) // 2]
    if not count:
        return "0 (all from memory)"
    return f"{count:,} x {size / count / 1024:,.0f} KiB, {count / seconds:,.0f}/s"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--sizes", type=float, nargs="+", default=[1, 2, 4, 8], help="store sizes in GiB"
    )
    parser.add_argument(
        "--limit-gb", type=float, default=1.5, help="the cgroup's memory limit (default: 1.5)"
    )
    parser.add_argument(
        "--workdir",
        type=Path,
        default=Path("/tmp/slicestore-out-of-core"),
        help="where the stores go (kept for reruns)",
    )
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument(
        "--repeats", type=int, default=3, help="turns of the children; the median counts"
    )
    parser.add_argument(
        "--workers", type=int, default=1, help="H5Sequence reader threads (default: 1)"
    )
    parser.add_argument("--child-epoch", help=argparse.SUPPRESS)
    parser.add_argument("--child-read", help=argparse.SUPPRESS)
    parser.add_argument("--child-read-stored", help=argparse.SUPPRESS)
    parser.add_argument("--child-read-chunks", help=argparse.SUPPRESS)
    parser.add_argument("--child-memmap", help=argparse.SUPPRESS)
    parser.add_argument(
        "--no-model", action="store_true", help="leave out the model.fit epochs (reads only)"
    )
    parser.add_argument("--child-in-memory", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child_epoch:
        child_epoch(args.child_epoch, args.batch_size, args.workers)
        return 0
    if args.child_read:
        child_read(args.child_read, args.batch_size)
        return 0
    if args.child_read_stored:
        child_read(args.child_read_stored, args.batch_size, "stored")
        return 0
    if args.child_read_chunks:
        child_read(args.child_read_chunks, args.batch_size, read_mib=0)
        return 0
    if args.child_memmap:
        child_memmap(args.child_memmap, args.batch_size)
        return 0
    if args.child_in_memory:
        child_in_memory(args.child_in_memory)
        return 0

    from bench_loader import export_npy
    from make_large_store import write_large_store

    from loader import open_store

    args.workdir.mkdir(parents=True, exist_ok=True)
    limit = int(args.limit_gb * 2**30)
    cgroup = None
    why = "no memory cgroup (v1 or v2) as root"
    if MemoryCgroup.available():
        try:
            cgroup = MemoryCgroup(limit)
        except OSError as error:  # e.g. v2 inside a container whose own group holds processes
            why = f"no memory cgroup could be made ({error})"
    if cgroup is None:
        print(f"{why}: peaks are measured without a limit", file=sys.stderr)
    rows = []
    try:
        for gib in args.sizes:
            store = args.workdir / f"store-{gib:g}GiB.h5"
            if not store.exists():
                print(f"writing {store} ...", file=sys.stderr, flush=True)
                write_large_store(store, gib)
            images = args.workdir / f"store-{gib:g}GiB" / "images.npy"
            if not images.exists():
                images.parent.mkdir(exist_ok=True)
                export_npy(store, images.parent)
            with open_store(store) as opened:
                num_slices = opened.num_slices
            children = [
                ("--child-memmap", images, "np.memmap .npy, contiguous, to float32 (the limit)"),
                ("--child-read", store, "H5Sequence alone, shuffled, checked, float32"),
                ("--child-read-stored", store, 'H5Sequence alone, output="stored" (uint8)'),
                (
                    "--child-read-chunks",
                    store,
                    "H5Sequence alone, float32, read_mib=0 (a read per chunk)",
                ),
            ]
            if not args.no_model:
                children.append(("--child-epoch", store, "one epoch of model.fit(H5Sequence)"))
            rows += _in_turns(children, gib, num_slices, args, cgroup)
        biggest = 4 if 4 in args.sizes else max(args.sizes)
        num_slices = int(biggest * 2**30 // 4096)
        if cgroup:
            cgroup.reset()
        status, _, anonymous = run_child(["--child-in-memory", str(num_slices)], cgroup)
        outcome = (
            "finished"
            if status == 0
            else ("killed by the OOM killer" if status == -9 else f"failed ({status})")
        )
        name = f"the {biggest:g} GiB of slices held in memory (uint8; float32 is 4x)"
        peak = _mib(cgroup.peak if cgroup else None)
        rows.append((name, f"{num_slices:,}", outcome, "-", "-", "-", _mib(anonymous), peak, "-"))
    finally:
        if cgroup:
            cgroup.remove()

    limit_text = (
        f"{args.limit_gb:g} GiB (page cache included; cgroup v{cgroup.version})"
        if cgroup
        else "none"
    )
    print(f"{machine_line()}\ncgroup memory limit: {limit_text}; {args.repeats} turns")
    print(disk_line(block_device(args.workdir)))
    print()
    print(
        "| run | slices | outcome | slices/s, median (lowest-highest) | vs memmap | peak RSS MiB "
        "| peak anonymous MiB | cgroup peak MiB (with page cache) | disk reads (median turn) |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
