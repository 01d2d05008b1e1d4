"""Mesh task throughput and latency through a real coordinator and real agents.

Each task is one ``StreamTask`` call (submit and follow) for the benchmark agent's
``noop`` capability, so what is measured is the mesh itself: validation, the durable
SQLite store, scheduling, the ``AgentService.Execute`` stream to the agent, the
result, the events streamed to the client and published on NATS.

Every round also runs the bare echo baseline (:mod:`bench.echo`, same certificates,
same machine a moment later), and the ratios are taken round by round. A task crosses
two gRPC hops (client -> coordinator, coordinator -> agent), so each ratio is also
given per hop (divided by two).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from bench.common import (
    PHASE_HEADERS,
    Durations,
    Phase,
    Spread,
    closed_loop,
    cpu_total,
    fmt_rate,
    fmt_spread,
    fmt_time,
    inverse_rate,
    median_phase,
    p50,
    p99,
    paired_ratios,
    phase_row,
    table,
)
from bench.echo import echo_server, open_channel, unary_phases
from bench.meshrun import bench_mesh, coordinator_stub
from hivewire.common.v1 import common_pb2
from hivewire.coordinator.v1 import coordinator_pb2

if TYPE_CHECKING:
    from bench.meshrun import CoordinatorStub

HOPS = 2
"""gRPC hops a task crosses: client -> coordinator, coordinator -> agent."""

AGENTS = 2
CONCURRENCY = 32
"""Tasks in flight in the throughput phase (the agents take 64 each)."""
ECHO_CONCURRENCY = 16


class TaskFailedError(RuntimeError):
    """A benchmark task did not succeed."""


def noop_spec(capability: str = "noop") -> coordinator_pb2.TaskSpec:
    """A task for the benchmark agent's ``noop`` (or another) capability, a small text input."""
    spec = coordinator_pb2.TaskSpec(
        capability=capability,
        input=common_pb2.Payload(text="ping"),
        metadata=common_pb2.RequestMetadata(source="hivewire-bench"),
    )
    spec.timeout.FromSeconds(60)
    return spec


async def run_task(
    stub: CoordinatorStub, capability: str = "noop", *, outcome_only: bool = False
) -> int:
    """Submit one task (``noop`` unless told) with ``StreamTask`` and follow it to its end.

    ``outcome_only`` asks for the snapshot and the end alone (``StreamTaskRequest``).

    Returns:
        The number of events the client received.

    Raises:
        TaskFailedError: It ended in another state than SUCCEEDED.
    """
    events = 0
    finished: coordinator_pb2.TaskFinished | None = None
    call = stub.StreamTask(
        coordinator_pb2.StreamTaskRequest(spec=noop_spec(capability), outcome_only=outcome_only)
    )
    async for response in call:
        events += 1
        if response.event.WhichOneof("kind") == "finished":
            finished = response.event.finished
    if finished is None or finished.state != common_pb2.TASK_STATE_SUCCEEDED:
        raise TaskFailedError(f"task ended {finished}")
    return events


async def _task_phase(
    name: str,
    op: Callable[[], Awaitable[None]],
    concurrency: int,
    durations: Durations,
    pids: dict[str, int],
) -> Phase:
    phase = await closed_loop(name, op, concurrency=concurrency, durations=durations, pids=pids)
    # One column for all agents: their count is a setting, their sum is the cost.
    agent_cpu = sum(v for k, v in phase.cpu_us.items() if k.startswith("agent-"))
    phase.cpu_us = {k: v for k, v in phase.cpu_us.items() if not k.startswith("agent-")}
    phase.cpu_us["agents"] = agent_cpu
    return phase


