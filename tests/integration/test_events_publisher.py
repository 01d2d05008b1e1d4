"""EventPublisher against a real nats-server: storage, headers, order, coalescing, buffering."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
from collections.abc import AsyncIterator
from pathlib import Path

import nats
import pytest
from nats.js.api import PersistMode, StorageType
from opentelemetry import context as otel_context
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind
from prometheus_client import REGISTRY

from hivewire.common.v1 import common_pb2
from hivewire.events.v1 import events_pb2
from hivewire.services.runtime import tracing
from hivewire.services.runtime.config import load_settings
from hivewire.services.runtime.events import (
    HEADER_BATCH_COMMIT,
    HEADER_BATCH_ID,
    HEADER_CORRELATION_ID,
    HEADER_MSG_ID,
    HEADER_TRACEPARENT,
    HEADER_TRACESTATE,
    EventPublisher,
    StreamSettings,
    ensure_stream,
    replay,
)
from hivewire.services.runtime.events.batch import (
    ERR_BATCH_DISABLED,
    BatchMessage,
    BatchRejectedError,
    publish_atomic,
)
from hivewire.services.runtime.logging import bind_correlation_id
from tests.helpers import NatsServer, eventually

TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


def task_data(
    task_id: str, state: common_pb2.TaskState.ValueType = common_pb2.TASK_STATE_RUNNING
) -> events_pb2.TaskEventData:
    return events_pb2.TaskEventData(task_id=task_id, state=state)


async def stored_messages(url: str, stream: str = "HIVEWIRE_EVENTS") -> list[nats.aio.msg.Msg]:
    """Every message of a stream, read with the raw client (independent of replay())."""
    client = await nats.connect(url)
    try:
        js = client.jetstream()
        info = await js.stream_info(stream)
        return [
            await js.get_msg(stream, seq)
            for seq in range(info.state.first_seq, info.state.last_seq + 1)
        ]
    finally:
        await client.close()


def metric(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


async def test_events_are_stored_in_order_with_headers(
    nats_server: NatsServer, spans: InMemorySpanExporter
) -> None:
    published_before = metric("hivewire_events_published_total", category="task")
    token = otel_context.attach(
        tracing.extract({"traceparent": TRACEPARENT, "tracestate": "rojo=00f067aa0ba902b7"})
    )
    try:
        async with EventPublisher(nats_server.url, source="coordinator/c-1") as publisher:
            with bind_correlation_id("cid-order"):
                for seq in range(1, 21):
                    publisher.publish(
                        "task.started" if seq == 1 else "task.assigned",
                        subject="task-1",
                        data=task_data("task-1"),
                        task_sequence=seq,
                    )
            publisher.publish(
                "agent.registered",
                subject="agent-1",
                data=events_pb2.AgentEventData(agent_id="agent-1", name="summarizer"),
                correlation_id="cid-agent",
            )
            assert await publisher.flush(10)
            assert publisher.published == 21
    finally:
        otel_context.detach(token)

    producers = {
        span.context.span_id: span
        for span in spans.get_finished_spans()
        if span.kind == SpanKind.PRODUCER
    }
    messages = await stored_messages(nats_server.url)
    assert len(messages) == 21
    events = [events_pb2.Event.FromString(m.data) for m in messages]
    assert [e.task_sequence for e in events[:20]] == list(range(1, 21))
    assert [m.subject for m in messages[:2]] == [
        "hivewire.events.task.started",
        "hivewire.events.task.assigned",
    ]
    assert messages[20].subject == "hivewire.events.agent.registered"
    for message, event in zip(messages, events, strict=True):
        assert message.headers is not None
        assert message.headers[HEADER_MSG_ID] == event.id
        # Each event's context is its own PRODUCER span, a child of the caller's span.
        _, trace_id, span_id, _ = message.headers[HEADER_TRACEPARENT].split("-")
        assert trace_id == TRACEPARENT.split("-")[1]
        producer = producers[int(span_id, 16)]
        assert producer.parent.span_id == int(TRACEPARENT.split("-")[2], 16)
        assert producer.name == f"{message.subject} publish"
        assert message.headers[HEADER_TRACESTATE] == "rojo=00f067aa0ba902b7"
        assert event.source == "coordinator/c-1"
        assert event.traceparent == message.headers[HEADER_TRACEPARENT]
    assert messages[0].headers is not None and messages[20].headers is not None
    assert messages[0].headers[HEADER_CORRELATION_ID] == "cid-order"
    assert messages[20].headers[HEADER_CORRELATION_ID] == "cid-agent"
    assert events[20].agent.name == "summarizer"
    assert len({e.id for e in events}) == 21
    assert metric("hivewire_events_published_total", category="task") == published_before + 20

    # replay() reads back exactly what the raw client sees.
    replayed = [r async for r in replay(nats_server.url)]
    assert [r.event for r in replayed] == events
    assert [r.stream_sequence for r in replayed] == [m.seq for m in messages]


async def test_streams_are_created_from_the_settings(nats_server: NatsServer) -> None:
    settings = StreamSettings(max_age=3600, max_bytes=8 * 1024 * 1024, duplicate_window=90)
    await ensure_stream(nats_server.url, settings)
    await ensure_stream(nats_server.url, settings)  # idempotent
    client = await nats.connect(nats_server.url)
    try:
        js = client.jetstream()
        events = (await js.stream_info("HIVEWIRE_EVENTS")).config
        dlq = (await js.stream_info("HIVEWIRE_DLQ")).config
    finally:
        await client.close()
    assert events.subjects == ["hivewire.events.>"]
    assert events.storage == StorageType.FILE
    assert events.max_age == 3600
    assert events.max_bytes == 8 * 1024 * 1024
    assert events.duplicate_window == 90
    assert events.allow_atomic  # a full send window goes in as one atomic batch
    assert dlq.subjects == ["hivewire.dlq.>"]
    assert dlq.storage == StorageType.FILE

    # New limits from the settings are applied to the existing stream, events kept.
    await ensure_stream(nats_server.url, StreamSettings(max_age=7200))
    client = await nats.connect(nats_server.url)
    try:
        assert (await client.jetstream().stream_info("HIVEWIRE_EVENTS")).config.max_age == 7200
    finally:
        await client.close()


async def test_progress_is_coalesced_and_never_overtakes_completion(
    nats_server: NatsServer,
) -> None:
    coalesced_before = metric("hivewire_events_coalesced_total")
    # A coalescing interval longer than the test: what goes out is decided by the rule,
    # not by timing.
    async with EventPublisher(
        nats_server.url, source="agent/a-1", progress_interval=3600
    ) as publisher:
        publisher.publish(
            "task.started", subject="task-p", data=task_data("task-p"), task_sequence=1
        )
        for seq in range(2, 102):
            publisher.publish(
                "task.progress",
                subject="task-p",
                data=events_pb2.TaskEventData(
                    task_id="task-p", progress=common_pb2.Progress(fraction=seq / 101)
                ),
                task_sequence=seq,
            )
        publisher.publish(
            "task.progress", subject="task-q", data=task_data("task-q"), task_sequence=1
        )
        publisher.publish(
            "task.completed",
            subject="task-p",
            data=task_data("task-p", common_pb2.TASK_STATE_SUCCEEDED),
            task_sequence=102,
        )
        assert await publisher.flush(10)
    stored = [
        (r.type, r.event.subject, r.event.task_sequence) async for r in replay(nats_server.url)
    ]
    assert stored == [
        ("task.started", "task-p", 1),
        ("task.progress", "task-p", 2),  # the first progress goes out at once
        ("task.progress", "task-q", 1),  # another task is not held back
        ("task.progress", "task-p", 101),  # the latest, released before the completion
        ("task.completed", "task-p", 102),
    ]
    assert metric("hivewire_events_coalesced_total") == coalesced_before + 98


async def test_publisher_started_while_nats_is_down_delivers_once_it_is_up(
    tmp_path: Path,
) -> None:
    server = NatsServer(tmp_path / "nats")
    await server.start()
    await server.stop()  # a known port with nothing listening
    async with EventPublisher(server.url, source="model/m-1") as publisher:
        for i in range(5):
            publisher.publish(
                "model.request_started",
                subject=f"call-{i}",
                data=events_pb2.ModelEventData(request_id=f"call-{i}", model="tiny"),
            )
        assert publisher.buffered == 5
        assert not await publisher.flush(0.2)
        await server.start()
        try:
            assert await publisher.flush(20)
            stored = [r.event.subject async for r in replay(server.url)]
        finally:
            await server.stop()
    assert stored == [f"call-{i}" for i in range(5)]


async def test_full_buffer_drops_the_oldest_and_keeps_order(tmp_path: Path) -> None:
    dropped_before = metric("hivewire_events_dropped_total", reason="buffer_full")
    server = NatsServer(tmp_path / "nats")
    await server.start()
    try:
        async with EventPublisher(server.url, source="tool/t-1", max_buffer=10) as publisher:
            publisher.publish("tool.invoked", subject="call-0", data=events_pb2.ToolEventData())
            assert await publisher.flush(10)
            await server.stop()
            for i in range(1, 26):
                publisher.publish(
                    "tool.invoked", subject=f"call-{i}", data=events_pb2.ToolEventData()
                )
            assert publisher.buffered == 10
            assert (
                metric("hivewire_events_dropped_total", reason="buffer_full") == dropped_before + 15
            )
            assert metric("hivewire_events_buffered") >= 10
            await server.start()
            assert await publisher.flush(20)
        stored = [r.event.subject async for r in replay(server.url)]
    finally:
        await server.stop()
    assert stored == ["call-0", *[f"call-{i}" for i in range(16, 26)]]


async def test_close_reports_events_it_could_not_send(tmp_path: Path) -> None:
    lost_before = metric("hivewire_events_dropped_total", reason="shutdown")
    server = NatsServer(tmp_path / "nats")
    await server.start()
    await server.stop()
    publisher = EventPublisher(server.url, source="svc/1", close_timeout=0.2)
    await publisher.start()
    for i in range(3):
        publisher.publish("agent.deregistered", subject=f"a{i}", data=events_pb2.AgentEventData())
    await publisher.close()  # returns although NATS never came back
    assert metric("hivewire_events_dropped_total", reason="shutdown") == lost_before + 3
    assert publisher.buffered == 0
    publisher.publish("agent.deregistered", subject="late", data=events_pb2.AgentEventData())


async def test_from_settings_uses_the_events_section(
    nats_server: NatsServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HIVEWIRE_NATS_URL", nats_server.url)
    monkeypatch.setenv("HIVEWIRE_EVENTS__STREAM__MAX_AGE", "600")
    monkeypatch.setenv("HIVEWIRE_EVENTS__MAX_BUFFER", "7")
    settings = load_settings()
    async with EventPublisher.from_settings(settings, source="svc/1") as publisher:
        publisher.publish("workflow.started", subject="t", data=events_pb2.WorkflowEventData())
        assert await publisher.flush(10)
    client = await nats.connect(nats_server.url)
    try:
        assert (await client.jetstream().stream_info("HIVEWIRE_EVENTS")).config.max_age == 600
    finally:
        await client.close()
    monkeypatch.setenv("HIVEWIRE_EVENTS__ENABLED", "false")
    assert not EventPublisher.from_settings(load_settings(), source="svc/1").enabled


async def test_sent_envelopes_are_never_dropped_and_resolve_once_stored(tmp_path: Path) -> None:
    """send(): the outbox's way in. A full buffer drops other events, never these."""
    server = NatsServer(tmp_path / "nats")
    await server.start()
    try:
        async with EventPublisher(server.url, source="coordinator/c-1", max_buffer=4) as publisher:
            await server.stop()
            ready = [
                events_pb2.Event(
                    id=f"task-1:{n}",
                    type="task.state_changed",
                    source="coordinator/c-1",
                    subject="task-1",
                    task_sequence=n,
                    task=task_data("task-1"),
                )
                for n in range(1, 7)
            ]
            sent = publisher.send(ready)
            for i in range(10):
                publisher.publish(
                    "tool.invoked", subject=f"call-{i}", data=events_pb2.ToolEventData()
                )
            # The six envelopes stay; only the ordinary events made room for each other.
            assert publisher.buffered == 6 + 1
            assert not sent.done()
            await server.start()
            await sent
            # The same envelopes again (a restarted relay): JetStream stores them once.
            await publisher.send(ready)
            assert await publisher.flush(20)
        stored = [
            (r.event.id, r.headers[HEADER_MSG_ID]) async for r in replay(server.url, "task.*")
        ]
    finally:
        await server.stop()
    assert stored == [(f"task-1:{n}", f"task-1:{n}") for n in range(1, 7)]


