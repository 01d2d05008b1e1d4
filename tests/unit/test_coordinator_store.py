"""The coordinator's SQLite store: durability, ordering, queries, batching."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

import pytest

from hivewire.services.coordinator.sqlite_store import SqliteTaskStore
from hivewire.services.coordinator.store import (
    EventRow,
    StoreError,
    TaskQuery,
    TaskRow,
    TaskStore,
)


def row(
    task_id: str,
    *,
    owner: str = "spiffe://hivewire.local/client/alice",
    capability: str = "echo",
    state: int = 1,
    created_ns: int = 1,
    key: str = "",
    data: bytes = b"d",
    spec: bytes = b"spec",
    last_sequence: int = 0,
) -> TaskRow:
    return TaskRow(
        task_id=task_id,
        owner=owner,
        capability=capability,
        state=state,
        priority=2,
        created_ns=created_ns,
        updated_ns=created_ns,
        deadline_ns=created_ns + 10,
        idempotency_key=key,
        not_before_ns=0,
        last_sequence=last_sequence,
        spec=spec,
        data=data,
    )


@pytest.fixture
async def store(tmp_path: Path) -> TaskStore:
    async with SqliteTaskStore(tmp_path / "db" / "coordinator.db") as s:
        yield s  # type: ignore[misc]


async def test_written_rows_survive_a_reopen(tmp_path: Path) -> None:
    path = tmp_path / "c.db"
    async with SqliteTaskStore(path) as store:
        await store.put(
            tasks=[row("t1", last_sequence=2)],
            events=[EventRow("t1", 1, b"e1"), EventRow("t1", 2, b"e2")],
        )
    async with SqliteTaskStore(path) as store:
        stored = await store.get_task("t1")
        assert stored is not None and stored.data == b"d" and stored.spec == b"spec"
        assert [e.data for e in await store.events_after("t1", 0)] == [b"e1", b"e2"]
        assert await store.last_sequence("t1") == 2


async def test_update_keeps_the_spec_and_changes_the_state(store: TaskStore) -> None:
    await store.put(tasks=[row("t1", spec=b"original")])
    await store.put(tasks=[row("t1", state=5, spec=b"ignored", data=b"new")])
    stored = await store.get_task("t1")
    assert stored is not None
    assert (stored.state, stored.spec, stored.data) == (5, b"original", b"new")


async def test_a_read_sees_every_write_queued_before_it(store: TaskStore) -> None:
    # Writes are not awaited: the read must still see all of them (one queue, in order).
    for i in range(300):
        store.put(tasks=[row(f"t{i}", created_ns=i)], events=[EventRow(f"t{i}", 1, b"x")])
    assert await store.count_tasks() == 300
    assert await store.last_sequence("t299") == 1


async def test_events_after_respects_bounds_and_limit(store: TaskStore) -> None:
    await store.put(
        tasks=[row("t1")], events=[EventRow("t1", n, str(n).encode()) for n in range(1, 11)]
    )
    assert [e.sequence for e in await store.events_after("t1", 3, until=6)] == [4, 5, 6]
    assert [e.sequence for e in await store.events_after("t1", 8)] == [9, 10]
    assert [e.sequence for e in await store.events_after("t1", 0, limit=2)] == [1, 2]
    assert await store.events_after("other", 0) == []


async def test_idempotency_key_is_unique_per_owner(store: TaskStore) -> None:
    await store.put(tasks=[row("t1", key="k", owner="a")])
    await store.put(tasks=[row("t2", key="k", owner="b")])
    found = await store.find_by_idempotency_key("a", "k")
    assert found is not None and found.task_id == "t1"
    assert await store.find_by_idempotency_key("a", "other") is None
    # A second task with the same owner and key is refused, and only that write fails.
    bad = store.put(tasks=[row("t3", key="k", owner="a")])
    good = store.put(tasks=[row("t4")])
    with pytest.raises(StoreError):
        await bad
    await good
    assert await store.get_task("t3") is None
    assert await store.get_task("t4") is not None


async def test_active_tasks_excludes_terminal_states(store: TaskStore) -> None:
    for i, state in enumerate([1, 2, 3, 4, 5, 6, 7, 8]):
        store.put(tasks=[row(f"t{state}", state=state, created_ns=i)])
    active = await store.active_tasks()
    assert [r.task_id for r in active] == ["t1", "t2", "t3", "t4"]


async def test_list_tasks_filters_and_pages_newest_first(store: TaskStore) -> None:
    for i in range(7):
        store.put(
            tasks=[
                row(
                    f"t{i}",
                    created_ns=100 + i,
                    owner="alice" if i % 2 == 0 else "bob",
                    capability="echo" if i < 5 else "sum",
                    state=5 if i == 0 else 1,
                )
            ]
        )
    page = await store.list_tasks(TaskQuery(limit=3))
    assert [r.task_id for r in page] == ["t6", "t5", "t4"]
    nxt = await store.list_tasks(TaskQuery(limit=3, before=(page[-1].created_ns, page[-1].task_id)))
    assert [r.task_id for r in nxt] == ["t3", "t2", "t1"]
    mine = await store.list_tasks(TaskQuery(owner="alice"))
    assert [r.task_id for r in mine] == ["t6", "t4", "t2", "t0"]
    summing = await store.list_tasks(TaskQuery(capability="sum"))
    assert [r.task_id for r in summing] == ["t6", "t5"]
    done = await store.list_tasks(TaskQuery(states=(5,)))
    assert [r.task_id for r in done] == ["t0"]


async def test_same_creation_time_is_ordered_by_id(store: TaskStore) -> None:
    store.put(tasks=[row("a", created_ns=5), row("b", created_ns=5), row("c", created_ns=5)])
    first = await store.list_tasks(TaskQuery(limit=2))
    rest = await store.list_tasks(TaskQuery(before=(5, first[-1].task_id)))
    assert [r.task_id for r in first + rest] == ["c", "b", "a"]


async def test_commit_futures_resolve_in_order(store: TaskStore) -> None:
    order: list[int] = []
    futures = []
    for i in range(50):
        fut = store.put(events=[EventRow("t", i + 1, b"")])
        fut.add_done_callback(lambda _f, i=i: order.append(i))
        futures.append(fut)
    await asyncio.gather(*futures)
    assert order == list(range(50))


async def test_database_in_wal_mode(tmp_path: Path) -> None:
    path = tmp_path / "c.db"
    async with SqliteTaskStore(path) as store:
        await store.put(tasks=[row("t1")])
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


async def test_newer_schema_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "c.db"
    with sqlite3.connect(path) as conn:
        conn.execute("PRAGMA user_version=99")
    with pytest.raises(StoreError, match="schema version 99"):
        await SqliteTaskStore(path).open()


async def test_closed_store_refuses_work(tmp_path: Path) -> None:
    store = SqliteTaskStore(tmp_path / "c.db")
    await store.open()
    await store.close()
    with pytest.raises(StoreError):
        store.put(tasks=[row("t1")])
    with pytest.raises(StoreError):
        await store.get_task("t1")


async def test_memory_database(tmp_path: Path) -> None:
    async with SqliteTaskStore(":memory:") as store:
        await store.put(tasks=[row("t1")])
        assert await store.get_task("t1") is not None
