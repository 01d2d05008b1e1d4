"""Each task's event journal: numbered, stored, then fanned out and published.

A task is stored durably before ``submit`` answers. From then on every change is an
event with the task's next sequence number (1, 2, 3... without gaps), written to
the store and, once committed, fanned out to every watcher. Every event is also
published on NATS with the same sequence: with a NATS publisher, through the outbox
(``outbox.py``), whose entry commits with the event, so a crash between the commit
and the publish loses nothing.
Watchers read committed events only, so what a client has seen is never lost or
renumbered by a crash: a client that reconnects with ``after_sequence`` gets each
event exactly once, in order.

A plan is a task like any other here: its step events are events of its own
journal, so following a plan is following one task.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import OrderedDict
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Collection, Iterator, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Protocol, TypedDict, Unpack

from google.protobuf.message import Message

from hivewire.common.v1 import common_pb2
from hivewire.coordinator.v1 import coordinator_pb2
from hivewire.events.v1 import events_pb2
from hivewire.services.coordinator import convert, metrics
from hivewire.services.coordinator.attempts import Attempt
from hivewire.services.coordinator.model import TaskRecord, now_ns
from hivewire.services.coordinator.outbox import OutboxSink, event_id, outbox_sink, pack
from hivewire.services.coordinator.store import TERMINAL_STATES, EventRow, StoreError, TaskStore
from hivewire.services.runtime import partials, tracing
from hivewire.services.runtime.errors import Unavailable
from hivewire.services.runtime.events.envelope import (
    EventFields,
    build_event,
    build_traced_event,
)
from hivewire.services.runtime.eventsink import EventSink, NullSink

logger = logging.getLogger(__name__)

__all__ = [
    "EventListener",
    "CoordinatorEvents",
    "Ending",
    "Journal",
    "NullPublisher",
    "TaskRuntime",
    "TaskTable",
]

TaskEvent = coordinator_pb2.TaskEvent

CoordinatorEvents = EventSink[
    events_pb2.TaskEventData
    | events_pb2.WorkflowEventData
    | events_pb2.ProjectEventData
    | events_pb2.AgentEventData
]
"""Where the coordinator's events go besides the store (NATS in production)."""

NullPublisher = NullSink
"""An :class:`CoordinatorEvents` that drops everything (events off)."""

EventData = events_pb2.TaskEventData | events_pb2.WorkflowEventData

_EVENT_PAGE = 500

EVENTS_KEPT = 1000
"""Committed events of a task kept in memory for its watchers (at most twice as many
before the oldest go): a task that runs for months with an agent streaming progress
must not hold every event it ever had. Older ones are read from the store."""

EVENT_COPY_MAX = 64 * 1024
"""Bytes of a gRPC event copied whole into its NATS event (larger: payloads left out)."""

#: Called with a task and each event once it has committed (plans follow their steps).
EventListener = Callable[["TaskRuntime", TaskEvent], None]

#: A ``workflow.*`` event reporting a task event: published with it, never before it.
Report = tuple[str, events_pb2.WorkflowEventData]


class Ending(TypedDict, total=False):
    """What a task ends with besides its state and reason (``Coordinator.finish``).

    Attributes:
        output: The result of a task that succeeded.
        error: Why it failed, was cancelled or dead-lettered.
        reports: Published with its last event (``workflow.completed``...).
    """

    output: common_pb2.Payload | None
    error: common_pb2.ErrorDetail | None
    reports: Sequence[Report]


class EventKind(TypedDict, total=False):
    """The one ``TaskEvent.kind`` field an event carries (``Journal.emit``)."""

    snapshot: coordinator_pb2.Task
    state_changed: coordinator_pb2.StateChange
    progress: common_pb2.Progress
    partial: common_pb2.PartialResult
    input_required: common_pb2.InputRequest
    activity: common_pb2.Activity
    retry: coordinator_pb2.TaskRetry
    finished: coordinator_pb2.TaskFinished
    step: coordinator_pb2.StepEvent


#: The NATS type of each ``TaskEvent`` kind when the emitter names none.
_KIND_TYPES = {
    "state_changed": "task.state_changed",
    "progress": "task.progress",
    "partial": "task.partial",
    "input_required": "task.input_required",
    "activity": "task.activity",
    "retry": "task.retried",
    "step": "task.step",
}


