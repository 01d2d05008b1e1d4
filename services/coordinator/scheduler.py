"""The scheduling loop: which queued task starts on which agent, and when.

Tasks wait in the priority queue (:mod:`.queue`) or, during a retry backoff, in a heap
of due times. Each round promotes the tasks whose backoff is over, then takes the best
queued task whose capability has a free agent (:mod:`.dispatch`) and starts an attempt:
the task is ``ASSIGNED`` (an event of its journal) and the coordinator runs the
``Execute`` call (``run``). A round runs whenever :meth:`Scheduler.wake` is called (a
task queued, an agent joined, a slot freed) or the next backoff ends, and at once
when a task is submitted (:meth:`Scheduler.submit`).
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import logging
from collections.abc import Callable

from hivewire.common.v1 import common_pb2
from hivewire.coordinator.v1 import coordinator_pb2
from hivewire.services.coordinator import convert, metrics
from hivewire.services.coordinator.attempts import Attempt
from hivewire.services.coordinator.dispatch import AgentLease, AgentPool
from hivewire.services.coordinator.journal import Journal, TaskRuntime, TaskTable
from hivewire.services.coordinator.model import ASSIGNED, FAILED, QUEUED, now_ns
from hivewire.services.coordinator.queue import QueueEntry, TaskQueue

logger = logging.getLogger(__name__)

__all__ = ["Scheduler"]

#: Ends a task in a terminal state: ``finish(rt, state, reason=..., error=...)``.
Finish = Callable[..., object]
#: Runs a started attempt (the ``Execute`` call) as a background task.
RunAttempt = Callable[[TaskRuntime, Attempt], "asyncio.Task[None]"]


class Scheduler:
    """The queue of tasks waiting for an agent, and the loop that dispatches them.

    Args:
        tasks: The tasks in memory.
        journal: Where the ``ASSIGNED`` change is recorded.
        pool: The agents.
        aging_interval: Seconds of waiting worth one priority level.
        finish: Ends a task (a task whose token budget is spent fails here).
        run: Runs a started attempt.
        may_dispatch: Whether attempts may start now (False while this coordinator's
            lease is in doubt, cluster.py).
    """

    def __init__(
        self,
        *,
        tasks: TaskTable,
        journal: Journal,
        pool: AgentPool,
        aging_interval: float,
        finish: Finish,
        run: RunAttempt,
        may_dispatch: Callable[[], bool],
    ) -> None:
        self.queue = TaskQueue(aging_interval=aging_interval)
        self.delayed: list[tuple[int, int, str]] = []
        self._delay_counter = itertools.count()
        self._kick = asyncio.Event()
        self._tasks = tasks
        self._journal = journal
        self._pool = pool
        self._finish = finish
        self._run = run
        self._may_dispatch = may_dispatch

    def wake(self) -> None:
        """Run a round soon (agents changed, slots freed, a task queued)."""
        self._kick.set()

    def enqueue(self, rt: TaskRuntime) -> None:
        """Queue a task: ready now, or once its retry backoff is over."""
        record = rt.record
        if record.not_before_ns > now_ns():
            heapq.heappush(
                self.delayed, (record.not_before_ns, next(self._delay_counter), record.task_id)
            )
        else:
            self._push(rt)
        self.wake()

    def submit(self, rt: TaskRuntime) -> None:
        """Queue a task just submitted and run a round at once when it is ready now.

        Its ``ASSIGNED`` change is then queued for the store in the same loop turn as its
        ``QUEUED`` one, so both commit in one transaction, and the assignment goes to the
        agent a turn sooner (docs/performance.md, "One task at c=1"). The round takes
        the best waiting task as any round does, so priorities hold.
        """
        if rt.record.not_before_ns > now_ns():
            self.enqueue(rt)
            return
        self._push(rt)
        self._round()

    def _push(self, rt: TaskRuntime) -> None:
        record = rt.record
        self.queue.push(
            record.task_id,
            capability=record.capability,
            priority=record.priority,
            enqueued_at=rt.enqueued_at,
        )
        rt.queued_mono = asyncio.get_running_loop().time()

    def remove(self, task_id: str) -> None:
        """Take a task out of the queue (it finished or left this coordinator)."""
        self.queue.remove(task_id)

    def depth(self) -> int:
        """How many tasks wait: ready for an agent, or in a retry backoff."""
        backing_off = {
            task_id
            for _, _, task_id in self.delayed
            if (rt := self._tasks.active.get(task_id)) is not None and rt.record.state == QUEUED
        }
        return len(self.queue) + len(backing_off - set(self.queue.task_ids()))

    async def run(self) -> None:
        """The loop: a round at every wake-up and when the next backoff ends."""
        while True:
            self._kick.clear()
            self._round()
            delay = None
            if self.delayed:
                delay = max((self.delayed[0][0] - now_ns()) / 1e9, 0.0)
            try:
                async with asyncio.timeout(delay):
                    await self._kick.wait()
            except TimeoutError:
                pass

    def _round(self) -> None:
        try:
            self._promote_due()
            self._dispatch_ready()
        except Exception:
            logger.exception("scheduler round failed")

    def _promote_due(self) -> None:
        now = now_ns()
        while self.delayed and self.delayed[0][0] <= now:
            _, _, task_id = heapq.heappop(self.delayed)
            rt = self._tasks.active.get(task_id)
            if rt is None or rt.record.state != QUEUED:
                continue
            rt.record.not_before_ns = 0
            self.enqueue(rt)

    def _dispatch_ready(self) -> None:
        waiting: list[QueueEntry] = []
        try:
            self._dispatch_round(waiting)
        finally:
            # Tasks that wait for a particular agent go back with their place kept.
            for entry in waiting:
                self.queue.push(
                    entry.task_id,
                    capability=entry.capability,
                    priority=entry.priority,
                    enqueued_at=entry.enqueued_at,
                )

    def _dispatch_round(self, waiting: list[QueueEntry]) -> None:
        if not self._may_dispatch():
            # Peers may be taking this coordinator's tasks over: start nothing until a
            # heartbeat succeeds again (it wakes the scheduler).
            return
        while True:
            entry = self.queue.pop_best(self._pool.has_capacity)
            if entry is None:
                return
            rt = self._tasks.active.get(entry.task_id)
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

    def _start_attempt(self, rt: TaskRuntime, lease: AgentLease) -> None:
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
        self._journal.emit(
            rt,
            publish="task.assigned",
            state_changed=coordinator_pb2.StateChange(
                from_state=previous,
                to_state=ASSIGNED,
                reason=f"assigned to agent {lease.agent_id}",
                agent_id=lease.agent_id,
            ),
        )
        attempt = Attempt(number=record.attempt, lease=lease)
        rt.attempt = attempt
        attempt.task = self._run(rt, attempt)
