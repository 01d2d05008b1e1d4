"""NATS connections and the JetStream stream setup shared by publisher, subscriber and CLI."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import replace
from typing import Any, TypedDict, Unpack

import nats
import nats.errors
import nats.js.errors
from nats.aio.client import Client as NatsClient
from nats.js.api import DiscardPolicy, RetentionPolicy, StorageType, StreamConfig
from nats.js.client import JetStreamContext

from hivewire.services.runtime.errors import NotFound, Unavailable

from .settings import DLQ_SUBJECT_PREFIX, EVENTS_SUBJECT_PREFIX, StreamSettings

logger = logging.getLogger(__name__)

TRANSIENT_ERRORS: tuple[type[BaseException], ...] = (
    nats.errors.Error,
    nats.js.errors.Error,
    asyncio.TimeoutError,
    ConnectionError,
    OSError,
)
"""Errors that mean "NATS is not reachable right now", as opposed to a bug."""

Callback = Callable[[], Awaitable[None]]


class ConnectionCallbacks(TypedDict, total=False):
    """What :func:`connect` calls as the connection changes (``nats.connect``'s names).

    Attributes:
        disconnected_cb: Called when the connection drops.
        reconnected_cb: Called when it is back.
        closed_cb: Called when the client is closed for good.
    """

    disconnected_cb: Callback | None
    reconnected_cb: Callback | None
    closed_cb: Callback | None


async def stop_tasks(tasks: Iterable[asyncio.Task[Any]]) -> None:
    """Cancel background tasks and wait until every one has ended.

    nats-py turns a cancellation that lands inside some of its calls into its own
    errors (``publish_async`` reports one during its stall wait as
    ``TooManyStalledMsgsError``), so a loop may outlive one cancel: keep cancelling.
    The loops also check their owner's closed flag, so this ends quickly.
    """
    pending = {task for task in tasks if not task.done()}
    while pending:
        for task in pending:
            task.cancel()
        _, pending = await asyncio.wait(pending, timeout=1.0)


def honour_cancellation() -> None:
    """Raise ``CancelledError`` if the running task was cancelled and the cancel got lost.

    A cancellation that lands in nats-py while a message is arriving can vanish: on
    Python 3.11 ``asyncio.wait_for`` (inside ``next_msg``, so inside every ``fetch``)
    returns the result when its inner future finished at the moment it was cancelled,
    and the task carries on with ``cancelling()`` still set. A loop around nats-py calls
    checks here so that one ``cancel()`` (Ctrl-C under ``asyncio.run``, a closed HTTP
    stream) always ends it.
    """
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


def split_servers(nats_url: str) -> list[str]:
    """``"nats://a:4222,nats://b:4222"`` -> the list of server URLs."""
    servers = [part.strip() for part in nats_url.split(",") if part.strip()]
    if not servers:
        raise ValueError("empty NATS URL")
    return servers


async def connect(
    nats_url: str,
    *,
    name: str,
    fail_fast: bool,
    reconnect: bool = True,
    reconnect_wait: float = 0.5,
    connect_timeout: float = 2.0,
    options: Mapping[str, Any] | None = None,
    **callbacks: Unpack[ConnectionCallbacks],
) -> NatsClient:
    """Connect to NATS; afterwards the client reconnects forever (unless ``reconnect``).

    Args:
        nats_url: Server URL(s), comma separated.
        name: Connection name shown by the server's monitoring.
        fail_fast: Raise :class:`Unavailable` after two failed attempts instead of
            retrying until the server appears.
        reconnect: False: a dropped connection is closed instead of re-established.
        reconnect_wait: Seconds between attempts.
        connect_timeout: Seconds one attempt may take.
        options: More ``nats.connect`` keyword arguments (tls, credentials...).
        **callbacks: :class:`ConnectionCallbacks` (None: not wanted).

    Raises:
        Unavailable: ``fail_fast`` and no server answered.
    """
    servers = split_servers(nats_url)

    async def on_error(exc: Exception) -> None:
        # nats-py reports every failed (re)connect attempt here; the callers log the
        # outage once through disconnected_cb instead of a traceback per attempt.
        logger.debug("events: NATS client error: %s", exc)

    kwargs: dict[str, Any] = {
        "servers": servers,
        "name": name,
        "allow_reconnect": reconnect,
        "max_reconnect_attempts": 1 if fail_fast else -1,
        "reconnect_time_wait": reconnect_wait,
        "connect_timeout": max(1, round(connect_timeout)),
        "error_cb": on_error,
    }
    kwargs.update({key: cb for key, cb in callbacks.items() if cb is not None})
    kwargs.update(options or {})
    try:
        client = await nats.connect(**kwargs)
    except TRANSIENT_ERRORS as exc:  # NoServersError included
        raise Unavailable(
            f"cannot reach NATS at {nats_url}: {exc or type(exc).__name__}",
            retry_after=reconnect_wait,
            reason="EVENTS_UNAVAILABLE",
        ) from exc
    if reconnect:
        # nats-py applies one attempt limit to the first connect and to later
        # reconnects: a client that connected must keep trying through any outage.
        client.options["max_reconnect_attempts"] = -1
    return client


def _stream_config(
    settings: StreamSettings,
    name: str,
    description: str,
    prefix: str,
    limits: tuple[float, int, int],
) -> StreamConfig:
    """A file-backed stream of ``<prefix>.>`` dropping its oldest messages at its limits.

    ``limits`` is ``(max_age, max_bytes, max_msgs)``.
    """
    max_age, max_bytes, max_msgs = limits
    return StreamConfig(
        name=name,
        description=description,
        subjects=[f"{prefix}.>"],
        retention=RetentionPolicy.LIMITS,
        storage=StorageType.FILE,
        discard=DiscardPolicy.OLD,
        max_age=max_age,
        max_bytes=max_bytes,
        max_msgs=max_msgs,
        duplicate_window=settings.duplicate_window,
        num_replicas=settings.replicas,
    )


def events_stream_config(settings: StreamSettings) -> StreamConfig:
    """The configuration of the event stream (``hivewire.events.>``).

    It allows atomic batches (``allow_atomic``, nats-server 2.12+): a publisher's full
    window goes in as one batch with one ack (see batch.py).
    """
    description = "hivewire events (events.v1.Event protobufs), the mesh's event store"
    limits = (settings.max_age, settings.max_bytes, settings.max_msgs)
    config = _stream_config(settings, settings.name, description, EVENTS_SUBJECT_PREFIX, limits)
    config.allow_atomic = True
    return config


def dlq_stream_config(settings: StreamSettings) -> StreamConfig:
    """The configuration of the dead-letter stream (``hivewire.dlq.>``)."""
    description = "hivewire dead letters: events whose subscriber exhausted its deliveries"
    limits = (settings.dlq_max_age, settings.dlq_max_bytes, -1)
    return _stream_config(settings, settings.dlq_name, description, DLQ_SUBJECT_PREFIX, limits)


_MANAGED = (
    "subjects",
    "max_age",
    "max_bytes",
    "max_msgs",
    "duplicate_window",
    "num_replicas",
    "allow_atomic",
)


async def _ensure_one(js: JetStreamContext, config: StreamConfig) -> StreamConfig:
    """Create the stream or update what differs; returns the configuration in effect."""
    assert config.name is not None
    try:
        info = await js.stream_info(config.name)
    except nats.js.errors.NotFoundError:
        try:
            created = await js.add_stream(config)
            logger.info("events: created stream %s on %s", config.name, config.subjects)
            return created.config
        except nats.js.errors.BadRequestError:
            # Another service created it between our lookup and our create.
            info = await js.stream_info(config.name)
    current = info.config
    changed = [
        key
        for key in _MANAGED
        if key != "num_replicas" and getattr(current, key) != getattr(config, key)
    ]
    if not changed:
        return current
    # Limits come from the shared settings: the last service started with new values
    # applies them (JetStream updates limits in place, keeping stored events). Only
    # what differs is changed: what an operator set beyond it (persist_mode...) stays.
    logger.info("events: updating stream %s (%s)", config.name, ", ".join(changed))
    update = replace(current, **{key: getattr(config, key) for key in changed})
    try:
        return (await js.update_stream(update)).config
    except nats.js.errors.APIError as exc:
        if isinstance(exc, nats.js.errors.ServiceUnavailableError) or "allow_atomic" not in changed:
            raise
        # A stream that cannot allow atomic batches (an operator's stream with
        # persist_mode async, a mirror): the limits still apply, batches stay off.
        logger.info(
            "events: stream %s does not take allow_atomic (%s); publishing event by event",
            config.name,
            exc.description or exc,
        )
        changed.remove("allow_atomic")
        if not changed:
            return current
        update = replace(current, **{key: getattr(config, key) for key in changed})
        return (await js.update_stream(update)).config


async def ensure_streams(js: JetStreamContext, settings: StreamSettings) -> StreamConfig:
    """Create the event and dead-letter streams, or bring their limits up to date.

    Returns:
        The event stream's configuration in effect (``allow_atomic`` stays unset on a
        server older than 2.12, which does not know it).
    """
    events = await _ensure_one(js, events_stream_config(settings))
    await _ensure_one(js, dlq_stream_config(settings))
    return events


async def ensure_stream(
    nats_url: str,
    stream: StreamSettings | None = None,
    *,
    request_timeout: float = 5.0,
    nats_options: Mapping[str, Any] | None = None,
) -> None:
    """Create (or update) the ``HIVEWIRE_EVENTS`` and ``HIVEWIRE_DLQ`` streams.

    Publishers and subscribers do this themselves when they connect; call it to
    prepare a NATS server up front (for example before starting the mesh).

    Args:
        nats_url: NATS server URL(s), comma separated.
        stream: Stream names and limits; defaults to :class:`StreamSettings` defaults.
        request_timeout: Seconds for each JetStream API request.
        nats_options: More ``nats.connect`` keyword arguments.

    Raises:
        Unavailable: NATS cannot be reached, or JetStream is not enabled on it.
    """
    client = await connect(
        nats_url, name="hivewire-events-setup", fail_fast=True, options=nats_options
    )
    try:
        await ensure_streams(client.jetstream(timeout=request_timeout), stream or StreamSettings())
    except TRANSIENT_ERRORS as exc:
        raise Unavailable(
            f"cannot set up the event streams on {nats_url}: {exc or type(exc).__name__}",
            reason="EVENTS_UNAVAILABLE",
        ) from exc
    finally:
        await close_quietly(client)


async def stream_exists(js: JetStreamContext, name: str) -> None:
    """Raise :class:`NotFound` unless the stream exists."""
    try:
        await js.stream_info(name)
    except nats.js.errors.NotFoundError as exc:
        raise NotFound(
            "stream",
            name,
            f"event stream {name} does not exist yet (no service has published an event)",
            reason="EVENT_STREAM_NOT_FOUND",
        ) from exc


async def close_quietly(client: NatsClient | None, *, flush_timeout: float = 2.0) -> None:
    """Flush what is still queued (acks, naks) and close a client, never raising.

    Not ``drain()``: every caller has already stopped consuming, and draining a pull
    subscription with fetched-but-unacked messages waits for its whole drain timeout.
    """
    if client is None or client.is_closed:
        return
    if client.is_connected:
        try:
            await client.flush(timeout=max(1, round(flush_timeout)))
        except TRANSIENT_ERRORS:
            pass
    try:
        await client.close()
    except TRANSIENT_ERRORS:
        pass
