"""Dead letters an operator can act on: list them, run them again, delete them.

A task whose attempts are used up ends ``DEAD_LETTERED`` with its attempts and their
errors kept. From here an operator (an admin, by the default authorization policy):

* lists them, newest first, with the task each was requeued as;
* requeues one: a *new* task with the same spec, owned by the original owner, with a
  fresh series of attempts. The dead letter itself stays as it was (its history is the
  record of what went wrong). The new task's idempotency key is ``requeue:<dead
  letter's id>``, so asking twice returns the task made the first time, and the
  listing finds it again. Each requeue is published as ``task.requeued`` (subject: the
  dead letter) naming who asked and the new task: the audit trail.
* purges them: the tasks and their events are deleted from the store.

Everything goes through the coordinator's own submit, listing and access rules; only
the purge needs the store directly.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

from hivewire.common.v1 import common_pb2
from hivewire.coordinator.v1 import coordinator_pb2
from hivewire.events.v1 import events_pb2
from hivewire.services.coordinator.journal import CoordinatorEvents
from hivewire.services.coordinator.model import DEAD_LETTERED, Caller, TaskRecord
from hivewire.services.coordinator.service import Coordinator
from hivewire.services.coordinator.store import TaskStore
from hivewire.services.runtime.errors import FailedPrecondition, FieldViolation, InvalidArgument

logger = logging.getLogger(__name__)

__all__ = ["REQUEUE_KEY_PREFIX", "DeadLetter", "DeadLetters"]

REQUEUE_KEY_PREFIX = "requeue:"
"""Idempotency key prefix of a requeued task: ``requeue:<dead letter's task id>``."""

_PURGE_PAGE = 500


@dataclass(frozen=True)
class DeadLetter:
    """A dead-lettered task and the task it was requeued as ("" when it was not)."""

    record: TaskRecord
    requeued_as: str = ""


@dataclass(frozen=True, eq=False)
class DeadLetters:
    """List, requeue and purge dead-lettered tasks.

    Attributes:
        coordinator: The coordinator (submit, listing and access rules).
        store: Its store (for the purge and to find requeued tasks).
        events: Where ``task.requeued`` is published.
    """

    coordinator: Coordinator
    store: TaskStore
    events: CoordinatorEvents

    async def _requeued_as(self, record: TaskRecord) -> str:
        row = await self.store.find_by_idempotency_key(
            record.owner, REQUEUE_KEY_PREFIX + record.task_id
        )
        return row.task_id if row is not None else ""

    async def page(
        self,
        caller: Caller,
        *,
        capability: str = "",
        include_requeued: bool = False,
        page_size: int = 0,
        page_token: str = "",
    ) -> tuple[list[DeadLetter], str]:
        """One page of dead letters, newest first (a caller sees the ones it may access).

        Returns:
            The dead letters and the next page's token ("" on the last page). A page
            may hold fewer than ``page_size`` when requeued ones are left out.
        """
        records, token = await self.coordinator.list_tasks(
            caller,
            states=[DEAD_LETTERED],
            capability=capability,
            page_size=page_size,
            page_token=page_token,
        )
        letters = []
        for record in records:
            letter = DeadLetter(record, await self._requeued_as(record))
            if include_requeued or not letter.requeued_as:
                letters.append(letter)
        return letters, token

    async def requeue(
        self, task_id: str, caller: Caller, *, reason: str = ""
    ) -> tuple[TaskRecord, bool]:
        """Run a dead letter again as a new task with the same spec.

        Returns:
            The new task and whether it had been requeued before (then it is that task).

        Raises:
            InvalidArgument: No task id.
            NotFound: No such task visible to the caller.
            FailedPrecondition: The task is not dead-lettered.
        """
        dead = await self.coordinator.get(task_id, caller)
        if dead.state != DEAD_LETTERED:
            raise FailedPrecondition(
                f"task {task_id} is {common_pb2.TaskState.Name(dead.state)}, not dead-lettered",
                reason="TASK_NOT_DEAD_LETTERED",
                violations=[("TASK_STATE", task_id, "only dead-lettered tasks are requeued")],
            )
        spec = coordinator_pb2.TaskSpec()
        spec.CopyFrom(dead.spec)
        spec.idempotency_key = REQUEUE_KEY_PREFIX + dead.task_id
        # The new task belongs to the dead letter's owner, so they see and follow it.
        record, existed = await self.coordinator.submit(
            spec, Caller(identity=dead.owner), correlation_id=dead.correlation_id or None
        )
        if not existed:
            logger.info(
                "dead letter %s requeued as %s by %s%s",
                dead.task_id,
                record.task_id,
                caller.identity,
                f": {reason}" if reason else "",
            )
            self.events.publish(
                "task.requeued",
                subject=dead.task_id,
                data=events_pb2.TaskEventData(
                    task_id=dead.task_id,
                    state=DEAD_LETTERED,
                    capability=dead.capability,
                    priority=dead.priority,
                    owner=dead.owner,
                    attempt=dead.attempt,
                    actor=caller.identity,
                    requeued_as_task_id=record.task_id,
                    error=common_pb2.ErrorDetail(
                        code="OK", reason="REQUEUED", message=reason or "requeued"
                    ),
                ),
                correlation_id=dead.correlation_id or None,
            )
        return record, existed

    async def purge(
        self,
        caller: Caller,
        *,
        task_ids: Sequence[str] = (),
        dead_before_ns: int = 0,
        everything: bool = False,
    ) -> list[str]:
        """Delete dead letters and their events.

        Args:
            caller: Who asks (only dead letters it may access are deleted).
            task_ids: Delete these (each must be a dead letter the caller sees).
            dead_before_ns: Delete those last updated before this time.
            everything: Delete every dead letter the caller sees.

        Returns:
            The ids deleted.

        Raises:
            InvalidArgument: None or several of the three selections.
            NotFound: A listed task is not visible to the caller.
            FailedPrecondition: A listed task is not dead-lettered.
        """
        chosen = [bool(task_ids), bool(dead_before_ns), everything]
        if sum(chosen) != 1:
            raise InvalidArgument(
                "say which dead letters to purge: task_ids, dead_before or all (one of them)",
                violations=[FieldViolation("task_ids", "exactly one selection is required")],
                reason="PURGE_SELECTION_REQUIRED",
            )
        victims: list[str] = []
        if task_ids:
            for task_id in task_ids:
                record = await self.coordinator.get(task_id, caller)
                if record.state != DEAD_LETTERED:
                    raise FailedPrecondition(
                        f"task {task_id} is not dead-lettered",
                        reason="TASK_NOT_DEAD_LETTERED",
                        violations=[("TASK_STATE", task_id, "only dead letters are purged")],
                    )
                victims.append(task_id)
        else:
            token = ""
            while True:
                records, token = await self.coordinator.list_tasks(
                    caller, states=[DEAD_LETTERED], page_size=_PURGE_PAGE, page_token=token
                )
                victims += [
                    r.task_id for r in records if everything or r.updated_ns < dead_before_ns
                ]
                if not token:
                    break
        deleted = await self.store.delete_finished(victims)
        self.coordinator.discard_finished(deleted)
        if deleted:
            logger.info("%d dead letter(s) purged by %s", len(deleted), caller.identity)
        return deleted
