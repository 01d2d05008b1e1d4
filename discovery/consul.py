"""Consul registry backend (py-consul's asyncio client against the local agent's HTTP API).

Registration: one Consul service instance per :class:`Instance` (``ID`` = instance id,
``Name`` = logical service, capability ``Tags``, ``Meta``), with explicit check IDs:

- ``ttl:<id>`` (option ``checks`` contains ``"ttl"``, the default): a TTL check this process
  passes every ``ttl / 3``. Works with any agent configuration, including mTLS-only services.
- ``grpc:<id>`` (``"grpc"``): the agent runs ``grpc.health.v1.Health/Check`` against the
  instance with ``GRPCUseTLS`` and ``TLSServerName`` (from ``meta["tls_server_name"]``). The
  services require client certificates, so the agent needs ``enable_agent_tls_for_checks``
  and a certificate from the mesh CA (docs/discovery.md).

Both carry ``DeregisterCriticalServiceAfter``: an instance whose check stays critical that
long (a killed process) is reaped by the agent. A draining instance is put in service
maintenance mode (a critical ``_service_maintenance:<id>`` check) rather than failing its TTL,
so it is hidden from ``?passing`` without being reaped.

Watches are blocking queries on ``/v1/health/service/<name>?passing`` following Consul's
client rules: the index is reset when it goes backwards and clamped to >= 1, the loop is
rate limited by a token bucket, and ``wait`` stays well under the HTTP client's timeout.
Results are diffed, so spurious wake-ups yield nothing. An outage never raises out of a
watch or the heartbeat loop: they log, keep the last known set and retry with backoff. A
TTL pass answered 404 means the agent lost the service (reaped, restarted): it is
registered again.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
from collections.abc import AsyncIterator, Awaitable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar

import aiohttp
import consul
import consul.aio
from consul.callback import CB
from consul.exceptions import ACLDisabled, ACLPermissionDenied, BadRequest, ConsulException

from hivewire.services.base.backoff import Backoff, TokenBucket

from . import metrics
from ._base import RemoteRegistryBase
from .registry import (
    Instance,
    RegistryError,
    RegistryUnavailableError,
    is_replaced_by,
    sort_instances,
)

logger = logging.getLogger(__name__)

__all__ = ["CHECK_KINDS", "ConsulRegistry", "go_duration"]

CHECK_KINDS = frozenset({"ttl", "grpc"})
#: Meta key whose value becomes the gRPC check's ``TLSServerName``.
META_TLS_SERVER_NAME = "tls_server_name"
#: Meta key naming the ``grpc.health.v1`` service the gRPC check asks about ("" = server).
META_HEALTH_SERVICE = "grpc_health_service"
# aiohttp's default total timeout for a request; a blocking query must end before it.
_AIOHTTP_TOTAL_TIMEOUT = 300.0

_T = TypeVar("_T")

# Answers that are not outages: retrying would not help, the configuration is wrong.
_REJECTED = (ACLPermissionDenied, BadRequest, ACLDisabled)

_TRANSIENT = (
    aiohttp.ClientError,
    asyncio.TimeoutError,
    ConnectionError,
    OSError,
)


def go_duration(seconds: float) -> str:
    """Format seconds as a Go duration string (``"15s"``, ``"250ms"``)."""
    if seconds <= 0:
        raise ValueError("duration must be positive")
    if float(seconds).is_integer():
        return f"{int(seconds)}s"
    return f"{round(seconds * 1000)}ms"


class _UnavailableError(Exception):
    """Consul could not be reached or answered 5xx."""


def _unreachable(exc: BaseException) -> str:
    """Why Consul could not be reached, in words rather than the transport's repr."""
    if isinstance(exc, aiohttp.ClientConnectorError):
        if exc.os_error.errno == errno.ECONNREFUSED:
            return "connection refused (is the Consul agent running there?)"
        return f"cannot connect: {exc.os_error.strerror or exc.os_error}"
    if isinstance(exc, TimeoutError):
        return "no answer in time"
    return str(exc) or type(exc).__name__


