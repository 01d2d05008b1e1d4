"""The coordinator's store contract, run against both backends: SQLite and JetStream.

Every test taking the ``store`` fixture runs twice: on the embedded SQLite store and on
the JetStream store against a real nats-server. The few tests at the end are about one
backend's own mechanics (SQLite's WAL and schema version).
"""

from __future__ import annotations

import asyncio
import dataclasses
import sqlite3
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import nats
import pytest

from hivewire.services.coordinator.jetstream_store import JetStreamTaskStore, list_keys
from hivewire.services.coordinator.sqlite_store import SqliteTaskStore
from hivewire.services.coordinator.store import (
    EventRow,
    ProjectRow,
    StoreError,
    TaskQuery,
    TaskRow,
    TaskStore,
)
from tests.helpers import NatsServer


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


StoreFactory = Callable[[], SqliteTaskStore | JetStreamTaskStore]


@pytest.fixture(params=["sqlite", "jetstream"])
async def open_store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[StoreFactory]:
    """Makes a store of one backend, on the same data each time (to test a reopen)."""
    if request.param == "sqlite":
        yield lambda: SqliteTaskStore(tmp_path / "db" / "coordinator.db")
        return
    async with NatsServer(tmp_path / "nats") as server:
        yield lambda: JetStreamTaskStore(server.url)


@pytest.fixture
async def store(open_store: StoreFactory) -> AsyncIterator[TaskStore]:
    async with open_store() as s:
        yield s


async def test_written_rows_survive_a_reopen(open_store: StoreFactory) -> None:
    async with open_store() as store:
        await store.put(
            tasks=[row("t1", last_sequence=2)],
            events=[EventRow("t1", 1, b"e1"), EventRow("t1", 2, b"e2")],
        )
    async with open_store() as store:
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


async def test_children_and_parent_and_project_filters(store: TaskStore) -> None:
    plan = TaskRow(**{**row("plan", created_ns=1).__dict__, "project_id": "p1"})
    steps = [
        TaskRow(
            **{
                **row(f"s{i}", created_ns=10 + i).__dict__,
                "parent_task_id": "plan",
                "project_id": "p1",
            }
        )
        for i in range(3)
    ]
    other = row("other", created_ns=5)
    store.put(tasks=[plan, *steps, other])
    assert [r.task_id for r in await store.children("plan")] == ["s0", "s1", "s2"]
    assert await store.children("other") == []
    by_parent = await store.list_tasks(TaskQuery(parent_task_id="plan"))
    assert [r.task_id for r in by_parent] == ["s2", "s1", "s0"]
    by_project = await store.list_tasks(TaskQuery(project_id="p1"))
    assert {r.task_id for r in by_project} == {"plan", "s0", "s1", "s2"}
    summary = await store.project_summary("p1")
    assert summary.tasks_by_state == {1: 4}
    # Usage rolls up into each tree's root: only roots are returned.
    assert [r.task_id for r in summary.rows] == ["plan"]


async def test_projects_are_stored_listed_and_unique(store: TaskStore) -> None:
    for i, owner in enumerate(["alice", "bob", "alice"]):
        await store.put_project(ProjectRow(f"p{i}", owner, 100 + i, f"data{i}".encode()))
    got = await store.get_project("p1")
    assert got == ProjectRow("p1", "bob", 101, b"data1")
    assert await store.get_project("nope") is None
    mine = await store.list_projects(owner="alice", before=None, limit=10)
    assert [p.project_id for p in mine] == ["p2", "p0"]
    every = await store.list_projects(owner="", before=(102, "p2"), limit=1)
    assert [p.project_id for p in every] == ["p1"]
    with pytest.raises(StoreError):
        await store.put_project(ProjectRow("p1", "eve", 1, b""))


async def test_a_closed_store_refuses_work(store: TaskStore) -> None:
    await store.__aexit__(None, None, None)
    with pytest.raises(StoreError):
        store.put(tasks=[row("t1")])
    with pytest.raises(StoreError):
        await store.get_task("t1")


