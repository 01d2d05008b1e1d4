"""Where a no-op task's time goes: py-spy on the coordinator and the agent under load.

Starts the benchmark mesh (coordinator, one agent, nats-server; the same as
:mod:`bench.chain`), runs ``StreamTask`` no-op tasks at ``--concurrency`` and records
each service with ``py-spy record`` (sampling, from outside the process: nothing in the
services changes). Prints, per process, the functions with the most samples of their
own (self) and the share of samples under each area of the code (inclusive), and keeps
the collapsed stacks (``--out``) for a flame graph (``py-spy``'s ``raw`` format; any
flame graph tool reads it).

    python bench/profile.py --seconds 20 --concurrency 16 --out /tmp/profile

py-spy comes with the ``bench`` extra (``make bench`` installs it). It needs to read the
other processes' memory: the children are its own, which ``ptrace_scope`` 1 allows.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import shutil
import sys
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import Durations, closed_loop, fmt_rate, fmt_time, p50, p99  # noqa: E402
from bench.mesh import run_task  # noqa: E402
from bench.meshrun import bench_mesh, coordinator_stub  # noqa: E402

# Areas of the code, by the first matching path fragment of a frame (most specific first).
AREAS: tuple[tuple[str, str], ...] = (
    ("selectors.py", "event loop: epoll"),
    ("opentelemetry", "tracing (OpenTelemetry)"),
    ("services/runtime/tracing", "tracing (OpenTelemetry)"),
    ("prometheus_client", "metrics (prometheus_client)"),
    ("services/runtime/interceptors", "hivewire interceptors"),
    ("services/runtime/authz", "authorization"),
    ("services/runtime/authn", "authorization"),
    ("logging/", "logging"),
    ("services/runtime/logging", "logging"),
    ("services/coordinator/sqlite_store", "SQLite store"),
    ("sqlite3", "SQLite store"),
    ("aiosqlite", "SQLite store"),
    ("services/runtime/events", "NATS events"),
    ("nats/", "NATS events"),
    ("services/coordinator/journal", "journal"),
    ("services/coordinator/dispatch", "dispatch"),
    ("services/coordinator/queue", "queue"),
    ("services/coordinator/session", "coordinator servicer"),
    ("services/coordinator/servicer", "coordinator servicer"),
    ("services/coordinator/convert", "conversions"),
    ("services/coordinator/validation", "validation"),
    ("services/coordinator", "coordinator domain"),
    ("services/agent", "agent runtime"),
    ("google/protobuf", "protobuf"),
    ("grpc/", "grpc (python + cython)"),
    ("cygrpc", "grpc (python + cython)"),
    ("asyncio/", "asyncio event loop"),
)


def area(frame: str) -> str | None:
    """The area of one collapsed-stack frame (``func (path:line)``), if known."""
    for fragment, name in AREAS:
        if fragment in frame:
            return name
    return None


def parse(raw: Path) -> list[tuple[list[str], int]]:
    """``py-spy record --format raw`` output: stacks (outermost first) and sample counts."""
    stacks: list[tuple[list[str], int]] = []
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        stacks.append((stack.split(";"), int(count)))
    return stacks


def owner(frames: Sequence[str]) -> str:
    """Where one sample's time goes: its thread, else the nearest known area to the leaf."""
    stack = ";".join(frames)
    if "Thread.run" in stack:
        if "sqlite_store.py" in stack:
            return "SQLite store (its thread)"
        if "concurrent/futures/thread.py" in stack:
            return "executor threads (asyncio.to_thread)"
        return "grpc (its poller thread)"
    if frames and "Handle._run" in frames[-1]:
        # A loop callback with no Python frame under it: grpc's Cython/C code.
        return "grpc (C core, in event-loop callbacks)"
    for frame in reversed(frames):
        name = area(frame)
        if name is not None and name != "asyncio event loop":
            return name
    return "asyncio event loop / other"