@dataclass(frozen=True, kw_only=True)
class ConsulOptions:
    """How a :class:`ConsulRegistry` uses its agent: the registry's keyword arguments.

    Attributes:
        scheme: ``"http"`` or ``"https"``.
        token: ACL token (``X-Consul-Token``); overrides ``CONSUL_HTTP_TOKEN``.
        verify: TLS verification for https: a CA bundle path or a bool.
        cert: Client certificate for https: a path or ``(cert, key)`` paths.
        checks: Health checks per instance, any of ``"ttl"`` and ``"grpc"`` (a tuple
            without repeats once built).
        ttl: TTL of the ``ttl`` check, seconds.
        heartbeat_interval: Seconds between TTL passes (default ``ttl / 3``).
        grpc_interval: Interval of the ``grpc`` check, seconds.
        grpc_timeout: Timeout of one ``grpc`` check, seconds.
        deregister_critical_after: ``DeregisterCriticalServiceAfter`` of every check,
            seconds (Consul raises values under one minute to one minute).
        watch_wait: ``wait`` of a blocking query, seconds (well under aiohttp's 300 s).
        watch_burst: Token bucket size of a watch loop.
        watch_interval: Seconds to earn one watch query back (the loop degrades to one
            query per interval under churn).
        request_timeout: Bound of every non-blocking request, seconds.
        backoff_max: Cap of the retry delay while Consul is unreachable, seconds.

    Raises:
        ValueError: ``checks`` empty or unknown, or ``watch_wait`` too long.
    """

    scheme: str = "http"
    token: str | None = None
    verify: bool | str = True
    cert: str | tuple[str, str] | None = None
    checks: Sequence[str] = ("ttl",)
    ttl: float = 15.0
    heartbeat_interval: float | None = None
    grpc_interval: float = 5.0
    grpc_timeout: float = 2.0
    deregister_critical_after: float = 60.0
    watch_wait: float = 55.0
    watch_burst: int = 2
    watch_interval: float = 15.0
    request_timeout: float = 10.0
    backoff_max: float = 30.0

    def __post_init__(self) -> None:
        kinds = tuple(dict.fromkeys(self.checks))
        unknown = set(kinds) - CHECK_KINDS
        if unknown or not kinds:
            raise ValueError(f"checks must be a non-empty subset of {sorted(CHECK_KINDS)}")
        if self.watch_wait * 17 / 16 + self.request_timeout >= _AIOHTTP_TOTAL_TIMEOUT:
            raise ValueError("watch_wait must stay well under aiohttp's 300 s total timeout")
        object.__setattr__(self, "checks", kinds)


