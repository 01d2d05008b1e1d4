"""The gRPC server bootstrap every hivewire service uses.

:class:`ServiceServer` binds an mTLS port that requires client certificates, installs
the standard interceptor chain, registers ``grpc.health.v1.Health`` (a status per
service plus ``""``) and server reflection, starts the Prometheus endpoint, and shuts
down gracefully: health NOT_SERVING first, shutdown hooks (deregistration), stop
accepting, in-flight calls finish within the grace period, the rest are cancelled.

Typical ``__main__``::

    settings = load_settings(identity="model", port=args.port)
    setup_logging(settings.log_level, settings.log_format)
    binding = ServiceBinding(SERVICE_NAME, lambda s: add_ModelServiceServicer_to_server(svc, s))
    async with ServiceServer(settings, [binding], on_shutdown=[registry.deregister]) as server:
        await serve_until_signal(server)
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from hivewire.services.base.lifecycle import StartStop
from hivewire.services.runtime.authn import Authenticator
from hivewire.services.runtime.authz import AuthzPolicyStore, AuthzServerInterceptor
from hivewire.services.runtime.channels import server_options
from hivewire.services.runtime.config import Settings
from hivewire.services.runtime.heapdump import install_heap_dump
from hivewire.services.runtime.heaptrim import trim_heap_periodically
from hivewire.services.runtime.interceptors import server_interceptors
from hivewire.services.runtime.metrics import (
    MetricsServer,
    metrics_tls_context,
    start_metrics_server,
    watch_c_heap,
    watch_event_loop,
)
from hivewire.services.runtime.revocation import RevocationList
from hivewire.services.runtime.tls import server_credentials

logger = logging.getLogger(__name__)

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
SERVICE_UNKNOWN = health_pb2.HealthCheckResponse.SERVICE_UNKNOWN

ShutdownHook = Callable[[], Awaitable[None]]


@dataclass(frozen=True)
class ServiceBinding:
    """One gRPC service to host.

    Attributes:
        name: Full service name, e.g. ``hivewire.coordinator.v1.CoordinatorService``
            (used for health status and reflection).
        add_to_server: Registers the servicer, e.g.
            ``lambda s: add_CoordinatorServiceServicer_to_server(servicer, s)``.
        untraced_methods: Method names (``WatchTask``) of the service whose calls get
            no OTel server span: long-lived streams that only follow, where a span held
            for the life of each stream costs several KiB per stream.
        id_in_response_methods: Method names (``StreamTask``) with a streaming response
            whose first message carries the correlation id the work runs under (the
            submitted task, once stored): a correlation id minted for a caller that sent
            none is not sent ahead of it in initial metadata of its own (a batch per
            call); it is in the trailing metadata.
    """

    name: str
    add_to_server: Callable[[grpc.aio.Server], None]
    untraced_methods: tuple[str, ...] = ()
    id_in_response_methods: tuple[str, ...] = ()


class HealthServicer(health.aio.HealthServicer):
    """``grpc.health.v1.Health`` with a status per service and a clean shutdown.

    Same API as grpc's asyncio servicer (``await set(...)``,
    ``await enter_graceful_shutdown()``), with two differences that matter for a
    graceful stop: on shutdown every ``Watch`` stream receives NOT_SERVING and then
    ends (so watchers do not hold the server for the whole grace period), and several
    watchers of one service are all notified.
    """

    def __init__(self) -> None:
        # The parent's state is not used; everything lives here.
        self._status: dict[str, int] = {health.OVERALL_HEALTH: SERVING}
        self._changed = asyncio.Condition()
        self._shutting_down = False

    def status(self, service: str = health.OVERALL_HEALTH) -> int | None:
        """Current status of ``service`` (None when unknown)."""
        return self._status.get(service)

    async def Check(
        self, request: health_pb2.HealthCheckRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> health_pb2.HealthCheckResponse:
        """Answer the current status; NOT_FOUND for an unknown service."""
        status = self._status.get(request.service)
        if status is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"unknown service {request.service!r}")
        return health_pb2.HealthCheckResponse(status=status)

    async def Watch(
        self, request: health_pb2.HealthCheckRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> None:
        """Stream the status now and after every change; end after the shutdown status."""
        last: int | None = None
        while True:
            async with self._changed:
                while True:
                    status = self._status.get(request.service, SERVICE_UNKNOWN)
                    final = self._shutting_down
                    if status != last or final:
                        break
                    await self._changed.wait()
            # Written outside the lock: a slow watcher must not block set().
            if status != last:
                await context.write(health_pb2.HealthCheckResponse(status=status))
                last = status
            if final:
                return

    async def set(self, service: str, status: int) -> None:
        """Set the status of ``service``; ignored once shutdown has begun."""
        if self._shutting_down:
            return
        async with self._changed:
            self._status[service] = status
            self._changed.notify_all()

    async def enter_graceful_shutdown(self) -> None:
        """Mark every service NOT_SERVING for good and end the Watch streams."""
        if self._shutting_down:
            return
        async with self._changed:
            self._shutting_down = True
            for service in self._status:
                self._status[service] = NOT_SERVING
            self._changed.notify_all()


def _hostport(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class ServiceServer(StartStop):
    """An mTLS gRPC server with health, reflection, metrics and graceful shutdown.

    Use as ``async with ServiceServer(settings, bindings) as server:``; entering
    starts it (SERVING), leaving stops it gracefully.

    Attributes:
        settings: The process settings.
        health: The health servicer (``await server.health.set(name, status)``).
        port: Bound gRPC port (after start).
        metrics_port: Bound metrics port, or None without a metrics server.
        authz: The authorization interceptor (after start); its ``store`` holds the
            policy in force.
    """

    def __init__(
        self,
        settings: Settings,
        bindings: Sequence[ServiceBinding],
        *,
        extra_interceptors: Sequence[grpc.aio.ServerInterceptor] = (),
        on_shutdown: Sequence[ShutdownHook] = (),
        authz: AuthzPolicyStore | None = None,
        extra_ports: Mapping[str, int] | None = None,
    ) -> None:
        """Prepare the server (nothing is bound until :meth:`start`).

        Args:
            settings: Host, port, certificates, limits, grace period, metrics port.
            bindings: Services to host.
            extra_interceptors: Server interceptors run inside the standard chain
                (after authorization: limits...), outermost first.
            on_shutdown: Coroutines run, in order, after health turns NOT_SERVING
                and before the server stops accepting (deregistration...).
            authz: Who may call which method; default: the policy file of
                ``settings.authz_policy_file``, else the built-in policy
                (:mod:`hivewire.services.runtime.authz`), loaded at :meth:`start`.
            extra_ports: More ports of the process for its ports file, e.g. an HTTPS
                port (``{"http": 50055}``).
        """
        self.settings = settings
        self._extra_ports = dict(extra_ports or {})
        self._bindings = tuple(bindings)
        self._extra_interceptors = tuple(extra_interceptors)
        self._on_shutdown = list(on_shutdown)
        self._authz_store = authz
        self.authz: AuthzServerInterceptor | None = None
        self.health = HealthServicer()
        self.port = 0
        self.metrics_port: int | None = None
        self._server: grpc.aio.Server | None = None
        self._metrics: MetricsServer | None = None
        self._ports_file_written: Path | None = None
        self._stop_task: asyncio.Task[None] | None = None
        self._trim_task: asyncio.Task[None] | None = None
        self._terminated = asyncio.Event()

    @property
    def service_names(self) -> list[str]:
        """Names of the hosted services."""
        return [b.name for b in self._bindings]

    @property
    def address(self) -> str:
        """``host:port`` the server is bound to."""
        return _hostport(self.settings.host, self.port)

    @property
    def advertise_address(self) -> str:
        """``host:port`` other services should dial (advertise_host, else host)."""
        return _hostport(self.settings.advertised_host, self.port)

    @property
    def server(self) -> grpc.aio.Server:
        """The underlying ``grpc.aio.Server`` (after start)."""
        if self._server is None:
            raise RuntimeError("server not started")
        return self._server

    @property
    def started(self) -> bool:
        """Whether :meth:`start` has completed and :meth:`stop` has not begun."""
        return self._server is not None and self._stop_task is None

    def add_shutdown_hook(self, hook: ShutdownHook) -> None:
        """Append a coroutine to run on shutdown (see ``on_shutdown``)."""
        self._on_shutdown.append(hook)

    async def start(self) -> None:
        """Bind, start and mark every service SERVING; then write the ports file.

        Raises:
            RuntimeError: Already started, or the port cannot be bound.
            FileNotFoundError: A certificate file is missing.
        """
        if self._server is not None:
            raise RuntimeError("server already started")
        settings = self.settings
        creds = server_credentials(settings.tls_files())
        store = self._authz_store or AuthzPolicyStore(settings.authz_policy_file)
        authn = Authenticator(settings.auth) if settings.auth.enabled else None
        revoked = (
            RevocationList(settings.revoked_certs_file)
            if settings.revoked_certs_file is not None
            else None
        )
        self.authz = AuthzServerInterceptor(store, authn=authn, revoked=revoked)
        server = grpc.aio.server(
            interceptors=server_interceptors(
                self._extra_interceptors,
                authz=self.authz,
                untraced=[f"/{b.name}/{m}" for b in self._bindings for m in b.untraced_methods],
                id_in_response=[
                    f"/{b.name}/{m}" for b in self._bindings for m in b.id_in_response_methods
                ],
            ),
            options=server_options(settings.max_message_bytes),
        )
        self._server = server
        try:
            health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
            await self.health.set(health.OVERALL_HEALTH, NOT_SERVING)
            for binding in self._bindings:
                binding.add_to_server(server)
                await self.health.set(binding.name, NOT_SERVING)
            reflection.enable_server_reflection(
                (*self.service_names, health.SERVICE_NAME, reflection.SERVICE_NAME), server
            )
            bind = _hostport(settings.host, settings.port)
            port = server.add_secure_port(bind, creds)
            if port == 0:
                raise RuntimeError(f"could not bind gRPC port {bind}")
            self.port = port
            await server.start()
            if settings.metrics_port is not None:
                tls = metrics_tls_context(settings.tls_files()) if settings.metrics_tls else None
                self._metrics = await asyncio.to_thread(
                    start_metrics_server, settings.metrics_host, settings.metrics_port, tls=tls
                )
                self.metrics_port = self._metrics.port
                watch_event_loop(asyncio.get_running_loop())
                watch_c_heap()
            await self.set_serving(True)
            if settings.ports_file is not None:
                await asyncio.to_thread(self._write_ports_file, settings.ports_file)
        except BaseException:
            await server.stop(None)
            if self._metrics is not None:
                await asyncio.to_thread(self._metrics.close)
            raise
        # Freed C heap back to the system now and then (runtime/heaptrim.py).
        self._trim_task = asyncio.create_task(
            trim_heap_periodically(settings.malloc_trim_interval), name="malloc-trim"
        )
        logger.info(
            "serving %s on %s (metrics %s)",
            ", ".join(self.service_names) or "health only",
            self.address,
            self.metrics_port if self.metrics_port is not None else "off",
        )

    def _write_ports_file(self, path: Path) -> None:
        payload = {
            "grpc": self.port,
            "metrics": self.metrics_port,
            "address": self.advertise_address,
            "pid": os.getpid(),
            **self._extra_ports,
        }
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(payload) + "\n", encoding="utf-8")
        # Readers poll for the file: the rename makes it appear complete or not at all.
        os.replace(tmp, path)
        self._ports_file_written = path

    def _remove_ports_file(self) -> None:
        path = self._ports_file_written
        if path is None:
            return
        try:
            if json.loads(path.read_text(encoding="utf-8")).get("pid") == os.getpid():
                path.unlink()
        except (OSError, ValueError):
            pass

    async def set_serving(self, serving: bool, service: str | None = None) -> None:
        """Change the health status.

        Args:
            serving: SERVING when true, NOT_SERVING otherwise.
            service: One service name; None sets every hosted service and ``""``.
        """
        status = SERVING if serving else NOT_SERVING
        names: Iterable[str] = (
            (service,) if service is not None else (*self.service_names, health.OVERALL_HEALTH)
        )
        for name in names:
            await self.health.set(name, status)

    async def stop(self, grace: float | None = None) -> None:
        """Stop gracefully; safe to call more than once and concurrently.

        Health turns NOT_SERVING (Watch streams get it and end), the shutdown hooks
        run, the server stops accepting calls, in-flight calls get ``grace`` seconds
        (default ``settings.grace_period``) and are then cancelled. A second call
        with a shorter grace (a second signal) cuts the wait short.

        Args:
            grace: Seconds for in-flight calls; 0 cancels them at once.
        """
        if self._server is None:
            self._terminated.set()
            return
        grace = self.settings.grace_period if grace is None else grace
        if self._stop_task is None:
            self._stop_task = asyncio.ensure_future(self._stop(self._server, grace))
        elif not self._stop_task.done():
            # Already stopping: shorten the in-flight wait.
            await self._server.stop(grace)
        await asyncio.shield(self._stop_task)

    async def _stop(self, server: grpc.aio.Server, grace: float) -> None:
        logger.info("shutting down (grace %.1f s)", grace)
        try:
            await self.health.enter_graceful_shutdown()
            for hook in self._on_shutdown:
                try:
                    # A hung hook (registry unreachable) must not block the shutdown.
                    async with asyncio.timeout(max(grace, 1.0)):
                        await hook()
                except Exception:
                    logger.exception("shutdown hook %r failed", hook)
            await server.stop(grace)
        finally:
            if self._trim_task is not None:
                self._trim_task.cancel()
            if self._metrics is not None:
                await asyncio.to_thread(self._metrics.close)
            await asyncio.to_thread(self._remove_ports_file)
            self._terminated.set()
        logger.info("stopped")

    async def wait_for_termination(self) -> None:
        """Wait until :meth:`stop` has completed."""
        await self._terminated.wait()


async def serve_until_signal(server: ServiceServer) -> None:
    """Serve until SIGTERM or SIGINT, then stop gracefully.

    The first signal starts the graceful stop (grace period from the settings); a
    second one cancels the calls still in flight at once. Starts the server if needed.

    Args:
        server: The server to run.
    """
    loop = asyncio.get_running_loop()
    if server._server is None:
        await server.start()
    stops: set[asyncio.Task[None]] = set()

    def on_signal(sig: signal.Signals) -> None:
        forced = bool(stops)
        if forced:
            logger.warning("%s again: cancelling in-flight calls", sig.name)
        else:
            logger.info("%s received: stopping gracefully", sig.name)
        task = loop.create_task(server.stop(0 if forced else None))
        stops.add(task)

    signals = (signal.SIGTERM, signal.SIGINT)
    for sig in signals:
        loop.add_signal_handler(sig, on_signal, sig)
    heap_dumps = install_heap_dump(loop)
    try:
        await server.wait_for_termination()
        if stops:
            await asyncio.gather(*stops, return_exceptions=True)
    finally:
        for sig in (*signals, *((signal.SIGUSR2,) if heap_dumps else ())):
            loop.remove_signal_handler(sig)