async def measure(
    *,
    durations: Durations,
    task_durations: Durations | None = None,
    agents: int = AGENTS,
    concurrency: int = CONCURRENCY,
) -> dict[str, Any]:
    """Tasks at c=1 and c=``concurrency``, then the echo baseline, each round.

    Args:
        durations: Phases of the echo baseline, and the number of rounds.
        task_durations: Phases of the task loops (default: ``durations``).
        agents: Agent processes.
        concurrency: Tasks in flight in the throughput phase.

    Returns:
        ``{"phases": {name: median Phase}, "rounds": {name: [Phase per round]},
        "events_per_task": n, "agents": n}``; echo phases are named ``echo unary c=N``.
    """
    task_durations = task_durations or durations
    rounds: dict[str, list[Phase]] = {}
    async with bench_mesh(agents=agents) as mesh:
        pids = mesh.pids
        channel = mesh.channel()
        try:
            stub = coordinator_stub(channel)
            events = await run_task(stub)

            async def op() -> None:
                await run_task(stub)

            for _ in range(durations.rounds):
                phases = [
                    await _task_phase(f"task c={c}", op, c, task_durations, pids)
                    for c in (1, concurrency)
                ]
                async with echo_server(mesh.certs) as server:
                    echo_channel = open_channel(server.target, mesh.certs)
                    try:
                        phases.extend(
                            await unary_phases(
                                echo_channel,
                                durations=durations,
                                pids={"server": server.pid},
                                concurrency=ECHO_CONCURRENCY,
                                label="echo unary",
                            )
                        )
                    finally:
                        await echo_channel.close()
                for phase in phases:
                    rounds.setdefault(phase.name, []).append(phase)
        finally:
            await channel.close()
    return {
        "phases": {name: median_phase(p) for name, p in rounds.items()},
        "rounds": rounds,
        "events_per_task": events,
        "agents": agents,
        "concurrency": concurrency,
    }


def report(result: dict[str, Any]) -> str:
    """The mesh table and the ratios to the echo baseline measured alongside."""
    phases: dict[str, Phase] = result["phases"]
    procs = ("client", "coordinator", "agents", "nats")
    headers = [*PHASE_HEADERS, *(f"{p} CPU µs" for p in procs), "total CPU µs/task"]
    rows = [phase_row(p, procs=procs) for name, p in phases.items() if name.startswith("task")]
    out = [
        table(
            f"mesh: tasks through coordinator + {result['agents']} agents "
            f"(real processes, mTLS, SQLite, NATS events; "
            f"{result['events_per_task']} stream events per task)",
            headers,
            rows,
        ),
        ratio_table(result),
    ]
    return "\n".join(out)


def ratio_table(result: dict[str, Any]) -> str:
    """Mesh task vs bare echo call: latency, capacity and CPU, whole task and per hop."""
    phases: dict[str, Phase] = result["phases"]
    rounds: dict[str, list[Phase]] = result["rounds"]
    c = result["concurrency"]
    seq, par = rounds["task c=1"], rounds[f"task c={c}"]
    echo_seq, echo_par = rounds["echo unary c=1"], rounds[f"echo unary c={ECHO_CONCURRENCY}"]
    med = {name: phases[name] for name in phases}
    lines: list[tuple[str, str, str, Spread]] = [
        (
            "p50 latency, c=1",
            fmt_time(p50(med["task c=1"])),
            fmt_time(p50(med["echo unary c=1"])),
            paired_ratios(seq, echo_seq, p50),
        ),
        (
            "p99 latency, c=1",
            fmt_time(p99(med["task c=1"])),
            fmt_time(p99(med["echo unary c=1"])),
            paired_ratios(seq, echo_seq, p99),
        ),
        (
            f"capacity: echo calls/s ÷ tasks/s (c={ECHO_CONCURRENCY} vs c={c})",
            fmt_rate(med[f"task c={c}"].rate),
            fmt_rate(med[f"echo unary c={ECHO_CONCURRENCY}"].rate),
            paired_ratios(par, echo_par, inverse_rate),
        ),
        (
            f"CPU per task ÷ CPU per echo call, every process (c={c})",
            f"{med[f'task c={c}'].cpu_total_us:,.0f} µs",
            f"{med[f'echo unary c={ECHO_CONCURRENCY}'].cpu_total_us:,.0f} µs",
            paired_ratios(par, echo_par, cpu_total),
        ),
    ]
    rows = []
    for what, mesh_value, echo_value, spread in lines:
        per_hop = Spread(spread.median / HOPS, spread.low / HOPS, spread.high / HOPS)
        rows.append([what, mesh_value, echo_value, fmt_spread(spread), fmt_spread(per_hop)])
    return table(
        "mesh vs bare echo, per round: median (min-max) of how many bare gRPC calls one task costs",
        ["measure", "mesh task", "echo call", "task / echo", f"per hop (/{HOPS})"],
        rows,
    )
