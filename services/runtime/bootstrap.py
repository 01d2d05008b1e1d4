"""What every service process does the same way: defaults, flags, serving, registration.

An entry point (``python -m hivewire.services.<name>``) describes itself once as a
:class:`ServiceEntry` (name, fixed default port) and gets the common flags, the
settings defaults and the run loop from it::

    ENTRY = ServiceEntry("model", title="hivewire model service", port=MODEL_PORT,
                         settings_model=ModelProcessSettings)

    def main(argv=None):
        args = ENTRY.parser().parse_args(argv)
        ENTRY.run(serve, ENTRY.settings(args))

A service that is one process wired the shared way gets its ``serve`` from
``ENTRY.hosting(open_parts)``: ``open_parts(process, settings)`` opens the service's
parts on ``process.stack`` and returns a :class:`Hosting` (bindings, registry tags and
metadata). Otherwise its ``serve`` opens what it needs and hosts its servicer with
:func:`serving`, which starts the
:class:`~hivewire.services.runtime.server.ServiceServer`, registers the instance in
discovery once it is SERVING and deregisters it first thing on shutdown::

    async with serving(settings, [binding], registry=registry,
                       registration=Registration("hivewire-model", instance_id)) as running:
        await serve_until_signal(running.server)

The fixed default ports live in :mod:`~hivewire.services.runtime.ports` (re-exported here).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
from collections.abc import (
    AsyncIterator,
    Awaitable,
    Callable,
    Coroutine,
    Iterable,
    Mapping,
    Sequence,
)
from dataclasses import dataclass, field
from typing import Any, Generic, TypedDict, TypeVar, Unpack

from pydantic import ValidationError

from hivewire.discovery import Instance, Registry, new_instance_id, open_registry
from hivewire.services.base.keywords import check_keywords
from hivewire.services.runtime.config import (
    Settings,
    UnknownSettingError,
    invalid_settings,
    load_settings,
)
from hivewire.services.runtime.events import EventPublisher
from hivewire.services.runtime.eventsink import EventSink
from hivewire.services.runtime.logging import setup_logging
from hivewire.services.runtime.ports import (
    COORDINATOR_PORT,
    FIRST_AGENT_PORT,
    METRICS_OFFSET,
    MODEL_PORT,
    TOOL_PORT,
    metrics_port_for,
)
from hivewire.services.runtime.security import publish_denials
from hivewire.services.runtime.server import (
    ServiceBinding,
    ServiceServer,
    ShutdownHook,
    serve_until_signal,
)
from hivewire.services.runtime.tls import nats_identity, nats_tls_options, registry_owner
from hivewire.services.runtime.tracing import setup_tracing

logger = logging.getLogger(__name__)

__all__ = [
    "COORDINATOR_PORT",
    "FIRST_AGENT_PORT",
    "METRICS_OFFSET",
    "MODEL_PORT",
    "TOOL_PORT",
    "Hosting",
    "Registration",
    "Serving",
    "ServingHooks",
    "ServiceEntry",
    "ServiceProcess",
    "metrics_port_for",
    "registry_from_settings",
    "service_process",
    "serving",
    "with_service_defaults",
]


SettingsT = TypeVar("SettingsT", bound=Settings)


def with_service_defaults(settings: SettingsT, *, identity: str, port: int) -> SettingsT:
    """Fill in a service's own defaults for what the environment and flags left unset.

    The identity (certificate stem), the fixed gRPC port, and the metrics port next to
    it. An explicit port 0 (tests) keeps metrics off unless they were asked for.

    Args:
        settings: Settings as loaded from the environment and flags.
        identity: The service's default identity, e.g. ``"model"``.
        port: The service's fixed default port, e.g. 50052.

    Returns:
        The settings with the defaults applied.
    """
    update: dict[str, Any] = {}
    if "identity" not in settings.model_fields_set:
        update["identity"] = identity
    chosen = settings.port if "port" in settings.model_fields_set else port
    update["port"] = chosen
    if "metrics_port" not in settings.model_fields_set and chosen:
        update["metrics_port"] = metrics_port_for(chosen)
    return settings.model_copy(update=update)


def registry_from_settings(settings: Settings, *, fail_fast: bool = False) -> Registry:
    """The registry ``settings.discovery`` names (not started: use ``async with``).

    Args:
        settings: The process's settings.
        fail_fast: Starting the embedded registry fails at once when NATS refuses the
            connection (nothing listening) instead of waiting for it to come up: for a
            one-shot reader such as the CLI, never for a service.
    """
    options: dict[str, Any] = {}
    embedded = settings.discovery.split("?")[0] in ("", "nats", "embedded")
    on_nats = embedded or settings.discovery.startswith(("nats://", "tls://", "nats+tls://"))
    if fail_fast and on_nats:
        options["fail_fast"] = True
    tls = nats_tls_options(settings.nats_url, settings.tls_files())
    if tls and embedded:
        # The embedded registry on the mesh's NATS (TLS with this process's certificate),
        # writing keys under its identity's name: the only ones NATS lets it write.
        options["nats_options"] = tls
        options["owner"] = registry_owner(nats_identity(settings.tls_files()))
    return open_registry(
        settings.discovery,
        nats_url=settings.nats_url,
        consul_token=settings.consul_token,
        **options,
    )


@dataclass(frozen=True)
class ServiceEntry(Generic[SettingsT]):
    """The ``python -m hivewire.services.<name>`` entry point of one service.

    Attributes:
        name: Module under ``hivewire.services``, the default identity and the
            settings section (``HIVEWIRE_<NAME>__*``).
        title: What ``--help`` calls the service, e.g. ``"hivewire tool service"``.
        port: The fixed default gRPC port.
        settings_model: The service's process settings (the shared settings and its
            own section), defined in its settings.py.
    """

    name: str
    title: str
    port: int
    settings_model: type[SettingsT]

    def defaults(self, settings: SettingsT) -> SettingsT:
        """The settings with this service's identity and port defaults applied."""
        return with_service_defaults(settings, identity=self.name, port=self.port)

    def parser(self) -> argparse.ArgumentParser:
        """A parser with the flags every service takes; add the service's own to it."""
        parser = argparse.ArgumentParser(
            prog=f"python -m hivewire.services.{self.name}",
            description=(
                f"{self.title} (settings: HIVEWIRE_* and HIVEWIRE_{self.name.upper()}__*)"
            ),
        )
        parser.add_argument("--host", help="interface to bind (HIVEWIRE_HOST)")
        parser.add_argument(
            "--port", type=int, help=f"gRPC port (HIVEWIRE_PORT; default {self.port})"
        )
        parser.add_argument(
            "--metrics-port", type=int, help="Prometheus port (HIVEWIRE_METRICS_PORT)"
        )
        parser.add_argument("--log-level", help="log level (HIVEWIRE_LOG_LEVEL)")
        return parser

    def settings(self, args: argparse.Namespace, **sections: Mapping[str, Any]) -> SettingsT:
        """Build the settings once: environment, then the common flags, then defaults.

        Args:
            args: Parsed flags of :meth:`parser`.
            **sections: Nested sections set by the service's own flags, e.g.
                ``tool={"policy_file": path}``.
        """
        try:
            settings = load_settings(
                self.settings_model,
                host=args.host,
                port=args.port,
                metrics_port=args.metrics_port,
                log_level=args.log_level,
                **{name: dict(values) for name, values in sections.items()},
            )
        except UnknownSettingError as exc:
            # One line naming the variable (exit status 1): a misspelt setting stops the start.
            raise SystemExit(f"hivewire {self.name}: {exc}") from None
        except ValidationError as exc:
            # A value out of range stops the start the same way: a line per setting.
            raise SystemExit(
                "\n".join(f"hivewire {self.name}: {line}" for line in invalid_settings(exc))
            ) from None
        return self.defaults(settings)

    def run(
        self, serve: Callable[[SettingsT], Coroutine[Any, Any, None]], settings: SettingsT
    ) -> None:
        """Set up logging and tracing, and run ``serve(settings)`` until it returns."""
        setup_logging(settings.log_level, settings.log_format)
        setup_tracing(f"hivewire-{self.name}", otlp_endpoint=settings.otlp_endpoint)
        run_loop(serve(settings), settings.event_loop)

    def hosting(
        self, open_parts: Callable[[ServiceProcess, SettingsT], Awaitable[Hosting]]
    ) -> Callable[[SettingsT], Coroutine[Any, Any, None]]:
        """The ``serve`` of a service that is one process wired the shared way.

        ``serve(settings)`` opens :func:`service_process`, awaits ``open_parts(process,
        settings)`` (which opens the service's parts on ``process.stack``), then serves
        what it returned, registered as ``hivewire-<name>`` with the metadata ``name``
        and ``identity`` besides its own, until SIGTERM or SIGINT.
        """

        async def serve(settings: SettingsT) -> None:
            async with service_process(settings, self.name) as process:
                hosted = await open_parts(process, settings)
                registration = Registration(
                    f"hivewire-{self.name}",
                    process.instance_id,
                    tags=tuple(hosted.tags),
                    meta={"name": self.name, "identity": settings.identity, **hosted.meta},
                )
                await process.serve(hosted.bindings, registration, extra_ports=hosted.extra_ports)

        return serve


