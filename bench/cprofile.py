"""One service's own Python CPU per no-op task, function by function (cProfile).

Starts the benchmark mesh (``bench/meshrun.py``) with ``bench/cprofile_site`` first on
the services' ``PYTHONPATH``: its ``sitecustomize`` puts a cProfile profiler, timed with
the thread's CPU clock, on the event-loop thread of one service (``--who``, the agent
by default). For each ``--concurrency`` the loop runs no-op ``StreamTask`` tasks, warms
up, profiles ``--tasks`` of them and prints, per task, the CPU the profiler saw and the
functions with the most of it: own time (``tottime``) by area of the code
(``bench/profile.py``'s areas) and by function, and, for hivewire's own functions,
time including what they call (``cumtime``).

    python bench/cprofile.py --concurrency 1 16 --tasks 2000
    python bench/cprofile.py --who coordinator --pythonpath /tmp/older-code

The profiler costs CPU itself (a callback per Python call and return; several times
the work of the calls it times): read the functions against each other, and measure a
change with ``bench/ab.py``. Grpc's C core and its poller thread are not in it.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import os
import pstats
import shutil
import signal
import sys
import tempfile
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import instrumented_pythonpath, run_instrumented, wait_until
from bench.mesh import run_task
from bench.meshrun import bench_mesh, coordinator_stub
from bench.profile import area

SITE = Path(__file__).resolve().parent / "cprofile_site"


async def _tasks(stub: object, count: int, concurrency: int) -> None:
    """``count`` no-op tasks from ``concurrency`` workers (a closed loop)."""
    left = count

    async def worker() -> None:
        nonlocal left
        while left > 0:
            left -= 1
            await run_task(stub)  # type: ignore[arg-type]

    await asyncio.gather(*(worker() for _ in range(concurrency)))


def _short(func: tuple[str, int, str]) -> str:
    path, line, name = func
    if path == "~":
        return name
    for marker in ("/hivewire/", "/site-packages/", "/lib/python3"):
        if marker in path:
            path = path.split(marker, 1)[1]
            break
    return f"{name} ({path}:{line})"


def report(stats_path: Path, tasks: int, top: int) -> str:
    """The profile of ``tasks`` tasks: CPU per task and the top functions."""
    stats = pstats.Stats(str(stats_path))
    rows = stats.stats  # type: ignore[attr-defined]
    total = sum(row[2] for row in rows.values())
    out = [f"  profiled CPU per task: {total / tasks * 1e6:,.0f} µs (profiler overhead included)"]
    areas: collections.Counter[str] = collections.Counter()
    for (path, _, _), row in rows.items():
        name = "built-in functions" if path == "~" else area(path) or "other"
        areas[name] += row[2]
    out.append("  own time by area of the code:")
    for name, seconds in areas.most_common():
        out.append(f"    {seconds / total:6.1%}  {seconds / tasks * 1e6:8.1f} µs  {name}")
    out.append(f"  top {top} by own time, µs per task (calls per task):")
    by_own = sorted(rows.items(), key=lambda item: item[1][2], reverse=True)[:top]
    for func, (_, ncalls, tottime, _, _) in by_own:
        out.append(f"    {tottime / tasks * 1e6:8.1f}  ({ncalls / tasks:5.1f})  {_short(func)}")
    out.append(f"  top {top} hivewire functions by time with callees, µs per task:")
    ours = [
        item
        for item in rows.items()
        if "/services/" in item[0][0] and "cprofile_site" not in item[0][0]
    ]
    for func, (_, ncalls, _, cumtime, _) in sorted(ours, key=lambda i: i[1][3], reverse=True)[:top]:
        out.append(f"    {cumtime / tasks * 1e6:8.1f}  ({ncalls / tasks:5.1f})  {_short(func)}")
    return "\n".join(out)


async def run(args: argparse.Namespace) -> str:
    """Profile ``--who`` at each concurrency; the report."""
    with tempfile.TemporaryDirectory(prefix="hivewire-cprofile-") as tmp:
        out = Path(tmp) / "profile.pstats"
        env = {
            "PYTHONPATH": instrumented_pythonpath(SITE, args.pythonpath),
            "BENCH_CPROFILE_OUT": str(out),
            "BENCH_CPROFILE_WHO": args.who,
        }
        sections = [f"cProfile of {args.who} (thread CPU clock), {args.tasks} tasks per phase"]
        async with bench_mesh(agents=1, service_env=env) as mesh:
            channel = mesh.channel()
            stub = coordinator_stub(channel)
            pid = mesh.pids[args.who]
            try:
                for concurrency in args.concurrency:
                    await _tasks(stub, args.warmup, concurrency)
                    out.unlink(missing_ok=True)
                    os.kill(pid, signal.SIGUSR2)
                    await _tasks(stub, args.tasks, concurrency)
                    os.kill(pid, signal.SIGUSR1)
                    await asyncio.to_thread(wait_until, out.exists, f"profile at {out}")
                    sections.append(f"c={concurrency}:\n" + report(out, args.tasks, args.top))
                    if args.save:
                        shutil.copyfile(out, f"{args.save}-c{concurrency}.pstats")
            finally:
                await channel.close()
        return "\n".join(sections)


def main(argv: list[str] | None = None) -> int:
    """Command line: ``python bench/cprofile.py --concurrency 1 16``."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--who", default="agent-0", help="the service profiled")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--tasks", type=int, default=1000, help="profiled tasks per phase")
    parser.add_argument("--warmup", type=int, default=100, help="tasks before each phase")
    parser.add_argument("--top", type=int, default=30, help="functions listed")
    parser.add_argument(
        "--save", type=Path, help="also keep each phase's pstats as SAVE-c<N>.pstats"
    )
    return run_instrumented(parser, run, argv)


if __name__ == "__main__":
    sys.exit(main())
