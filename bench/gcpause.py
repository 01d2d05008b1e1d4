"""The garbage collector's pauses while a backlog builds up after start-up, and after it drains.

A coordinator runs in a process of its own (a fresh one per side and round, over its own
SQLite store; no agent, so every task waits) and gets ``--tasks`` submissions, 16 at a
time, after its start-up heap was frozen (as ``python -m hivewire.services.coordinator``
does). Every full collection the interpreter runs meanwhile is timed (``gc.callbacks``).
Then every task is cancelled, so the backlog drains, and one full collection is timed;
then everything is unfrozen and collected (what the freezer's thaw does ``GC_THAW_AFTER``
later), counting what that frees. Two
sides, alternating round by round: the collector freezer (``runtime/gcfreeze.py``) off,
and on with its default budget (``GC_PAUSE_BUDGET``, 50 ms).

    python bench/gcpause.py --tasks 100000 --rounds 2

Reported per side, median (min-max) over rounds: the full collections during the fill,
the longest and their sum; the fill's rate; the freezes and thaws; after the drain, the
objects still frozen and the RSS growth per submitted task (what a cycle frozen and never
collected would leave behind).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import proc_rss, table

SIDES = ("off", "on")


async def _run(tasks: int, freezer_on: bool) -> dict[str, Any]:
    from bench.backlog import CALLER, FILL_CONCURRENCY, in_process_coordinator, waiting_spec
    from hivewire.services.coordinator.app import freeze_start_up_heap
    from hivewire.services.mesh.pki import init_pki
    from hivewire.services.runtime.gcfreeze import CollectorFreezer

    pauses: list[float] = []
    started: list[float] = []

    # Around every other callback: the freezer's thaw and freeze are in the pause.
    def timer_start(phase: str, info: dict[str, int]) -> None:
        if info.get("generation") == 2 and phase == "start":
            started.append(time.perf_counter())

    def timer_stop(phase: str, info: dict[str, int]) -> None:
        if info.get("generation") == 2 and phase == "stop" and started:
            pauses.append(time.perf_counter() - started.pop())

    with tempfile.TemporaryDirectory(prefix="hivewire-gcpause-") as tmp:
        init_pki(Path(tmp) / "certs")
        async with in_process_coordinator(Path(tmp), Path(tmp) / "certs") as (coordinator, _):
            freeze_start_up_heap()
            freezer = CollectorFreezer()
            if freezer_on:
                freezer.install(frozen=True)
            gc.callbacks.insert(0, timer_start)
            gc.callbacks.append(timer_stop)
            rss_before = proc_rss(os.getpid())
            ids: list[str] = []
            left = tasks

            async def worker() -> None:
                nonlocal left
                while left > 0:
                    left -= 1
                    record, _ = await coordinator.submit(waiting_spec(), CALLER)
                    ids.append(record.task_id)

            fill = time.perf_counter()
            async with asyncio.TaskGroup() as group:
                for _ in range(FILL_CONCURRENCY):
                    group.create_task(worker())
            fill = time.perf_counter() - fill
            fill_pauses = list(pauses)
            frozen_full = gc.get_freeze_count()
            for task_id in ids:
                await coordinator.cancel(task_id, CALLER)
            ids.clear()
            await asyncio.sleep(0)
            drained = time.perf_counter()
            gc.collect()
            drained = time.perf_counter() - drained
            gc.collect()
            result = {
                "collections": len(fill_pauses),
                "longest": max(fill_pauses, default=0.0),
                "total": sum(fill_pauses),
                "rate": tasks / fill,
                "frozen_full": frozen_full,
                "freezes": freezer.freezes,
                "thaws": freezer.thaws,
                "drained_collection": drained,
                "frozen_after": gc.get_freeze_count(),
                "rss_per_task": (proc_rss(os.getpid()) - rss_before) / tasks,
            }
            # What the freezer's thaw (GC_THAW_AFTER later) frees of what stayed frozen.
            gc.unfreeze()
            result["thaw_freed"] = gc.collect()
            result["rss_per_task_thawed"] = (proc_rss(os.getpid()) - rss_before) / tasks
            gc.callbacks.remove(timer_start)
            gc.callbacks.remove(timer_stop)
            freezer.uninstall()
    return result


def _child(side: str, tasks: int) -> dict[str, Any]:
    out = subprocess.run(
        [sys.executable, __file__, "--child", side, "--tasks", str(tasks)],
        check=True,
        capture_output=True,
        text=True,
    )
    return dict(json.loads(out.stdout.strip().splitlines()[-1]))


def _spread(values: Sequence[float], fmt: str) -> str:
    low, mid, high = (fmt.format(v) for v in (min(values), statistics.median(values), max(values)))
    return f"{mid} ({low}-{high})"


def report(rounds: dict[str, list[dict[str, Any]]], tasks: int) -> str:
    """One row per side."""
    rows = []
    for side, results in rounds.items():

        def col(key: str, results: list[dict[str, Any]] = results) -> list[float]:
            return [float(r[key]) for r in results]

        rows.append(
            [
                side,
                _spread(col("collections"), "{:.0f}"),
                _spread([v * 1e3 for v in col("longest")], "{:,.0f} ms"),
                _spread([v * 1e3 for v in col("total")], "{:,.0f} ms"),
                _spread(col("rate"), "{:,.0f}/s"),
                _spread(col("freezes"), "{:.0f}") + " / " + _spread(col("thaws"), "{:.0f}"),
                _spread(col("frozen_full"), "{:,.0f}"),
                _spread([v * 1e3 for v in col("drained_collection")], "{:,.0f} ms"),
                _spread(col("frozen_after"), "{:,.0f}"),
                _spread([v / 1024 for v in col("rss_per_task")], "{:.2f} KiB"),
                _spread(col("thaw_freed"), "{:,.0f}"),
                _spread([v / 1024 for v in col("rss_per_task_thawed")], "{:.2f} KiB"),
            ]
        )
    return table(
        f"full collections while {tasks:,} tasks are submitted after start-up, then all "
        "cancelled; median (min-max) over rounds",
        [
            "freezer",
            "full collections",
            "longest",
            "sum",
            "fill rate",
            "freezes / thaws",
            "frozen when full",
            "one collection after the drain",
            "frozen after",
            "RSS per task after the drain",
            "a thaw then frees",
            "RSS per task after it",
        ],
        rows,
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Command line."""
    parser = argparse.ArgumentParser(prog="bench/gcpause.py", description=__doc__)
    parser.add_argument("--tasks", type=int, default=100_000)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--child", choices=SIDES, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(asyncio.run(_run(args.tasks, args.child == "on"))))
        return 0
    rounds: dict[str, list[dict[str, Any]]] = {side: [] for side in SIDES}
    for number in range(args.rounds):
        order = SIDES if number % 2 == 0 else SIDES[::-1]
        for side in order:
            rounds[side].append(_child(side, args.tasks))
    print(report(rounds, args.tasks))
    return 0


if __name__ == "__main__":
    sys.exit(main())
