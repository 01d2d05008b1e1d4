"""The coordinator's one timer for every task's deadline (services/coordinator/deadlines.py)."""

from __future__ import annotations

import asyncio
import gc

from hivewire.services.coordinator.deadlines import Deadlines


class Clock:
    """A wall clock the test moves by hand (ns)."""

    def __init__(self, now: int) -> None:
        self.now = now

    def __call__(self) -> int:
        return self.now


class Due:
    """Records ``on_due`` calls; ``wait(n)`` returns once ``n`` have come."""

    def __init__(self) -> None:
        self.ids: list[str] = []
        self._changed = asyncio.Event()

    def __call__(self, task_id: str) -> None:
        self.ids.append(task_id)
        self._changed.set()

    async def wait(self, count: int) -> list[str]:
        async with asyncio.timeout(5):
            while len(self.ids) < count:
                self._changed.clear()
                await self._changed.wait()
        return self.ids


async def test_passed_deadlines_fire_once_in_order_and_later_ones_wait() -> None:
    clock, due = Clock(1_000), Due()
    deadlines = Deadlines(due, clock=clock)
    deadlines.arm("late", 10**18)
    deadlines.arm("second", 950)
    deadlines.arm("first", 900)

    assert await due.wait(2) == ["first", "second"]
    assert "late" in deadlines
    assert "first" not in deadlines
    assert len(deadlines) == 1

    clock.now = 10**18
    deadlines.arm("now", 10**18 - 1)  # an earlier deadline re-points the timer
    assert await due.wait(4) == ["first", "second", "now", "late"]
    assert len(deadlines) == 0
    deadlines.clear()


async def test_a_disarmed_or_rearmed_task_fires_only_at_its_live_deadline() -> None:
    clock, due = Clock(1_000), Due()
    deadlines = Deadlines(due, clock=clock)
    deadlines.arm("gone", 900)
    deadlines.disarm("gone")
    deadlines.arm("moved", 950)
    deadlines.arm("moved", 5_000)  # replaces the passed deadline
    deadlines.arm("marker", 990)

    assert await due.wait(1) == ["marker"]
    assert "moved" in deadlines

    clock.now = 5_000
    deadlines.arm("marker-2", 4_999)
    assert await due.wait(3) == ["marker", "marker-2", "moved"]
    deadlines.disarm("never-armed")  # a no-op
    deadlines.clear()


async def test_a_failing_handler_does_not_stop_the_others() -> None:
    clock, due = Clock(1_000), Due()

    def on_due(task_id: str) -> None:
        due(task_id)
        if task_id == "bad":
            raise RuntimeError("boom")

    deadlines = Deadlines(on_due, clock=clock)
    deadlines.arm("bad", 900)
    deadlines.arm("good", 901)
    assert await due.wait(2) == ["bad", "good"]
    deadlines.clear()


async def test_clear_stops_the_timer_and_arming_starts_it_again() -> None:
    clock, due = Clock(1_000), Due()
    deadlines = Deadlines(due, clock=clock)
    deadlines.arm("cleared", 900)
    deadlines.clear()
    deadlines.arm("after", 950)
    assert await due.wait(1) == ["after"]


async def test_the_heap_stays_near_the_armed_count_as_tasks_end_early() -> None:
    deadlines = Deadlines(lambda task_id: None, clock=Clock(0))
    for round_ in range(20):
        for i in range(500):
            deadlines.arm(f"t{round_}-{i}", 10**12 + i)
        for i in range(495):
            deadlines.disarm(f"t{round_}-{i}")
    assert len(deadlines) == 20 * 5
    assert len(deadlines._heap) <= 2 * len(deadlines) + 500
    deadlines.clear()


async def test_an_armed_task_adds_no_object_the_collector_keeps_walking() -> None:
    deadlines = Deadlines(lambda task_id: None, clock=Clock(0))
    ids = [f"task-{i}" for i in range(1_000)]
    gc.collect()
    before = len(gc.get_objects())
    for i, task_id in enumerate(ids):
        deadlines.arm(task_id, 10**12 + i)
    gc.collect()
    # The heap's (int, str) tuples are untracked once collected; the list and dict
    # that hold them are one object each, however many tasks there are.
    assert len(gc.get_objects()) - before < 50
    deadlines.clear()
