"""Serve an agent as a full mesh service: mTLS, health, reflection, metrics, registration.

``hivewire agent serve my_module:MyAgent`` and ``python -m hivewire.services.agent
my_module:MyAgent`` both end here. Startup order: settings, logging, registry,
channel pool, runtime (agent ``setup``), gRPC server SERVING, register. SIGTERM
reverses it: NOT_SERVING, deregister, in-flight tasks get the grace period, runtime
closes (agent ``teardown``), channels close, registry closes.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import inspect
import logging
import os
import sys
from collections.abc import AsyncIterator, Mapping
from dataclasses import KW_ONLY, dataclass, field
from typing import Any, TypeVar

import grpc

from hivewire.agent.v1 import agent_pb2_grpc
from hivewire.discovery import Instance, Registry
from hivewire.services.agent.clients import bind_clients
from hivewire.services.agent.delegation import bind_subtasks
from hivewire.services.agent.runtime import AgentRuntime
from hivewire.services.agent.sdk import Agent, AgentCardInfo, TaskContext
from hivewire.services.agent.servicer import SERVICE_NAME, AgentServicer
from hivewire.services.agent.settings import AgentProcessSettings
from hivewire.services.runtime.bootstrap import Registration, service_process
from hivewire.services.runtime.channels import ChannelPool
from hivewire.services.runtime.errors import HivewireError, Unavailable
from hivewire.services.runtime.eventsink import EventSink as Sink
from hivewire.services.runtime.server import ServiceBinding, ServiceServer, serve_until_signal
from hivewire.services.runtime.tls import TRUST_DOMAIN, CertInfo, describe_cert

logger = logging.getLogger(__name__)

__all__ = [
    "AgentLoadError",
    "AgentServer",
    "AgentEvents",
    "ServiceEndpoint",
    "load_agent",
    "running_agent",
    "serve_agent",
    "settings_for_agent",
]


class AgentLoadError(Exception):
    """``module:Class`` does not name a loadable agent."""


def load_agent(spec: str) -> Agent:
    """Import and instantiate an agent from ``module:Class``.

    The attribute may be an :class:`Agent` subclass, an instance, or a zero-argument
    factory returning one. The current directory is importable, so ``my_agent:MyAgent``
    works for a ``my_agent.py`` next to you.

    Args:
        spec: ``package.module:Attribute``.

    Returns:
        The agent instance.

    Raises:
        AgentLoadError: The module or attribute is missing or is not an agent.
    """
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise AgentLoadError(f"expected module:Class, got {spec!r}")
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise AgentLoadError(f"cannot import {module_name!r}: {exc}") from exc
    target: Any = module
    for part in attr.split("."):
        try:
            target = getattr(target, part)
        except AttributeError:
            raise AgentLoadError(f"{module_name!r} has no attribute {attr!r}") from None
    if inspect.isclass(target) and issubclass(target, Agent):
        target = target()
    elif not isinstance(target, Agent) and callable(target):
        target = target()
    if not isinstance(target, Agent):
        raise AgentLoadError(f"{spec} is not an Agent subclass, instance or factory")
    if not target.capabilities():
        raise AgentLoadError(f"{spec} declares no capability (decorate handlers with @capability)")
    return target


AgentSettingsT = TypeVar("AgentSettingsT", bound=AgentProcessSettings)


def settings_for_agent(settings: AgentSettingsT, agent: Agent) -> AgentSettingsT:
    """Default the identity to the agent's own certificate when none was chosen.

    ``agent-<name>`` when that certificate exists in ``certs_dir``, else ``agent``.

    Args:
        settings: The process settings.
        agent: The agent to serve.

    Returns:
        Settings with the identity filled in (unchanged when one was set explicitly).
    """
    if "identity" in settings.model_fields_set:
        return settings
    name = settings.agent.name or agent.agent_name()
    stem = f"agent-{name}"
    identity = stem if (settings.certs_dir / f"{stem}.pem").exists() else "agent"
    return settings.model_copy(update={"identity": identity})


@dataclass(eq=False)
class ServiceEndpoint:
    """Where a downstream service is: a fixed address or the registry's healthy instances.

    Resolved lazily (the service may start after the agent) and re-resolved after a
    call failed with UNAVAILABLE; channels come from the shared pool, so a TLS
    handshake happens once per instance, not per call.

    Attributes:
        pool: The process's channel pool.
        service: Registry name, e.g. ``hivewire-model``.
        address: Fixed ``host:port``; when set the registry is not asked.
        registry: Where to resolve ``service`` when no address is given.
    """

    pool: ChannelPool
    _: KW_ONLY
    service: str
    address: str | None = None
    registry: Registry | None = None
    _current: str | None = field(init=False, repr=False, default=None)
    _lock: asyncio.Lock = field(init=False, repr=False, default_factory=asyncio.Lock)
    _turn: int = field(init=False, repr=False, default=0)

    def __post_init__(self) -> None:
        self._current = self.address

    async def channel(self) -> grpc.aio.Channel:
        """A channel to a healthy instance.

        Raises:
            Unavailable: No instance is known (``<SERVICE>_UNAVAILABLE``).
        """
        if self._current is not None:
            return self.pool.get(self._current)
        async with self._lock:
            if self._current is None:
                self._current = await self._resolve()
            return self.pool.get(self._current)

    async def _resolve(self) -> str:
        reason = self.service.removeprefix("hivewire-").upper().replace("-", "_") + "_UNAVAILABLE"
        if self.registry is None:
            raise Unavailable(f"no address configured for {self.service}", reason=reason)
        try:
            instances = await self.registry.resolve(self.service)
        except Exception as exc:
            raise Unavailable(
                f"cannot resolve {self.service}: {exc}", retry_after=1.0, reason=reason
            ) from exc
        if not instances:
            raise Unavailable(
                f"no healthy {self.service} instance is registered", retry_after=1.0, reason=reason
            )
        # Spread agents of one process over instances; the pool keeps each channel.
        self._turn += 1
        chosen = instances[self._turn % len(instances)]
        logger.info("using %s at %s", self.service, chosen.endpoint)
        return chosen.endpoint

    def failed(self, err: HivewireError) -> None:
        """Forget the resolved instance after an UNAVAILABLE call (fixed addresses stay)."""
        if self.address is None and self._current is not None:
            logger.info(
                "%s at %s failed (%s); resolving again", self.service, self._current, err.reason
            )
            self._current = None


AgentEvents = Sink[Any]
"""What the agent publishes ``agent.*`` events with (``runtime.events.EventPublisher``)."""


@dataclass
class AgentServer:
    """A running agent service (what :func:`serve_agent` builds), for tests and embedding.

    Attributes:
        settings: The effective settings.
        runtime: The runtime.
        server: The gRPC server.
        instance: The registered instance, if registered.
        registry: The registry it is registered in, if any (to report its health).
        servicer: The AgentService servicer.
    """

    settings: AgentProcessSettings
    runtime: AgentRuntime
    server: ServiceServer
    instance: Instance | None = None
    meta: Mapping[str, str] = field(default_factory=dict)
    registry: Registry | None = None
    servicer: AgentServicer | None = None

    @property
    def port(self) -> int:
        """The bound gRPC port."""
        return self.server.port


def _instance_meta(card: AgentCardInfo, cert: CertInfo | None) -> dict[str, str]:
    # No explicit instance name: a registration replaces only a stale entry of the same
    # name on the same host and port (a restart), so replicas on one host coexist.
    meta = {
        "name": card.name,
        "version": card.version,
        "max_concurrency": str(card.max_concurrency),
    }
    if cert is not None and cert.spiffe_id:
        meta["spiffe_id"] = cert.spiffe_id
    if cert is not None:
        mesh_names = [n for n in cert.dns_names if n.endswith(f".{TRUST_DOMAIN}")]
        if mesh_names:
            meta["tls_server_name"] = mesh_names[0]
    return meta


@contextlib.asynccontextmanager
async def running_agent(
    agent: Agent,
    settings: AgentProcessSettings,
    *,
    events: AgentEvents | None = None,
) -> AsyncIterator[AgentServer]:
    """Start an agent service and stop it when the block ends.

    Args:
        agent: The agent to serve.
        settings: Process settings (see :func:`settings_for_agent` for the identity).
        events: Event publisher for agent.registered / agent.deregistered; by default
            one is built from the settings (``HIVEWIRE_EVENTS__ENABLED=false`` turns it off).

    Yields:
        The running service.
    """
    cfg = settings.agent
    try:
        cert: CertInfo | None = describe_cert(settings.tls_files().cert)
    except (OSError, ValueError):
        cert = None
    # The coordinator is resolved through the registry too when one is open anyway;
    # without one (and without coordinator_address) ctx.subtask answers UNAVAILABLE.
    needs_registry = cfg.registration or cfg.model_address is None or cfg.tool_address is None
    name = cfg.name or agent.agent_name()
    async with service_process(settings, "agent", name=name, events=events) as process:
        registry = await process.registry() if needs_registry else None
        pool = await process.stack.enter_async_context(ChannelPool.from_settings(settings))
        clients = bind_clients(
            model=ServiceEndpoint(
                pool, service=cfg.model_service, address=cfg.model_address, registry=registry
            ),
            tools=ServiceEndpoint(
                pool, service=cfg.tool_service, address=cfg.tool_address, registry=registry
            ),
            default_timeout=settings.default_deadline,
        )
        subtasks = bind_subtasks(
            ServiceEndpoint(
                pool,
                service=cfg.coordinator_service,
                address=cfg.coordinator_address,
                registry=registry,
            ),
            default_timeout=settings.default_deadline,
        )

        def binder(ctx: TaskContext) -> None:
            clients(ctx)
            subtasks(ctx)

        runtime = AgentRuntime(
            agent,
            agent_id=process.instance_id,
            max_concurrency=cfg.max_concurrency,
            name=cfg.name,
            bind_clients=binder,
            cancel_grace=cfg.cancel_grace,
            coalesce_partials=cfg.coalesce_partials,
        )
        card = runtime.card
        await process.stack.enter_async_context(runtime)
        servicer = AgentServicer(
            runtime,
            allowed_callers=cfg.allowed_callers,
            max_message_bytes=settings.max_message_bytes,
        )
        binding = ServiceBinding(
            SERVICE_NAME,
            lambda s: agent_pb2_grpc.add_AgentServiceServicer_to_server(servicer, s),
            # A Link lives as long as its coordinator: each attempt on it has its own span.
            untraced_methods=("Link",),
        )
        registration = Registration(
            cfg.service_name,
            process.instance_id,
            tags=card.capability_names,
            meta=_instance_meta(card, cert),
        )
        started = await process.start(
            [binding],
            registration if cfg.registration else None,
            on_registered=lambda instance: _publish_agent_event(
                process.events, "agent.registered", instance, card, healthy=True
            ),
            on_deregistered=lambda instance: _publish_agent_event(
                process.events, "agent.deregistered", instance, card, healthy=False
            ),
        )
        # After deregistering: links end once their attempts have, not at the grace's end.
        started.server.add_shutdown_hook(servicer.drain)
        yield AgentServer(
            settings,
            runtime,
            started.server,
            started.instance,
            registry=registry,
            servicer=servicer,
        )


def _publish_agent_event(
    events: AgentEvents | None,
    event_type: str,
    instance: Instance,
    card: AgentCardInfo,
    *,
    healthy: bool,
) -> None:
    if events is None:
        return
    from hivewire.events.v1 import events_pb2

    events.publish(
        event_type,
        subject=instance.instance_id,
        data=events_pb2.AgentEventData(
            agent_id=instance.instance_id,
            name=card.name,
            address=instance.endpoint,
            capabilities=list(card.capability_names),
            healthy=healthy,
            version=card.version,
        ),
    )


async def serve_agent(
    agent: Agent, settings: AgentProcessSettings, *, events: AgentEvents | None = None
) -> None:
    """Serve an agent until SIGTERM/SIGINT (see the module docstring).

    Args:
        agent: The agent to serve.
        settings: Process settings.
        events: Optional event publisher.
    """
    async with running_agent(agent, settings, events=events) as running:
        await serve_until_signal(running.server)
