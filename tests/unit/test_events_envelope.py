"""Unit tests of the event envelope, subjects, headers, coalescing and CLI formatting."""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime, timedelta

import pytest
import typer
from opentelemetry import context as otel_context

from hivewire.common.v1 import common_pb2
from hivewire.coordinator.v1 import coordinator_pb2
from hivewire.events.v1 import events_pb2
from hivewire.services.cli.events import format_event, parse_since
from hivewire.services.runtime import tracing
from hivewire.services.runtime.events import (
    CATEGORIES,
    EVENT_TYPES,
    HEADER_CORRELATION_ID,
    HEADER_MSG_ID,
    HEADER_TRACEPARENT,
    HEADER_TRACESTATE,
    EventPublisher,
    ProgressCoalescer,
    build_event,
    category_of,
    dlq_subject_for,
    event_subject,
    filter_subject,
)
from hivewire.services.runtime.events.envelope import event_headers, header_value
from hivewire.services.runtime.logging import bind_correlation_id

TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


def test_every_category_of_the_proto_has_event_types() -> None:
    oneof = events_pb2.Event.DESCRIPTOR.oneofs_by_name["data"]
    assert set(CATEGORIES) == {f.name for f in oneof.fields}
    assert EVENT_TYPES["task"] >= {"created", "progress", "completed", "dead_lettered"}


def test_build_event_stamps_id_time_correlation_and_trace() -> None:
    parent = tracing.extract({"traceparent": TRACEPARENT, "tracestate": "vendor=1"})
    token = otel_context.attach(parent)
    try:
        with bind_correlation_id("cid-42"):
            event = build_event(
                "task.completed",
                source="coordinator/c-1",
                subject="task-1",
                data=events_pb2.TaskEventData(
                    task_id="task-1", state=common_pb2.TASK_STATE_SUCCEEDED
                ),
                task_sequence=7,
            )
    finally:
        otel_context.detach(token)
    assert uuid.UUID(event.id)
    assert event.type == "task.completed"
    assert event.source == "coordinator/c-1"
    assert event.subject == "task-1"
    assert event.task_sequence == 7
    assert event.correlation_id == "cid-42"
    assert event.traceparent == TRACEPARENT
    assert event.WhichOneof("data") == "task"
    assert event.task.state == common_pb2.TASK_STATE_SUCCEEDED
    age = datetime.now(UTC) - event.time.ToDatetime(tzinfo=UTC)
    assert timedelta(0) <= age < timedelta(minutes=1)
    headers = event_headers(event, {"traceparent": TRACEPARENT, "tracestate": "vendor=1"})
    assert headers == {
        HEADER_MSG_ID: event.id,
        HEADER_CORRELATION_ID: "cid-42",
        HEADER_TRACEPARENT: TRACEPARENT,
        HEADER_TRACESTATE: "vendor=1",
    }


def test_explicit_correlation_id_wins_and_no_context_means_no_header() -> None:
    event = build_event(
        "agent.registered",
        source="agent/a",
        subject="a-1",
        data=events_pb2.AgentEventData(agent_id="a-1"),
    )
    assert event.correlation_id == ""
    assert event.traceparent == ""
    assert event_headers(event) == {HEADER_MSG_ID: event.id}
    with bind_correlation_id("ambient"):
        event = build_event(
            "agent.registered",
            source="agent/a",
            subject="a-1",
            data=events_pb2.AgentEventData(),
            correlation_id="explicit",
        )
    assert event.correlation_id == "explicit"


def test_malformed_traceparent_is_not_propagated() -> None:
    event = build_event(
        "tool.invoked",
        source="tool/t",
        subject="call-1",
        data=events_pb2.ToolEventData(),
        traceparent="00-not-a-trace\r\nInjected: yes",
    )
    assert event.traceparent == ""


