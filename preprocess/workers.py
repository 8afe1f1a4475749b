"""The pool of worker processes that compute scans: how they start (fork, or a forkserver
beside threaded libraries), that they die with the run, and their memory tuning.
"""

from __future__ import annotations

import concurrent.futures as futures
import contextlib
import ctypes
import itertools
import multiprocessing
import os
import signal
import sys
import threading
import time
import warnings

import threadpoolctl

from preprocess.discover import Scan
from preprocess.scan import process_or_reason
from preprocess.settings import RunOptions, Settings


def processed(scans: list[Scan], settings: Settings, options: RunOptions):
    """``(scan, result)`` for every scan as it finishes: the result of :func:`process_scan`,
    or the one-line reason it was left out. At most 2 x workers scans are in flight.

    Workers are forked from this process (:func:`start_method`); where that is not safe,
    they come from a server that starts a Python and imports this package (~0.4 s), and
    this process computes scans itself while it starts.

    Raises:
        BrokenProcessPool: a worker process died.
    """
    workers, timeout = options.workers, options.scan_timeout
    if workers <= 1:
        for scan in scans:
            yield scan, _here(scan, settings, timeout)
        return
    method = start_method()
    context = multiprocessing.get_context(method)
    if method == "forkserver":
        context.set_forkserver_preload(["preprocess.scan"])
    queue = iter(scans)
    with futures.ProcessPoolExecutor(
        workers, mp_context=context, initializer=_worker_start, initargs=(os.getpid(),)
    ) as pool:
        pending = {}
        try:
            if method == "forkserver":
                yield from _start_pool(pool, queue, pending, 2 * workers, settings, timeout)
            while True:
                while len(pending) < 2 * workers and (scan := next(queue, None)) is not None:
                    with _forking_quietly():  # the first submit forks every worker
                        pending[pool.submit(process_or_reason, scan, settings, timeout)] = scan
                if not pending:
                    break
                finished, _ = futures.wait(pending, return_when=futures.FIRST_COMPLETED)
                for future in finished:
                    yield pending.pop(future), future.result()
        except BaseException:  # also the consumer stopping (GeneratorExit)
            for future in list(pending):  # the start-up thread may still be adding
                future.cancel()
            raise


# Libraries whose own threads make a forked copy of this process unsafe (a child can
# deadlock on a lock one of them held at the fork): where one is loaded (predict, a
# notebook that trained a model), workers come from a forkserver instead.
NOT_FORK_SAFE = ("tensorflow", "jax", "torch")


def start_method() -> str:
    """``fork`` on Linux when no library of :data:`NOT_FORK_SAFE` is loaded, else
    ``forkserver``.

    A forked worker starts in milliseconds with everything this process imported; the
    server costs a second Python start-up and the same imports (0.4-0.6 s of 4-5 s on 48
    T1-sized scans). Forked workers die with this process (``PR_SET_PDEATHSIG``) and close
    their copy of the run's lock (:class:`~preprocess.writer.Partial`).
    """
    if sys.platform.startswith("linux") and not any(name in sys.modules for name in NOT_FORK_SAFE):
        return "fork"
    return "forkserver"


@contextlib.contextmanager
def _forking_quietly():
    """Python 3.12+ warns at every fork of a process with several threads (numpy's BLAS
    has its own): this fork runs only this package's code in the child, so the warning
    says nothing here."""
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", r".*use of fork\(\) may lead to deadlocks", DeprecationWarning
        )
        yield


def _start_pool(pool, queue, pending: dict, count: int, settings, timeout: float):
    """Hand the pool its first ``count`` scans (into ``pending``: future -> scan) and
    compute more here while it starts, yielding ``(scan, result)`` for those.

    The first ``submit`` waits for the workers' server to start a Python and import this
    package (~0.4 s); a helper thread waits for it instead, and this process computes scans
    (one BLAS thread, like a worker) until the pool has them.
    """
    first = list(itertools.islice(queue, count))
    failed = []

    def submit() -> None:
        try:
            for scan in first:
                pending[pool.submit(process_or_reason, scan, settings, timeout)] = scan
        except BaseException as exc:  # a broken pool: raised below, in this thread
            failed.append(exc)

    starter = threading.Thread(target=submit, name="start-workers", daemon=True)
    starter.start()
    while starter.is_alive() and (scan := next(queue, None)) is not None:
        yield scan, _here(scan, settings, timeout)
    starter.join()
    if failed:
        raise failed[0]


def _here(scan: Scan, settings: Settings, timeout: float):
    """A scan processed in this process, with one BLAS thread as in a worker: a scan's
    bytes must not depend on where it was computed (``--workers``)."""
    with threadpoolctl.threadpool_limits(1, user_api="blas"):
        return process_or_reason(scan, settings, timeout)


PR_SET_PDEATHSIG = 1  # prctl(2): the signal a process gets when its parent dies
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # mallopt(3)


def keep_freed_memory() -> None:
    """Have glibc's malloc keep freed memory for the next scan rather than return it.

    A scan allocates and frees tens of MB (the un-gzipped file, masks, slices). By default
    blocks from 128 kB (rising to the largest one freed) are mapped and unmapped each
    time and the heap's free top goes back to the kernel, so every scan faults its memory
    in again. Measured on 48 T1-sized scans, two workers: 420 k page faults and 1.1 s of
    system time without this, 72 k and 0.4 s with it. Blocks over 32 MB are still mapped;
    other C libraries (no ``mallopt``) are left as they are. Called in the workers and by
    ``python -m preprocess`` itself, never on a process that only imports this package.
    """
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except AttributeError:
        return
    mallopt(M_MMAP_THRESHOLD, 32 << 20)
    mallopt(M_TRIM_THRESHOLD, 256 << 20)


def _worker_start(parent: int) -> None:
    """A worker's first step. Workers already fill the cores: one BLAS thread each, or
    their multi-threaded BLAS would fight over them. Ctrl-C reaches the whole process
    group: the run stops its workers itself. A worker dies with the run, even one killed
    by ``kill -9`` (a worker left waiting for work would hold memory for ever): a forked
    one at once, one from a forkserver (whose parent is the server) within a second."""
    threadpoolctl.threadpool_limits(1, user_api="blas")
    keep_freed_memory()
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    if os.getppid() == parent and sys.platform.startswith("linux"):  # forked by the run
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != parent:  # the run died before the line above
            os._exit(1)
    elif os.getppid() != parent:
        threading.Thread(target=_exit_with, args=(parent,), name="watch-run", daemon=True).start()


def _exit_with(parent: int) -> None:
    """End this process once ``parent`` is gone (checked every second)."""
    while True:
        time.sleep(1)
        try:
            os.kill(parent, 0)
        except (ProcessLookupError, PermissionError):  # gone (or its pid another user's)
            os._exit(1)