class RemoteEvents(Protocol):
    """Events of tasks another coordinator runs (cluster.py, on the JetStream store)."""

    def follow_events(self, task_id: str, after: int) -> AsyncGenerator[EventRow | None, None]:
        """Stored events after ``after``, then each new one; None now and then when idle."""
        ...


class TaskRuntime:
    """In-memory state of one unfinished (or recently finished) task.

    Attributes:
        record: The task's state.
        spec_bytes: Its serialized spec (written once).
        events: Its events not yet evicted; ``events[i]`` has sequence ``base + 1 + i``.
        committed: The highest sequence the store has committed.
        uncommitted: Bytes of its events stored but not committed yet (what
            :meth:`Journal.catch_up` waits on).
        attempt: The running attempt, if any.
        avoid: Agents a retry should not go to.
    """

    def __init__(self, record: TaskRecord, spec_bytes: bytes) -> None:
        self.record = record
        self.spec_bytes = spec_bytes
        # events[i] has sequence base + 1 + i; older events are only in the store.
        self.base = record.last_sequence
        self.events: list[TaskEvent] = []
        self.committed = record.last_sequence
        self.uncommitted = 0
        self.attempt: Attempt | None = None
        self.enqueued_at = record.created_ns / 1e9
        self.queued_mono = 0.0
        # Made on first use: a waiting task holds as few objects as it can (100,000 of
        # them are walked by every full collection of the garbage collector).
        self._avoid: set[str] | None = None
        self._waiters: list[asyncio.Future[None]] | None = None

    @property
    def avoid(self) -> Collection[str]:
        """Agents a retry should not go to."""
        return self._avoid if self._avoid is not None else ()

    def avoid_agent(self, agent_id: str) -> None:
        """Send later attempts elsewhere than ``agent_id`` while others fit."""
        if self._avoid is None:
            self._avoid = set()
        self._avoid.add(agent_id)

    @property
    def watching(self) -> int:
        """Watchers waiting for the next event now."""
        return len(self._waiters) if self._waiters is not None else 0

    def notify(self) -> None:
        """Wake every watcher waiting for the next event."""
        waiters, self._waiters = self._waiters, None
        for waiter in waiters or ():
            if not waiter.done():
                waiter.set_result(None)

    async def changed(self) -> None:
        """Wait for the next committed event (or a shutdown)."""
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if self._waiters is None:
            self._waiters = []
        self._waiters.append(waiter)
        try:
            await waiter
        finally:
            waiters = self._waiters
            if waiters is not None and waiter in waiters:
                waiters.remove(waiter)
                if not waiters:
                    self._waiters = None

    @property
    def settled(self) -> bool:
        """Finished and every event committed: nothing more will happen."""
        return self.record.terminal and self.committed >= self.record.last_sequence


class TaskTable:
    """The tasks the coordinator holds in memory: every active one, and recent finished ones.

    Args:
        finished_cache_size: How many finished tasks stay in memory for fast reads.
        on_evict: Called with a finished task when it leaves memory.
    """

    def __init__(
        self, *, finished_cache_size: int, on_evict: Callable[[TaskRuntime], None]
    ) -> None:
        self.active: dict[str, TaskRuntime] = {}
        self._finished: OrderedDict[str, TaskRuntime] = OrderedDict()
        self._cache_size = finished_cache_size
        self._on_evict = on_evict

    @property
    def finished_count(self) -> int:
        """Finished tasks held in memory (at most ``finished_cache_size``)."""
        return len(self._finished)

    def get(self, task_id: str) -> TaskRuntime | None:
        """The task's runtime, active or recently finished, or None."""
        rt = self.active.get(task_id)
        if rt is None:
            rt = self._finished.get(task_id)
            if rt is not None:
                self._finished.move_to_end(task_id)
        return rt

    def add(self, rt: TaskRuntime) -> None:
        """Hold a new or recovered active task."""
        self.active[rt.record.task_id] = rt

    def retire(self, rt: TaskRuntime) -> None:
        """Move a task that just finished from the active set to the finished cache."""
        self.active.pop(rt.record.task_id, None)
        if self._cache_size:
            self._finished[rt.record.task_id] = rt
            while len(self._finished) > self._cache_size:
                self._on_evict(self._finished.popitem(last=False)[1])
        else:
            self._on_evict(rt)

    def drop(self, task_id: str) -> TaskRuntime | None:
        """Drop an active task from memory (another coordinator took it over)."""
        return self.active.pop(task_id, None)

    def discard(self, task_id: str) -> TaskRuntime | None:
        """Drop a finished task from memory (it was deleted from the store)."""
        return self._finished.pop(task_id, None)

    def everything(self) -> Iterator[TaskRuntime]:
        """Every task in memory, active first."""
        yield from list(self.active.values())
        yield from list(self._finished.values())