@pytest.mark.parametrize(
    ("event_type", "message"),
    [
        ("task", "is not '<category>.<event>'"),
        ("Task.Created", "is not '<category>.<event>'"),
        ("billing.created", "unknown event category"),
        ("task.exploded", "unknown task event"),
    ],
)
def test_bad_event_types_are_rejected(event_type: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        category_of(event_type)


def test_project_events_are_open_ended_and_data_must_match_category() -> None:
    assert category_of("project.archived") == "project"
    with pytest.raises(ValueError, match="carries TaskEventData"):
        build_event("task.created", source="s", subject="x", data=events_pb2.AgentEventData())
    with pytest.raises(ValueError, match="task_sequence"):
        build_event(
            "task.created",
            source="s",
            subject="x",
            data=events_pb2.TaskEventData(),
            task_sequence=-1,
        )


def test_subjects() -> None:
    assert event_subject("task.completed") == "hivewire.events.task.completed"
    assert filter_subject("task.*") == "hivewire.events.task.*"
    assert filter_subject(">") == "hivewire.events.>"
    assert filter_subject("") == "hivewire.events.>"
    assert filter_subject("*.failed") == "hivewire.events.*.failed"
    assert filter_subject("hivewire.events.tool.>") == "hivewire.events.tool.>"
    for bad in ("task.>.x", "task..x", "Task.*", "task.crea ted"):
        with pytest.raises(ValueError):
            filter_subject(bad)
    assert dlq_subject_for("hivewire.events.task.completed") == "hivewire.dlq.task.completed"


def test_header_values_are_single_line_and_bounded() -> None:
    assert header_value("boom\r\nX-Evil: 1") == "boom X-Evil: 1"
    long = header_value("x" * 5000)
    assert len(long) == 1024
    assert long.endswith("...")


async def test_coalescer_keeps_first_and_latest_per_key() -> None:
    emitted: list[str] = []
    coalesced: list[None] = []
    # An interval far longer than the test: only flush() can release held updates.
    coalescer: ProgressCoalescer[str] = ProgressCoalescer(
        3600, emitted.append, on_coalesced=lambda: coalesced.append(None)
    )
    for i in range(100):
        coalescer.offer("task-a", f"a{i}")
    coalescer.offer("task-b", "b0")
    assert emitted == ["a0", "b0"]
    assert coalescer.pending == 1
    assert len(coalesced) == 98  # a1..a98 replaced; a99 is held
    coalescer.flush("task-a")
    assert emitted == ["a0", "b0", "a99"]
    coalescer.flush("task-b")  # nothing held: nothing emitted
    assert emitted == ["a0", "b0", "a99"]
    coalescer.offer("task-a", "a100")  # after a flush the next one goes at once
    assert emitted[-1] == "a100"
    coalescer.flush_all()


async def test_coalescer_releases_the_held_update_after_the_interval() -> None:
    emitted: list[str] = []
    released = asyncio.Event()

    def emit(item: str) -> None:
        emitted.append(item)
        if item == "last":
            released.set()

    coalescer: ProgressCoalescer[str] = ProgressCoalescer(0.05, emit)
    coalescer.offer("t", "first")
    coalescer.offer("t", "middle")
    coalescer.offer("t", "last")
    await asyncio.wait_for(released.wait(), 10)
    assert emitted == ["first", "last"]
    coalescer.flush_all()


async def test_zero_interval_disables_coalescing() -> None:
    emitted: list[int] = []
    coalescer: ProgressCoalescer[int] = ProgressCoalescer(0, emitted.append)
    for i in range(5):
        coalescer.offer("t", i)
    assert emitted == [0, 1, 2, 3, 4]


async def test_disabled_publisher_is_a_no_op_but_still_validates() -> None:
    async with EventPublisher(None, source="svc/1") as publisher:
        assert not publisher.enabled
        publisher.publish("task.created", subject="t", data=events_pb2.TaskEventData(task_id="t"))
        assert publisher.buffered == 0
        assert await publisher.flush(0.1)
        with pytest.raises(ValueError):
            publisher.publish("task.nope", subject="t", data=events_pb2.TaskEventData())


def test_publisher_rejects_bad_options() -> None:
    with pytest.raises(ValueError):
        EventPublisher("nats://127.0.0.1:4222", source="s", max_buffer=0)
    with pytest.raises(ValueError):
        EventPublisher("nats://127.0.0.1:4222", source="")


def test_parse_since() -> None:
    assert parse_since("10m") == timedelta(minutes=10)
    assert parse_since("1h30m") == timedelta(hours=1, minutes=30)
    assert parse_since("250ms") == timedelta(milliseconds=250)
    assert parse_since("2d") == timedelta(days=2)
    assert parse_since("2026-01-02T03:04:05Z") == datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    assert parse_since("2026-01-02T03:04:05") == datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    with pytest.raises(typer.BadParameter):
        parse_since("yesterday")


def test_format_event_shows_the_key_fields() -> None:
    event = build_event(
        "task.progress",
        source="agent/a",
        subject="task-9",
        data=events_pb2.TaskEventData(
            task_id="task-9",
            state=common_pb2.TASK_STATE_RUNNING,
            agent_id="agent-1",
            progress=common_pb2.Progress(fraction=0.5, step="search", message="half way"),
        ),
        task_sequence=4,
        correlation_id="cid-1",
        time_ns=1_700_000_000_123_000_000,
    )
    line = format_event(event, 17)
    assert line.startswith("2023-11-14T22:13:20.123Z #17 task.progress")
    for part in ("task-9", "seq=4", "state=running", "agent=agent-1", "progress=50%", "cid=cid-1"):
        assert part in line
    failed = build_event(
        "tool.failed",
        source="tool/t",
        subject="call-1",
        data=events_pb2.ToolEventData(
            tool_name="calculator",
            outcome="error",
            error=common_pb2.ErrorDetail(reason="TOOL_TIMEOUT", message="too slow"),
        ),
    )
    assert "tool=calculator outcome=error error=TOOL_TIMEOUT: too slow" in format_event(failed, 1)
    # The coordinator's other kinds show what their event adds.
    activity = build_event(
        "task.activity",
        source="coordinator/c",
        subject="task-9",
        data=events_pb2.TaskEventData(
            task_id="task-9",
            event=coordinator_pb2.TaskEvent(
                task_id="task-9",
                sequence=5,
                activity=common_pb2.Activity(
                    kind=common_pb2.ACTIVITY_KIND_TOOL_CALL, name="calculator", done=True
                ),
            ),
        ),
        task_sequence=5,
    )
    assert "activity=tool_call:calculator done" in format_event(activity, 2)
