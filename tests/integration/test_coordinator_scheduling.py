"""Scheduling over real agents: capabilities, load, limits, priorities, retries, deadlines."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from prometheus_client import REGISTRY

from hivewire.common.v1 import common_pb2
from hivewire.coordinator.v1 import coordinator_pb2
from hivewire.discovery import Instance
from hivewire.services.runtime import metadata as md
from tests.conftest import Pki
from tests.helpers import eventually, reserved_port
from tests.support.coordinator_mesh import Mesh, assert_contiguous, collect, kinds, spec, start_mesh

pytestmark = pytest.mark.timeout(60)

S = common_pb2
C = coordinator_pb2


@pytest.fixture
async def mesh(pki: Pki, tmp_path: Path) -> AsyncIterator[Mesh]:
    async with start_mesh(pki.dir, tmp_path / "coordinator.db", breaker_failure_threshold=2) as m:
        yield m


async def submit(mesh: Mesh, task_spec: C.TaskSpec) -> C.Task:
    return (await mesh.client().SubmitTask(C.SubmitTaskRequest(spec=task_spec))).task


async def finish(mesh: Mesh, task_id: str) -> list[C.TaskEvent]:
    return await collect(mesh.client().WatchTask(C.WatchTaskRequest(task_id=task_id)))


async def test_queued_task_waits_for_an_agent_with_its_capability(mesh: Mesh) -> None:
    task = await submit(mesh, spec("summarize"))
    other = await mesh.agent("other", capabilities=("echo",))
    # An agent without the capability never gets it.
    await eventually(lambda: len(mesh.running.pool.views()) == 1)
    assert mesh.running.coordinator.queue_depth() == 1
    assert (
        REGISTRY.get_sample_value("hivewire_coordinator_queue_depth", {"priority": "medium"}) == 1
    )
    assert REGISTRY.get_sample_value("hivewire_coordinator_tasks_active", {"state": "queued"}) == 1
    watcher = asyncio.create_task(finish(mesh, task.task_id))
    right = await mesh.agent("right", capabilities=("summarize",))
    events = await watcher
    assert events[-1].finished.state == S.TASK_STATE_SUCCEEDED
    assert [e.task_id for e in right.stats.executions] == [task.task_id]
    assert other.stats.executions == []


async def test_never_over_max_concurrency(mesh: Mesh) -> None:
    agent = await mesh.agent(max_concurrency=2)
    tasks = [await submit(mesh, spec(script={"gate": "open"})) for _ in range(6)]
    await agent.wait_started(2)
    # Two run, four wait: the coordinator holds them back rather than overloading.
    await eventually(lambda: mesh.running.coordinator.queue_depth() == 4)
    assert agent.stats.in_flight == 2
    agent.gate("open").set()
    results = await asyncio.gather(*(finish(mesh, t.task_id) for t in tasks))
    assert all(r[-1].finished.state == S.TASK_STATE_SUCCEEDED for r in results)
    assert agent.stats.max_in_flight == 2
    assert len(agent.stats.executions) == 6


async def test_priority_order_when_an_agent_frees_up(mesh: Mesh) -> None:
    agent = await mesh.agent(max_concurrency=1)
    blocker = await submit(mesh, spec(script={"gate": "b"}))
    await agent.wait_started()
    order = [S.PRIORITY_LOW, S.PRIORITY_MEDIUM, S.PRIORITY_CRITICAL, S.PRIORITY_HIGH]
    queued = {p: [await submit(mesh, spec(priority=p)) for _ in range(2)] for p in order}
    agent.gate("b").set()
    ids = [t.task_id for tasks in queued.values() for t in tasks]
    await asyncio.gather(*(finish(mesh, task_id) for task_id in [blocker.task_id, *ids]))
    ran = [e.task_id for e in agent.stats.executions[1:]]
    expected = [
        t.task_id
        for p in (S.PRIORITY_CRITICAL, S.PRIORITY_HIGH, S.PRIORITY_MEDIUM, S.PRIORITY_LOW)
        for t in queued[p]
    ]
    assert ran == expected


async def test_least_loaded_agent_gets_the_next_task(mesh: Mesh) -> None:
    busy = await mesh.agent("busy", max_concurrency=8)
    for _ in range(3):
        await submit(mesh, spec(script={"gate": "hold"}))
    await busy.wait_started(3)
    idle = await mesh.agent("idle", max_concurrency=8)
    await eventually(lambda: len(mesh.running.pool.views()) == 2)
    task = await submit(mesh, spec())
    await finish(mesh, task.task_id)
    assert [e.task_id for e in idle.stats.executions] == [task.task_id]
    busy.gate("hold").set()


async def test_an_agent_that_leaves_gets_no_more_tasks(mesh: Mesh) -> None:
    stays = await mesh.agent("stays", max_concurrency=1)
    blocker = await submit(mesh, spec(script={"gate": "g"}))
    await stays.wait_started()
    async with mesh.temporary_agent("leaves", max_concurrency=4) as leaves:
        await eventually(lambda: len(mesh.running.pool.views()) == 2)
    await eventually(lambda: len(mesh.running.pool.views()) == 1)
    task = await submit(mesh, spec())
    stays.gate("g").set()
    await finish(mesh, blocker.task_id)
    assert (await finish(mesh, task.task_id))[-1].finished.state == S.TASK_STATE_SUCCEEDED
    assert leaves.stats.executions == []
    assert [e.task_id for e in stays.stats.executions] == [blocker.task_id, task.task_id]


async def test_retryable_failure_retries_on_another_agent(mesh: Mesh) -> None:
    first = await mesh.agent("first")
    second = await mesh.agent("second")
    await eventually(lambda: len(mesh.running.pool.views()) == 2)
    task = await submit(mesh, spec(script={"fail_attempts": 1}))
    events = await finish(mesh, task.task_id)
    assert_contiguous(events)
    assert events[-1].finished.state == S.TASK_STATE_SUCCEEDED
    retries = [e.retry for e in events if e.HasField("retry")]
    assert len(retries) == 1 and retries[0].failed_attempt == 1
    assert retries[0].error.reason == "SCRIPTED_FAILURE"
    executions = first.stats.executions + second.stats.executions
    assert sorted(e.attempt for e in executions) == [1, 2]
    # The second attempt went to the other agent.
    assert {e.attempt for e in first.stats.executions} != {
        e.attempt for e in second.stats.executions
    }
    final = (await mesh.client().GetTask(C.GetTaskRequest(task_id=task.task_id))).task
    assert [a.attempt for a in final.attempts] == [1, 2]
    assert final.attempts[0].error.reason == "SCRIPTED_FAILURE"
    assert final.usage.total_tokens == 5 + 7
    assert "task.retried" in mesh.events.types_for(task.task_id)


async def test_attempts_exhausted_dead_letters_and_permanent_fails_fast(mesh: Mesh) -> None:
    agent = await mesh.agent()
    retrying = await submit(mesh, spec(script={"fail": "retryable"}, max_attempts=3))
    events = await finish(mesh, retrying.task_id)
    assert events[-1].finished.state == S.TASK_STATE_DEAD_LETTERED
    assert events[-1].finished.error.reason == "SCRIPTED_FAILURE"
    assert kinds(events).count("retry") == 2
    dead = (await mesh.client().GetTask(C.GetTaskRequest(task_id=retrying.task_id))).task
    assert len(dead.attempts) == 3 and all(a.HasField("error") for a in dead.attempts)

    permanent = await submit(mesh, spec(script={"fail": "permanent"}))
    events = await finish(mesh, permanent.task_id)
    assert events[-1].finished.state == S.TASK_STATE_FAILED
    assert events[-1].finished.error.code == "INVALID_ARGUMENT"
    assert "retry" not in kinds(events)
    assert [e.attempt for e in agent.stats.executions if e.task_id == permanent.task_id] == [1]
    assert "task.dead_lettered" in mesh.events.types_for(retrying.task_id)
    assert "task.failed" in mesh.events.types_for(permanent.task_id)


async def test_broken_agent_opens_its_circuit_and_tasks_go_elsewhere(mesh: Mesh) -> None:
    broken = await mesh.agent("broken", capabilities=("flaky",))
    tasks = [
        await submit(mesh, spec("flaky", script={"abort": "UNAVAILABLE"}, max_attempts=1))
        for _ in range(2)
    ]
    for task in tasks:
        events = await finish(mesh, task.task_id)
        assert events[-1].finished.state == S.TASK_STATE_DEAD_LETTERED
        assert events[-1].finished.error.reason == "AGENT_UNAVAILABLE"
    # Two transport failures in a row (the threshold here) open the circuit.
    response = await mesh.client().ListAgents(C.ListAgentsRequest())
    assert [a.circuit_open for a in response.agents] == [True]
    # ...and the coordinator says so on the event bus (agent.health_changed).
    health = [d for t, _, d, _ in mesh.events.published if t == "agent.health_changed"]
    assert [(d.agent_id, d.healthy, d.circuit_state) for d in health] == [  # type: ignore[attr-defined]
        (broken.agent_id, False, "open")
    ]
    assert health[0].reason == "circuit open"  # type: ignore[attr-defined]
    # While it is open, new tasks wait rather than go to it.
    waiting = await submit(mesh, spec("flaky"))
    await eventually(lambda: mesh.running.coordinator.queue_depth() == 1)
    assert len(broken.stats.executions) == 2
    healthy = await mesh.agent("healthy", capabilities=("flaky",))
    assert (await finish(mesh, waiting.task_id))[-1].finished.state == S.TASK_STATE_SUCCEEDED
    assert [e.task_id for e in healthy.stats.executions] == [waiting.task_id]


async def test_deadline_passes_while_running(mesh: Mesh) -> None:
    agent = await mesh.agent()
    task = await submit(mesh, spec(script={"sleep": 30}, timeout=0.5, token_budget=1000))
    events = await finish(mesh, task.task_id)
    assert events[-1].finished.state == S.TASK_STATE_FAILED
    assert events[-1].finished.error.code == "DEADLINE_EXCEEDED"
    assert events[-1].finished.error.reason == "DEADLINE_EXCEEDED"
    execution = agent.stats.executions[0]
    # The task timeout is the Execute call's deadline; the token budget travels along.
    # (gRPC rounds the wire deadline up to the millisecond.)
    assert execution.time_remaining is not None and execution.time_remaining <= 0.505
    assert execution.metadata[md.TOKEN_BUDGET] == "1000"
    assert execution.assignment.deadline.ToNanoseconds() > 0
    await eventually(lambda: execution.finished)


async def test_deadline_passes_while_queued(mesh: Mesh) -> None:
    task = await submit(mesh, spec("nobody", timeout=0.2))
    events = await finish(mesh, task.task_id)
    assert events[-1].finished.state == S.TASK_STATE_FAILED
    assert events[-1].finished.error.reason == "DEADLINE_EXCEEDED"


async def test_two_hundred_tasks_over_three_agents(mesh: Mesh) -> None:
    agents = [await mesh.agent(f"a{i}", max_concurrency=8) for i in range(3)]
    await eventually(lambda: len(mesh.running.pool.views()) == 3)
    client = mesh.client()
    priorities = [S.PRIORITY_LOW, S.PRIORITY_MEDIUM, S.PRIORITY_HIGH, S.PRIORITY_CRITICAL]
    submitted = await asyncio.gather(
        *(
            client.SubmitTask(
                C.SubmitTaskRequest(spec=spec(text=str(i), priority=priorities[i % 4]))
            )
            for i in range(200)
        )
    )
    ids = {r.task.task_id for r in submitted}
    assert len(ids) == 200
    results = await asyncio.gather(*(finish(mesh, task_id) for task_id in ids))
    assert all(r[-1].finished.state == S.TASK_STATE_SUCCEEDED for r in results)
    executed = [e.task_id for a in agents for e in a.stats.executions]
    assert sorted(executed) == sorted(ids)  # every task ran exactly once
    assert all(a.stats.max_in_flight <= 8 for a in agents)
    assert all(a.stats.executions for a in agents)
    with pytest.raises(grpc.aio.AioRpcError):
        await client.CancelTask(C.CancelTaskRequest(task_id=next(iter(ids))))


async def test_an_unreachable_agent_does_not_use_up_attempts(mesh: Mesh) -> None:
    # Registered but nobody listens there (a crashed agent not yet expired).
    ghost = Instance(
        service="hivewire-agent",
        instance_id="ghost-00000000",
        address="127.0.0.1",
        port=reserved_port(),
        tags=("echo",),
        meta={"name": "ghost", "max_concurrency": "4"},
    )
    await mesh.registry.register(ghost)
    task = await submit(mesh, spec(max_attempts=1))

    async def bounced() -> None:
        current = (await mesh.client().GetTask(C.GetTaskRequest(task_id=task.task_id))).task
        assert current.attempts and current.attempts[0].error.reason == "AGENT_UNREACHABLE"
        assert current.state == S.TASK_STATE_QUEUED

    await eventually(bounced)
    real = await mesh.agent("real")
    events = await finish(mesh, task.task_id)
    assert events[-1].finished.state == S.TASK_STATE_SUCCEEDED
    assert [e.task_id for e in real.stats.executions] == [task.task_id]