async def test_close_cancels_what_send_could_not_deliver(tmp_path: Path) -> None:
    lost_before = metric("hivewire_events_dropped_total", reason="shutdown")
    server = NatsServer(tmp_path / "nats")
    await server.start()
    await server.stop()
    publisher = EventPublisher(server.url, source="coordinator/c-1", close_timeout=0.2)
    await publisher.start()
    sent = publisher.send(
        [events_pb2.Event(id="t:1", type="task.created", subject="t", task=task_data("t"))]
    )
    await publisher.close()
    # Its store keeps it and sends it again: not counted as lost here.
    assert sent.cancelled()
    assert metric("hivewire_events_dropped_total", reason="shutdown") == lost_before
    assert publisher.send([]).done()


@pytest.mark.parametrize("batch_min", [0, 2], ids=["event-by-event", "batches"])
async def test_an_event_nats_cannot_take_is_dropped_not_retried_for_ever(
    nats_server: NatsServer, batch_min: int
) -> None:
    """One event over NATS's max_payload (1 MiB) must not hold up the ones after it."""
    too_large_before = metric("hivewire_events_dropped_total", reason="too_large")

    def envelope(n: int, text: str = "") -> events_pb2.Event:
        data = task_data("task-1")
        data.error.message = text
        return events_pb2.Event(
            id=f"task-1:{n}",
            type="task.failed",
            subject="task-1",
            task_sequence=n,
            task=data,
        )

    async with EventPublisher(
        nats_server.url, source="coordinator/c-1", batch_min=batch_min
    ) as publisher:
        first = publisher.send([envelope(1)])
        huge = publisher.send([envelope(2, "x" * (2 * 1024 * 1024))])
        after = publisher.send([envelope(3)])
        await asyncio.wait_for(asyncio.gather(first, huge, after), 30)
    stored = [r.event.id async for r in replay(nats_server.url, "task.*")]
    assert stored == ["task-1:1", "task-1:3"]
    assert metric("hivewire_events_dropped_total", reason="too_large") == too_large_before + 1


