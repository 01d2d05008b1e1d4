"""Asynchronous, outage-proof event publishing: :class:`EventPublisher`.

``publish()`` never blocks and never raises for NATS trouble: it builds the envelope and
appends it to a bounded in-memory buffer. A background task sends the buffer to
JetStream in order, a window of messages at a time (a window of ``batch_min`` or more
as one atomic batch with one ack, see batch.py), and removes an event only once
JetStream acknowledged it. Without an ack (NATS down, a timeout, the stream missing) the
same bytes are sent again with the same ``Nats-Msg-Id``, so JetStream stores each event
once even when an ack was lost. While NATS is unreachable the buffer grows up to
``max_buffer`` events; past it the *oldest* events are dropped (counted in
``hivewire_events_dropped_total{reason="buffer_full"}`` and logged), because the newest
state of the mesh is worth more than its oldest history.

``task.progress`` events are coalesced per task (see :class:`ProgressCoalescer`).

:meth:`EventPublisher.send` is the other way in, for events that are already durable
elsewhere (the coordinator's outbox): ready envelopes, never coalesced, never dropped
when the buffer is full, and a future that resolves once JetStream stored them.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import json
import logging
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from functools import partial
from typing import TYPE_CHECKING, Any, Generic, Protocol, TypeVar

import nats.errors
import nats.js.errors
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.js.api import Header
from nats.js.client import JetStreamContext

from hivewire.services.base.backoff import Backoff
from hivewire.services.base.lifecycle import StartClose
from hivewire.services.runtime.errors import Unavailable
from hivewire.services.runtime.tls import TlsFiles, nats_tls_options

from . import metrics
from ._nats import TRANSIENT_ERRORS, close_quietly, connect, ensure_streams, stop_tasks
from .batch import (
    ERR_BATCH_DISABLED,
    ERR_BATCH_UNSUPPORTED_HEADER,
    MAX_ATOMIC_BATCH,
    BatchMessage,
    BatchRejectedError,
    publish_atomic,
)
from .envelope import EventData, build_event, build_traced_event, event_headers, event_subject
from .settings import EventsSettings, StreamSettings

if TYPE_CHECKING:
    from hivewire.events.v1 import events_pb2

logger = logging.getLogger(__name__)


class PublisherSettings(Protocol):
    """What :meth:`EventPublisher.from_settings` reads of a process's settings.

    ``runtime.config.Settings`` is one; a Protocol, because config imports this
    package's settings and this package must not import config back.
    """

    @property
    def nats_url(self) -> str:
        """The NATS server URL(s)."""

    @property
    def events(self) -> EventsSettings:
        """The ``events`` section."""

    def tls_files(self) -> TlsFiles:
        """This process's certificate files."""


__all__ = ["EventPublisher", "ProgressCoalescer"]

T = TypeVar("T")

PROGRESS_EVENT = "task.progress"
_DROP_LOG_INTERVAL = 10.0
MAX_BATCH_BYTES = 1024 * 1024
"""Payload bytes of one atomic batch at most (NATS's default ``max_payload``)."""


@dataclass(slots=True)
class _KeyState(Generic[T]):
    timer: asyncio.TimerHandle | None
    held: T | None = None


