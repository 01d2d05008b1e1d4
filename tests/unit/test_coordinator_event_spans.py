"""A task event's envelope gets a PRODUCER span only while spans go somewhere.

With an exporter (or this test process's collector) every state change's envelope
carries the context of a PRODUCER span of its own; with the SDK provider and no span
processor (``setup_tracing`` without an OTLP endpoint) such a span would be made and
dropped, so the envelope carries the task's stored context, like a partial result's.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import ProxyTracerProvider

from hivewire.common.v1 import common_pb2 as S
from hivewire.coordinator.v1 import coordinator_pb2
from hivewire.services.coordinator.journal import Journal, TaskTable
from hivewire.services.coordinator.outbox import unpack
from hivewire.services.coordinator.sqlite_store import SqliteTaskStore
from hivewire.services.runtime import tracing
from hivewire.services.runtime.events.publisher import EventPublisher
from tests.support.task_records import queued_runtime

TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


def test_spans_are_kept_only_by_a_provider_with_a_processor(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    bare = TracerProvider()
    monkeypatch.setattr(tracing.trace, "get_tracer_provider", lambda: bare)
    assert tracing.spans_kept() is False
    bare.add_span_processor(SimpleSpanProcessor(InMemorySpanExporter()))
    assert tracing.spans_kept() is True
    proxy = ProxyTracerProvider()
    monkeypatch.setattr(tracing.trace, "get_tracer_provider", lambda: proxy)
    assert tracing.spans_kept() is True


@pytest.mark.parametrize("kept", [True, False])
async def test_a_state_change_envelope_has_its_own_span_only_while_spans_are_kept(
    tmp_path: Path,
    spans: InMemorySpanExporter,
    monkeypatch: pytest.MonkeyPatch,
    kept: bool,
) -> None:
    monkeypatch.setattr(tracing, "spans_kept", lambda: kept)
    publisher = EventPublisher("nats://127.0.0.1:1", source="coordinator/test")
    spec = coordinator_pb2.TaskSpec(capability="noop", input=S.Payload(text="x"))
    spec.metadata.traceparent = TRACEPARENT
    async with SqliteTaskStore(tmp_path / "coordinator.db") as store:
        tasks = TaskTable(finished_cache_size=8, on_evict=lambda rt: None)
        journal = Journal(store, tasks, publisher)
        rt = queued_runtime(spec)
        tasks.add(rt)
        await journal.emit(
            rt,
            publish="task.created",
            state_changed=coordinator_pb2.StateChange(to_state=S.TASK_STATE_QUEUED),
        )
        (entry,) = await store.outbox_next(0, limit=10)
    (envelope,) = unpack(entry.entry)
    assert (envelope.type, envelope.task_sequence, envelope.id) == ("task.created", 1, "t-1:1")
    producers = [s for s in spans.get_finished_spans() if s.name.endswith(" publish")]
    # Either way the event is in the task's trace.
    assert envelope.traceparent.split("-")[1] == TRACEPARENT.split("-")[1]
    if kept:
        assert len(producers) == 1
        assert envelope.traceparent != TRACEPARENT
        assert f"{producers[0].context.span_id:016x}" == envelope.traceparent.split("-")[2]
    else:
        assert producers == []
        assert envelope.traceparent == TRACEPARENT