def run_loop(main: Coroutine[Any, Any, None], event_loop: str = "asyncio") -> None:
    """Run a service's main coroutine on the event loop its settings name.

    Args:
        main: The coroutine.
        event_loop: ``asyncio`` or ``uvloop`` (the ``HIVEWIRE_EVENT_LOOP`` setting).

    Raises:
        SystemExit: ``uvloop`` is asked for and not installed.
    """
    if event_loop != "uvloop":
        asyncio.run(main)
        return
    try:
        import uvloop
    except ImportError:
        main.close()
        raise SystemExit("HIVEWIRE_EVENT_LOOP=uvloop, but uvloop is not installed") from None
    uvloop.run(main)


@dataclass(frozen=True)
class Registration:
    """How a service appears in discovery once it serves.

    Attributes:
        service: Logical name, e.g. ``"hivewire-tool"``.
        instance_id: This process's id (``new_instance_id(...)``).
        tags: Capabilities (tool names, backend names, an agent's capabilities).
        meta: String metadata (name, identity, version...).
    """

    service: str
    instance_id: str
    tags: Sequence[str] = ()
    meta: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Hosting:
    """What a service process hosts once its parts are open (:meth:`ServiceEntry.hosting`).

    Attributes:
        bindings: The gRPC services to host.
        tags: Registry tags (tool names, backend names...).
        meta: Registry metadata besides ``name`` and ``identity``.
        extra_ports: More ports of the process for its ports file (``{"mcp": 8443}``).
    """

    bindings: Sequence[ServiceBinding]
    tags: Sequence[str] = ()
    meta: Mapping[str, str] = field(default_factory=dict)
    extra_ports: Mapping[str, int] | None = None


