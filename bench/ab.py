"""A/B: the same no-op task loop through two meshes that differ only in settings.

Both meshes (coordinator, one agent, nats-server each) run at once; their phases
alternate round by round, so both variants see the same machine within seconds.
What is compared is the CPU each process spends per task (steadier than rates on a
shared machine), the rate and the latencies, as ``B / A`` per round, median (min-max).

    python bench/ab.py --b-env HIVEWIRE_EVENT_LOOP=uvloop
    python bench/ab.py --a-env K=V --b-env K=V --concurrency 1 16 --rounds 5
    python bench/ab.py --a-env PYTHONPATH=<other code>:. --capability soak   # + model, tool
    python bench/ab.py --b-env PYTHONPATH=<other code>:. --client plain   # a bare client
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
from collections.abc import Sequence
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import (
    Durations,
    Phase,
    closed_loop,
    cpu_of,
    cpu_total,
    env_pairs,
    fmt_spread,
    inverse_rate,
    median_phase,
    p50,
    p99,
    paired_ratios,
    phase_row,
    table,
)
from bench.echo import open_channel
from bench.mesh import run_task
from bench.meshrun import bench_mesh, coordinator_stub

PROCS = ("client", "coordinator", "agent-0", "nats")


async def run(args: argparse.Namespace) -> str:
    """Start both meshes, alternate their phases, report B / A."""
    durations = Durations(args.warmup, args.seconds, args.rounds)
    rounds: dict[str, list[Phase]] = {}
    async with contextlib.AsyncExitStack() as stack:
        meshes = {}
        sides = (
            ("A", env_pairs(args.a_env), args.a_sync_interval),
            ("B", env_pairs(args.b_env), args.b_sync_interval),
        )
        for name, env, sync_interval in sides:
            mesh = await stack.enter_async_context(
                bench_mesh(
                    agents=1,
                    service_env=env,
                    model_and_tool=args.capability == "soak",
                    sync_interval=sync_interval,
                )
            )
            channel = (
                open_channel(mesh.address, mesh.certs) if args.client == "plain" else mesh.channel()
            )
            stack.push_async_callback(channel.close)
            stub = coordinator_stub(channel)
            await run_task(stub, args.capability)
            meshes[name] = (mesh, stub)
        for round_no in range(args.rounds):
            # A then B in even rounds, B then A in odd ones: a drift of the machine
            # within a round does not favour one side.
            order = list(meshes.items())
            if round_no % 2:
                order.reverse()
            for c in args.concurrency:
                for name, (mesh, stub) in order:

                    async def op(stub: object = stub) -> None:
                        await run_task(stub, args.capability)  # type: ignore[arg-type]

                    phase = await closed_loop(
                        f"{name} c={c}", op, concurrency=c, durations=durations, pids=mesh.pids
                    )
                    rounds.setdefault(phase.name, []).append(phase)
    procs = (*PROCS, "model", "tool") if args.capability == "soak" else PROCS
    rows = [phase_row(median_phase(p), procs=procs) for p in rounds.values()]
    out = [
        table(
            f"A: {' '.join(args.a_env) or 'defaults'}, sync_interval {args.a_sync_interval}; "
            f"B: {' '.join(args.b_env) or 'defaults'}, sync_interval {args.b_sync_interval} "
            "(medians over rounds; CPU µs per task)",
            ["phase", "rate", "p50", "p95", "p99", *procs, "total"],
            rows,
        )
    ]
    ratio_rows = []
    for c in args.concurrency:
        a, b = rounds[f"A c={c}"], rounds[f"B c={c}"]
        ratio_rows.append(
            [
                f"c={c}",
                fmt_spread(paired_ratios(b, a, cpu_total)),
                fmt_spread(paired_ratios(b, a, cpu_of("coordinator"))),
                fmt_spread(paired_ratios(b, a, cpu_of("agent-0"))),
                fmt_spread(paired_ratios(b, a, cpu_of("nats"))),
                fmt_spread(paired_ratios(b, a, inverse_rate)),
                fmt_spread(paired_ratios(b, a, p50)),
                fmt_spread(paired_ratios(b, a, p99)),
            ]
        )
    out.append(
        table(
            "B / A per round, median (min-max); < 1: B costs less",
            [
                "phase",
                "CPU/task",
                "coordinator CPU",
                "agent CPU",
                "nats CPU",
                "1/rate",
                "p50",
                "p99",
            ],
            ratio_rows,
        )
    )
    return "\n".join(out)


def main(argv: Sequence[str] | None = None) -> None:
    """Command line."""
    parser = argparse.ArgumentParser(prog="bench/ab.py", description=__doc__)
    parser.add_argument("--a-env", nargs="*", default=[], help="KEY=VALUE of every A service")
    parser.add_argument("--b-env", nargs="*", default=[], help="KEY=VALUE of every B service")
    parser.add_argument(
        "--a-sync-interval", default="always", help="nats-server sync_interval of mesh A"
    )
    parser.add_argument(
        "--b-sync-interval", default="always", help="nats-server sync_interval of mesh B"
    )
    parser.add_argument("--concurrency", nargs="+", type=int, default=[1, 16])
    parser.add_argument(
        "--capability",
        default="noop",
        choices=("noop", "soak"),
        help="noop: the mesh alone; soak: each task also calls the model and a tool "
        "(both services started, their CPU counted)",
    )
    parser.add_argument(
        "--client",
        default="runtime",
        choices=("runtime", "plain"),
        help="runtime: hivewire's client channel (interceptors, sends a correlation id); "
        "plain: a bare grpc.aio channel, as bench/chain.py's client and any client "
        "built from proto/",
    )
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--warmup", type=float, default=0.5)
    args = parser.parse_args(argv)
    print(asyncio.run(run(args)))


if __name__ == "__main__":
    main()
