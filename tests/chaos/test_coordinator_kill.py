"""kill -9 the coordinator with tasks queued, running and being submitted: nothing is lost."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path

import grpc
import pytest
from google.protobuf import json_format, struct_pb2

from hivewire.common.v1 import common_pb2
from hivewire.coordinator.v1 import coordinator_pb2, coordinator_pb2_grpc
from hivewire.services.runtime.channels import secure_channel
from tests.conftest import Pki
from tests.helpers import NatsServer, eventually
from tests.support.e2e_mesh import PACED, agent_process, coordinator_process, wait_for_agents

pytestmark = pytest.mark.timeout(180)

S = common_pb2
C = coordinator_pb2


def count_spec(steps: int, interval: float, *, key: str = "") -> C.TaskSpec:
    payload = S.Payload(
        json=json_format.ParseDict({"steps": steps, "interval": interval}, struct_pb2.Struct())
    )
    return C.TaskSpec(capability="count", input=payload, idempotency_key=key)


async def test_kill_dash_nine_loses_no_accepted_task(pki: Pki, tmp_path: Path) -> None:
    async with contextlib.AsyncExitStack() as stack:
        nats = await stack.enter_async_context(NatsServer(tmp_path / "nats"))
        coordinator = coordinator_process(
            tmp_path, certs_dir=pki.dir, nats_url=nats.url, db_path=tmp_path / "c.db"
        )
        await stack.enter_async_context(coordinator)
        agents = [
            agent_process(
                tmp_path,
                PACED,
                name=f"slow-{i}",
                certs_dir=pki.dir,
                nats_url=nats.url,
                max_concurrency=2,
            )
            for i in range(2)
        ]
        await asyncio.gather(*(a.start() for a in agents))
        for agent in agents:
            stack.push_async_callback(agent.terminate)

        channel = secure_channel(coordinator.address, pki.files("client"))
        client: coordinator_pb2_grpc.CoordinatorServiceAsyncStub = (
            coordinator_pb2_grpc.CoordinatorServiceStub(channel)
        )
        await wait_for_agents(client, 2)

        accepted: list[str] = []
        keyed = (
            await client.SubmitTask(C.SubmitTaskRequest(spec=count_spec(20, 0.05, key="once")))
        ).task
        accepted.append(keyed.task_id)
        for _ in range(10):
            task = (await client.SubmitTask(C.SubmitTaskRequest(spec=count_spec(20, 0.05)))).task
            accepted.append(task.task_id)

        # A client follows one running task until just before the crash.
        followed = accepted[0]
        seen: list[C.TaskEvent] = []

        async def follow() -> None:
            with contextlib.suppress(grpc.aio.AioRpcError):
                async for response in client.WatchTask(C.WatchTaskRequest(task_id=followed)):
                    seen.append(response.event)

        follower = asyncio.create_task(follow())

        # Submissions keep arriving while the coordinator dies: every one it answered
        # must survive.
        async def keep_submitting() -> None:
            for _ in range(2000):
                try:
                    response = await client.SubmitTask(
                        C.SubmitTaskRequest(spec=count_spec(2, 0.0)), timeout=5
                    )
                except grpc.aio.AioRpcError:
                    return
                accepted.append(response.task.task_id)

        submitter = asyncio.create_task(keep_submitting())

        async def running_and_queued() -> None:
            response = await client.ListTasks(C.ListTasksRequest(page_size=500))
            states = [t.state for t in response.tasks]
            assert S.TASK_STATE_RUNNING in states and S.TASK_STATE_QUEUED in states
            assert any(e.HasField("progress") for e in seen)

        await eventually(running_and_queued, timeout=30)
        await coordinator.kill()
        await submitter
        await follower
        await channel.close()
        running_at_kill = {e.task_id for e in seen if e.HasField("progress")}
        assert followed in running_at_kill

        await coordinator.start()
        channel = secure_channel(coordinator.address, pki.files("client"))
        stack.push_async_callback(channel.close)
        client = coordinator_pb2_grpc.CoordinatorServiceStub(channel)

        again = await client.SubmitTask(C.SubmitTaskRequest(spec=count_spec(20, 0.05, key="once")))
        assert again.deduplicated and again.task.task_id == keyed.task_id

        # The follower resumes where it stopped: nothing missed, nothing repeated.
        rest = [
            r.event
            async for r in client.WatchTask(
                C.WatchTaskRequest(task_id=followed, after_sequence=seen[-1].sequence)
            )
        ]
        sequences = [e.sequence for e in seen + rest]
        assert sequences == list(range(1, len(sequences) + 1))
        assert rest[-1].finished.state == S.TASK_STATE_SUCCEEDED
        # It ran again as a new attempt, and the agent saw the attempt number.
        assert rest[-1].finished.output.json["attempt"] >= 2

        # Every task the coordinator ever answered for completes, each exactly once.
        interrupted = 0
        for task_id in accepted:
            events = [r.event async for r in client.WatchTask(C.WatchTaskRequest(task_id=task_id))]
            assert events[-1].finished.state == S.TASK_STATE_SUCCEEDED, task_id
            sequences = [e.sequence for e in events]
            assert sequences == list(range(1, len(sequences) + 1))
            task = (await client.GetTask(C.GetTaskRequest(task_id=task_id))).task
            restarted = [a for a in task.attempts if a.error.reason == "COORDINATOR_RESTARTED"]
            interrupted += bool(restarted)
            # One successful attempt only: a task is never finished twice.
            assert [a for a in task.attempts if not a.HasField("error")] == [task.attempts[-1]]
        assert interrupted >= 1
