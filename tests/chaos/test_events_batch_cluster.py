"""Atomic event batches on a 3-replica stream whose leader is killed mid-run."""

from __future__ import annotations

import asyncio
from pathlib import Path

from hivewire.services.runtime.events import EventPublisher, StreamSettings, replay
from tests.helpers import eventually
from tests.integration.test_events_publisher import batches, envelopes
from tests.support.nats_cluster import NatsCluster

STREAM = "HIVEWIRE_EVENTS"


async def test_batches_on_a_replicated_stream_survive_its_leader_dying(tmp_path: Path) -> None:
    stored_before = batches("stored")
    async with (
        NatsCluster(tmp_path / "nats", size=3) as cluster,
        EventPublisher(
            cluster.url,
            source="coordinator/c-1",
            stream=StreamSettings(replicas=3),
            window=16,
            batch_min=4,
            publish_timeout=1.0,
        ) as publisher,
    ):
        await asyncio.wait_for(publisher.send(envelopes(1, 100, "task-c")), 60)
        assert batches("stored") > stored_before
        leader = await cluster.stream_leader(STREAM)

        # Batches in flight when the leader dies: the window is sent again to the
        # new leader, and what the old one committed is not stored twice.
        rest = publisher.send(envelopes(101, 600, "task-c"))
        await eventually(lambda: publisher.published >= 140, timeout=30, interval=0.005)
        await cluster.kill(leader)
        await asyncio.wait_for(rest, 90)
        stored = [r.event.id async for r in replay(cluster.url, "task.*")]
        assert stored == [f"task-c:{n}" for n in range(1, 601)]

        await cluster.restart(leader)
        await asyncio.wait_for(publisher.send(envelopes(601, 640, "task-c")), 60)
        stored = [r.event.id async for r in replay(cluster.url, "task.*")]
    assert stored == [f"task-c:{n}" for n in range(1, 641)]
