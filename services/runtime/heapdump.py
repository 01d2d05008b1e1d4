"""Heap snapshots on demand, for finding what a service keeps per request.

When a service runs with ``PYTHONTRACEMALLOC=<frames>`` and ``HIVEWIRE_HEAP_DUMP_DIR``
set, each ``SIGUSR2`` writes a :mod:`tracemalloc` snapshot of the process to
``<dir>/<pid>-<n>.snapshot``. Comparing two snapshots taken minutes apart under
steady load shows which allocation sites grow (``bench/soak.py --heap-profile`` does
exactly that). Without both settings nothing is installed and nothing is traced.
"""

from __future__ import annotations

import asyncio
import gc
import itertools
import logging
import os
import signal
import tracemalloc
from pathlib import Path

logger = logging.getLogger(__name__)

__all__ = ["HEAP_DUMP_DIR_ENV", "install_heap_dump"]

HEAP_DUMP_DIR_ENV = "HIVEWIRE_HEAP_DUMP_DIR"


def install_heap_dump(loop: asyncio.AbstractEventLoop) -> bool:
    """Dump a snapshot on each ``SIGUSR2`` when tracing and a directory are set.

    Returns:
        Whether the handler was installed.
    """
    directory = os.environ.get(HEAP_DUMP_DIR_ENV)
    if not directory or not tracemalloc.is_tracing():
        return False
    target = Path(directory)
    target.mkdir(parents=True, exist_ok=True)
    counter = itertools.count(1)

    def dump() -> None:
        path = target / f"{os.getpid()}-{next(counter)}.snapshot"
        # Garbage in reference cycles is only freed by a full collection: without one,
        # a snapshot counts it as live and two snapshots differ by the GC's timing.
        gc.collect()
        # Everything but this module's own traces (the snapshot is big).
        snapshot = tracemalloc.take_snapshot().filter_traces(
            [tracemalloc.Filter(False, tracemalloc.__file__)]
        )
        partial = path.with_suffix(".partial")
        snapshot.dump(str(partial))
        partial.rename(path)  # readers never see half a snapshot
        logger.warning("heap snapshot written to %s", path)

    loop.add_signal_handler(signal.SIGUSR2, dump)
    return True