class Journal:
    """Appends events to tasks' journals and serves them to watchers.

    Args:
        store: The durable store.
        tasks: The tasks in memory.
        events: Where events are published once committed.
    """

    def __init__(self, store: TaskStore, tasks: TaskTable, events: CoordinatorEvents) -> None:
        self._store = store
        self._tasks = tasks
        self._events = events
        self._listeners: list[EventListener] = []
        self.closing = False
        #: Where events of tasks other coordinators run are followed (None: alone).
        self.remote: RemoteEvents | None = None
        # Where task events go: the outbox (a NATS publisher that is on), nowhere (events
        # off), or straight to ``events.publish`` once committed (any other sink).
        self._outbox = outbox_sink(events)
        self._direct = not isinstance(events, NullSink | OutboxSink)
        # Tasks whose latest partial event is not committed yet, by task id.
        self._partials: dict[str, _PartialStream] = {}

    @property
    def outbox(self) -> OutboxSink | None:
        """The publisher events reach through the outbox, None when they do not."""
        return self._outbox

    def listen(self, listener: EventListener) -> None:
        """Call ``listener`` with every event once it has committed."""
        self._listeners.append(listener)

    def emit(
        self,
        rt: TaskRuntime,
        *,
        publish: str | None = None,
        publish_extra: dict[str, Message] | None = None,
        reports: Sequence[Report] = (),
        write_row: bool = True,
        **kind: Unpack[EventKind],
    ) -> asyncio.Future[None]:
        """Append the task's next event: store it, then fan it out once committed.

        Every event is published on NATS; with an outbox its envelopes commit with it.

        Args:
            rt: The task.
            publish: Its ``task.*`` type on NATS when not the kind's own
                (``task.created``, ``task.completed``...).
            publish_extra: Extra fields of the published ``TaskEventData``.
            reports: ``workflow.*`` events reporting this one, published right after it.
            write_row: Also store the task's row (False for events that change no
                stored field, such as partials).
            kind: The event's one ``TaskEvent.kind`` field (an agent's partial result
                goes through :meth:`partial`).

        Returns:
            The commit future.
        """
        if self._partials and "partial" not in kind:
            # Partial results still waiting (see partial) go first: the agent's order.
            self._flush_partials(rt)
        record = rt.record
        record.last_sequence += 1
        stamp = now_ns()
        record.updated_ns = stamp
        event = TaskEvent(
            task_id=record.task_id,
            sequence=record.last_sequence,
            time=convert.timestamp_ns(stamp),
            attempt=record.attempt,
            **kind,
        )
        rt.events.append(event)
        rows = [convert.record_to_row(record, rt.spec_bytes)] if write_row else []
        published: list[tuple[str, EventData, str]] = []
        if self._outbox is not None or self._direct:
            data = task_event_data(record, publish_extra or {})
            copy_event(data, event)
            published.append((publish or _KIND_TYPES[next(iter(kind))], data, ""))
            published.extend((event_type, report, event_type) for event_type, report in reports)
        outbox = b""
        if self._outbox is not None:
            outbox = self._envelopes(
                record, event.sequence, stamp, published, traced="partial" not in kind
            )
            published = []
            metrics.OUTBOX_WRITTEN.inc()
        stored = event.SerializeToString()
        size = len(stored) + len(outbox)
        rt.uncommitted += size
        future = self._store.put(
            tasks=rows, events=[EventRow(record.task_id, event.sequence, stored, outbox=outbox)]
        )
        future.add_done_callback(partial(self._committed, rt, event, published, size))
        return future

    async def catch_up(self, rt: TaskRuntime, backlog: int) -> None:
        """Wait until at most ``backlog`` bytes of the task's events are uncommitted.

        An attempt waits here before it takes the agent's next message, so an agent
        that writes faster than the store commits is held back by its stream's flow
        control (docs/coordinator.md, Agent links) instead of filling memory.
        """
        while rt.uncommitted > backlog:
            await rt.changed()

    def partial(self, rt: TaskRuntime, chunk: common_pb2.PartialResult) -> None:
        """Append a partial result of the task's running attempt.

        Stored at once, unless the task's previous partial event is still being
        committed: then it waits for that commit (never longer) together with the
        chunks that arrive meanwhile, and those that continue each other
        (:mod:`hivewire.services.runtime.partials`) become one event. An event of any
        other kind sends what waits first, so the order is the agent's.
        """
        task_id = rt.record.task_id
        stream = self._partials.get(task_id)
        if stream is None:
            self._send_partials(rt, [chunk])
            return
        held = stream.held
        if held and not (
            partials.continues(held[0], held[-1], chunk, _content_key)
            and stream.size + _size(chunk) <= partials.COALESCE_MAX
        ):
            # It cannot join what waits: that goes now, and this one waits behind it.
            self._send_partials(rt, held)
            stream = self._partials[task_id]
        stream.held.append(chunk)
        stream.size += _size(chunk)

    def _send_partials(self, rt: TaskRuntime, run: list[common_pb2.PartialResult]) -> None:
        if len(run) > 1:
            metrics.PARTIALS_JOINED.inc(len(run) - 1)
        future = self.emit(rt, write_row=False, partial=_joined(run))
        stream = _PartialStream()
        self._partials[rt.record.task_id] = stream
        future.add_done_callback(partial(self._partial_committed, rt, stream))

    def _partial_committed(
        self, rt: TaskRuntime, stream: _PartialStream, _future: asyncio.Future[None]
    ) -> None:
        task_id = rt.record.task_id
        if self._partials.get(task_id) is not stream:
            return  # what waited behind it went already (another event came)
        if not stream.held:
            del self._partials[task_id]
            return
        try:
            self._send_partials(rt, stream.held)
        except StoreError as exc:
            # The store closed under a stopping coordinator: the attempt did not end
            # here, so a later one (or a takeover) runs the task again.
            del self._partials[task_id]
            logger.warning("partial results of task %s not stored: %s", task_id, exc)

    def _flush_partials(self, rt: TaskRuntime) -> None:
        """Send the task's waiting partial chunks now (an event of another kind comes)."""
        stream = self._partials.get(rt.record.task_id)
        if stream is not None and stream.held:
            self._send_partials(rt, stream.held)

    def _envelopes(
        self,
        record: TaskRecord,
        sequence: int,
        stamp: int,
        published: list[tuple[str, EventData, str]],
        *,
        traced: bool = True,
    ) -> bytes:
        """The outbox entry of an event: its envelopes, with deterministic ids.

        ``traced=False`` (partial output: one event per token, thousands per task)
        builds them without a PRODUCER span each; they carry the task's own
        ``traceparent``, so consumers still join the task's trace. So does every
        event while no span goes anywhere (``tracing.spans_kept``: no exporter): a
        span made only to be dropped was a sixth of the coordinator's CPU per task at
        c=1 (docs/performance.md, "One task at c=1").
        """
        assert self._outbox is not None
        source = self._outbox.source

        def fields(data: EventData, suffix: str) -> EventFields:
            return EventFields(
                source=source,
                subject=record.task_id,
                data=data,
                task_sequence=sequence,
                correlation_id=record.correlation_id or None,
                event_id=event_id(record.task_id, sequence, suffix),
                time_ns=stamp,
            )

        if not traced or not tracing.spans_kept():
            traceparent = record.spec.metadata.traceparent
            return pack(
                [
                    build_event(event_type, traceparent=traceparent, **fields(data, suffix))
                    for event_type, data, suffix in published
                ]
            )
        # Events of the task belong to its trace, whoever emitted them.
        parent = tracing.resume_context(record.spec.metadata)
        return pack(
            [
                build_traced_event(event_type, parent=parent, **fields(data, suffix))[0]
                for event_type, data, suffix in published
            ]
        )

    def publish(
        self,
        event_type: str,
        data: events_pb2.WorkflowEventData | events_pb2.ProjectEventData,
        *,
        subject: str,
        sequence: int = 0,
        correlation_id: str = "",
        trace: common_pb2.RequestMetadata | None = None,
    ) -> None:
        """Publish a workflow or project event (call it once what it reports committed).

        ``trace`` is the metadata of the task the event is about: the publish joins its
        trace.
        """
        try:
            with tracing.resumed(trace) if trace is not None else contextlib.nullcontext():
                self._events.publish(
                    event_type,
                    subject=subject,
                    data=data,
                    task_sequence=sequence,
                    correlation_id=correlation_id or None,
                )
        except Exception:
            logger.exception("publishing %s failed", event_type)

    def _committed(
        self,
        rt: TaskRuntime,
        event: TaskEvent,
        published: list[tuple[str, EventData, str]],
        size: int,
        future: asyncio.Future[None],
    ) -> None:
        rt.uncommitted -= size
        sequence = event.sequence
        if not future.cancelled() and future.exception() is not None:
            logger.error(
                "event %d of task %s was not stored: %s",
                sequence,
                rt.record.task_id,
                future.exception(),
            )
        if sequence > rt.committed:
            rt.committed = sequence
            if len(rt.events) > 2 * EVENTS_KEPT:
                evicted = min(len(rt.events) - EVENTS_KEPT, rt.committed - rt.base)
                del rt.events[:evicted]
                rt.base += evicted
        rt.notify()
        for event_type, data, _ in published:
            # Without an outbox (a sink of another kind): straight to it, once committed.
            try:
                with tracing.resumed(rt.record.spec.metadata):
                    self._events.publish(
                        event_type,
                        subject=rt.record.task_id,
                        data=data,
                        task_sequence=sequence,
                        correlation_id=rt.record.correlation_id or None,
                    )
            except Exception:
                logger.exception("publishing %s failed", event_type)
        for listener in self._listeners:
            try:
                listener(rt, event)
            except Exception:
                logger.exception("event listener failed on task %s", rt.record.task_id)

    # -- reading ---------------------------------------------------------------------

    def snapshot(self, record: TaskRecord) -> TaskEvent:
        """A snapshot event of a task (never stored; sequence = its last sequence)."""
        return TaskEvent(
            task_id=record.task_id,
            sequence=record.last_sequence,
            time=convert.timestamp_ns(now_ns()),
            attempt=record.attempt,
            snapshot=convert.task_to_proto(record),
        )

    def follow(
        self,
        task_id: str,
        after: int,
        *,
        first: TaskEvent | None = None,
        outcome_only: bool = False,
    ) -> AsyncIterator[TaskEvent]:
        """A task's committed events after ``after``, then live ones until its last.

        ``first`` (a snapshot) comes before them. With ``outcome_only`` only the snapshot,
        the events that involve the caller (``input_required`` and every change out of
        ``INPUT_REQUIRED``) and the last one (``finished``) are passed on: a
        client that wants the outcome is sent two messages for a task that asks nothing,
        not one per event (each costs both ends about a bare call's CPU,
        docs/performance.md).
        """
        events = self._follow(task_id, after, first)
        return _outcome(events) if outcome_only else events

    async def _follow(
        self, task_id: str, after: int, first: TaskEvent | None
    ) -> AsyncGenerator[TaskEvent, None]:
        metrics.WATCHERS.inc()
        try:
            if first is not None:
                yield first
                # A stream can last hours: it does not keep its snapshot (a whole task).
                first = None
            last = after
            while True:
                if self.closing:
                    raise Unavailable(
                        "coordinator is shutting down; resume with WatchTask", retry_after=1.0
                    )
                rt = self._tasks.get(task_id)
                if rt is None and self.remote is not None:
                    stored_row = await self._store.get_task(task_id)
                    if stored_row is not None and stored_row.state not in TERMINAL_STATES:
                        # Another coordinator runs it: follow its journal as it grows.
                        async for stored in self._follow_remote(task_id, last):
                            event = TaskEvent.FromString(stored.data)
                            yield event
                            last = event.sequence
                            if event.HasField("finished"):
                                return
                        continue
                if rt is None:
                    # Finished and no longer in memory: the store has every event.
                    rows = await self._store.events_after(task_id, last, limit=_EVENT_PAGE)
                    if not rows:
                        return
                    for row in rows:
                        yield TaskEvent.FromString(row.data)
                        last = row.sequence
                    continue
                if rt.committed > last:
                    for event in await self._committed_events(rt, last):
                        yield event
                        last = event.sequence
                    continue
                if rt.settled:
                    return
                await rt.changed()
        finally:
            metrics.WATCHERS.dec()

    async def _follow_remote(self, task_id: str, after: int) -> AsyncIterator[EventRow]:
        """Events another coordinator stores, until this coordinator closes or runs the
        task itself (a takeover: then the local path goes on from the last one).
        """
        assert self.remote is not None
        events = self.remote.follow_events(task_id, after)
        try:
            async for stored in events:
                if stored is not None:
                    yield stored
                if self.closing or self._tasks.get(task_id) is not None:
                    return
        finally:
            await events.aclose()

    async def _committed_events(self, rt: TaskRuntime, after: int) -> list[TaskEvent]:
        upto = rt.committed
        if after >= rt.base:
            return rt.events[after - rt.base : upto - rt.base]
        rows = await self._store.events_after(
            rt.record.task_id, after, until=min(rt.base, upto), limit=_EVENT_PAGE
        )
        return [TaskEvent.FromString(row.data) for row in rows]


