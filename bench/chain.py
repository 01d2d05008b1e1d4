"""A hivewire no-op task against a bare 2-hop grpc.aio chain, side by side in one run.

A task crosses two gRPC hops (client -> coordinator -> agent) and back; so does a call
through the bare chain client -> relay -> echo (``bench.echo`` ``relay`` and ``bare``
servers, each its own process, the same mTLS certificates, the same grpcio, no
interceptors). Each round runs, at every concurrency, the task loop (``StreamTask`` of
the benchmark agent's ``noop`` capability to ``finished``: the durable SQLite store,
mTLS and NATS events on) and then the chain loop, and takes the ratios of that round:

* rate: tasks/s ÷ chain calls/s (the issue's target: >= 0.30x at c=16);
* p50 and p99: task latency ÷ chain latency (targets: p50 <= 3x at c=1, p99 <= 4x at c=16);
* CPU: CPU per task ÷ CPU per chain call, every process of each side.

Ratios are printed per round and as median (min-max) over the rounds. ``--plot`` draws
rate and p99 against concurrency for both (matplotlib, the ``bench`` extra), and a
hivewire curve from an earlier ``--json`` run when one is given (before/after).
"""

from __future__ import annotations

import contextlib
import json
import math
import statistics
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from google.protobuf.wrappers_pb2 import BytesValue

from bench.common import (
    Durations,
    Phase,
    Spread,
    closed_loop,
    cpu_total,
    fmt_rate,
    fmt_spread,
    fmt_time,
    median_phase,
    p50,
    p99,
    paired_ratios,
    ratio,
    table,
)
from bench.echo import PAYLOAD, UNARY, echo_server, open_channel
from bench.mesh import run_task
from bench.meshrun import bench_mesh, coordinator_stub

CONCURRENCY = (1, 16)
"""The issue's table: one task at a time, and sixteen in flight."""
PLOT_CONCURRENCY = (1, 4, 16, 32)
"""Concurrencies measured when a plot is asked for."""
AGENTS = 1
TASK = "task"
CHAIN = "chain"


@dataclass(frozen=True)
class RelayChain:
    """A running bare chain: ``target`` is the relay, which forwards to the echo server."""

    target: str
    pids: dict[str, int]


@contextlib.asynccontextmanager
async def relay_chain(certs: Path) -> AsyncIterator[RelayChain]:
    """Start an echo server and a relay in front of it (two processes)."""
    async with (
        echo_server(certs) as echo,
        echo_server(certs, variant="relay", upstream=echo.target) as relay,
    ):
        yield RelayChain(relay.target, {"relay": relay.pid, "echo": echo.pid})


def phase_name(side: str, concurrency: int) -> str:
    """``task c=16``, ``chain c=1``..."""
    return f"{side} c={concurrency}"


async def measure(
    *,
    durations: Durations,
    concurrency: Sequence[int] = CONCURRENCY,
    agents: int = AGENTS,
) -> dict[str, Any]:
    """Tasks and chain calls at each concurrency, alternating, ``durations.rounds`` times.

    Returns:
        ``{"concurrency": [...], "rounds": {name: [Phase per round]},
        "phases": {name: median Phase}, "agents": n}``.
    """
    rounds: dict[str, list[Phase]] = {}
    async with bench_mesh(agents=agents) as mesh, relay_chain(mesh.certs) as chain:
        # A client built from proto/, as any user's: a plain grpc.aio channel with the
        # client certificate and no hivewire interceptors, like the chain's client.
        task_channel = open_channel(mesh.address, mesh.certs)
        chain_channel = open_channel(chain.target, mesh.certs)
        try:
            stub = coordinator_stub(task_channel)
            await run_task(stub)
            call = chain_channel.unary_unary(
                UNARY,
                request_serializer=BytesValue.SerializeToString,
                response_deserializer=BytesValue.FromString,
            )
            await call(PAYLOAD, timeout=30, wait_for_ready=True)

            async def task_op() -> None:
                await run_task(stub)

            async def chain_op() -> None:
                await call(PAYLOAD)

            for _ in range(durations.rounds):
                for c in concurrency:
                    task = await closed_loop(
                        phase_name(TASK, c), task_op, concurrency=c, durations=durations,
                        pids=mesh.pids,
                    )  # fmt: skip
                    bare = await closed_loop(
                        phase_name(CHAIN, c), chain_op, concurrency=c, durations=durations,
                        pids=chain.pids,
                    )  # fmt: skip
                    for phase in (task, bare):
                        rounds.setdefault(phase.name, []).append(phase)
        finally:
            await chain_channel.close()
            await task_channel.close()
    return {
        "concurrency": list(concurrency),
        "rounds": rounds,
        "phases": {name: median_phase(p) for name, p in rounds.items()},
        "agents": agents,
    }


def _rate(phase: Phase) -> float:
    return phase.rate


def _summary(phase: Phase, unit: str) -> str:
    return f"{fmt_rate(phase.rate, unit)}, p50 {fmt_time(p50(phase))}, p99 {fmt_time(p99(phase))}"


def _range(values: Sequence[float], fmt: Any) -> str:
    """``median (min-max)`` of values formatted with ``fmt``."""
    clean = sorted(v for v in values if not math.isnan(v))
    if not clean:
        return "-"
    mid = fmt(statistics.median(clean))
    if len(clean) == 1:
        return mid
    return f"{mid} ({fmt(clean[0])}-{fmt(clean[-1])})"