async def test_jetstream_updates_are_compare_and_set(tmp_path: Path) -> None:
    async with NatsServer(tmp_path / "nats") as server:
        async with (
            JetStreamTaskStore(server.url) as first,
            JetStreamTaskStore(server.url) as second,
        ):
            await first.put(tasks=[row("t1")])
            # The other store reads it (and its revision), then the first one moves on.
            assert (await second.get_task("t1")) is not None
            await first.put(tasks=[row("t1", state=2)])
            # A write based on a stale revision is refused, not silently applied.
            with pytest.raises(StoreError, match="changed by another writer"):
                await second.put(tasks=[row("t1", state=3)])
            stored = await first.get_task("t1")
            assert stored is not None and stored.state == 2
            # A re-sent event (same task and sequence) is stored once.
            await first.put(events=[EventRow("t1", 1, b"a")])
            await second.put(events=[EventRow("t1", 1, b"a")])
            assert [e.sequence for e in await first.events_after("t1", 0)] == [1]


async def test_jetstream_key_listings_see_every_live_key_written_before_them(
    tmp_path: Path,
) -> None:
    """A listing never ends early (purge and the cluster read every key through it).

    nats-py's ``keys()`` and watch could report "no more keys" while values were still
    on their way, under load: the JetStream purge then found no finished task at all.
    """
    async with NatsServer(tmp_path / "nats") as server:
        client = await nats.connect(server.url)
        try:
            js = client.jetstream()
            bucket = await js.create_key_value(bucket="LISTING", history=1)
            assert await list_keys(bucket) == []
            for i in range(40):
                await bucket.put(f"a.k{i:02}", b"v" * 200)
            await bucket.put("b.other", b"v")
            await bucket.delete("a.k00")
            await bucket.purge("a.k01")
            live = {f"a.k{i:02}" for i in range(2, 40)}
            for _ in range(100):
                assert set(await list_keys(bucket, "a.>")) == live
            assert set(await list_keys(bucket)) == live | {"b.other"}
            # Each listing removes its consumer: none is left on the bucket's stream.
            assert (await js.stream_info("KV_LISTING")).state.consumer_count == 0
        finally:
            await client.close()


def owned(task_id: str, coordinator: str, **fields: Any) -> TaskRow:
    return dataclasses.replace(row(task_id, **fields), coordinator=coordinator)


async def test_jetstream_ownership_is_claimed_once_and_fences_the_loser(tmp_path: Path) -> None:
    async with NatsServer(tmp_path / "nats") as server:
        async with (
            JetStreamTaskStore(server.url) as a,
            JetStreamTaskStore(server.url) as b,
            JetStreamTaskStore(server.url) as c,
        ):
            a.instance, b.instance, c.instance = "ca", "cb", "cc"
            fenced: list[str] = []
            a.on_fenced = fenced.append
            await a.put(tasks=[owned("t1", "ca"), owned("t2", "ca"), owned("t3", "cb")])
            await a.put(events=[EventRow("t1", 1, b"e1")])
            assert await b.active_owners() == {"ca": ["t1", "t2"], "cb": ["t3"]}
            assert [r.task_id for r in await b.owned_tasks("ca")] == ["t1", "t2"]
            # Two coordinators race for a dead one's task: one claim wins.
            won = await asyncio.gather(b.claim("t1", "cb", {"ca"}), c.claim("t1", "cc", {"ca"}))
            winners = [r for r in won if r is not None]
            assert len(winners) == 1
            winner, owner = (b, "cb") if won[0] is not None else (c, "cc")
            assert (await a.active_owners())["ca"] == ["t2"]
            # The winner goes on from the journal as the loser left it.
            assert await winner.last_sequence("t1") == 1
            await winner.put(tasks=[owned("t1", owner, state=2)], events=[EventRow("t1", 2, b"e2")])
            # The old owner's next write is refused and reported; it lets the task go,
            # and its later writes of it are dropped (the journal keeps the winner's).
            with pytest.raises(StoreError):
                await a.put(tasks=[owned("t1", "ca", state=3)])
            assert fenced == ["t1"]
            a.forget("t1")
            with pytest.raises(StoreError, match="let go"):
                await a.put(tasks=[owned("t1", "ca", state=5)], events=[EventRow("t1", 3, b"x")])
            stored = await b.get_task("t1")
            assert stored is not None and (stored.coordinator, stored.state) == (owner, 2)
            assert [e.data for e in await b.events_after("t1", 0)] == [b"e1", b"e2"]
            # A finished task leaves the index; a task already taken cannot be claimed.
            await winner.put(tasks=[owned("t1", owner, state=5)])
            assert "t1" not in (await a.active_owners()).get(owner, [])
            assert await c.claim("t3", "cc", {"ca"}) is None


