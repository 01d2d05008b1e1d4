"""The coordinator's domain: task lifecycle, scheduling, retries, plans and sub-tasks.

Lifecycle::

    QUEUED -> ASSIGNED -> RUNNING <-> INPUT_REQUIRED
       ^                     |
       +---- retry ----------+--> SUCCEEDED | FAILED | CANCELLED | DEAD_LETTERED

The scheduler (:mod:`.scheduler`) takes the best queued task (see :mod:`.queue`) whose
capability has a free agent (see :mod:`.dispatch`) and starts one attempt, which this
module runs (see :mod:`.attempts`): an ``Execute`` stream with the task's deadline.
A retryable failure queues the task again after a jittered exponential backoff, on
another agent when one fits; when ``max_attempts`` attempts failed it is
dead-lettered. A permanent failure fails it at once; the deadline fails it with
``DEADLINE_EXCEEDED`` wherever it is.

Every change is an event of the task's journal (see :mod:`.journal`); validation is
in :mod:`.validation`, plans in :mod:`.plans`, and storage behind
:class:`~.store.TaskStore`. The ``Session`` stream (:mod:`.session`) is an adapter
above this module, like the servicer.

After a restart, queued tasks are queued again and tasks that were assigned or
running are queued as a new attempt (the interrupted attempt does not count against
``max_attempts``). With several coordinators on the JetStream store (see
:mod:`.cluster`), a coordinator recovers the tasks of a dead peer the same way, and
forwards a cancel, an input or a sub-task of a task another coordinator runs to it.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterable, Sequence
from functools import partial
from typing import Any, Unpack

from google.protobuf.message import Message

from hivewire.agent.v1 import agent_pb2
from hivewire.common.v1 import common_pb2
from hivewire.coordinator.v1 import coordinator_pb2
from hivewire.services.base.lifecycle import StartStop, cancel_and_wait, ended_within
from hivewire.services.coordinator import convert, metrics
from hivewire.services.coordinator.approvals import endorse
from hivewire.services.coordinator.attempts import (
    RESTARTED,
    UNREACHABLE,
    Attempt,
    add_usage,
    assignment,
    backoff_seconds,
    call_metadata,
    close_attempt,
    counted_failures,
    deadline_error,
)
from hivewire.services.coordinator.cluster import Cluster
from hivewire.services.coordinator.deadlines import Deadlines
from hivewire.services.coordinator.dispatch import (
    AgentPool,
    AttemptError,
    Verdict,
)
from hivewire.services.coordinator.journal import (
    CoordinatorEvents,
    Ending,
    EventListener,
    Journal,
    NullPublisher,
    TaskRuntime,
    TaskTable,
)
from hivewire.services.coordinator.link import AttemptStream, open_stream
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
from hivewire.services.coordinator.plans import PLAN_CANCELLED, ChildSpec, Plans
from hivewire.services.coordinator.projects import Projects
from hivewire.services.coordinator.quotas import Quotas
from hivewire.services.coordinator.retention import idempotency_expired, purged_or_unknown
from hivewire.services.coordinator.scheduler import Scheduler
from hivewire.services.coordinator.settings import CoordinatorSettings
from hivewire.services.coordinator.store import (
    TERMINAL_STATES,
    StoreError,
    TaskQuery,
    TaskRow,
    TaskStore,
)
from hivewire.services.coordinator.validation import (
    VALID_STATES,
    payload_violations,
    validate_spec,
)
from hivewire.services.runtime import tracing
from hivewire.services.runtime.errors import (
    FailedPrecondition,
    FieldViolation,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    Unauthenticated,
    Unavailable,
)
from hivewire.services.runtime.grants import ApprovalSigner
from hivewire.services.runtime.logging import bind_task, new_correlation_id
from hivewire.services.runtime.tls import parse_spiffe_id

logger = logging.getLogger(__name__)

__all__ = ["Coordinator", "CoordinatorEvents", "NullPublisher"]

TaskEvent = coordinator_pb2.TaskEvent

#: The error reason of a sub-task cancelled because its parent ended.
_PARENT_ENDED = "PARENT_TASK_ENDED"

# task.* event type of each terminal state.
_FINISHED_TYPES: dict[int, str] = {
    SUCCEEDED: "task.completed",
    FAILED: "task.failed",
    CANCELLED: "task.cancelled",
    DEAD_LETTERED: "task.dead_lettered",
}


SpecCheck = Callable[[coordinator_pb2.TaskSpec], Awaitable[None]]
"""A check of a valid spec that raises a domain error to refuse it."""


class Coordinator(StartStop):
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
        events: CoordinatorEvents | None = None,
        approvals: ApprovalSigner | None = None,
        cluster: Cluster | None = None,
    ) -> None:
        self.settings = settings
        self._approvals = approvals  # signs tool approvals (coordinator/approvals.py)
        self._quotas = Quotas(settings.quotas)  # per-principal limits (coordinator/quotas.py)
        self._store = store
        self._pool = pool
        self._events: CoordinatorEvents = events or NullPublisher()
        self._tasks = TaskTable(
            finished_cache_size=settings.finished_cache_size, on_evict=self._forget
        )
        self._journal = Journal(store, self._tasks, self._events)
        self._deadlines = Deadlines(self._deadline_passed)
        self._plans = Plans(self, self._journal, compensation_timeout=settings.compensation_timeout)
        self._projects = Projects(store, self._journal)
        # parent task id -> its active sub-tasks (cancelled when the parent ends)
        self._subtasks: dict[str, set[str]] = {}
        self._idempotency: dict[tuple[str, str], str] = {}
        self._background: set[asyncio.Task[Any]] = set()
        self._scheduling: asyncio.Task[None] | None = None
        self._running = False
        self._closing = False
        self._spec_checks: list[SpecCheck] = []
        # Several coordinators on one JetStream store (cluster.py); None when alone.
        self._cluster = cluster
        self._instance = cluster.instance_id if cluster is not None else ""
        if cluster is not None:
            self._journal.remote = cluster
        # The queue and the loop that dispatches it (scheduler.py).
        self._scheduler = Scheduler(
            tasks=self._tasks,
            journal=self._journal,
            pool=pool,
            aging_interval=settings.aging_interval,
            finish=self.finish,
            run=self._spawn_attempt,
            may_dispatch=lambda: cluster is None or cluster.leased,
        )

    # -- lifecycle -------------------------------------------------------------------

    def wake(self) -> None:
        """Ask the scheduler to look at the queue again (agents changed, slots freed)."""
        self._scheduler.wake()

    async def start(self) -> None:
        """Recover unfinished tasks from the store and start scheduling."""
        self._bind_gauges()
        await self._recover()
        self._running = True
        self._scheduling = asyncio.create_task(self._scheduler.run(), name="coordinator-scheduler")
        self.wake()

    async def drain(self) -> None:
        """Begin shutting down: stop dispatching and end every open event stream.

        Streams end with ``UNAVAILABLE`` so clients resume with ``WatchTask`` against
        the next coordinator. Running attempts go on until :meth:`stop`.
        """
        self._closing = True
        self._journal.closing = True
        if self._scheduling is not None:
            self._scheduling.cancel()
        for rt in self._tasks.everything():
            rt.notify()

    async def stop(self) -> None:
        """Stop scheduling and cancel running attempts without changing their state.

        Tasks that were running stay so in the store: the next start dispatches them
        again as a new attempt.
        """
        await self.drain()
        self._running = False
        self._deadlines.clear()
        await cancel_and_wait((self._scheduling, *self._background), suppress=(Exception,))
        self._background.clear()
        await self._projects.stop()
        with contextlib.suppress(Exception):
            await self._store.flush()
        if self._cluster is not None:
            # Last: peers take the tasks over as soon as the key is gone.
            await self._cluster.leave()

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
        forward: bool = True,
    ) -> tuple[TaskRecord, bool]:
        """Validate, store and queue a task.

        Args:
            spec: What the client asks for.
            caller: Who asks.
            correlation_id: The call's correlation id, used when the spec has none.
            forward: Send a sub-task of a task another coordinator runs to that one.

        Returns:
            The task and whether it is an earlier task with the same idempotency key.

        Raises:
            InvalidArgument: The spec is invalid (with field violations).
            FailedPrecondition: A sub-task's parent finished, or nesting is too deep.
            Unavailable: The coordinator is shutting down.
        """
        self._require_running()
        normalized = validate_spec(spec, self.settings)
        for check in self._spec_checks:
            await check(normalized)
        key = normalized.idempotency_key
        if key:
            existing = await self._find_idempotent(caller.identity, key)
            if existing is not None:
                metrics.TASKS_DEDUPLICATED.inc()
                return existing, True
        if normalized.project_id:
            await self._load_project(normalized.project_id, caller, field_name="spec.project_id")
        owner = await self._parent_elsewhere(normalized.parent_task_id) if forward else ""
        if owner:
            # The coordinator running the parent checks and owns the sub-task.
            assert self._cluster is not None
            data = await self._cluster.request(
                owner,
                "submit",
                coordinator_pb2.SubmitTaskRequest(spec=spec).SerializeToString(),
                caller=caller.identity,
                correlation_id=correlation_id or "",
            )
            answer = coordinator_pb2.SubmitTaskResponse.FromString(data)
            return convert.record_from_task(answer.task), answer.deduplicated
        # Checked after every await above: the parent must still be running now.
        parent = await self._subtask_parent(normalized, caller)
        if parent is not None and parent.record.terminal:
            raise FailedPrecondition(
                f"parent task {parent.record.task_id} already finished",
                [("TASK_STATE", f"task/{parent.record.task_id}", "the parent task has finished")],
                reason="PARENT_TASK_FINISHED",
            )
        if not normalized.project_id and parent is not None:
            normalized.project_id = parent.record.project_id
        # Per-principal quotas (quotas.py): over a limit nothing is stored.
        self._quotas.admit(
            caller.identity,
            lambda: sum(rt.record.owner == caller.identity for rt in self._tasks.active.values()),
        )
        if not normalized.metadata.correlation_id:
            normalized.metadata.correlation_id = (
                parent.record.correlation_id
                if parent is not None
                else correlation_id or new_correlation_id()
            )
        tracing.stamp(normalized.metadata)  # the task's later hops continue this trace
        created = now_ns()
        timeout_ns = int(convert.duration_seconds(normalized.timeout) * 1e9)
        deadline_ns = created + timeout_ns
        if parent is not None:
            # A sub-task never outlives its parent, nor spends more than it has left.
            deadline_ns = min(deadline_ns, parent.record.deadline_ns)
            normalized.token_budget = _remaining_budget(
                parent.record, normalized.token_budget, held=self._held_by_subtasks(parent)
            )
        record = self._new_record(
            normalized,
            caller.identity,
            created,
            deadline_ns,
            parent=parent.record if parent is not None else None,
            role=coordinator_pb2.TASK_ROLE_SUBTASK,
        )
        if parent is not None:
            self._subtasks.setdefault(parent.record.task_id, set()).add(record.task_id)
        rt = self._accept(record, idempotency_key=key)
        committed = self._journal.emit(
            rt,
            publish="task.created",
            state_changed=coordinator_pb2.StateChange(
                from_state=common_pb2.TASK_STATE_UNSPECIFIED, to_state=QUEUED, reason="submitted"
            ),
        )
        self._arm_deadline(rt)
        # The answer is the task as accepted (its plan starts and the scheduler may move
        # it on while the commit is awaited), so StreamTask follows from that point.
        accepted = record.snapshot()
        if record.is_plan:
            self._plans.start(rt)
        else:
            self._scheduler.submit(rt)
        metrics.TASKS_SUBMITTED.inc()
        with bind_task(record.task_id):
            logger.info(
                "task accepted: %s, priority %s, deadline in %.1fs",
                record.capability or f"plan of {len(normalized.plan.steps)} steps",
                common_pb2.Priority.Name(normalized.priority),
                timeout_ns / 1e9,
            )
        # The answer promises durability: wait for the commit.
        try:
            await committed
        except StoreError as exc:
            # Not stored (say, this coordinator let its tasks go meanwhile): not accepted,
            # and not remembered as if it were.
            self.drop(record.task_id)
            if self._idempotency.get((record.owner, key)) == record.task_id:
                del self._idempotency[(record.owner, key)]
            raise Unavailable(
                "the task could not be stored; submit again (with an idempotency key, safely)",
                retry_after=1.0,
            ) from exc
        return accepted, False

    def _accept(self, record: TaskRecord, *, idempotency_key: str = "") -> TaskRuntime:
        rt = TaskRuntime(record, record.spec.SerializeToString())
        self._tasks.add(rt)
        if idempotency_key:
            self._idempotency[(record.owner, idempotency_key)] = record.task_id
        if record.project_id:
            self._projects.task_started(record.project_id)
        return rt

    async def _subtask_parent(
        self, spec: coordinator_pb2.TaskSpec, caller: Caller
    ) -> TaskRuntime | None:
        """The running task a sub-task is submitted under, checked; None for none."""
        parent_id = spec.parent_task_id
        if not parent_id:
            return None
        field_name = "spec.parent_task_id"
        rt = self._tasks.active.get(parent_id)
        if rt is None:
            record = await self._load(parent_id, caller, field_name=field_name)
            raise FailedPrecondition(
                f"parent task {parent_id} already finished ({state_name(record.state)})",
                [("TASK_STATE", f"task/{parent_id}", "the parent task has finished")],
                reason="PARENT_TASK_FINISHED",
            )
        if not (caller.may_access(rt.record.owner) or self._runs_on(rt, caller)):
            # Only the agent running a task (or its owner) may attach work to it.
            raise NotFound("task", parent_id, reason="TASK_NOT_FOUND")
        limit = self.settings.max_subtask_depth
        # A plan's steps sit one level below the plan.
        depth = rt.record.depth + (2 if spec.HasField("plan") else 1)
        if depth > limit:
            raise FailedPrecondition(
                f"sub-task would be nested {depth} deep; the limit is {limit}",
                [("SUBTASK_DEPTH", f"task/{parent_id}", f"at most {limit} levels of sub-tasks")],
                reason="SUBTASK_DEPTH_EXCEEDED",
            )
        return rt

    @staticmethod
    def _runs_on(rt: TaskRuntime, caller: Caller) -> bool:
        """Whether the caller is the agent running the task's current attempt."""
        role = parse_spiffe_id(caller.identity)
        attempt = rt.attempt
        if role is None or role[0] != "agent" or attempt is None:
            return False
        return attempt.lease.entry.instance.meta.get("spiffe_id") == caller.identity

    # -- plan steps (the plans' host) --------------------------------------------------

    def start_child(self, parent: TaskRuntime, child: ChildSpec) -> TaskRuntime:
        """Create, store and queue a plan's step, compensation or aggregator task.

        The task inherits the plan's owner, priority, attempts, labels, correlation id,
        project and remaining token budget; it ends no later than the plan (or, for a
        compensation, than ``child.deadline_ns``).
        """
        p = parent.record
        budget = child.token_budget
        spec = coordinator_pb2.TaskSpec(
            capability=child.capability,
            input=child.payload,
            priority=p.spec.priority,
            max_attempts=p.spec.max_attempts,
            token_budget=budget if budget is not None else _remaining_budget(p, 0, held=0),
            labels=p.spec.labels,
            metadata=p.spec.metadata,
            project_id=p.project_id,
        )
        created = now_ns()
        deadline = child.deadline_ns if child.deadline_ns is not None else p.deadline_ns
        spec.timeout.CopyFrom(convert.duration(max(deadline - created, 0) / 1e9))
        record = self._new_record(
            spec, p.owner, created, deadline, parent=p, role=child.role, step_id=child.step_id
        )
        rt = self._accept(record)
        self._journal.emit(
            rt,
            publish="task.created",
            state_changed=coordinator_pb2.StateChange(
                from_state=common_pb2.TASK_STATE_UNSPECIFIED,
                to_state=QUEUED,
                reason=f"step {child.step_id} of plan {p.task_id}",
            ),
        )
        self._arm_deadline(rt)
        self._scheduler.enqueue(rt)
        metrics.TASKS_SUBMITTED.inc()
        return rt

    def _new_record(
        self,
        spec: coordinator_pb2.TaskSpec,
        owner: str,
        created: int,
        deadline_ns: int,
        *,
        parent: TaskRecord | None = None,
        role: coordinator_pb2.TaskRole.ValueType = coordinator_pb2.TASK_ROLE_UNSPECIFIED,
        step_id: str = "",
    ) -> TaskRecord:
        """A new queued task of this coordinator; with a parent, one level below it."""
        record = TaskRecord(
            task_id=uuid.uuid4().hex,
            spec=spec,
            owner=owner,
            state=QUEUED,
            created_ns=created,
            updated_ns=created,
            deadline_ns=deadline_ns,
            project_id=spec.project_id,
            coordinator=self._instance,
        )
        if parent is not None:
            record.parent_task_id = parent.task_id
            record.step_id = step_id
            record.role = role
            record.depth = parent.depth + 1
        return record

    def cancel_child(self, task_id: str, reason: str, *, code: str = PLAN_CANCELLED) -> None:
        """Cancel a task its parent no longer needs (no-op once it finished).

        ``code`` is the error reason the child ends with (``PLAN_STEP_CANCELLED`` for a
        step its plan stopped, ``PARENT_TASK_ENDED`` for a sub-task of a task that ended).
        """
        rt = self._tasks.active.get(task_id)
        if rt is None or rt.record.terminal:
            return
        if rt.record.is_plan:
            # A plan (say, a sub-task whose parent ended) stops with its saga.
            self._plans.cancel(rt, reason)
            return
        self.finish(
            rt,
            CANCELLED,
            reason=reason,
            error=common_pb2.ErrorDetail(code="CANCELLED", reason=code, message=reason),
        )

    async def _find_idempotent(self, owner: str, key: str) -> TaskRecord | None:
        task_id = self._idempotency.get((owner, key))
        if task_id is None:
            row = await self._store.find_by_idempotency_key(owner, key)
            # Another submission with the key may have won while we read.
            task_id = self._idempotency.get((owner, key)) or (row.task_id if row else None)
            if task_id is None:
                return None
        rt = self._tasks.get(task_id)
        row = None if rt is not None else await self._store.get_task(task_id)
        record = rt.record if rt is not None else convert.record_from_row(row) if row else None
        if record is not None and idempotency_expired(record, self.settings.idempotency_window):
            # Past the window the key is free: this submission is a new task.
            if self._idempotency.get((owner, key)) == task_id:
                del self._idempotency[(owner, key)]
            await self._store.release_idempotency_key(owner, key, task_id)
            winner = self._idempotency.get((owner, key))  # a concurrent resubmission
            rt = self._tasks.get(winner) if winner else None
            return rt.record if rt is not None else None
        return record

    # -- reads -----------------------------------------------------------------------

    async def _load(
        self, task_id: str, caller: Caller, *, field_name: str = "task_id"
    ) -> TaskRecord:
        if not task_id:
            raise InvalidArgument(violations=[FieldViolation(field_name, "required")])
        rt = self._tasks.get(task_id)
        if rt is not None:
            record = rt.record
        else:
            row = await self._store.get_task(task_id)
            if row is None:
                raise await purged_or_unknown(self._store, task_id, caller)
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
        parent_task_id: str = "",
        project_id: str = "",
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
            if value not in VALID_STATES
        ]
        if violations:
            raise InvalidArgument(violations=violations)
        if owner and not caller.may_access(owner):
            raise PermissionDenied("only admins may list other owners' tasks")
        if not caller.admin:
            owner = caller.identity
        size = 50 if page_size <= 0 else min(page_size, 500)
        fingerprint = hashlib.sha256(
            repr((wanted, capability, owner, parent_task_id, project_id)).encode()
        ).hexdigest()[:16]
        before = convert.decode_page_token(page_token, fingerprint) if page_token else None
        # State changes are written behind; make the listing see all of them.
        await self._store.flush()
        rows = await self._store.list_tasks(
            TaskQuery(
                states=wanted,
                capability=capability,
                owner=owner,
                parent_task_id=parent_task_id,
                project_id=project_id,
                before=before,
                limit=size + 1,
            )
        )
        more = len(rows) > size
        rows = rows[:size]
        records = []
        for row in rows:
            rt = self._tasks.get(row.task_id)
            records.append(rt.record if rt is not None else convert.record_from_row(row))
        token = (
            convert.encode_page_token(rows[-1].created_ns, rows[-1].task_id, fingerprint)
            if more
            else ""
        )
        return records, token

    # -- projects --------------------------------------------------------------------

    async def create_project(
        self, caller: Caller, *, name: str, goal: str, attributes: dict[str, str]
    ) -> coordinator_pb2.Project:
        """Create a project owned by the caller.

        Raises:
            InvalidArgument: A bad name, goal or attributes.
        """
        self._require_running()
        return await self._projects.create(caller, name=name, goal=goal, attributes=attributes)

    async def get_project(self, project_id: str, caller: Caller) -> coordinator_pb2.Project:
        """A project with its tasks' aggregate progress.

        Raises:
            NotFound: No such project visible to the caller.
        """
        await self._store.flush()
        return await self._projects.get(project_id, caller)

    async def list_projects(
        self, caller: Caller, *, page_size: int = 0, page_token: str = ""
    ) -> tuple[list[coordinator_pb2.Project], str]:
        """One page of the projects the caller may see, newest first."""
        return await self._projects.list(caller, page_size=page_size, page_token=page_token)

    async def _load_project(
        self, project_id: str, caller: Caller, *, field_name: str
    ) -> coordinator_pb2.Project:
        return await self._projects.load(project_id, caller, field_name=field_name)

    async def project_of_owner(self, project_id: str, caller: Caller) -> coordinator_pb2.Project:
        """A project the caller owns (any project for an admin), without progress.

        Raises:
            NotFound: No such project, or one the caller does not own.
        """
        return await self._projects.load(project_id, caller)

    def add_spec_check(self, check: SpecCheck) -> None:
        """Run ``check`` on every valid spec before it is accepted (webhook URLs...)."""
        self._spec_checks.append(check)

    def listen(self, listener: EventListener) -> None:
        """Call ``listener`` with every task event once it has committed."""
        self._journal.listen(listener)

    def discard_finished(self, task_ids: Iterable[str]) -> None:
        """Forget finished tasks the store deleted (a dead-letter purge)."""
        for task_id in task_ids:
            rt = self._tasks.discard(task_id)
            if rt is not None:
                self._forget(rt)

    def list_agents(self, capability: str = "") -> list[AgentView]:
        """The agents the coordinator can route to."""
        return self._pool.views(capability)

    def queue_depth(self) -> int:
        """How many tasks wait: ready for an agent, or in a retry backoff."""
        return self._scheduler.depth()

    # -- watching --------------------------------------------------------------------

    def snapshot_event(self, record: TaskRecord) -> TaskEvent:
        """A snapshot event of a task (never stored; sequence = its last sequence)."""
        return self._journal.snapshot(record)

    def follow(
        self, task_id: str, after: int, *, outcome_only: bool = False
    ) -> AsyncIterator[TaskEvent]:
        """A task's committed events after ``after``, then live (no access check).

        ``outcome_only``: only the events an outcome-only stream keeps (``Journal.follow``).
        """
        return self._journal.follow(task_id, after, outcome_only=outcome_only)

    async def watch(
        self,
        task_id: str,
        caller: Caller,
        *,
        after_sequence: int = 0,
        include_snapshot: bool = False,
        outcome_only: bool = False,
    ) -> AsyncIterator[TaskEvent]:
        """Open a task's event stream: stored events after ``after_sequence``, then live.

        Validation happens here, before the stream starts. ``outcome_only`` passes on
        only the events an outcome-only stream keeps (``Journal.follow``), after the
        snapshot if one is asked for.

        Returns:
            The events, ending after the task's last event.

        Raises:
            InvalidArgument: No task id.
            NotFound: No such task visible to the caller.
        """
        record = await self._load(task_id, caller)
        snapshot = self.snapshot_event(record) if include_snapshot else None
        return self._journal.follow(
            task_id, after_sequence, first=snapshot, outcome_only=outcome_only
        )

    async def stream(
        self,
        spec: coordinator_pb2.TaskSpec | None,
        caller: Caller,
        *,
        correlation_id: str | None = None,
        outcome_only: bool = False,
    ) -> AsyncIterator[TaskEvent]:
        """Submit a task and open its event stream, starting with a snapshot.

        ``outcome_only``: after the snapshot, only the events an outcome-only stream
        keeps (``Journal.follow``).
        """
        record, _ = await self.submit(spec, caller, correlation_id=correlation_id)
        snapshot = self.snapshot_event(record)
        return self._journal.follow(
            record.task_id, snapshot.sequence, first=snapshot, outcome_only=outcome_only
        )

    # -- cancel and input ------------------------------------------------------------

    async def cancel(
        self, task_id: str, caller: Caller, reason: str = "", *, forward: bool = True
    ) -> TaskRecord:
        """Cancel a task; cancelling a cancelled task changes nothing.

        A task another coordinator runs is cancelled there (``forward``).

        Raises:
            NotFound: No such task visible to the caller.
            FailedPrecondition: The task already finished otherwise.
        """
        record = await self._load(task_id, caller)
        if record.state == CANCELLED:
            return record
        rt = self._tasks.active.get(task_id)
        if rt is None and not record.terminal and self._cluster is not None:
            request = coordinator_pb2.CancelTaskRequest(task_id=task_id, reason=reason)
            return await self._on_owner(record, "cancel", request, caller, forward)
        if rt is None or record.terminal:
            raise FailedPrecondition(
                f"task {task_id} already finished ({state_name(record.state)})",
                [("TASK_STATE", f"task/{task_id}", f"task is {state_name(record.state)}")],
                reason="TASK_ALREADY_FINISHED",
            )
        message = reason or f"cancelled by {caller.identity}"
        error = common_pb2.ErrorDetail(code="CANCELLED", reason="CANCELLED", message=message)
        with bind_task(task_id):
            logger.info("task cancelled by %s: %s", caller.identity, reason or "no reason given")
        if record.is_plan:
            # Steps are cancelled and succeeded ones compensated before the plan ends.
            self._plans.cancel(rt, message)
            await self._store.flush()
            return rt.record
        await self.finish(rt, CANCELLED, reason=reason or "cancelled by client", error=error)
        return rt.record

    async def provide_input(
        self,
        task_id: str,
        response: common_pb2.InputResponse | None,
        caller: Caller,
        *,
        forward: bool = True,
    ) -> TaskRecord:
        """Answer a task's pending input request.

        The answer to a task another coordinator runs goes to that one (``forward``).

        Raises:
            InvalidArgument: No task id, no response or no request id, or an answer
                that breaks the rules of a task's input (its size, a content type).
            NotFound: No such task visible to the caller.
            FailedPrecondition: The task is not waiting for this input.
        """
        if response is None:
            raise InvalidArgument(violations=[FieldViolation("response", "required")])
        if not response.request_id:
            raise InvalidArgument(violations=[FieldViolation("response.request_id", "required")])
        # An answer is input to the task: the same limit, so that it also fits the one
        # message that carries it to the agent (an agent link carries no bigger frame).
        violations = payload_violations(response.value, self.settings, "response.value")
        if violations:
            raise InvalidArgument(violations=violations)
        record = await self._load(task_id, caller)
        rt = self._tasks.active.get(task_id)
        if rt is None and not record.terminal and self._cluster is not None:
            request = coordinator_pb2.ProvideInputRequest(task_id=task_id, response=response)
            return await self._on_owner(record, "input", request, caller, forward)
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
        committed = self._journal.emit(
            rt,
            state_changed=coordinator_pb2.StateChange(
                from_state=INPUT_REQUIRED,
                to_state=RUNNING,
                reason="input provided",
                agent_id=record.agent_id,
            ),
        )
        answered = record.snapshot()
        # A yes to a tool approval gets the coordinator's signed grant (approvals.py).
        response = endorse(self._approvals, task_id, pending, response, caller.identity)
        await attempt.send(agent_pb2.ExecuteRequest(input=response))
        await committed
        return answered

    # -- several coordinators (cluster.py) ---------------------------------------------

    async def _parent_elsewhere(self, parent_id: str) -> str:
        """The coordinator running a sub-task's parent when it is another one, else ""."""
        if not parent_id or self._cluster is None or parent_id in self._tasks.active:
            return ""
        row = await self._store.get_task(parent_id)
        if row is None or row.state in TERMINAL_STATES:
            return ""
        return row.coordinator if row.coordinator not in ("", self._instance) else ""

    async def _on_owner(
        self, record: TaskRecord, op: str, request: Message, caller: Caller, forward: bool
    ) -> TaskRecord:
        """Run ``op`` on the coordinator that owns the task; the task it answers."""
        assert self._cluster is not None
        owner = record.coordinator
        if not forward or not owner or owner == self._instance:
            # Claimed here and not yet resumed, or a forward that found it moved on.
            raise Unavailable(
                f"task {record.task_id} is moving between coordinators; retry",
                retry_after=1.0,
            )
        data = await self._cluster.request(
            owner, op, request.SerializeToString(), caller=caller.identity
        )
        return convert.record_from_task(coordinator_pb2.Task.FromString(data))

    async def answer(self, op: str, caller: str, body: bytes, correlation_id: str) -> bytes:
        """Run a request another coordinator forwarded (cluster.py); its answer."""
        who = self.caller(caller)
        if op == "cancel":
            cancel = coordinator_pb2.CancelTaskRequest.FromString(body)
            record = await self.cancel(cancel.task_id, who, cancel.reason, forward=False)
        elif op == "input":
            given = coordinator_pb2.ProvideInputRequest.FromString(body)
            response = given.response if given.HasField("response") else None
            record = await self.provide_input(given.task_id, response, who, forward=False)
        elif op == "submit":
            spec = coordinator_pb2.SubmitTaskRequest.FromString(body).spec
            record, deduplicated = await self.submit(
                spec, who, correlation_id=correlation_id or None, forward=False
            )
            return coordinator_pb2.SubmitTaskResponse(
                task=convert.task_to_proto(record), deduplicated=deduplicated
            ).SerializeToString()
        else:
            raise InvalidArgument(violations=[FieldViolation("op", f"unknown request {op!r}")])
        return convert.task_to_proto(record).SerializeToString()

    async def take_over(self, rows: Sequence[TaskRow], previous: str) -> None:
        """Recover tasks claimed from a coordinator that died (cluster.py)."""
        if self._closing:
            return
        fresh = [row for row in rows if row.task_id not in self._tasks.active]
        metrics.TASKS_TAKEN_OVER.inc(len(fresh))
        await self._resume(
            fresh,
            why=f"coordinator {previous} stopped; {self._instance} took the task over",
        )
        self.wake()

    def drop(self, task_id: str) -> None:
        """Let go of a task another coordinator took over: stop its attempt, forget it.

        Its watchers here go on following it from the store (the journal).
        """
        rt = self._tasks.drop(task_id)
        if rt is None:
            return
        metrics.TASKS_LET_GO.inc()
        with bind_task(task_id):
            logger.info("this coordinator lets the task go (another one may own it now)")
        self._plans.forget(task_id)
        if rt.record.project_id:
            self._projects.task_ended(rt.record.project_id)
        self._subtasks.pop(task_id, None)
        self._deadlines.disarm(rt.record.task_id)
        self._scheduler.remove(task_id)
        attempt, rt.attempt = rt.attempt, None
        if attempt is not None and attempt.task is not None and not attempt.task.done():
            attempt.task.cancel()
        if self._cluster is not None:
            self._cluster.forget(task_id)
        rt.notify()

    def abandon(self) -> None:
        """Let go of every task (this coordinator's lease may have lapsed, cluster.py)."""
        active = list(self._tasks.active)
        for task_id in active:
            self.drop(task_id)
        logger.warning("let go of %d tasks; peers or a later claim take them", len(active))

    # -- attempts ------------------------------------------------------------------

    def _spawn_attempt(self, rt: TaskRuntime, attempt: Attempt) -> asyncio.Task[None]:
        """Run an attempt the scheduler started (scheduler.py) in the background."""
        task = self._spawn(
            self._run_attempt(rt, attempt), name=f"attempt-{rt.record.task_id}-{attempt.number}"
        )
        # Cancelled in the turn it was spawned (a deadline, a drop), the coroutine never
        # runs, nor its ``finally``: the slot is given back here too (then a no-op).
        task.add_done_callback(lambda _task: self._pool.release(attempt.lease, "none"))
        return task

    async def _run_attempt(self, rt: TaskRuntime, attempt: Attempt) -> None:
        record = rt.record
        verdict: Verdict = "none"
        stream: AttemptStream | None = None
        with (
            bind_task(record.task_id),
            tracing.resumed(
                record.spec.metadata,
                f"attempt {record.capability}",
                attributes={"hivewire.task_id": record.task_id, "hivewire.attempt": attempt.number},
            ),
        ):
            try:
                stream = open_stream(
                    attempt.lease,
                    timeout=(record.deadline_ns - now_ns()) / 1e9,
                    metadata=call_metadata(record, attempt.number),
                    link=self.settings.agent_link,
                    buffer_bytes=self.settings.link_buffer_bytes,
                )
                await stream.send(
                    agent_pb2.ExecuteRequest(assign=assignment(record, attempt.number))
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
                        await stream.finish(self.settings.cancel_grace)
                        break
                    if rt.uncommitted > self.settings.journal_backlog_bytes:
                        # The store is behind: take no more until it catches up.
                        await self._journal.catch_up(rt, self.settings.journal_backlog_bytes)
                metrics.ATTEMPTS.labels("answered").inc()
            except AttemptError as err:
                verdict = err.verdict
                metrics.ATTEMPTS.labels("broken").inc()
                detail = err.detail
                if not attempt.answered and detail.code == "UNAVAILABLE":
                    # The agent never got the task (gone, not yet deregistered): not a
                    # failure of the task, so it does not use up an attempt.
                    detail.reason = UNREACHABLE
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

    def _ensure_running(self, rt: TaskRuntime, attempt: Attempt) -> None:
        record = rt.record
        if record.state != ASSIGNED:
            return
        record.state = RUNNING
        self._journal.emit(
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
        self, rt: TaskRuntime, attempt: Attempt, message: agent_pb2.ExecuteResponse
    ) -> bool:
        """Apply one agent message; returns True when it ends the attempt."""
        kind = message.WhichOneof("kind")
        final = kind in ("result", "error")
        record = rt.record
        if record.terminal or rt.attempt is not attempt:
            # The task moved on (cancelled, past its deadline): only the end matters.
            if final:
                close_attempt(record, attempt.number, self._message_error(message))
            return final
        if kind == "started":
            self._ensure_running(rt, attempt)
        elif kind == "progress":
            self._ensure_running(rt, attempt)
            record.progress = message.progress
            self._journal.emit(rt, publish="task.progress", progress=message.progress)
        elif kind == "partial":
            self._ensure_running(rt, attempt)
            self._journal.partial(rt, message.partial)
        elif kind == "activity":
            self._ensure_running(rt, attempt)
            self._journal.emit(rt, write_row=False, activity=message.activity)
        elif kind == "input_required":
            self._ensure_running(rt, attempt)
            previous = record.state
            record.state = INPUT_REQUIRED
            record.pending_input = message.input_required
            self._journal.emit(
                rt,
                state_changed=coordinator_pb2.StateChange(
                    from_state=previous,
                    to_state=INPUT_REQUIRED,
                    reason="the agent asks for input",
                    agent_id=record.agent_id,
                ),
            )
            self._journal.emit(
                rt, publish="task.input_required", input_required=message.input_required
            )
        elif kind == "result":
            add_usage(record.usage, message.result.usage)
            close_attempt(record, attempt.number, None)
            self.finish(
                rt, SUCCEEDED, reason="the agent returned a result", output=message.result.output
            )
        elif kind == "error":
            add_usage(record.usage, message.error.usage)
            self._attempt_failed(rt, attempt, message.error.error)
        else:
            logger.warning("agent %s sent an empty message; ignored", attempt.lease.agent_id)
        return final

    @staticmethod
    def _message_error(message: agent_pb2.ExecuteResponse) -> common_pb2.ErrorDetail | None:
        return message.error.error if message.WhichOneof("kind") == "error" else None

    def _attempt_failed(
        self, rt: TaskRuntime, attempt: Attempt, error: common_pb2.ErrorDetail
    ) -> None:
        """The agent reported an error: cancel ack, deadline, retry or final failure."""
        record = rt.record
        close_attempt(record, attempt.number, error)
        if error.code == "DEADLINE_EXCEEDED" or error.reason == "DEADLINE_EXCEEDED":
            self.finish(rt, FAILED, reason="deadline exceeded", error=deadline_error())
        elif error.retryable:
            self._retry(rt, attempt, error)
        else:
            self.finish(rt, FAILED, reason=f"the agent failed: {error.reason}", error=error)

    def _attempt_broken(
        self, rt: TaskRuntime, attempt: Attempt, error: common_pb2.ErrorDetail
    ) -> None:
        """The call failed without an answer from the agent."""
        record = rt.record
        if record.terminal or rt.attempt is not attempt:
            close_attempt(record, attempt.number, error)
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

    def _retry(self, rt: TaskRuntime, attempt: Attempt, error: common_pb2.ErrorDetail) -> None:
        record = rt.record
        failures = counted_failures(record)
        if failures >= record.spec.max_attempts:
            self.finish(
                rt,
                DEAD_LETTERED,
                reason=f"{failures} attempts failed; the last with {error.reason}",
                error=error,
            )
            return
        # Grows with every attempt (also uncounted ones), so a task bouncing between
        # unreachable agents backs off too.
        backoff = backoff_seconds(
            max(failures, len(record.attempts)),
            initial=self.settings.retry_initial_backoff,
            maximum=self.settings.retry_max_backoff,
        )
        previous = record.state
        rt.attempt = None
        rt.avoid_agent(attempt.lease.agent_id)
        record.state = QUEUED
        record.agent_id = ""
        record.pending_input = None
        record.not_before_ns = now_ns() + int(backoff * 1e9)
        self._journal.emit(
            rt,
            publish="task.retried",
            publish_extra={"backoff": convert.duration(backoff), "error": error},
            retry=coordinator_pb2.TaskRetry(
                failed_attempt=attempt.number, error=error, backoff=convert.duration(backoff)
            ),
        )
        self._journal.emit(
            rt,
            state_changed=coordinator_pb2.StateChange(
                from_state=previous,
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
        self._scheduler.enqueue(rt)

    # -- finishing -------------------------------------------------------------------

    def finish(
        self,
        rt: TaskRuntime,
        state: common_pb2.TaskState.ValueType,
        *,
        reason: str,
        **ending: Unpack[Ending],
    ) -> asyncio.Future[None]:
        """End a task in a terminal state; the future resolves once it has committed.

        Plans end their parent with it (``reports`` go out with its last event).
        """
        output, error = ending.get("output"), ending.get("error")
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
        self._scheduler.remove(record.task_id)
        if record.attempts and not record.attempts[-1].HasField("ended_at"):
            close_attempt(record, record.attempts[-1].attempt, error)
        self._journal.emit(
            rt,
            state_changed=coordinator_pb2.StateChange(
                from_state=previous,
                to_state=state,
                reason=reason,
                agent_id=record.agent_id,
            ),
        )
        finished = coordinator_pb2.TaskFinished(state=state, usage=record.usage)
        convert.copy_present(finished, output=output, error=error)
        committed = self._journal.emit(
            rt, publish=_FINISHED_TYPES[state], reports=ending.get("reports", ()), finished=finished
        )
        self._deadlines.disarm(rt.record.task_id)
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
        self._tasks.retire(rt)
        self._end_family(record)
        metrics.TASKS_FINISHED.labels(state_name(state)).inc()
        with bind_task(record.task_id):
            logger.info("task %s: %s", state_name(state), reason)
        return committed

    def _held_by_subtasks(self, parent: TaskRuntime) -> int:
        held = 0
        for child_id in self._subtasks.get(parent.record.task_id, ()):
            child = self._tasks.active.get(child_id)
            if child is not None:
                held += max(child.record.spec.token_budget - child.record.usage.total_tokens, 0)
        return held

    def _end_family(self, record: TaskRecord) -> None:
        """A task ended: its sub-tasks are cancelled, its parent and project told."""
        for child_id in sorted(self._subtasks.pop(record.task_id, ())):
            self.cancel_child(child_id, f"parent task {record.task_id} ended", code=_PARENT_ENDED)
        if record.role == coordinator_pb2.TASK_ROLE_SUBTASK:
            parent = self._tasks.active.get(record.parent_task_id)
            if parent is not None:
                # What a sub-task spent counts against its parent's budget.
                add_usage(parent.record.usage, record.usage)
            siblings = self._subtasks.get(record.parent_task_id)
            if siblings is not None:
                siblings.discard(record.task_id)
                if not siblings:
                    del self._subtasks[record.parent_task_id]
        if record.project_id:
            self._projects.task_ended(record.project_id)

    def _forget(self, rt: TaskRuntime) -> None:
        spec = rt.record.spec
        if spec.idempotency_key:
            key = (rt.record.owner, spec.idempotency_key)
            if self._idempotency.get(key) == rt.record.task_id:
                del self._idempotency[key]

    async def _cancel_attempt(self, attempt: Attempt, reason: str) -> None:
        """Tell the agent to stop; end the call if it does not within the grace period."""
        await attempt.send(
            agent_pb2.ExecuteRequest(cancel=agent_pb2.CancelExecution(reason=reason))
        )
        task = attempt.task
        if task is not None and not await ended_within(task, self.settings.cancel_grace):
            logger.warning(
                "agent %s did not stop within %.1fs; ending the call",
                attempt.lease.agent_id,
                self.settings.cancel_grace,
            )
            task.cancel()

    def _arm_deadline(self, rt: TaskRuntime) -> None:
        self._deadlines.arm(rt.record.task_id, rt.record.deadline_ns)

    def _deadline_passed(self, task_id: str) -> None:
        rt = self._tasks.active.get(task_id)
        if rt is None or rt.record.terminal or self._closing:
            return
        if rt.record.is_plan:
            self._plans.deadline_passed(rt)
            return
        self.finish(rt, FAILED, reason="deadline exceeded", error=deadline_error())

    # -- recovery --------------------------------------------------------------------

    async def _recover(self) -> None:
        if self._cluster is not None:
            # Only tasks nobody owns: a live peer's are its own, a dead one's are
            # taken over once its lease expires.
            rows = await self._cluster.join(self)
        else:
            rows = await self._store.active_tasks()
        await self._resume(rows, why="coordinator restarted; the task runs again as a new attempt")

    async def _resume(self, rows: Sequence[TaskRow], *, why: str) -> None:
        """Take unfinished tasks into memory: queue them, re-run interrupted attempts
        as new ones, resume plans.
        """
        resumed = requeued = 0
        plans: list[TaskRuntime] = []
        for row in rows:
            record = convert.record_from_row(row)
            record.last_sequence = max(
                record.last_sequence, await self._store.last_sequence(record.task_id)
            )
            rt = TaskRuntime(record, row.spec)
            self._tasks.add(rt)
            if record.spec.idempotency_key:
                self._idempotency[(record.owner, record.spec.idempotency_key)] = record.task_id
            if record.project_id:
                self._projects.task_started(record.project_id)
            if record.role == coordinator_pb2.TASK_ROLE_SUBTASK:
                self._subtasks.setdefault(record.parent_task_id, set()).add(record.task_id)
            if record.is_plan:
                plans.append(rt)
                continue
            if record.state in ACTIVE_DISPATCH_STATES:
                previous = record.state
                close_attempt(
                    record,
                    record.attempt,
                    common_pb2.ErrorDetail(
                        code="UNAVAILABLE",
                        reason=RESTARTED,
                        message=f"the attempt was interrupted: {why}",
                        retryable=True,
                    ),
                )
                record.state = QUEUED
                record.agent_id = ""
                record.pending_input = None
                self._journal.emit(
                    rt,
                    state_changed=coordinator_pb2.StateChange(
                        from_state=previous,
                        to_state=QUEUED,
                        reason=why,
                    ),
                )
                resumed += 1
            else:
                requeued += 1
            self._arm_deadline(rt)
            self._scheduler.enqueue(rt)
        for rt in plans:
            children = [
                convert.record_from_row(r) for r in await self._store.children(rt.record.task_id)
            ]
            with bind_task(rt.record.task_id):
                self._plans.recover(rt, children, self._tasks.get)
            if not rt.record.terminal:
                # Armed only now: a deadline that passed while the coordinator was down
                # must find the plan resumed, to run its saga.
                self._arm_deadline(rt)
        for parent_id in [p for p in self._subtasks if p not in self._tasks.active]:
            # Their parent ended while the coordinator was down.
            for child_id in sorted(self._subtasks.pop(parent_id)):
                self.cancel_child(child_id, f"parent task {parent_id} ended", code=_PARENT_ENDED)
        if rows:
            logger.info(
                "took %d unfinished tasks: %d queued, %d interrupted attempts re-queued, "
                "%d plans resumed",
                len(rows),
                requeued,
                resumed,
                len(plans),
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
        for value in (
            common_pb2.PRIORITY_LOW,
            common_pb2.PRIORITY_MEDIUM,
            common_pb2.PRIORITY_HIGH,
            common_pb2.PRIORITY_CRITICAL,
        ):
            name = common_pb2.Priority.Name(value).removeprefix("PRIORITY_").lower()
            metrics.QUEUE_DEPTH.labels(name).set_function(partial(self._count_queued, value))
        metrics.bind_memory(self.memory)

    def memory(self) -> dict[str, int]:
        """Entries of each in-memory structure keyed by task (see docs/performance.md).

        Every one is bounded: by the unfinished tasks, or by a setting. A count that
        grows with finished tasks is a leak.
        """
        return {
            "active_tasks": len(self._tasks.active),
            "finished_cache": self._tasks.finished_count,
            "idempotency_keys": len(self._idempotency),
            "queue_entries": self._scheduler.queue.heap_entries,
            "delayed_retries": len(self._scheduler.delayed),
            "background_tasks": len(self._background),
            "plans_running": len(self._plans),
            "plan_children": self._plans.children_count,
            "subtask_parents": len(self._subtasks),
            "projects_active": self._projects.active_count,
        }

    def _count_state(self, state: int) -> int:
        return sum(1 for rt in list(self._tasks.active.values()) if rt.record.state == state)

    def _count_queued(self, priority: int) -> int:
        return sum(
            1
            for rt in list(self._tasks.active.values())
            if rt.record.state == QUEUED and rt.record.priority == priority
        )


def _remaining_budget(parent: TaskRecord, asked: int, *, held: int) -> int:
    """The token budget of a child: what it asked, within what its parent has left.

    ``held`` is what the parent's other running children may still spend.
    """
    budget = parent.spec.token_budget
    if not budget:
        return asked
    left = max(budget - parent.usage.total_tokens - held, 1)
    return min(asked, left) if asked else left
