"""The event outbox: task events reach NATS exactly once, even across a kill -9.

Publishing after a commit from memory loses the event when the process dies between
the two. So the journal builds each event's NATS envelopes (the ``task.*`` event and
the ``workflow.*`` events that report it) *before* the commit and stores them with the
event (:attr:`~hivewire.services.coordinator.store.EventRow.outbox`): in SQLite a row
of the ``outbox`` table in the same transaction, on JetStream a header of the event's
journal message. :class:`OutboxRelay` then reads the committed entries in commit order,
hands them to the publisher and, once JetStream acknowledged them, records them as
published (:meth:`TaskStore.outbox_done`).

After a crash the relay starts from the last recorded position, so it may send again
what was published but not yet recorded. Every envelope has a deterministic id —
``<task id>:<sequence>`` for the task event, ``<task id>:<sequence>:<type>`` for a
workflow event reporting it — sent as ``Nats-Msg-Id``: JetStream stores a copy sent
again within the stream's duplicate window once (docs/events.md, "The outbox").
"""

from __future__ import annotations

import asyncio
import logging
import struct
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, Protocol, runtime_checkable

from google.protobuf.message import DecodeError

from hivewire.events.v1 import events_pb2
from hivewire.services.base.backoff import Backoff
from hivewire.services.base.lifecycle import StartStop, cancel_and_wait
from hivewire.services.coordinator import metrics
from hivewire.services.coordinator.store import TaskStore

logger = logging.getLogger(__name__)

__all__ = [
    "OutboxHold",
    "OutboxRelay",
    "OutboxSink",
    "RelayOptions",
    "event_id",
    "outbox_sink",
    "pack",
    "unpack",
]

_LENGTH = struct.Struct(">I")

OutboxHold = Literal["", "publish", "mark"]
"""Test-only pauses of the relay: ``publish`` sends nothing, ``mark`` never records
what was sent (so a restart sends it again). Empty in production."""


@runtime_checkable
class OutboxSink(Protocol):
    """A publisher that takes ready envelopes and says when JetStream stored them."""

    @property
    def enabled(self) -> bool:
        """False when events are off."""
        ...

    @property
    def source(self) -> str:
        """The ``source`` of the envelopes (``coordinator/<instance>``)."""
        ...

    def send(self, events: Sequence[events_pb2.Event]) -> asyncio.Future[None]:
        """Queue the envelopes in order; the future resolves once all are stored."""
        ...


def outbox_sink(events: object) -> OutboxSink | None:
    """``events`` when task events go to it through the outbox: a NATS publisher, on."""
    if isinstance(events, OutboxSink) and events.enabled:
        return events
    return None


def event_id(task_id: str, sequence: int, event_type: str = "") -> str:
    """The deterministic id (and ``Nats-Msg-Id``) of an event reporting a task event.

    ``<task id>:<sequence>`` for the task event itself, ``<task id>:<sequence>:<type>``
    for another event reporting it (``workflow.step_completed``...).
    """
    base = f"{task_id}:{sequence}"
    return f"{base}:{event_type}" if event_type else base


def pack(events: Sequence[events_pb2.Event]) -> bytes:
    """Encode envelopes as one outbox entry (each length-prefixed, in order)."""
    parts = []
    for event in events:
        data = event.SerializeToString()
        parts.append(_LENGTH.pack(len(data)))
        parts.append(data)
    return b"".join(parts)


def unpack(entry: bytes) -> list[events_pb2.Event]:
    """Decode an outbox entry made by :func:`pack`.

    Raises:
        ValueError: The entry is truncated or an envelope does not decode.
    """
    events = []
    offset = 0
    while offset < len(entry):
        if offset + _LENGTH.size > len(entry):
            raise ValueError("truncated outbox entry")
        (size,) = _LENGTH.unpack_from(entry, offset)
        offset += _LENGTH.size
        if offset + size > len(entry):
            raise ValueError("truncated outbox entry")
        try:
            events.append(events_pb2.Event.FromString(entry[offset : offset + size]))
        except DecodeError as exc:
            raise ValueError(f"undecodable outbox envelope: {exc}") from exc
        offset += size
    return events


