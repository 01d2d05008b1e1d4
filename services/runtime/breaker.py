"""A generic async circuit breaker: closed, open, half-open with a single probe.

One breaker guards one dependency (a model backend, an agent instance...). While
*closed*, calls go through and consecutive failures are counted; at
``failure_threshold`` the breaker *opens* and rejects calls at once with
:class:`CircuitOpenError` for ``reset_timeout`` seconds. After that it is
*half-open*: exactly one caller is let through as a probe while every other caller
is still rejected. The probe's success closes the breaker; its failure opens it for
another ``reset_timeout``. A probe that ends without a verdict (cancelled, or an
error the caller does not count as a failure of the dependency) frees the slot for
the next caller.

The breaker knows nothing about gRPC or HTTP: the caller decides what counts as a
failure, either with :meth:`CircuitBreaker.call`'s ``is_failure`` predicate or by
calling :meth:`CircuitBreaker.record_failure` itself.

Example::

    breaker = CircuitBreaker("ollama", failure_threshold=5, reset_timeout=30.0)
    async with breaker.call(is_failure=lambda exc: isinstance(exc, ConnectionError)):
        await talk_to_backend()
"""

from __future__ import annotations

import enum
import logging
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass

logger = logging.getLogger(__name__)


class CircuitState(enum.Enum):
    """Where a breaker is; the value is the number exported as a metric."""

    CLOSED = 0
    OPEN = 1
    HALF_OPEN = 2


class CircuitOpenError(Exception):
    """Raised instead of calling a dependency whose circuit is open.

    Attributes:
        name: The breaker's name.
        retry_after: Seconds until the breaker lets a probe through (0 when a probe
            is already in flight and its outcome is what the caller waits for).
    """

    def __init__(self, name: str, retry_after: float) -> None:
        """Create the error.

        Args:
            name: The breaker's name.
            retry_after: Seconds until a call may be tried again.
        """
        self.name = name
        self.retry_after = max(retry_after, 0.0)
        super().__init__(f"circuit {name!r} is open; retry in {self.retry_after:.1f}s")


@dataclass(frozen=True)
class BreakerOptions:
    """Tuning of a :class:`CircuitBreaker`.

    Attributes:
        failure_threshold: Consecutive failures that open a closed breaker.
        reset_timeout: Seconds an open breaker waits before letting one probe through.
    """

    failure_threshold: int = 5
    reset_timeout: float = 30.0

    def __post_init__(self) -> None:
        if self.failure_threshold < 1:
            raise ValueError("failure_threshold must be at least 1")
        if self.reset_timeout < 0:
            raise ValueError("reset_timeout must not be negative")


StateListener = Callable[[str, CircuitState], None]
"""Called with ``(breaker name, new state)`` on every transition (metrics, logs)."""


def _count_every_exception(exc: BaseException) -> bool:
    return isinstance(exc, Exception)


