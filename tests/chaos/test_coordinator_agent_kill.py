"""kill -9 an agent with tasks running on it: they run again elsewhere, none is lost."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path

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


async def test_killed_agent_tasks_are_retried_on_another(pki: Pki, tmp_path: Path) -> None:
    async with contextlib.AsyncExitStack() as stack:
        nats = await stack.enter_async_context(NatsServer(tmp_path / "nats"))
        coordinator = await stack.enter_async_context(
            coordinator_process(
                tmp_path, certs_dir=pki.dir, nats_url=nats.url, db_path=tmp_path / "c.db"
            )
        )
        victim, survivor = (
            agent_process(
                tmp_path, PACED, name=name, certs_dir=pki.dir, nats_url=nats.url, max_concurrency=4
            )
            for name in ("victim", "survivor")
        )
        await asyncio.gather(victim.start(), survivor.start())
        stack.push_async_callback(survivor.terminate)
        channel = secure_channel(coordinator.address, pki.files("client"))
        stack.push_async_callback(channel.close)
        client: coordinator_pb2_grpc.CoordinatorServiceAsyncStub = (
            coordinator_pb2_grpc.CoordinatorServiceStub(channel)
        )
        agents = await wait_for_agents(client, 2)
        victim_id = next(a.agent_id for a in agents if a.card.name == "victim")

        payload = S.Payload(
            json=json_format.ParseDict({"steps": 20, "interval": 0.05}, struct_pb2.Struct())
        )
        ids = [
            (
                await client.SubmitTask(
                    C.SubmitTaskRequest(spec=C.TaskSpec(capability="count", input=payload))
                )
            ).task.task_id
            for _ in range(8)
        ]

        async def victim_busy() -> None:
            response = await client.ListAgents(C.ListAgentsRequest())
            loads = {a.agent_id: a.in_flight for a in response.agents}
            assert loads.get(victim_id, 0) >= 2

        await eventually(victim_busy, timeout=30)
        await victim.kill()

        for task_id in ids:
            events = [r.event async for r in client.WatchTask(C.WatchTaskRequest(task_id=task_id))]
            assert events[-1].finished.state == S.TASK_STATE_SUCCEEDED, task_id
            sequences = [e.sequence for e in events]
            assert sequences == list(range(1, len(sequences) + 1))
        tasks = [(await client.GetTask(C.GetTaskRequest(task_id=t))).task for t in ids]
        moved = [t for t in tasks if any(a.agent_id == victim_id for a in t.attempts)]
        assert len(moved) >= 2
        for task in moved:
            # The broken attempt is recorded; the task finished on the survivor.
            # Killed mid-stream (UNAVAILABLE) or before the call connected (UNREACHABLE).
            assert task.attempts[0].error.reason in {"AGENT_UNAVAILABLE", "AGENT_UNREACHABLE"}
            assert task.attempts[-1].agent_id != victim_id
            assert task.output.json["attempt"] == task.attempts[-1].attempt
