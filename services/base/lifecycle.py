"""Start/stop plumbing written once: ``async with`` for long-lived objects, task shutdown.

A long-lived object (a server, a publisher, a registry, a store) has a start method and
a stop method, and ``async with obj:`` runs them. Subclass :class:`StartStop` (``start``
and ``stop``) or :class:`StartClose` (``start`` and ``close``) instead of writing
``__aenter__``/``__aexit__`` again. :func:`cancel_and_wait` is the "cancel every
background task, then wait for each and swallow its cancellation" loop of a stop method.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterable
from types import TracebackType
from typing import Any, Self

__all__ = ["StartClose", "StartStop", "cancel_and_wait"]


class _Entered:
    """``async with`` calls ``start()`` on entry and :meth:`_leave` on exit."""

    async def start(self) -> None:
        """Start the object (subclasses implement it)."""
        raise NotImplementedError

    async def _leave(self) -> None:
        raise NotImplementedError

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self._leave()


class StartStop(_Entered):
    """``async with`` calls :meth:`start` on entry and :meth:`stop` on exit."""

    async def stop(self) -> None:
        """Stop the object (subclasses implement it)."""
        raise NotImplementedError

    async def _leave(self) -> None:
        await self.stop()


class StartClose(_Entered):
    """``async with`` calls :meth:`start` on entry and :meth:`close` on exit."""

    async def close(self) -> None:
        """Close the object (subclasses implement it)."""
        raise NotImplementedError

    async def _leave(self) -> None:
        await self.close()


async def cancel_and_wait(
    tasks: Iterable[asyncio.Task[Any] | None],
    *,
    suppress: tuple[type[BaseException], ...] = (),
) -> None:
    """Cancel every task, then wait for each to end; its cancellation is not an error.

    Args:
        tasks: The tasks (None entries, for a task never started, are skipped).
        suppress: Further exceptions a task may end with that are swallowed too (a
            stop method that must not fail because a background loop did). Any other
            exception a task ended with is raised.
    """
    started = [task for task in tasks if task is not None]
    for task in started:
        task.cancel()
    for task in started:
        with contextlib.suppress(asyncio.CancelledError, *suppress):
            await task
