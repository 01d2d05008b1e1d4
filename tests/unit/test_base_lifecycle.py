"""The start/stop plumbing of services/base/lifecycle.py: what ``async with`` calls."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from hivewire.services.base.lifecycle import (
    Drain,
    OpenClose,
    StartClose,
    StartStop,
    cancel_and_wait,
    ended_within,
)


class _Calls:
    def __init__(self) -> None:
        self.calls: list[str] = []


class _Service(StartStop, _Calls):
    async def start(self) -> None:
        self.calls.append("start")

    async def stop(self) -> None:
        self.calls.append("stop")


class _Publisher(StartClose, _Calls):
    async def start(self) -> None:
        self.calls.append("start")

    async def close(self) -> None:
        self.calls.append("close")


class _Store(OpenClose, _Calls):
    async def open(self) -> None:
        self.calls.append("open")

    async def close(self) -> None:
        self.calls.append("close")


@pytest.mark.parametrize(
    ("make", "expected"),
    [
        (_Service, ["start", "body", "stop"]),
        (_Publisher, ["start", "body", "close"]),
        (_Store, ["open", "body", "close"]),
    ],
)
async def test_async_with_calls_the_methods_around_the_block(
    make: type[Any], expected: list[str]
) -> None:
    obj = make()
    async with obj as entered:
        assert entered is obj
        obj.calls.append("body")
    assert obj.calls == expected


async def test_the_exit_method_runs_when_the_block_raises() -> None:
    store = _Store()
    with pytest.raises(RuntimeError, match="boom"):
        async with store:
            raise RuntimeError("boom")
    assert store.calls == ["open", "close"]


async def test_a_failed_start_does_not_call_stop() -> None:
    class Failing(_Service):
        async def start(self) -> None:
            raise RuntimeError("cannot start")

    service = Failing()
    with pytest.raises(RuntimeError, match="cannot start"):
        async with service:
            pass
    assert service.calls == []


async def test_cancel_and_wait_cancels_every_task_and_swallows_the_cancellation() -> None:
    started = asyncio.Event()

    async def forever() -> None:
        started.set()
        await asyncio.Event().wait()

    tasks = [asyncio.create_task(forever()), asyncio.create_task(forever())]
    await started.wait()
    await cancel_and_wait([tasks[0], None, tasks[1]])
    assert all(task.cancelled() for task in tasks)


async def test_cancel_and_wait_leaves_its_callers_cancellation_to_the_caller() -> None:
    """A stop under a timeout: its timeout is raised, not swallowed with the task's end."""

    async def stubborn() -> None:
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            await asyncio.Event().wait()  # a clean-up that does not end by itself

    task = asyncio.create_task(stubborn())
    await asyncio.sleep(0)
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.05):
            await cancel_and_wait([task])
    assert task.cancelled()  # the timeout's cancellation reached it too


async def test_cancel_and_wait_in_a_cancelled_callers_clean_up_waits_for_every_task() -> None:
    """A stop in a ``finally`` after the caller was cancelled still ends all it stops."""
    waiting = [asyncio.create_task(asyncio.Event().wait()) for _ in range(2)]
    cleaned: list[str] = []

    async def caller() -> None:
        try:
            await asyncio.Event().wait()
        finally:
            await cancel_and_wait(waiting)
            cleaned.append("after")

    task = asyncio.create_task(caller())
    await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert cleaned == ["after"]
    assert all(t.cancelled() for t in waiting)


async def test_cancel_and_wait_raises_a_failure_unless_told_to_suppress_it() -> None:
    async def failing(waiting: asyncio.Event) -> None:
        try:
            waiting.set()
            await asyncio.Event().wait()
        finally:
            raise ValueError("failed while stopping")

    async def started() -> asyncio.Task[None]:
        waiting = asyncio.Event()
        task = asyncio.create_task(failing(waiting))
        await waiting.wait()
        return task

    task = await started()
    with pytest.raises(ValueError, match="failed while stopping"):
        await cancel_and_wait([task])

    task = await started()
    await cancel_and_wait([task], suppress=(ValueError,))
    assert task.done() and isinstance(task.exception(), ValueError)


class _Owner(StartStop, _Calls):
    """Ready once built (``start`` is something else): only stops on exit."""

    _ENTER = ""
    _LEAVE = "stop_all"

    async def start(self, what: str) -> None:
        self.calls.append(f"start {what}")

    async def stop_all(self) -> None:
        self.calls.append("stop_all")


async def test_an_empty_enter_method_calls_nothing_on_entry() -> None:
    async with _Owner() as owner:
        await owner.start("child")
    assert owner.calls == ["start child", "stop_all"]


async def test_ended_within_waits_for_a_task_up_to_its_grace() -> None:
    release = asyncio.Event()

    async def held() -> None:
        await release.wait()
        raise RuntimeError("ended badly")

    task = asyncio.create_task(held())
    # Still running after a grace of 0: not ended, and neither cancelled nor awaited.
    assert not await ended_within(task, 0)
    assert not task.done()
    release.set()
    # Ends within the grace: what it raised stays in the task.
    assert await ended_within(task, 60)
    assert isinstance(task.exception(), RuntimeError)
    # Already done: True at once.
    assert await ended_within(task, 0)


def test_drain_ends_at_once_when_nothing_is_open() -> None:
    ended: list[str] = []
    drain = Drain(idle=lambda: True, end=lambda: ended.append("end"))
    drain.settle()  # not draining yet: work ending does not end the owner
    assert (drain.draining, ended) == (False, [])
    drain.start()
    assert (drain.draining, ended) == (True, ["end"])


def test_drain_ends_when_the_last_open_work_ends() -> None:
    open_work = {"a", "b"}
    ended: list[str] = []
    drain = Drain(idle=lambda: not open_work, end=lambda: ended.append("end"))
    drain.start()
    assert drain.draining and ended == []
    open_work.discard("a")
    drain.settle()
    assert ended == []
    open_work.discard("b")
    drain.settle()
    assert ended == ["end"]
