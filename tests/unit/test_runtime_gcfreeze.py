"""The collector freezer: survivors of slow full collections frozen, and thawed later."""

from __future__ import annotations

import gc
import weakref
from collections.abc import Callable, Iterator

import pytest

from hivewire.services.runtime.gcfreeze import CollectorFreezer


class _Node:
    """A tracked object that can be part of a cycle."""

    def __init__(self) -> None:
        self.other: _Node | None = None


class _Clock:
    """Each full collection takes ``step`` seconds by this clock; tests move ``now``."""

    def __init__(self, step: float) -> None:
        self.step = step
        self.now = 0.0

    def __call__(self) -> float:
        value = self.now
        self.now += self.step
        return value


Watch = Callable[..., CollectorFreezer]

_cycles: list[_Node] = []


@pytest.fixture
def watch() -> Iterator[Watch]:
    """Install freezers until the test ends; the collector is left as it was found."""
    installed: list[CollectorFreezer] = []
    gc.collect()
    gc.unfreeze()

    def install(
        budget: float, *, step: float, thaw_after: float = 1e9, frozen: bool = False
    ) -> CollectorFreezer:
        freezer = CollectorFreezer(budget, thaw_after=thaw_after, clock=_Clock(step))
        freezer.install(frozen=frozen)
        installed.append(freezer)
        return freezer

    yield install
    for freezer in installed:
        freezer.uninstall()
    _cycles.clear()
    gc.unfreeze()
    gc.collect()


def _cycle() -> weakref.ref[_Node]:
    """A two-node cycle (reference counting alone never frees it), alive until dropped."""
    a, b = _Node(), _Node()
    a.other, b.other = b, a
    _cycles.append(a)
    return weakref.ref(a)


def _clock(freezer: CollectorFreezer) -> _Clock:
    clock = freezer._clock
    assert isinstance(clock, _Clock)
    return clock


def test_a_quick_full_collection_freezes_nothing(watch: Watch) -> None:
    freezer = watch(0.05, step=0.01)
    kept = [_Node() for _ in range(1000)]
    gc.collect()
    assert gc.get_freeze_count() == 0
    assert freezer.freezes == 0
    assert freezer.longest == pytest.approx(0.01)
    assert kept


def test_survivors_of_a_slow_full_collection_are_frozen(watch: Watch) -> None:
    freezer = watch(0.05, step=0.1)
    kept = [_Node() for _ in range(10_000)]
    gc.collect()
    assert freezer.freezes == 1
    assert gc.get_freeze_count() >= len(kept)
    # Out of the generations: a later full collection walks only what came since.
    assert not any(o is kept[0] for o in gc.get_objects(generation=2))


def test_frozen_objects_are_still_freed_by_reference_counting(watch: Watch) -> None:
    watch(0.0, step=0.0)
    kept = [_Node() for _ in range(10_000)]
    gc.collect()
    frozen = gc.get_freeze_count()
    assert frozen >= len(kept)
    del kept
    assert gc.get_freeze_count() <= frozen - 10_000


def test_a_cycle_frozen_while_alive_is_collected_once_the_freeze_is_old(watch: Watch) -> None:
    freezer = watch(0.05, step=0.1, thaw_after=100.0)
    gone = _cycle()
    backlog = [_Node() for _ in range(1000)]
    gc.collect()
    assert freezer.freezes == 1
    _cycles.clear()  # the cycle is garbage now, but frozen
    gc.collect()
    assert gone() is not None, "a frozen cycle is held until the freeze is old"
    assert freezer.thaws == 0
    _clock(freezer).now += 100.0
    gc.collect()
    assert freezer.thaws == 1
    assert gone() is None
    assert backlog


def test_cycles_made_while_the_backlog_turns_over_are_freed_by_the_next_thaw(
    watch: Watch,
) -> None:
    freezer = watch(0.05, step=0.1, thaw_after=100.0)
    refs = []
    for _ in range(5):  # each round: a cycle made, frozen by a slow collection, dropped
        refs.append(_cycle())
        gc.collect()
        _cycles.clear()
        _clock(freezer).now += 10.0
    assert freezer.freezes >= 5
    assert all(ref() is not None for ref in refs)
    _clock(freezer).now += 100.0
    gc.collect()
    assert freezer.thaws == 1
    assert all(ref() is None for ref in refs)


def test_what_start_up_froze_is_thawed_with_the_rest(watch: Watch) -> None:
    gone = _cycle()
    gc.freeze()  # as the coordinator's start-up does
    freezer = watch(0.05, step=0.0, thaw_after=100.0, frozen=True)
    _cycles.clear()
    gc.collect()
    assert gone() is not None
    _clock(freezer).now += 100.0
    gc.collect()
    assert freezer.thaws == 1
    assert gone() is None
    assert gc.get_freeze_count() == 0  # that collection was quick: nothing frozen again


def test_budget_and_thaw_after_are_checked() -> None:
    with pytest.raises(ValueError, match="budget"):
        CollectorFreezer(-1)
    with pytest.raises(ValueError, match="thaw_after"):
        CollectorFreezer(0.05, thaw_after=0)


def test_install_twice_watches_once_and_uninstall_stops_it(watch: Watch) -> None:
    freezer = watch(0.0, step=0.0)
    freezer.install()
    assert gc.callbacks.count(freezer._callback) == 1
    freezer.uninstall()
    assert freezer._callback not in gc.callbacks
    gc.collect()
    assert gc.get_freeze_count() == 0
