"""A small real mesh in one process, for memory checks: a coordinator and a real SDK agent.

The coordinator (``running_coordinator``) and the agent (``running_agent``, the real
runtime serving a real :class:`~hivewire.services.agent.Agent`) talk over mTLS gRPC,
find each other in the embedded NATS-KV registry and publish their events on the
given nats-server, exactly as separate processes do. Being in one process lets a test
read their in-memory structures afterwards, and lets ``tracemalloc`` see both.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from hivewire.common.v1 import common_pb2
from hivewire.coordinator.v1 import coordinator_pb2, coordinator_pb2_grpc
from hivewire.services.agent import (
    Agent,
    Payload,
    PermanentError,
    RetryableError,
    TaskContext,
    capability,
)
from hivewire.services.agent.serve import AgentServer, running_agent, settings_for_agent
from hivewire.services.agent.settings import AgentProcessSettings
from hivewire.services.coordinator.app import RunningCoordinator, running_coordinator
from hivewire.services.coordinator.settings import CoordinatorProcessSettings
from hivewire.services.runtime.channels import secure_channel
from hivewire.services.runtime.config import load_settings
from hivewire.services.runtime.tls import TlsFiles
from tests.helpers import eventually


class MemoryAgent(Agent):
    """Capabilities that end every way a task can end."""

    name = "memory"
    version = "1.0.0"
    max_concurrency = 64

    @capability("noop", description="Returns its input text.")
    async def noop(self, task: Payload, ctx: TaskContext) -> str:
        """Succeeds at once."""
        return task.text

    @capability("fail", description="Fails permanently.")
    async def fail(self, task: Payload, ctx: TaskContext) -> str:
        """Fails (a permanent error): the task fails."""
        raise PermanentError("ASKED_TO_FAIL", "asked to fail")

    @capability("flaky", description="Fails with a retryable error, every attempt.")
    async def flaky(self, task: Payload, ctx: TaskContext) -> str:
        """Fails every attempt (retryable): the task is dead-lettered."""
        raise RetryableError("ASKED_TO_FAIL", "asked to fail again")

    @capability("hold", description="Runs until cancelled.")
    async def hold(self, task: Payload, ctx: TaskContext) -> str:
        """Never returns by itself (cancel or deadline ends it)."""
        await asyncio.Event().wait()
        return ""


@dataclass
class MemoryMesh:
    """The running coordinator and agent, and a client stub."""

    coordinator: RunningCoordinator
    agent: AgentServer
    channel: grpc.aio.Channel
    client: coordinator_pb2_grpc.CoordinatorServiceAsyncStub
    agent_settings: Any

    def another_agent(self) -> contextlib.AbstractAsyncContextManager[AgentServer]:
        """One more agent process-alike that leaves (deregisters, stops) when the block ends."""
        return running_agent(MemoryAgent(), self.agent_settings)

    async def run(self, capability: str = "noop", *, timeout: float = 30.0, key: str = "") -> int:
        """Submit one task with StreamTask and follow it to its end; its final state."""
        spec = coordinator_pb2.TaskSpec(
            capability=capability, input=common_pb2.Payload(text="x"), idempotency_key=key
        )
        spec.timeout.FromNanoseconds(int(timeout * 1e9))
        state = 0
        async for response in self.client.StreamTask(coordinator_pb2.StreamTaskRequest(spec=spec)):
            if response.event.WhichOneof("kind") == "finished":
                state = response.event.finished.state
        return state


@contextlib.asynccontextmanager
async def memory_mesh(
    pki_dir: Path, nats_url: str, db_path: Path | str, **coordinator: Any
) -> AsyncIterator[MemoryMesh]:
    """Start a coordinator and a :class:`MemoryAgent` on ``nats_url``; stop them after."""

    def settings(model: Any, identity: str, **sections: Any) -> Any:
        return load_settings(
            model,
            host="127.0.0.1",
            port=0,
            certs_dir=pki_dir,
            identity=identity,
            grace_period=1.0,
            discovery="nats",
            nats_url=nats_url,
            **sections,
        )

    coordinator_settings = settings(
        CoordinatorProcessSettings,
        "coordinator",
        coordinator={
            "db_path": db_path,
            "retry_initial_backoff": 0.01,
            "retry_max_backoff": 0.05,
            **coordinator,
        },
    )
    agent = MemoryAgent()
    agent_settings = settings_for_agent(
        settings(AgentProcessSettings, "agent", agent={"max_concurrency": 64}), agent
    )
    async with (
        running_coordinator(coordinator_settings) as running,
        running_agent(agent, agent_settings) as served,
    ):
        channel = secure_channel(running.address, TlsFiles.for_identity(pki_dir, "client"))
        client: coordinator_pb2_grpc.CoordinatorServiceAsyncStub = (
            coordinator_pb2_grpc.CoordinatorServiceStub(channel)
        )
        try:
            mesh = MemoryMesh(running, served, channel, client, agent_settings)
            await eventually(lambda: bool(running.coordinator.list_agents("noop")), timeout=30)
            yield mesh
        finally:
            await channel.close()