def envelopes(first: int, last: int, task_id: str = "task-b") -> list[events_pb2.Event]:
    """Ready envelopes ``<task_id>:<n>`` for n in first..last, as the outbox sends them."""
    return [
        events_pb2.Event(
            id=f"{task_id}:{n}",
            type="task.state_changed",
            source="coordinator/c-1",
            subject=task_id,
            task_sequence=n,
            task=task_data(task_id),
        )
        for n in range(first, last + 1)
    ]


def batches(outcome: str) -> float:
    return metric("hivewire_events_batches_total", outcome=outcome)


async def test_a_full_window_goes_in_as_one_atomic_batch(nats_server: NatsServer) -> None:
    stored_before, refused_before = batches("stored"), batches("refused")
    async with EventPublisher(nats_server.url, source="coordinator/c-1", batch_min=8) as publisher:
        # Queued before the sender runs: its first window holds all forty.
        await asyncio.wait_for(publisher.send(envelopes(1, 40)), 20)
        assert publisher.published == 40
        assert batches("stored") == stored_before + 1
        # A window that starts with events JetStream already stored (an ack that was
        # lost, a relay that restarted): the batch is refused whole, then sent event
        # by event, where JetStream drops each copy.
        await asyncio.wait_for(publisher.send(envelopes(1, 50)), 20)
        assert batches("refused") == refused_before + 1
        # Below batch_min: event by event, no batch offered.
        await asyncio.wait_for(publisher.send(envelopes(51, 53)), 20)
        assert batches("stored") == stored_before + 1
        assert batches("refused") == refused_before + 1
    messages = await stored_messages(nats_server.url)
    events = [events_pb2.Event.FromString(m.data) for m in messages]
    assert [e.id for e in events] == [f"task-b:{n}" for n in range(1, 54)]
    # The first forty went in as one batch (JetStream keeps the batch's headers).
    batch_ids = {m.headers.get(HEADER_BATCH_ID) for m in messages[:40] if m.headers}
    assert len(batch_ids) == 1 and None not in batch_ids
    assert messages[39].headers is not None
    assert messages[39].headers[HEADER_BATCH_COMMIT] == "1"
    assert all(m.headers and HEADER_BATCH_ID not in m.headers for m in messages[40:])
    for message, event in zip(messages, events, strict=True):
        assert message.headers is not None
        assert message.headers[HEADER_MSG_ID] == event.id


