"""Tasks/s by coordinator count and task store, against the bare echo baseline.

Variants: 1 coordinator on SQLite (the default), and 1, 2 and 3 coordinators sharing
the JetStream store on one nats-server; each is a real mesh (:mod:`bench.meshrun`)
with the same two benchmark agents. Tasks are ``StreamTask`` calls of the ``noop``
capability (:func:`bench.mesh.run_task`) from ``concurrency`` workers, spread over
the coordinators round-robin (worker i talks to coordinator i mod N, one channel
each). Every round runs each variant, then the bare echo baseline
(:mod:`bench.echo`), and ratios are taken round by round.

The coordinators' CPU per task gives the sizing figure of docs/deployment.md: tasks/s
one coordinator core sustains = 1,000,000 / (coordinator CPU µs per task). Several
coordinators share the store through task leases (services/coordinator/cluster.py).
"""

from __future__ import annotations

import contextlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import grpc

from bench.common import (
    PHASE_HEADERS,
    Durations,
    Phase,
    closed_loop,
    cpu_total,
    fmt_rate,
    fmt_spread,
    inverse_rate,
    median_phase,
    paired_ratios,
    phase_row,
    table,
)
from bench.echo import echo_server, open_channel, unary_phases
from bench.mesh import ECHO_CONCURRENCY, run_task
from bench.meshrun import BenchMesh, bench_mesh, coordinator_stub

AGENTS = 2
CONCURRENCY = 32
ECHO = f"echo unary c={ECHO_CONCURRENCY}"


@dataclass(frozen=True)
class Variant:
    """One mesh shape."""

    store: str
    coordinators: int

    @property
    def name(self) -> str:
        """E.g. ``jetstream x2``."""
        return f"{self.store} x{self.coordinators}"


VARIANTS = (
    Variant("sqlite", 1),
    Variant("jetstream", 1),
    Variant("jetstream", 2),
    Variant("jetstream", 3),
)


async def _phase(
    variant: Variant,
    mesh: BenchMesh,
    stubs: list[Any],
    *,
    concurrency: int,
    durations: Durations,
) -> Phase:
    turn = 0

    def next_op() -> Callable[[], Awaitable[None]]:
        # Each worker of the closed loop calls op(); spread the calls round-robin.
        async def op() -> None:
            nonlocal turn
            stub = stubs[turn % len(stubs)]
            turn += 1
            await run_task(stub)

        return op

    phase = await closed_loop(
        variant.name, next_op(), concurrency=concurrency, durations=durations, pids=mesh.pids
    )
    coordinators = sum(v for k, v in phase.cpu_us.items() if k.startswith("coordinator"))
    agents = sum(v for k, v in phase.cpu_us.items() if k.startswith("agent-"))
    others = {
        k: v
        for k, v in phase.cpu_us.items()
        if not k.startswith("coordinator") and not k.startswith("agent-")
    }
    phase.cpu_us = {**others, "coordinators": coordinators, "agents": agents}
    return phase


async def measure(
    *,
    durations: Durations,
    task_durations: Durations | None = None,
    concurrency: int = CONCURRENCY,
    variants: tuple[Variant, ...] = VARIANTS,
) -> dict[str, Any]:
    """Every runnable variant and the echo baseline, round after round.

    Returns:
        ``{"phases": {name: median Phase}, "rounds": {name: [Phase per round]},
        "variants": [names], "concurrency": n, "agents": n}``.
    """
    task_durations = task_durations or durations
    rounds: dict[str, list[Phase]] = {}
    async with contextlib.AsyncExitStack() as stack:
        meshes: dict[Variant, tuple[BenchMesh, list[Any]]] = {}
        certs = None
        for variant in variants:
            mesh = await stack.enter_async_context(
                bench_mesh(
                    agents=AGENTS,
                    coordinators=variant.coordinators,
                    coordinator_env={"HIVEWIRE_COORDINATOR__STORE": variant.store},
                )
            )
            channels: list[grpc.aio.Channel] = [mesh.channel(a) for a in mesh.addresses]
            for channel in channels:
                stack.push_async_callback(channel.close)
            stubs = [coordinator_stub(c) for c in channels]
            for stub in stubs:
                await run_task(stub)  # warm every coordinator once
            meshes[variant] = (mesh, stubs)
            certs = mesh.certs
        assert certs is not None
        for _ in range(durations.rounds):
            for variant, (mesh, stubs) in meshes.items():
                phase = await _phase(
                    variant, mesh, stubs, concurrency=concurrency, durations=task_durations
                )
                rounds.setdefault(phase.name, []).append(phase)
            async with echo_server(certs) as server:
                channel = open_channel(server.target, certs)
                try:
                    for phase in await unary_phases(
                        channel,
                        durations=durations,
                        pids={"server": server.pid},
                        concurrency=ECHO_CONCURRENCY,
                        label="echo unary",
                    ):
                        rounds.setdefault(phase.name, []).append(phase)
                finally:
                    await channel.close()
    return {
        "phases": {name: median_phase(p) for name, p in rounds.items()},
        "rounds": rounds,
        "variants": [v.name for v in variants],
        "concurrency": concurrency,
        "agents": AGENTS,
    }


def per_core(phase: Phase) -> float:
    """Tasks/s one coordinator core sustains: 1e6 / coordinator CPU µs per task."""
    cpu = phase.cpu_us.get("coordinators", 0.0)
    return 1e6 / cpu if cpu else float("nan")


def report(result: dict[str, Any]) -> str:
    """The variants' table, and the ratio table against the echo baseline."""
    phases: dict[str, Phase] = result["phases"]
    rounds: dict[str, list[Phase]] = result["rounds"]
    procs = ("client", "coordinators", "agents", "nats")
    c = result["concurrency"]
    headers = [*PHASE_HEADERS, *(f"{p} CPU µs" for p in procs), "total CPU µs/task"]
    rows = [phase_row(phases[name], procs=procs) for name in result["variants"]]
    out = [
        table(
            f"coordinators: tasks at c={c} over {result['agents']} agents, by store and"
            " coordinator count (real processes, mTLS; clients spread over the coordinators)",
            headers,
            rows,
        )
    ]
    ratio_rows = []
    base = rounds[result["variants"][0]]
    for name in result["variants"]:
        phase = phases[name]
        ratio_rows.append(
            [
                name,
                fmt_rate(phase.rate),
                fmt_rate(per_core(phase)),
                fmt_spread(paired_ratios(rounds[name], rounds[ECHO], inverse_rate)),
                fmt_spread(paired_ratios(rounds[name], rounds[ECHO], cpu_total)),
                fmt_spread(paired_ratios(base, rounds[name], inverse_rate)),
            ]
        )
    out.append(
        table(
            f"coordinators vs bare echo (echo: {fmt_rate(phases[ECHO].rate)} at"
            f" c={ECHO_CONCURRENCY}), per round: median (min-max)",
            [
                "variant",
                "tasks/s",
                "tasks/s per coordinator core",
                "echo calls/s ÷ tasks/s",
                "CPU per task ÷ per echo call",
                f"tasks/s ÷ {result['variants'][0]}",
            ],
            ratio_rows,
        )
    )
    return "\n".join(out)
