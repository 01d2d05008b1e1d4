"""Retention in the real stores: purge in batches, tombstones, expired keys, file size.

Tests taking ``store`` run on both backends (SQLite and JetStream on a real nats-server).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from hivewire.services.coordinator.jetstream_store import JetStreamTaskStore
from hivewire.services.coordinator.sqlite_store import SqliteTaskStore
from hivewire.services.coordinator.store import EventRow, TaskRow, TaskStore
from tests.helpers import NatsServer

OWNER = "spiffe://hivewire.local/client/alice"


def task(task_id: str, *, state: int, updated_ns: int, key: str = "") -> TaskRow:
    return TaskRow(
        task_id=task_id,
        owner=OWNER,
        capability="echo",
        state=state,
        priority=2,
        created_ns=updated_ns,
        updated_ns=updated_ns,
        deadline_ns=updated_ns + 10,
        idempotency_key=key,
        not_before_ns=0,
        last_sequence=3,
        spec=b"spec" * 50,
        data=b"data" * 100,
    )


def events(task_id: str, count: int = 3) -> list[EventRow]:
    return [EventRow(task_id, i, b"event" * 60) for i in range(1, count + 1)]


@pytest.fixture(params=["sqlite", "jetstream"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[TaskStore]:
    if request.param == "sqlite":
        async with SqliteTaskStore(tmp_path / "coordinator.db") as s:
            yield s
        return
    async with NatsServer(tmp_path / "nats") as server, JetStreamTaskStore(server.url) as js:
        yield js


async def test_purge_deletes_old_finished_tasks_with_their_events_and_leaves_tombstones(
    store: TaskStore,
) -> None:
    rows = [
        task("old-done", state=5, updated_ns=100),
        task("old-failed", state=6, updated_ns=110),
        task("old-running", state=3, updated_ns=100),  # not finished: kept
        task("new-done", state=5, updated_ns=1000),  # finished too recently: kept
    ]
    await store.put(tasks=rows, events=[e for r in rows for e in events(r.task_id)])

    assert await store.purge_finished(500, limit=10, now=2000) == 2

    for gone in ("old-done", "old-failed"):
        assert await store.get_task(gone) is None
        assert await store.events_after(gone, 0) == []
        tomb = await store.tombstone(gone)
        assert tomb is not None and (tomb.owner, tomb.purged_ns) == (OWNER, 2000)
    for kept in ("old-running", "new-done"):
        assert await store.get_task(kept) is not None
        assert len(await store.events_after(kept, 0)) == 3
        assert await store.tombstone(kept) is None
    assert await store.purge_finished(500, limit=10, now=2000) == 0


async def test_purge_takes_at_most_a_batch_oldest_first(store: TaskStore) -> None:
    await store.put(tasks=[task(f"t{i:02}", state=5, updated_ns=i) for i in range(25)])
    assert await store.purge_finished(100, limit=10, now=1) == 10
    assert await store.get_task("t09") is None and await store.get_task("t10") is not None
    assert await store.purge_finished(100, limit=10, now=1) == 10
    assert await store.purge_finished(100, limit=10, now=1) == 5
    assert await store.count_tasks() == 0


async def test_old_tombstones_are_pruned(store: TaskStore) -> None:
    await store.put(tasks=[task("a", state=5, updated_ns=1), task("b", state=5, updated_ns=2)])
    await store.purge_finished(10, limit=1, now=100)
    await store.purge_finished(10, limit=1, now=200)
    assert await store.prune_tombstones(150, limit=10) == 1
    assert await store.tombstone("a") is None
    assert await store.tombstone("b") is not None


async def test_a_released_idempotency_key_can_be_used_again(store: TaskStore) -> None:
    await store.put(tasks=[task("first", state=5, updated_ns=1, key="k")])
    await store.release_idempotency_key(OWNER, "k", "first")
    assert await store.find_by_idempotency_key(OWNER, "k") is None
    await store.put(tasks=[task("second", state=1, updated_ns=2, key="k")])
    found = await store.find_by_idempotency_key(OWNER, "k")
    assert found is not None and found.task_id == "second"
    first = await store.get_task("first")
    assert first is not None and first.idempotency_key == ""


async def test_the_file_stops_growing_when_the_purge_keeps_up(tmp_path: Path) -> None:
    """Steady state: as many tasks finish as are purged; freed pages are reused."""
    path = tmp_path / "steady.db"
    sizes = []
    async with SqliteTaskStore(path) as store:
        for cycle in range(12):
            batch = [task(f"c{cycle}-{i}", state=5, updated_ns=cycle) for i in range(400)]
            await store.put(tasks=batch, events=[e for r in batch for e in events(r.task_id, 8)])
            # Keep only the latest cycle: purge everything finished before it.
            while await store.purge_finished(cycle, limit=150, now=cycle) == 150:
                pass
            await store.prune_tombstones(cycle, limit=1000)
            await store.flush()
            sizes.append(path.stat().st_size)
    # The first cycle grows the file to the working set (one cycle of tasks); the next
    # eleven reuse the freed pages: without the purge the file would be 12 times larger.
    # (B-tree pages split by random ids settle within a few per cent.)
    assert sizes[-1] < sizes[1] * 1.05, sizes
