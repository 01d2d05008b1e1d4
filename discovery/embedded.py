"""Embedded default registry: a JetStream key-value bucket on the mesh's own NATS server.

Each instance is one key ``<service>.<instance_id>`` whose JSON value is the instance, or
``<service>.<owner>.<instance_id>`` when the registry is given an ``owner`` (the name of
the process's mesh identity: the mesh's NATS lets each identity write only its own
keys, services/mesh/nats_security.py). The
bucket's ``max_age`` is the TTL: the owning process re-puts its keys every ``ttl / 3``, so a
process killed with ``kill -9`` drops out of every resolve within one TTL. The bucket is
created with ``limit_marker_ttl``, so the server writes a ``PURGE`` marker when a key
expires and watchers learn about the death without polling. An instance that stops serving
(draining) stays in the bucket with ``healthy: false`` and is hidden from resolve and watch.

A NATS outage never raises out of a watch or the heartbeat loop: they log, keep the last
known set, and pick up again when the client reconnects (watchers rebuild their view from a
fresh snapshot, heartbeats re-put every key at once).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import logging
import socket
import ssl
import urllib.parse
from collections.abc import AsyncIterator
from typing import Any, ClassVar

import nats
import nats.errors
import nats.js.errors
from nats.aio.client import Client as NatsClient
from nats.js import JetStreamContext
from nats.js.kv import KeyValue

from hivewire.services.base.backoff import Backoff
from hivewire.services.base.lifecycle import cancel_and_wait

from . import metrics
from ._base import RemoteRegistryBase
from .registry import (
    Instance,
    RegistryUnavailableError,
    is_replaced_by,
    sort_instances,
)

logger = logging.getLogger(__name__)

__all__ = ["EmbeddedRegistry"]

DEFAULT_BUCKET = "hivewire-registry"
DEFAULT_TTL = 15.0

# Errors that mean "NATS (or the bucket) is not reachable right now", as opposed to a bug.
_TRANSIENT = (
    nats.errors.Error,
    nats.js.errors.Error,
    asyncio.TimeoutError,
    ConnectionError,
    OSError,
)
# What a connection attempt fails with when nothing can answer at that address: nothing
# listens (refused), or the host or network cannot be reached.
_UNREACHABLE_ERRNOS = frozenset({errno.ECONNREFUSED, errno.EHOSTUNREACH, errno.ENETUNREACH})


class EmbeddedRegistry(RemoteRegistryBase):
    """Registry on a NATS JetStream key-value bucket.

    Args:
        nats_url: NATS server URL(s), comma separated.
        bucket: KV bucket name, shared by every process of one mesh.
        ttl: Seconds an instance stays listed after its last heartbeat (the bucket's
            ``max_age``). The first process to create the bucket fixes it; later ones adopt
            the bucket's value.
        heartbeat_interval: Seconds between heartbeats (default ``ttl / 3``).
        request_timeout: Bound of one NATS request (put, delete, snapshot).
        reconnect_wait: Seconds between NATS reconnect attempts.
        backoff_max: Cap of the retry delay after a failed watch round.
        nats_options: Extra keyword arguments for ``nats.connect`` (tls, credentials ...).
        owner: The key token naming who wrote an entry (the name of this process's mesh
            identity); None: keys without it.
        fail_fast: :meth:`start` raises :class:`RegistryUnavailableError` as soon as every
            NATS server has refused the connection or is unreachable (nothing listening),
            instead of retrying until one comes up (what a one-shot reader such as the CLI
            wants). A server that is up but slow to answer is still waited for.
    """

    backend: ClassVar[str] = "embedded"
    _heartbeat_task_name = "hivewire-registry-heartbeat"

    def __init__(
        self,
        nats_url: str,
        *,
        bucket: str = DEFAULT_BUCKET,
        ttl: float = DEFAULT_TTL,
        heartbeat_interval: float | None = None,
        request_timeout: float = 5.0,
        reconnect_wait: float = 1.0,
        backoff_max: float = 5.0,
        nats_options: dict[str, Any] | None = None,
        owner: str | None = None,
        fail_fast: bool = False,
    ) -> None:
        super().__init__()
        if ttl < 1:
            raise ValueError("ttl must be at least 1 second (the server's expiry marker floor)")
        self._servers = [s.strip() for s in nats_url.split(",") if s.strip()]
        self._bucket_name = bucket
        self._ttl = ttl
        self._heartbeat_interval = heartbeat_interval
        self._request_timeout = request_timeout
        self._reconnect_wait = reconnect_wait
        self._backoff_max = backoff_max
        self._nats_options = dict(nats_options or {})
        self._owner = owner
        self._fail_fast = fail_fast
        # While the first connection is being made: the servers' refusals in a row.
        self._refusals: _Refusals | None = None
        self._nc: NatsClient | None = None
        self._kv: KeyValue | None = None
        self._kick = asyncio.Event()
        # Live KV watchers of watch() generators; stopped on reconnect so they rebuild.
        self._watchers: set[KeyValue.KeyWatcher] = set()
        self._markers = True

    @property
    def ttl(self) -> float:
        """The TTL in force (the bucket's, once started)."""
        return self._ttl

    @property
    def heartbeat_interval(self) -> float:
        """Seconds between two heartbeats of every registered instance."""
        return self._heartbeat_interval or self._ttl / 3

    # -- lifecycle -----------------------------------------------------------------------

    async def _connect(self) -> None:
        """Connect to NATS, create or bind the bucket.

        Raises:
            RegistryUnavailableError: NATS could not be reached (with ``fail_fast``: at
                once when every server refused the connection or is unreachable).
        """
        refusals = _Refusals(len(self._servers)) if self._fail_fast else None
        self._refusals = refusals
        connecting = asyncio.ensure_future(
            nats.connect(
                servers=self._servers,
                name="hivewire-registry",
                allow_reconnect=True,
                max_reconnect_attempts=-1,
                reconnect_time_wait=self._reconnect_wait,
                connect_timeout=max(1, int(self._request_timeout)),
                disconnected_cb=self._on_disconnected,
                reconnected_cb=self._on_reconnected,
                error_cb=self._on_error,
                **self._nats_options,
            )
        )
        try:
            if refusals is not None:
                # nats-py retries a refused server forever (max_reconnect_attempts=-1, the
                # reconnects this registry lives on): stop it once all have refused.
                everyone_refused = asyncio.ensure_future(refusals.all_refused.wait())
                try:
                    await asyncio.wait(
                        [connecting, everyone_refused], return_when=asyncio.FIRST_COMPLETED
                    )
                finally:
                    await cancel_and_wait([everyone_refused])
                if not connecting.done():
                    await cancel_and_wait([connecting])
                    raise RegistryUnavailableError(refusals.describe(self._servers))
            self._nc = await connecting
        except (*_TRANSIENT, nats.errors.NoServersError) as exc:
            raise RegistryUnavailableError(
                f"cannot reach NATS at {_shown(self._servers)}: {exc}"
            ) from exc
        finally:
            self._refusals = None
            if not connecting.done():  # cancelled from outside (a caller's timeout)
                await cancel_and_wait([connecting])
        try:
            await self._ensure_bucket()
        except _TRANSIENT as exc:
            await self._nc.close()
            raise RegistryUnavailableError(
                f"cannot open KV bucket {self._bucket_name}: {exc}"
            ) from exc

    def _log_started(self) -> None:
        logger.info(
            "registry: embedded on NATS bucket %s (ttl %.1fs, heartbeat every %.1fs)",
            self._bucket_name,
            self._ttl,
            self.heartbeat_interval,
        )

    async def _forget(self, instance: Instance) -> None:
        await self._delete_key(instance)

    async def _disconnect(self) -> None:
        await self._stop_watchers()
        if self._nc is not None and not self._nc.is_closed:
            try:
                await asyncio.wait_for(self._nc.drain(), self._request_timeout)
            except _TRANSIENT as exc:
                logger.debug("registry: NATS drain failed (%s); closing", exc)
                await self._nc.close()

    async def _ensure_bucket(self) -> KeyValue:
        assert self._nc is not None
        js = self._nc.jetstream(timeout=self._request_timeout)
        try:
            # Join the bucket when it exists: that needs only read permissions, so a
            # reader (a client resolving coordinators) never tries to create it.
            kv = await self._join(js)
        except nats.js.errors.BucketNotFoundError:
            kv = await self._create(js)
        self._kv = kv
        return kv

    async def _create(self, js: JetStreamContext) -> KeyValue:
        try:
            return await js.create_key_value(
                bucket=self._bucket_name,
                history=1,
                ttl=self._ttl,
                limit_marker_ttl=self._ttl,
                description="hivewire registry: <service>[.<owner>].<instance_id> -> instance",
            )
        except nats.js.errors.KeyValueLimitMarkerTTLNotSupportedError:
            logger.warning(
                "registry: NATS server predates expiry markers (2.11): watchers will not see "
                "killed instances leave until they rebuild"
            )
            self._markers = False
            return await js.create_key_value(bucket=self._bucket_name, history=1, ttl=self._ttl)
        except nats.js.errors.BadRequestError:
            # Created meanwhile by another process with another configuration (another
            # TTL): join it as it is, the first creator wins.
            return await self._join(js)

    async def _join(self, js: JetStreamContext) -> KeyValue:
        """Bind to the existing bucket and take its TTL.

        Raises:
            nats.js.errors.BucketNotFoundError: There is none yet.
        """
        kv = await js.key_value(self._bucket_name)
        status = await kv.status()
        if status.ttl and status.ttl != self._ttl:
            logger.warning(
                "registry: bucket %s already exists with ttl %.1fs; using it instead of %.1fs",
                self._bucket_name,
                status.ttl,
                self._ttl,
            )
            self._ttl = status.ttl
        return kv

    # -- NATS callbacks ------------------------------------------------------------------

    async def _on_disconnected(self) -> None:
        if not self._closed:
            logger.warning("registry: disconnected from NATS; keeping last known instances")

    async def _on_reconnected(self) -> None:
        logger.info("registry: reconnected to NATS; re-announcing instances and rebuilding watches")
        self._kick.set()
        await self._stop_watchers()

    async def _on_error(self, exc: Exception) -> None:
        if self._refusals is not None:
            self._refusals.saw(exc)
        logger.debug("registry: NATS client error: %s", exc)

    async def _stop_watchers(self) -> None:
        for watcher in list(self._watchers):
            # stop() unsubscribes and wakes the reader with the stop sentinel.
            with contextlib.suppress(*_TRANSIENT):
                await _stop(watcher)

    # -- registration --------------------------------------------------------------------

    def _key(self, instance: Instance) -> str:
        if self._owner:
            return f"{instance.service}.{self._owner}.{instance.instance_id}"
        return f"{instance.service}.{instance.instance_id}"

    async def register(self, instance: Instance) -> None:
        """Register an instance; a restarted one replaces its own stale entry.

        A NATS outage does not raise: the heartbeat loop puts the key once NATS is back.
        """
        self._require_started()
        previous = self._instances.get(instance.instance_id)
        self._instances[instance.instance_id] = instance
        if previous is not None and previous.service != instance.service:
            await self._delete_key(previous)
        try:
            current = await self._snapshot(instance.service)
            for old in current.values():
                if is_replaced_by(old, instance):
                    logger.info(
                        "registry: %s replaces stale %s of %s",
                        instance.instance_id,
                        old.instance_id,
                        old.service,
                    )
                    await self._delete_key(old)
            await self._put(instance)
        except RegistryUnavailableError as exc:
            logger.warning(
                "registry: cannot register %s now (%s); retrying in the background",
                instance.instance_id,
                exc,
            )
            return
        self._log_registered(instance)

    async def deregister(self, instance_id: str) -> None:
        """Stop the heartbeat and delete the key (idempotent)."""
        self._require_started()
        instance = self._instances.pop(instance_id, None)
        if instance is None:
            return
        await self._delete_key(instance)
        logger.info("registry: deregistered %s %s", instance.service, instance_id)

    async def _publish_health(self, instance: Instance) -> None:
        try:
            await self._put(instance)
        except RegistryUnavailableError as exc:
            logger.warning(
                "registry: health of %s not published yet: %s", instance.instance_id, exc
            )

    async def _put(self, instance: Instance) -> None:
        kv = self._kv
        if kv is None:
            raise RegistryUnavailableError("bucket not open")
        payload = json.dumps(instance.to_json(), separators=(",", ":")).encode()
        try:
            async with asyncio.timeout(self._request_timeout):
                await kv.put(self._key(instance), payload)
        except _TRANSIENT as exc:
            raise RegistryUnavailableError(f"put {self._key(instance)}: {exc!r}") from exc

    async def _delete_key(self, instance: Instance) -> None:
        if self._kv is None:
            return
        try:
            async with asyncio.timeout(self._request_timeout):
                await self._kv.delete(self._key(instance))
        except _TRANSIENT as exc:
            # It expires within one TTL anyway.
            logger.warning("registry: delete of %s failed: %r", self._key(instance), exc)

    async def _heartbeat_loop(self) -> None:
        failing = False
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.heartbeat_interval):
                    await self._kick.wait()
            self._kick.clear()
            for instance in list(self._instances.values()):
                if self._instances.get(instance.instance_id) is not instance:
                    continue  # deregistered or changed meanwhile
                try:
                    await self._put(instance)
                except RegistryUnavailableError as exc:
                    metrics.HEARTBEATS_FAILED.labels(self.backend).inc()
                    if not failing:
                        logger.warning("registry: heartbeat failed: %s", exc)
                    failing = True
                    await self._recover_bucket()
                    break
                else:
                    metrics.HEARTBEATS.labels(self.backend).inc()
                    if failing:
                        logger.info("registry: heartbeats succeed again")
                        failing = False

    async def _recover_bucket(self) -> None:
        """Re-create the bucket if the server lost it (a NATS restart without its store)."""
        if self._nc is None or not self._nc.is_connected:
            return
        with contextlib.suppress(*_TRANSIENT):
            await self._ensure_bucket()

    # -- reads ---------------------------------------------------------------------------

    async def _snapshot(self, service: str) -> dict[str, Instance]:
        """All live (not expired, not deleted) instances of a service, healthy or not."""
        kv = self._kv
        if kv is None:
            raise RegistryUnavailableError("bucket not open")
        found: dict[str, Instance] = {}
        watcher: KeyValue.KeyWatcher | None = None
        try:
            async with asyncio.timeout(self._request_timeout):
                watcher = await kv.watch(f"{service}.>")
                while (entry := await _next(watcher)) is not None:
                    _apply(found, entry)
        except _WatcherStoppedError as exc:
            raise RegistryUnavailableError(f"snapshot of {service} interrupted") from exc
        except _TRANSIENT as exc:
            raise RegistryUnavailableError(f"snapshot of {service}: {exc!r}") from exc
        finally:
            if watcher is not None:
                with contextlib.suppress(*_TRANSIENT):
                    await _stop(watcher)
        return found

    async def resolve(self, service: str, *, tag: str | None = None) -> list[Instance]:
        """Return the healthy live instances of ``service`` (carrying ``tag`` when given).

        Raises:
            RegistryUnavailableError: NATS could not be reached.
        """
        self._require_started()
        found = await self._snapshot(service)
        return sort_instances(
            i for i in found.values() if i.healthy and (tag is None or tag in i.tags)
        )

    async def watch(self, service: str) -> AsyncIterator[list[Instance]]:
        """Yield the healthy set of ``service`` now and after every change.

        Heartbeats re-put keys without changing them: only real changes are yielded. Ends
        when the registry is closed.
        """
        self._require_started()
        last: list[Instance] | None = None
        backoff = Backoff(initial=0.1, maximum=self._backoff_max)
        while not self._closed:
            kv = self._kv
            try:
                if kv is None:
                    raise RegistryUnavailableError("bucket not open")
                async with asyncio.timeout(self._request_timeout):
                    watcher = await kv.watch(f"{service}.>")
            except (*_TRANSIENT, RegistryUnavailableError) as exc:
                metrics.WATCH_ERRORS.labels(self.backend).inc()
                logger.warning("registry: watch of %s failed (%r); retrying", service, exc)
                await backoff.wait()
                continue
            self._watchers.add(watcher)
            state: dict[str, Instance] = {}
            synced = False
            try:
                while True:
                    try:
                        entry = await _next(watcher)
                    except _WatcherStoppedError:
                        break  # reconnect or close: rebuild from a fresh snapshot
                    if entry is None:
                        synced = True
                    else:
                        _apply(state, entry)
                    if not synced:
                        continue
                    backoff.reset()
                    current = sort_instances(i for i in state.values() if i.healthy)
                    if current != last:
                        last = current
                        yield current
            finally:
                self._watchers.discard(watcher)
                with contextlib.suppress(*_TRANSIENT):
                    await _stop(watcher)


