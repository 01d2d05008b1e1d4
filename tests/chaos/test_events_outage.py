"""A NATS outage in the middle of a run of events loses nothing and duplicates nothing."""

from __future__ import annotations

import asyncio
from collections import Counter
from pathlib import Path

import pytest
from prometheus_client import REGISTRY

from hivewire.common.v1 import common_pb2
from hivewire.events.v1 import events_pb2
from hivewire.services.runtime.events import EventPublisher, ReceivedEvent, replay, subscribe
from tests.helpers import NatsServer, eventually

OUTAGE_SECONDS = 3.0


def metric(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


class Tasks:
    """Publishes the events of a run of tasks: created, progress, completed, per task."""

    def __init__(self, publisher: EventPublisher) -> None:
        self.publisher = publisher
        self.count = 0

    def next_task(self) -> None:
        task_id = f"task-{self.count:04d}"
        self.count += 1
        steps = [
            ("task.created", common_pb2.TASK_STATE_QUEUED),
            ("task.started", common_pb2.TASK_STATE_RUNNING),
            ("task.completed", common_pb2.TASK_STATE_SUCCEEDED),
        ]
        for sequence, (event_type, state) in enumerate(steps, start=1):
            self.publisher.publish(
                event_type,
                subject=task_id,
                data=events_pb2.TaskEventData(task_id=task_id, state=state),
                task_sequence=sequence,
            )


@pytest.mark.parametrize("batch_min", [0, 4], ids=["event-by-event", "atomic-batches"])
@pytest.mark.parametrize("crash", [False, True], ids=["sigterm", "sigkill"])
async def test_events_published_across_a_nats_outage_are_all_stored_once(
    tmp_path: Path, crash: bool, batch_min: int
) -> None:
    # The configuration docs/events.md recommends for a single node.
    server = NatsServer(tmp_path / "nats", sync_interval="always")
    await server.start()
    try:
        # A small window: many ack round trips, so the outage lands mid-run. With
        # batch_min 4 every full window is one atomic batch, cut mid-way by the outage.
        stored_batches = metric("hivewire_events_batches_total", outcome="stored")
        async with EventPublisher(
            server.url,
            source="coordinator/chaos",
            publish_timeout=0.5,
            window=8,
            batch_min=batch_min,
        ) as publisher:
            tasks = Tasks(publisher)
            for _ in range(200):
                tasks.next_task()
            # No flush: the outage cuts through publishes still waiting for their acks.
            await eventually(lambda: publisher.published >= 24, timeout=20, interval=0.005)
            await (server.kill() if crash else server.stop())
            loop = asyncio.get_running_loop()
            down_since = loop.time()

            def outage_over() -> bool:
                # Tasks keep running (and publishing) while NATS is down.
                tasks.next_task()
                return loop.time() - down_since >= OUTAGE_SECONDS

            await eventually(outage_over, timeout=OUTAGE_SECONDS + 10, interval=0.05)
            assert not publisher.connected
            assert publisher.buffered > 0
            await server.start()
            for _ in range(30):
                tasks.next_task()
            assert await publisher.flush(30)
            total = tasks.count * 3

        batched = metric("hivewire_events_batches_total", outcome="stored") - stored_batches
        assert (batched > 0) == (batch_min > 0)
        stored = [r async for r in replay(server.url)]
        assert len(stored) == total
        assert len({r.event.id for r in stored}) == total
        # In publish order: task by task, each task's events by sequence.
        expected = [(f"task-{i:04d}", seq) for i in range(tasks.count) for seq in (1, 2, 3)]
        assert [(r.event.subject, r.event.task_sequence) for r in stored] == expected

        calls: Counter[str] = Counter()

        async def handler(received: ReceivedEvent) -> None:
            calls[received.id] += 1

        subscription = subscribe(server.url, "task.*", handler, durable="after-outage")
        async with subscription:
            await eventually(lambda: subscription.stats.processed == total, timeout=30)
        assert len(calls) == total
        assert set(calls.values()) == {1}
    finally:
        await server.stop()


async def test_a_subscriber_rides_out_a_nats_restart(tmp_path: Path) -> None:
    server = NatsServer(tmp_path / "nats", sync_interval="always")
    await server.start()
    seen: Counter[str] = Counter()

    async def handler(received: ReceivedEvent) -> None:
        seen[received.event.subject] += 1

    try:
        async with EventPublisher(server.url, source="svc/chaos") as publisher:
            subscription = subscribe(server.url, "agent.*", handler, durable="steady")
            async with subscription:
                for i in range(10):
                    publisher.publish(
                        "agent.registered", subject=f"a{i}", data=events_pb2.AgentEventData()
                    )
                await eventually(lambda: len(seen) == 10, timeout=20)
                await server.restart()
                for i in range(10, 20):
                    publisher.publish(
                        "agent.registered", subject=f"a{i}", data=events_pb2.AgentEventData()
                    )
                assert await publisher.flush(30)
                await eventually(lambda: len(seen) == 20, timeout=30)
        assert set(seen.values()) == {1}
    finally:
        await server.stop()
