"""Projects: a named goal that groups tasks and plans, with aggregate progress.

A project is created once and never changes; tasks name it in ``TaskSpec.project_id``
(sub-tasks and plan steps inherit it). ``GetProject`` sums its tasks from the store:
how many are in each state, and what they consumed. ``project.created`` is published
when it is created and ``project.completed`` each time its last unfinished task ends
(so a project that gets new work later completes again).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import Mapping

from google.protobuf import struct_pb2

from hivewire.common.v1 import common_pb2
from hivewire.coordinator.v1 import coordinator_pb2
from hivewire.events.v1 import events_pb2
from hivewire.services.coordinator import convert
from hivewire.services.coordinator.attempts import add_usage
from hivewire.services.coordinator.journal import Journal
from hivewire.services.coordinator.model import TERMINAL_STATES, Caller, now_ns
from hivewire.services.coordinator.model import state_name as _state_name
from hivewire.services.coordinator.store import ProjectRow, StoreError, TaskStore
from hivewire.services.coordinator.validation import project_violations
from hivewire.services.runtime.errors import (
    AlreadyExists,
    FieldViolation,
    InvalidArgument,
    NotFound,
)

logger = logging.getLogger(__name__)

__all__ = ["Projects"]


class Projects:
    """Creates projects, answers for them and reports when their work is done.

    Args:
        store: The durable store.
        journal: Where ``project.*`` events are published.
    """

    def __init__(self, store: TaskStore, journal: Journal) -> None:
        self._store = store
        self._journal = journal
        # project id -> its tasks not finished yet (in this coordinator's memory)
        self._active: dict[str, int] = {}
        self._pending: set[asyncio.Task[None]] = set()

    async def create(
        self, caller: Caller, *, name: str, goal: str, attributes: Mapping[str, str]
    ) -> coordinator_pb2.Project:
        """Create a project owned by the caller.

        Raises:
            InvalidArgument: A bad name, goal or attributes.
        """
        violations = project_violations(name, goal, dict(attributes))
        if violations:
            raise InvalidArgument(violations=violations)
        created = now_ns()
        project = coordinator_pb2.Project(
            project_id=uuid.uuid4().hex,
            name=name,
            goal=goal,
            owner=caller.identity,
            attributes=dict(attributes),
            created_at=convert.timestamp_ns(created),
        )
        try:
            await self._store.put_project(
                ProjectRow(
                    project.project_id, caller.identity, created, project.SerializeToString()
                )
            )
        except StoreError as err:  # pragma: no cover - a random 128-bit id collided
            raise AlreadyExists("project", project.project_id) from err
        self._publish("project.created", project)
        logger.info("project %s (%s) created by %s", project.project_id, name, caller.identity)
        return project

    async def get(self, project_id: str, caller: Caller) -> coordinator_pb2.Project:
        """:meth:`load`, with the aggregate progress of the project's tasks."""
        project = await self.load(project_id, caller)
        summary = await self._store.project_summary(project_id)
        progress = coordinator_pb2.ProjectProgress()
        for state, count in sorted(summary.tasks_by_state.items()):
            progress.tasks_by_state.add(state=state, count=count)
            progress.total_tasks += count
            if state not in TERMINAL_STATES:
                progress.active_tasks += count
        usage = common_pb2.Usage()
        for row in summary.rows:
            # Roots only: a plan's usage sums its steps, a task's its sub-tasks.
            add_usage(usage, coordinator_pb2.Task.FromString(row.data).usage)
        progress.usage.CopyFrom(usage)
        project.progress.CopyFrom(progress)
        return project

    async def load(
        self, project_id: str, caller: Caller, *, field_name: str = "project_id"
    ) -> coordinator_pb2.Project:
        """A project visible to the caller, without progress.

        Raises:
            InvalidArgument: No project id.
            NotFound: No such project visible to the caller.
        """
        if not project_id:
            raise InvalidArgument(violations=[FieldViolation(field_name, "required")])
        row = await self._store.get_project(project_id)
        if row is None or not caller.may_access(row.owner):
            raise NotFound("project", project_id, reason="PROJECT_NOT_FOUND")
        return coordinator_pb2.Project.FromString(row.data)

    async def list(
        self, caller: Caller, *, page_size: int, page_token: str
    ) -> tuple[list[coordinator_pb2.Project], str]:
        """One page of the projects the caller may see, newest first."""
        size = 50 if page_size <= 0 else min(page_size, 500)
        owner = "" if caller.admin else caller.identity
        fingerprint = f"projects:{owner}"
        before = convert.decode_page_token(page_token, fingerprint) if page_token else None
        rows = await self._store.list_projects(owner=owner, before=before, limit=size + 1)
        more = len(rows) > size
        rows = rows[:size]
        token = (
            convert.encode_page_token(rows[-1].created_ns, rows[-1].project_id, fingerprint)
            if more
            else ""
        )
        return [coordinator_pb2.Project.FromString(r.data) for r in rows], token

    # -- completion --------------------------------------------------------------------

    @property
    def active_count(self) -> int:
        """Projects with unfinished tasks (for memory gauges)."""
        return len(self._active)

    def task_started(self, project_id: str) -> None:
        """A task of the project was accepted (or recovered)."""
        self._active[project_id] = self._active.get(project_id, 0) + 1

    def task_ended(self, project_id: str) -> None:
        """A task of the project ended; the last one completes the project."""
        left = self._active.get(project_id, 0) - 1
        if left > 0:
            self._active[project_id] = left
            return
        self._active.pop(project_id, None)
        task = asyncio.get_running_loop().create_task(
            self._completed(project_id), name=f"project-completed-{project_id}"
        )
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def _completed(self, project_id: str) -> None:
        try:
            await self._store.flush()
            row = await self._store.get_project(project_id)
            if row is None or self._active.get(project_id):
                return
            summary = await self._store.project_summary(project_id)
            project = coordinator_pb2.Project.FromString(row.data)
            counts = {_state_name(s): n for s, n in summary.tasks_by_state.items()}
            self._publish("project.completed", project, tasks_by_state=counts)
            logger.info("project %s completed: %s", project_id, counts)
        except StoreError:
            logger.exception("project %s: completion not published", project_id)

    async def stop(self) -> None:
        """Finish publishing completions in flight."""
        for task in list(self._pending):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    def _publish(
        self,
        event_type: str,
        project: coordinator_pb2.Project,
        *,
        tasks_by_state: Mapping[str, int] | None = None,
    ) -> None:
        attributes = struct_pb2.Struct()
        attributes.update(dict(project.attributes))
        data = events_pb2.ProjectEventData(
            project_id=project.project_id,
            name=project.name,
            attributes=attributes,
            owner=project.owner,
            tasks_by_state=dict(tasks_by_state or {}),
        )
        self._journal.publish(event_type, data, subject=project.project_id)