class _WatcherStoppedError(Exception):
    """The KV watcher was stopped (reconnect or close)."""


async def _next(watcher: KeyValue.KeyWatcher) -> KeyValue.Entry | None:
    """Next watch item: an entry, or ``None`` once the initial values are delivered.

    Raises:
        _WatcherStoppedError: The watcher was stopped.
    """
    item: object = await watcher.updates(timeout=None)  # type: ignore[no-untyped-call]
    if item is None or isinstance(item, KeyValue.Entry):
        return item
    raise _WatcherStoppedError


async def _stop(watcher: KeyValue.KeyWatcher) -> None:
    await watcher.stop()  # type: ignore[no-untyped-call]


def _apply(state: dict[str, Instance], entry: KeyValue.Entry) -> None:
    """Fold one KV watch entry into ``state`` (keyed by instance id)."""
    instance_id = entry.key.rsplit(".", 1)[-1]
    if entry.operation in ("DEL", "PURGE") or not entry.value:
        state.pop(instance_id, None)
        return
    try:
        raw: object = json.loads(entry.value)
        if not isinstance(raw, dict):
            raise ValueError("not an object")
        instance = Instance.from_json(raw)
    except ValueError as exc:
        logger.warning("registry: ignoring malformed entry %s: %s", entry.key, exc)
        return
    state[instance.instance_id] = instance


