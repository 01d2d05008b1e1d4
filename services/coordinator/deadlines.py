"""One event-loop timer for every task's deadline.

A task waiting in a long queue should hold as few objects as it can: every full
collection of the garbage collector walks each object it tracks, and the event loop
stops while it does (docs/performance.md, "A queue of 100,000"). A ``call_later`` per
task is four tracked objects (the ``TimerHandle``, its bound method, its argument
tuple and the copied ``contextvars.Context``). Here a task costs one
``(deadline_ns, task_id)`` tuple in a heap, which the collector stops tracking once it
has seen that it holds only an int and a string, and one entry in a dict.

Disarming leaves the heap entry behind (it is skipped when it comes up); the heap is
rebuilt from the armed tasks whenever stale entries outnumber them, so it never holds
more than about twice the tasks that have a deadline.
"""

from __future__ import annotations

import asyncio
import heapq
import logging
from collections.abc import Callable

from hivewire.services.coordinator.model import now_ns

logger = logging.getLogger(__name__)

__all__ = ["Deadlines"]

_COMPACT_FLOOR = 64
"""Below this many heap entries, stale ones are left for the timer to skip."""


class Deadlines:
    """Calls ``on_due(task_id)`` once each armed task's deadline (wall clock, ns) passes.

    Args:
        on_due: Called on the event loop with the id of a task whose deadline passed;
            the task is disarmed first. It must not raise (an exception is logged).
        clock: Nanoseconds since the epoch, the clock deadlines are given in.
    """

    def __init__(self, on_due: Callable[[str], None], *, clock: Callable[[], int] = now_ns) -> None:
        self._on_due = on_due
        self._clock = clock
        self._heap: list[tuple[int, str]] = []
        self._armed: dict[str, int] = {}
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at: int | None = None

    def __len__(self) -> int:
        """Tasks armed now."""
        return len(self._armed)

    def __contains__(self, task_id: object) -> bool:
        """Whether ``task_id`` has a deadline armed."""
        return task_id in self._armed

    def arm(self, task_id: str, deadline_ns: int) -> None:
        """Call ``on_due(task_id)`` at ``deadline_ns``; replaces an earlier arming."""
        self._armed[task_id] = deadline_ns
        heapq.heappush(self._heap, (deadline_ns, task_id))
        if self._timer_at is None or deadline_ns < self._timer_at:
            self._schedule()
        self._compact_if_sparse()

    def disarm(self, task_id: str) -> None:
        """Forget ``task_id``'s deadline; a no-op when none is armed."""
        if self._armed.pop(task_id, None) is not None:
            self._compact_if_sparse()

    def clear(self) -> None:
        """Disarm everything and stop the timer (arming again starts it again)."""
        self._armed.clear()
        self._heap.clear()
        self._cancel_timer()

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer = None
        self._timer_at = None

    def _schedule(self) -> None:
        """Point the timer at the earliest live deadline (or at none)."""
        self._cancel_timer()
        heap = self._heap
        while heap and self._armed.get(heap[0][1]) != heap[0][0]:
            heapq.heappop(heap)
        if not heap:
            return
        due = heap[0][0]
        delay = max((due - self._clock()) / 1e9, 0.0)
        self._timer = asyncio.get_running_loop().call_later(delay, self._fire)
        self._timer_at = due

    def _fire(self) -> None:
        self._timer = None
        self._timer_at = None
        now = self._clock()
        heap, armed = self._heap, self._armed
        due: list[str] = []
        while heap and heap[0][0] <= now:
            deadline_ns, task_id = heapq.heappop(heap)
            if armed.get(task_id) == deadline_ns:
                del armed[task_id]
                due.append(task_id)
        self._schedule()
        for task_id in due:
            try:
                self._on_due(task_id)
            except Exception:
                logger.exception("task %s: handling its deadline failed", task_id)

    def _compact_if_sparse(self) -> None:
        heap, armed = self._heap, self._armed
        if len(heap) > _COMPACT_FLOOR and len(heap) > 2 * len(armed):
            self._heap = [(d, t) for d, t in heap if armed.get(t) == d]
            heapq.heapify(self._heap)