async def test_a_stream_that_refuses_batches_gets_events_one_by_one(
    nats_server: NatsServer,
) -> None:
    """An operator's stream that cannot allow atomic batches (persist_mode async)."""
    refused_before = batches("refused")
    client = await nats.connect(nats_server.url)
    try:
        js = client.jetstream()
        await js.add_stream(
            name="HIVEWIRE_EVENTS",
            subjects=["hivewire.events.>"],
            persist_mode=PersistMode.ASYNC,
        )
        async with EventPublisher(
            nats_server.url, source="coordinator/c-1", batch_min=2
        ) as publisher:
            await asyncio.wait_for(publisher.send(envelopes(1, 20)), 20)
        config = (await js.stream_info("HIVEWIRE_EVENTS")).config
    finally:
        await client.close()
    # The limits of the settings were applied all the same; batches stay off.
    assert config.max_age == StreamSettings().max_age
    assert not config.allow_atomic
    assert batches("refused") == refused_before
    stored = [r.event.id async for r in replay(nats_server.url, "task.*")]
    assert stored == [f"task-b:{n}" for n in range(1, 21)]


async def test_batches_stop_when_the_stream_stops_allowing_them(
    nats_server: NatsServer,
) -> None:
    refused_before = batches("refused")
    async with EventPublisher(nats_server.url, source="coordinator/c-1", batch_min=2) as publisher:
        await asyncio.wait_for(publisher.send(envelopes(1, 10)), 20)
        client = await nats.connect(nats_server.url)
        try:
            js = client.jetstream()
            config = (await js.stream_info("HIVEWIRE_EVENTS")).config
            assert config.allow_atomic
            config.allow_atomic = False
            await js.update_stream(config)
        finally:
            await client.close()
        await asyncio.wait_for(publisher.send(envelopes(11, 20)), 20)
        assert batches("refused") == refused_before + 1
        await asyncio.wait_for(publisher.send(envelopes(21, 30)), 20)
        assert batches("refused") == refused_before + 1  # not offered again
    stored = [r.event.id async for r in replay(nats_server.url, "task.*")]
    assert stored == [f"task-b:{n}" for n in range(1, 31)]