class ProgressCoalescer(Generic[T]):
    """Rate-limit a stream of updates per key, always keeping the latest.

    The rule, per key (a task id for ``task.progress``):

    * the first update is emitted at once;
    * updates arriving within ``interval`` seconds of the last emitted one are held,
      each replacing the one held before (only the latest survives);
    * when ``interval`` has passed, the held update (if any) is emitted;
    * :meth:`flush` emits the held update at once. The publisher calls it before any
      other event about the same subject, so a task's last progress always precedes
      its ``task.completed`` and sequence numbers stay increasing on the stream.

    So a key gets at most one update per ``interval`` and the final state is never lost.
    An ``interval`` of 0 turns coalescing off.

    Args:
        interval: Minimum seconds between two emitted updates of one key.
        emit: Called with each update that goes out.
        on_coalesced: Called once for every update that was replaced before going out.
    """

    def __init__(
        self,
        interval: float,
        emit: Callable[[T], None],
        *,
        on_coalesced: Callable[[], None] | None = None,
    ) -> None:
        if interval < 0:
            raise ValueError("interval must be >= 0")
        self._interval = interval
        self._emit = emit
        self._on_coalesced = on_coalesced
        self._keys: dict[str, _KeyState[T]] = {}

    @property
    def pending(self) -> int:
        """How many keys hold an update that has not gone out yet."""
        return sum(1 for state in self._keys.values() if state.held is not None)

    def offer(self, key: str, item: T) -> None:
        """Emit ``item`` now, or hold it until the key's interval has passed."""
        if self._interval == 0:
            self._emit(item)
            return
        state = self._keys.get(key)
        if state is None:
            self._emit(item)
            timer = asyncio.get_running_loop().call_later(self._interval, self._tick, key)
            self._keys[key] = _KeyState(timer=timer)
            return
        if state.held is not None and self._on_coalesced is not None:
            self._on_coalesced()
        state.held = item

    def flush(self, key: str) -> None:
        """Emit the update held for ``key`` (if any) now and forget the key."""
        state = self._keys.pop(key, None)
        if state is None:
            return
        if state.timer is not None:
            state.timer.cancel()
        if state.held is not None:
            self._emit(state.held)

    def flush_all(self) -> None:
        """Emit every held update now (shutdown, flush)."""
        for key in list(self._keys):
            self.flush(key)

    def _tick(self, key: str) -> None:
        state = self._keys.get(key)
        if state is None:
            return
        if state.held is None:
            # A quiet interval: the next update of this key goes out at once.
            del self._keys[key]
            return
        item, state.held = state.held, None
        self._emit(item)
        state.timer = asyncio.get_running_loop().call_later(self._interval, self._tick, key)


@dataclass(slots=True)
class _Outgoing:
    """One encoded event waiting for its JetStream ack (``seq``: set when buffered)."""

    seq: int
    event_id: str
    event_type: str
    subject: str
    category: str
    payload: bytes
    headers: Mapping[str, str]
    queued_at: float = 0.0  # time.monotonic() of publish(), for the publish lag
    durable: bool = False  # from send(): kept elsewhere, never dropped here
    done: asyncio.Future[None] | None = None  # resolved once this one (and all before) is acked