class CircuitBreaker:
    """Closed / open / half-open circuit breaker for one dependency.

    Not thread-safe: use it from one event loop. All methods are synchronous and
    cheap, so it adds no awaits to the guarded call.
    """

    def __init__(
        self,
        name: str,
        *,
        failure_threshold: int = 5,
        reset_timeout: float = 30.0,
        on_state_change: StateListener | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """Create a closed breaker.

        Args:
            name: What it guards, for errors, logs and metrics.
            failure_threshold: Consecutive failures that open it.
            reset_timeout: Seconds it stays open before a half-open probe.
            on_state_change: Called on every state transition (also once now, with
                ``CLOSED``, so a gauge starts at the right value).
            clock: Monotonic time source, in seconds.
        """
        self.name = name
        self.options = BreakerOptions(failure_threshold, reset_timeout)
        self._listener = on_state_change
        self._clock = clock
        self._state = CircuitState.CLOSED
        self._failures = 0
        self._opened_at = 0.0
        self._probe_in_flight = False
        if self._listener is not None:
            self._listener(self.name, self._state)

    # -- state ---------------------------------------------------------------------

    @property
    def state(self) -> CircuitState:
        """The current state; an open breaker whose timeout passed reads half-open."""
        if (
            self._state is CircuitState.OPEN
            and self._clock() - self._opened_at >= self.options.reset_timeout
        ):
            self._transition(CircuitState.HALF_OPEN)
        return self._state

    @property
    def consecutive_failures(self) -> int:
        """Failures counted since the last success."""
        return self._failures

    def retry_after(self) -> float:
        """Seconds until the breaker lets a call through (0 when it would now)."""
        state = self.state
        if state is CircuitState.OPEN:
            return max(self.options.reset_timeout - (self._clock() - self._opened_at), 0.0)
        return 0.0

    def _transition(self, new: CircuitState) -> None:
        if new is self._state:
            return
        old, self._state = self._state, new
        if new is CircuitState.OPEN:
            self._opened_at = self._clock()
        if new is not CircuitState.HALF_OPEN:
            self._probe_in_flight = False
        level = logging.WARNING if new is CircuitState.OPEN else logging.INFO
        logger.log(level, "circuit %s: %s -> %s", self.name, old.name, new.name)
        if self._listener is not None:
            self._listener(self.name, new)

    # -- admission and verdicts ------------------------------------------------------

    def acquire(self) -> bool:
        """Ask to make one call.

        Returns:
            True when the call is this half-open breaker's probe, False for an
            ordinary call of a closed breaker. Pass it back to :meth:`record_success`,
            :meth:`record_failure` or :meth:`release`.

        Raises:
            CircuitOpenError: The breaker is open, or half-open with its probe taken.
        """
        state = self.state
        if state is CircuitState.CLOSED:
            return False
        if state is CircuitState.HALF_OPEN and not self._probe_in_flight:
            self._probe_in_flight = True
            return True
        raise CircuitOpenError(self.name, self.retry_after())

    def record_success(self, probe: bool = False) -> None:
        """Report that a call succeeded: the breaker closes and forgets past failures.

        Args:
            probe: What :meth:`acquire` returned for this call.
        """
        del probe  # any success proves the dependency works again
        self._failures = 0
        self._transition(CircuitState.CLOSED)

    def record_failure(self, probe: bool = False) -> None:
        """Report that a call failed because of the dependency.

        Args:
            probe: What :meth:`acquire` returned for this call.
        """
        self._failures += 1
        if probe or self._state is CircuitState.HALF_OPEN:
            # A failed probe re-opens for a full timeout (re-arming the clock).
            self._state_reopen()
        elif (
            self._state is CircuitState.CLOSED and self._failures >= self.options.failure_threshold
        ):
            self._transition(CircuitState.OPEN)

    def _state_reopen(self) -> None:
        if self._state is CircuitState.OPEN:
            self._opened_at = self._clock()
        else:
            self._transition(CircuitState.OPEN)

    def release(self, probe: bool) -> None:
        """End a call without a verdict (cancelled, or failed for a reason of its own).

        Args:
            probe: What :meth:`acquire` returned for this call; a probe's slot is
                freed so the next caller may probe.
        """
        if probe and self._state is CircuitState.HALF_OPEN:
            self._probe_in_flight = False

    @asynccontextmanager
    async def call(
        self, *, is_failure: Callable[[BaseException], bool] = _count_every_exception
    ) -> AsyncIterator[None]:
        """Guard one call: admit it, then record its outcome.

        A block that finishes records a success; an exception for which
        ``is_failure`` is true records a failure; anything else (cancellation, or
        an error the caller caused, such as a rejected request) records nothing.
        The exception always propagates.

        Args:
            is_failure: Whether an exception means the dependency failed. By default
                every ``Exception`` does; ``CancelledError`` never does.

        Raises:
            CircuitOpenError: Before the block runs, when the breaker rejects the call.
        """
        probe = self.acquire()
        try:
            yield
        except BaseException as exc:
            if is_failure(exc):
                self.record_failure(probe)
            else:
                self.release(probe)
            raise
        self.record_success(probe)


__all__ = [
    "BreakerOptions",
    "CircuitBreaker",
    "CircuitOpenError",
    "CircuitState",
    "StateListener",
]