async def test_an_atomic_batch_is_all_or_nothing(nats_server: NatsServer) -> None:
    """batch.py against the server: the commit's one ack, and a refusal storing nothing."""
    client = await nats.connect(nats_server.url)
    try:
        js = client.jetstream()
        await js.add_stream(name="PLAIN", subjects=["plain.>"])
        await js.add_stream(name="ATOMIC", subjects=["atomic.>"], allow_atomic=True)

        def messages(prefix: str, ids: range) -> list[BatchMessage]:
            return [
                BatchMessage(f"{prefix}.x", f"m{n}".encode(), {HEADER_MSG_ID: f"{prefix}-{n}"})
                for n in ids
            ]

        ack = await publish_atomic(client, messages("atomic", range(1, 6)), ack_timeout=5)
        assert (ack.stream, ack.seq, ack.batch_size) == ("ATOMIC", 5, 5)
        # One id already stored: the whole batch is refused, the new ids too.
        with pytest.raises(BatchRejectedError) as refused:
            await publish_atomic(client, messages("atomic", range(5, 9)), ack_timeout=5)
        assert refused.value.err_code == 10201
        assert (await js.stream_info("ATOMIC")).state.messages == 5
        # A stream without allow_atomic stores none of the batch.
        with pytest.raises(BatchRejectedError) as disabled:
            await publish_atomic(client, messages("plain", range(1, 4)), ack_timeout=5)
        assert disabled.value.err_code == ERR_BATCH_DISABLED
        assert (await js.stream_info("PLAIN")).state.messages == 0
        with pytest.raises(ValueError, match="1 to 1000"):
            await publish_atomic(client, messages("atomic", range(1, 1002)), ack_timeout=5)
    finally:
        await client.close()