@dataclass
class Serving:
    """A started server and, when it registered, its registry entry."""

    server: ServiceServer
    instance: Instance | None = None


InstanceCallback = Callable[[Instance], None]


class ServingHooks(TypedDict, total=False):
    """The optional keyword arguments of :func:`serving` and :meth:`ServiceProcess.start`.

    Attributes:
        on_shutdown: Hooks run first on shutdown (drain work...).
        on_registered: Called with the instance after it registered.
        on_deregistered: Called with the instance after it deregistered.
        extra_ports: More ports of the process for its ports file (``{"mcp": 8443}``).
    """

    on_shutdown: Iterable[ShutdownHook]
    on_registered: InstanceCallback | None
    on_deregistered: InstanceCallback | None
    extra_ports: Mapping[str, int] | None


@contextlib.asynccontextmanager
async def serving(
    settings: Settings,
    bindings: Sequence[ServiceBinding],
    *,
    registry: Registry | None = None,
    registration: Registration | None = None,
    events: EventSink[Any] | None = None,
    **hooks: Unpack[ServingHooks],
) -> AsyncIterator[Serving]:
    """Serve ``bindings`` and, given a registry and a registration, register the instance.

    Registration happens once the server is SERVING (peers that resolve it can call it
    at once); deregistration is a shutdown hook after ``on_shutdown``, so it runs
    before the server stops accepting calls. The block ending stops the server
    gracefully.

    Args:
        settings: Process settings (address to advertise, grace period...).
        bindings: The gRPC services to host.
        registry: A started registry; None registers nothing.
        registration: What to register as; None registers nothing.
        events: Where refused calls go as ``security.*`` events (None: metrics and
            logs only).
        **hooks: :class:`ServingHooks`: ``on_shutdown``, ``on_registered``,
            ``on_deregistered`` and ``extra_ports``.

    Yields:
        The server and its registry entry.
    """
    check_keywords("serving", hooks, ServingHooks.__optional_keys__)
    publish_denials(events)
    async with ServiceServer(
        settings,
        bindings,
        on_shutdown=list(hooks.get("on_shutdown", ())),
        extra_ports=hooks.get("extra_ports"),
    ) as server:
        running = Serving(server)
        if registry is not None and registration is not None:
            running.instance = await _register(
                registry,
                server,
                settings,
                registration,
                hooks.get("on_registered"),
                hooks.get("on_deregistered"),
            )
        yield running