async def test_jetstream_indexes_the_unfinished_tasks_of_a_store_from_before_the_index(
    tmp_path: Path,
) -> None:
    async with NatsServer(tmp_path / "nats") as server:
        async with JetStreamTaskStore(server.url) as store:
            await store.put(tasks=[row("old-1"), row("old-2", state=5)])
            # As a store written before the index existed: no index bucket.
            await store.connection.jetstream().delete_key_value("HIVEWIRE_ACTIVE")
        async with JetStreamTaskStore(server.url) as store:
            assert [r.task_id for r in await store.active_tasks()] == ["old-1"]


# -- the event outbox (coordinator/outbox.py) ---------------------------------------------


async def test_outbox_entries_commit_with_their_events_in_order(
    open_store: StoreFactory,
) -> None:
    async with open_store() as store:
        store.put(
            tasks=[row("t1")],
            events=[EventRow("t1", 1, b"e1", outbox=b"o1"), EventRow("t1", 2, b"e2")],
        )
        await store.put(events=[EventRow("t2", 1, b"x", outbox=b"o2")])
        items = await store.outbox_next(0, limit=10)
        # Events without an entry have none; the order is commit order.
        assert [i.entry for i in items] == [b"o1", b"o2"]
        assert items[0].position < items[1].position
        assert await store.outbox_next(items[0].position, limit=10) == items[1:]
        await store.outbox_done(items[0].position)
    # A restarted relay starts after what was recorded published, not before.
    async with open_store() as store:
        again = await store.outbox_next(0, limit=10)
        assert [i.entry for i in again] == [b"o2"]
        # It waits for the next commit when everything was handed out.
        waiting = asyncio.ensure_future(store.outbox_next(again[-1].position, limit=10))
        await store.put(events=[EventRow("t3", 1, b"y", outbox=b"o3")])
        assert [i.entry for i in await asyncio.wait_for(waiting, 30)] == [b"o3"]
        await store.outbox_done(again[-1].position)
    async with open_store() as store:
        assert [i.entry for i in await store.outbox_next(0, limit=10)] == [b"o3"]


@pytest.mark.parametrize(("bound", "value"), [("MAX", 5), ("BYTES", 14)])
async def test_sqlite_outbox_hands_out_every_entry_once_in_order_from_memory_or_table(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, bound: str, value: int
) -> None:
    """Entries committed since the store opened come from memory; a relay far behind, or
    one starting over, reads the table: either way every entry, in order, no gaps.
    """
    # What the memory holds is bounded in entries and in bytes: either bound, made small.
    monkeypatch.setattr(f"hivewire.services.coordinator.sqlite_store._OUTBOX_RECENT_{bound}", value)
    path = tmp_path / "c.db"
    async with SqliteTaskStore(path) as store:
        await store.put(events=[EventRow("t0", 1, b"x", outbox=b"o0")])
        await store.outbox_done((await store.outbox_next(0, limit=10))[-1].position)
    async with SqliteTaskStore(path) as store:
        for i in range(1, 4):
            await store.put(events=[EventRow("t1", i, b"x", outbox=f"o{i}".encode())])
        seen = await store.outbox_next(0, limit=2)
        assert [i.entry for i in seen] == [b"o1", b"o2"]
        # More than the memory holds while the relay is behind: the rest from the table.
        for i in range(4, 12):
            await store.put(events=[EventRow("t1", i, b"x", outbox=f"o{i}".encode())])
        after = seen[-1].position
        while True:
            items = await store.outbox_next(after, limit=3)
            assert items[0].position == after + 1
            seen.extend(items)
            after = items[-1].position
            if items[-1].entry == b"o11":
                break
        assert [i.entry for i in seen] == [f"o{i}".encode() for i in range(1, 12)]
        assert [i.position for i in seen] == list(range(seen[0].position, after + 1))
        # Starting over (a new relay in this process): everything not marked published.
        await store.outbox_done(seen[4].position)
        again = await store.outbox_next(0, limit=20)
        assert [i.entry for i in again] == [f"o{i}".encode() for i in range(6, 12)]
        # And what commits next comes after the last one, once.
        waiting = asyncio.ensure_future(store.outbox_next(after, limit=10))
        await store.put(events=[EventRow("t2", 1, b"y", outbox=b"o12")])
        assert [(i.position, i.entry) for i in await asyncio.wait_for(waiting, 30)] == [
            (after + 1, b"o12")
        ]
    with sqlite3.connect(path) as conn:
        positions = [r[0] for r in conn.execute("SELECT position FROM outbox ORDER BY position")]
    assert positions == list(range(seen[5].position, after + 2))
