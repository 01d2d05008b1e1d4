"""The journal coalesces partial results that arrive while the previous one commits.

A journal over a real SQLite store (not timed): a partial with nothing uncommitted
before it is handed to the store at once; those that arrive while it commits wait for
that commit only, and the ones that continue each other become one stored event; an
event of another kind sends what waits first, so the order is the agent's.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from hivewire.common.v1 import common_pb2
from hivewire.coordinator.v1 import coordinator_pb2
from hivewire.services.coordinator.journal import Journal, NullPublisher, TaskRuntime, TaskTable
from hivewire.services.coordinator.sqlite_store import SqliteTaskStore
from hivewire.services.runtime.metrics import REGISTRY
from tests.unit.test_coordinator_watchers import _runtime

S = common_pb2
TaskEvent = coordinator_pb2.TaskEvent


@pytest.fixture
async def setup(tmp_path: Path) -> AsyncIterator[tuple[Journal, SqliteTaskStore, TaskRuntime]]:
    async with SqliteTaskStore(tmp_path / "coordinator.db") as store:
        tasks = TaskTable(finished_cache_size=8, on_evict=lambda rt: None)
        rt = _runtime()
        tasks.add(rt)
        yield Journal(store, tasks, NullPublisher()), store, rt


def chunk(text: str, *, artifact: str = "out", append: bool = True) -> S.PartialResult:
    return S.PartialResult(artifact_id=artifact, content=S.Payload(text=text), append=append)


async def stored(store: SqliteTaskStore, rt: TaskRuntime) -> list[TaskEvent]:
    await store.flush()
    rows = await store.events_after(rt.record.task_id, 0)
    return [TaskEvent.FromString(row.data) for row in rows]


def rebuild(events: list[TaskEvent]) -> dict[str, str]:
    out: dict[str, str] = {}
    for e in events:
        if e.HasField("partial"):
            p = e.partial
            out[p.artifact_id] = (out.get(p.artifact_id, "") if p.append else "") + p.content.text
    return out


async def test_a_lone_partial_is_stored_at_once(
    setup: tuple[Journal, SqliteTaskStore, TaskRuntime],
) -> None:
    journal, store, rt = setup
    journal.partial(rt, chunk("one"))
    # Numbered and handed to the store in the call itself: nothing waits for more.
    assert rt.record.last_sequence == 1
    await store.flush()
    journal.partial(rt, chunk("two"))
    assert rt.record.last_sequence == 2
    events = await stored(store, rt)
    assert [e.partial.content.text for e in events] == ["one", "two"]


async def test_partials_behind_an_uncommitted_one_become_one_event(
    setup: tuple[Journal, SqliteTaskStore, TaskRuntime],
) -> None:
    journal, store, rt = setup
    joined = REGISTRY.get_sample_value("hivewire_coordinator_partials_joined_total") or 0.0
    sent = [chunk(f"t{i} ") for i in range(50)]
    for c in sent:
        journal.partial(rt, c)  # all before the first one can commit
    events = await stored(store, rt)
    after = REGISTRY.get_sample_value("hivewire_coordinator_partials_joined_total")
    assert after == joined + 48  # 49 chunks in the second event
    assert [e.sequence for e in events] == [1, 2]
    assert [e.partial.content.text for e in events] == [
        "t0 ",
        "".join(f"t{i} " for i in range(1, 50)),
    ]
    assert rebuild(events) == {"out": "".join(c.content.text for c in sent)}


async def test_another_event_sends_what_waits_first_and_order_is_kept(
    setup: tuple[Journal, SqliteTaskStore, TaskRuntime],
) -> None:
    journal, store, rt = setup
    journal.partial(rt, chunk("a"))
    journal.partial(rt, chunk("b"))
    journal.partial(rt, chunk("c"))
    journal.emit(rt, progress=S.Progress(fraction=0.5, step="half"))
    journal.partial(rt, chunk("d"))
    journal.partial(rt, chunk("X", append=False))  # replaces: never joins what came before
    journal.partial(rt, chunk("n", artifact="notes"))  # another artifact: its own event
    journal.partial(rt, chunk("e"))
    events = await stored(store, rt)
    assert [e.sequence for e in events] == list(range(1, len(events) + 1))
    kinds = [e.WhichOneof("kind") for e in events]
    assert kinds[:3] == ["partial", "partial", "progress"]
    assert [e.partial.content.text for e in events[:2]] == ["a", "bc"]
    after = [(e.partial.artifact_id, e.partial.content.text) for e in events[3:]]
    assert after == [("out", "d"), ("out", "X"), ("notes", "n"), ("out", "e")]
    assert rebuild(events) == {"out": "Xe", "notes": "n"}
    # Nothing is left waiting once everything committed.
    assert not journal._partials


async def test_json_chunks_never_join(setup: tuple[Journal, SqliteTaskStore, TaskRuntime]) -> None:
    journal, store, rt = setup
    first = S.PartialResult(artifact_id="out", append=True)
    first.content.json.update({"k": 1})
    journal.partial(rt, chunk("a"))
    journal.partial(rt, first)
    journal.partial(rt, first)
    events = await stored(store, rt)
    assert len(events) == 3 and events[1].partial == first and events[2].partial == first
