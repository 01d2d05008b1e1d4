"""Helpers of the agent tests (no tests here): an in-process agent and a coordinator client."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator, Mapping
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import grpc
from google.protobuf import struct_pb2

from hivewire.agent.v1 import agent_pb2, agent_pb2_grpc
from hivewire.common.v1 import common_pb2
from hivewire.services.agent.sdk import Agent
from hivewire.services.agent.serve import AgentServer, running_agent
from hivewire.services.agent.settings import AgentProcessSettings
from hivewire.services.runtime.channels import secure_channel
from hivewire.services.runtime.config import Settings, load_settings
from hivewire.services.runtime.tls import TlsFiles

TERMINAL = ("result", "error")


def agent_settings(certs_dir: Path, *, identity: str = "agent", **agent: Any) -> Settings:
    """Settings of an in-process test agent: port 0, static discovery, no registration."""
    section: dict[str, Any] = {"registration": False, **agent}
    return load_settings(
        AgentProcessSettings,
        host="127.0.0.1",
        port=0,
        certs_dir=certs_dir,
        identity=identity,
        discovery="static",
        grace_period=1.0,
        events={"enabled": False},
        agent=section,
    )


@contextlib.asynccontextmanager
async def serve_in_process(agent: Agent, settings: Settings) -> AsyncIterator[AgentServer]:
    """Serve ``agent`` on 127.0.0.1 with real mTLS until the block ends."""
    async with running_agent(agent, settings) as running:
        yield running


def assignment(
    capability: str,
    *,
    text: str = "",
    json: Mapping[str, Any] | None = None,
    task_id: str | None = None,
    attempt: int = 1,
    deadline_in: float | None = 30.0,
    correlation_id: str = "cid-test",
    token_budget: int = 0,
    tokens_used: int = 0,
) -> agent_pb2.ExecuteRequest:
    """An ``ExecuteRequest`` carrying an assignment."""
    assign = agent_pb2.TaskAssignment(
        task_id=task_id or f"task-{uuid.uuid4().hex[:12]}",
        attempt=attempt,
        capability=capability,
        input=common_pb2.Payload(text=text),
        metadata=common_pb2.RequestMetadata(
            source="test", user_id="tester", correlation_id=correlation_id
        ),
        priority=common_pb2.PRIORITY_MEDIUM,
        token_budget=token_budget,
        tokens_used=tokens_used,
    )
    if json is not None:
        s = struct_pb2.Struct()
        s.update(dict(json))
        assign.input.json.CopyFrom(s)
    if deadline_in is not None:
        assign.deadline.FromDatetime(datetime.now(UTC) + timedelta(seconds=deadline_in))
    return agent_pb2.ExecuteRequest(assign=assign)


class Coordinator:
    """The coordinator's side of AgentService, over a real mTLS channel."""

    def __init__(self, address: str, files: TlsFiles) -> None:
        self.channel = secure_channel(address, files)
        self.stub = agent_pb2_grpc.AgentServiceStub(self.channel)

    async def close(self) -> None:
        """Close the channel."""
        await self.channel.close()

    def execute(self, *, timeout: float | None = 60.0) -> Execute:
        """Open an Execute stream."""
        return Execute(self.stub.Execute(timeout=timeout))

    async def describe(self) -> agent_pb2.DescribeResponse:
        """Call Describe."""
        return await self.stub.Describe(agent_pb2.DescribeRequest(), timeout=10)


class Execute:
    """One Execute stream, driven message by message."""

    def __init__(self, call: Any) -> None:
        self.call = call
        self.received: list[agent_pb2.ExecuteResponse] = []

    async def send(self, request: agent_pb2.ExecuteRequest) -> None:
        """Write one request message."""
        await self.call.write(request)

    async def cancel(self, reason: str = "test cancel") -> None:
        """Send a cancel message."""
        await self.send(agent_pb2.ExecuteRequest(cancel=agent_pb2.CancelExecution(reason=reason)))

    async def answer(
        self,
        request_id: str,
        *,
        text: str = "",
        approved: bool = False,
        grant: common_pb2.SignedApproval | None = None,
    ) -> None:
        """Send an input answer (with the coordinator's signed grant, for tool approvals)."""
        await self.send(
            agent_pb2.ExecuteRequest(
                input=common_pb2.InputResponse(
                    request_id=request_id,
                    value=common_pb2.Payload(text=text),
                    approved=approved,
                    signed_approval=grant,
                )
            )
        )

    async def next(self, *, timeout: float = 15.0) -> agent_pb2.ExecuteResponse:
        """Read the next response (fails on end of stream)."""
        async with asyncio.timeout(timeout):
            message = await self.call.read()
        assert message is not grpc.aio.EOF, "stream ended early"
        self.received.append(message)
        return message  # type: ignore[no-any-return]

    async def until(self, kind: str, *, timeout: float = 15.0) -> agent_pb2.ExecuteResponse:
        """Read until a message of ``kind`` (fails if the attempt ends first)."""
        while True:
            message = await self.next(timeout=timeout)
            got = message.WhichOneof("kind")
            if got == kind:
                return message
            assert got not in TERMINAL, f"attempt ended with {got} before {kind}: {message}"

    async def finish(self, *, timeout: float = 15.0) -> agent_pb2.ExecuteResponse:
        """Read to the terminal message, then check the stream closes OK."""
        while True:
            message = await self.next(timeout=timeout)
            if message.WhichOneof("kind") in TERMINAL:
                break
        async with asyncio.timeout(timeout):
            assert await self.call.read() is grpc.aio.EOF
            assert await self.call.code() == grpc.StatusCode.OK
        return message

    def kinds(self) -> list[str]:
        """The kinds of every message received so far."""
        return [str(m.WhichOneof("kind")) for m in self.received]
