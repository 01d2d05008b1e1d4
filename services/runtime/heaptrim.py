"""Give the C heap's free memory back to the system now and then (glibc ``malloc_trim``).

A service's RSS is not only what it holds: glibc keeps memory that was freed inside its
arenas (one per thread that allocates: the event loop, grpc's threads, the workers of
``asyncio.to_thread``) and returns it to the system only when the free space is at the
top of a heap. Under steady load a long-lived object allocated late pins the memory
below it, so the free part of the arenas, and with it RSS, creeps up without anything
being kept (measured in ``docs/performance.md``, Soak). ``malloc_trim(0)`` releases the
free pages of every arena (``madvise(MADV_DONTNEED)``), wherever they are.

:func:`trim_heap_periodically` runs it off the event loop every ``interval`` seconds.
:func:`c_heap` reads what the C heap holds (``mallinfo2``), which the metrics report as
``hivewire_c_heap_bytes``: native memory a library keeps per request shows there, where
Python's heap snapshots cannot see it. On a C library without these functions (musl,
macOS) both do nothing.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import logging
from dataclasses import dataclass
from typing import Any

logger = logging.getLogger(__name__)

__all__ = ["CHeap", "c_heap", "malloc_trim", "trim_heap_periodically"]


class _Mallinfo2(ctypes.Structure):
    """glibc's ``struct mallinfo2`` (glibc 2.33 and later)."""

    _fields_ = [
        (name, ctypes.c_size_t)
        for name in (
            "arena",
            "ordblks",
            "smblks",
            "hblks",
            "hblkhd",
            "usmblks",
            "fsmblks",
            "uordblks",
            "fordblks",
            "keepcost",
        )
    ]


@dataclass(frozen=True)
class CHeap:
    """The C heap of the process, every malloc arena together.

    Attributes:
        in_use: Bytes allocated and not freed (including mmap'd blocks).
        free: Bytes freed but kept by malloc in its arenas.
    """

    in_use: int
    free: int


def _libc_function(name: str) -> Any:
    library = ctypes.util.find_library("c")
    if library is None:
        return None
    try:
        return getattr(ctypes.CDLL(library), name)
    except (OSError, AttributeError):
        return None


_MALLOC_TRIM = _libc_function("malloc_trim")
if _MALLOC_TRIM is not None:
    _MALLOC_TRIM.argtypes = [ctypes.c_size_t]
    _MALLOC_TRIM.restype = ctypes.c_int
_MALLINFO2 = _libc_function("mallinfo2")
if _MALLINFO2 is not None:
    _MALLINFO2.argtypes = []
    _MALLINFO2.restype = _Mallinfo2


def c_heap() -> CHeap | None:
    """What the C heap holds now, or None without glibc's ``mallinfo2``."""
    if _MALLINFO2 is None:
        return None
    info = _MALLINFO2()
    return CHeap(in_use=int(info.uordblks) + int(info.hblkhd), free=int(info.fordblks))


def malloc_trim() -> bool:
    """Return the C heap's free pages to the system; False when there is no glibc.

    Returns:
        Whether the C library has ``malloc_trim`` (then it was called).
    """
    if _MALLOC_TRIM is None:
        return False
    _MALLOC_TRIM(0)
    return True


async def trim_heap_periodically(interval: float) -> None:
    """Call :func:`malloc_trim` in a worker thread every ``interval`` seconds, forever.

    Returns at once when ``interval`` is not positive or the C library has no
    ``malloc_trim``. Cancel the task to stop it.
    """
    if interval <= 0 or _MALLOC_TRIM is None:
        return
    while True:
        await asyncio.sleep(interval)
        await asyncio.to_thread(malloc_trim)
