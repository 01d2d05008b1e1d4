"""The JetStream task store on a 3-node cluster that loses its quorum and gets it back.

A coordinator that starts while the cluster is still forming (or electing a bucket's
leader) lists its buckets' keys before it serves; a listing that fails then must wait
for JetStream, as every other store operation does, not end the process.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncGenerator
from pathlib import Path

import nats.errors
import pytest

from hivewire.common.v1 import common_pb2
from hivewire.services.coordinator.jetstream_store import JetStreamTaskStore, list_keys
from hivewire.services.coordinator.store import EventRow, TaskRow
from tests.helpers import eventually
from tests.support.nats_cluster import NatsCluster


async def test_a_listing_waits_for_the_quorum_and_then_answers(tmp_path: Path) -> None:
    async with (
        NatsCluster(tmp_path / "nats", size=3) as cluster,
        JetStreamTaskStore(cluster.url.split(","), replicas=3) as store,
    ):
        await store.members.put("coordinator-a", b"1")
        await store.members.put("coordinator-b", b"1")
        assert set(await store.keys(store.members)) == {"coordinator-a", "coordinator-b"}

        # Two of three nodes gone: the buckets have no leader, a listing fails.
        await cluster.kill(1)
        await cluster.kill(2)
        with pytest.raises((nats.errors.Error, TimeoutError)):
            await list_keys(store.members)

        listing = asyncio.create_task(store.keys(store.members))
        await cluster.restart(1, wait=False)
        await cluster.restart(2, wait=False)
        await cluster.wait_healthy(timeout=60)
        assert set(await asyncio.wait_for(listing, 60)) == {"coordinator-a", "coordinator-b"}


async def test_following_a_journal_waits_for_the_quorum_and_then_reads_it(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """``WatchTask`` of a task another coordinator runs, while the stream has no leader.

    Its journal index is this store's own (no read of the stream), so the first call to
    JetStream is the ordered consumer's creation: that too waits for the quorum.
    """
    async with (
        NatsCluster(tmp_path / "nats", size=3) as cluster,
        JetStreamTaskStore(cluster.url.split(","), replicas=3) as store,
    ):
        task = TaskRow(
            task_id="t1",
            owner="spiffe://hivewire.local/client/alice",
            capability="echo",
            state=common_pb2.TASK_STATE_RUNNING,
            priority=common_pb2.PRIORITY_MEDIUM,
            created_ns=1,
            updated_ns=1,
            deadline_ns=10**18,
            idempotency_key="",
            not_before_ns=0,
            last_sequence=1,
            spec=b"spec",
            data=b"d",
        )
        await store.put(tasks=[task], events=[EventRow("t1", 1, b"first")])

        await cluster.kill(1)
        await cluster.kill(2)
        follow = store.follow_events("t1", 0, idle=0.5)
        first = asyncio.create_task(_next_event(follow))
        # Until the consumer's creation has failed once (then it waits and tries again).
        caplog.set_level(logging.WARNING, logger="hivewire.services.coordinator.jetstream_store")
        await eventually(
            lambda: (
                first.done()
                or any("JetStream unavailable" in r.getMessage() for r in caplog.records)
            ),
            timeout=60,
        )
        assert not first.done(), first.exception()
        # Both back before waiting: a stream group with one of two nodes back can be slow
        # to become current on a loaded machine.
        await cluster.restart(1, wait=False)
        await cluster.restart(2, wait=False)
        await cluster.wait_healthy(timeout=60)
        event = await asyncio.wait_for(first, 60)
        assert (event.task_id, event.sequence, event.data) == ("t1", 1, b"first")
        await follow.aclose()


async def _next_event(follow: AsyncGenerator[EventRow | None, None]) -> EventRow:
    async for event in follow:
        if event is not None:
            return event
    raise AssertionError("the journal ended")
