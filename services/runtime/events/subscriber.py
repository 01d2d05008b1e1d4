"""Consuming events: durable at-least-once subscriptions with dead letters, and replay.

:func:`subscribe` binds a handler to a durable JetStream pull consumer:

* **at-least-once**: an event is acknowledged (``ack_sync``) only after the handler
  returned; a crash before that means redelivery, to this process or its replacement
  (same ``durable``), which resumes at the first unacknowledged event;
* **de-duplication** by event id: ids of processed events are kept in a bounded LRU
  (``dedupe_size``), so a redelivered or re-published event reaches the handler once
  per process. Across restarts, and beyond the LRU, handlers must still be idempotent
  (upsert keyed by event id, or compare ``task_sequence`` with what was stored);
* **retries with back-off**: a handler exception naks the message with
  ``backoff[delivery - 1]`` seconds of delay (the last value repeats);
* **dead letters**: the delivery that reaches ``max_deliver`` and fails again (or any
  later delivery, e.g. after a handler that hung past ``ack_wait``) is copied to
  ``hivewire.dlq.<category>.<event>`` in the ``HIVEWIRE_DLQ`` stream with the original
  subject, stream, sequence, delivery count and last error in headers
  (``Nats-Msg-Id: dlq-<stream>-<seq>``, so a retried copy is stored once), then
  terminated (``term``). ``max_deliver`` is enforced here rather than by the server so
  that an event is never silently parked: the server would stop redelivering without
  anyone writing the dead letter.

:func:`replay` reads history (from a time, a sequence, or the beginning) and optionally
follows live events through an ephemeral, ordered consumer: no acks, no state on the
server after it ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import uuid
from collections import OrderedDict
from collections.abc import AsyncGenerator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Literal, TypeAlias

import nats.errors
import nats.js.errors
from google.protobuf.message import DecodeError
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from nats.js.client import JetStreamContext

from hivewire.events.v1 import events_pb2
from hivewire.services.base.lifecycle import StartClose
from hivewire.services.runtime import tracing
from hivewire.services.runtime.errors import NotFound, Unavailable
from hivewire.services.runtime.logging import bind_correlation_id

from . import metrics
from ._nats import (
    TRANSIENT_ERRORS,
    close_quietly,
    connect,
    ensure_streams,
    honour_cancellation,
    stop_tasks,
    stream_exists,
)
from .envelope import dlq_subject_for, filter_subject, header_value
from .headers import (
    HEADER_CONSUMER,
    HEADER_CORRELATION_ID,
    HEADER_DELIVERY_COUNT,
    HEADER_LAST_ERROR,
    HEADER_MSG_ID,
    HEADER_ORIGINAL_SEQUENCE,
    HEADER_ORIGINAL_STREAM,
    HEADER_ORIGINAL_SUBJECT,
    HEADER_TRACEPARENT,
    HEADER_TRACESTATE,
)
from .settings import StreamSettings

logger = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_BACKOFF",
    "DeliverFrom",
    "Handler",
    "ReceivedEvent",
    "Subscription",
    "SubscriptionStats",
    "replay",
    "subscribe",
]

DEFAULT_BACKOFF: tuple[float, ...] = (1.0, 5.0, 30.0)
"""Seconds before redelivery after the 1st, 2nd, 3rd... handler failure."""

DeliverFrom: TypeAlias = datetime | timedelta | int | None
"""Where a new consumer starts: a time, a time ago, a stream sequence, or the beginning."""

_DURABLE = re.compile(r"^[A-Za-z0-9_-]{1,128}$")
_LATEST_START = datetime(2262, 1, 1, tzinfo=UTC)
_REPLAY_ATTEMPTS = 12


@dataclass(frozen=True, slots=True)
class ReceivedEvent:
    """One event as a subscriber receives it.

    Attributes:
        event: The decoded envelope.
        subject: The NATS subject it was published on.
        stream_sequence: Its sequence number in the event stream.
        delivery_count: How many times it has been delivered (1 = first time).
        pending: Events after this one the consumer has not delivered yet.
        headers: The NATS headers (``Nats-Msg-Id``, ``X-Correlation-Id``...).
        stored_at: When JetStream stored it.
    """

    event: events_pb2.Event
    subject: str
    stream_sequence: int
    delivery_count: int
    pending: int
    headers: Mapping[str, str]
    stored_at: datetime | None

    @property
    def id(self) -> str:
        """The event id."""
        return self.event.id

    @property
    def type(self) -> str:
        """The event type, e.g. ``task.completed``."""
        return self.event.type


Handler: TypeAlias = Callable[[ReceivedEvent], Awaitable[None]]
"""An event handler: returns to acknowledge, raises to retry (then dead-letter)."""


@dataclass
class SubscriptionStats:
    """What a subscription did since it started.

    Attributes:
        processed: Events the handler completed (acknowledged).
        duplicates: Deliveries of already processed events, acknowledged unseen.
        retries: Handler failures followed by a delayed redelivery.
        dead_lettered: Events moved to the dead-letter stream.
    """

    processed: int = 0
    duplicates: int = 0
    retries: int = 0
    dead_lettered: int = 0


class _Lru:
    """Bounded insertion-ordered mapping: the oldest entries fall out first."""

    def __init__(self, size: int) -> None:
        self._size = size
        self._items: OrderedDict[str, str] = OrderedDict()

    def __contains__(self, key: object) -> bool:
        return key in self._items

    def get(self, key: str) -> str | None:
        return self._items.get(key)

    def put(self, key: str, value: str = "") -> None:
        self._items[key] = value
        self._items.move_to_end(key)
        while len(self._items) > self._size:
            self._items.popitem(last=False)

    def pop(self, key: str) -> None:
        self._items.pop(key, None)


def _start_config(start: DeliverFrom) -> dict[str, Any]:
    if start is None:
        return {"deliver_policy": DeliverPolicy.ALL}
    if isinstance(start, bool):
        raise TypeError("deliver_from must be a datetime, timedelta, sequence or None")
    if isinstance(start, int):
        if start < 1:
            raise ValueError("a start sequence must be >= 1")
        return {"deliver_policy": DeliverPolicy.BY_START_SEQUENCE, "opt_start_seq": start}
    if isinstance(start, timedelta):
        start = datetime.now(UTC) - start
    if start.tzinfo is None:
        start = start.replace(tzinfo=UTC)
    # The server counts time in int64 nanoseconds: a later time wraps around to the past.
    start = min(start, _LATEST_START)
    return {"deliver_policy": DeliverPolicy.BY_START_TIME, "opt_start_time": start}


def _received(msg: Msg, event: events_pb2.Event) -> ReceivedEvent:
    meta = msg.metadata
    return ReceivedEvent(
        event=event,
        subject=msg.subject,
        stream_sequence=meta.sequence.stream,
        delivery_count=meta.num_delivered,
        pending=meta.num_pending,
        headers=dict(msg.headers or {}),
        stored_at=meta.timestamp,
    )


class Subscription(StartClose):
    """A durable, at-least-once event subscription (see the module docstring).

    Create it with :func:`subscribe`; run it with ``async with`` (it consumes in the
    background until the block ends) or ``await subscription.run()`` (until cancelled).
    Events are handled one at a time, in stream order (a retried event comes back after
    its back-off, behind later ones). Processes sharing one ``durable`` share the work.

    Args:
        nats_url: NATS server URL(s), comma separated.
        pattern: Event types to receive: ``"task.*"``, ``"task.completed"``, ``">"``...
        handler: Called with each event; raise to have it retried.
        durable: Consumer name; the server remembers its position across restarts.
        max_deliver: Deliveries before an event is dead-lettered.
        backoff: Redelivery delays (s) after each handler failure; the last repeats.
        deliver_from: Where a *new* durable starts (an existing one keeps its position).
        ack_wait: Seconds without an ack (or progress signal) before redelivery; a
            running handler is kept alive with ``in_progress`` so it may take longer.
        batch: Events fetched per request.
        dedupe_size: Processed event ids remembered for de-duplication.
        stream: Stream names and limits (the streams are created if missing).
        fetch_timeout: Seconds one fetch waits for new events.
        nats_options: More ``nats.connect`` keyword arguments.
    """

    def __init__(
        self,
        nats_url: str,
        pattern: str,
        handler: Handler,
        *,
        durable: str,
        max_deliver: int = 5,
        backoff: Sequence[float] = DEFAULT_BACKOFF,
        deliver_from: DeliverFrom = None,
        ack_wait: float = 30.0,
        batch: int = 16,
        dedupe_size: int = 10_000,
        stream: StreamSettings | None = None,
        fetch_timeout: float = 1.0,
        nats_options: Mapping[str, Any] | None = None,
    ) -> None:
        if not _DURABLE.match(durable):
            raise ValueError(f"durable {durable!r} must match [A-Za-z0-9_-]{{1,128}}")
        if max_deliver < 1:
            raise ValueError("max_deliver must be >= 1")
        if not backoff or any(delay < 0 for delay in backoff):
            raise ValueError("backoff must be a non-empty list of delays >= 0")
        if ack_wait <= 0 or fetch_timeout <= 0 or batch < 1 or dedupe_size < 1:
            raise ValueError("ack_wait, fetch_timeout, batch and dedupe_size must be positive")
        self._url = nats_url
        self._subject = filter_subject(pattern)
        self._handler = handler
        self._durable = durable
        self._max_deliver = max_deliver
        self._backoff = tuple(float(delay) for delay in backoff)
        self._start = _start_config(deliver_from)
        self._deliver_from_given = deliver_from is not None
        self._ack_wait = ack_wait
        self._batch = batch
        self._fetch_timeout = fetch_timeout
        self._streams = stream or StreamSettings()
        self._nats_options = dict(nats_options or {})
        self._seen = _Lru(dedupe_size)
        self._errors = _Lru(1024)
        # Fetched, not yet settled (keyed by id(): Msg is not hashable).
        self._held: dict[int, Msg] = {}
        self._nc: NatsClient | None = None
        self._js: JetStreamContext | None = None
        self._psub: JetStreamContext.PullSubscription | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._closed = False
        self._lag = metrics.SUBSCRIBER_LAG.labels(durable)
        self.stats = SubscriptionStats()

    @property
    def durable(self) -> str:
        """The durable consumer name."""
        return self._durable

    @property
    def filter_subject(self) -> str:
        """The NATS subject filter, e.g. ``hivewire.events.task.*``."""
        return self._subject

    # -- lifecycle -----------------------------------------------------------------------

    async def start(self) -> None:
        """Connect, create or bind the durable consumer, and start consuming.

        Raises:
            Unavailable: NATS cannot be reached (an outage *after* start is survived).
        """
        if self._tasks:
            return
        if self._closed:
            raise RuntimeError("Subscription is closed")
        self._nc = await connect(
            self._url,
            name=f"hivewire-subscriber/{self._durable}",
            fail_fast=True,
            disconnected_cb=self._on_disconnected,
            reconnected_cb=self._on_reconnected,
            options=self._nats_options,
        )
        try:
            self._js = self._nc.jetstream(timeout=5.0)
            await ensure_streams(self._js, self._streams)
            await self._bind()
        except BaseException:
            await close_quietly(self._nc)
            raise
        self._tasks = [
            asyncio.create_task(self._consume(), name=f"hivewire-subscriber:{self._durable}"),
            asyncio.create_task(self._keepalive(), name=f"hivewire-keepalive:{self._durable}"),
        ]

    async def close(self) -> None:
        """Stop consuming and disconnect.

        A handler still running is cancelled and its event is nak'd, so it is delivered
        again at once (to another process of the same durable, or after a restart).
        """
        if self._closed:
            return
        self._closed = True
        await stop_tasks(self._tasks)
        self._tasks = []
        # Fetched but never handled: give them back now rather than after ack_wait.
        for msg in list(self._held.values()):
            with contextlib.suppress(*TRANSIENT_ERRORS):
                await msg.nak()
        self._held.clear()
        await close_quietly(self._nc)
        self._nc = None

    async def run(self) -> None:
        """Consume until cancelled (or until the consumer task fails)."""
        async with self:
            await asyncio.gather(*self._tasks)

    # -- consumer ------------------------------------------------------------------------

    async def _bind(self) -> None:
        js = self._js
        assert js is not None
        stream = self._streams.name
        config = ConsumerConfig(
            name=self._durable,
            durable_name=self._durable,
            description=f"hivewire subscriber {self._durable} on {self._subject}",
            ack_policy=AckPolicy.EXPLICIT,
            ack_wait=self._ack_wait,
            max_deliver=-1,
            filter_subject=self._subject,
            max_ack_pending=max(1000, self._batch * 4),
            **self._start,
        )
        try:
            existing = await js.consumer_info(stream, self._durable)
        except nats.js.errors.NotFoundError:
            await js.add_consumer(stream, config)
            logger.info("events: created durable %s on %s", self._durable, self._subject)
        else:
            current = existing.config
            if self._deliver_from_given:
                logger.info(
                    "events: durable %s exists; it resumes at its position (deliver_from is "
                    "only used when it is created)",
                    self._durable,
                )
            # The start position cannot be changed on an existing consumer.
            config.deliver_policy = current.deliver_policy
            config.opt_start_seq = current.opt_start_seq
            config.opt_start_time = current.opt_start_time
            if (current.filter_subject, current.ack_wait, current.max_deliver) != (
                self._subject,
                self._ack_wait,
                -1,
            ):
                await js.add_consumer(stream, config)
                logger.info("events: updated durable %s (%s)", self._durable, self._subject)
        self._psub = await js.pull_subscribe_bind(durable=self._durable, stream=stream)

    async def _consume(self) -> None:
        failures = 0
        while not self._closed:
            psub = self._psub
            try:
                if psub is None:
                    await self._bind()
                    continue
                msgs = await psub.fetch(self._batch, timeout=self._fetch_timeout)
            except nats.errors.TimeoutError:
                # Nothing new within fetch_timeout: caught up.
                self._lag.set(0)
                continue
            except nats.js.errors.NotFoundError:
                logger.warning("events: durable %s vanished; re-creating it", self._durable)
                await self._drop_psub()
                failures = await self._pause(failures)
                continue
            except TRANSIENT_ERRORS as exc:
                logger.debug("events: fetch for %s failed: %s", self._durable, exc)
                if isinstance(exc, nats.js.errors.APIError):
                    # Consumer deleted or the stream re-created: bind again.
                    await self._drop_psub()
                failures = await self._pause(failures)
                continue
            failures = 0
            self._held.update((id(msg), msg) for msg in msgs)
            for msg in msgs:
                try:
                    await self._process(msg)
                except TRANSIENT_ERRORS as exc:
                    # Lost NATS mid-event: unacked, so it comes back after ack_wait.
                    logger.debug("events: %s: %s while settling an event", self._durable, exc)
                except Exception:
                    # A bug here must not stop the subscription; the event is redelivered.
                    logger.exception("events: %s failed to process an event", self._durable)
                finally:
                    self._held.pop(id(msg), None)

    async def _drop_psub(self) -> None:
        psub, self._psub = self._psub, None
        if psub is not None:
            with contextlib.suppress(*TRANSIENT_ERRORS, ValueError):
                await psub.unsubscribe()

    async def _pause(self, failures: int) -> int:
        await asyncio.sleep(min(2.0, 0.1 * (2**failures)))
        return min(failures + 1, 10)

    async def _keepalive(self) -> None:
        # A long handler must not look dead to the server: "working on it" resets the
        # ack_wait timer of every fetched event not settled yet.
        interval = self._ack_wait / 3
        while not self._closed:
            await asyncio.sleep(interval)
            for msg in list(self._held.values()):
                with contextlib.suppress(*TRANSIENT_ERRORS):
                    await msg.in_progress()

    async def _process(self, msg: Msg) -> None:
        meta = msg.metadata
        delivered = meta.num_delivered
        self._lag.set(meta.num_pending)
        try:
            event = events_pb2.Event.FromString(msg.data)
        except DecodeError as exc:
            await self._dead_letter(msg, f"undecodable events.v1.Event payload: {exc}")
            return
        headers = msg.headers or {}
        event_id = event.id or headers.get(HEADER_MSG_ID) or f"{meta.stream}:{meta.sequence.stream}"
        if event_id in self._seen:
            self.stats.duplicates += 1
            metrics.HANDLED.labels(self._durable, "duplicate").inc()
            await self._ack(msg)
            return
        if delivered > self._max_deliver:
            error = self._errors.get(event_id) or (
                f"not acknowledged within ack_wait ({self._ack_wait:g}s) on delivery "
                f"{delivered - 1}"
            )
            await self._dead_letter(msg, error)
            return
        try:
            with (
                bind_correlation_id(event.correlation_id or None),
                tracing.tracer.start_as_current_span(
                    f"{msg.subject} process",
                    context=tracing.extract(headers),
                    kind=tracing.SpanKind.CONSUMER,
                    attributes={
                        "messaging.system": "nats",
                        "messaging.operation.type": "process",
                        "messaging.destination.name": msg.subject,
                        "messaging.consumer.group.name": self._durable,
                        "messaging.message.id": event_id,
                    },
                ),
            ):
                await self._handler(_received(msg, event))
        except asyncio.CancelledError:
            # Stopping mid-event: hand it back for immediate redelivery.
            with contextlib.suppress(*TRANSIENT_ERRORS):
                await msg.nak()
            raise
        except Exception as exc:
            error = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
            self._errors.put(event_id, error)
            if delivered >= self._max_deliver:
                await self._dead_letter(msg, error)
                return
            delay = self._backoff[min(delivered, len(self._backoff)) - 1]
            logger.warning(
                "events: %s handler failed on %s %s (delivery %d of %d): %s; retry in %gs",
                self._durable,
                event.type,
                event_id,
                delivered,
                self._max_deliver,
                error,
                delay,
            )
            self.stats.retries += 1
            metrics.HANDLED.labels(self._durable, "retry").inc()
            with contextlib.suppress(*TRANSIENT_ERRORS):
                await msg.nak(delay=delay)
            return
        self._seen.put(event_id)
        self._errors.pop(event_id)
        self.stats.processed += 1
        metrics.HANDLED.labels(self._durable, "ok").inc()
        await self._ack(msg)

    async def _ack(self, msg: Msg) -> None:
        try:
            await msg.ack_sync(timeout=2.0)
        except TRANSIENT_ERRORS as exc:  # MsgAlreadyAckdError included
            # The event comes back and is recognised as a duplicate (same process), or
            # handled again by an idempotent handler (another one).
            logger.debug("events: ack of %s failed: %s", msg.subject, exc)

    async def _dead_letter(self, msg: Msg, error: str) -> None:
        js = self._js
        assert js is not None
        meta = msg.metadata
        original = msg.headers or {}
        headers = {
            HEADER_MSG_ID: f"dlq-{meta.stream}-{meta.sequence.stream}",
            HEADER_ORIGINAL_SUBJECT: msg.subject,
            HEADER_ORIGINAL_STREAM: meta.stream,
            HEADER_ORIGINAL_SEQUENCE: str(meta.sequence.stream),
            HEADER_DELIVERY_COUNT: str(meta.num_delivered),
            HEADER_LAST_ERROR: header_value(error),
            HEADER_CONSUMER: self._durable,
        }
        for key in (HEADER_CORRELATION_ID, HEADER_TRACEPARENT, HEADER_TRACESTATE):
            if key in original:
                headers[key] = original[key]
        try:
            await js.publish(dlq_subject_for(msg.subject), msg.data, headers=headers)
        except TRANSIENT_ERRORS as exc:
            # Keep the event: it comes back after the longest back-off and the dead
            # letter is tried again (its Nats-Msg-Id makes a repeat harmless).
            logger.error(
                "events: cannot dead-letter %s seq %d (%s); keeping it",
                msg.subject,
                meta.sequence.stream,
                exc,
            )
            with contextlib.suppress(*TRANSIENT_ERRORS):
                await msg.nak(delay=self._backoff[-1])
            return
        with contextlib.suppress(*TRANSIENT_ERRORS):
            await msg.term()
        self.stats.dead_lettered += 1
        metrics.DEAD_LETTERED.labels(self._durable).inc()
        logger.warning(
            "events: %s dead-lettered %s seq %d after %d deliveries: %s",
            self._durable,
            msg.subject,
            meta.sequence.stream,
            meta.num_delivered,
            error,
        )

    async def _on_disconnected(self) -> None:
        if not self._closed:
            logger.warning("events: subscriber %s lost NATS; waiting for it", self._durable)

    async def _on_reconnected(self) -> None:
        logger.info("events: subscriber %s reconnected to NATS", self._durable)


def subscribe(
    nats_url: str, pattern: str, handler: Handler, *, durable: str, **options: Any
) -> Subscription:
    """Subscribe ``handler`` to events matching ``pattern`` through a durable consumer.

    Example::

        async def on_task(received: ReceivedEvent) -> None:
            await store.upsert(received.event.task.task_id, received.event)

        async with subscribe(url, "task.*", on_task, durable="billing"):
            await stop.wait()

    Args:
        nats_url: NATS server URL(s), comma separated.
        pattern: ``"task.*"``, ``"task.completed"``, ``"*.failed"``, ``">"``...
        handler: Async callable; return to acknowledge, raise to retry.
        durable: Consumer name (``[A-Za-z0-9_-]``); keeps its position across restarts.
        **options: The other :class:`Subscription` options: ``max_deliver``
            (deliveries before the event goes to the dead-letter stream, default 5),
            ``backoff`` (redelivery delays in seconds after each failure, the last
            repeats), ``deliver_from`` (start of a new durable: a datetime, a timedelta
            ago, a stream sequence, or None for the whole retained history),
            ``ack_wait``, ``batch``...

    Returns:
        The (not yet started) subscription.
    """
    return Subscription(nats_url, pattern, handler, durable=durable, **options)


@dataclass
class _Ordered:
    """Position of an ordered replay: recreate the consumer after the last event seen."""

    stream: str
    subject: str
    start: dict[str, Any]
    last_seq: int = 0
    expected: int = 1
    name: str = field(default_factory=lambda: uuid.uuid4().hex)

    def config(self, inactive: float) -> ConsumerConfig:
        start = (
            {"deliver_policy": DeliverPolicy.BY_START_SEQUENCE, "opt_start_seq": self.last_seq + 1}
            if self.last_seq
            else self.start
        )
        return ConsumerConfig(
            name=self.name,
            ack_policy=AckPolicy.NONE,
            filter_subject=self.subject,
            inactive_threshold=inactive,
            mem_storage=True,
            num_replicas=1,
            **start,
        )


async def replay(
    nats_url: str,
    pattern: str = ">",
    *,
    start: DeliverFrom | Literal["new"] = None,
    follow: bool = False,
    stream: StreamSettings | None = None,
    batch: int = 256,
    fetch_timeout: float = 1.0,
    missing_ok: bool = True,
    nats_options: Mapping[str, Any] | None = None,
    dead_letters: bool = False,
) -> AsyncGenerator[ReceivedEvent, None]:
    """Read stored events in stream order, and optionally keep following new ones.

    An ephemeral ordered consumer: nothing is acknowledged and nothing stays on the
    server. It survives a NATS outage by re-creating itself after the last event seen,
    so no event is skipped or repeated. To stop early, iterate inside
    ``contextlib.aclosing(replay(...))`` so the consumer is removed right away.

    Args:
        nats_url: NATS server URL(s), comma separated.
        pattern: Event types, as for :func:`subscribe`.
        start: A datetime, a timedelta ago, a stream sequence, ``None`` (everything
            retained) or ``"new"`` (only events published from now on).
        follow: Keep waiting for new events; otherwise stop once caught up.
        stream: Stream names; with ``follow`` the streams are created if missing.
        batch: Events fetched per request.
        fetch_timeout: Seconds one fetch waits.
        missing_ok: Without ``follow``, a stream that does not exist yet (nothing was
            ever published) reads as empty; False raises ``NotFound`` instead.
        nats_options: More ``nats.connect`` keyword arguments.
        dead_letters: Read the dead-letter stream (``HIVEWIRE_DLQ``) instead: the
            events subscribers gave up on, with ``Hivewire-*`` headers saying where they
            came from, which durable gave up and its last error.

    Yields:
        The events, oldest first (``delivery_count`` is always 1).

    Raises:
        Unavailable: NATS cannot be reached.
        NotFound: The stream does not exist, ``follow`` and ``missing_ok`` are false.
    """
    names = stream or StreamSettings()
    subject = filter_subject(pattern)
    stream_name = names.name
    if dead_letters:
        stream_name, subject = names.dlq_name, dlq_subject_for(subject)
    client = await connect(
        nats_url, name="hivewire-events-replay", fail_fast=True, options=nats_options
    )
    js = client.jetstream(timeout=5.0)
    psub: JetStreamContext.PullSubscription | None = None
    position: _Ordered | None = None
    inactive = max(30.0, fetch_timeout * 5)
    try:
        if follow:
            await ensure_streams(js, names)
        else:
            try:
                await stream_exists(js, stream_name)
            except NotFound:
                if missing_ok:
                    return
                raise
        if start == "new":
            stream_info = await js.stream_info(stream_name)
            start_config = {
                "deliver_policy": DeliverPolicy.BY_START_SEQUENCE,
                "opt_start_seq": stream_info.state.last_seq + 1,
            }
        else:
            start_config = _start_config(start)
        position = _Ordered(stream=stream_name, subject=subject, start=start_config)
        failures = 0
        while True:
            honour_cancellation()
            if psub is None:
                try:
                    created = await js.add_consumer(stream_name, position.config(inactive))
                    psub = await js.pull_subscribe_bind(consumer=position.name, stream=stream_name)
                except TRANSIENT_ERRORS as exc:
                    logger.debug("events: replay consumer creation failed: %s", exc)
                    failures = await _replay_pause(failures, follow, exc)
                    continue
                position.expected = 1
                if not follow and created.num_pending == 0:
                    return
            try:
                msgs = await psub.fetch(batch, timeout=fetch_timeout)
            except nats.errors.TimeoutError as timeout:
                if not follow:
                    try:
                        if (await psub.consumer_info()).num_pending == 0:
                            return
                    except TRANSIENT_ERRORS:
                        await _replace(js, psub, position)
                        psub = None
                        failures = await _replay_pause(failures, follow, timeout)
                continue
            except TRANSIENT_ERRORS as exc:
                # The ephemeral consumer is gone (outage, server restart): start a new
                # one right after the last event seen.
                logger.debug("events: replay fetch failed (%s); re-creating", exc)
                await _replace(js, psub, position)
                psub = None
                failures = await _replay_pause(failures, follow, exc)
                continue
            failures = 0
            for msg in msgs:
                meta = msg.metadata
                if meta.sequence.consumer != position.expected:
                    # A gap: the server lost our place; resume after the last event seen.
                    await _replace(js, psub, position)
                    psub = None
                    break
                position.expected += 1
                position.last_seq = meta.sequence.stream
                try:
                    event = events_pb2.Event.FromString(msg.data)
                except DecodeError:
                    logger.warning(
                        "events: skipping undecodable message %s seq %d",
                        msg.subject,
                        meta.sequence.stream,
                    )
                    continue
                yield _received(msg, event)
                if not follow and meta.num_pending == 0:
                    return
    finally:
        # Disconnected: no waiting out a request timeout; the server drops the idle
        # ephemeral consumer after its inactive threshold anyway.
        if psub is not None and position is not None and client.is_connected:
            with contextlib.suppress(*TRANSIENT_ERRORS):
                await js.delete_consumer(position.stream, position.name)
        await close_quietly(client)


async def _replay_pause(failures: int, follow: bool, exc: BaseException) -> int:
    # Following rides out any outage; a one-off read gives up after ~20 s of failures.
    if not follow and failures >= _REPLAY_ATTEMPTS:
        raise Unavailable(
            f"cannot read the event stream: {exc or type(exc).__name__}",
            reason="EVENTS_UNAVAILABLE",
        ) from exc
    await asyncio.sleep(min(2.0, 0.1 * (2 ** min(failures, 5))))
    return failures + 1


async def _replace(
    js: JetStreamContext,
    psub: JetStreamContext.PullSubscription | None,
    position: _Ordered,
) -> None:
    if psub is not None:
        with contextlib.suppress(*TRANSIENT_ERRORS, ValueError):
            await psub.unsubscribe()
        with contextlib.suppress(*TRANSIENT_ERRORS):
            await js.delete_consumer(position.stream, position.name)
    position.name = uuid.uuid4().hex
