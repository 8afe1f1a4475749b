"""Where preprocessing's worker processes come from: a ``forkserver`` that has imported
``preprocess.pipeline`` once, and forks a worker for each slot of the pool.

Starting that server costs a Python start-up and the pipeline's imports (~0.3 s).
``python -m preprocess`` starts it first thing (:func:`start_early`), so it imports on the
second core while this process imports the same modules; the pool then finds it running.
"""

from __future__ import annotations

import multiprocessing
import multiprocessing.context
from multiprocessing import forkserver

PRELOAD = ["preprocess.pipeline"]  # what every worker needs imported before it forks


def worker_context() -> multiprocessing.context.ForkServerContext:
    """The context the pool's processes are started from."""
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(PRELOAD)
    return context


def start_early() -> None:
    """Start the workers' server now, without waiting for its imports."""
    worker_context()
    forkserver.ensure_running()
