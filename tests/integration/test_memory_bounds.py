"""2,000 tasks through a small real mesh leave nothing per task behind (not timed).

Tasks end every way a task can end (succeeded, failed, cancelled, timed out), then the
coordinator's and the agent's per-task structures are read back by their own
introspection: everything keyed by an unfinished task is empty, everything keyed by
a finished one is within its setting. A structure that keeps an entry per finished
task fails this test long before it shows up as memory growth in a soak.
"""

from __future__ import annotations

import asyncio
import itertools
from pathlib import Path

import pytest

from hivewire.common.v1 import common_pb2
from hivewire.coordinator.v1 import coordinator_pb2
from hivewire.services.runtime.metrics import REGISTRY
from tests.conftest import Pki
from tests.helpers import NatsServer, eventually
from tests.support.memory_mesh import MemoryMesh, memory_mesh

pytestmark = pytest.mark.timeout(600)

S = common_pb2
TASKS = 2000
CONCURRENCY = 16
CACHE = 64
"""finished_cache_size of the coordinator: finished tasks it may keep in memory."""


async def cancelled(mesh: MemoryMesh) -> int:
    spec = coordinator_pb2.TaskSpec(capability="hold", input=S.Payload(text="x"))
    submitted = await mesh.client.SubmitTask(coordinator_pb2.SubmitTaskRequest(spec=spec))
    task_id = submitted.task.task_id
    state = 0
    stream = mesh.client.WatchTask(coordinator_pb2.WatchTaskRequest(task_id=task_id))
    async for response in stream:
        event = response.event
        if event.WhichOneof("kind") == "state_changed" and (
            event.state_changed.to_state == S.TASK_STATE_RUNNING
        ):
            await mesh.client.CancelTask(coordinator_pb2.CancelTaskRequest(task_id=task_id))
        if event.WhichOneof("kind") == "finished":
            state = event.finished.state
    return state


async def dropped_stream(mesh: MemoryMesh) -> None:
    """A client that goes away in the middle of a StreamTask (the task goes on)."""
    spec = coordinator_pb2.TaskSpec(capability="noop", input=S.Payload(text="x"))
    call = mesh.client.StreamTask(coordinator_pb2.StreamTaskRequest(spec=spec))
    async for _ in call:
        call.cancel()
        break


async def test_per_task_structures_are_empty_after_2000_tasks(
    pki: Pki, tmp_path: Path, nats_server: NatsServer
) -> None:
    async with memory_mesh(
        pki.dir, nats_server.url, tmp_path / "c.db", finished_cache_size=CACHE
    ) as mesh:
        coordinator = mesh.coordinator.coordinator
        runtime = mesh.agent.runtime
        # Connections (NATS, gRPC channels) start their tasks on first use: warm up.
        for capability in ("noop", "fail", "flaky"):
            await mesh.run(capability)
        baseline = asyncio.all_tasks()

        # Every 100th task times out, every 50th is cancelled, every 40th is a client
        # that drops its stream, every 30th is dead-lettered, every 20th fails; the
        # rest succeed (every 10th with an idempotency key).
        outcomes: dict[int, int] = {}
        numbers = itertools.count()

        async def worker() -> None:
            for n in numbers:
                if n >= TASKS:
                    return
                if n % 100 == 99:
                    state = await mesh.run("hold", timeout=0.2)
                elif n % 50 == 49:
                    state = await cancelled(mesh)
                elif n % 40 == 39:
                    await dropped_stream(mesh)
                    state = -1
                elif n % 30 == 29:
                    state = await mesh.run("flaky")
                elif n % 20 == 19:
                    state = await mesh.run("fail")
                else:
                    state = await mesh.run("noop", key=f"key-{n}" if n % 10 == 0 else "")
                outcomes[state] = outcomes.get(state, 0) + 1

        await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))
        assert outcomes[S.TASK_STATE_CANCELLED] == 20
        assert outcomes[-1] == 40
        assert outcomes[S.TASK_STATE_DEAD_LETTERED] > 0
        assert outcomes[S.TASK_STATE_FAILED] > 20  # failures and deadlines
        assert sum(outcomes.values()) == TASKS

        def drained() -> None:
            memory = coordinator.memory()
            assert memory["active_tasks"] == 0, memory
            assert memory["queue_entries"] == 0, memory
            assert memory["delayed_retries"] == 0, memory
            assert memory["background_tasks"] == 0, memory
            assert memory["finished_cache"] <= CACHE, memory
            assert memory["idempotency_keys"] <= CACHE, memory
            assert runtime.in_flight == 0
            assert runtime.stragglers == 0
            # The Link carries every attempt: nothing per attempt stays on either end.
            links = [e.link for e in coordinator._pool._agents.values() if e.link is not None]
            assert links, "the attempts did not run on a Link"
            assert all(not link._attempts and not link._frames for link in links)  # type: ignore[attr-defined]
            sessions = mesh.agent.servicer._links if mesh.agent.servicer else set()
            assert sessions and all(not s._running and s._out.empty() for s in sessions)
            assert REGISTRY.get_sample_value("hivewire_coordinator_watchers") == 0
            # Nothing per task left running in either (client, coordinator, agent).
            left = [t for t in asyncio.all_tasks() - baseline if t is not asyncio.current_task()]
            assert not left, [(t.get_name(), t.get_coro()) for t in left]

        await eventually(drained, timeout=30)

        # An agent that joins, runs tasks and leaves leaves nothing behind either. (The
        # circuit gauge is process-wide: other coordinators of this process count too.)
        def circuits() -> float:
            return sum(
                REGISTRY.get_sample_value("hivewire_coordinator_agent_circuits", {"state": s}) or 0
                for s in ("closed", "open", "half_open")
            )

        before = circuits()
        async with mesh.another_agent() as extra:
            await eventually(lambda: len(coordinator.list_agents("noop")) == 2, timeout=30)
            assert circuits() == before + 1
            await asyncio.gather(*(mesh.run("noop") for _ in range(32)))
        assert extra.runtime.in_flight == 0

        def agent_gone() -> None:
            assert len(coordinator.list_agents()) == 1
            assert circuits() == before

        await eventually(agent_gone, timeout=30)
        await eventually(drained, timeout=30)
        submitted = await mesh.client.ListTasks(coordinator_pb2.ListTasksRequest(page_size=1))
        assert submitted.tasks  # the store keeps them; only memory is bounded
