"""Run hivewire's benchmarks (``make bench``) and print ratios measured in this run.

The machine is small and shared, so absolute numbers drift from run to run; every
benchmark therefore also measures its baseline in the same run (a bare grpc.aio echo,
raw ``js.publish``...) and reports the ratio, with the variants interleaved round by
round and the median kept. CPU time per operation (per process) is printed next to
wall-clock rates: it is the steadier of the two.

    python bench/run.py                 # everything but grpcio_versions, ~4-5 minutes
    python bench/run.py --quick         # short phases, one round, under a minute
    python bench/run.py --only mesh streams --json results.json
    python bench/run.py --only grpcio   # bench/grpcio_versions.py (builds venvs, needs PyPI)
    python bench/run.py --only chain --plot chain.png --before before.json

See bench/README.md and docs/performance.md.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import datetime as dt
import json
import logging
import os
import platform
import sys
import tempfile
import time
import traceback
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    # Run as a script (python bench/run.py): make ``bench`` importable.
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

# Children are started by fork + exec while gRPC threads run; gRPC's fork handlers are
# of no use there and would only log, at every start, that they were skipped.
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")
os.environ.setdefault("GRPC_VERBOSITY", "ERROR")

import grpc
from google.protobuf import __version__ as protobuf_version

from bench import (
    backlog,
    chain,
    coordinators,
    echo,
    events,
    floor,
    grpcio_versions,
    interceptors,
    mesh,
    outbox,
    plans,
    streams,
    tokens,
)
from bench.common import DEFAULT, QUICK, Durations, Phase
from hivewire.services.mesh.pki import init_pki

BENCHMARKS = (
    "chain",
    "floor",
    "tokens",
    "backlog",
    "echo",
    "interceptors",
    "mesh",
    "coordinators",
    "plans",
    "streams",
    "events",
    "outbox",
)
OPTIONAL = ("grpcio",)
STREAMS_DEFAULT = 2000
STREAMS_QUICK = 500
MESH_TASKS = Durations(warmup=0.5, measure=3.0, rounds=3)
"""Task phases by default: fewer, longer rounds (a task is slow; p99 needs samples)."""
FLOOR_ROUNDS = Durations(warmup=DEFAULT.warmup, measure=DEFAULT.measure, rounds=3)
"""The floor's six sides at two concurrencies: three rounds keep it near a minute and a half."""


def machine() -> dict[str, Any]:
    """What the numbers were measured on."""
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "cpus": os.cpu_count(),
        "cpu_model": model,
        "load_average": os.getloadavg(),
        "python": platform.python_version(),
        "grpcio": grpc.__version__,
        "protobuf": protobuf_version,
        "platform": platform.platform(),
    }


def _jsonable(value: Any) -> Any:
    if isinstance(value, Phase):
        return value.to_dict()
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    return value


def _say(text: str) -> None:
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