class EventPublisher(StartClose):
    """Publish ``events.v1.Event`` envelopes to JetStream without ever blocking the caller.

    Use it as an async context manager (or call :meth:`start` / :meth:`close`)::

        async with EventPublisher(settings.nats_url, source="coordinator/c-1") as events:
            events.publish("task.created", subject=task_id, data=TaskEventData(...),
                           task_sequence=1)

    Events go to ``hivewire.events.<category>.<event>`` with headers ``Nats-Msg-Id``
    (the event id), ``X-Correlation-Id`` and ``traceparent`` / ``tracestate``.

    Args:
        nats_url: NATS server URL(s), comma separated; ``None`` turns events off
            (``publish`` is then a no-op).
        source: The publishing service instance, e.g. ``"coordinator/coordinator-1a2b"``.
        stream: Names and limits of the event streams, created or updated on connect.
        max_buffer: Events held while NATS is unreachable; the oldest are dropped beyond.
        progress_interval: Coalescing interval of ``task.progress`` per task (0: off).
        publish_timeout: Seconds to wait for an ack before sending the event again.
        close_timeout: Seconds :meth:`close` waits for buffered events to go out.
        window: Events sent before waiting for their acks (pipelining).
        batch_min: A window of at least this many events goes as one atomic batch
            (one ack) when the stream allows it; 0 never batches.
        nats_options: More ``nats.connect`` keyword arguments (tls, credentials...).
    """

    def __init__(
        self,
        nats_url: str | None,
        *,
        source: str,
        stream: StreamSettings | None = None,
        max_buffer: int = 10_000,
        progress_interval: float = 0.25,
        publish_timeout: float = 2.0,
        close_timeout: float = 5.0,
        window: int = 128,
        batch_min: int = 32,
        nats_options: Mapping[str, Any] | None = None,
    ) -> None:
        if max_buffer < 1:
            raise ValueError("max_buffer must be >= 1")
        if window < 1:
            raise ValueError("window must be >= 1")
        if batch_min < 0:
            raise ValueError("batch_min must be >= 0")
        if not source:
            raise ValueError("source must name the publishing service instance")
        self._url = nats_url
        self._source = source
        self._stream = stream or StreamSettings()
        self._max_buffer = max_buffer
        self._timeout = publish_timeout
        self._close_timeout = close_timeout
        self._window = window
        self._batch_min = batch_min
        self._nats_options = dict(nats_options or {})
        self._coalescer: ProgressCoalescer[_Outgoing] = ProgressCoalescer(
            progress_interval, self._enqueue, on_coalesced=metrics.COALESCED.inc
        )
        self._buffer: deque[_Outgoing] = deque()
        self._seq = itertools.count(1)
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._kick = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._nc: NatsClient | None = None
        self._js: JetStreamContext | None = None
        self._acks = _AckInbox()
        self._streams_ready = False
        self._look_for_stream = False  # after a failure that may mean the stream is gone
        self._atomic = False  # the event stream takes atomic batches (checked on connect)
        self._closed = False
        self._published = 0
        self._dropped_since_log = 0
        self._last_drop_log = float("-inf")
        self._outage_logged = False

    @classmethod
    def from_settings(
        cls, settings: PublisherSettings, *, source: str, **kwargs: Any
    ) -> EventPublisher:
        """Build a publisher from the shared settings (``nats_url`` + the ``events`` section).

        Args:
            settings: The process's settings.
            source: The publishing service instance.
            **kwargs: Overrides of the other constructor arguments.
        """
        section = settings.events
        options: dict[str, Any] = {
            "stream": section.stream,
            "max_buffer": section.max_buffer,
            "progress_interval": section.progress_interval,
            "publish_timeout": section.publish_timeout,
            "close_timeout": section.close_timeout,
            "batch_min": section.batch_min,
            # A tls:// URL: the mesh's NATS, which wants this process's certificate.
            "nats_options": nats_tls_options(settings.nats_url, settings.tls_files()),
        }
        options.update(kwargs)
        return cls(settings.nats_url if section.enabled else None, source=source, **options)

    # -- state ---------------------------------------------------------------------------

    @property
    def enabled(self) -> bool:
        """False when constructed without a NATS URL (events off)."""
        return self._url is not None

    @property
    def source(self) -> str:
        """The ``source`` stamped on every event."""
        return self._source

    @property
    def buffered(self) -> int:
        """Events waiting for their JetStream ack (held progress updates excluded)."""
        return len(self._buffer)

    @property
    def published(self) -> int:
        """Events acknowledged by JetStream since start."""
        return self._published

    @property
    def connected(self) -> bool:
        """Whether the NATS connection is up right now."""
        return self._nc is not None and self._nc.is_connected

    # -- lifecycle -----------------------------------------------------------------------

    async def start(self) -> None:
        """Start the background sender. Returns at once, even when NATS is down."""
        if self._closed:
            raise RuntimeError("EventPublisher is closed")
        if self._url is None or self._task is not None:
            return
        self._task = asyncio.create_task(self._run(), name=f"hivewire-events:{self._source}")

    async def close(self) -> None:
        """Send what is buffered (up to ``close_timeout``), then stop and disconnect.

        Events still unsent when the time is up are dropped with a warning and counted
        in ``hivewire_events_dropped_total{reason="shutdown"}`` (those given to
        :meth:`send` are not: their futures are cancelled and their store sends them
        again).
        """
        if self._closed:
            return
        self._coalescer.flush_all()
        if self._task is not None and self._buffer:
            await self.flush(self._close_timeout)
        self._closed = True
        if self._task is not None:
            await stop_tasks([self._task])
            self._task = None
        kept = [item for item in self._buffer if item.durable]
        for item in kept:
            if item.done is not None:
                item.done.cancel()
        if kept:
            logger.info("events: %d event(s) left to the outbox for after a restart", len(kept))
            metrics.BUFFERED.dec(len(kept))
        lost = len(self._buffer) - len(kept)
        if lost:
            logger.warning(
                "events: %d event(s) not published before shutdown (NATS at %s unreachable)",
                lost,
                self._url,
            )
            metrics.DROPPED.labels("shutdown").inc(lost)
            metrics.BUFFERED.dec(lost)
        self._buffer.clear()
        await close_quietly(self._nc)
        self._nc = None
        self._js = None

    # -- publishing ----------------------------------------------------------------------

    def publish(
        self,
        event_type: str,
        *,
        subject: str,
        data: EventData,
        task_sequence: int = 0,
        correlation_id: str | None = None,
    ) -> None:
        """Queue one event for publication; returns at once, never blocks on NATS.

        The event is published in a PRODUCER span, child of the current span, whose
        W3C context rides in the message headers and the envelope's ``traceparent``.

        Args:
            event_type: ``"<category>.<event>"``, e.g. ``"task.completed"``.
            subject: The id of what the event is about (task, agent, call id...).
            data: The typed data of the event's category (``TaskEventData``...).
            task_sequence: The task's event sequence number (task and workflow events).
            correlation_id: Defaults to the current correlation id.

        Raises:
            ValueError: Unknown event type or data of the wrong type (a programming
                error, raised whether or not events are enabled).
        """
        if self._url is None:
            # Still built: a wrong event type is a bug whether or not events are on.
            build_event(
                event_type,
                source=self._source,
                subject=subject,
                data=data,
                task_sequence=task_sequence,
            )
            return
        event, carrier = build_traced_event(
            event_type,
            source=self._source,
            subject=subject,
            data=data,
            task_sequence=task_sequence,
            correlation_id=correlation_id,
        )
        nats_subject = event_subject(event_type)
        if self._closed:
            logger.debug("events: publisher closed; dropping %s %s", event_type, event.id)
            metrics.DROPPED.labels("shutdown").inc()
            return
        outgoing = _Outgoing(
            seq=0,  # assigned when it enters the buffer, so the buffer stays sorted
            event_id=event.id,
            event_type=event_type,
            subject=nats_subject,
            category=event_type.partition(".")[0],
            payload=event.SerializeToString(),
            headers=event_headers(event, carrier),
            queued_at=time.monotonic(),
        )
        if event_type == PROGRESS_EVENT:
            self._coalescer.offer(subject, outgoing)
        else:
            # The held progress of this subject goes first: order and the final
            # progress are both kept.
            self._coalescer.flush(subject)
            self._enqueue(outgoing)

    def send(self, events: Sequence[events_pb2.Event]) -> asyncio.Future[None]:
        """Queue ready envelopes, in order, behind everything queued before.

        For events another store keeps until they are published (the coordinator's
        outbox): they are not coalesced, never dropped when the buffer is full, and
        go out with their own ids as ``Nats-Msg-Id``.

        Returns:
            A future that resolves once JetStream acknowledged every one of them
            (at once when events are off or ``events`` is empty). It is cancelled
            if the publisher closes first: the caller sends them again later.
        """
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if self._url is None or not events:
            future.set_result(None)
            return future
        if self._closed:
            future.cancel()
            return future
        now = time.monotonic()
        last = len(events) - 1
        for i, event in enumerate(events):
            self._coalescer.flush(event.subject)
            self._enqueue(
                _Outgoing(
                    seq=0,
                    event_id=event.id,
                    event_type=event.type,
                    subject=event_subject(event.type),
                    category=event.type.partition(".")[0],
                    payload=event.SerializeToString(),
                    headers=event_headers(event),
                    queued_at=now,
                    durable=True,
                    done=future if i == last else None,
                )
            )
        return future

    async def flush(self, timeout: float | None = None) -> bool:  # noqa: ASYNC109
        """Wait until every event published so far is acknowledged by JetStream.

        Held ``task.progress`` updates are released first.

        Args:
            timeout: Seconds to wait at most; None waits as long as it takes.

        Returns:
            True if the buffer drained, False on timeout (or when not started).
        """
        self._coalescer.flush_all()
        if self._url is None or not self._buffer:
            return True
        if self._task is None:
            return False
        try:
            async with asyncio.timeout(timeout):
                await self._idle.wait()
        except TimeoutError:
            return False
        return True

    def _enqueue(self, outgoing: _Outgoing) -> None:
        if len(self._buffer) >= self._max_buffer and not outgoing.durable:
            dropped = self._drop_oldest()
            if dropped is not None:
                metrics.DROPPED.labels("buffer_full").inc()
                metrics.BUFFERED.dec()
                self._log_drop(dropped)
        outgoing.seq = next(self._seq)
        self._buffer.append(outgoing)
        metrics.BUFFERED.inc()
        self._idle.clear()
        self._wake.set()

    def _drop_oldest(self) -> _Outgoing | None:
        """Take the oldest event that is not durable elsewhere out of the buffer."""
        for i, item in enumerate(self._buffer):
            if not item.durable:
                del self._buffer[i]
                return item
        return None

    def _log_drop(self, dropped: _Outgoing) -> None:
        self._dropped_since_log += 1
        now = time.monotonic()
        if now - self._last_drop_log < _DROP_LOG_INTERVAL:
            return
        logger.warning(
            "events: buffer full (%d events, NATS at %s unreachable): dropped %d oldest "
            "event(s), latest %s %s",
            self._max_buffer,
            self._url,
            self._dropped_since_log,
            dropped.event_type,
            dropped.event_id,
        )
        self._dropped_since_log = 0
        self._last_drop_log = now

    # -- background sender ---------------------------------------------------------------

    async def _run(self) -> None:
        backoff = Backoff(initial=0.1, maximum=2.0)
        while not self._closed:
            try:
                if not self._buffer:
                    self._idle.set()
                    self._wake.clear()
                    await self._wake.wait()
                    continue
                await self._ready(backoff)
                if await self._send_window():
                    if self._outage_logged and self.connected:
                        logger.info(
                            "events: publishing again (%d event(s) still buffered)",
                            len(self._buffer),
                        )
                        self._outage_logged = False
                    backoff.reset()
                else:
                    await self._pause(backoff.next_delay())
            except asyncio.CancelledError:
                raise
            except Exception:
                # The sender must outlive any bug in one round: events keep buffering.
                logger.exception("events: publish round failed; retrying")
                await self._pause(backoff.next_delay())

    async def _ready(self, backoff: Backoff) -> None:
        """Until connected, subscribed to acknowledgements and the streams set up."""
        while True:
            if self._closed:
                raise asyncio.CancelledError
            if self._nc is not None and self._nc.is_closed:
                # The connection dropped: it is replaced, never reconnected (see _connect).
                self._nc = None
                self._js = None
            if self._nc is None:
                client = await self._connect(backoff)
                try:
                    await self._acks.open(client)
                except TRANSIENT_ERRORS as exc:
                    logger.warning("events: cannot subscribe to acknowledgements: %s", exc)
                    await close_quietly(client)
                    await self._pause(backoff.next_delay())
                    continue
                self._nc = client
                self._js = client.jetstream(timeout=self._timeout)
            if not self._nc.is_connected:
                await self._pause(0.5)
                continue
            assert self._js is not None
            if self._streams_ready and self._look_for_stream:
                self._look_for_stream = False
                self._streams_ready = await self._stream_exists(self._js)
            if not self._streams_ready:
                try:
                    config = await ensure_streams(self._js, self._stream)
                except TRANSIENT_ERRORS as exc:
                    logger.warning("events: cannot set up stream %s: %s", self._stream.name, exc)
                    await self._pause(backoff.next_delay())
                    continue
                self._streams_ready = True
                self._look_for_stream = False
                # An older server or a stream that refused the flag: event by event.
                self._atomic = bool(config.allow_atomic) and self._batch_min > 0
            return

    async def _stream_exists(self, js: JetStreamContext) -> bool:
        """Whether the event stream is there (when JetStream cannot say: assumed so).

        Only looked at: a stream an operator changed is left as it is (set up again
        only when it is gone).
        """
        try:
            await js.stream_info(self._stream.name)
        except nats.js.errors.NotFoundError:
            logger.warning("events: stream %s is gone; setting it up again", self._stream.name)
            return False
        except TRANSIENT_ERRORS as exc:
            logger.debug("events: cannot look for stream %s: %s", self._stream.name, exc)
        return True

    async def _connect(self, backoff: Backoff) -> NatsClient:
        """A fresh connection, retried with back-off until NATS answers.

        The publisher never lets nats-py reconnect a dropped connection: nats-py would
        first send what it still held unsent from before the drop, i.e. the *later*
        events of the window in flight, ahead of the earlier ones this loop re-sends,
        and the stream would store them out of order. A new client starts empty, and
        the events go out again from the first unacknowledged one.
        """
        assert self._url is not None
        reported = self._outage_logged
        while True:
            if self._closed:
                raise asyncio.CancelledError
            try:
                client = await connect(
                    self._url,
                    name=f"hivewire-events/{self._source}",
                    fail_fast=True,
                    reconnect=False,
                    disconnected_cb=self._on_disconnected,
                    closed_cb=self._on_closed,
                    options=self._nats_options,
                )
            except Unavailable as exc:
                if not reported:
                    logger.warning(
                        "events: %s; buffering up to %d events until it is reachable",
                        exc,
                        self._max_buffer,
                    )
                    reported = True
                await self._pause(backoff.next_delay())
                continue
            if reported:
                logger.info(
                    "events: connected to NATS at %s; sending %d buffered event(s)",
                    self._url,
                    len(self._buffer),
                )
            self._outage_logged = False
            backoff.reset()
            return client

    async def _send_window(self) -> bool:
        batch = list(itertools.islice(self._buffer, self._window))
        if self._atomic and len(batch) >= self._batch_min:
            atomic = _batch_prefix(batch)
            if len(atomic) >= self._batch_min:
                sent = await self._send_batch(atomic)
                if sent is not None:
                    return sent
        return await self._send_each(batch)

    async def _send_batch(self, batch: list[_Outgoing]) -> bool | None:
        """Send a window as one atomic batch: all of it is stored, or none.

        Returns:
            True when stored, False when it failed for now (sent again later), None when
            the server refused it as a batch: the caller sends it event by event, where
            every event is stored or de-duplicated on its own (a batch holding an event
            JetStream already has is refused whole).
        """
        assert self._nc is not None
        if any(len(item.payload) > self._nc.max_payload for item in batch):
            return None  # _send_each drops what NATS cannot take
        messages = [BatchMessage(item.subject, item.payload, item.headers) for item in batch]
        try:
            await publish_atomic(self._nc, messages, ack_timeout=self._timeout)
        except BatchRejectedError as exc:
            metrics.BATCHES.labels("refused").inc()
            if exc.err_code in (ERR_BATCH_DISABLED, ERR_BATCH_UNSUPPORTED_HEADER):
                # The flag was taken off the stream (an operator), or a server that takes
                # no Nats-Msg-Id in a batch (2.12.0): event by event from now on.
                self._atomic = False
            logger.debug("events: batch of %d refused (%s); event by event", len(batch), exc)
            return None
        except TRANSIENT_ERRORS as exc:
            self._failed(batch[0], exc)
            return False
        metrics.BATCHES.labels("stored").inc()
        self._acknowledged(batch)
        return True

    async def _send_each(self, batch: list[_Outgoing]) -> bool:
        """Send a window event by event, pipelined: a publish and an ack each.

        Each publish names a reply subject of the connection's acknowledgement inbox
        (:class:`_AckInbox`); the window waits once, with one deadline, for all of them.
        """
        nc = self._nc
        assert nc is not None
        window = self._acks.begin()
        sent: list[_Outgoing] = []
        ok = True
        try:
            for item in batch:
                try:
                    await nc.publish(
                        item.subject, item.payload, reply=window.add(), headers=dict(item.headers)
                    )
                except nats.errors.MaxPayloadError:
                    # Never accepted, however often it is sent: it must not hold up the rest.
                    window.withdraw()
                    self._drop_too_large(item)
                    continue
                except TRANSIENT_ERRORS as exc:
                    window.withdraw()
                    self._failed(item, exc)
                    ok = False
                    break
                sent.append(item)
            if sent:
                await asyncio.wait([window.sealed()], timeout=self._timeout)
        finally:
            self._acks.end(window)
        acked: list[_Outgoing] = []
        for item, error in zip(sent, window.errors(), strict=True):
            if error is not None:
                if ok:
                    self._failed(item, error)
                ok = False
                # Later events of the window may be stored already: they are sent again
                # after this one and JetStream drops the copies (same Nats-Msg-Id).
                break
            acked.append(item)
        self._acknowledged(acked)
        return ok

    def _acknowledged(self, acked: list[_Outgoing]) -> None:
        """Count the events JetStream stored and take them (and all before) off the buffer."""
        if not acked:
            return
        now = time.monotonic()
        self._published += len(acked)
        counts: dict[str, int] = {}
        for item in acked:
            counts[item.category] = counts.get(item.category, 0) + 1
            _acked_metrics(item.category)[1].observe(max(now - item.queued_at, 0.0))
        for category, count in counts.items():
            _acked_metrics(category)[0].inc(count)
        last = acked[-1].seq
        taken = 0
        while self._buffer and self._buffer[0].seq <= last:
            stored = self._buffer.popleft()
            taken += 1
            if stored.done is not None and not stored.done.done():
                stored.done.set_result(None)
        metrics.BUFFERED.dec(taken)

    def _drop_too_large(self, item: _Outgoing) -> None:
        index = self._buffer.index(item)
        del self._buffer[index]
        metrics.DROPPED.labels("too_large").inc()
        metrics.BUFFERED.dec()
        logger.error(
            "events: %s %s dropped: %d bytes, more than NATS accepts in one message",
            item.event_type,
            item.event_id,
            len(item.payload),
        )
        if item.done is None:
            return
        # Its send() resolves once what came before it is stored.
        previous = self._buffer[index - 1] if index > 0 else None
        if previous is None:
            if not item.done.done():
                item.done.set_result(None)
        elif previous.done is None:
            self._buffer[index - 1] = replace(previous, done=item.done)
        else:
            previous.done.add_done_callback(partial(_follow, item.done))

    def _failed(self, item: _Outgoing, exc: BaseException) -> None:
        metrics.PUBLISH_FAILED.labels(item.category).inc()
        if isinstance(exc, nats.js.errors.NoStreamResponseError | nats.errors.NoRespondersError):
            # Nobody listens on the subject: the stream is gone (a wiped server).
            self._streams_ready = False
        elif not isinstance(exc, nats.js.errors.APIError):
            # Not JetStream's own refusal: the stream may be gone all the same, its subjects
            # held by a core NATS subscriber that answers with silence, or with something
            # that is no acknowledgement. Look for it before sending again.
            self._look_for_stream = True
        if not self._outage_logged:
            logger.warning(
                "events: publish of %s %s failed (%s); %d event(s) buffered, retrying",
                item.event_type,
                item.event_id,
                type(exc).__name__ if not str(exc) else exc,
                len(self._buffer),
            )
            self._outage_logged = True

    async def _pause(self, delay: float) -> None:
        self._kick.clear()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(delay):
                await self._kick.wait()

    async def _on_disconnected(self) -> None:
        if not self._closed and not self._outage_logged:
            logger.warning(
                "events: lost NATS at %s; buffering events (%d now)", self._url, len(self._buffer)
            )
            self._outage_logged = True

    async def _on_closed(self) -> None:
        # The window in flight gets no more acknowledgements: it ends now, not at its
        # timeout, and the sender replaces the connection at once. (Another connection's
        # close, while this one is up, ends nothing.)
        if self._nc is None or self._nc.is_closed:
            self._acks.abort(nats.errors.ConnectionClosedError())
        self._kick.set()


