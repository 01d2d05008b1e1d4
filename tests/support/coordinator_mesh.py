"""An in-process mesh for coordinator tests: a real coordinator over mTLS, scripted agents.

Everything is real except that the registry is the in-process static backend shared by
the coordinator and the agents (one process), so tests control joins and leaves exactly.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from google.protobuf import json_format, struct_pb2

from hivewire.common.v1 import common_pb2
from hivewire.coordinator.v1 import coordinator_pb2, coordinator_pb2_grpc
from hivewire.discovery.static import StaticRegistry
from hivewire.events.v1 import events_pb2
from hivewire.services.coordinator.app import RunningCoordinator, running_coordinator
from hivewire.services.coordinator.settings import CoordinatorProcessSettings
from hivewire.services.runtime.channels import secure_channel
from hivewire.services.runtime.config import Settings, load_settings
from hivewire.services.runtime.errors import HivewireError
from hivewire.services.runtime.status import from_rpc_error
from hivewire.services.runtime.tls import TlsFiles
from tests.support.scripted_agent import ScriptedAgent, serve_scripted_agent

TaskEvent = coordinator_pb2.TaskEvent


@dataclass
class RecordingPublisher:
    """An EventPublisher that keeps what it was given."""

    published: list[tuple[str, str, events_pb2.TaskEventData, int]] = field(default_factory=list)

    def publish(
        self,
        event_type: str,
        *,
        subject: str,
        data: events_pb2.TaskEventData,
        task_sequence: int = 0,
        correlation_id: str | None = None,
    ) -> None:
        self.published.append((event_type, subject, data, task_sequence))

    def types_for(self, task_id: str) -> list[str]:
        return [t for t, s, _, _ in self.published if s == task_id]


def spec(
    capability: str = "echo",
    *,
    text: str = "hi",
    script: dict[str, Any] | None = None,
    priority: int = 0,
    timeout: float | None = None,
    key: str = "",
    max_attempts: int = 0,
    token_budget: int = 0,
) -> coordinator_pb2.TaskSpec:
    """A task spec whose input scripts the scripted agent."""
    payload = common_pb2.Payload(text=text)
    if script is not None:
        payload.json.CopyFrom(json_format.ParseDict(script, struct_pb2.Struct()))
    result = coordinator_pb2.TaskSpec(
        capability=capability,
        input=payload,
        priority=priority,  # type: ignore[arg-type]
        idempotency_key=key,
        max_attempts=max_attempts,
        token_budget=token_budget,
    )
    if timeout is not None:
        result.timeout.FromNanoseconds(int(timeout * 1e9))
    return result


def coordinator_settings(
    pki_dir: Path, db_path: Path | str, *, nats_url: str = "", **coordinator: Any
) -> Settings:
    """Settings of a test coordinator: ephemeral port, quick retries, events off."""
    section: dict[str, Any] = {
        "db_path": db_path,
        "retry_initial_backoff": 0.01,
        "retry_max_backoff": 0.05,
        "cancel_grace": 2.0,
        "breaker_reset_timeout": 30.0,
    }
    section.update(coordinator)
    more: dict[str, Any] = {"nats_url": nats_url} if nats_url else {}
    return load_settings(
        CoordinatorProcessSettings,
        host="127.0.0.1",
        port=0,
        certs_dir=pki_dir,
        identity="coordinator",
        grace_period=1.0,
        discovery="static",
        coordinator=section,
        **more,
    )


def error_of(exc: grpc.aio.AioRpcError) -> HivewireError:
    """The domain error a failed call carried."""
    return from_rpc_error(exc)


@dataclass
class Mesh:
    """A running coordinator, its registry and a way to add agents and clients."""

    pki_dir: Path
    registry: StaticRegistry
    running: RunningCoordinator
    events: RecordingPublisher
    stack: contextlib.AsyncExitStack
    _channels: list[grpc.aio.Channel] = field(default_factory=list)

    @property
    def address(self) -> str:
        return self.running.address

    def client(
        self, stem: str = "client", *, plain: bool = False
    ) -> coordinator_pb2_grpc.CoordinatorServiceAsyncStub:
        """A client stub.

        ``plain``: on a bare grpc.aio channel (no hivewire interceptor, no correlation id
        sent), as a client built from proto/ in any language has.
        """
        files = TlsFiles.for_identity(self.pki_dir, stem)
        if plain:
            ca, cert, key = files.read()
            credentials = grpc.ssl_channel_credentials(ca, key, cert)
            channel = grpc.aio.secure_channel(self.address, credentials)
        else:
            channel = secure_channel(self.address, files)
        self._channels.append(channel)
        stub: coordinator_pb2_grpc.CoordinatorServiceAsyncStub = (
            coordinator_pb2_grpc.CoordinatorServiceStub(channel)
        )
        return stub

    async def agent(
        self,
        name: str = "scripted",
        *,
        capabilities: tuple[str, ...] = ("echo",),
        max_concurrency: int = 4,
        script: dict[str, Any] | None = None,
    ) -> ScriptedAgent:
        """Start a scripted agent that stays up until the test ends."""
        agent, _ = await self.stack.enter_async_context(
            serve_scripted_agent(
                self.registry,
                self.pki_dir,
                name=name,
                capabilities=capabilities,
                max_concurrency=max_concurrency,
                script=script,
            )
        )
        return agent

    @contextlib.asynccontextmanager
    async def temporary_agent(
        self, name: str = "temp", **kwargs: Any
    ) -> AsyncIterator[ScriptedAgent]:
        """An agent that leaves (deregisters and stops) when the block ends."""
        async with serve_scripted_agent(self.registry, self.pki_dir, name=name, **kwargs) as (
            agent,
            _,
        ):
            yield agent

    async def close_channels(self) -> None:
        for channel in self._channels:
            await channel.close()


@contextlib.asynccontextmanager
async def start_mesh(pki_dir: Path, db_path: Path | str, **coordinator: Any) -> AsyncIterator[Mesh]:
    """Run a coordinator (and later agents) until the block ends."""
    async with StaticRegistry() as registry:
        settings = coordinator_settings(pki_dir, db_path, **coordinator)
        async with _serve(pki_dir, settings, registry) as mesh:
            yield mesh


@contextlib.asynccontextmanager
async def jetstream_mesh(
    pki_dir: Path, nats_url: str, registry: StaticRegistry, **coordinator: Any
) -> AsyncIterator[Mesh]:
    """Run a coordinator on the JetStream store at ``nats_url`` until the block ends.

    It shares ``registry`` (and the store) with any other coordinator of the test, and
    has its own stack: a test can stop one coordinator while the others run.
    """
    settings = coordinator_settings(
        pki_dir,
        coordinator.pop("db_path", ":memory:"),
        nats_url=nats_url,
        store="jetstream",
        **coordinator,
    )
    async with _serve(pki_dir, settings, registry) as mesh:
        yield mesh


@contextlib.asynccontextmanager
async def _serve(
    pki_dir: Path, settings: Settings, registry: StaticRegistry
) -> AsyncIterator[Mesh]:
    async with contextlib.AsyncExitStack() as stack:
        events = RecordingPublisher()
        running = await stack.enter_async_context(
            running_coordinator(settings, registry=registry, events=events)
        )
        mesh = Mesh(pki_dir, registry, running, events, stack)
        stack.push_async_callback(mesh.close_channels)
        yield mesh


async def collect(call: Any) -> list[TaskEvent]:
    """Every event of a server stream (StreamTask or WatchTask) until it ends."""
    return [response.event async for response in call]


def kinds(events: list[TaskEvent]) -> list[str]:
    """The oneof kind of each event."""
    return [str(e.WhichOneof("kind")) for e in events]


def assert_contiguous(events: list[TaskEvent], start: int = 1) -> None:
    """Sequences ``start, start+1, ...`` with no gap and no repeat."""
    sequences = [e.sequence for e in events]
    assert sequences == list(range(start, start + len(sequences))), sequences
