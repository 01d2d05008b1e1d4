"""Short full collections while a process holds a large heap: :class:`CollectorFreezer`.

CPython's cyclic garbage collector runs a full collection once the objects promoted to
its oldest generation since the last one exceed a quarter of those already there, and a
full collection walks *every* tracked object with the event loop stopped. A coordinator
with 100,000 tasks waiting tracks about a million objects: each full collection stops
it for 0.6-3 s on the project machine (docs/performance.md, "A queue of 100,000").

The freezer watches full collections (``gc.callbacks``). When one took longer than
``budget`` seconds, what survived it is moved to the permanent generation
(``gc.freeze()``), which collections never walk: the next full collections walk only
what came since. A frozen object is still freed as soon as nothing refers to it; only a
reference cycle among frozen objects outlives its use. So the freeze does not last: at
the start of a full collection, once fewer than half of the objects frozen last time are
still alive (the backlog drained), everything is unfrozen first, and that collection
frees whatever cycles were held meanwhile. It walks at most half the heap that made the
freeze, and if that still takes longer than the budget its survivors are frozen again.
"""

from __future__ import annotations

import gc
import logging
import time
from typing import Any

logger = logging.getLogger(__name__)

__all__ = ["CollectorFreezer"]

_OLDEST = 2


class CollectorFreezer:
    """Freezes the survivors of a full collection that took too long (see the module).

    Args:
        budget: Seconds a full collection may stop the process before its survivors
            are frozen; 0 freezes after every full collection.
        clock: Seconds, monotonic (``time.perf_counter``; tests pass their own).
    """

    def __init__(self, budget: float = 0.05, *, clock: Any = time.perf_counter) -> None:
        if budget < 0:
            raise ValueError("budget must be >= 0")
        self._budget = budget
        self._clock = clock
        self._started: float | None = None
        self._frozen_last = 0
        self.freezes = 0
        """Freezes made since :meth:`install`."""
        self.thaws = 0
        """Unfreezes made since :meth:`install`."""
        self.longest = 0.0
        """The longest full collection seen, in seconds."""

    def install(self) -> None:
        """Start watching full collections; what is frozen already counts as frozen here."""
        if self._callback in gc.callbacks:
            return
        self._frozen_last = gc.get_freeze_count()
        gc.callbacks.append(self._callback)

    def uninstall(self) -> None:
        """Stop watching (what is frozen stays frozen)."""
        if self._callback in gc.callbacks:
            gc.callbacks.remove(self._callback)

    def _callback(self, phase: str, info: dict[str, int]) -> None:
        # Runs inside the collector, on whichever thread triggered it: nothing here may
        # raise, and it neither logs nor waits (a lock held by another thread).
        if info.get("generation") != _OLDEST:
            return
        try:
            if phase == "start":
                self._on_start()
            else:
                self._on_stop()
        except Exception:  # the collector must never fail because of this
            logger.exception("garbage collector freezer failed")

    def _on_start(self) -> None:
        frozen = gc.get_freeze_count()
        if self._frozen_last and frozen * 2 < self._frozen_last:
            # Fewer than half of them are alive: this collection walks the rest once and
            # frees whatever cycles they held.
            gc.unfreeze()
            self.thaws += 1
            self._frozen_last = 0
        self._started = self._clock()

    def _on_stop(self) -> None:
        if self._started is None:
            return
        took = self._clock() - self._started
        self._started = None
        self.longest = max(self.longest, took)
        if took <= self._budget and self._budget > 0:
            return
        gc.freeze()
        self._frozen_last = gc.get_freeze_count()
        self.freezes += 1
