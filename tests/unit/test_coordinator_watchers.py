"""What an open event stream, a waiting task and a token cost the coordinator (not timed).

A journal over a real SQLite store: a watcher that goes away leaves no waiter behind,
a stream does not keep its snapshot once sent, a waiting task makes its retry and
watcher bookkeeping only when used, start-up's heap is frozen without garbage, and a
partial output's outbox envelope carries the task's trace without a span of its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import weakref
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from hivewire.common.v1 import common_pb2
from hivewire.coordinator.v1 import coordinator_pb2
from hivewire.services.coordinator.app import freeze_start_up_heap
from hivewire.services.coordinator.journal import Journal, NullPublisher, TaskRuntime, TaskTable
from hivewire.services.coordinator.outbox import unpack
from hivewire.services.coordinator.sqlite_store import SqliteTaskStore
from hivewire.services.runtime.events.publisher import EventPublisher
from hivewire.services.runtime.metrics import REGISTRY
from tests.helpers import eventually
from tests.support.task_records import queued_runtime

S = common_pb2


def _runtime(task_id: str = "t-1") -> TaskRuntime:
    spec = coordinator_pb2.TaskSpec(capability="hold", input=S.Payload(text="x" * 4096))
    return queued_runtime(spec, task_id)


@pytest.fixture
async def journal(tmp_path: Path) -> AsyncIterator[tuple[Journal, TaskTable]]:
    async with SqliteTaskStore(tmp_path / "coordinator.db") as store:
        tasks = TaskTable(finished_cache_size=8, on_evict=lambda rt: None)
        yield Journal(store, tasks, NullPublisher()), tasks


def _watchers() -> float:
    return REGISTRY.get_sample_value("hivewire_coordinator_watchers") or 0.0


async def test_a_watcher_that_goes_away_leaves_nothing_behind(
    journal: tuple[Journal, TaskTable],
) -> None:
    events, tasks = journal
    rt = _runtime()
    tasks.add(rt)
    await events.emit(
        rt,
        state_changed=coordinator_pb2.StateChange(
            from_state=S.TASK_STATE_UNSPECIFIED, to_state=S.TASK_STATE_QUEUED
        ),
    )
    before = _watchers()
    stream = events.follow(rt.record.task_id, 0, first=events.snapshot(rt.record))
    assert isinstance(stream, AsyncIterator)
    first = await anext(stream)
    assert first.HasField("snapshot")
    assert (await anext(stream)).sequence == 1
    # Once sent, the snapshot (a whole task, its input included) is not kept by the stream.
    assert stream.ag_frame is not None  # type: ignore[attr-defined]
    assert stream.ag_frame.f_locals["first"] is None  # type: ignore[attr-defined]
    assert _watchers() == before + 1

    waiting = asyncio.create_task(anext(stream))
    await eventually(lambda: rt.watching == 1)
    waiting.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await waiting
    await stream.aclose()  # type: ignore[attr-defined]
    assert rt.watching == 0
    assert rt._waiters is None
    assert _watchers() == before


async def test_watchers_woken_by_an_event_leave_no_waiters(
    journal: tuple[Journal, TaskTable],
) -> None:
    events, tasks = journal
    rt = _runtime()
    tasks.add(rt)
    streams = [events.follow(rt.record.task_id, 0) for _ in range(3)]
    reads = [asyncio.create_task(anext(s)) for s in streams]
    await eventually(lambda: rt.watching == 3)
    await events.emit(rt, partial=S.PartialResult())
    got = await asyncio.gather(*reads)
    assert [e.sequence for e in got] == [1, 1, 1]
    assert rt.watching == 0
    assert rt._waiters is None
    for stream in streams:
        await stream.aclose()  # type: ignore[attr-defined]


def test_a_waiting_task_makes_its_avoid_set_only_when_an_agent_is_avoided() -> None:
    rt = _runtime()
    assert rt._avoid is None
    assert list(rt.avoid) == []
    rt.avoid_agent("agent-a")
    rt.avoid_agent("agent-a")
    assert set(rt.avoid) == {"agent-a"}
    assert rt.watching == 0


def test_start_up_heap_is_frozen_after_its_garbage_is_collected() -> None:
    class Node:
        other: Node | None = None

    cycle = Node()
    cycle.other = cycle
    gone = weakref.ref(cycle)
    del cycle
    kept = Node()
    try:
        frozen = freeze_start_up_heap()
        # Garbage in a reference cycle was collected first, not frozen.
        assert gone() is None
        assert frozen == gc.get_freeze_count() > 0
        # What lives on is frozen: a full collection no longer walks it.
        assert not any(o is kept for o in gc.get_objects())
    finally:
        gc.unfreeze()
    assert any(o is kept for o in gc.get_objects())


TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


async def test_a_partial_envelope_carries_the_task_trace_without_a_span_of_its_own(
    tmp_path: Path, spans: InMemorySpanExporter
) -> None:
    # A publisher that is on (never started here): task events go through the outbox.
    publisher = EventPublisher("nats://127.0.0.1:1", source="coordinator/test")
    async with SqliteTaskStore(tmp_path / "coordinator.db") as store:
        tasks = TaskTable(finished_cache_size=8, on_evict=lambda rt: None)
        events = Journal(store, tasks, publisher)
        assert events.outbox is publisher
        rt = _runtime()
        rt.record.spec.metadata.traceparent = TRACEPARENT
        tasks.add(rt)
        await events.emit(
            rt,
            publish="task.created",
            state_changed=coordinator_pb2.StateChange(to_state=S.TASK_STATE_QUEUED),
        )
        await events.emit(rt, write_row=False, partial=S.PartialResult(artifact_id="a"))
        entries = [unpack(item.entry) for item in await store.outbox_next(0, limit=10)]
    created, partial = (envelopes[0] for envelopes in entries)
    assert (created.type, partial.type) == ("task.created", "task.partial")
    assert [created.task_sequence, partial.task_sequence] == [1, 2]
    assert partial.id == "t-1:2"
    # One PRODUCER span for the state change (its envelope carries that span), none for
    # the token: its envelope carries the task's own trace context.
    producers = [s for s in spans.get_finished_spans() if s.name.endswith(" publish")]
    assert len(producers) == 1
    assert created.traceparent.split("-")[1] == TRACEPARENT.split("-")[1]
    assert created.traceparent != TRACEPARENT
    assert partial.traceparent == TRACEPARENT
