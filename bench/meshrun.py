"""A real mesh for benchmarks: nats-server, a coordinator and benchmark agents, each a process.

Started with the same launcher and nats-server configuration as ``hivewire up``
(``services/mesh``), on free loopback ports, with a throwaway PKI, database and
JetStream store under a temporary directory. Agents register in the embedded NATS-KV
registry; the coordinator discovers them there, exactly as in ``make run``.
"""

from __future__ import annotations

import asyncio
import contextlib
import tempfile
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import grpc

from bench.common import ROOT, free_port
from hivewire.coordinator.v1 import coordinator_pb2, coordinator_pb2_grpc
from hivewire.services.mesh.launcher import (
    Launcher,
    ManagedProcess,
    ProcessSpec,
    StopTier,
    python_module,
)
from hivewire.services.mesh.nats_server import NatsServerConfig, start_nats_server
from hivewire.services.mesh.pki import init_pki
from hivewire.services.runtime.channels import secure_channel
from hivewire.services.runtime.tls import TlsFiles

AGENT_TARGET = "bench.agent:BenchAgent"

if TYPE_CHECKING:
    # The asyncio stub type exists only in the generated .pyi.
    CoordinatorStub = coordinator_pb2_grpc.CoordinatorServiceAsyncStub


def coordinator_stub(channel: grpc.aio.Channel) -> CoordinatorStub:
    """An asyncio coordinator stub on ``channel``."""
    stub: CoordinatorStub = coordinator_pb2_grpc.CoordinatorServiceStub(channel)
    return stub


@dataclass
class BenchMesh:
    """A running benchmark mesh.

    Attributes:
        state: Its temporary directory (logs under ``logs/``).
        certs: The PKI directory.
        nats: The nats-server process.
        coordinator: The coordinator process.
        agents: The agent processes.
        address: ``host:port`` of the coordinator.
        nats_url: The nats-server's client URL.
    """

    state: Path
    certs: Path
    nats: ManagedProcess
    coordinator: ManagedProcess
    agents: list[ManagedProcess]
    address: str
    nats_url: str = ""
    services: list[ManagedProcess] = field(default_factory=list)
    more_coordinators: list[ManagedProcess] = field(default_factory=list)
    """Coordinators after the first (``coordinator-2``...), sharing its JetStream store."""

    @property
    def coordinators(self) -> list[ManagedProcess]:
        """Every coordinator, the first one first."""
        return [self.coordinator, *self.more_coordinators]

    @property
    def addresses(self) -> list[str]:
        """``host:port`` of every coordinator."""
        return [f"127.0.0.1:{c.ports['grpc']}" for c in self.coordinators]

    @property
    def pids(self) -> dict[str, int]:
        """Process ids by name: ``coordinator``, ``coordinator-2``..., ``nats``, ``model``,
        ``tool``, ``agent-0``...
        """
        pids = {c.spec.name: c.pid for c in self.coordinators}
        pids["nats"] = self.nats.pid
        pids.update({s.spec.name: s.pid for s in self.services})
        pids.update({a.spec.name: a.pid for a in self.agents})
        return pids

    @property
    def metrics_ports(self) -> dict[str, int]:
        """Prometheus port of each service started with ``metrics=True``, by name."""
        ports: dict[str, int] = {}
        for child in (self.coordinator, *self.services, *self.agents):
            port = child.ports.get("metrics")
            if port:
                ports[child.spec.name] = int(port)
        return ports

    def channel(self, address: str | None = None, **options: int | str) -> grpc.aio.Channel:
        """A client channel to a coordinator (client certificate).

        Args:
            address: Which coordinator (default: the first).
            **options: Extra channel arguments (a distinct value gives a distinct
                connection).
        """
        return secure_channel(
            address or self.address,
            TlsFiles.for_identity(self.certs, "client"),
            options=list(options.items()),
            default_timeout=120.0,
        )


async def _wait_for_agents(mesh: BenchMesh, count: int, *, within: float = 60.0) -> None:
    """Poll ListAgents on every coordinator until ``count`` healthy agents are routable."""
    deadline = time.monotonic() + within
    for address in mesh.addresses:
        channel = mesh.channel(address)
        stub = coordinator_stub(channel)
        healthy = 0
        try:
            while True:
                response = await stub.ListAgents(
                    coordinator_pb2.ListAgentsRequest(capability="noop")
                )
                healthy = sum(
                    1 for a in response.agents if a.health == coordinator_pb2.AGENT_HEALTH_HEALTHY
                )
                if healthy >= count:
                    break
                if time.monotonic() > deadline:
                    raise RuntimeError(
                        f"only {healthy} of {count} agents routable at {address} after {within}s"
                    )
                await asyncio.sleep(0.1)
        finally:
            await channel.close()