def _for_outcome(event: TaskEvent) -> bool:
    """Whether an ``outcome_only`` stream passes ``event`` on.

    The snapshot (never stored, so only ever a stream's first), the requests for input,
    every change out of ``INPUT_REQUIRED`` (the input answered, or the request withdrawn
    by a retry, a cancel or the deadline: a stream replayed later tells a request still
    open from one that is not) and the end.
    """
    kind = event.WhichOneof("kind")
    if kind == "state_changed":
        return event.state_changed.from_state == common_pb2.TASK_STATE_INPUT_REQUIRED
    return kind in ("snapshot", "input_required", "finished")


async def _outcome(events: AsyncGenerator[TaskEvent, None]) -> AsyncGenerator[TaskEvent, None]:
    """``events`` without those a caller waiting for the outcome has no use for."""
    try:
        async for event in events:
            if _for_outcome(event):
                yield event
            del event  # not held while the stream waits (the first is a whole task)
    finally:
        await events.aclose()


def copy_event(data: events_pb2.TaskEventData, event: TaskEvent) -> None:
    """Put the gRPC event in its NATS data, without its payloads when it is large.

    A task's output or an agent's partial can be megabytes; an event on NATS stays
    under :data:`EVENT_COPY_MAX` (NATS refuses messages over its ``max_payload``, 1 MiB
    by default, and one refused event would hold up every later one).
    """
    data.event.CopyFrom(event)
    if data.event.ByteSize() <= EVENT_COPY_MAX:
        return
    copied = data.event
    kind = copied.WhichOneof("kind")
    if kind == "finished":
        copied.finished.ClearField("output")
    elif kind == "partial":
        copied.partial.ClearField("content")
    elif kind == "step":
        copied.step.ClearField("output")
        copied.step.ClearField("partial")
    data.event_payloads_omitted = True
    if copied.ByteSize() > EVENT_COPY_MAX:
        # Something else is huge (an error message): only the position is kept.
        data.event.CopyFrom(
            TaskEvent(task_id=event.task_id, sequence=event.sequence, attempt=event.attempt)
        )


