"""Start/stop plumbing written once: ``async with`` for long-lived objects, task shutdown.

A long-lived object (a server, a publisher, a registry, a store) has a start method and
a stop method, and ``async with obj:`` runs them. Subclass :class:`StartStop` (``start``
and ``stop``), :class:`StartClose` (``start`` and ``close``) or :class:`OpenClose`
(``open`` and ``close``) and define those methods instead of writing
``__aenter__``/``__aexit__`` again. :func:`cancel_and_wait` is the
"cancel every background task, then wait for each and swallow its cancellation" loop of
a stop method; :func:`ended_within` is the grace period a task asked to stop gets.
:class:`Drain` is the "take no new work, end once the open work has ended" step of
something that serves many calls at once (each end of an agent link).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Iterable
from types import TracebackType
from typing import Any, ClassVar, Self

__all__ = ["Drain", "OpenClose", "StartClose", "StartStop", "cancel_and_wait", "ended_within"]


class _Entered:
    """``async with`` awaits the method named ``_ENTER`` on entry and ``_LEAVE`` on exit.

    The subclass defines those methods; an empty ``_ENTER`` means nothing to do on entry
    (an object that is ready once built and only needs stopping).
    """

    _ENTER: ClassVar[str] = "start"
    _LEAVE: ClassVar[str] = "close"

    async def __aenter__(self) -> Self:
        if self._ENTER:
            await getattr(self, self._ENTER)()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await getattr(self, self._LEAVE)()


class StartStop(_Entered):
    """``async with`` calls ``start()`` on entry and ``stop()`` on exit."""

    _LEAVE = "stop"


class StartClose(_Entered):
    """``async with`` calls ``start()`` on entry and ``close()`` on exit."""


class OpenClose(_Entered):
    """``async with`` calls ``open()`` on entry and ``close()`` on exit."""

    _ENTER = "open"


async def cancel_and_wait(
    tasks: Iterable[asyncio.Task[Any] | None],
    *,
    suppress: tuple[type[BaseException], ...] = (),
) -> None:
    """Cancel every task, then wait for each to end; its cancellation is not an error.

    A cancellation of the caller that comes while it waits (a stop under a timeout) is
    raised, not taken for the awaited task's; one the caller was already unwinding from
    when it called (a stop in a ``finally`` or an exit stack) is not raised again.

    Args:
        tasks: The tasks (None entries, for a task never started, are skipped).
        suppress: Further exceptions a task may end with that are swallowed too (a
            stop method that must not fail because a background loop did). Any other
            exception a task ended with is raised.
    """
    started = [task for task in tasks if task is not None]
    for task in started:
        task.cancel()
    current = asyncio.current_task()
    unwinding = current.cancelling() if current is not None else 0
    for task in started:
        try:
            with contextlib.suppress(*suppress):
                await task
        except asyncio.CancelledError:
            if current is not None and current.cancelling() > unwinding:
                raise


async def ended_within(task: asyncio.Future[Any], seconds: float) -> bool:
    """Whether ``task`` has ended, or ends within ``seconds``.

    It is neither cancelled nor awaited (what it raised stays in it): the grace period a
    task asked to stop gets before its owner gives up on it.
    """
    if task.done():
        return True
    done, _ = await asyncio.wait({task}, timeout=seconds)
    return bool(done)


class Drain:
    """Take no new work; end once the open work has ended.

    The owner keeps its open work itself; it says when it is asked to drain
    (:meth:`start`) and each time a piece of work ends (:meth:`settle`), and refuses new
    work while :attr:`draining`.

    Args:
        idle: Whether no work is open now.
        end: What ends the owner; called when draining and idle (at once when
            :meth:`start` finds nothing open).
    """

    def __init__(self, *, idle: Callable[[], bool], end: Callable[[], None]) -> None:
        """Create the step; nothing drains until :meth:`start`."""
        self._idle = idle
        self._end = end
        self.draining = False
        """Whether :meth:`start` was called: new work is refused."""

    def start(self) -> None:
        """Take no new work; end now if none is open, else once the last has ended."""
        self.draining = True
        self.settle()

    def settle(self) -> None:
        """Some work ended: end when draining and none is left open."""
        if self.draining and self._idle():
            self._end()
