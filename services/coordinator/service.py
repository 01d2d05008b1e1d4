"""The coordinator's domain: task lifecycle, scheduling, retries, event streams, sessions.

A task is stored durably before ``submit`` answers. From then on every change is an
event with the task's next sequence number (1, 2, 3... without gaps), written to
the store and, once committed, fanned out to every watcher and published on NATS.
Watchers read committed events only, so what a client has seen is never lost or
renumbered by a crash: a client that reconnects with ``after_sequence`` gets each
event exactly once, in order.

Lifecycle::

    QUEUED -> ASSIGNED -> RUNNING <-> INPUT_REQUIRED
       ^                     |
       +---- retry ----------+--> SUCCEEDED | FAILED | CANCELLED | DEAD_LETTERED

The scheduler takes the best queued task (see :mod:`.queue`) whose capability has a
free agent (see :mod:`.dispatch`) and runs one attempt: an ``Execute`` stream with
the task's deadline. A retryable failure queues the task again after a jittered
exponential backoff, on another agent when one fits; when ``max_attempts`` attempts
failed it is dead-lettered. A permanent failure fails it at once; the deadline fails
it with ``DEADLINE_EXCEEDED`` wherever it is.

After a restart, queued tasks are queued again and tasks that were assigned or
running are queued as a new attempt (the interrupted attempt does not count against
``max_attempts``).
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import hashlib
import heapq
import itertools
import logging
import random
import re
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator, Coroutine, Iterable
from dataclasses import dataclass, field
from functools import partial
from types import TracebackType
from typing import Any, Self

from google.protobuf.message import Message

from hivewire.agent.v1 import agent_pb2
from hivewire.common.v1 import common_pb2
from hivewire.coordinator.v1 import coordinator_pb2
from hivewire.events.v1 import events_pb2
from hivewire.services.coordinator import convert, metrics
from hivewire.services.coordinator.approvals import endorse
from hivewire.services.coordinator.dispatch import (
    AgentLease,
    AgentPool,
    AttemptError,
    ExecuteStream,
    Verdict,
)
from hivewire.services.coordinator.model import (
    ACTIVE_DISPATCH_STATES,
    ASSIGNED,
    CANCELLED,
    DEAD_LETTERED,
    FAILED,
    INPUT_REQUIRED,
    QUEUED,
    RUNNING,
    SUCCEEDED,
    AgentView,
    Caller,
    TaskRecord,
    now_ns,
    state_name,
)
from hivewire.services.coordinator.queue import QueueEntry, TaskQueue
from hivewire.services.coordinator.quotas import Quotas
from hivewire.services.coordinator.settings import CoordinatorSettings
from hivewire.services.coordinator.store import EventRow, TaskQuery, TaskStore
from hivewire.services.runtime import metadata as md
from hivewire.services.runtime.errors import (
    FailedPrecondition,
    FieldViolation,
    HivewireError,
    Internal,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    Unauthenticated,
    Unavailable,
    Unimplemented,
)
from hivewire.services.runtime.eventsink import EventSink, NullSink
from hivewire.services.runtime.grants import ApprovalSigner
from hivewire.services.runtime.logging import bind_task, new_correlation_id

logger = logging.getLogger(__name__)

__all__ = ["Coordinator", "EventPublisher", "NullPublisher"]

TaskEvent = coordinator_pb2.TaskEvent

_CAPABILITY_RE = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")
_MAX_IDEMPOTENCY_KEY = 256
_MAX_LABELS = 64
_MAX_LABEL_KEY = 63
_MAX_LABEL_VALUE = 256
_MAX_METADATA_FIELD = 256
_VALID_PRIORITIES = frozenset(common_pb2.Priority.values())
_VALID_STATES = frozenset(common_pb2.TaskState.values()) - {common_pb2.TASK_STATE_UNSPECIFIED}
_RESTARTED = "COORDINATOR_RESTARTED"
_UNREACHABLE = "AGENT_UNREACHABLE"
# Attempt errors that are not the task's fault and do not count against max_attempts.
_NOT_COUNTED = frozenset({_RESTARTED, _UNREACHABLE})
_EVENT_PAGE = 500

# task.* event type of each terminal state.
_FINISHED_TYPES: dict[int, str] = {
    SUCCEEDED: "task.completed",
    FAILED: "task.failed",
    CANCELLED: "task.cancelled",
    DEAD_LETTERED: "task.dead_lettered",
}


EventPublisher = EventSink[events_pb2.TaskEventData]
"""Where task events go besides the store (NATS in production)."""

NullPublisher = NullSink
"""An :class:`EventPublisher` that drops everything (events off)."""


@dataclass
class _Attempt:
    """The live part of one attempt: its agent slot, stream and task."""

    number: int
    lease: AgentLease
    stream: ExecuteStream | None = None
    task: asyncio.Task[None] | None = None
    pending: list[agent_pb2.ExecuteRequest] = field(default_factory=list)
    cancelling: bool = False
    answered: bool = False

    async def send(self, request: agent_pb2.ExecuteRequest) -> None:
        """Send to the agent, or hold until the stream is open."""
        if self.stream is None:
            self.pending.append(request)
        else:
            await self.stream.send(request)


class _Runtime:
    """In-memory state of one task: its record, recent events, waiters, attempt."""

    def __init__(self, record: TaskRecord, spec_bytes: bytes) -> None:
        self.record = record
        self.spec_bytes = spec_bytes
        # events[i] has sequence base + 1 + i; older events are only in the store.
        self.base = record.last_sequence
        self.events: list[TaskEvent] = []
        self.committed = record.last_sequence
        self.attempt: _Attempt | None = None
        self.deadline_handle: asyncio.TimerHandle | None = None
        self.avoid: set[str] = set()
        self.enqueued_at = record.created_ns / 1e9
        self.queued_mono = 0.0
        self._waiters: list[asyncio.Future[None]] = []

    def notify(self) -> None:
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    async def changed(self) -> None:
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            await waiter
        finally:
            if waiter in self._waiters:
                self._waiters.remove(waiter)

    @property
    def settled(self) -> bool:
        """Finished and every event committed: nothing more will happen."""
        return self.record.terminal and self.committed >= self.record.last_sequence


class Coordinator:
    """The coordinator's domain service (an async context manager).

    Args:
        settings: The coordinator section of the settings.
        store: The durable store (opened and closed by the caller).
        pool: The agent pool (started and stopped by the caller).
        events: Where task events are published; None turns events off.
    """

    def __init__(
        self,
        settings: CoordinatorSettings,
        *,
        store: TaskStore,
        pool: AgentPool,
        events: EventPublisher | None = None,
        approvals: ApprovalSigner | None = None,
    ) -> None:
        self.settings = settings
        self._approvals = approvals  # signs tool approvals (coordinator/approvals.py)
        self._quotas = Quotas(settings.quotas)  # per-principal limits (coordinator/quotas.py)
        self._store = store
        self._pool = pool
        self._events: EventPublisher = events or NullPublisher()
        self._queue = TaskQueue(aging_interval=settings.aging_interval)
        self._active: dict[str, _Runtime] = {}
        self._finished: OrderedDict[str, _Runtime] = OrderedDict()
        self._idempotency: dict[tuple[str, str], str] = {}
        self._delayed: list[tuple[int, int, str]] = []
        self._delay_counter = itertools.count()
        self._kick = asyncio.Event()
        self._background: set[asyncio.Task[Any]] = set()
        self._scheduler: asyncio.Task[None] | None = None
        self._running = False
        self._closing = False

    # -- lifecycle -------------------------------------------------------------------

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    def wake(self) -> None:
        """Ask the scheduler to look at the queue again (agents changed, slots freed)."""
        self._kick.set()

    async def start(self) -> None:
        """Recover unfinished tasks from the store and start scheduling."""
        self._bind_gauges()
        await self._recover()
        self._running = True
        self._scheduler = asyncio.create_task(self._schedule_loop(), name="coordinator-scheduler")
        self.wake()

    async def drain(self) -> None:
        """Begin shutting down: stop dispatching and end every open event stream.

        Streams end with ``UNAVAILABLE`` so clients resume with ``WatchTask`` against
        the next coordinator. Running attempts go on until :meth:`stop`.
        """
        self._closing = True
        if self._scheduler is not None:
            self._scheduler.cancel()
        for rt in itertools.chain(self._active.values(), self._finished.values()):
            rt.notify()

    async def stop(self) -> None:
        """Stop scheduling and cancel running attempts without changing their state.

        Tasks that were running stay so in the store: the next start dispatches them
        again as a new attempt.
        """
        await self.drain()
        self._running = False
        for rt in self._active.values():
            if rt.deadline_handle is not None:
                rt.deadline_handle.cancel()
        tasks = [t for t in (self._scheduler, *self._background) if t is not None]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._background.clear()
        with contextlib.suppress(Exception):
            await self._store.flush()

    def _spawn(self, coro: Coroutine[Any, Any, Any], name: str) -> asyncio.Task[Any]:
        task = asyncio.create_task(coro, name=name)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return task

    def _require_running(self) -> None:
        if not self._running or self._closing:
            raise Unavailable("coordinator is shutting down", retry_after=1.0)

    # -- identity --------------------------------------------------------------------

    def caller(self, identity: str | None) -> Caller:
        """The caller for a peer identity.

        Raises:
            Unauthenticated: The peer presented no SPIFFE identity.
        """
        if not identity:
            raise Unauthenticated("the client certificate carries no SPIFFE identity")
        return Caller(identity=identity, admin=identity.startswith(self.settings.admin_prefix))

    # -- submit ----------------------------------------------------------------------

    async def submit(
        self,
        spec: coordinator_pb2.TaskSpec | None,
        caller: Caller,
        *,
        correlation_id: str | None = None,
    ) -> tuple[TaskRecord, bool]:
        """Validate, store and queue a task.

        Args:
            spec: What the client asks for.
            caller: Who asks.
            correlation_id: The call's correlation id, used when the spec has none.

        Returns:
            The task and whether it is an earlier task with the same idempotency key.

        Raises:
            InvalidArgument: The spec is invalid (with field violations).
            Unimplemented: The spec carries a multi-step plan.
            Unavailable: The coordinator is shutting down.
        """
        self._require_running()
        normalized = self._validate_spec(spec, field_prefix="spec")
        key = normalized.idempotency_key
        if key:
            existing = await self._find_idempotent(caller.identity, key)
            if existing is not None:
                metrics.TASKS_DEDUPLICATED.inc()
                return existing, True
        # Per-principal quotas (quotas.py): over a limit nothing is stored.
        self._quotas.admit(
            caller.identity,
            lambda: sum(rt.record.owner == caller.identity for rt in self._active.values()),
        )
        if not normalized.metadata.correlation_id:
            normalized.metadata.correlation_id = correlation_id or new_correlation_id()
        created = now_ns()
        timeout_ns = int(convert.duration_seconds(normalized.timeout) * 1e9)
        record = TaskRecord(
            task_id=uuid.uuid4().hex,
            spec=normalized,
            owner=caller.identity,
            state=QUEUED,
            created_ns=created,
            updated_ns=created,
            deadline_ns=created + timeout_ns,
        )
        rt = _Runtime(record, normalized.SerializeToString())
        self._active[record.task_id] = rt
        if key:
            self._idempotency[(caller.identity, key)] = record.task_id
        committed = self._emit(
            rt,
            publish="task.created",
            state_changed=coordinator_pb2.StateChange(
                from_state=common_pb2.TASK_STATE_UNSPECIFIED, to_state=QUEUED, reason="submitted"
            ),
        )
        self._arm_deadline(rt)
        self._enqueue(rt)
        metrics.TASKS_SUBMITTED.inc()
        with bind_task(record.task_id):
            logger.info(
                "task accepted: %s, priority %s, deadline in %.1fs",
                record.capability,
                common_pb2.Priority.Name(normalized.priority),
                timeout_ns / 1e9,
            )
        # The answer is the task as accepted (the scheduler may move it on while the
        # commit is awaited), and it promises durability: wait for the commit.
        accepted = copy.deepcopy(record)
        await committed
        return accepted, False

    async def _find_idempotent(self, owner: str, key: str) -> TaskRecord | None:
        task_id = self._idempotency.get((owner, key))
        if task_id is None:
            row = await self._store.find_by_idempotency_key(owner, key)
            # Another submission with the key may have won while we read.
            task_id = self._idempotency.get((owner, key)) or (row.task_id if row else None)
            if task_id is None:
                return None
        rt = self._runtime(task_id)
        if rt is not None:
            return rt.record
        row = await self._store.get_task(task_id)
        return convert.record_from_row(row) if row is not None else None

    def _validate_spec(
        self, spec: coordinator_pb2.TaskSpec | None, *, field_prefix: str
    ) -> coordinator_pb2.TaskSpec:
        s = self.settings
        p = field_prefix
        if spec is None:
            raise InvalidArgument(violations=[FieldViolation(p, "required")])
        if spec.HasField("plan") and spec.plan.steps:
            raise Unimplemented(
                "multi-step plans are not supported yet: submit one task per capability",
                reason="PLANS_UNIMPLEMENTED",
            )
        violations: list[FieldViolation] = []
        if not spec.capability:
            violations.append(FieldViolation(f"{p}.capability", "required"))
        elif not _CAPABILITY_RE.match(spec.capability):
            violations.append(
                FieldViolation(
                    f"{p}.capability",
                    "must be lower-case letters, digits and dashes (at most 63 characters)",
                )
            )
        if spec.priority not in _VALID_PRIORITIES:
            violations.append(FieldViolation(f"{p}.priority", f"unknown priority {spec.priority}"))
        timeout = s.default_timeout
        if spec.HasField("timeout"):
            seconds, nanos = spec.timeout.seconds, spec.timeout.nanos
            if seconds < 0 or nanos < 0:
                violations.append(FieldViolation(f"{p}.timeout", "must not be negative"))
            elif nanos >= 1_000_000_000:
                violations.append(FieldViolation(f"{p}.timeout", "nanos out of range"))
            elif seconds == 0 and nanos == 0:
                violations.append(FieldViolation(f"{p}.timeout", "must be positive when set"))
            else:
                # Deadlines are capped, not rejected: the caller gets the maximum.
                timeout = min(seconds + nanos / 1e9, s.max_timeout)
        if spec.HasField("input"):
            size = spec.input.ByteSize()
            if size > s.max_input_bytes:
                violations.append(
                    FieldViolation(
                        f"{p}.input", f"{size} bytes exceeds the limit of {s.max_input_bytes}"
                    )
                )
            if spec.input.data and not spec.input.content_type:
                violations.append(
                    FieldViolation(f"{p}.input.content_type", "required when data is set")
                )
        if spec.max_attempts > s.max_attempts_limit:
            violations.append(
                FieldViolation(f"{p}.max_attempts", f"must be at most {s.max_attempts_limit}")
            )
        if len(spec.idempotency_key) > _MAX_IDEMPOTENCY_KEY:
            violations.append(
                FieldViolation(
                    f"{p}.idempotency_key", f"longer than {_MAX_IDEMPOTENCY_KEY} characters"
                )
            )
        if len(spec.labels) > _MAX_LABELS:
            violations.append(FieldViolation(f"{p}.labels", f"more than {_MAX_LABELS} labels"))
        for name, value in spec.labels.items():
            if not name or len(name) > _MAX_LABEL_KEY:
                violations.append(
                    FieldViolation(f"{p}.labels", f"label keys must be 1-{_MAX_LABEL_KEY} chars")
                )
            if len(value) > _MAX_LABEL_VALUE:
                violations.append(
                    FieldViolation(f"{p}.labels[{name}]", f"longer than {_MAX_LABEL_VALUE}")
                )
        meta = spec.metadata
        for attr in ("source", "user_id", "session_id", "correlation_id"):
            if len(getattr(meta, attr)) > _MAX_METADATA_FIELD:
                violations.append(
                    FieldViolation(
                        f"{p}.metadata.{attr}", f"longer than {_MAX_METADATA_FIELD} characters"
                    )
                )
        if violations:
            raise InvalidArgument(violations=violations)
        normalized = coordinator_pb2.TaskSpec()
        normalized.CopyFrom(spec)
        normalized.ClearField("plan")
        if normalized.priority == common_pb2.PRIORITY_UNSPECIFIED:
            normalized.priority = common_pb2.PRIORITY_MEDIUM
        normalized.timeout.CopyFrom(convert.duration(timeout))
        if normalized.max_attempts == 0:
            normalized.max_attempts = s.default_max_attempts
        return normalized

    # -- reads -----------------------------------------------------------------------

    def _runtime(self, task_id: str) -> _Runtime | None:
        rt = self._active.get(task_id)
        if rt is None:
            rt = self._finished.get(task_id)
            if rt is not None:
                self._finished.move_to_end(task_id)
        return rt

    async def _load(
        self, task_id: str, caller: Caller, *, field_name: str = "task_id"
    ) -> TaskRecord:
        if not task_id:
            raise InvalidArgument(violations=[FieldViolation(field_name, "required")])
        rt = self._runtime(task_id)
        if rt is not None:
            record = rt.record
        else:
            row = await self._store.get_task(task_id)
            if row is None:
                raise NotFound("task", task_id, reason="TASK_NOT_FOUND")
            record = convert.record_from_row(row)
        if not caller.may_access(record.owner):
            # Someone else's task looks like no task at all: ids are not guessable and
            # their existence is nobody else's business.
            raise NotFound("task", task_id, reason="TASK_NOT_FOUND")
        return record

    async def get(self, task_id: str, caller: Caller) -> TaskRecord:
        """A task's current state.

        Raises:
            InvalidArgument: No task id.
            NotFound: No such task visible to the caller.
        """
        return await self._load(task_id, caller)

    async def list_tasks(
        self,
        caller: Caller,
        *,
        states: Iterable[int] = (),
        capability: str = "",
        owner: str = "",
        page_size: int = 0,
        page_token: str = "",
    ) -> tuple[list[TaskRecord], str]:
        """One page of tasks, newest first.

        Non-admin callers see their own tasks only.

        Returns:
            The tasks and the token of the next page ("" on the last page).

        Raises:
            InvalidArgument: Unknown state, or a malformed page token.
            PermissionDenied: A non-admin asked for another owner's tasks.
        """
        wanted = tuple(sorted(set(states)))
        violations = [
            FieldViolation(f"states[{i}]", f"unknown or unspecified task state {value}")
            for i, value in enumerate(states)
            if value not in _VALID_STATES
        ]
        if violations:
            raise InvalidArgument(violations=violations)
        if owner and not caller.may_access(owner):
            raise PermissionDenied("only admins may list other owners' tasks")
        if not caller.admin:
            owner = caller.identity
        size = 50 if page_size <= 0 else min(page_size, 500)
        fingerprint = hashlib.sha256(repr((wanted, capability, owner)).encode()).hexdigest()[:16]
        before = convert.decode_page_token(page_token, fingerprint) if page_token else None
        # State changes are written behind; make the listing see all of them.
        await self._store.flush()
        rows = await self._store.list_tasks(
            TaskQuery(
                states=wanted, capability=capability, owner=owner, before=before, limit=size + 1
            )
        )
        more = len(rows) > size
        rows = rows[:size]
        records = []
        for row in rows:
            rt = self._runtime(row.task_id)
            records.append(rt.record if rt is not None else convert.record_from_row(row))
        token = (
            convert.encode_page_token(rows[-1].created_ns, rows[-1].task_id, fingerprint)
            if more
            else ""
        )
        return records, token

    def list_agents(self, capability: str = "") -> list[AgentView]:
        """The agents the coordinator can route to."""
        return self._pool.views(capability)

    def queue_depth(self) -> int:
        """How many tasks wait: ready for an agent, or in a retry backoff."""
        backing_off = {
            task_id
            for _, _, task_id in self._delayed
            if (rt := self._active.get(task_id)) is not None and rt.record.state == QUEUED
        }
        return len(self._queue) + len(backing_off - set(self._queue.task_ids()))

    # -- watching --------------------------------------------------------------------

    def snapshot_event(self, record: TaskRecord) -> TaskEvent:
        """A snapshot event of a task (never stored; sequence = its last sequence)."""
        return TaskEvent(
            task_id=record.task_id,
            sequence=record.last_sequence,
            time=convert.timestamp_ns(now_ns()),
            attempt=record.attempt,
            snapshot=convert.task_to_proto(record),
        )

    async def watch(
        self,
        task_id: str,
        caller: Caller,
        *,
        after_sequence: int = 0,
        include_snapshot: bool = False,
    ) -> AsyncIterator[TaskEvent]:
        """Open a task's event stream: stored events after ``after_sequence``, then live.

        Validation happens here, before the stream starts.

        Returns:
            The events, ending after the task's last event.

        Raises:
            InvalidArgument: No task id.
            NotFound: No such task visible to the caller.
        """
        record = await self._load(task_id, caller)
        snapshot = self.snapshot_event(record) if include_snapshot else None
        return self._follow(task_id, after_sequence, first=snapshot)

    async def stream(
        self,
        spec: coordinator_pb2.TaskSpec | None,
        caller: Caller,
        *,
        correlation_id: str | None = None,
    ) -> AsyncIterator[TaskEvent]:
        """Submit a task and open its event stream, starting with a snapshot."""
        record, _ = await self.submit(spec, caller, correlation_id=correlation_id)
        snapshot = self.snapshot_event(record)
        return self._follow(record.task_id, snapshot.sequence, first=snapshot)

    async def _follow(
        self, task_id: str, after: int, *, first: TaskEvent | None = None
    ) -> AsyncIterator[TaskEvent]:
        metrics.WATCHERS.inc()
        try:
            if first is not None:
                yield first
            last = after
            while True:
                if self._closing:
                    raise Unavailable(
                        "coordinator is shutting down; resume with WatchTask", retry_after=1.0
                    )
                rt = self._runtime(task_id)
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

    async def _committed_events(self, rt: _Runtime, after: int) -> list[TaskEvent]:
        upto = rt.committed
        if after >= rt.base:
            return rt.events[after - rt.base : upto - rt.base]
        rows = await self._store.events_after(
            rt.record.task_id, after, until=min(rt.base, upto), limit=_EVENT_PAGE
        )
        return [TaskEvent.FromString(row.data) for row in rows]

    # -- cancel and input ------------------------------------------------------------

    async def cancel(self, task_id: str, caller: Caller, reason: str = "") -> TaskRecord:
        """Cancel a task; cancelling a cancelled task changes nothing.

        Raises:
            NotFound: No such task visible to the caller.
            FailedPrecondition: The task already finished otherwise.
        """
        record = await self._load(task_id, caller)
        if record.state == CANCELLED:
            return record
        rt = self._active.get(task_id)
        if rt is None or record.terminal:
            raise FailedPrecondition(
                f"task {task_id} already finished ({state_name(record.state)})",
                [("TASK_STATE", f"task/{task_id}", f"task is {state_name(record.state)}")],
                reason="TASK_ALREADY_FINISHED",
            )
        error = common_pb2.ErrorDetail(
            code="CANCELLED",
            reason="CANCELLED",
            message=reason or f"cancelled by {caller.identity}",
        )
        with bind_task(task_id):
            logger.info("task cancelled by %s: %s", caller.identity, reason or "no reason given")
        await self._finish(rt, CANCELLED, reason=reason or "cancelled by client", error=error)
        return rt.record

    async def provide_input(
        self, task_id: str, response: common_pb2.InputResponse | None, caller: Caller
    ) -> TaskRecord:
        """Answer a task's pending input request.

        Raises:
            InvalidArgument: No task id, no response or no request id.
            NotFound: No such task visible to the caller.
            FailedPrecondition: The task is not waiting for this input.
        """
        if response is None:
            raise InvalidArgument(violations=[FieldViolation("response", "required")])
        if not response.request_id:
            raise InvalidArgument(violations=[FieldViolation("response.request_id", "required")])
        record = await self._load(task_id, caller)
        rt = self._active.get(task_id)
        pending = record.pending_input
        if rt is None or record.state != INPUT_REQUIRED or pending is None or rt.attempt is None:
            raise FailedPrecondition(
                f"task {task_id} is not waiting for input ({state_name(record.state)})",
                [("TASK_STATE", f"task/{task_id}", "task is not in input_required")],
                reason="TASK_NOT_WAITING_FOR_INPUT",
            )
        if response.request_id != pending.request_id:
            raise FailedPrecondition(
                f"input request {response.request_id!r} is not the pending one",
                [("INPUT_REQUEST", f"task/{task_id}", f"pending request is {pending.request_id}")],
                reason="INPUT_REQUEST_MISMATCH",
            )
        attempt = rt.attempt
        record.pending_input = None
        record.state = RUNNING
        committed = self._emit(
            rt,
            state_changed=coordinator_pb2.StateChange(
                from_state=INPUT_REQUIRED,
                to_state=RUNNING,
                reason="input provided",
                agent_id=record.agent_id,
            ),
        )
        answered = copy.deepcopy(record)
        # A yes to a tool approval gets the coordinator's signed grant (approvals.py).
        response = endorse(self._approvals, task_id, pending, response, caller.identity)
        await attempt.send(agent_pb2.ExecuteRequest(input=response))
        await committed
        return answered

    # -- sessions --------------------------------------------------------------------

    def session(
        self,
        caller: Caller,
        requests: AsyncIterator[coordinator_pb2.SessionRequest],
        *,
        correlation_id: str | None = None,
    ) -> AsyncIterator[coordinator_pb2.SessionResponse]:
        """Run one Session: start, cancel, answer and watch tasks over one stream.

        The responses interleave ``accepted``/``rejected`` answers with the events of
        every task started or watched in the session. A bad request gets a
        ``rejected`` answer and the session goes on. The stream ends once the client
        has half-closed and every followed task has finished. Disconnecting cancels
        no task.
        """
        return _Session(self, caller, correlation_id).run(requests)

    # -- scheduling ------------------------------------------------------------------

    def _enqueue(self, rt: _Runtime) -> None:
        record = rt.record
        if record.not_before_ns > now_ns():
            heapq.heappush(
                self._delayed, (record.not_before_ns, next(self._delay_counter), record.task_id)
            )
        else:
            self._queue.push(
                record.task_id,
                capability=record.capability,
                priority=record.priority,
                enqueued_at=rt.enqueued_at,
            )
            rt.queued_mono = asyncio.get_running_loop().time()
        self.wake()

    def _promote_due(self) -> None:
        now = now_ns()
        while self._delayed and self._delayed[0][0] <= now:
            _, _, task_id = heapq.heappop(self._delayed)
            rt = self._active.get(task_id)
            if rt is None or rt.record.state != QUEUED:
                continue
            rt.record.not_before_ns = 0
            self._enqueue(rt)

    async def _schedule_loop(self) -> None:
        while True:
            self._kick.clear()
            try:
                self._promote_due()
                self._dispatch_ready()
            except Exception:
                logger.exception("scheduler round failed")
            delay = None
            if self._delayed:
                delay = max((self._delayed[0][0] - now_ns()) / 1e9, 0.0)
            try:
                async with asyncio.timeout(delay):
                    await self._kick.wait()
            except TimeoutError:
                pass

    def _dispatch_ready(self) -> None:
        waiting: list[QueueEntry] = []
        try:
            self._dispatch_round(waiting)
        finally:
            # Tasks that wait for a particular agent go back with their place kept.
            for entry in waiting:
                self._queue.push(
                    entry.task_id,
                    capability=entry.capability,
                    priority=entry.priority,
                    enqueued_at=entry.enqueued_at,
                )

    def _dispatch_round(self, waiting: list[QueueEntry]) -> None:
        while True:
            entry = self._queue.pop_best(self._pool.has_capacity)
            if entry is None:
                return
            rt = self._active.get(entry.task_id)
            if rt is None or rt.record.state != QUEUED:
                continue
            record = rt.record
            budget = record.spec.token_budget
            if budget and record.usage.total_tokens >= budget:
                self._finish(
                    rt,
                    FAILED,
                    reason="token budget spent",
                    error=common_pb2.ErrorDetail(
                        code="RESOURCE_EXHAUSTED",
                        reason="TOKEN_BUDGET_EXHAUSTED",
                        message=f"the task used {record.usage.total_tokens} of {budget} tokens",
                    ),
                )
                continue
            lease = self._pool.acquire(entry.capability, avoid=rt.avoid)
            if lease is None:
                # Only agents it failed on are free: let other tasks go first.
                waiting.append(entry)
                continue
            metrics.QUEUE_WAIT_SECONDS.observe(
                max(asyncio.get_running_loop().time() - rt.queued_mono, 0.0)
            )
            self._start_attempt(rt, lease)

    def _start_attempt(self, rt: _Runtime, lease: AgentLease) -> None:
        record = rt.record
        record.attempt += 1
        previous = record.state
        record.state = ASSIGNED
        record.agent_id = lease.agent_id
        record.not_before_ns = 0
        record.attempts.append(
            coordinator_pb2.AttemptRecord(
                attempt=record.attempt,
                agent_id=lease.agent_id,
                started_at=convert.timestamp_ns(now_ns()),
            )
        )
        self._emit(
            rt,
            publish="task.assigned",
            state_changed=coordinator_pb2.StateChange(
                from_state=previous,  # type: ignore[arg-type]
                to_state=ASSIGNED,
                reason=f"assigned to agent {lease.agent_id}",
                agent_id=lease.agent_id,
            ),
        )
        attempt = _Attempt(number=record.attempt, lease=lease)
        rt.attempt = attempt
        attempt.task = self._spawn(
            self._run_attempt(rt, attempt), name=f"attempt-{record.task_id}-{attempt.number}"
        )

    def _assignment(self, record: TaskRecord, attempt: int) -> agent_pb2.TaskAssignment:
        spec = record.spec
        return agent_pb2.TaskAssignment(
            task_id=record.task_id,
            attempt=attempt,
            capability=spec.capability,
            input=spec.input,
            deadline=convert.timestamp_ns(record.deadline_ns),
            metadata=spec.metadata,
            priority=spec.priority,
            token_budget=spec.token_budget,
            tokens_used=record.usage.total_tokens,
            labels=spec.labels,
        )

    def _call_metadata(self, record: TaskRecord, attempt: int) -> list[tuple[str, str]]:
        metadata = [
            (md.TASK_ID, record.task_id),
            (md.ATTEMPT, str(attempt)),
            (md.CORRELATION_ID, record.correlation_id),
        ]
        budget = record.spec.token_budget
        if budget:
            metadata.append((md.TOKEN_BUDGET, str(max(budget - record.usage.total_tokens, 1))))
        return metadata

    async def _run_attempt(self, rt: _Runtime, attempt: _Attempt) -> None:
        record = rt.record
        verdict: Verdict = "none"
        stream: ExecuteStream | None = None
        with bind_task(record.task_id):
            try:
                stream = ExecuteStream(
                    attempt.lease,
                    timeout=(record.deadline_ns - now_ns()) / 1e9,
                    metadata=self._call_metadata(record, attempt.number),
                )
                await stream.send(
                    agent_pb2.ExecuteRequest(assign=self._assignment(record, attempt.number))
                )
                attempt.stream = stream
                for held in attempt.pending:
                    await stream.send(held)
                attempt.pending.clear()
                while True:
                    message = await stream.receive()
                    attempt.answered = attempt.answered or message is not None
                    if message is None:
                        raise AttemptError(
                            common_pb2.ErrorDetail(
                                code="UNAVAILABLE",
                                reason="AGENT_STREAM_BROKEN",
                                message=f"agent {attempt.lease.agent_id} ended the stream "
                                "without a result",
                                retryable=True,
                            ),
                            "failure",
                        )
                    if self._on_agent_message(rt, attempt, message):
                        verdict = "success"
                        await stream.close_sending()
                        break
                metrics.ATTEMPTS.labels("answered").inc()
            except AttemptError as err:
                verdict = err.verdict
                metrics.ATTEMPTS.labels("broken").inc()
                detail = err.detail
                if not attempt.answered and detail.code == "UNAVAILABLE":
                    # The agent never got the task (gone, not yet deregistered): not a
                    # failure of the task, so it does not use up an attempt.
                    detail.reason = _UNREACHABLE
                self._attempt_broken(rt, attempt, detail)
            except asyncio.CancelledError:
                metrics.ATTEMPTS.labels("cancelled").inc()
                raise
            except Exception:
                logger.exception("attempt %d failed unexpectedly", attempt.number)
                metrics.ATTEMPTS.labels("broken").inc()
                self._attempt_broken(
                    rt,
                    attempt,
                    common_pb2.ErrorDetail(
                        code="INTERNAL",
                        reason="COORDINATOR_ERROR",
                        message="the coordinator failed while running the attempt",
                        retryable=True,
                    ),
                )
            finally:
                if stream is not None:
                    stream.cancel()
                self._pool.release(attempt.lease, verdict)
                if rt.attempt is attempt:
                    rt.attempt = None

    def _ensure_running(self, rt: _Runtime, attempt: _Attempt) -> None:
        record = rt.record
        if record.state != ASSIGNED:
            return
        record.state = RUNNING
        self._emit(
            rt,
            publish="task.started",
            state_changed=coordinator_pb2.StateChange(
                from_state=ASSIGNED,
                to_state=RUNNING,
                reason=f"started on agent {attempt.lease.agent_id}",
                agent_id=attempt.lease.agent_id,
            ),
        )

    def _on_agent_message(
        self, rt: _Runtime, attempt: _Attempt, message: agent_pb2.ExecuteResponse
    ) -> bool:
        """Apply one agent message; returns True when it ends the attempt."""
        kind = message.WhichOneof("kind")
        final = kind in ("result", "error")
        record = rt.record
        if record.terminal or rt.attempt is not attempt:
            # The task moved on (cancelled, past its deadline): only the end matters.
            if final:
                self._close_attempt(record, attempt.number, self._message_error(message))
            return final
        if kind == "started":
            self._ensure_running(rt, attempt)
        elif kind == "progress":
            self._ensure_running(rt, attempt)
            record.progress = message.progress
            self._emit(rt, publish="task.progress", progress=message.progress)
        elif kind == "partial":
            self._ensure_running(rt, attempt)
            self._emit(rt, write_row=False, partial=message.partial)
        elif kind == "activity":
            self._ensure_running(rt, attempt)
            self._emit(rt, write_row=False, activity=message.activity)
        elif kind == "input_required":
            self._ensure_running(rt, attempt)
            previous = record.state
            record.state = INPUT_REQUIRED
            record.pending_input = message.input_required
            self._emit(
                rt,
                state_changed=coordinator_pb2.StateChange(
                    from_state=previous,  # type: ignore[arg-type]
                    to_state=INPUT_REQUIRED,
                    reason="the agent asks for input",
                    agent_id=record.agent_id,
                ),
            )
            self._emit(rt, publish="task.input_required", input_required=message.input_required)
        elif kind == "result":
            self._add_usage(record, message.result.usage)
            self._close_attempt(record, attempt.number, None)
            self._finish(
                rt, SUCCEEDED, reason="the agent returned a result", output=message.result.output
            )
        elif kind == "error":
            self._add_usage(record, message.error.usage)
            self._attempt_failed(rt, attempt, message.error.error)
        else:
            logger.warning("agent %s sent an empty message; ignored", attempt.lease.agent_id)
        return final

    @staticmethod
    def _message_error(message: agent_pb2.ExecuteResponse) -> common_pb2.ErrorDetail | None:
        return message.error.error if message.WhichOneof("kind") == "error" else None

    @staticmethod
    def _add_usage(record: TaskRecord, usage: common_pb2.Usage) -> None:
        total = record.usage
        total.prompt_tokens += usage.prompt_tokens
        total.completion_tokens += usage.completion_tokens
        total.total_tokens += usage.total_tokens or (usage.prompt_tokens + usage.completion_tokens)
        total.model_calls += usage.model_calls
        total.tool_calls += usage.tool_calls
        if usage.HasField("total_time"):
            seconds = convert.duration_seconds(total.total_time) + convert.duration_seconds(
                usage.total_time
            )
            total.total_time.CopyFrom(convert.duration(seconds))
        if usage.HasField("time_to_first_token") and not total.HasField("time_to_first_token"):
            total.time_to_first_token.CopyFrom(usage.time_to_first_token)

    @staticmethod
    def _close_attempt(
        record: TaskRecord, number: int, error: common_pb2.ErrorDetail | None
    ) -> None:
        for item in reversed(record.attempts):
            if item.attempt == number:
                if not item.HasField("ended_at"):
                    item.ended_at.CopyFrom(convert.timestamp_ns(now_ns()))
                    if error is not None:
                        item.error.CopyFrom(error)
                return

    def _attempt_failed(
        self, rt: _Runtime, attempt: _Attempt, error: common_pb2.ErrorDetail
    ) -> None:
        """The agent reported an error: cancel ack, deadline, retry or final failure."""
        record = rt.record
        self._close_attempt(record, attempt.number, error)
        if error.code == "DEADLINE_EXCEEDED" or error.reason == "DEADLINE_EXCEEDED":
            self._finish(rt, FAILED, reason="deadline exceeded", error=_deadline_error())
        elif error.retryable:
            self._retry(rt, attempt, error)
        else:
            self._finish(rt, FAILED, reason=f"the agent failed: {error.reason}", error=error)

    def _attempt_broken(
        self, rt: _Runtime, attempt: _Attempt, error: common_pb2.ErrorDetail
    ) -> None:
        """The call failed without an answer from the agent."""
        record = rt.record
        if record.terminal or rt.attempt is not attempt:
            self._close_attempt(record, attempt.number, error)
            return
        with bind_task(record.task_id):
            logger.warning(
                "attempt %d on agent %s broke: %s %s",
                attempt.number,
                attempt.lease.agent_id,
                error.reason,
                error.message,
            )
        self._attempt_failed(rt, attempt, error)

    def _failures(self, record: TaskRecord) -> int:
        return sum(
            1 for a in record.attempts if a.HasField("error") and a.error.reason not in _NOT_COUNTED
        )

    def _backoff(self, failures: int) -> float:
        s = self.settings
        bound = min(s.retry_max_backoff, s.retry_initial_backoff * (2 ** max(failures - 1, 0)))
        # Full jitter: retries of many tasks that failed together spread out.
        return random.uniform(bound / 2, bound) if bound > 0 else 0.0

    def _retry(self, rt: _Runtime, attempt: _Attempt, error: common_pb2.ErrorDetail) -> None:
        record = rt.record
        failures = self._failures(record)
        if failures >= record.spec.max_attempts:
            self._finish(
                rt,
                DEAD_LETTERED,
                reason=f"{failures} attempts failed; the last with {error.reason}",
                error=error,
            )
            return
        # Grows with every attempt (also uncounted ones), so a task bouncing between
        # unreachable agents backs off too.
        backoff = self._backoff(max(failures, len(record.attempts)))
        previous = record.state
        rt.attempt = None
        rt.avoid.add(attempt.lease.agent_id)
        record.state = QUEUED
        record.agent_id = ""
        record.pending_input = None
        record.not_before_ns = now_ns() + int(backoff * 1e9)
        self._emit(
            rt,
            publish="task.retried",
            publish_extra={"backoff": convert.duration(backoff), "error": error},
            retry=coordinator_pb2.TaskRetry(
                failed_attempt=attempt.number, error=error, backoff=convert.duration(backoff)
            ),
        )
        self._emit(
            rt,
            state_changed=coordinator_pb2.StateChange(
                from_state=previous,  # type: ignore[arg-type]
                to_state=QUEUED,
                reason=f"retrying in {backoff:.2f}s after {error.reason}",
            ),
        )
        metrics.RETRIES.inc()
        with bind_task(record.task_id):
            logger.info(
                "attempt %d failed (%s); retry %d of %d in %.2fs",
                attempt.number,
                error.reason,
                failures + 1,
                record.spec.max_attempts,
                backoff,
            )
        self._enqueue(rt)

    # -- finishing -------------------------------------------------------------------

    def _finish(
        self,
        rt: _Runtime,
        state: int,
        *,
        reason: str,
        output: common_pb2.Payload | None = None,
        error: common_pb2.ErrorDetail | None = None,
    ) -> asyncio.Future[None]:
        record = rt.record
        if record.terminal:
            # Two endings raced (say, the deadline and the agent's answer): the first wins.
            done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            done.set_result(None)
            return done
        previous = record.state
        record.state = state
        record.output = output
        record.error = error
        record.pending_input = None
        record.not_before_ns = 0
        self._queue.remove(record.task_id)
        if record.attempts and not record.attempts[-1].HasField("ended_at"):
            self._close_attempt(record, record.attempts[-1].attempt, error)
        self._emit(
            rt,
            state_changed=coordinator_pb2.StateChange(
                from_state=previous,  # type: ignore[arg-type]
                to_state=state,  # type: ignore[arg-type]
                reason=reason,
                agent_id=record.agent_id,
            ),
        )
        finished = coordinator_pb2.TaskFinished(state=state, usage=record.usage)  # type: ignore[arg-type]
        if output is not None:
            finished.output.CopyFrom(output)
        if error is not None:
            finished.error.CopyFrom(error)
        committed = self._emit(rt, publish=_FINISHED_TYPES[state], finished=finished)
        if rt.deadline_handle is not None:
            rt.deadline_handle.cancel()
            rt.deadline_handle = None
        attempt = rt.attempt
        if attempt is not None:
            rt.attempt = None
            if state == CANCELLED:
                attempt.cancelling = True
                self._spawn(self._cancel_attempt(attempt, reason), name="cancel-attempt")
            elif (
                attempt.task is not None
                and not attempt.task.done()
                and attempt.task is not asyncio.current_task()
            ):
                # Deadline: stop the agent's work now. (When the attempt itself
                # finished the task, it is ending anyway.)
                attempt.task.cancel()
        self._active.pop(record.task_id, None)
        if self.settings.finished_cache_size:
            self._finished[record.task_id] = rt
            while len(self._finished) > self.settings.finished_cache_size:
                self._forget(self._finished.popitem(last=False)[1])
        else:
            self._forget(rt)
        metrics.TASKS_FINISHED.labels(state_name(state)).inc()
        with bind_task(record.task_id):
            logger.info("task %s: %s", state_name(state), reason)
        return committed

    def _forget(self, rt: _Runtime) -> None:
        spec = rt.record.spec
        if spec.idempotency_key:
            key = (rt.record.owner, spec.idempotency_key)
            if self._idempotency.get(key) == rt.record.task_id:
                del self._idempotency[key]

    async def _cancel_attempt(self, attempt: _Attempt, reason: str) -> None:
        """Tell the agent to stop; end the call if it does not within the grace period."""
        await attempt.send(
            agent_pb2.ExecuteRequest(cancel=agent_pb2.CancelExecution(reason=reason))
        )
        task = attempt.task
        if task is None or task.done():
            return
        done, _ = await asyncio.wait({task}, timeout=self.settings.cancel_grace)
        if not done:
            logger.warning(
                "agent %s did not stop within %.1fs; ending the call",
                attempt.lease.agent_id,
                self.settings.cancel_grace,
            )
            task.cancel()

    def _arm_deadline(self, rt: _Runtime) -> None:
        loop = asyncio.get_running_loop()
        delay = max((rt.record.deadline_ns - now_ns()) / 1e9, 0.0)
        rt.deadline_handle = loop.call_later(delay, self._deadline_passed, rt)

    def _deadline_passed(self, rt: _Runtime) -> None:
        rt.deadline_handle = None
        if rt.record.terminal or self._closing:
            return
        self._finish(rt, FAILED, reason="deadline exceeded", error=_deadline_error())

    # -- events ----------------------------------------------------------------------

    def _emit(
        self,
        rt: _Runtime,
        *,
        publish: str | None = None,
        publish_extra: dict[str, Message] | None = None,
        write_row: bool = True,
        **kind: Message,
    ) -> asyncio.Future[None]:
        """Append the task's next event: store it, then fan it out once committed."""
        record = rt.record
        record.last_sequence += 1
        stamp = now_ns()
        record.updated_ns = stamp
        event = TaskEvent(
            task_id=record.task_id,
            sequence=record.last_sequence,
            time=convert.timestamp_ns(stamp),
            attempt=record.attempt,
            **kind,  # type: ignore[arg-type]
        )
        rt.events.append(event)
        rows = [convert.record_to_row(record, rt.spec_bytes)] if write_row else []
        data = self._event_data(record, publish_extra or {}) if publish else None
        future = self._store.put(
            tasks=rows,
            events=[EventRow(record.task_id, event.sequence, event.SerializeToString())],
        )
        future.add_done_callback(partial(self._committed, rt, event.sequence, publish, data))
        return future

    def _committed(
        self,
        rt: _Runtime,
        sequence: int,
        publish: str | None,
        data: events_pb2.TaskEventData | None,
        future: asyncio.Future[None],
    ) -> None:
        if not future.cancelled() and future.exception() is not None:
            logger.error(
                "event %d of task %s was not stored: %s",
                sequence,
                rt.record.task_id,
                future.exception(),
            )
        if sequence > rt.committed:
            rt.committed = sequence
        rt.notify()
        if publish and data is not None:
            try:
                self._events.publish(
                    publish,
                    subject=rt.record.task_id,
                    data=data,
                    task_sequence=sequence,
                    correlation_id=rt.record.correlation_id or None,
                )
            except Exception:
                logger.exception("publishing %s failed", publish)

    @staticmethod
    def _event_data(record: TaskRecord, extra: dict[str, Message]) -> events_pb2.TaskEventData:
        data = events_pb2.TaskEventData(
            task_id=record.task_id,
            state=record.state,  # type: ignore[arg-type]
            capability=record.capability,
            priority=record.priority,  # type: ignore[arg-type]
            agent_id=record.agent_id,
            attempt=record.attempt,
            owner=record.owner,
        )
        if record.progress is not None:
            data.progress.CopyFrom(record.progress)
        if record.error is not None:
            data.error.CopyFrom(record.error)
        if record.terminal:
            data.usage.CopyFrom(record.usage)
        if record.pending_input is not None:
            data.input_request.CopyFrom(record.pending_input)
        for name, value in extra.items():
            getattr(data, name).CopyFrom(value)
        return data

    # -- recovery --------------------------------------------------------------------

    async def _recover(self) -> None:
        rows = await self._store.active_tasks()
        resumed = requeued = 0
        for row in rows:
            record = convert.record_from_row(row)
            record.last_sequence = max(
                record.last_sequence, await self._store.last_sequence(record.task_id)
            )
            rt = _Runtime(record, row.spec)
            self._active[record.task_id] = rt
            if record.spec.idempotency_key:
                self._idempotency[(record.owner, record.spec.idempotency_key)] = record.task_id
            if record.state in ACTIVE_DISPATCH_STATES:
                previous = record.state
                self._close_attempt(
                    record,
                    record.attempt,
                    common_pb2.ErrorDetail(
                        code="UNAVAILABLE",
                        reason=_RESTARTED,
                        message="the coordinator restarted during this attempt",
                        retryable=True,
                    ),
                )
                record.state = QUEUED
                record.agent_id = ""
                record.pending_input = None
                self._emit(
                    rt,
                    state_changed=coordinator_pb2.StateChange(
                        from_state=previous,  # type: ignore[arg-type]
                        to_state=QUEUED,
                        reason="coordinator restarted; the task runs again as a new attempt",
                    ),
                )
                resumed += 1
            else:
                requeued += 1
            self._arm_deadline(rt)
            self._enqueue(rt)
        if rows:
            logger.info(
                "recovered %d unfinished tasks: %d queued, %d interrupted attempts re-queued",
                len(rows),
                requeued,
                resumed,
            )
        await self._store.flush()

    # -- gauges ----------------------------------------------------------------------

    def _bind_gauges(self) -> None:
        # Evaluated when metrics are scraped, not on every state change: counting is
        # O(tasks) and the hot path should not pay for it.
        for state in (QUEUED, ASSIGNED, RUNNING, INPUT_REQUIRED):
            metrics.TASKS_ACTIVE.labels(state_name(state)).set_function(
                partial(self._count_state, state)
            )
        for value in (1, 2, 3, 4):
            name = common_pb2.Priority.Name(value).removeprefix("PRIORITY_").lower()  # type: ignore[arg-type]
            metrics.QUEUE_DEPTH.labels(name).set_function(partial(self._count_queued, value))

    def _count_state(self, state: int) -> int:
        return sum(1 for rt in list(self._active.values()) if rt.record.state == state)

    def _count_queued(self, priority: int) -> int:
        return sum(
            1
            for rt in list(self._active.values())
            if rt.record.state == QUEUED and rt.record.priority == priority
        )


