"""An in-process stand-in for one Consul agent (server mode, single node, dc ``dc1``).

It speaks the parts of Consul's HTTP API that hivewire and py-consul use, with Consul's
semantics where they matter to a client: Go-style request decoding, checks that really run
(gRPC health checks over TLS with grpcio, TTL timers, TCP and HTTP probes) with Consul's
status handling, the critical-service reaper, the Raft-like index with blocking queries,
``?passing``/``tag``/``filter`` on health reads, ACLs and Consul's error texts. Every timing
constant is a :class:`Timing` field whose default is Consul's; tests shrink them explicitly.

Not Consul: there is one node and no anti-entropy delay, the agent and the catalog are the
same state, and ``TLSSkipVerify`` cannot be honoured by grpcio (the check verifies against
``system_roots`` instead). Test hooks (``pause_check_runners``, ``set_serf_health``,
``reset_index``, ``drop_long_polls``, ``stop_http``/``start_http``, ``wait_for``, ``events``)
are extensions for tests.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import re
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import grpc
from aiohttp import web
from grpc_health.v1 import health_pb2, health_pb2_grpc

from . import godecode
from .bexpr import FilterError, compile_filter

logger = logging.getLogger(__name__)

__all__ = ["AclToken", "ConsulStandin", "Timing"]

PASSING, WARNING, CRITICAL = "passing", "warning", "critical"
ANONYMOUS_ACCESSOR = "00000000-0000-0000-0000-000000000002"

_GO_CODE_NAMES = {
    grpc.StatusCode.OK: "OK",
    grpc.StatusCode.CANCELLED: "Canceled",
    grpc.StatusCode.UNKNOWN: "Unknown",
    grpc.StatusCode.INVALID_ARGUMENT: "InvalidArgument",
    grpc.StatusCode.DEADLINE_EXCEEDED: "DeadlineExceeded",
    grpc.StatusCode.NOT_FOUND: "NotFound",
    grpc.StatusCode.ALREADY_EXISTS: "AlreadyExists",
    grpc.StatusCode.PERMISSION_DENIED: "PermissionDenied",
    grpc.StatusCode.RESOURCE_EXHAUSTED: "ResourceExhausted",
    grpc.StatusCode.FAILED_PRECONDITION: "FailedPrecondition",
    grpc.StatusCode.ABORTED: "Aborted",
    grpc.StatusCode.OUT_OF_RANGE: "OutOfRange",
    grpc.StatusCode.UNIMPLEMENTED: "Unimplemented",
    grpc.StatusCode.INTERNAL: "Internal",
    grpc.StatusCode.UNAVAILABLE: "Unavailable",
    grpc.StatusCode.DATA_LOSS: "DataLoss",
    grpc.StatusCode.UNAUTHENTICATED: "Unauthenticated",
}


@dataclass(frozen=True)
class Timing:
    """Consul's timing constants, in seconds; every default is the real one.

    Attributes:
        min_interval: Check intervals below this are raised to it (``checks.MinInterval``).
        check_timeout: Default ``Timeout`` of gRPC/HTTP/TCP checks.
        reap_interval: How often the reaper looks for long-critical services.
        deregister_minimum: Floor of ``DeregisterCriticalServiceAfter``.
        default_wait: ``wait`` of a blocking query that gives none.
        max_wait: Cap of ``wait``.
        jitter_fraction: A blocking query also waits up to ``wait * jitter_fraction``.
        output_max: Check output is truncated past this many bytes.
        output_sync_deferral: Output-only check changes reach readers after this long.
    """

    min_interval: float = 1.0
    check_timeout: float = 10.0
    reap_interval: float = 30.0
    deregister_minimum: float = 60.0
    default_wait: float = 300.0
    max_wait: float = 600.0
    jitter_fraction: float = 1 / 16
    output_max: int = 4096
    output_sync_deferral: float = 300.0


@dataclass(frozen=True)
class AclToken:
    """An ACL token: rules are longest-prefix maps of name prefix -> read|write|deny.

    Attributes:
        secret: The SecretID clients send.
        accessor: The AccessorID named in error texts.
        service_prefix: Service rules.
        node_prefix: Node rules.
    """

    secret: str
    service_prefix: Mapping[str, str] = field(default_factory=dict)
    node_prefix: Mapping[str, str] = field(default_factory=dict)
    accessor: str = field(default_factory=lambda: str(uuid.uuid4()))


@dataclass(frozen=True)
class TlsFilesLike:
    """CA, certificate and key paths (any object with ``ca``, ``cert``, ``key`` works)."""

    ca: Path
    cert: Path
    key: Path


class HttpError(Exception):
    """An HTTP error answered with a plain-text body, as Consul does."""

    def __init__(self, status: int, text: str, headers: Mapping[str, str] | None = None) -> None:
        super().__init__(text)
        self.status = status
        self.text = text
        self.headers = dict(headers or {})


@dataclass
class _Service:
    id: str
    name: str
    tags: list[str]
    address: str
    port: int
    meta: dict[str, str]
    weights: dict[str, int]
    enable_tag_override: bool
    create_index: int
    modify_index: int

    def definition(self) -> tuple[Any, ...]:
        return (
            self.name,
            tuple(self.tags),
            self.address,
            self.port,
            tuple(sorted(self.meta.items())),
            tuple(sorted(self.weights.items())),
            self.enable_tag_override,
        )


@dataclass
class _Check:
    id: str
    name: str
    service_id: str
    service_name: str
    kind: str  # ttl grpc http tcp maintenance serf ""
    status: str
    output: str
    notes: str
    definition: dict[str, Any]
    create_index: int
    modify_index: int
    critical_since: float | None
    interval: float = 0.0
    timeout: float = 0.0
    ttl: float = 0.0
    deregister_after: float | None = None
    output_max: int = 4096
    runner: asyncio.Task[None] | None = None
    ttl_handle: asyncio.TimerHandle | None = None
    success_counter: int = 0
    failure_counter: int = 0
    synced_output: str = ""


class ConsulStandin:
    """The stand-in agent. Start with ``async with ConsulStandin(...) as consul``.

    Args:
        host: Address to bind (loopback only).
        port: Port to bind; 0 picks a free one (kept across ``stop_http``/``start_http``).
        timing: Timing constants (Consul's by default).
        acl_default_policy: ``None`` disables ACLs; ``"allow"`` or ``"deny"`` enables them.
        acl_tokens: Tokens known when ACLs are enabled.
        anonymous: Rules of the anonymous token (requests without a token).
        system_roots: CA bundle (path or PEM bytes) standing in for the host's system
            roots when a gRPC check uses TLS without agent TLS; None = grpcio's defaults.
        agent_tls_for_checks: ``enable_agent_tls_for_checks``: an object with ``ca``,
            ``cert`` and ``key`` paths; the gRPC checks then present that certificate.
        node_name: Name of the single node.
        datacenter: Datacenter name.
    """

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        timing: Timing | None = None,
        acl_default_policy: str | None = None,
        acl_tokens: Iterable[AclToken] = (),
        anonymous: AclToken | None = None,
        system_roots: Path | bytes | None = None,
        agent_tls_for_checks: Any = None,
        node_name: str = "standin-node",
        datacenter: str = "dc1",
    ) -> None:
        if acl_default_policy not in (None, "allow", "deny"):
            raise ValueError("acl_default_policy must be None, 'allow' or 'deny'")
        self.host = host
        self.port = port
        self.timing = timing or Timing()
        self.acl_default_policy = acl_default_policy
        self.acl_tokens = {t.secret: t for t in acl_tokens}
        self.anonymous = anonymous or AclToken(secret="", accessor=ANONYMOUS_ACCESSOR)
        self._system_roots = (
            Path(system_roots).read_bytes()
            if isinstance(system_roots, str | Path)
            else system_roots
        )
        self._agent_tls = agent_tls_for_checks
        self.node_name = node_name
        self.node_id = str(uuid.uuid4())
        self.datacenter = datacenter
        self.events: list[tuple[float, str, dict[str, Any]]] = []
        self.requests: list[tuple[str, str, dict[str, str]]] = []
        self._index = 0
        self._services: dict[str, _Service] = {}
        self._checks: dict[str, _Check] = {}
        # Per service name: index of the last removal of one of its instances.
        self._removed_index: dict[str, int] = {}
        self._services_table_index = 0
        self._node_index = 0
        self._changed = asyncio.Event()
        self._runners_enabled = asyncio.Event()
        self._runners_enabled.set()
        self._long_polls: dict[int, web.Request] = {}
        self._runner: web.AppRunner | None = None
        self._site: web.TCPSite | None = None
        self._reaper: asyncio.Task[None] | None = None
        self._serf = self._new_serf_check()

    # -- lifecycle -----------------------------------------------------------------------

    @property
    def address(self) -> str:
        """``host:port`` of the HTTP API."""
        return f"{self.host}:{self.port}"

    @property
    def url(self) -> str:
        """``http://host:port``."""
        return f"http://{self.address}"

    async def start(self) -> None:
        """Start the HTTP API and the reaper."""
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._dispatch)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self._runner.setup()
        await self.start_http()
        self._reaper = asyncio.create_task(self._reap_loop(), name="consul-standin-reaper")
        self._log("started", address=self.address)

    async def start_http(self) -> None:
        """(Re)open the HTTP listener on the same port (the end of an outage)."""
        assert self._runner is not None
        self._site = web.TCPSite(self._runner, self.host, self.port, reuse_address=True)
        await self._site.start()
        server = self._site._server
        assert server is not None
        sockets = getattr(server, "sockets", None) or []
        if sockets:
            self.port = int(sockets[0].getsockname()[1])

    async def stop_http(self) -> None:
        """Close the HTTP listener and every open connection (an outage); state survives."""
        self.drop_long_polls()
        if self._site is not None:
            await self._site.stop()
            self._site = None
        # Keep-alive connections would still reach the handlers: cut them too.
        if self._runner is not None and self._runner.server is not None:
            for proto in list(self._runner.server.connections):
                proto.force_close()
                if proto.transport is not None:
                    proto.transport.close()
        self._log("http-stopped")

    async def stop(self) -> None:
        """Stop everything."""
        if self._reaper is not None:
            self._reaper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reaper
        for check in list(self._checks.values()):
            self._stop_runner(check)
        self.drop_long_polls()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def restart(self) -> None:
        """Lose all state, as a ``consul agent -dev`` restart does (index starts over)."""
        for check in list(self._checks.values()):
            self._stop_runner(check)
        self._services.clear()
        self._checks.clear()
        self._removed_index.clear()
        self._index = 0
        self._services_table_index = 0
        self._serf = self._new_serf_check()
        self.drop_long_polls()
        self._notify()
        self._log("restarted")

    async def __aenter__(self) -> ConsulStandin:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # -- test hooks ----------------------------------------------------------------------

    def _log(self, kind: str, **details: Any) -> None:
        self.events.append((time.monotonic(), kind, details))

    def pause_check_runners(self) -> None:
        """Stop running gRPC/HTTP/TCP checks until :meth:`resume_check_runners`."""
        self._runners_enabled.clear()

    def resume_check_runners(self) -> None:
        """Resume running checks."""
        self._runners_enabled.set()

    def set_serf_health(self, status: str) -> None:
        """Set the node's ``serfHealth`` check (critical hides every service from ?passing)."""
        self._update_status(
            self._serf,
            status,
            "Agent alive and reachable" if status == PASSING else "Agent not live or unreachable",
        )

    def reset_index(self, to: int = 1) -> None:
        """Make the index go backwards (a snapshot restore): every object's index <= ``to``."""
        self._index = max(1, to)
        for svc in self._services.values():
            svc.create_index = min(svc.create_index, self._index)
            svc.modify_index = min(svc.modify_index, self._index)
        for check in [*self._checks.values(), self._serf]:
            check.create_index = min(check.create_index, self._index)
            check.modify_index = min(check.modify_index, self._index)
        self._removed_index = {k: min(v, self._index) for k, v in self._removed_index.items()}
        self._services_table_index = min(self._services_table_index, self._index)
        self._node_index = min(self._node_index, self._index)
        self._log("index-reset", to=self._index)

    def drop_long_polls(self) -> int:
        """Close the connections of every blocking query in flight; returns how many."""
        dropped = 0
        for request in list(self._long_polls.values()):
            if request.transport is not None:
                request.transport.close()
                dropped += 1
        self._long_polls.clear()
        if dropped:
            self._log("long-polls-dropped", count=dropped)
        return dropped

    async def wait_for(self, predicate: Callable[[ConsulStandin], bool], *, within: float) -> None:
        """Wait until ``predicate(self)`` holds (re-checked on every state change)."""
        async with asyncio.timeout(within):
            while True:
                event = self._changed
                if predicate(self):
                    return
                await event.wait()

    def service_ids(self, name: str | None = None) -> list[str]:
        """IDs of the registered services (of one name)."""
        return sorted(s.id for s in self._services.values() if name is None or s.name == name)

    def check_status(self, check_id: str) -> str | None:
        """Status of a check, or None."""
        check = self._checks.get(check_id)
        return check.status if check else None

    def check_definition(self, check_id: str) -> dict[str, Any] | None:
        """The decoded definition of a check (canonical Go field names), or None."""
        check = self._checks.get(check_id)
        return dict(check.definition) if check else None

    def check_output(self, check_id: str) -> str | None:
        """Output of a check, or None."""
        check = self._checks.get(check_id)
        return check.output if check else None

    def count_requests(self, method: str, path_prefix: str) -> int:
        """How many requests hit a route (for rate-limit assertions)."""
        return sum(1 for m, p, _ in self.requests if m == method and p.startswith(path_prefix))

    @property
    def index(self) -> int:
        """The current global index."""
        return max(1, self._index)

    # -- index ---------------------------------------------------------------------------

    def _bump(self) -> int:
        self._index += 1
        return self._index

    def _notify(self) -> None:
        event, self._changed = self._changed, asyncio.Event()
        event.set()

    def _service_index(self, name: str) -> int:
        best = self._removed_index.get(name, 0)
        found = False
        for svc in self._services.values():
            if svc.name != name:
                continue
            found = True
            best = max(best, svc.modify_index)
            for check in self._checks.values():
                if check.service_id == svc.id:
                    best = max(best, check.modify_index)
        if found:
            best = max(best, self._serf.modify_index)
        elif not best:
            best = self._index
        return max(best, 1)

    # -- checks --------------------------------------------------------------------------

    def _new_serf_check(self) -> _Check:
        index = self._bump()
        self._node_index = index
        return _Check(
            id="serfHealth",
            name="Serf Health Status",
            service_id="",
            service_name="",
            kind="serf",
            status=PASSING,
            output="Agent alive and reachable",
            notes="",
            definition={},
            create_index=index,
            modify_index=index,
            critical_since=None,
            synced_output="Agent alive and reachable",
        )

    def _truncate(self, check: _Check, output: str) -> str:
        limit = check.output_max
        data = output.encode()
        if len(data) <= limit:
            return output
        head = data[:limit].decode(errors="ignore")
        return f"{head} ... (captured {limit} of {len(data)} bytes)"

    def _update_status(self, check: _Check, status: str, output: str) -> None:
        output = self._truncate(check, output)
        changed_status = check.status != status
        if changed_status:
            check.critical_since = time.monotonic() if status == CRITICAL else None
            check.status = status
            check.output = output
            check.synced_output = output
            check.modify_index = self._bump()
            self._log("check-status", check_id=check.id, status=status, output=output)
            self._notify()
        elif check.output != output:
            # Output-only changes reach the catalog at most every output_sync_deferral.
            check.output = output
            asyncio.get_running_loop().call_later(
                self.timing.output_sync_deferral, self._sync_output, check.id
            )
            # No index bump, so blocking queries go back to sleep; wait_for() re-checks.
            self._notify()

    def _sync_output(self, check_id: str) -> None:
        check = self._checks.get(check_id)
        if check is None or check.synced_output == check.output:
            return
        check.synced_output = check.output
        check.modify_index = self._bump()
        self._notify()

    def _stop_runner(self, check: _Check) -> None:
        if check.runner is not None:
            check.runner.cancel()
            check.runner = None
        if check.ttl_handle is not None:
            check.ttl_handle.cancel()
            check.ttl_handle = None

    def _start_runner(self, check: _Check) -> None:
        self._stop_runner(check)
        if check.kind == "ttl":
            self._arm_ttl(check)
        elif check.kind in ("grpc", "tcp", "http"):
            check.runner = asyncio.create_task(self._run_periodic(check), name=f"check-{check.id}")

    def _arm_ttl(self, check: _Check) -> None:
        if check.ttl_handle is not None:
            check.ttl_handle.cancel()
        loop = asyncio.get_running_loop()
        check.ttl_handle = loop.call_later(check.ttl, self._ttl_expired, check.id)

    def _ttl_expired(self, check_id: str) -> None:
        check = self._checks.get(check_id)
        if check is None:
            return
        check.ttl_handle = None
        last = check.output
        output = (
            f"TTL expired (last output before timeout follows): {last}" if last else "TTL expired"
        )
        self._update_status(check, CRITICAL, output)

    def _status_handler(self, check: _Check, status: str, output: str) -> None:
        """Consul's StatusHandler: thresholds before passing, warning and critical."""
        success_before = int(check.definition.get("SuccessBeforePassing", 0))
        failures_critical = int(check.definition.get("FailuresBeforeCritical", 0))
        failures_warning = (
            int(check.definition.get("FailuresBeforeWarning", 0)) or failures_critical
        )
        if status in (PASSING, WARNING):
            check.success_counter += 1
            check.failure_counter = 0
            if check.success_counter >= success_before:
                self._update_status(check, status, output)
        else:
            check.failure_counter += 1
            check.success_counter = 0
            if check.failure_counter >= failures_critical:
                self._update_status(check, CRITICAL, output)
            elif check.failure_counter >= failures_warning:
                self._update_status(check, WARNING, output)

    async def _run_periodic(self, check: _Check) -> None:
        # Consul staggers the first run randomly within one interval.
        await asyncio.sleep(random.uniform(0, check.interval))
        while True:
            await self._runners_enabled.wait()
            if check.kind == "grpc":
                status, output = await self._probe_grpc(check)
            elif check.kind == "tcp":
                status, output = await self._probe_tcp(check)
            else:
                status, output = await self._probe_http(check)
            if self._checks.get(check.id) is not check:
                return
            self._status_handler(check, status, output)
            await asyncio.sleep(check.interval)

    def _grpc_credentials(self, check: _Check) -> grpc.ChannelCredentials:
        if self._agent_tls is not None:
            return grpc.ssl_channel_credentials(
                root_certificates=Path(self._agent_tls.ca).read_bytes(),
                private_key=Path(self._agent_tls.key).read_bytes(),
                certificate_chain=Path(self._agent_tls.cert).read_bytes(),
            )
        # Consul without enable_agent_tls_for_checks: system roots, no client certificate.
        return grpc.ssl_channel_credentials(root_certificates=self._system_roots)

    async def _probe_grpc(self, check: _Check) -> tuple[str, str]:
        target = check.definition["GRPC"]
        server, _, service = target.partition("/")
        options: list[tuple[str, Any]] = []
        server_name = check.definition.get("TLSServerName")
        if check.definition.get("GRPCUseTLS"):
            if server_name:
                options.append(("grpc.ssl_target_name_override", server_name))
            channel = grpc.aio.secure_channel(server, self._grpc_credentials(check), options)
        else:
            channel = grpc.aio.insecure_channel(server, options)
        try:
            stub = health_pb2_grpc.HealthStub(channel)
            response = await stub.Check(
                health_pb2.HealthCheckRequest(service=service), timeout=check.timeout
            )
        except grpc.aio.AioRpcError as exc:
            code = _GO_CODE_NAMES.get(exc.code(), str(exc.code()))
            return CRITICAL, f"rpc error: code = {code} desc = {exc.details()}"
        finally:
            await channel.close()
        if response.status == health_pb2.HealthCheckResponse.SERVING:
            return PASSING, f"gRPC check {target}: success"
        status_name = health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)
        return CRITICAL, f"gRPC {target} serving status: {status_name}"

    async def _probe_tcp(self, check: _Check) -> tuple[str, str]:
        target = check.definition["TCP"]
        host, _, port = target.rpartition(":")
        try:
            async with asyncio.timeout(check.timeout):
                _, writer = await asyncio.open_connection(host.strip("[]"), int(port))
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
        except (OSError, TimeoutError) as exc:
            return CRITICAL, f"dial tcp {target}: {exc}"
        return PASSING, f"TCP connect {target}: Success"

    async def _probe_http(self, check: _Check) -> tuple[str, str]:
        url = check.definition["HTTP"]
        method = check.definition.get("Method") or "GET"
        try:
            async with (
                aiohttp.ClientSession(
                    timeout=aiohttp.ClientTimeout(total=check.timeout)
                ) as session,
                session.request(method, url) as response,
            ):
                body = await response.text(errors="replace")
        except (aiohttp.ClientError, TimeoutError) as exc:
            return CRITICAL, f'{method} "{url}": {exc}'
        output = f"HTTP {method} {url}: {response.status} {response.reason} Output: {body}"
        if 200 <= response.status < 300:
            return PASSING, output
        if response.status == 429:
            return WARNING, output
        return CRITICAL, output

    async def _reap_loop(self) -> None:
        while True:
            await asyncio.sleep(self.timing.reap_interval)
            self.reap()

    def reap(self) -> list[str]:
        """Run the reaper once; returns the IDs of the services it removed."""
        now = time.monotonic()
        reaped: list[str] = []
        for check in list(self._checks.values()):
            if check.deregister_after is None or check.status != CRITICAL:
                continue
            if check.critical_since is None or check.service_id not in self._services:
                continue
            timeout = max(check.deregister_after, self.timing.deregister_minimum)
            if now - check.critical_since > timeout:
                reaped.append(check.service_id)
                self._remove_service(check.service_id)
                self._log("reaped", service_id=check.service_id, check_id=check.id)
        return reaped

    # -- state changes -------------------------------------------------------------------

    def _remove_service(self, service_id: str) -> None:
        svc = self._services.pop(service_id, None)
        if svc is None:
            return
        index = self._bump()
        for check in [c for c in self._checks.values() if c.service_id == service_id]:
            self._stop_runner(check)
            del self._checks[check.id]
        # Like Consul's per-name index: a removal moves it forward (and, for the last
        # instance, keeps it as the "extinction" index).
        self._removed_index[svc.name] = index
        self._services_table_index = index
        self._notify()

    def _register(self, body: dict[str, Any], replace_checks: bool) -> None:
        name = body.get("Name", "")
        if not name:
            raise HttpError(400, "Missing service name")
        service_id = body.get("ID") or name
        address = body.get("Address", "")
        if address in ("0.0.0.0", "::", "[::]"):
            raise HttpError(400, "Invalid service address")
        meta = body.get("Meta") or {}
        problem = _validate_meta(meta)
        if problem:
            raise HttpError(400, f"Invalid Service Meta: {problem}")
        check_bodies = []
        if "Check" in body:
            check_bodies.append(body["Check"])
        check_bodies.extend(body.get("Checks") or [])
        prepared = [
            self._prepare_check(cb, i, len(check_bodies), service_id, name)
            for i, cb in enumerate(check_bodies)
        ]
        weights = body.get("Weights") or {"Passing": 1, "Warning": 1}
        tags = body.get("Tags") or []
        existing = self._services.get(service_id)
        new = _Service(
            id=service_id,
            name=name,
            tags=list(tags),
            address=address,
            port=int(body.get("Port", 0)),
            meta=dict(meta),
            weights={
                "Passing": int(weights.get("Passing", 1)),
                "Warning": int(weights.get("Warning", 1)),
            },
            enable_tag_override=bool(body.get("EnableTagOverride", False)),
            create_index=0,
            modify_index=0,
        )
        changed = False
        if existing is None or existing.definition() != new.definition():
            index = self._bump()
            new.create_index = existing.create_index if existing else index
            new.modify_index = index
            if existing is not None and existing.name != name:
                self._removed_index[existing.name] = index
            self._services[service_id] = new
            self._services_table_index = index
            changed = True
        else:
            new = existing
        keep = {c.id for c in prepared}
        if replace_checks:
            for check in [
                c
                for c in self._checks.values()
                if c.service_id == service_id and c.id not in keep and c.kind != "maintenance"
            ]:
                self._stop_runner(check)
                del self._checks[check.id]
                # A deleted check changes the service's health: readers must wake up.
                self._services[service_id].modify_index = self._bump()
                changed = True
        for check in prepared:
            check.service_name = name
            old = self._checks.get(check.id)
            if old is not None:
                # Re-adding a check keeps its status and output (anti-flap); its runner restarts.
                self._stop_runner(old)
                check.status, check.output, check.synced_output = (
                    old.status,
                    old.output,
                    old.synced_output,
                )
                check.critical_since = old.critical_since
                check.create_index = old.create_index
                if old.definition != check.definition:
                    check.modify_index = self._bump()
                    changed = True
                else:
                    check.modify_index = old.modify_index
            else:
                index = self._bump()
                check.create_index = check.modify_index = index
                check.critical_since = time.monotonic() if check.status == CRITICAL else None
                changed = True
            self._checks[check.id] = check
            self._start_runner(check)
        self._log("registered", service_id=service_id, name=name, checks=sorted(keep))
        if changed:
            self._notify()

    def _prepare_check(
        self, body: dict[str, Any], position: int, count: int, service_id: str, name: str
    ) -> _Check:
        ttl = body.get("TTL", 0)
        interval = body.get("Interval", 0)
        if ttl and interval:
            raise HttpError(400, "Invalid check: Interval and TTL cannot both be specified")
        if body.get("GRPC"):
            kind = "grpc"
        elif body.get("HTTP"):
            kind = "http"
        elif ttl:
            kind = "ttl"
        elif body.get("TCP"):
            kind = "tcp"
        elif (
            body.get("UDP")
            or body.get("AliasService")
            or body.get("DockerContainerID")
            or body.get("ScriptArgs")
            or body.get("H2PING")
            or body.get("OSService")
        ):
            kind = "other"
        else:
            kind = ""
        if kind in ("grpc", "http", "tcp", "other") and interval <= 0:
            raise HttpError(
                400,
                "Invalid check: Interval must be > 0 for Script, HTTP, H2PING, TCP, UDP "
                "or GRPC checks",
            )
        if kind in ("", "ttl") and ttl <= 0:
            raise HttpError(400, "Invalid check: TTL must be > 0 for TTL checks")
        warning = int(body.get("FailuresBeforeWarning", 0))
        critical = int(body.get("FailuresBeforeCritical", 0))
        if warning > critical:
            raise HttpError(
                400,
                "Invalid check: FailuresBeforeWarning can't be higher than FailuresBeforeCritical",
            )
        status = body.get("Status", "") or CRITICAL
        if status not in (PASSING, WARNING, CRITICAL):
            raise HttpError(400, "Status for checks must 'passing', 'warning', 'critical'")
        check_id = body.get("CheckID") or (
            f"service:{service_id}" if count == 1 else f"service:{service_id}:{position + 1}"
        )
        dcsa = body.get("DeregisterCriticalServiceAfter")
        definition = {k: v for k, v in body.items() if k not in ("Status", "Notes")}
        output_max = int(body.get("OutputMaxSize") or self.timing.output_max)
        return _Check(
            id=check_id,
            name=body.get("Name") or f"Service '{name}' check",
            service_id=service_id,
            service_name=name,
            kind=kind,
            status=status,
            output="",
            notes=body.get("Notes", ""),
            definition=definition,
            create_index=0,
            modify_index=0,
            critical_since=None,
            interval=max(interval / 1e9, self.timing.min_interval) if interval else 0.0,
            timeout=(body.get("Timeout") or 0) / 1e9 or self.timing.check_timeout,
            ttl=ttl / 1e9,
            deregister_after=dcsa / 1e9 if dcsa else None,
            output_max=output_max,
        )

    # -- ACL -----------------------------------------------------------------------------

    def _token(self, request: web.Request) -> AclToken | None:
        """The request's token (None when ACLs are disabled)."""
        if self.acl_default_policy is None:
            return None
        secret = request.headers.get("X-Consul-Token", "")
        auth = request.headers.get("Authorization", "")
        if not secret and auth.lower().startswith("bearer "):
            secret = auth[7:].strip()
        if not secret:
            secret = request.query.get("token", "")
        if not secret:
            return self.anonymous
        token = self.acl_tokens.get(secret)
        if token is None:
            raise HttpError(403, "ACL not found")
        return token

    def _allowed(self, token: AclToken | None, resource: str, name: str, level: str) -> bool:
        if token is None:
            return True
        rules = token.service_prefix if resource == "service" else token.node_prefix
        best: str | None = None
        for prefix in rules:
            if name.startswith(prefix) and (best is None or len(prefix) > len(best)):
                best = prefix
        if best is None:
            return self.acl_default_policy == "allow"
        granted = rules[best]
        if granted == "write":
            return True
        return granted == "read" and level == "read"

    def _require(self, token: AclToken | None, resource: str, name: str, level: str) -> None:
        if self._allowed(token, resource, name, level):
            return
        assert token is not None
        if token.accessor == ANONYMOUS_ACCESSOR:
            raise HttpError(
                403,
                f"Permission denied: anonymous token lacks permission '{resource}:{level}' on "
                f'"{name}". The anonymous token is used implicitly when a request does not '
                "specify a token.",
            )
        raise HttpError(
            403,
            f"Permission denied: token with AccessorID '{token.accessor}' lacks permission "
            f"'{resource}:{level}' on \"{name}\"",
        )

    # -- HTTP ----------------------------------------------------------------------------

    def _routes(
        self,
    ) -> list[tuple[re.Pattern[str], str, Callable[..., Awaitable[web.StreamResponse]]]]:
        return [
            (re.compile(r"^/v1/agent/service/register$"), "PUT", self._h_register),
            (re.compile(r"^/v1/agent/service/deregister/(?P<id>.+)$"), "PUT", self._h_deregister),
            (re.compile(r"^/v1/agent/service/maintenance/(?P<id>.+)$"), "PUT", self._h_maintenance),
            (
                re.compile(r"^/v1/agent/check/(?P<verb>pass|warn|fail)/(?P<id>.+)$"),
                "PUT",
                self._h_check_verb,
            ),
            (re.compile(r"^/v1/agent/check/update/(?P<id>.+)$"), "PUT", self._h_check_update),
            (re.compile(r"^/v1/agent/services$"), "GET", self._h_agent_services),
            (re.compile(r"^/v1/agent/checks$"), "GET", self._h_agent_checks),
            (re.compile(r"^/v1/agent/service/(?P<id>[^/]+)$"), "GET", self._h_agent_service),
            (
                re.compile(r"^/v1/agent/health/service/id/(?P<id>.+)$"),
                "GET",
                self._h_agent_health_id,
            ),
            (re.compile(r"^/v1/health/service/(?P<name>.+)$"), "GET", self._h_health_service),
            (re.compile(r"^/v1/catalog/services$"), "GET", self._h_catalog_services),
            (re.compile(r"^/v1/status/leader$"), "GET", self._h_leader),
        ]

    async def _dispatch(self, request: web.Request) -> web.StreamResponse:
        path = request.path
        self.requests.append((request.method, path, dict(request.query)))
        try:
            if not path.startswith("/v1/"):
                raise HttpError(404, "404 page not found")
            for pattern, method, handler in self._routes():
                match = pattern.match(path)
                if match is None:
                    continue
                # The first route matching the path decides, as Consul's mux does.
                if request.method != method:
                    raise HttpError(405, f"method {request.method} not allowed", {"Allow": method})
                return await handler(request, **match.groupdict())
            raise HttpError(404, "Invalid URL path: not a recognized HTTP API endpoint")
        except HttpError as exc:
            return web.Response(
                status=exc.status,
                text=exc.text,
                content_type="text/plain",
                charset="utf-8",
                headers=exc.headers,
            )

    async def _json_body(self, request: web.Request, struct: godecode.Struct) -> dict[str, Any]:
        raw = await request.read()
        try:
            data = json.loads(raw or b"null")
        except json.JSONDecodeError as exc:
            raise HttpError(400, f"Request decode failed: {exc}") from None
        if data is None:
            return {}
        if not isinstance(data, dict):
            raise HttpError(
                400,
                "Request decode failed: json: cannot unmarshal "
                f"{godecode._json_kind(data)} into Go value of type {struct.name}",
            )
        try:
            return godecode.decode(data, struct)
        except godecode.DecodeError as exc:
            raise HttpError(400, f"Request decode failed: {exc}") from None

    def _json(
        self, data: Any, *, index: int | None = None, headers: Mapping[str, str] | None = None
    ) -> web.Response:
        out = dict(headers or {})
        if index is not None:
            out["X-Consul-Index"] = str(max(1, index))
            out["X-Consul-KnownLeader"] = "true"
            out["X-Consul-LastContact"] = "0"
        if self.acl_default_policy is not None:
            out["X-Consul-Default-Acl-Policy"] = self.acl_default_policy
        return web.json_response(data, headers=out, dumps=lambda d: json.dumps(d, indent=None))

    async def _h_leader(self, request: web.Request) -> web.Response:
        return self._json(f"{self.host}:8300")

    async def _h_register(self, request: web.Request) -> web.Response:
        token = self._token(request)
        body = await self._json_body(request, godecode.SERVICE_DEFINITION)
        replace = "replace-existing-checks" in request.query
        if replace and request.query["replace-existing-checks"] not in ("",):
            try:
                replace = godecode.parse_bool(request.query["replace-existing-checks"])
            except ValueError:
                raise HttpError(400, "Invalid value for ?replace-existing-checks") from None
        name = body.get("Name", "")
        if name:
            self._require(token, "service", name, "write")
        self._register(body, replace)
        return web.Response(status=200)

    async def _h_deregister(self, request: web.Request, id: str) -> web.Response:
        token = self._token(request)
        svc = self._services.get(id)
        if svc is None:
            raise HttpError(404, _unknown_service(id))
        self._require(token, "service", svc.name, "write")
        self._remove_service(id)
        self._log("deregistered", service_id=id)
        return web.Response(status=200)

    async def _h_maintenance(self, request: web.Request, id: str) -> web.Response:
        token = self._token(request)
        if "enable" not in request.query:
            raise HttpError(400, "Missing value for enable")
        try:
            enable = godecode.parse_bool(request.query["enable"])
        except ValueError:
            raise HttpError(400, "Invalid value for enable") from None
        svc = self._services.get(id)
        if svc is None:
            raise HttpError(404, _unknown_service(id))
        self._require(token, "service", svc.name, "write")
        check_id = f"_service_maintenance:{id}"
        if enable and check_id not in self._checks:
            index = self._bump()
            reason = request.query.get("reason") or (
                "Maintenance mode is enabled for this service, but no reason was provided. "
                "This is a default message."
            )
            self._checks[check_id] = _Check(
                id=check_id,
                name="Service Maintenance Mode",
                service_id=id,
                service_name=svc.name,
                kind="maintenance",
                status=CRITICAL,
                output="",
                notes=reason,
                definition={},
                create_index=index,
                modify_index=index,
                critical_since=time.monotonic(),
            )
            self._log("maintenance", service_id=id, enable=True)
            self._notify()
        elif not enable and check_id in self._checks:
            del self._checks[check_id]
            self._bump()
            svc.modify_index = self._index
            self._log("maintenance", service_id=id, enable=False)
            self._notify()
        return web.Response(status=200)

    def _ttl_check(self, token: AclToken | None, check_id: str) -> _Check:
        check = self._checks.get(check_id)
        if check is None:
            raise HttpError(404, _unknown_check(check_id))
        if check.service_id:
            self._require(token, "service", check.service_name, "write")
        else:
            self._require(token, "node", self.node_name, "write")
        if check.kind != "ttl":
            raise HttpError(500, f'CheckID "{check_id}" does not have associated TTL')
        return check

    async def _h_check_verb(self, request: web.Request, verb: str, id: str) -> web.Response:
        token = self._token(request)
        check = self._ttl_check(token, id)
        status = {"pass": PASSING, "warn": WARNING, "fail": CRITICAL}[verb]
        self._update_status(check, status, request.query.get("note", ""))
        self._arm_ttl(check)
        return web.Response(status=200)

    async def _h_check_update(self, request: web.Request, id: str) -> web.Response:
        token = self._token(request)
        body = await self._json_body(request, godecode.CHECK_UPDATE)
        status = body.get("Status", "")
        if status not in (PASSING, WARNING, CRITICAL):
            raise HttpError(400, f"Invalid check status: '{status}'")
        check = self._ttl_check(token, id)
        self._update_status(check, status, body.get("Output", ""))
        self._arm_ttl(check)
        return web.Response(status=200)

    def _filter(self, request: web.Request) -> Callable[[Any], bool] | None:
        expression = request.query.get("filter")
        if not expression:
            return None
        try:
            return compile_filter(expression)
        except FilterError as exc:
            raise HttpError(400, f"Failed to create boolean expression evaluator: {exc}") from None

    def _agent_service_json(self, svc: _Service) -> dict[str, Any]:
        return {
            "ID": svc.id,
            "Service": svc.name,
            "Tags": list(svc.tags),
            "Meta": dict(svc.meta),
            "Port": svc.port,
            "Address": svc.address,
            "TaggedAddresses": self._tagged(svc),
            "Weights": dict(svc.weights),
            "EnableTagOverride": svc.enable_tag_override,
            "Datacenter": self.datacenter,
        }

    def _tagged(self, svc: _Service) -> dict[str, Any]:
        if not svc.address:
            return {}
        return {
            "lan_ipv4": {"Address": svc.address, "Port": svc.port},
            "wan_ipv4": {"Address": svc.address, "Port": svc.port},
        }

    def _check_json(self, check: _Check, *, synced: bool = True) -> dict[str, Any]:
        svc = self._services.get(check.service_id)
        return {
            "Node": self.node_name,
            "CheckID": check.id,
            "Name": check.name,
            "Status": check.status,
            "Notes": check.notes,
            "Output": check.synced_output if synced else check.output,
            "ServiceID": check.service_id,
            "ServiceName": check.service_name,
            "ServiceTags": list(svc.tags) if svc else [],
            "Type": check.kind if check.kind in ("ttl", "grpc", "http", "tcp") else "",
            "Interval": godecode.format_go_duration(int(check.interval * 1e9))
            if check.interval
            else "",
            "Timeout": godecode.format_go_duration(int(check.timeout * 1e9))
            if check.kind in ("grpc", "http", "tcp")
            else "",
            "ExposedPort": 0,
            "Definition": {},
            "CreateIndex": check.create_index,
            "ModifyIndex": check.modify_index,
        }

    async def _h_agent_services(self, request: web.Request) -> web.Response:
        token = self._token(request)
        predicate = self._filter(request)
        out = {}
        for svc in self._services.values():
            if not self._allowed(token, "service", svc.name, "read"):
                continue
            data = self._agent_service_json(svc)
            if predicate is None or predicate(data):
                out[svc.id] = data
        return self._json(out)

    async def _h_agent_checks(self, request: web.Request) -> web.Response:
        token = self._token(request)
        predicate = self._filter(request)
        out = {}
        for check in [self._serf, *self._checks.values()]:
            if check.service_id:
                if not self._allowed(token, "service", check.service_name, "read"):
                    continue
            elif not self._allowed(token, "node", self.node_name, "read"):
                continue
            data = self._check_json(check, synced=False)
            if predicate is None or predicate(data):
                out[check.id] = data
        return self._json(out)

    async def _h_agent_service(self, request: web.Request, id: str) -> web.Response:
        token = self._token(request)
        svc = self._services.get(id)
        if svc is None:
            raise HttpError(404, f"unknown service ID: {id}")
        self._require(token, "service", svc.name, "read")
        return self._json(self._agent_service_json(svc))

    def _aggregate(self, service_id: str) -> str:
        statuses = [
            c.status
            for c in [self._serf, *self._checks.values()]
            if c.service_id in (service_id, "")
        ]
        if CRITICAL in statuses:
            return CRITICAL
        if WARNING in statuses:
            return WARNING
        return PASSING

    async def _h_agent_health_id(self, request: web.Request, id: str) -> web.Response:
        token = self._token(request)
        svc = self._services.get(id)
        text = request.query.get("format") == "text"
        if svc is None:
            if text:
                raise HttpError(404, f"ServiceId {id} not found")
            return web.json_response({"AggregatedStatus": CRITICAL}, status=404)
        self._require(token, "service", svc.name, "read")
        status = self._aggregate(id)
        code = {PASSING: 200, WARNING: 429, CRITICAL: 503}[status]
        if text:
            return web.Response(status=code, text=status)
        checks = [
            self._check_json(c, synced=False) for c in self._checks.values() if c.service_id == id
        ]
        body = {
            "AggregatedStatus": status,
            "Service": self._agent_service_json(svc),
            "Checks": checks,
        }
        return web.json_response(body, status=code)

    def _blocking_params(self, request: web.Request) -> tuple[int, float | None]:
        index = 0
        if "index" in request.query:
            raw = request.query["index"]
            if not raw.isdigit() or int(raw) >= 2**64:
                raise HttpError(400, "Invalid index")
            index = int(raw)
        wait: float | None = None
        if "wait" in request.query:
            try:
                wait = godecode.parse_go_duration(request.query["wait"]) / 1e9
            except ValueError:
                raise HttpError(400, "Invalid wait time") from None
            if wait < 0:
                raise HttpError(400, "Invalid wait time")
        return index, wait

    async def _block(
        self, request: web.Request, index: int, wait: float | None, current: Callable[[], int]
    ) -> None:
        """Hold the request until ``current() > index`` or the wait (+ jitter) runs out."""
        if index <= 0:
            return
        limit = min(wait if wait else self.timing.default_wait, self.timing.max_wait)
        limit += random.uniform(0, limit * self.timing.jitter_fraction)
        self._long_polls[id(request)] = request
        try:
            async with asyncio.timeout(limit):
                while True:
                    event = self._changed
                    if current() > index:
                        return
                    await event.wait()
        except TimeoutError:
            return
        finally:
            self._long_polls.pop(id(request), None)

    def _check_dc(self, request: web.Request) -> None:
        dc = request.query.get("dc")
        if dc and dc != self.datacenter:
            raise HttpError(500, "No path to datacenter")

    async def _h_health_service(self, request: web.Request, name: str) -> web.StreamResponse:
        token = self._token(request)
        self._check_dc(request)
        index, wait = self._blocking_params(request)
        passing = False
        if "passing" in request.query:
            raw = request.query["passing"]
            try:
                passing = True if raw == "" else godecode.parse_bool(raw)
            except ValueError:
                raise HttpError(400, "Invalid value for ?passing") from None
        tags = request.query.getall("tag", [])
        predicate = self._filter(request)
        await self._block(request, index, wait, lambda: self._service_index(name))
        if request.transport is None or request.transport.is_closing():
            return web.Response(status=499)
        result_index = self._service_index(name)
        entries = []
        filtered_by_acl = False
        node_readable = self._allowed(token, "node", self.node_name, "read")
        for svc in sorted(self._services.values(), key=lambda s: s.id):
            if svc.name != name:
                continue
            if not self._allowed(token, "service", name, "read") or not node_readable:
                filtered_by_acl = True
                continue
            if any(t not in svc.tags for t in tags):
                continue
            checks = [self._serf, *(c for c in self._checks.values() if c.service_id == svc.id)]
            if passing and any(c.status != PASSING for c in checks):
                continue
            entry = {
                "Node": {
                    "ID": self.node_id,
                    "Node": self.node_name,
                    "Address": self.host,
                    "Datacenter": self.datacenter,
                    "TaggedAddresses": {"lan": self.host, "wan": self.host},
                    "Meta": {},
                    "CreateIndex": self._serf.create_index,
                    "ModifyIndex": self._serf.create_index,
                },
                "Service": {
                    "ID": svc.id,
                    "Service": svc.name,
                    "Tags": list(svc.tags),
                    "Address": svc.address,
                    "Meta": dict(svc.meta),
                    "Port": svc.port,
                    "TaggedAddresses": self._tagged(svc),
                    "Weights": dict(svc.weights),
                    "EnableTagOverride": svc.enable_tag_override,
                    "CreateIndex": svc.create_index,
                    "ModifyIndex": svc.modify_index,
                },
                "Checks": [self._check_json(c) for c in checks],
            }
            if predicate is None or predicate(entry):
                entries.append(entry)
        headers = {"X-Consul-Results-Filtered-By-ACLs": "true"} if filtered_by_acl else None
        return self._json(entries, index=result_index, headers=headers)

    async def _h_catalog_services(self, request: web.Request) -> web.StreamResponse:
        token = self._token(request)
        self._check_dc(request)
        index, wait = self._blocking_params(request)
        predicate = self._filter(request)
        await self._block(request, index, wait, lambda: max(1, self._services_table_index))
        out: dict[str, list[str]] = {"consul": []}
        for svc in self._services.values():
            if not self._allowed(token, "service", svc.name, "read"):
                continue
            node = {
                "ServiceName": svc.name,
                "ServiceTags": svc.tags,
                "ServiceMeta": svc.meta,
                "ServiceID": svc.id,
                "ServicePort": svc.port,
                "ServiceAddress": svc.address,
                "Node": self.node_name,
            }
            if predicate is not None and not predicate(node):
                continue
            tags = out.setdefault(svc.name, [])
            tags.extend(t for t in svc.tags if t not in tags)
        return self._json(out, index=max(1, self._services_table_index))


def _unknown_service(service_id: str) -> str:
    return (
        f'Unknown service ID "{service_id}". '
        "Ensure that the service ID is passed, not the service name."
    )


def _unknown_check(check_id: str) -> str:
    return f'Unknown check ID "{check_id}". Ensure that the check ID is passed, not the check name.'


_META_KEY = re.compile(r"^[A-Za-z0-9_-]+$")


def _validate_meta(meta: Mapping[str, str]) -> str | None:
    if len(meta) > 64:
        raise HttpError(
            400, "Invalid Service Meta: Node metadata cannot contain more than 64 key/value pairs"
        )
    for key, value in meta.items():
        if not key:
            return "Key cannot be blank"
        if len(key) > 128:
            return f"Key is too long (limit: 128 characters): {key}"
        if not _META_KEY.match(key):
            return f"Key contains invalid characters: {key}"
        if key.startswith("consul-"):
            return f"Key prefix 'consul-' is reserved for internal use: {key}"
        if len(value) > 512:
            return f"Value is too long (limit: 512 characters): {key}"
    return None
