"""The generic circuit breaker (services/runtime/breaker.py), on a hand-driven clock."""

from __future__ import annotations

import asyncio

import pytest

from hivewire.services.runtime.breaker import CircuitBreaker, CircuitOpenError, CircuitState


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def make(
    threshold: int = 3, reset: float = 10.0
) -> tuple[CircuitBreaker, Clock, list[CircuitState]]:
    clock = Clock()
    seen: list[CircuitState] = []
    breaker = CircuitBreaker(
        "backend",
        failure_threshold=threshold,
        reset_timeout=reset,
        clock=clock,
        on_state_change=lambda name, state: seen.append(state),
    )
    return breaker, clock, seen


def fail(breaker: CircuitBreaker) -> None:
    probe = breaker.acquire()
    breaker.record_failure(probe)


def test_opens_after_consecutive_failures_only() -> None:
    breaker, _, seen = make(threshold=3)
    fail(breaker)
    fail(breaker)
    breaker.record_success(breaker.acquire())  # a success resets the count
    fail(breaker)
    fail(breaker)
    assert breaker.state is CircuitState.CLOSED
    fail(breaker)
    assert breaker.state is CircuitState.OPEN
    assert seen == [CircuitState.CLOSED, CircuitState.OPEN]


def test_open_rejects_with_the_time_left() -> None:
    breaker, clock, _ = make(threshold=1, reset=10.0)
    fail(breaker)
    clock.now += 4
    with pytest.raises(CircuitOpenError) as caught:
        breaker.acquire()
    assert caught.value.retry_after == pytest.approx(6.0)
    assert caught.value.name == "backend"


def test_half_open_lets_exactly_one_probe_through() -> None:
    breaker, clock, seen = make(threshold=1, reset=10.0)
    fail(breaker)
    clock.now += 10
    assert breaker.state is CircuitState.HALF_OPEN
    probe = breaker.acquire()
    assert probe is True
    with pytest.raises(CircuitOpenError) as caught:
        breaker.acquire()
    assert caught.value.retry_after == 0.0
    breaker.record_success(probe)
    assert breaker.state is CircuitState.CLOSED
    assert breaker.acquire() is False
    assert seen == [
        CircuitState.CLOSED,
        CircuitState.OPEN,
        CircuitState.HALF_OPEN,
        CircuitState.CLOSED,
    ]


def test_failed_probe_reopens_for_a_full_timeout() -> None:
    breaker, clock, _ = make(threshold=1, reset=10.0)
    fail(breaker)
    clock.now += 15
    probe = breaker.acquire()
    breaker.record_failure(probe)
    assert breaker.state is CircuitState.OPEN
    clock.now += 9
    assert breaker.state is CircuitState.OPEN
    clock.now += 1
    assert breaker.state is CircuitState.HALF_OPEN


def test_a_probe_without_verdict_frees_the_slot() -> None:
    breaker, clock, _ = make(threshold=1, reset=1.0)
    fail(breaker)
    clock.now += 1
    probe = breaker.acquire()
    breaker.release(probe)
    assert breaker.state is CircuitState.HALF_OPEN
    assert breaker.acquire() is True


async def test_call_counts_only_what_the_predicate_calls_a_failure() -> None:
    breaker, _, _ = make(threshold=1)

    with pytest.raises(ValueError):
        async with breaker.call(is_failure=lambda exc: isinstance(exc, ConnectionError)):
            raise ValueError("the caller's own mistake")
    assert breaker.state is CircuitState.CLOSED

    entered = asyncio.Event()

    async def cancelled() -> None:
        async with breaker.call():
            entered.set()
            await asyncio.Event().wait()

    task = asyncio.create_task(cancelled())
    await entered.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert breaker.state is CircuitState.CLOSED  # a cancel is no verdict

    with pytest.raises(ConnectionError):
        async with breaker.call(is_failure=lambda exc: isinstance(exc, ConnectionError)):
            raise ConnectionError("refused")
    assert breaker.state is CircuitState.OPEN
    with pytest.raises(CircuitOpenError):
        async with breaker.call():
            pytest.fail("an open breaker must not run the block")


def test_options_are_validated() -> None:
    with pytest.raises(ValueError):
        CircuitBreaker("x", failure_threshold=0)
    with pytest.raises(ValueError):
        CircuitBreaker("x", reset_timeout=-1)