def ratios(result: Mapping[str, Any], concurrency: int, *, side: str = TASK) -> dict[str, Spread]:
    """Per-round ratios ``side`` (the task) ÷ chain at one concurrency: rate, p50, p99, CPU."""
    tasks = result["rounds"][phase_name(side, concurrency)]
    bare = result["rounds"][phase_name(CHAIN, concurrency)]
    return {
        "rate": paired_ratios(tasks, bare, _rate),
        "p50": paired_ratios(tasks, bare, p50),
        "p99": paired_ratios(tasks, bare, p99),
        "cpu": paired_ratios(tasks, bare, cpu_total),
    }


def report(result: Mapping[str, Any]) -> str:
    """The issue's table (medians and ranges over rounds), then every round's ratios."""
    rounds: dict[str, list[Phase]] = result["rounds"]
    rows = []
    for c in sorted(result["concurrency"], reverse=True):
        tasks, bare = rounds[phase_name(TASK, c)], rounds[phase_name(CHAIN, c)]
        spread = ratios(result, c)
        rows.append(
            [
                str(c),
                f"{_range([p.rate for p in tasks], lambda v: f'{v:,.0f}')} tasks/s, "
                f"p50 {_range([p50(p) for p in tasks], fmt_time)}, "
                f"p99 {_range([p99(p) for p in tasks], fmt_time)}",
                f"{_range([p.rate for p in bare], lambda v: f'{v:,.0f}')} calls/s, "
                f"p50 {_range([p50(p) for p in bare], fmt_time)}, "
                f"p99 {_range([p99(p) for p in bare], fmt_time)}",
                fmt_spread(spread["rate"]),
                fmt_spread(spread["p50"]),
                fmt_spread(spread["p99"]),
                fmt_spread(spread["cpu"]),
            ]
        )
    out = [
        table(
            f"hivewire no-op task (StreamTask to finished; coordinator + {result['agents']} "
            "agent, mTLS, SQLite, NATS events) vs bare 2-hop grpc.aio chain "
            "(client -> relay -> echo, mTLS): median (min-max) over rounds; ratios task / chain "
            "per round",
            [
                "concurrency",
                "hivewire no-op task",
                "bare 2-hop chain",
                "rate ratio",
                "p50 ratio",
                "p99 ratio",
                "CPU/op ratio",
            ],
            rows,
        )
    ]
    per_round = []
    for c in sorted(result["concurrency"]):
        tasks, bare = rounds[phase_name(TASK, c)], rounds[phase_name(CHAIN, c)]
        for i, (t, b) in enumerate(zip(tasks, bare, strict=True), start=1):
            per_round.append(
                [
                    f"c={c} round {i}",
                    _summary(t, "/s"),
                    f"{t.cpu_total_us:,.0f} µs",
                    _summary(b, "/s"),
                    f"{b.cpu_total_us:,.0f} µs",
                    f"{ratio(t.rate, b.rate):.2f}x",
                    f"{ratio(p50(t), p50(b)):.2f}x",
                    f"{ratio(p99(t), p99(b)):.2f}x",
                ]
            )
    out.append(
        table(
            "every round (CPU = every process of that side, per task or call)",
            ["round", "task", "task CPU", "chain", "chain CPU", "rate", "p50", "p99"],
            per_round,
        )
    )
    return "\n".join(out)


# --- plot -------------------------------------------------------------------------------


def load(path: Path) -> dict[str, Any]:
    """The ``chain`` entry of a result written by ``bench/run.py --json``."""
    data = json.loads(path.read_text())
    data = data.get("chain", data)
    return {
        **data,
        "rounds": {
            name: [Phase.from_dict(p) for p in phases] for name, phases in data["rounds"].items()
        },
    }


def _curve(
    result: Mapping[str, Any], side: str, metric: Any
) -> tuple[list[int], list[float], list[float], list[float]]:
    xs, mid, low, high = [], [], [], []
    for c in sorted(result["concurrency"]):
        values = sorted(metric(p) for p in result["rounds"][phase_name(side, c)])
        xs.append(c)
        mid.append(statistics.median(values))
        low.append(values[0])
        high.append(values[-1])
    return xs, mid, low, high


def plot(result: Mapping[str, Any], path: Path, *, before: Mapping[str, Any] | None = None) -> None:
    """Rate and p99 against concurrency: hivewire, the bare chain (and hivewire before)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (rate_ax, p99_ax) = plt.subplots(1, 2, figsize=(10, 4))
    series: list[tuple[str, Mapping[str, Any], str, str, str]] = [
        ("bare 2-hop chain", result, CHAIN, "tab:gray", "-"),
        ("hivewire no-op task", result, TASK, "tab:blue", "-"),
    ]
    if before is not None:
        # Its own chain too: on a shared machine only a run's own baseline compares.
        series.append(("bare chain, in the earlier run", before, CHAIN, "tab:gray", "--"))
        series.append(("hivewire, earlier run", before, TASK, "tab:red", "--"))
    for label, data, side, color, style in series:
        for ax, metric, scale in ((rate_ax, _rate, 1.0), (p99_ax, p99, 1e3)):
            xs, mid, low, high = _curve(data, side, metric)
            ax.plot(
                xs, [v * scale for v in mid], marker="o", color=color, linestyle=style, label=label
            )
            ax.fill_between(
                xs, [v * scale for v in low], [v * scale for v in high], color=color, alpha=0.15
            )
    rate_ax.set(xscale="log", yscale="log", xlabel="concurrency", ylabel="per second")
    rate_ax.set_title("rate (median, min-max band)")
    p99_ax.set(xscale="log", yscale="log", xlabel="concurrency", ylabel="ms")
    p99_ax.set_title("p99 latency")
    for ax in (rate_ax, p99_ax):
        ticks = sorted({c for _, data, _, _, _ in series for c in data["concurrency"]})
        ax.set_xticks(ticks, [str(t) for t in ticks])
        ax.grid(True, which="both", alpha=0.3)
    rate_ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
