"""kill -9 the coordinator in the middle of a plan, and in the middle of its saga.

Real processes: nats-server, the coordinator, SDK agents. After the restart the plan
goes on from where it was: steps that had succeeded are never run again, a step that
was running runs again as a new attempt, a saga finishes its compensations, and a
client following the plan resumes with no gap and no repeat.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import json_format, struct_pb2

from hivewire.common.v1 import common_pb2
from hivewire.coordinator.v1 import coordinator_pb2, coordinator_pb2_grpc
from hivewire.services.runtime.channels import secure_channel
from tests.conftest import Pki
from tests.helpers import NatsServer, ServiceProcess, eventually
from tests.support.e2e_mesh import PACED, agent_process, coordinator_process, wait_for_agents

pytestmark = pytest.mark.timeout(180)

S = common_pb2
C = coordinator_pb2
Stub = Any  # coordinator_pb2_grpc.CoordinatorServiceAsyncStub (a typing-only name)


def counting(
    step_id: str, steps: int, interval: float, *deps: str, undo: bool = False
) -> C.PlanStep:
    payload = S.Payload(
        json=json_format.ParseDict({"steps": steps, "interval": interval}, struct_pb2.Struct())
    )
    return C.PlanStep(
        step_id=step_id,
        capability="count",
        input=payload,
        depends_on=list(deps),
        compensation_capability="undo" if undo else "",
    )


@contextlib.asynccontextmanager
async def mesh(pki: Pki, tmp_path: Path) -> AsyncIterator[tuple[ServiceProcess, Stub]]:
    async with contextlib.AsyncExitStack() as stack:
        nats = await stack.enter_async_context(NatsServer(tmp_path / "nats"))
        coordinator = coordinator_process(
            tmp_path, certs_dir=pki.dir, nats_url=nats.url, db_path=tmp_path / "c.db"
        )
        await stack.enter_async_context(coordinator)
        for i in range(2):
            agent = agent_process(
                tmp_path, PACED, name=f"paced-{i}", certs_dir=pki.dir, nats_url=nats.url
            )
            await stack.enter_async_context(agent)
        channel = secure_channel(coordinator.address, pki.files("client"))
        stack.push_async_callback(channel.close)
        client: Stub = coordinator_pb2_grpc.CoordinatorServiceStub(channel)
        await wait_for_agents(client, 2)
        yield coordinator, client


async def statuses(client: Stub, task_id: str) -> dict[str, int]:
    task = (await client.GetTask(C.GetTaskRequest(task_id=task_id))).task
    return {s.step_id: s.state for s in task.steps}


async def follow_until_killed(client: Stub, task_id: str, seen: list[C.TaskEvent]) -> None:
    with contextlib.suppress(grpc.aio.AioRpcError):
        async for response in client.WatchTask(C.WatchTaskRequest(task_id=task_id)):
            seen.append(response.event)


async def resume(
    pki: Pki, coordinator: ServiceProcess, task_id: str, after: int
) -> tuple[list[C.TaskEvent], Stub, grpc.aio.Channel]:
    channel = secure_channel(coordinator.address, pki.files("client"))
    client: Stub = coordinator_pb2_grpc.CoordinatorServiceStub(channel)
    await wait_for_agents(client, 2)
    rest = [
        r.event
        async for r in client.WatchTask(C.WatchTaskRequest(task_id=task_id, after_sequence=after))
    ]
    return rest, client, channel


async def test_kill_dash_nine_mid_plan_reruns_no_succeeded_step(pki: Pki, tmp_path: Path) -> None:
    async with mesh(pki, tmp_path) as (coordinator, client):
        plan = C.Plan(
            steps=[
                counting("quick-1", 1, 0.0),
                counting("quick-2", 1, 0.0),
                counting("slow", 60, 0.05),
                counting("last", 2, 0.0, "quick-1", "quick-2", "slow"),
            ]
        )
        parent = (await client.SubmitTask(C.SubmitTaskRequest(spec=C.TaskSpec(plan=plan)))).task
        seen: list[C.TaskEvent] = []
        follower = asyncio.create_task(follow_until_killed(client, parent.task_id, seen))

        async def half_done() -> None:
            states = await statuses(client, parent.task_id)
            assert states["quick-1"] == states["quick-2"] == S.TASK_STATE_SUCCEEDED
            assert states["slow"] == S.TASK_STATE_RUNNING
            assert any(
                e.step.kind == C.STEP_EVENT_KIND_PROGRESS for e in seen if e.HasField("step")
            )

        await eventually(half_done, timeout=30)
        await coordinator.kill()
        await follower
        await coordinator.start()
        rest, client, channel = await resume(pki, coordinator, parent.task_id, seen[-1].sequence)
        try:
            sequences = [e.sequence for e in seen + rest]
            assert sequences == list(range(1, len(sequences) + 1))
            assert rest[-1].finished.state == S.TASK_STATE_SUCCEEDED
            steps = (
                await client.ListTasks(C.ListTasksRequest(parent_task_id=parent.task_id))
            ).tasks
            by_step = {t.step_id: t for t in steps}
            # One task per step: nothing was started twice.
            assert sorted(t.step_id for t in steps) == ["last", "quick-1", "quick-2", "slow"]
            for quick in ("quick-1", "quick-2"):
                assert [a.attempt for a in by_step[quick].attempts] == [1]
            slow = by_step["slow"]
            assert slow.attempts[0].error.reason == "COORDINATOR_RESTARTED"
            assert slow.output.json["attempt"] >= 2
            assert all(t.state == S.TASK_STATE_SUCCEEDED for t in steps)
        finally:
            await channel.close()


async def test_kill_dash_nine_mid_saga_finishes_the_compensations(pki: Pki, tmp_path: Path) -> None:
    async with mesh(pki, tmp_path) as (coordinator, client):
        plan = C.Plan(
            steps=[
                counting("first", 1, 0.0, undo=True),
                counting("second", 1, 0.0, "first", undo=True),
                C.PlanStep(step_id="third", capability="fail", depends_on=["second"]),
            ]
        )
        parent = (await client.SubmitTask(C.SubmitTaskRequest(spec=C.TaskSpec(plan=plan)))).task
        seen: list[C.TaskEvent] = []
        follower = asyncio.create_task(follow_until_killed(client, parent.task_id, seen))

        async def compensating() -> None:
            started = [
                e.step
                for e in seen
                if e.HasField("step") and e.step.kind == C.STEP_EVENT_KIND_COMPENSATION_STARTED
            ]
            assert [s.step_id for s in started] == ["second"]
            # Killed while the compensation runs on an agent, not merely queued.
            undo = (await client.GetTask(C.GetTaskRequest(task_id=started[0].task_id))).task
            assert undo.state == S.TASK_STATE_RUNNING and undo.progress.fraction > 0

        await eventually(compensating, timeout=30)
        await coordinator.kill()
        await follower
        await coordinator.start()
        rest, client, channel = await resume(pki, coordinator, parent.task_id, seen[-1].sequence)
        try:
            events = seen + rest
            assert [e.sequence for e in events] == list(range(1, len(events) + 1))
            assert rest[-1].finished.state == S.TASK_STATE_FAILED
            assert rest[-1].finished.error.reason == "STEP_FAILED"
            saga = [
                (e.step.step_id, e.step.kind)
                for e in events
                if e.HasField("step")
                and e.step.kind
                in (C.STEP_EVENT_KIND_COMPENSATION_STARTED, C.STEP_EVENT_KIND_COMPENSATION_FINISHED)
            ]
            assert saga == [
                ("second", C.STEP_EVENT_KIND_COMPENSATION_STARTED),
                ("second", C.STEP_EVENT_KIND_COMPENSATION_FINISHED),
                ("first", C.STEP_EVENT_KIND_COMPENSATION_STARTED),
                ("first", C.STEP_EVENT_KIND_COMPENSATION_FINISHED),
            ]
            task = (await client.GetTask(C.GetTaskRequest(task_id=parent.task_id))).task
            assert {
                s.step_id: s.compensation_state for s in task.steps if s.compensation_task_id
            } == {
                "second": S.TASK_STATE_SUCCEEDED,
                "first": S.TASK_STATE_SUCCEEDED,
            }
            # The interrupted compensation ran again as a new attempt of the same task.
            children = (
                await client.ListTasks(C.ListTasksRequest(parent_task_id=parent.task_id))
            ).tasks
            undo_second = [
                t for t in children if t.role == C.TASK_ROLE_COMPENSATION and t.step_id == "second"
            ]
            assert len(undo_second) == 1
            assert undo_second[0].attempts[0].error.reason == "COORDINATOR_RESTARTED"
        finally:
            await channel.close()