@dataclass(frozen=True)
class RelayOptions:
    """Tuning of an :class:`OutboxRelay`.

    Attributes:
        batch: Entries read at a time.
        in_flight: Reads handed to the publisher and not yet acknowledged, at most.
        stop_timeout: Seconds :meth:`OutboxRelay.stop` waits for what is in flight to be
            acknowledged and recorded (what is not is sent again after a restart).
        record_interval: Seconds between two records of the position published, at most
            (also how long after the last acknowledgement an idle relay records it).
        record_every: Entries acknowledged that are recorded at once.

    Published entries not yet recorded (what a restart would send again) are kept
    under ``in_flight * batch``: reading waits while recording lags that far behind
    (a store that cannot record for a while).
    """

    batch: int = 512
    in_flight: int = 8
    stop_timeout: float = 5.0
    record_interval: float = 0.5
    record_every: int = 512

    def __post_init__(self) -> None:
        if self.batch < 1 or self.in_flight < 1 or self.record_every < 1:
            raise ValueError("batch, in_flight and record_every must be >= 1")


_DEFAULT_OPTIONS = RelayOptions()


class OutboxRelay(StartStop):
    """Publishes committed outbox entries in commit order (an async context manager).

    One loop reads committed entries and hands them to the publisher, at most
    ``in_flight`` reads ahead of the acknowledgements. Each read's acknowledgement is
    taken by a done callback, in read order, and the position acknowledged is recorded
    as published at most every ``record_interval`` seconds or ``record_every`` entries
    (and ``record_interval`` after the last one when idle), one record at a time.

    Args:
        store: The task store holding the outbox.
        sink: The publisher.
        options: How much it reads and keeps in flight, and how it records and stops.
        hold: Test-only pause (:data:`OutboxHold`).
    """

    def __init__(
        self,
        store: TaskStore,
        sink: OutboxSink,
        *,
        options: RelayOptions = _DEFAULT_OPTIONS,
        hold: OutboxHold = "",
    ) -> None:
        self._store = store
        self._sink = sink
        self._options = options
        self._hold = hold
        # (position before, position, entries, envelopes, acknowledged) of each read
        # handed to the sink, in read order, until its acknowledgement is taken.
        self._in_flight: deque[tuple[int, int, int, int, asyncio.Future[None]]] = deque()
        self._room = asyncio.Event()  # set while the reader may hand over another read
        self._room.set()
        # Entries acknowledged and not yet recorded (the running record's included).
        self._unrecorded = 0
        # (position, entries) acknowledged and not yet recorded.
        self._acknowledged: tuple[int, int] | None = None
        self._recording: asyncio.Task[None] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._last_record = 0.0
        self._sink_closed = False
        self._reader: asyncio.Task[None] | None = None  # the current reader, while started
        # Every reader task not yet ended: one replaced by _read_again may still finish a
        # step (a cancellation can be lost), but it hands nothing over once its
        # generation is not the current one.
        self._readers: set[asyncio.Task[None]] = set()
        self._generation = 0
        self._reread_backoff = Backoff(initial=1.0, maximum=30.0)
        self.published = 0
        """Envelopes acknowledged by JetStream since start (copies of earlier ones too)."""

    async def start(self) -> None:
        """Start relaying (what an earlier process left unpublished goes first)."""
        if self._reader is not None:
            return
        self._last_record = asyncio.get_running_loop().time()
        self._start_reader(0)

    async def stop(self) -> None:
        """Stop reading, record what is in flight once acknowledged (up to the timeout).

        What is not recorded as published by then is sent again after a restart.
        """
        if self._reader is None:
            return
        self._reader = None
        self._generation += 1  # a reader that outlives its cancellation hands nothing over
        self._room.set()  # ... and does not wait for room to do so
        await cancel_and_wait(list(self._readers), suppress=(Exception,))
        try:
            async with asyncio.timeout(self._options.stop_timeout):
                while self._in_flight and not self._sink_closed:
                    await asyncio.wait([future for *_, future in self._in_flight])
                    await asyncio.sleep(0)  # the done callbacks run first: _taken
                if self._recording is not None:
                    await self._recording
                if self._acknowledged is not None:
                    await self._record(*self._take())
        except TimeoutError:
            logger.info("outbox: stopping with events not yet acknowledged; sent after restart")
        except Exception:
            logger.exception("outbox: recording failed while stopping")
        finally:
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            await cancel_and_wait([self._recording], suppress=(Exception,))

    def _start_reader(self, after: int, delay: float = 0.0) -> None:
        self._generation += 1
        reader = asyncio.get_running_loop().create_task(
            self._read(self._generation, after, delay), name="outbox-read"
        )
        self._readers.add(reader)
        reader.add_done_callback(self._readers.discard)
        self._reader = reader

    async def _read(self, generation: int, after: int, delay: float) -> None:
        if self._hold == "publish":
            logger.warning("outbox: relay held (test setting): nothing is published")
            await asyncio.Event().wait()
        backoff = Backoff(initial=0.1, maximum=5.0)
        refused = Backoff(initial=0.1, maximum=5.0)
        if delay:
            await asyncio.sleep(delay)
        while generation == self._generation:
            try:
                items = await self._store.outbox_next(after, limit=self._options.batch)
            except Exception as exc:  # the relay outlives any one failure
                logger.warning("outbox: reading failed (%s); retrying", exc)
                await asyncio.sleep(backoff.next_delay())
                continue
            backoff.reset()
            events: list[events_pb2.Event] = []
            for item in items:
                try:
                    events.extend(unpack(item.entry))
                except ValueError as exc:
                    logger.error("outbox: entry at %d skipped: %s", item.position, exc)
            while generation == self._generation and not self._may_read():
                self._room.clear()
                await self._room.wait()
            if generation != self._generation:
                return
            try:
                future = self._sink.send(events)
            except Exception:  # a bug in the publisher: the same entries again, later
                logger.exception("outbox: the publisher did not take %d event(s)", len(events))
                await asyncio.sleep(refused.next_delay())
                continue
            refused.reset()
            before, after = after, items[-1].position
            self._in_flight.append((before, after, len(items), len(events), future))
            future.add_done_callback(self._taken)

    def _taken(self, _: asyncio.Future[None]) -> None:
        """Take the acknowledgements that came, in read order (a done callback)."""
        in_flight = self._in_flight
        while in_flight and in_flight[0][4].done():
            before, position, entries, count, future = in_flight.popleft()
            if future.cancelled():
                # The publisher closed: the rest goes out after a restart.
                self._sink_closed = True
                in_flight.clear()
                break
            if future.exception() is not None:
                # Not stored (a publisher outside its contract): this read and every one
                # after it are read and sent again; copies stored meanwhile are dropped by
                # JetStream (Nats-Msg-Id).
                logger.error("outbox: publishing failed (%r); sending again", future.exception())
                in_flight.clear()
                self._read_again(before)
                break
            self.published += count
            self._reread_backoff.reset()
            if self._hold == "mark":
                continue
            earlier = self._acknowledged[1] if self._acknowledged is not None else 0
            self._acknowledged = (position, entries + earlier)
            self._unrecorded += entries
        if self._may_read():
            self._room.set()
        self._schedule_record()

    def _read_again(self, after: int) -> None:
        """Restart reading after ``after`` (what the reader holds is read again)."""
        if self._reader is None:
            return  # stopping: what is not recorded goes out after a restart
        self._reader.cancel()
        self._start_reader(after, self._reread_backoff.next_delay())

    def _may_read(self) -> bool:
        """Whether another read may go out: few enough in flight, recording not far behind."""
        options = self._options
        return (
            len(self._in_flight) < options.in_flight
            and self._unrecorded < options.in_flight * options.batch
        )

    def _schedule_record(self) -> None:
        # Throttled (the JetStream store writes a KV entry per record); a crash sends
        # again what was not recorded, and Nats-Msg-Id makes that harmless.
        if self._acknowledged is None or self._recording is not None or self._reader is None:
            return
        loop = asyncio.get_running_loop()
        wait = self._options.record_interval - (loop.time() - self._last_record)
        if self._acknowledged[1] >= self._options.record_every or wait <= 0:
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            self._recording = loop.create_task(self._record(*self._take()), name="outbox-mark")
            self._recording.add_done_callback(self._recorded)
        elif self._timer is None:
            self._timer = loop.call_later(wait, self._timed)

    def _take(self) -> tuple[int, int]:
        assert self._acknowledged is not None
        taken, self._acknowledged = self._acknowledged, None
        return taken

    def _timed(self) -> None:
        self._timer = None
        self._schedule_record()

    def _recorded(self, _: asyncio.Task[None]) -> None:
        self._recording = None
        self._last_record = asyncio.get_running_loop().time()
        if self._may_read():
            self._room.set()
        self._schedule_record()

    async def _record(self, position: int, entries: int) -> None:
        backoff = Backoff(initial=0.1, maximum=5.0)
        while True:
            try:
                await self._store.outbox_done(position)
                metrics.OUTBOX_RELAYED.inc(entries)
                self._unrecorded -= entries
                return
            except Exception as exc:  # the relay outlives any one failure
                logger.warning("outbox: recording position %d failed (%s)", position, exc)
                await asyncio.sleep(backoff.next_delay())