class ConsulRegistry(RemoteRegistryBase):
    """Registry on a Consul agent.

    Args:
        host: Consul agent HTTP address.
        port: Consul agent HTTP port.
        **options: :class:`ConsulOptions` (scheme, token, TLS, checks, TTL, watch pacing).
    """

    backend: ClassVar[str] = "consul"
    _heartbeat_task_name = "hivewire-consul-heartbeat"

    def __init__(self, host: str = "127.0.0.1", port: int = 8500, **options: Any) -> None:
        super().__init__()
        self._host = host
        self._port = port
        self._o = ConsulOptions(**options)
        self._heartbeat_interval = self._o.heartbeat_interval or self._o.ttl / 3
        self._client: consul.aio.Consul | None = None
        # Instances the agent is known to hold; the others are (re-)registered by heartbeats.
        self._on_agent: set[str] = set()
        self._kick = asyncio.Event()

    @property
    def address(self) -> str:
        """The agent's HTTP address, ``scheme://host:port``."""
        return f"{self._o.scheme}://{self._host}:{self._port}"

    # -- lifecycle -----------------------------------------------------------------------

    async def _connect(self) -> None:
        """Create the HTTP client (Consul need not be up yet)."""
        self._client = consul.aio.Consul(
            host=self._host,
            port=self._port,
            scheme=self._o.scheme,
            verify=self._o.verify,
            cert=self._o.cert,
            token=self._o.token,
        )
        if self._o.token is not None:
            # py-consul lets CONSUL_HTTP_TOKEN override token=; the configured one must win.
            self._client.token = self._o.token

    def _log_started(self) -> None:
        logger.info(
            "registry: consul at %s (checks %s, ttl %.1fs, deregister critical after %.0fs)",
            self.address,
            "+".join(self._o.checks),
            self._o.ttl,
            self._o.deregister_critical_after,
        )

    async def _forget(self, instance: Instance) -> None:
        await self._deregister_remote(instance.instance_id)

    async def _disconnect(self) -> None:
        if self._client is not None:
            await self._client.close()

    # -- calls ---------------------------------------------------------------------------

    @property
    def _c(self) -> consul.aio.Consul:
        if self._client is None:
            raise RuntimeError("ConsulRegistry is not started: use start() or async with")
        return self._client

    async def _call(self, coro: Awaitable[_T], *, limit: float | None = None) -> _T:
        """Await one py-consul call, mapping transport failures to :class:`_UnavailableError`.

        ``BadRequest`` and ``ACLPermissionDenied`` pass through: they are not outages.
        """
        try:
            async with asyncio.timeout(limit or self._o.request_timeout):
                return await coro
        except _REJECTED:
            raise
        except ConsulException as exc:
            raise _UnavailableError(str(exc)) from exc
        except _TRANSIENT as exc:
            raise _UnavailableError(_unreachable(exc)) from exc

    def _check_definitions(self, instance: Instance) -> list[dict[str, Any]]:
        iid = instance.instance_id
        deregister = go_duration(max(self._o.deregister_critical_after, 1.0))
        checks: list[dict[str, Any]] = []
        if "ttl" in self._o.checks:
            checks.append(
                {
                    "CheckID": f"ttl:{iid}",
                    "Name": f"{instance.service} {iid} heartbeat",
                    "Notes": "TTL passed by the hivewire service itself",
                    "TTL": go_duration(self._o.ttl),
                    # Passing at once: the process registers only once it serves.
                    "Status": "passing",
                    "DeregisterCriticalServiceAfter": deregister,
                }
            )
        if "grpc" in self._o.checks:
            target = instance.endpoint
            health_service = instance.meta.get(META_HEALTH_SERVICE, "")
            if health_service:
                target = f"{target}/{health_service}"
            check: dict[str, Any] = {
                "CheckID": f"grpc:{iid}",
                "Name": f"{instance.service} {iid} gRPC health",
                "GRPC": target,
                "GRPCUseTLS": True,
                "TLSSkipVerify": False,
                "Interval": go_duration(self._o.grpc_interval),
                "Timeout": go_duration(self._o.grpc_timeout),
                "DeregisterCriticalServiceAfter": deregister,
            }
            server_name = instance.meta.get(META_TLS_SERVER_NAME)
            if server_name:
                check["TLSServerName"] = server_name
            checks.append(check)
        return checks

    async def _register_remote(self, instance: Instance) -> None:
        checks = self._check_definitions(instance)
        ok = await self._call(
            self._c.agent.service.register(
                instance.service,
                service_id=instance.instance_id,
                address=instance.address,
                port=instance.port,
                tags=list(instance.tags),
                meta=dict(instance.meta),
                check=checks[0],
                extra_checks=checks[1:],
                replace_existing_checks=True,
            )
        )
        if not ok:
            raise _UnavailableError(f"register {instance.instance_id}: agent did not accept it")
        # Maintenance mode is how "not serving" is shown; a re-registration must restore it.
        await self._set_maintenance(instance)
        self._on_agent.add(instance.instance_id)

    async def _set_maintenance(self, instance: Instance) -> None:
        await self._call(
            self._c.agent.service.maintenance(
                instance.instance_id,
                "false" if instance.healthy else "true",
                reason=None if instance.healthy else "not serving (draining)",
            )
        )

    async def _deregister_remote(self, instance_id: str) -> None:
        self._on_agent.discard(instance_id)
        try:
            await self._call(self._c.agent.service.deregister(instance_id))
        except (_UnavailableError, ConsulException) as exc:
            # The agent reaps it after DeregisterCriticalServiceAfter anyway.
            logger.warning("registry: deregister of %s failed: %s", instance_id, exc)

    async def _replace_stale(self, instance: Instance) -> None:
        services = await self._call(
            self._c.agent.services(filter_expr=f'Service == "{instance.service}"')
        )
        for sid, raw in (services or {}).items():
            try:
                old = _instance_from_agent_service(raw)
            except (ValueError, KeyError, TypeError):
                continue
            if is_replaced_by(old, instance):
                logger.info(
                    "registry: %s replaces stale %s of %s", instance.instance_id, sid, old.service
                )
                await self._deregister_remote(sid)

    # -- registration --------------------------------------------------------------------

    async def register(self, instance: Instance) -> None:
        """Register an instance with its checks; a restart replaces its own stale entry.

        Raises:
            RegistryError: Consul rejected the registration (ACL denied, bad definition).
        """
        self._require_started()
        self._instances[instance.instance_id] = instance
        self._on_agent.discard(instance.instance_id)
        try:
            await self._replace_stale(instance)
            await self._register_remote(instance)
        except _REJECTED as exc:
            self._instances.pop(instance.instance_id, None)
            raise RegistryError(f"consul rejected {instance.instance_id}: {exc}") from exc
        except _UnavailableError as exc:
            logger.warning(
                "registry: consul unreachable, %s will be registered when it is back: %s",
                instance.instance_id,
                exc,
            )
            self._kick.set()
            return
        self._log_registered(instance)

    async def deregister(self, instance_id: str) -> None:
        """Stop heartbeats and deregister the instance (idempotent)."""
        self._require_started()
        if self._instances.pop(instance_id, None) is None:
            return
        await self._deregister_remote(instance_id)
        logger.info("registry: deregistered %s", instance_id)

    async def _publish_health(self, instance: Instance) -> None:
        if instance.instance_id not in self._on_agent:
            return  # the heartbeat loop registers it with the right state
        try:
            await self._set_maintenance(instance)
        except (_UnavailableError, ConsulException) as exc:
            logger.warning(
                "registry: health of %s not published yet: %s", instance.instance_id, exc
            )
            self._on_agent.discard(instance.instance_id)
            self._kick.set()

    async def _heartbeat_once(self, instance: Instance) -> None:
        iid = instance.instance_id
        if iid not in self._on_agent:
            await self._register_remote(instance)
            metrics.REREGISTRATIONS.labels(self.backend).inc()
            logger.info("registry: %s registered with consul again", iid)
            return
        if "ttl" in self._o.checks:
            alive = await self._call(self._c.agent.check.ttl_pass(f"ttl:{iid}"))
        else:
            found = await self._call(
                self._c.http.get(
                    CB.json(),
                    f"/v1/agent/service/{iid}",
                    headers=self._c.prepare_headers(),
                )
            )
            alive = found is not None
        if not alive:
            # 404: the agent reaped the service or restarted without it.
            logger.warning("registry: consul no longer knows %s; registering it again", iid)
            self._on_agent.discard(iid)
            await self._register_remote(instance)
            metrics.REREGISTRATIONS.labels(self.backend).inc()
            return
        metrics.HEARTBEATS.labels(self.backend).inc()

    async def _heartbeat_loop(self) -> None:
        backoff = Backoff(initial=min(1.0, self._heartbeat_interval), maximum=self._o.backoff_max)
        failing = False
        delay = self._heartbeat_interval
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):
                    await self._kick.wait()
            self._kick.clear()
            delay = self._heartbeat_interval
            for instance in list(self._instances.values()):
                if self._instances.get(instance.instance_id) is not instance:
                    continue
                try:
                    await self._heartbeat_once(instance)
                except (_UnavailableError, ConsulException) as exc:
                    metrics.HEARTBEATS_FAILED.labels(self.backend).inc()
                    if not failing:
                        logger.warning("registry: consul heartbeat failed: %s", exc)
                    failing = True
                    # Retry sooner than a full interval so the TTL does not lapse.
                    delay = min(self._heartbeat_interval, backoff.next_delay())
                    break
            else:
                if failing:
                    logger.info("registry: consul heartbeats succeed again")
                failing = False
                backoff.reset()

    # -- reads ---------------------------------------------------------------------------

    async def _health(
        self, service: str, *, tag: str | None, index: int, wait: float | None
    ) -> tuple[int, list[Instance]]:
        kwargs: dict[str, Any] = {"passing": True}
        if tag is not None:
            kwargs["tag"] = tag
        limit = self._o.request_timeout
        if index > 0 and wait is not None:
            kwargs["index"] = str(index)
            kwargs["wait"] = go_duration(wait)
            # The agent may hold the request for wait + wait/16 of jitter.
            limit = wait * 17 / 16 + self._o.request_timeout
        raw_index, entries = await self._call(
            self._c.health.service(service, **kwargs), limit=limit
        )
        try:
            new_index = int(raw_index)
        except (TypeError, ValueError):
            new_index = 0
        found: list[Instance] = []
        for entry in entries or []:
            try:
                found.append(_instance_from_health_entry(entry))
            except (ValueError, KeyError, TypeError) as exc:
                logger.warning("registry: ignoring malformed consul entry: %s", exc)
        return new_index, sort_instances(found)

    async def resolve(self, service: str, *, tag: str | None = None) -> list[Instance]:
        """Return the instances of ``service`` whose checks all pass.

        Raises:
            RegistryUnavailableError: Consul could not be reached.
            RegistryError: Consul refused the query (ACL).
        """
        self._require_started()
        try:
            _, found = await self._health(service, tag=tag, index=0, wait=None)
        except _UnavailableError as exc:
            raise RegistryUnavailableError(f"consul at {self.address}: {exc}") from exc
        except ConsulException as exc:
            raise RegistryError(f"consul refused health/service/{service}: {exc}") from exc
        return found

    async def watch(self, service: str) -> AsyncIterator[list[Instance]]:
        """Yield the passing set of ``service`` now and after every change.

        Blocking queries with Consul's client rules; never raises on an outage. Ends when
        the registry is closed.
        """
        self._require_started()
        bucket = TokenBucket(burst=self._o.watch_burst, interval=self._o.watch_interval)
        backoff = Backoff(initial=0.2, maximum=self._o.backoff_max)
        index = 0
        last: list[Instance] | None = None
        while not self._closed:
            await bucket.acquire()
            query = asyncio.ensure_future(
                self._health(service, tag=None, index=index, wait=self._o.watch_wait)
            )
            closing = asyncio.ensure_future(self._closing.wait())
            try:
                await asyncio.wait({query, closing}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                closing.cancel()
                if not query.done():
                    query.cancel()
            if self._closed:
                with contextlib.suppress(BaseException):
                    await query
                return
            try:
                new_index, current = query.result()
            except (_UnavailableError, ConsulException) as exc:
                metrics.WATCH_ERRORS.labels(self.backend).inc()
                logger.warning(
                    "registry: watch of %s failed (%s); keeping last known", service, exc
                )
                await backoff.wait()
                continue
            backoff.reset()
            # Consul's client rules: an index that went backwards (agent restart, snapshot
            # restore) resets the watch; an index below 1 would turn the next call into a
            # non-blocking busy loop.
            if new_index < index:
                logger.info("registry: consul index of %s went backwards; resetting", service)
                index = 0
            else:
                index = new_index
            index = max(index, 1)
            if current != last:
                last = current
                yield current


def _instance_from_health_entry(entry: Mapping[str, Any]) -> Instance:
    svc = entry["Service"]
    address = svc.get("Address") or entry.get("Node", {}).get("Address", "")
    return Instance(
        service=svc["Service"],
        instance_id=svc["ID"],
        address=address,
        port=int(svc["Port"]),
        tags=tuple(svc.get("Tags") or ()),
        meta=dict(svc.get("Meta") or {}),
        healthy=True,
    )


def _instance_from_agent_service(raw: Mapping[str, Any]) -> Instance:
    return Instance(
        service=raw["Service"],
        instance_id=raw["ID"],
        address=raw.get("Address") or "127.0.0.1",
        port=int(raw["Port"]),
        tags=tuple(raw.get("Tags") or ()),
        meta=dict(raw.get("Meta") or {}),
    )
