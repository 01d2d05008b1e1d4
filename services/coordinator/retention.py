"""Bounded retention of finished work: idempotency windows and the purge of old tasks.

Two settings bound what the coordinator keeps (see docs/coordinator.md, "Retention"):

* ``idempotency_window`` (default 24 h): an idempotency key answers with the task it
  created only while that task is younger than the window. A resubmission after that
  is a new task; the old task keeps existing, without its key.
* ``task_retention`` (default 7 days; 0 keeps everything): a task finished longer ago
  than that is deleted with its event journal. What stays is a tombstone (id, owner,
  when), kept ``tombstone_retention`` (default 7 days) so that reading the id answers
  ``NOT_FOUND`` with reason ``TASK_PURGED`` instead of ``TASK_NOT_FOUND``.

The purge runs in the background every ``purge_interval`` seconds, in batches of
``purge_batch`` tasks: each batch is one short transaction on the store's thread, so
the event loop never waits for it and writes of running tasks go in between batches.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

from prometheus_client import Counter

from hivewire.services.base.lifecycle import StartStop, cancel_and_wait
from hivewire.services.coordinator.model import Caller, TaskRecord, now_ns
from hivewire.services.coordinator.settings import CoordinatorSettings
from hivewire.services.coordinator.store import TaskStore
from hivewire.services.runtime.errors import NotFound

logger = logging.getLogger(__name__)

__all__ = ["PurgeResult", "Retention", "idempotency_expired", "purged_or_unknown"]

TASKS_PURGED = Counter(
    "hivewire_coordinator_tasks_purged_total",
    "Finished tasks deleted with their events after task_retention.",
)


def idempotency_expired(record: TaskRecord, window: float, *, now: int | None = None) -> bool:
    """Whether a task is too old to answer a resubmission of its idempotency key."""
    return record.created_ns < (now if now is not None else now_ns()) - int(window * 1e9)


async def purged_or_unknown(store: TaskStore, task_id: str, caller: Caller) -> NotFound:
    """The error for a task id the store does not hold: purged, or never existed.

    Only the task's owner (or an admin) learns that it was purged; anyone else gets
    the same answer as for an id that never existed.
    """
    tomb = await store.tombstone(task_id)
    if tomb is not None and caller.may_access(tomb.owner):
        return NotFound(
            "task",
            task_id,
            f"task {task_id!r} finished more than the retention ago and was purged",
            reason="TASK_PURGED",
        )
    return NotFound("task", task_id, reason="TASK_NOT_FOUND")


@dataclass(frozen=True)
class PurgeResult:
    """What one purge round removed.

    Attributes:
        tasks: Finished tasks deleted (with their events).
        tombstones: Tombstones older than ``tombstone_retention`` deleted.
    """

    tasks: int = 0
    tombstones: int = 0


class Retention(StartStop):
    """The background purge of finished tasks (an async context manager).

    Args:
        store: The coordinator's store.
        settings: ``task_retention``, ``tombstone_retention``, ``purge_interval`` and
            ``purge_batch`` are read from here.
    """

    def __init__(self, store: TaskStore, settings: CoordinatorSettings) -> None:
        self._store = store
        self._settings = settings
        self._task: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()

    async def start(self) -> None:
        """Start the purge loop (none when ``task_retention`` is 0: tasks are kept)."""
        if self._settings.task_retention > 0:
            self._task = asyncio.create_task(self._loop(), name="coordinator-retention")

    async def stop(self) -> None:
        """Stop the purge loop."""
        await cancel_and_wait([self._task])
        self._task = None

    async def purge_once(self, *, now: int | None = None) -> PurgeResult:
        """Delete every task finished before the retention, batch by batch, now.

        Args:
            now: The current time in ns since the epoch (tests move it forward).

        Returns:
            How many tasks and tombstones were deleted.
        """
        cfg = self._settings
        if cfg.task_retention <= 0:
            return PurgeResult()
        now = now if now is not None else now_ns()
        tasks = tombstones = 0
        async with self._lock:
            before = now - int(cfg.task_retention * 1e9)
            while True:
                n = await self._store.purge_finished(before, limit=cfg.purge_batch, now=now)
                tasks += n
                TASKS_PURGED.inc(n)
                if n < cfg.purge_batch:
                    break
                # Let queued writes of running tasks commit between batches.
                await asyncio.sleep(0)
            stale = now - int(cfg.tombstone_retention * 1e9)
            while True:
                n = await self._store.prune_tombstones(stale, limit=cfg.purge_batch)
                tombstones += n
                if n < cfg.purge_batch:
                    break
                await asyncio.sleep(0)
        if tasks or tombstones:
            logger.info(
                "purged %d tasks finished over %.0fs ago, %d old tombstones",
                tasks,
                cfg.task_retention,
                tombstones,
            )
        return PurgeResult(tasks, tombstones)

    async def _loop(self) -> None:
        while True:
            try:
                await self.purge_once()
            except Exception:
                logger.exception("purging finished tasks failed; trying again later")
            await asyncio.sleep(self._settings.purge_interval)
