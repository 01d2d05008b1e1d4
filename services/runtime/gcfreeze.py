"""Short full collections while a process holds a large heap: :class:`CollectorFreezer`.

CPython's cyclic garbage collector runs a full collection once the objects promoted to
its oldest generation since the last one exceed a quarter of those the last one left,
and a full collection walks every tracked object it has with the process stopped. A
coordinator with 100,000 tasks waiting tracks about a million objects: a full collection
stops it for 0.4-3 s on the project machine (docs/performance.md, "A queue of 100,000").

The freezer watches full collections (``gc.callbacks``). When one took longer than
``budget`` seconds, what survived it is moved to the permanent generation
(``gc.freeze()``), which collections never walk: the next full collections walk only
what came since. A frozen object is still freed as soon as nothing refers to it, but a
reference cycle among frozen objects is not, and nothing cheap tells how many frozen
objects are such garbage. So a freeze does not last: the first full collection that
starts ``thaw_after`` seconds or more after the freeze that followed the last thaw
unfreezes everything first (``gc.unfreeze()``), walks it once and frees what cycles were
held; if it took longer than the budget, its survivors are frozen again. A cycle thus
outlives its use by at most ``thaw_after`` plus the time to the next full collection,
and a large heap costs one full walk per ``thaw_after`` instead of one per quarter of
growth.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable

__all__ = ["CollectorFreezer"]

_OLDEST = 2


class CollectorFreezer:
    """Freezes the survivors of a full collection that took too long (see the module).

    Args:
        budget: Seconds a full collection may stop the process before its survivors
            are frozen; 0 freezes after every full collection.
        thaw_after: Seconds after a freeze from which the next full collection unfreezes
            everything first (the longest a frozen cycle may be held, give or take the
            time to that collection).
        clock: Seconds, monotonic (``time.perf_counter``; tests pass their own).
    """

    def __init__(
        self,
        budget: float = 0.05,
        *,
        thaw_after: float = 300.0,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        if budget < 0:
            raise ValueError("budget must be >= 0")
        if thaw_after <= 0:
            raise ValueError("thaw_after must be > 0")
        self._budget = budget
        self._thaw_after = thaw_after
        self._clock = clock
        self._started: float | None = None
        self._frozen_since: float | None = None
        self.freezes = 0
        """Freezes made since :meth:`install`."""
        self.thaws = 0
        """Unfreezes made since :meth:`install`."""
        self.longest = 0.0
        """The longest full collection seen, in seconds (a thaw's walk included)."""
        self.failures = 0
        """Callbacks that raised (a bug: the callback cannot log inside the collector)."""

    def install(self, *, frozen: bool = False) -> None:
        """Start watching full collections.

        Args:
            frozen: Something is frozen already (the start-up heap): it is thawed with
                the rest ``thaw_after`` seconds from now.
        """
        if self._callback in gc.callbacks:
            return
        if frozen:
            self._frozen_since = self._clock()
        gc.callbacks.append(self._callback)

    def uninstall(self) -> None:
        """Stop watching (what is frozen stays frozen)."""
        if self._callback in gc.callbacks:
            gc.callbacks.remove(self._callback)

    def _callback(self, phase: str, info: dict[str, int]) -> None:
        # Runs inside the collector, on whichever thread triggered it: nothing here may
        # raise, log or wait (a lock held by another thread), and nothing here walks
        # the heap (gc.get_freeze_count does, in CPython 3.11).
        if info.get("generation") != _OLDEST:
            return
        try:
            now = self._clock()
            if phase == "start":
                since = self._frozen_since
                if since is not None and now - since >= self._thaw_after:
                    gc.unfreeze()  # this collection walks it, freeing what cycles it held
                    self.thaws += 1
                    self._frozen_since = None
                self._started = now
            elif self._started is not None:
                took = now - self._started
                self._started = None
                self.longest = max(self.longest, took)
                if took > self._budget or self._budget == 0:
                    gc.freeze()
                    self.freezes += 1
                    if self._frozen_since is None:
                        self._frozen_since = now
        except Exception:  # the collector must never fail because of this
            self.failures += 1