async def test_a_batch_carries_at_most_a_mebibyte(nats_server: NatsServer) -> None:
    stored_before = batches("stored")
    big = envelopes(1, 6)
    for event in big:
        event.task.error.message = "x" * (300 * 1024)
    async with EventPublisher(nats_server.url, source="coordinator/c-1", batch_min=2) as publisher:
        await asyncio.wait_for(publisher.send(big), 20)
    # Three of 300 KiB fit under MAX_BATCH_BYTES, four do not: two batches of three.
    assert batches("stored") == stored_before + 2
    stored = [r.event.id async for r in replay(nats_server.url, "task.*")]
    assert stored == [f"task-b:{n}" for n in range(1, 7)]


@contextlib.asynccontextmanager
async def publishing(
    nats_server: NatsServer,
) -> AsyncIterator[tuple[nats.aio.client.Client, EventPublisher]]:
    """A publisher (event by event) whose first event is stored, and a NATS client."""
    client = await nats.connect(nats_server.url)
    try:
        async with EventPublisher(
            nats_server.url, source="coordinator/c-1", batch_min=0
        ) as publisher:
            await asyncio.wait_for(publisher.send(envelopes(1, 1)), 30)
            yield client, publisher
    finally:
        await client.close()


async def failed_since(before: float) -> None:
    """Wait until the publisher counts a failed publish of a task event."""
    await eventually(
        lambda: metric("hivewire_events_publish_failed_total", category="task") > before,
        timeout=30,
    )


async def test_a_publish_the_stream_refuses_waits_and_goes_in_once_it_is_taken(
    nats_server: NatsServer, caplog: pytest.LogCaptureFixture
) -> None:
    """An acknowledgement holding an error: the event stays, in order, and is sent again."""
    caplog.set_level(logging.WARNING, logger="hivewire.services.runtime.events.publisher")
    failed_before = metric("hivewire_events_publish_failed_total", category="task")
    async with publishing(nats_server) as (client, publisher):
        js = client.jetstream()
        config = (await js.stream_info("HIVEWIRE_EVENTS")).config
        config.max_msg_size = 16  # every envelope is larger: JetStream answers an error
        await js.update_stream(config)
        refused = publisher.send(envelopes(2, 3))
        await failed_since(failed_before)
        assert not refused.done()
        assert publisher.buffered == 2
        # The refusal itself, read from the answer (not a wait for one that never came).
        assert "err_code=10054" in caplog.text
        config.max_msg_size = -1
        await js.update_stream(config)
        await asyncio.wait_for(refused, 30)
    stored = [r.event.id async for r in replay(nats_server.url, "task.*")]
    assert stored == ["task-b:1", "task-b:2", "task-b:3"]


async def test_a_deleted_stream_is_made_again_and_the_event_goes_in(
    nats_server: NatsServer,
) -> None:
    """Nobody listens on the subject (a wiped server): the stream is set up again."""
    async with publishing(nats_server) as (client, publisher):
        await client.jetstream().delete_stream("HIVEWIRE_EVENTS")
        await asyncio.wait_for(publisher.send(envelopes(2, 2)), 30)
    stored = [r.event.id async for r in replay(nats_server.url, "task.*")]
    assert stored == ["task-b:2"]


async def test_an_answer_that_is_no_acknowledgement_does_not_count_as_stored(
    nats_server: NatsServer,
) -> None:
    """The stream is gone and a plain NATS responder answers on its subjects: not stored."""
    failed_before = metric("hivewire_events_publish_failed_total", category="task")
    async with publishing(nats_server) as (client, publisher):
        await client.jetstream().delete_stream("HIVEWIRE_EVENTS")

        async def answer(msg: nats.aio.msg.Msg) -> None:
            await msg.respond(b"")

        responder = await client.subscribe("hivewire.events.>", cb=answer)
        sent = publisher.send(envelopes(2, 2))
        await failed_since(failed_before)
        assert not sent.done()
        assert publisher.buffered == 1
        # Once nobody answers, the stream is made again and the event goes in.
        await responder.unsubscribe()
        await asyncio.wait_for(sent, 30)
    stored = [r.event.id async for r in replay(nats_server.url, "task.*")]
    assert stored == ["task-b:2"]


