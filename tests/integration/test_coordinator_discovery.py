"""Configuration only: the embedded NATS registry for agents and real task events on NATS."""

from __future__ import annotations

import contextlib
from pathlib import Path

import pytest

from hivewire.common.v1 import common_pb2
from hivewire.coordinator.v1 import coordinator_pb2, coordinator_pb2_grpc
from hivewire.discovery import open_registry
from hivewire.services.coordinator.app import running_coordinator
from hivewire.services.coordinator.settings import CoordinatorProcessSettings
from hivewire.services.runtime.channels import secure_channel
from hivewire.services.runtime.config import load_settings
from hivewire.services.runtime.events import replay
from tests.conftest import Pki
from tests.helpers import NatsServer, eventually
from tests.support.coordinator_mesh import spec
from tests.support.scripted_agent import serve_scripted_agent

pytestmark = pytest.mark.timeout(60)

C = coordinator_pb2


async def test_agents_from_the_embedded_registry_and_events_on_nats(
    pki: Pki, tmp_path: Path, nats_server: NatsServer
) -> None:
    settings = load_settings(
        CoordinatorProcessSettings,
        host="127.0.0.1",
        port=0,
        certs_dir=pki.dir,
        identity="coordinator",
        grace_period=1.0,
        discovery="nats",
        nats_url=nats_server.url,
        coordinator={"db_path": tmp_path / "c.db"},
    )
    async with contextlib.AsyncExitStack() as stack:
        running = await stack.enter_async_context(running_coordinator(settings))
        channel = secure_channel(running.address, pki.files("client"))
        stack.push_async_callback(channel.close)
        client: coordinator_pb2_grpc.CoordinatorServiceAsyncStub = (
            coordinator_pb2_grpc.CoordinatorServiceStub(channel)
        )
        task = (await client.SubmitTask(C.SubmitTaskRequest(spec=spec(script={"steps": 1})))).task

        # An agent in another registry client (as in another process) joins later.
        registry = open_registry("nats", nats_url=nats_server.url)
        await stack.enter_async_context(registry)
        async with serve_scripted_agent(registry, pki.dir, name="kv-agent") as (agent, _):
            events = [
                r.event async for r in client.WatchTask(C.WatchTaskRequest(task_id=task.task_id))
            ]
            assert events[-1].finished.state == common_pb2.TASK_STATE_SUCCEEDED
            assert [e.task_id for e in agent.stats.executions] == [task.task_id]
        # Leaving the registry takes it out of the coordinator's pool.
        await eventually(lambda: running.pool.views() == [], timeout=20)

        # The same task history went to NATS, numbered like the gRPC stream.
        async def published() -> dict[str, int]:
            found = {
                received.event.type: received.event.task_sequence
                async for received in replay(nats_server.url, "task.*")
                if received.event.subject == task.task_id
            }
            assert "task.completed" in found
            return found

        found = await eventually(published, timeout=20)
        by_sequence = {e.sequence: e for e in events}
        assert found["task.created"] == 1
        assert by_sequence[found["task.completed"]].HasField("finished")
        assert by_sequence[found["task.started"]].state_changed.to_state == (
            common_pb2.TASK_STATE_RUNNING
        )