async def run(args: argparse.Namespace) -> int:
    """Run the selected benchmarks in order; return the number that failed."""
    durations = QUICK if args.quick else DEFAULT
    selected = list(args.only or BENCHMARKS)
    info = machine()
    _say(
        f"hivewire benchmarks — {info['date']}, {info['cpus']} CPUs ({info['cpu_model']}), "
        f"load {info['load_average'][0]:.2f}, Python {info['python']}, grpcio {info['grpcio']}, "
        f"protobuf {info['protobuf']}; "
        f"{'quick' if args.quick else 'default'} mode: warm-up {durations.warmup}s, "
        f"{durations.measure}s per phase, {durations.rounds} round(s)"
    )
    results: dict[str, Any] = {"machine": info, "quick": args.quick}
    failed = 0
    with tempfile.TemporaryDirectory(prefix="hivewire-bench-certs-") as tmp:
        certs = Path(tmp)
        init_pki(certs)

        async def bench_chain() -> str:
            # The table: a no-op task against the bare 2-hop chain; a plot
            # needs more than two points on its concurrency axis.
            result = await chain.measure(
                durations=durations if args.quick else MESH_TASKS,
                concurrency=chain.PLOT_CONCURRENCY if args.plot else chain.CONCURRENCY,
            )
            results["chain"] = result
            if args.plot:
                before = chain.load(args.before) if args.before else None
                chain.plot(result, args.plot, before=before)
            text = chain.report(result)
            return text + (f"\nplot written to {args.plot}" if args.plot else "")

        async def bench_floor() -> str:
            # The chain's comparison again, with the floors beside it: the contract's
            # messages, store and events with nothing of hivewire in between.
            result = await floor.measure(durations=durations if args.quick else FLOOR_ROUNDS)
            results["floor"] = result
            return floor.report(result)

        async def bench_tokens() -> str:
            result = await tokens.measure(durations=durations)
            results["tokens"] = result
            return tokens.report(result)

        async def bench_backlog() -> str:
            result = await backlog.measure(
                rounds=1 if args.quick else backlog.ROUNDS,
                sizes=args.queue_sizes or (backlog.QUICK_SIZES if args.quick else backlog.SIZES),
            )
            results["backlog"] = result
            return backlog.report(result)

        async def bench_echo() -> str:
            result = await echo.measure(certs, durations=durations)
            results["echo"] = result
            return echo.report(result)

        async def bench_interceptors() -> str:
            result = await interceptors.measure(certs, durations=durations)
            results["interceptors"] = result
            return interceptors.report(result)

        async def bench_mesh() -> str:
            task_durations = durations if args.quick else MESH_TASKS
            result = await mesh.measure(durations=durations, task_durations=task_durations)
            results["mesh"] = result
            return mesh.report(result)

        async def bench_coordinators() -> str:
            task_durations = durations if args.quick else MESH_TASKS
            result = await coordinators.measure(durations=durations, task_durations=task_durations)
            results["coordinators"] = result
            return coordinators.report(result)

        async def bench_plans() -> str:
            result = await plans.measure(durations=durations if args.quick else MESH_TASKS)
            results["plans"] = result
            return plans.report(result)

        async def bench_streams() -> str:
            count = args.streams or (STREAMS_QUICK if args.quick else STREAMS_DEFAULT)
            result = await streams.measure(streams=count)
            results["streams"] = result
            return streams.report(result)

        async def bench_events() -> str:
            out = []
            for sync in ("always", "2m"):
                result = await events.measure(durations=durations, sync_interval=sync)
                results[f"events_sync_{sync}"] = result
                out.append(events.report(result))
            return "\n".join(out)

        async def bench_outbox() -> str:
            out = []
            for store, tasks, rounds in (("sqlite", 2000, 5), ("jetstream", 200, 3)):
                if args.quick:
                    tasks, rounds = tasks // 4, 1
                result = await outbox.measure(tasks=tasks, rounds=rounds, store=store)
                results[f"outbox_{store}"] = result
                out.append(outbox.report(result, tasks, store))
            return "\n".join(out)

        async def bench_grpcio() -> str:
            rounds = 2 if args.quick else 5
            result = await grpcio_versions.measure(
                durations=Durations(durations.warmup, durations.measure, rounds), certs=certs
            )
            results["grpcio"] = result
            return grpcio_versions.report(result)

        runners: dict[str, Callable[[], Awaitable[str]]] = {
            "chain": bench_chain,
            "floor": bench_floor,
            "tokens": bench_tokens,
            "backlog": bench_backlog,
            "echo": bench_echo,
            "interceptors": bench_interceptors,
            "mesh": bench_mesh,
            "coordinators": bench_coordinators,
            "plans": bench_plans,
            "streams": bench_streams,
            "events": bench_events,
            "outbox": bench_outbox,
            "grpcio": bench_grpcio,
        }
        total = time.perf_counter()
        for name in selected:
            started = time.perf_counter()
            try:
                text = await runners[name]()
            except Exception:
                failed += 1
                _say(f"\n{name}: FAILED\n{traceback.format_exc()}")
                continue
            _say(text)
            _say(f"\n({name}: {time.perf_counter() - started:.0f} s)")
        _say(f"\nall done in {time.perf_counter() - total:.0f} s")
    if args.json:
        args.json.write_text(json.dumps(_jsonable(results), indent=2) + "\n")
        _say(f"results written to {args.json}")
    return failed


def main(argv: Sequence[str] | None = None) -> None:
    """Parse flags and run."""
    parser = argparse.ArgumentParser(
        prog="bench/run.py", description=(__doc__ or "").split("\n\n")[0]
    )
    parser.add_argument("--quick", action="store_true", help="short phases, one round (<1 min)")
    parser.add_argument(
        "--only",
        nargs="+",
        choices=(*BENCHMARKS, *OPTIONAL),
        help="run only these (grpcio is never run unless named here)",
    )
    parser.add_argument("--streams", type=int, help="WatchTask streams to open")
    parser.add_argument(
        "--queue-sizes",
        nargs="+",
        type=int,
        help="backlog: waiting tasks to compare (smallest first)",
    )
    parser.add_argument("--json", type=Path, help="also write every number as JSON here")
    parser.add_argument(
        "--plot",
        type=Path,
        help="chain: also measure c=4 and c=32 and draw rate and p99 against concurrency "
        "(PNG, matplotlib from the bench extra)",
    )
    parser.add_argument(
        "--before", type=Path, help="chain: an earlier --json run, drawn as 'hivewire before'"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    sys.exit(1 if asyncio.run(run(args)) else 0)


if __name__ == "__main__":
    main()
