r"""The coordinator's instructions per no-op task, counted by valgrind (callgrind): an A/B
that does not drift.

CPU time per task moves by 5-8 % between rounds of the same code on this machine
(``bench/ab.py``), more than most single changes to the coordinator's own work. An
instruction count does not: it is the same for the same code, inputs and scheduling,
whatever else the machine does. This starts the benchmark mesh with the coordinator
under ``valgrind --tool=callgrind`` (counting off while it starts), runs ``--warmup``
tasks, counts the coordinator's instructions (every thread) over ``--tasks`` more,
and prints them per task; with several ``--variant NAME=PYTHONPATH``, each variant's
mesh in turn, ``--repeat`` times, and each variant's count against the first's.

    python bench/instructions.py                                  # this code
    python bench/instructions.py --variant main= --variant b=/tmp/other/pp --repeat 2
    python bench/instructions.py --variant on= --variant off= \
        --env off:HIVEWIRE_EVENTS__ENABLED=false

Under valgrind the coordinator runs 20-50 times slower while the client, the agent and
nats-server do not, so more of their messages are waiting whenever it reads: the count
is of a coordinator that batches a little more than at c=1 on the real machine. Read it
as a measure of code changes, not of the task's real cost (``bench/ab.py``). It counts
instructions in user space only (no system calls, no time waiting for the GIL).
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Awaitable, Callable
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import ROOT
from bench.echo import open_channel
from bench.floor import FLOORS, floor_services, task_op
from bench.mesh import run_task
from bench.meshrun import bench_mesh, coordinator_stub


def _totals(dump: Path) -> int:
    """The instruction total of a callgrind dump."""
    for line in dump.read_text(errors="replace").splitlines():
        if line.startswith(("totals:", "summary:")):
            return int(line.split()[1])
    raise RuntimeError(f"no totals in {dump}")


def _counted(directory: Path, keep: Path | None) -> int:
    """The instructions of the dumps ``callgrind_control --dump`` wrote in ``directory``.

    ``keep``: copy the dump there too.
    """
    dumps = sorted(d for d in directory.glob("callgrind.out.*"))
    if not dumps:
        raise RuntimeError(f"callgrind wrote no dump in {directory}")
    if keep is not None:
        shutil.copy(dumps[0], keep)
    return sum(_totals(d) for d in dumps)


def _control(*args: str) -> None:
    subprocess.run(["callgrind_control", *args], check=True, capture_output=True, timeout=120)


async def count(
    pythonpath: str,
    tasks: int,
    warmup: int,
    concurrency: int,
    keep: Path | None = None,
    env: dict[str, str] | None = None,
) -> float:
    """The coordinator's instructions per task with ``pythonpath`` first on its path.

    ``keep``: copy the counted dump there (for ``callgrind_annotate``); ``env``: more
    environment of every service (settings).
    """
    with tempfile.TemporaryDirectory(prefix="hivewire-instr-") as tmp:
        out = Path(tmp) / "callgrind.out"
        prefix = [
            "valgrind",
            "--tool=callgrind",
            "--instr-atstart=no",
            f"--callgrind-out-file={out}",
            f"--log-file={tmp}/valgrind.log",
        ]
        service_env = {
            **(env or {}),
            "PYTHONPATH": ":".join(p for p in (pythonpath, str(ROOT)) if p),
        }
        async with bench_mesh(
            agents=1, service_env=service_env, coordinator_prefix=prefix, ready_timeout=600.0
        ) as mesh:
            channel = open_channel(mesh.address, mesh.certs)
            stub = coordinator_stub(channel)
            pid = str(mesh.pids["coordinator"])

            def op() -> Awaitable[int]:
                return run_task(stub)

            try:
                await _count_ops(op, pid, warmup, tasks, concurrency)
            finally:
                await channel.close()
        return await asyncio.to_thread(_counted, Path(tmp), keep) / tasks


async def count_floor(tasks: int, warmup: int, concurrency: int, side: str = "events") -> float:
    """The floor coordinator's instructions per task (``bench/floor.py``'s ``side``)."""
    with tempfile.TemporaryDirectory(prefix="hivewire-instr-") as tmp:
        out = Path(tmp) / "callgrind.out"
        wrapper = Path(tmp) / "python"
        wrapper.write_text(
            "#!/bin/sh\n"
            "exec valgrind --tool=callgrind --instr-atstart=no "
            f"--callgrind-out-file={out} --log-file={tmp}/valgrind.log "
            f'{sys.executable} "$@"\n'
        )
        wrapper.chmod(0o755)
        async with (
            bench_mesh(agents=1) as mesh,
            floor_services(
                mesh.certs, mesh.nats_url, mesh.state, coordinator_python=str(wrapper)
            ) as (target, pids),
        ):
            channel = open_channel(target, mesh.certs)
            op = task_op(coordinator_stub(channel), side)
            pid = str(pids["floor-coordinator"])
            try:
                await _count_ops(op, pid, warmup, tasks, concurrency)
            finally:
                await channel.close()
        return await asyncio.to_thread(_counted, Path(tmp), None) / tasks


async def _count_ops(
    op: Callable[[], Awaitable[object]], pid: str, warmup: int, tasks: int, concurrency: int
) -> None:
    """``warmup`` operations, then ``tasks`` more with callgrind counting in ``pid``, dumped."""
    await _run(op, warmup, concurrency)
    await asyncio.to_thread(_control, "--instr=on", pid)
    await _run(op, tasks, concurrency)
    await asyncio.to_thread(_control, "--dump", pid)
    await asyncio.to_thread(_control, "--instr=off", pid)


async def _run(op: Callable[[], Awaitable[object]], n: int, concurrency: int) -> None:
    """``n`` operations, ``concurrency`` at a time."""

    async def worker(share: int) -> None:
        for _ in range(share):
            await op()

    shares = [n // concurrency + (i < n % concurrency) for i in range(concurrency)]
    await asyncio.gather(*(worker(s) for s in shares))


async def main_async(args: argparse.Namespace) -> str:
    variants: list[tuple[str, str]] = []
    for item in args.variant or ["this="]:
        name, _, path = item.partition("=")
        variants.append((name, path))
    envs: dict[str, dict[str, str]] = {name: {} for name, _ in variants}
    for item in args.env or []:
        name, _, setting = item.partition(":")
        key, _, value = setting.partition("=")
        if name not in envs or not key:
            raise SystemExit(f"--env {item}: want NAME:KEY=VALUE of a --variant NAME")
        envs[name][key] = value
    counts: dict[str, list[float]] = {name: [] for name, _ in variants}
    for _ in range(args.repeat):
        for name, path in variants:
            keep = Path(f"{args.keep}-{name}.callgrind") if args.keep else None
            counts[name].append(
                await count(path, args.tasks, args.warmup, args.concurrency, keep, envs[name])
            )
            print(f"{name}: {counts[name][-1]:,.0f} instructions per task", file=sys.stderr)
    for side in args.floor or []:
        name = f"floor-{side}"
        counts[name] = []
        variants.append((name, ""))
        for _ in range(args.repeat):
            counts[name].append(await count_floor(args.tasks, args.warmup, args.concurrency, side))
            print(f"{name}: {counts[name][-1]:,.0f} instructions per task", file=sys.stderr)
    base = statistics.median(counts[variants[0][0]])
    lines = [
        f"coordinator instructions per no-op task (callgrind), c={args.concurrency}, "
        f"{args.tasks} tasks after {args.warmup}; each run, and the median against "
        f"{variants[0][0]}'s",
        "",
        "| variant | runs | median | ratio |",
        "|---|---|--:|--:|",
    ]
    for name, _ in variants:
        runs = ", ".join(f"{c:,.0f}" for c in counts[name])
        median = statistics.median(counts[name])
        lines.append(f"| {name} | {runs} | {median:,.0f} | {median / base:.3f}x |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Command line: ``python bench/instructions.py --variant a= --variant b=/path``."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", type=int, default=300, help="tasks counted")
    parser.add_argument("--warmup", type=int, default=50, help="tasks before counting")
    parser.add_argument("--concurrency", type=int, default=1)
    parser.add_argument("--repeat", type=int, default=1, help="runs of each variant")
    parser.add_argument(
        "--variant",
        action="append",
        help="NAME=PYTHONPATH (code first on the coordinator's path; empty: this code)",
    )
    parser.add_argument(
        "--env",
        action="append",
        help="NAME:KEY=VALUE: more environment of variant NAME's services (a setting)",
    )
    parser.add_argument(
        "--floor",
        nargs="+",
        choices=FLOORS,
        help="also count bench/floor.py's coordinator at these floors",
    )
    parser.add_argument(
        "--keep", help="also keep each variant's last dump as KEEP-<name>.callgrind"
    )
    args = parser.parse_args(argv)
    if shutil.which("valgrind") is None or shutil.which("callgrind_control") is None:
        parser.error("valgrind (Debian package valgrind) is not on PATH")
    print(asyncio.run(main_async(args)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
