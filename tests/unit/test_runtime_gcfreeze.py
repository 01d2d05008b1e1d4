"""The collector freezer: survivors of slow full collections frozen, and thawed later."""

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
    freezer = CollectorFreezer(budget, thaw_after=1e9, clock=_Clock(step))
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


def _cycle() -> weakref.ref[_Node]:
    """A two-node cycle (reference counting alone never frees it), alive until dropped."""
    a, b = _Node(), _Node()
    a.other, b.other = b, a
    _cycles.append(a)
    return weakref.ref(a)


_cycles: list[_Node] = []


@pytest.mark.usefixtures("freezer_env")
def test_a_cycle_frozen_while_alive_is_collected_once_the_freeze_is_old() -> None:
    clock = _Clock(0.1)
    freezer = CollectorFreezer(0.05, thaw_after=100.0, clock=clock)
    freezer.install()
    try:
        gone = _cycle()
        backlog = [_Node() for _ in range(1000)]
        gc.collect()
        assert freezer.freezes == 1
        _cycles.clear()  # the cycle is garbage now, but frozen
        gc.collect()
        assert gone() is not None, "a frozen cycle is held until the freeze is old"
        assert freezer.thaws == 0
        clock.now += 100.0
        gc.collect()
        assert freezer.thaws == 1
        assert gone() is None
        assert backlog
    finally:
        freezer.uninstall()


@pytest.mark.usefixtures("freezer_env")
def test_cycles_made_while_the_backlog_turns_over_are_freed_by_the_next_thaw() -> None:
    clock = _Clock(0.1)
    freezer = CollectorFreezer(0.05, thaw_after=100.0, clock=clock)
    freezer.install()
    try:
        refs = []
        for _ in range(5):  # each round: a cycle made, frozen by a slow collection, dropped
            refs.append(_cycle())
            gc.collect()
            _cycles.clear()
            clock.now += 10.0
        assert freezer.freezes >= 5
        assert all(ref() is not None for ref in refs)
        clock.now += 100.0
        gc.collect()
        assert freezer.thaws == 1
        assert all(ref() is None for ref in refs)
    finally:
        freezer.uninstall()


@pytest.mark.usefixtures("freezer_env")
def test_what_start_up_froze_is_thawed_with_the_rest() -> None:
    clock = _Clock(0.0)
    freezer = CollectorFreezer(0.05, thaw_after=100.0, clock=clock)
    gone = _cycle()
    gc.freeze()  # as the coordinator's start-up does
    freezer.install(frozen=True)
    try:
        _cycles.clear()
        gc.collect()
        assert gone() is not None
        clock.now += 100.0
        gc.collect()
        assert freezer.thaws == 1
        assert gone() is None
        assert gc.get_freeze_count() == 0  # that collection was quick: nothing frozen again
    finally:
        freezer.uninstall()


def test_budget_and_thaw_after_are_checked() -> None:
    with pytest.raises(ValueError, match="budget"):
        CollectorFreezer(-1)
    with pytest.raises(ValueError, match="thaw_after"):
        CollectorFreezer(0.05, thaw_after=0)


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
