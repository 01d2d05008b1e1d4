"""The JetStream task store on a 3-node cluster that loses its quorum and gets it back.

A coordinator that starts while the cluster is still forming (or electing a bucket's
leader) lists its buckets' keys before it serves; a listing that fails then must wait
for JetStream, as every other store operation does, not end the process.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import nats.errors
import pytest

from hivewire.services.coordinator.jetstream_store import JetStreamTaskStore, list_keys
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
        await cluster.restart(1)
        await cluster.restart(2)
        assert set(await asyncio.wait_for(listing, 60)) == {"coordinator-a", "coordinator-b"}
