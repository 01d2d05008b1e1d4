"""The C heap reading and trimming (glibc, as on the project's Debian images)."""

from __future__ import annotations

import asyncio

from hivewire.services.runtime.heaptrim import c_heap, malloc_trim, trim_heap_periodically
from hivewire.services.runtime.metrics import REGISTRY, watch_c_heap

SIZE = 64 * 2**20


def test_the_c_heap_counts_what_python_allocates_through_malloc() -> None:
    before = c_heap()
    assert before is not None, "glibc's mallinfo2 is required (Debian bookworm has it)"
    block = bytearray(SIZE)  # large: malloc'd by CPython, not its small-object allocator
    during = c_heap()
    assert during is not None and during.in_use - before.in_use >= SIZE
    del block
    after = c_heap()
    assert after is not None and during.in_use - after.in_use >= SIZE


def test_malloc_trim_runs() -> None:
    chunks = [bytes(1000) + bytes([i % 256]) for i in range(20_000)]
    del chunks
    assert malloc_trim()


def test_the_gauge_reports_the_c_heap() -> None:
    watch_c_heap()
    in_use = REGISTRY.get_sample_value("hivewire_c_heap_bytes", {"kind": "in_use"})
    free = REGISTRY.get_sample_value("hivewire_c_heap_bytes", {"kind": "free"})
    assert in_use is not None and in_use > 0
    assert free is not None and free >= 0


async def test_trimming_is_off_with_a_zero_interval() -> None:
    async with asyncio.timeout(5):
        await trim_heap_periodically(0)


async def test_trimming_runs_until_cancelled() -> None:
    task = asyncio.create_task(trim_heap_periodically(0.01))
    await asyncio.sleep(0)
    assert not task.done()
    task.cancel()
    try:
        await task
    except asyncio.CancelledError:
        pass
    assert task.cancelled()
