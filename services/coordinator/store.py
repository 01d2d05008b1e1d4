"""The coordinator's storage interface: what any backend must keep, and how.

The coordinator's durable state is tasks (one row each: indexed columns plus the
serialized ``Task``), each task's event journal (rows keyed by ``(task_id,
sequence)``, the sequence gap-free from 1), idempotency keys (unique per owner) and
projects. :class:`TaskStore` is the one interface the domain code uses; the
embedded backend is :class:`~hivewire.services.coordinator.sqlite_store.SqliteTaskStore`.

Rules every backend keeps (the contract suite in ``tests/unit/test_coordinator_store.py``
checks them):

* Writes are queued, never block, and commit in the order they were queued; the
  future :meth:`TaskStore.put` returns resolves once they are durable.
* A read issued after a write sees it.
* Several updates of one task in one batch collapse into the last one; events are
  only ever inserted.
* An event's outbox entry (:attr:`EventRow.outbox`) commits with the event, and
  :meth:`TaskStore.outbox_next` hands entries out in commit order until
  :meth:`TaskStore.outbox_done` records them published (``coordinator/outbox.py``).
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

__all__ = [
    "EventRow",
    "OutboxItem",
    "ProjectRow",
    "ProjectSummary",
    "StoreError",
    "TERMINAL_STATES",
    "TaskQuery",
    "TaskRow",
    "TaskStore",
    "Tombstone",
    "consume_exception",
    "settle",
]

#: ``TaskState`` values a task never leaves (succeeded, failed, cancelled, dead-lettered).
TERMINAL_STATES = frozenset({5, 6, 7, 8})


class StoreError(Exception):
    """The store is closed or a storage operation failed."""


@dataclass(frozen=True)
class TaskRow:
    """One stored task.

    Attributes:
        task_id: The task's id.
        owner: SPIFFE id of the submitter.
        capability: The capability asked for ("" for a plan).
        state: ``TaskState`` value.
        priority: ``Priority`` value.
        created_ns: Acceptance time, ns since the epoch (the listing order).
        updated_ns: Last change, ns since the epoch.
        deadline_ns: When the task must be finished, ns since the epoch.
        idempotency_key: The submitter's key, or "" for none.
        not_before_ns: Earliest time of the next attempt (retry backoff), 0 for none.
        last_sequence: Sequence of the task's latest event.
        spec: The serialized ``coordinator.v1.TaskSpec``; written once, never updated
            (it can be large, so state changes do not rewrite it).
        data: The serialized ``coordinator.v1.Task`` without its spec.
        parent_task_id: The plan or task this one is a step or sub-task of, "" for none.
        project_id: The project the task belongs to, "" for none.
        coordinator: The coordinator instance that owns the task (JetStream store with
            several coordinators), "" for none.
    """

    task_id: str
    owner: str
    capability: str
    state: int
    priority: int
    created_ns: int
    updated_ns: int
    deadline_ns: int
    idempotency_key: str
    not_before_ns: int
    last_sequence: int
    spec: bytes
    data: bytes
    parent_task_id: str = ""
    project_id: str = ""
    coordinator: str = ""


@dataclass(frozen=True)
class EventRow:
    """One stored task event.

    Attributes:
        task_id: The task it belongs to.
        sequence: Its position in the task's history, from 1 without gaps.
        data: The serialized ``coordinator.v1.TaskEvent``.
        outbox: Its outbox entry: the encoded NATS events that report it, to publish
            once committed (``coordinator/outbox.py``); empty for none.
    """

    task_id: str
    sequence: int
    data: bytes
    outbox: bytes = b""


@dataclass(frozen=True)
class OutboxItem:
    """One committed outbox entry not yet recorded as published.

    Attributes:
        position: Its place in the store's commit order (increasing; the store's own
            numbering, only meaningful to :meth:`TaskStore.outbox_done`).
        entry: :attr:`EventRow.outbox` as committed.
    """

    position: int
    entry: bytes


@dataclass(frozen=True)
class TaskQuery:
    """A filtered, keyset-paginated listing of tasks, newest first.

    Attributes:
        states: Only these ``TaskState`` values; empty means all.
        capability: Only this capability; empty means all.
        owner: Only this owner; empty means all.
        parent_task_id: Only steps and sub-tasks of this task; empty means all.
        project_id: Only tasks of this project; empty means all.
        before: Only tasks strictly older than this ``(created_ns, task_id)`` cursor.
        limit: At most this many rows.
    """

    states: tuple[int, ...] = ()
    capability: str = ""
    owner: str = ""
    parent_task_id: str = ""
    project_id: str = ""
    before: tuple[int, str] | None = None
    limit: int = 50


@dataclass(frozen=True)
class ProjectRow:
    """One stored project.

    Attributes:
        project_id: The project's id.
        owner: SPIFFE id of its creator.
        created_ns: Creation time, ns since the epoch.
        data: The serialized ``coordinator.v1.Project`` (without aggregates).
    """

    project_id: str
    owner: str
    created_ns: int
    data: bytes


@dataclass(frozen=True)
class ProjectSummary:
    """Aggregates over a project's tasks.

    Attributes:
        tasks_by_state: How many of its tasks are in each ``TaskState``.
        rows: The rows of its root tasks (no parent): each carries its tree's usage.
    """

    tasks_by_state: dict[int, int] = field(default_factory=dict)
    rows: Sequence[TaskRow] = ()


@dataclass(frozen=True)
class Tombstone:
    """What is left of a purged task.

    Attributes:
        task_id: The purged task's id.
        owner: Its owner (only they and admins learn it was purged).
        purged_ns: When it was purged, ns since the epoch.
    """

    task_id: str
    owner: str
    purged_ns: int


class TaskStore(Protocol):
    """What the coordinator needs from its durable store.

    The stores are also async context managers (``async with`` opens and closes them).
    """

    async def open(self) -> None:
        """Open the store."""
        ...

    async def close(self) -> None:
        """Commit what is queued and close."""
        ...

    def put(
        self, *, tasks: Sequence[TaskRow] = (), events: Sequence[EventRow] = ()
    ) -> asyncio.Future[None]:
        """Queue task upserts and event inserts; the future resolves once durable."""
        ...

    async def flush(self) -> None:
        """Wait until every write queued so far is durable."""
        ...

    async def get_task(self, task_id: str) -> TaskRow | None:
        """A task's row, or None."""
        ...

    async def find_by_idempotency_key(self, owner: str, key: str) -> TaskRow | None:
        """The task an owner submitted with an idempotency key, if any."""
        ...

    async def active_tasks(self) -> list[TaskRow]:
        """Every task not in a terminal state, oldest first (for recovery)."""
        ...

    async def list_tasks(self, query: TaskQuery) -> list[TaskRow]:
        """Tasks matching a query, newest first."""
        ...

    async def children(self, parent_task_id: str) -> list[TaskRow]:
        """Every step and sub-task of a task, oldest first."""
        ...

    async def events_after(
        self, task_id: str, after: int, *, until: int | None = None, limit: int = 1000
    ) -> list[EventRow]:
        """A task's events with ``after < sequence <= until``, in order."""
        ...

    async def last_sequence(self, task_id: str) -> int:
        """The sequence of a task's latest stored event (0 when none)."""
        ...

    async def count_tasks(self) -> int:
        """How many tasks are stored."""
        ...

    async def delete_finished(self, task_ids: Sequence[str]) -> list[str]:
        """Delete finished tasks and their events (durably); returns the ids deleted.

        Tasks that are not stored or not in a terminal state are left alone.
        """
        ...

    async def put_project(self, project: ProjectRow) -> None:
        """Store a new project (durably)."""
        ...

    async def get_project(self, project_id: str) -> ProjectRow | None:
        """A project's row, or None."""
        ...

    async def list_projects(
        self, *, owner: str, before: tuple[int, str] | None, limit: int
    ) -> list[ProjectRow]:
        """Projects newest first, of one owner ("" for all)."""
        ...

    async def project_summary(self, project_id: str) -> ProjectSummary:
        """Aggregates over a project's tasks."""
        ...

    async def release_idempotency_key(self, owner: str, key: str, task_id: str) -> None:
        """Take an expired idempotency key off the task that holds it (durably)."""
        ...

    async def purge_finished(self, before_ns: int, *, limit: int, now: int) -> int:
        """Delete up to ``limit`` tasks finished before ``before_ns`` with their events.

        Each leaves a :class:`Tombstone` stamped ``now``. One short transaction.

        Returns:
            How many tasks were deleted.
        """
        ...

    async def prune_tombstones(self, before_ns: int, *, limit: int) -> int:
        """Delete up to ``limit`` tombstones made before ``before_ns``; how many."""
        ...

    async def tombstone(self, task_id: str) -> Tombstone | None:
        """The tombstone of a purged task, or None."""
        ...

    # -- the event outbox (coordinator/outbox.py) -------------------------------------

    async def outbox_next(self, after: int, *, limit: int) -> list[OutboxItem]:
        """Committed outbox entries past ``after``, oldest first; waits for one.

        ``after`` is 0 on the first call of a process (everything not yet marked
        done), then the position of the last item returned before.
        """
        ...

    async def outbox_done(self, position: int) -> None:
        """Record every outbox entry up to ``position`` as published."""
        ...


# -- what both stores' worker queues use ----------------------------------------------


def settle(future: asyncio.Future[Any], result: Any, error: BaseException | None) -> None:
    """Resolve a caller's future with a result or an error (not if it is done already)."""
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


def consume_exception(future: asyncio.Future[None]) -> None:
    """Done callback of a write nobody awaits: its failure is already logged."""
    if not future.cancelled():
        future.exception()