class _Refusals:
    """Connection attempts that found nobody to answer, in a row, while first connecting.

    nats-py tries the servers of its pool in turn; once as many attempts in a row as there
    are servers failed that way, every server refused or is unreachable. Any other failure
    (a timeout: a server that is up but slow) starts the count again.
    """

    def __init__(self, servers: int) -> None:
        self._servers = servers
        self._in_a_row: list[OSError] = []
        self.all_refused = asyncio.Event()

    def saw(self, exc: BaseException) -> None:
        """Count one failed attempt (an error nats-py reported)."""
        if _is_unreachable(exc):
            assert isinstance(exc, OSError)
            self._in_a_row.append(exc)
        else:
            self._in_a_row.clear()
        if len(self._in_a_row) >= self._servers:
            self.all_refused.set()

    def describe(self, servers: list[str]) -> str:
        """``connection refused to <urls>``, or what else made them unreachable."""
        last = self._in_a_row[-1]
        if all(exc.errno == errno.ECONNREFUSED for exc in self._in_a_row):
            return f"connection refused to {_shown(servers)} (is NATS running there?)"
        return f"cannot reach NATS at {_shown(servers)}: {last}"


def _is_unreachable(exc: BaseException) -> bool:
    """Whether a connection attempt failed because nothing can answer at that address."""
    if isinstance(exc, socket.gaierror):
        return exc.errno != socket.EAI_AGAIN  # the name does not resolve (not: DNS is slow)
    if not isinstance(exc, OSError) or isinstance(exc, TimeoutError | ssl.SSLError):
        return False
    if exc.errno is not None:
        return exc.errno in _UNREACHABLE_ERRNOS
    # asyncio's "Multiple exceptions: ..." when each address of a name failed differently
    # (``localhost``: refused on ::1 and on 127.0.0.1).
    return str(exc).startswith("Multiple exceptions")


def _shown(servers: list[str]) -> str:
    """The server URLs for a message, without any user or password in them."""
    shown = []
    for url in servers:
        parts = urllib.parse.urlsplit(url)
        if parts.username is not None or parts.password is not None:
            netloc = parts.hostname or ""
            if parts.port is not None:
                netloc += f":{parts.port}"
            url = urllib.parse.urlunsplit(parts._replace(netloc=netloc))
        shown.append(url)
    return ", ".join(shown)