def _batch_prefix(window: list[_Outgoing]) -> list[_Outgoing]:
    """The leading events of a window that fit in one atomic batch.

    At most :data:`MAX_ATOMIC_BATCH` events and :data:`MAX_BATCH_BYTES` of payload: a
    replicated stream proposes a whole batch to its peers at once.
    """
    size = 0
    for count, item in enumerate(window[:MAX_ATOMIC_BATCH]):
        size += len(item.payload)
        if size > MAX_BATCH_BYTES:
            return window[:count]
    return window[:MAX_ATOMIC_BATCH]


def _follow(target: asyncio.Future[None], source: asyncio.Future[None]) -> None:
    """Settle ``target`` like ``source`` (acknowledged, or cancelled on close)."""
    if target.done():
        return
    if source.cancelled():
        target.cancel()
    else:
        target.set_result(None)


@functools.cache
def _acked_metrics(category: str) -> tuple[Any, Any]:
    """The ``published`` and ``publish_lag`` children of a category (one of a few)."""
    return metrics.PUBLISHED.labels(category), metrics.PUBLISH_LAG.labels(category)


_PENDING: Any = object()
_WITHDRAWN: Any = object()
_NO_RESPONDERS = "503"  # the Status header of "no stream listens on this subject"


class _AckWindow:
    """The acknowledgements of one window's publishes, in the order they were sent."""

    __slots__ = ("_done", "_first", "_inbox", "_pending", "_results", "_sealed")

    def __init__(self, inbox: str, first: int) -> None:
        self._inbox = inbox
        self._first = first
        self._results: list[BaseException | None] = []
        self._pending = 0
        self._sealed = False
        self._done: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def add(self) -> str:
        """The reply subject of the next publish."""
        self._results.append(_PENDING)
        self._pending += 1
        return f"{self._inbox}{self._first + len(self._results) - 1}"

    def withdraw(self) -> None:
        """The last :meth:`add` was not sent after all (its number is not used again)."""
        if self._results[-1] is _PENDING:
            self._pending -= 1
        self._results[-1] = _WITHDRAWN

    def settle(self, number: int, error: BaseException | None) -> None:
        """Take the acknowledgement of reply ``number`` (another window's: ignored)."""
        index = number - self._first
        if 0 <= index < len(self._results) and self._results[index] is _PENDING:
            self._results[index] = error
            self._pending -= 1
            self._resolve()

    def sealed(self) -> asyncio.Future[None]:
        """No more publishes: a future that resolves once every one is acknowledged."""
        self._sealed = True
        self._resolve()
        return self._done

    @property
    def following(self) -> int:
        """The number the next window starts at (past every reply this one named)."""
        return self._first + len(self._results)

    def abort(self, error: BaseException) -> None:
        """No more acknowledgements will come (the connection closed): the rest failed."""
        results = self._results
        for index, result in enumerate(results):
            if result is _PENDING:
                results[index] = error
        self._pending = 0
        self._resolve()

    def errors(self) -> list[BaseException | None]:
        """Per publish sent, why it failed (no ack in time: a timeout), or None once stored."""
        late = TimeoutError("no acknowledgement in time")
        return [
            late if result is _PENDING else result
            for result in self._results
            if result is not _WITHDRAWN
        ]

    def _resolve(self) -> None:
        if self._sealed and self._pending == 0 and not self._done.done():
            self._done.set_result(None)