def summarize(stacks: Iterable[tuple[list[str], int]], *, top: int = 25) -> str:
    """Share of samples per area (each sample counted once) and self time per function."""
    stacks = list(stacks)
    total = sum(n for _, n in stacks) or 1
    own: collections.Counter[str] = collections.Counter()
    areas: collections.Counter[str] = collections.Counter()
    for frames, n in stacks:
        own[frames[-1] if frames else "?"] += n
        areas[owner(frames)] += n
    lines = [f"  {total} samples of busy threads (py-spy leaves idle ones out)"]
    lines.append("  share by area (a sample goes to its thread, else the area nearest its leaf):")
    for name, n in areas.most_common():
        lines.append(f"    {n / total:6.1%}  {name}")
    lines.append(f"  top {top} functions by own samples:")
    for frame, n in own.most_common(top):
        lines.append(f"    {n / total:6.1%}  {frame}")
    return "\n".join(lines)


async def run(args: argparse.Namespace) -> None:
    """Start the mesh, load it, record each service with py-spy, summarize."""
    spy = args.py_spy
    async with bench_mesh(agents=1) as mesh:
        channel = mesh.channel()
        stub = coordinator_stub(channel)
        try:
            await run_task(stub)

            async def op() -> None:
                await run_task(stub)

            # Warm up (connections, caches), then record while the loop runs.
            await closed_loop("warm-up", op, concurrency=args.concurrency,
                              durations=Durations(0.0, 2.0, 1))  # fmt: skip
            targets = {"coordinator": mesh.pids["coordinator"], "agent": mesh.pids["agent-0"]}
            recorders = {
                name: await asyncio.create_subprocess_exec(
                    *[
                        spy,
                        "record",
                        "--pid",
                        str(pid),
                        "--duration",
                        str(args.seconds),
                        "--rate",
                        str(args.rate),
                        "--format",
                        "raw",
                        # --native needs to pause the process for each sample.
                        *(["--native"] if args.native else ["--nonblocking"]),
                        "--output",
                        str(args.out / f"{name}.txt"),
                    ],
                    stdout=asyncio.subprocess.DEVNULL,
                    stderr=asyncio.subprocess.PIPE,
                )
                for name, pid in targets.items()
            }
            started = time.perf_counter()
            phase = await closed_loop(
                f"task c={args.concurrency}", op, concurrency=args.concurrency,
                durations=Durations(0.0, float(args.seconds), 1), pids=mesh.pids,
            )  # fmt: skip
            for name, proc in recorders.items():
                _, err = await proc.communicate()
                if proc.returncode:
                    raise SystemExit(f"py-spy on {name} failed: {err.decode(errors='replace')}")
            elapsed = time.perf_counter() - started
        finally:
            with contextlib.suppress(Exception):
                await channel.close()
    print(
        f"\n{phase.name}: {fmt_rate(phase.rate)} tasks, p50 {fmt_time(p50(phase))}, "
        f"p99 {fmt_time(p99(phase))} under py-spy ({elapsed:.0f} s); CPU µs per task: "
        + ", ".join(f"{k} {v:,.0f}" for k, v in sorted(phase.cpu_us.items()))
    )
    for name in targets:
        print(f"\n{name} ({args.out / f'{name}.txt'}):")
        print(summarize(parse(args.out / f"{name}.txt"), top=args.top))


def main(argv: Sequence[str] | None = None) -> None:
    """Command line."""
    parser = argparse.ArgumentParser(prog="bench/profile.py", description=__doc__)
    parser.add_argument("--seconds", type=int, default=20, help="recorded seconds")
    parser.add_argument("--concurrency", type=int, default=16, help="tasks in flight")
    parser.add_argument("--rate", type=int, default=200, help="py-spy samples per second")
    parser.add_argument("--top", type=int, default=25, help="functions listed per process")
    parser.add_argument("--native", action="store_true", help="also sample C frames")
    parser.add_argument("--out", type=Path, default=Path("profile"), help="stacks go here")
    parser.add_argument(
        "--summarize", nargs="+", type=Path, help="do not run: summarize earlier raw files"
    )
    args = parser.parse_args(argv)
    if args.summarize:
        for path in args.summarize:
            print(f"\n{path}:")
            print(summarize(parse(path), top=args.top))
        return
    args.py_spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(args.py_spy).exists():
        raise SystemExit("py-spy not found: install the bench extra (make bench)")
    args.out.mkdir(parents=True, exist_ok=True)
    asyncio.run(run(args))


if __name__ == "__main__":
    main()