def task_event_data(record: TaskRecord, extra: dict[str, Message]) -> events_pb2.TaskEventData:
    """The ``TaskEventData`` of a task as it is now."""
    data = events_pb2.TaskEventData(
        task_id=record.task_id,
        state=record.state,
        capability=record.capability,
        priority=record.priority,
        agent_id=record.agent_id,
        attempt=record.attempt,
        owner=record.owner,
    )
    convert.copy_present(
        data,
        progress=record.progress,
        error=record.error,
        usage=record.usage if record.terminal else None,
        input_request=record.pending_input,
    )
    convert.copy_present(data, **extra)
    return data


@dataclass
class _PartialStream:
    """The chunks held behind a task's latest partial event while it commits."""

    held: list[common_pb2.PartialResult] = field(default_factory=list)
    size: int = 0


def _content_key(chunk: common_pb2.PartialResult) -> partials.ContentKey | None:
    content = chunk.content
    return partials.content_key(
        content.text, content.data, content.content_type, has_json=content.HasField("json")
    )


def _size(chunk: common_pb2.PartialResult) -> int:
    return len(chunk.content.text) + len(chunk.content.data)


def _joined(run: list[common_pb2.PartialResult]) -> common_pb2.PartialResult:
    """One chunk for a run that :func:`partials.continues` allows to join."""
    if len(run) == 1:
        return run[0]
    head = run[0]
    content = common_pb2.Payload(content_type=head.content.content_type)
    if head.content.data:
        content.data = b"".join(c.content.data for c in run)
    else:
        content.text = "".join(c.content.text for c in run)
    return common_pb2.PartialResult(
        artifact_id=head.artifact_id,
        content=content,
        append=head.append,
        last_chunk=run[-1].last_chunk,
        name=head.name,
    )