async def test_a_deleted_stream_whose_subjects_a_silent_subscriber_holds_is_made_again(
    nats_server: NatsServer,
) -> None:
    """The stream is gone and a core subscriber takes its subjects without answering.

    No "no responders" answer ever comes, only silence: after a publish without an
    acknowledgement the publisher looks for the stream, sets it up again, and the
    event goes in (before, it was sent again and again into the silence).
    """
    async with publishing(nats_server) as (client, publisher):
        await client.jetstream().delete_stream("HIVEWIRE_EVENTS")
        silent = await client.subscribe("hivewire.events.>")  # never answers
        await client.flush()
        try:
            await asyncio.wait_for(publisher.send(envelopes(2, 2)), 30)
        finally:
            await silent.unsubscribe()
    stored = [r.event.id async for r in replay(nats_server.url, "task.*")]
    assert stored == ["task-b:2"]


def stopped(pid: int | None) -> bool:
    """Whether every thread of the process is stopped (SIGSTOP takes effect later)."""
    tasks = Path(f"/proc/{pid}/task")
    return all(
        (task / "stat").read_text().rsplit(")", 1)[1].split()[0] == "T" for task in tasks.iterdir()
    )


async def test_a_publish_without_an_acknowledgement_leaves_the_stream_as_it_was_set(
    tmp_path: Path,
) -> None:
    """After a timeout the publisher looks for the stream; one an operator changed is kept."""
    server = NatsServer(tmp_path / "nats")
    await server.start()
    try:
        client = await nats.connect(server.url)
        try:
            async with EventPublisher(
                server.url, source="coordinator/c-1", batch_min=0, publish_timeout=1
            ) as publisher:
                await asyncio.wait_for(publisher.send(envelopes(1, 1)), 30)
                js = client.jetstream()
                config = (await js.stream_info("HIVEWIRE_EVENTS")).config
                config.max_age = 7200  # an operator's choice, not the settings'
                await js.update_stream(config)
                failed_before = metric("hivewire_events_publish_failed_total", category="task")
                assert server.pid is not None
                os.kill(server.pid, signal.SIGSTOP)  # no answer, to anything
                try:
                    await eventually(lambda: stopped(server.pid), timeout=30)
                    sent = publisher.send(envelopes(2, 2))
                    await failed_since(failed_before)
                finally:
                    os.kill(server.pid, signal.SIGCONT)
                await asyncio.wait_for(sent, 30)
                assert (await js.stream_info("HIVEWIRE_EVENTS")).config.max_age == 7200
        finally:
            await client.close()
        stored = [r.event.id async for r in replay(server.url, "task.*")]
    finally:
        await server.stop()
    assert stored == ["task-b:1", "task-b:2"]


async def test_a_window_whose_connection_closes_ends_at_once(tmp_path: Path) -> None:
    """Publishes in flight when NATS goes away fail then, not at the publish timeout."""
    server = NatsServer(tmp_path / "nats")
    await server.start()
    try:
        client = await nats.connect(server.url, allow_reconnect=False)
        try:
            async with EventPublisher(
                server.url, source="coordinator/c-1", batch_min=0, publish_timeout=300
            ) as publisher:
                await asyncio.wait_for(publisher.send(envelopes(1, 1)), 30)
                # No stream and a subscriber that never answers: the window waits.
                await client.jetstream().delete_stream("HIVEWIRE_EVENTS")
                delivered = asyncio.Event()

                async def listen(_: nats.aio.msg.Msg) -> None:
                    delivered.set()

                await client.subscribe("hivewire.events.>", cb=listen)
                await client.flush()
                failed_before = metric("hivewire_events_publish_failed_total", category="task")
                sent = publisher.send(envelopes(2, 2))
                await asyncio.wait_for(delivered.wait(), 30)  # published, its window waiting
                await server.restart()  # the silent subscriber is gone with its connection
                # Well inside the publish timeout: the window ended when the connection did.
                await failed_since(failed_before)
                await asyncio.wait_for(sent, 60)
        finally:
            await client.close()
        stored = [r.event.id async for r in replay(server.url, "task.*")]
    finally:
        await server.stop()
    assert stored == ["task-b:2"]