@contextlib.asynccontextmanager
async def bench_mesh(
    *,
    agents: int = 1,
    agent_concurrency: int = 64,
    log_level: str = "WARNING",
    sync_interval: str = "always",
    model_and_tool: bool = False,
    metrics: bool = False,
    coordinator_env: dict[str, str] | None = None,
    service_env: dict[str, str] | None = None,
    ready_timeout: float = 60.0,
    coordinators: int = 1,
    coordinator_prefix: Sequence[str] = (),
) -> AsyncIterator[BenchMesh]:
    """Start nats-server, a coordinator and ``agents`` benchmark agents; stop them after.

    Args:
        agents: Number of agent processes.
        agent_concurrency: Tasks each agent runs at once.
        log_level: Level of every service's log (files under the state directory).
        sync_interval: JetStream ``sync_interval`` (``always`` is what ``make run`` uses).
        model_and_tool: Also start the model service (deterministic backend) and the
            tool service, and point the agents at them.
        metrics: Give every service a Prometheus endpoint on a free port.
        coordinator_env: Extra environment of the coordinator (settings).
        service_env: Extra environment of every service (coordinator, agents, model, tool).
        ready_timeout: Seconds each service gets to start serving.
        coordinators: Coordinator processes; more than one needs the JetStream store
            (``coordinator_env={"HIVEWIRE_COORDINATOR__STORE": "jetstream"}``).
        coordinator_prefix: A command the coordinators run under (a profiler:
            ``["valgrind", "--tool=callgrind", ...]``).
    """
    with tempfile.TemporaryDirectory(prefix="hivewire-bench-") as tmp:
        state = Path(tmp)
        certs = state / "certs"
        init_pki(certs)
        async with Launcher(grace_period=5.0) as launcher:
            nats_config = NatsServerConfig(
                port=free_port(),
                monitor_port=free_port(),
                store_dir=state / "nats",
                sync_interval=sync_interval,
            )
            nats = await start_nats_server(launcher, nats_config, state_dir=state)
            common = {
                "PYTHONPATH": str(ROOT),
                "HIVEWIRE_HOST": "127.0.0.1",
                "HIVEWIRE_PORT": "0",
                "HIVEWIRE_CERTS_DIR": str(certs),
                "HIVEWIRE_NATS_URL": nats_config.url,
                "HIVEWIRE_DISCOVERY": "nats",
                "HIVEWIRE_LOG_LEVEL": log_level,
                **(service_env or {}),
            }

            def spec(
                name: str, argv: list[str], tier: StopTier = StopTier.CORE, **env: str
            ) -> ProcessSpec:
                ports = state / "run" / f"{name}.json"
                if metrics:
                    env["HIVEWIRE_METRICS_PORT"] = str(free_port())
                return ProcessSpec(
                    name=name,
                    argv=argv,
                    env={**common, "HIVEWIRE_PORTS_FILE": str(ports), **env},
                    ports_file=ports,
                    log_file=state / "logs" / f"{name}.log",
                    ready_timeout=ready_timeout,
                    stop_tier=tier,  # as `hivewire up`: agents first, then the core services
                )

            started_coordinators = [
                await launcher.start(
                    spec(
                        name,
                        [*coordinator_prefix, *python_module("hivewire.services.coordinator")],
                        HIVEWIRE_IDENTITY="coordinator",
                        HIVEWIRE_COORDINATOR__DB_PATH=str(state / f"{name}.db"),
                        **(coordinator_env or {}),
                    )
                )
                for name in [
                    "coordinator",
                    *(f"coordinator-{i}" for i in range(2, coordinators + 1)),
                ]
            ]
            coordinator = started_coordinators[0]
            services: list[ManagedProcess] = []
            agent_env: dict[str, str] = {}
            if model_and_tool:
                model = await launcher.start(
                    spec(
                        "model",
                        python_module("hivewire.services.model"),
                        HIVEWIRE_IDENTITY="model",
                        HIVEWIRE_MODEL__DEFAULT_BACKEND="deterministic",
                    )
                )
                tool = await launcher.start(
                    spec("tool", python_module("hivewire.services.tool"), HIVEWIRE_IDENTITY="tool")
                )
                services = [model, tool]
                agent_env = {
                    "HIVEWIRE_AGENT__MODEL_ADDRESS": f"127.0.0.1:{model.ports['grpc']}",
                    "HIVEWIRE_AGENT__TOOL_ADDRESS": f"127.0.0.1:{tool.ports['grpc']}",
                }
            started = await asyncio.gather(
                *(
                    launcher.start(
                        spec(
                            f"agent-{i}",
                            python_module("hivewire.services.agent", AGENT_TARGET),
                            StopTier.CLIENT,
                            HIVEWIRE_AGENT__MAX_CONCURRENCY=str(agent_concurrency),
                            **agent_env,
                        )
                    )
                    for i in range(agents)
                )
            )
            mesh = BenchMesh(
                state=state,
                certs=certs,
                nats=nats,
                coordinator=coordinator,
                agents=list(started),
                services=services,
                address=f"127.0.0.1:{coordinator.ports['grpc']}",
                nats_url=nats_config.url,
                more_coordinators=started_coordinators[1:],
            )
            await _wait_for_agents(mesh, agents)
            yield mesh