class _AckInbox:
    """JetStream's acknowledgements, on one inbox subscription per connection.

    A JetStream publish is a core NATS publish with a reply subject; the stream answers
    on it. nats-py's ``publish_async`` makes a future, a random token, a semaphore wait
    and a parsed ``PubAck`` per message; a window of the publisher needs one wait for
    all of them, so its publishes reply to ``<inbox>.<n>`` and the answers are matched
    by number. An answer that is plainly a stored message's acknowledgement (its
    ``stream`` and ``seq``, no ``error``) is not parsed.
    """

    def __init__(self) -> None:
        self._inbox = ""
        self._next = 1
        self._window: _AckWindow | None = None

    async def open(self, nc: NatsClient) -> None:
        """Subscribe on a new connection (each connection its own inbox)."""
        inbox = f"{nc.new_inbox()}."
        await nc.subscribe(f"{inbox}*", cb=self._on_reply)
        self._inbox = inbox
        self._window = None

    def begin(self) -> _AckWindow:
        """A window whose publishes reply here (one at a time)."""
        self._window = _AckWindow(self._inbox, self._next)
        return self._window

    def end(self, window: _AckWindow) -> None:
        """Late answers to ``window`` are dropped; the numbers go on after it."""
        if self._window is window:
            self._window = None
        self._next = window.following

    def abort(self, error: BaseException) -> None:
        """The connection closed: the window in flight fails with ``error`` at once."""
        if self._window is not None:
            self._window.abort(error)

    async def _on_reply(self, msg: Msg) -> None:
        window = self._window
        if window is None or not msg.subject.startswith(self._inbox):
            return
        try:
            number = int(msg.subject[len(self._inbox) :])
        except ValueError:
            return
        window.settle(number, _ack_error(msg))


def _ack_error(msg: Msg) -> BaseException | None:
    """Why JetStream did not store a publish, from its answer; None when it did.

    Only an acknowledgement naming the stream and the message's sequence counts as
    stored: anything else that answers on the subject (a core NATS responder where the
    stream was deleted, say) is a failure, and the event is sent again.
    """
    data = msg.data
    if msg.headers and msg.headers.get(Header.STATUS) == _NO_RESPONDERS:
        return nats.js.errors.NoStreamResponseError()
    if b'"error"' not in data and b'"stream"' in data and b'"seq"' in data:
        return None
    try:
        answer = json.loads(data)
    except ValueError:
        answer = None
    if not isinstance(answer, dict):
        return nats.js.errors.Error(f"not an acknowledgement: {data[:80]!r}")
    error = answer.get("error")
    if error:
        try:
            nats.js.errors.APIError.from_error(error)  # raises the error's own class
        except nats.js.errors.Error as exc:
            return exc
        except (KeyError, TypeError):
            pass  # not the shape nats-py knows: the error as it came
        return nats.js.errors.APIError(description=str(error)[:200])
    if "stream" not in answer or "seq" not in answer:
        return nats.js.errors.Error(f"not an acknowledgement: {data[:80]!r}")
    return None