def _deadline_error() -> common_pb2.ErrorDetail:
    return common_pb2.ErrorDetail(
        code="DEADLINE_EXCEEDED",
        reason="DEADLINE_EXCEEDED",
        message="the task did not finish before its deadline",
    )


# -- sessions ------------------------------------------------------------------------------


class _Session:
    """One ``Session`` stream: requests in, answers and events of many tasks out."""

    def __init__(
        self, coordinator: Coordinator, caller: Caller, correlation_id: str | None
    ) -> None:
        self._coordinator = coordinator
        self._caller = caller
        self._correlation_id = correlation_id
        self._out: asyncio.Queue[coordinator_pb2.SessionResponse | None] = asyncio.Queue(
            maxsize=1024
        )
        self._pumps: dict[str, asyncio.Task[None]] = {}
        self._sent: dict[str, int] = {}
        self._input_done = False
        self._closed = False

    async def run(
        self, requests: AsyncIterator[coordinator_pb2.SessionRequest]
    ) -> AsyncIterator[coordinator_pb2.SessionResponse]:
        reader = asyncio.create_task(self._read(requests), name="session-reader")
        try:
            while True:
                item = await self._out.get()
                if item is None:
                    break
                yield item
            # Surface an unexpected failure of the reader (not a client disconnect).
            if reader.done() and not reader.cancelled() and reader.exception() is not None:
                raise reader.exception()  # type: ignore[misc]
        finally:
            self._closed = True
            tasks = [reader, *self._pumps.values()]
            for task in tasks:
                task.cancel()
            for task in tasks:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task

    async def _read(self, requests: AsyncIterator[coordinator_pb2.SessionRequest]) -> None:
        try:
            async for request in requests:
                await self._handle(request)
        except HivewireError as err:
            await self._out.put(
                coordinator_pb2.SessionResponse(
                    rejected=coordinator_pb2.SessionRejected(error=convert.error_detail(err))
                )
            )
        finally:
            self._input_done = True
            await self._maybe_end()

    async def _maybe_end(self) -> None:
        # Once the stream is being torn down nobody reads the queue: do not wait on it.
        if self._closed:
            return
        if self._input_done and all(p.done() for p in self._pumps.values()):
            await self._out.put(None)

    async def _reject(self, err: HivewireError, *, client_ref: str = "", task_id: str = "") -> None:
        await self._out.put(
            coordinator_pb2.SessionResponse(
                rejected=coordinator_pb2.SessionRejected(
                    client_ref=client_ref, task_id=task_id, error=convert.error_detail(err)
                )
            )
        )

    async def _handle(self, request: coordinator_pb2.SessionRequest) -> None:
        kind = request.WhichOneof("kind")
        c = self._coordinator
        try:
            if kind == "start":
                start = request.start
                try:
                    record, deduplicated = await c.submit(
                        start.spec if start.HasField("spec") else None,
                        self._caller,
                        correlation_id=self._correlation_id,
                    )
                except HivewireError as err:
                    await self._reject(err, client_ref=start.client_ref)
                    return
                await self._out.put(
                    coordinator_pb2.SessionResponse(
                        accepted=coordinator_pb2.SessionAccepted(
                            client_ref=start.client_ref,
                            task_id=record.task_id,
                            deduplicated=deduplicated,
                        )
                    )
                )
                # A deduplicated start of a task this session already followed goes on
                # after what was sent: the client saw those events once already.
                after = self._sent.get(record.task_id, 0)
                self._follow(record.task_id, c._follow(record.task_id, after))
            elif kind == "cancel":
                await c.cancel(request.cancel.task_id, self._caller, request.cancel.reason)
            elif kind == "input":
                await c.provide_input(
                    request.input.task_id,
                    request.input.response if request.input.HasField("response") else None,
                    self._caller,
                )
            elif kind == "watch":
                task_id = request.watch.task_id
                current = self._pumps.get(task_id)
                if current is not None and not current.done():
                    return
                events = await c.watch(
                    task_id, self._caller, after_sequence=request.watch.after_sequence
                )
                self._follow(task_id, events)
            else:
                raise InvalidArgument(
                    violations=[FieldViolation("kind", "one of start, cancel, input, watch")]
                )
        except HivewireError as err:
            task_id = ""
            if kind in ("cancel", "input", "watch"):
                task_id = getattr(request, kind).task_id
            await self._reject(err, task_id=task_id)
        except Exception:
            logger.exception("session request %s failed", kind)
            await self._reject(Internal("internal error"))

    def _follow(self, task_id: str, events: AsyncIterator[TaskEvent]) -> None:
        current = self._pumps.get(task_id)
        if current is not None and not current.done():
            # Already followed in this session (a deduplicated start, a second watch):
            # a second pump would send every event twice.
            return

        async def pump() -> None:
            try:
                async for event in events:
                    if event.WhichOneof("kind") != "snapshot":
                        self._sent[task_id] = max(self._sent.get(task_id, 0), event.sequence)
                    await self._out.put(coordinator_pb2.SessionResponse(event=event))
            except HivewireError as err:
                await self._reject(err, task_id=task_id)
            finally:
                if self._pumps.get(task_id) is asyncio.current_task():
                    del self._pumps[task_id]
                await self._maybe_end()

        self._pumps[task_id] = asyncio.create_task(pump(), name=f"session-{task_id}")
