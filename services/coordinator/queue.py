"""The ready queue: priority order, FIFO within a priority, aging against starvation.

Each waiting task gets a fixed score when it is queued::

    score = enqueued_at - rank(priority) * aging_interval

with ``rank`` 3 for critical, 2 for high, 1 for medium and 0 for low, and the
lowest score runs first. Within one priority that is plain FIFO (earlier
``enqueued_at`` first, ties in arrival order). Across priorities a higher priority
is worth ``aging_interval`` seconds of waiting per level: a high task queued now
beats a low task queued up to ``2 * aging_interval`` seconds ago, but a low task
that has waited longer than that beats every high task queued after it. So under
any sustained stream of higher-priority work, a low task waits at most
``3 * aging_interval`` seconds plus the time to run what was queued ahead of it:
it cannot starve. Because a score never changes, one heap per capability keeps
the order without re-sorting.

Tasks are queued per capability: the scheduler asks for the best task among the
capabilities that have a free agent right now (:meth:`TaskQueue.pop_best`).
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

__all__ = ["PRIORITY_RANK", "QueueEntry", "TaskQueue"]

#: Rank of each ``Priority`` value (low=1 ... critical=4); unknown values rank as medium.
PRIORITY_RANK: dict[int, int] = {1: 0, 2: 1, 3: 2, 4: 3}

_COMPACT_MIN = 256
"""Heaps this long are compacted when most of their entries are removed ones."""


@dataclass(order=True)
class QueueEntry:
    """A queued task.

    Attributes:
        score: Sort key (lower runs first); see the module docstring.
        order: Arrival counter, the FIFO tie-breaker.
        task_id: The task.
        capability: The capability it needs.
        priority: Its ``Priority`` value.
        enqueued_at: When it started waiting, in seconds (any clock, used consistently).
    """

    score: float
    order: int
    task_id: str = field(compare=False)
    capability: str = field(compare=False)
    priority: int = field(compare=False)
    enqueued_at: float = field(compare=False)
    removed: bool = field(default=False, compare=False, repr=False)


class TaskQueue:
    """Per-capability heaps of waiting tasks with aging (not thread-safe; one event loop).

    Args:
        aging_interval: Seconds of waiting worth one priority level.
    """

    def __init__(self, *, aging_interval: float) -> None:
        if aging_interval <= 0:
            raise ValueError("aging_interval must be positive")
        self._aging = aging_interval
        self._heaps: dict[str, list[QueueEntry]] = {}
        self._entries: dict[str, QueueEntry] = {}
        # Removed entries still in each capability's heap (lazy deletion).
        self._stale: dict[str, int] = {}
        self._counter = itertools.count()

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, task_id: object) -> bool:
        return task_id in self._entries

    def __iter__(self) -> Iterator[QueueEntry]:
        return iter(list(self._entries.values()))

    def task_ids(self) -> list[str]:
        """Ids of the queued tasks (any order)."""
        return list(self._entries)

    def score(self, priority: int, enqueued_at: float) -> float:
        """The score a task with this priority queued at this time gets."""
        return enqueued_at - PRIORITY_RANK.get(priority, 1) * self._aging

    def push(
        self, task_id: str, *, capability: str, priority: int, enqueued_at: float
    ) -> QueueEntry:
        """Queue a task (replacing an earlier entry of the same task).

        Args:
            task_id: The task.
            capability: The capability it needs.
            priority: Its ``Priority`` value.
            enqueued_at: When it started waiting; a retried task keeps its original time
                so it does not lose its place.

        Returns:
            The new entry.
        """
        self.remove(task_id)
        entry = QueueEntry(
            score=self.score(priority, enqueued_at),
            order=next(self._counter),
            task_id=task_id,
            capability=capability,
            priority=priority,
            enqueued_at=enqueued_at,
        )
        self._entries[task_id] = entry
        heapq.heappush(self._heaps.setdefault(capability, []), entry)
        return entry

    @property
    def heap_entries(self) -> int:
        """Entries in the heaps, removed ones not yet dropped included."""
        return sum(len(heap) for heap in self._heaps.values())

    def remove(self, task_id: str) -> bool:
        """Take a task out of the queue (cancelled, expired). Returns whether it was queued."""
        entry = self._entries.pop(task_id, None)
        if entry is None:
            return False
        # Lazy deletion: the heap drops it when it reaches the top...
        entry.removed = True
        capability = entry.capability
        stale = self._stale[capability] = self._stale.get(capability, 0) + 1
        heap = self._heaps.get(capability)
        if heap is not None and len(heap) > _COMPACT_MIN and 2 * stale > len(heap):
            # ...or now, when removed entries stuck behind a waiting one are most of the
            # heap (cancelled or expired tasks of a capability no agent serves).
            heap[:] = [e for e in heap if not e.removed]
            heapq.heapify(heap)
            self._stale.pop(capability, None)
        return True

    def _top(self, capability: str) -> QueueEntry | None:
        heap = self._heaps.get(capability)
        while heap and heap[0].removed:
            heapq.heappop(heap)
            self._stale[capability] -= 1
        if not heap:
            self._heaps.pop(capability, None)
            self._stale.pop(capability, None)
            return None
        return heap[0]

    def peek(self, capability: str) -> QueueEntry | None:
        """The next task of a capability, without taking it."""
        return self._top(capability)

    def capabilities(self) -> list[str]:
        """Capabilities with at least one waiting task."""
        return [cap for cap in list(self._heaps) if self._top(cap) is not None]

    def pop_best(self, eligible: Callable[[str], bool]) -> QueueEntry | None:
        """Take the lowest-score task among the capabilities ``eligible`` accepts.

        Args:
            eligible: Whether a capability can run a task now (a free agent exists).

        Returns:
            The entry, or None when no eligible capability has a waiting task.
        """
        best: QueueEntry | None = None
        for capability in self.capabilities():
            top = self._top(capability)
            if top is None or not eligible(capability):
                continue
            if best is None or top < best:
                best = top
        if best is None:
            return None
        heapq.heappop(self._heaps[best.capability])
        del self._entries[best.task_id]
        return best

    def depth_by_priority(self) -> dict[int, int]:
        """How many tasks wait at each ``Priority`` value."""
        depth: dict[int, int] = {}
        for entry in self._entries.values():
            depth[entry.priority] = depth.get(entry.priority, 0) + 1
        return depth

    def depth_by_capability(self) -> dict[str, int]:
        """How many tasks wait for each capability."""
        depth: dict[str, int] = {}
        for entry in self._entries.values():
            depth[entry.capability] = depth.get(entry.capability, 0) + 1
        return depth
