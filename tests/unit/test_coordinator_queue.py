"""The ready queue: priority, FIFO, aging against starvation, capability eligibility."""

from __future__ import annotations

import pytest

from hivewire.services.coordinator.queue import TaskQueue

LOW, MEDIUM, HIGH, CRITICAL = 1, 2, 3, 4


def drain(queue: TaskQueue, eligible: set[str] | None = None) -> list[str]:
    taken = []
    while (entry := queue.pop_best(lambda c: eligible is None or c in eligible)) is not None:
        taken.append(entry.task_id)
    return taken


def test_higher_priority_first_and_fifo_within_a_priority() -> None:
    queue = TaskQueue(aging_interval=10.0)
    for i, prio in enumerate([LOW, HIGH, MEDIUM, CRITICAL, HIGH, LOW, MEDIUM]):
        queue.push(f"t{i}", capability="c", priority=prio, enqueued_at=100.0 + i * 0.001)
    assert drain(queue) == ["t3", "t1", "t4", "t2", "t6", "t0", "t5"]


def test_equal_times_keep_arrival_order() -> None:
    queue = TaskQueue(aging_interval=10.0)
    for i in range(20):
        queue.push(f"t{i}", capability="c", priority=MEDIUM, enqueued_at=5.0)
    assert drain(queue) == [f"t{i}" for i in range(20)]


def test_a_low_task_that_waited_long_enough_beats_new_high_tasks() -> None:
    queue = TaskQueue(aging_interval=10.0)
    queue.push("old-low", capability="c", priority=LOW, enqueued_at=0.0)
    # Two priority levels are worth 20 s of waiting: a high task queued at 19 s still wins,
    # one queued at 21 s does not.
    queue.push("high-19", capability="c", priority=HIGH, enqueued_at=19.0)
    queue.push("high-21", capability="c", priority=HIGH, enqueued_at=21.0)
    assert drain(queue) == ["high-19", "old-low", "high-21"]


def test_low_priority_never_starves_under_sustained_critical_load() -> None:
    aging = 1.0
    queue = TaskQueue(aging_interval=aging)
    queue.push("low", capability="c", priority=LOW, enqueued_at=0.0)
    now = 0.0
    served_at = None
    # Every tick a new critical task arrives and one task is served: without aging the
    # low task would wait forever.
    for tick in range(1000):
        now = tick * 0.1
        queue.push(f"crit-{tick}", capability="c", priority=CRITICAL, enqueued_at=now)
        entry = queue.pop_best(lambda c: True)
        assert entry is not None
        if entry.task_id == "low":
            served_at = now
            break
    assert served_at is not None
    assert served_at <= 3 * aging + 0.1


def test_only_eligible_capabilities_are_taken() -> None:
    queue = TaskQueue(aging_interval=10.0)
    queue.push("sum-critical", capability="sum", priority=CRITICAL, enqueued_at=1.0)
    queue.push("echo-low", capability="echo", priority=LOW, enqueued_at=2.0)
    assert drain(queue, {"echo"}) == ["echo-low"]
    assert len(queue) == 1
    assert queue.peek("sum") is not None
    assert drain(queue, {"sum"}) == ["sum-critical"]


def test_remove_and_replace() -> None:
    queue = TaskQueue(aging_interval=10.0)
    queue.push("a", capability="c", priority=MEDIUM, enqueued_at=1.0)
    queue.push("b", capability="c", priority=MEDIUM, enqueued_at=2.0)
    assert queue.remove("a") is True
    assert queue.remove("a") is False
    assert "a" not in queue and "b" in queue
    # Pushing a task again replaces its entry rather than duplicating it.
    queue.push("b", capability="c", priority=HIGH, enqueued_at=2.0)
    queue.push("b", capability="c", priority=HIGH, enqueued_at=2.0)
    assert drain(queue) == ["b"]
    assert queue.capabilities() == []


def test_depth_counts() -> None:
    queue = TaskQueue(aging_interval=10.0)
    queue.push("a", capability="x", priority=LOW, enqueued_at=1.0)
    queue.push("b", capability="x", priority=HIGH, enqueued_at=1.0)
    queue.push("c", capability="y", priority=HIGH, enqueued_at=1.0)
    queue.remove("a")
    assert queue.depth_by_priority() == {HIGH: 2}
    assert queue.depth_by_capability() == {"x": 1, "y": 1}


def test_aging_interval_must_be_positive() -> None:
    with pytest.raises(ValueError):
        TaskQueue(aging_interval=0)