@dataclass
class ServiceProcess:
    """One service process while it runs: its instance id, events and what it opened.

    What :func:`service_process` yields. The service opens its own parts on
    ``stack`` (they close in reverse order when the process ends), then calls
    :meth:`serve` with its gRPC bindings.

    Attributes:
        settings: The process settings.
        instance_id: This instance's registry id (``<kind>-<random>``).
        events: The process's event publisher (disabled when events are off).
        stack: Closes everything the process opened, last opened first.
    """

    settings: Settings
    instance_id: str
    events: EventSink[Any]
    stack: contextlib.AsyncExitStack
    _registry: Registry | None = field(default=None, repr=False)

    async def registry(self) -> Registry:
        """The registry of the settings, opened on the stack the first time it is asked for."""
        if self._registry is None:
            opened = registry_from_settings(self.settings)
            self._registry = await self.stack.enter_async_context(opened)
        return self._registry

    async def start(
        self,
        bindings: Sequence[ServiceBinding],
        registration: Registration | None,
        **hooks: Unpack[ServingHooks],
    ) -> Serving:
        """Serve ``bindings`` (see :func:`serving`) until the process ends.

        Given a registration, the instance registers in :meth:`registry` once SERVING;
        None registers nothing. ``on_shutdown`` hooks run first on shutdown (drain
        work...), before the deregistration.
        """
        registry = await self.registry() if registration is not None else self._registry
        return await self.stack.enter_async_context(
            serving(
                self.settings,
                bindings,
                registry=registry,
                registration=registration,
                events=self.events,
                **hooks,
            )
        )

    async def serve(
        self,
        bindings: Sequence[ServiceBinding],
        registration: Registration,
        *,
        extra_ports: Mapping[str, int] | None = None,
    ) -> None:
        """Open the registry, serve ``bindings`` registered as ``registration``, and
        return after SIGTERM or SIGINT stopped the server gracefully.
        """
        running = await self.start(bindings, registration, extra_ports=extra_ports)
        await serve_until_signal(running.server)


@contextlib.asynccontextmanager
async def service_process(
    settings: Settings,
    kind: str,
    *,
    name: str | None = None,
    events: EventSink[Any] | None = None,
    registry: Registry | None = None,
) -> AsyncIterator[ServiceProcess]:
    """The wiring every service process shares: an instance id and its event publisher.

    ``async with service_process(settings, "model") as process:`` then open the
    service's parts on ``process.stack`` and ``await process.serve(...)`` (or
    ``await process.start(...)`` to keep the block open while serving).

    Args:
        settings: The process settings.
        kind: The service kind, e.g. ``"model"``: the events' source
            (``model/<instance id>``).
        name: The instance id's prefix (default: ``kind``; an agent's name).
        events: Where the process publishes events; by default a publisher built from
            the settings, closed when the process ends (one given stays open).
        registry: A started registry the process uses (tests; it stays open); by
            default the one the settings name, opened when first needed.
    """
    instance_id = new_instance_id(name or kind)
    async with contextlib.AsyncExitStack() as stack:
        if events is None:
            events = EventPublisher.from_settings(settings, source=f"{kind}/{instance_id}")
            await stack.enter_async_context(events)
        yield ServiceProcess(settings, instance_id, events, stack, registry)


async def _register(
    registry: Registry,
    server: ServiceServer,
    settings: Settings,
    registration: Registration,
    on_registered: InstanceCallback | None,
    on_deregistered: InstanceCallback | None,
) -> Instance:
    instance = Instance(
        service=registration.service,
        instance_id=registration.instance_id,
        address=settings.advertised_host,
        port=server.port,
        tags=tuple(registration.tags),
        meta=dict(registration.meta),
    )
    await registry.register(instance)
    logger.info(
        "registered %s %s at %s%s",
        instance.service,
        instance.instance_id,
        instance.endpoint,
        f" ({', '.join(instance.tags)})" if instance.tags else "",
    )
    if on_registered is not None:
        on_registered(instance)

    async def deregister() -> None:
        await registry.deregister(instance.instance_id)
        logger.info("deregistered %s %s", instance.service, instance.instance_id)
        if on_deregistered is not None:
            on_deregistered(instance)

    server.add_shutdown_hook(deregister)
    return instance
