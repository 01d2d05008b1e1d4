"""An attempt's agent slot is given back on every path, also a cancel before it ran."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from hivewire.coordinator.v1 import coordinator_pb2 as C
from hivewire.services.coordinator.attempts import Attempt
from tests.conftest import Pki
from tests.helpers import eventually
from tests.integration.test_coordinator_link import Worker, registered_agent
from tests.support.coordinator_mesh import collect, spec, start_mesh

pytestmark = pytest.mark.timeout(60)


async def test_an_attempt_stopped_before_it_ran_gives_its_slot_back(
    pki: Pki, tmp_path: Path
) -> None:
    """A deadline (or a take-over's drop) can cancel an attempt the scheduler has just
    spawned, in the same loop turn: the coroutine then never runs, nor its ``finally``.
    """
    worker = Worker()
    async with (
        start_mesh(pki.dir, tmp_path / "c.db") as mesh,
        registered_agent(mesh, pki, worker),
    ):
        client = mesh.client()
        submitted = await client.SubmitTask(C.SubmitTaskRequest(spec=spec("wait", text="held")))
        await eventually(lambda: worker.running == {"held"}, timeout=10)
        coordinator = mesh.running.coordinator
        rt = coordinator._tasks.active[submitted.task.task_id]
        lease = mesh.running.pool.acquire("wait")
        assert lease is not None
        entry = lease.entry
        assert entry.in_flight == 2
        # What the scheduler does, then what a deadline firing in the same turn does.
        task = coordinator._spawn_attempt(rt, Attempt(number=99, lease=lease))
        task.cancel()
        await asyncio.wait({task})
        assert lease.released and entry.in_flight == 1
        worker.gate("held").set()
        await collect(client.WatchTask(C.WatchTaskRequest(task_id=submitted.task.task_id)))
        await eventually(lambda: entry.in_flight == 0, timeout=10)
