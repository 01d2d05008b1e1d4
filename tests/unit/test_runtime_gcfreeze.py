"""The collector freezer: survivors of a slow full collection frozen, thawed once drained."""

from __future__ import annotations

import gc
import weakref
from collections.abc import Iterator

import pytest

from hivewire.services.runtime.gcfreeze import CollectorFreezer


class _Node:
    """A tracked object that can be part of a cycle."""

    def __init__(self) -> None:
        self.other: _Node | None = None


class _Clock:
    """Each full collection takes ``step`` seconds by this clock."""

    def __init__(self, step: float) -> None:
        self.step = step
        self.now = 0.0

    def __call__(self) -> float:
        value = self.now
        self.now += self.step
        return value


@pytest.fixture
def freezer_env() -> Iterator[None]:
    gc.collect()
    gc.unfreeze()
    yield
    gc.unfreeze()
    gc.collect()


def _install(budget: float, step: float) -> CollectorFreezer:
    freezer = CollectorFreezer(budget, clock=_Clock(step))
    freezer.install()
    return freezer


@pytest.mark.usefixtures("freezer_env")
def test_a_quick_full_collection_freezes_nothing() -> None:
    freezer = _install(budget=0.05, step=0.01)
    try:
        kept = [_Node() for _ in range(1000)]
        gc.collect()
        assert gc.get_freeze_count() == 0
        assert freezer.freezes == 0
        assert freezer.longest == pytest.approx(0.01)
        assert kept
    finally:
        freezer.uninstall()


@pytest.mark.usefixtures("freezer_env")
def test_survivors_of_a_slow_full_collection_are_frozen() -> None:
    freezer = _install(budget=0.05, step=0.1)
    try:
        kept = [_Node() for _ in range(10_000)]
        gc.collect()
        assert freezer.freezes == 1
        assert gc.get_freeze_count() >= len(kept)
        # What is frozen is out of the generations: a later full collection walks only
        # what came since.
        assert not any(o is kept[0] for o in gc.get_objects(generation=2))
    finally:
        freezer.uninstall()


@pytest.mark.usefixtures("freezer_env")
def test_frozen_objects_are_still_freed_by_reference_counting() -> None:
    freezer = _install(budget=0.0, step=0.0)
    try:
        kept = [_Node() for _ in range(10_000)]
        gc.collect()
        frozen = gc.get_freeze_count()
        assert frozen >= len(kept)
        del kept
        assert gc.get_freeze_count() <= frozen - 10_000
    finally:
        freezer.uninstall()


@pytest.mark.usefixtures("freezer_env")
def test_a_cycle_frozen_while_alive_is_collected_once_the_heap_drained() -> None:
    freezer = _install(budget=0.05, step=0.1)
    try:
        a, b = _Node(), _Node()
        a.other, b.other = b, a  # a cycle: reference counting alone never frees it
        gone = weakref.ref(a)
        # Twice the rest of the heap: once it goes, fewer than half stay frozen.
        backlog: list[list[int]] = [[] for _ in range(2 * len(gc.get_objects()) + 10_000)]
        gc.collect()
        assert freezer.freezes >= 1  # the growth itself may have set one off
        del a, b
        gc.collect()
        assert gone() is not None, "a frozen cycle is held while the heap is large"
        assert freezer.thaws == 0
        del backlog  # the backlog drains: fewer than half of the frozen objects are left
        gc.collect()
        assert freezer.thaws == 1
        assert gone() is None
    finally:
        freezer.uninstall()


def test_budget_is_not_negative() -> None:
    with pytest.raises(ValueError, match="budget"):
        CollectorFreezer(-1)


@pytest.mark.usefixtures("freezer_env")
def test_install_twice_watches_once_and_uninstall_stops_it() -> None:
    freezer = CollectorFreezer(0.0, clock=_Clock(0.0))
    freezer.install()
    freezer.install()
    try:
        assert gc.callbacks.count(freezer._callback) == 1
    finally:
        freezer.uninstall()
    assert freezer._callback not in gc.callbacks
    gc.collect()
    assert gc.get_freeze_count() == 0
