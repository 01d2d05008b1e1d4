"""What a plan step costs the coordinator, against a plain task in the same run.

A plan of ``STEPS`` independent ``noop`` steps (``AGGREGATION_ALL``) is followed with
``StreamTask`` to its end, and plain ``noop`` tasks are run alongside, round by round,
through the same real mesh (coordinator, agents, SQLite, NATS events). A plan step is
a task of its own plus the plan's bookkeeping (the parent's journal mirrors each
step's start, end and progress, the step statuses are rewritten with each of them,
and the outputs are aggregated), so the interesting number is the coordinator's CPU
per step divided by its CPU per plain task: the added cost of running work as a step.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from bench.common import (
    Durations,
    Phase,
    Spread,
    closed_loop,
    cpu_of,
    fmt_rate,
    fmt_spread,
    fmt_time,
    median_phase,
    p50,
    paired_ratios,
    ratio,
    table,
)
from bench.mesh import TaskFailedError, noop_spec, run_task
from bench.meshrun import bench_mesh, coordinator_stub
from hivewire.common.v1 import common_pb2
from hivewire.coordinator.v1 import coordinator_pb2

if TYPE_CHECKING:
    from bench.meshrun import CoordinatorStub

STEPS = 4
"""Steps of each benchmark plan."""
CONCURRENCY = 4
"""Plans (and plain tasks x STEPS) in flight at once."""


def plan_spec(steps: int = STEPS) -> coordinator_pb2.TaskSpec:
    """A plan of ``steps`` independent noop steps whose outputs are all kept."""
    step = noop_spec()
    spec = coordinator_pb2.TaskSpec(
        plan=coordinator_pb2.Plan(
            aggregation=coordinator_pb2.AGGREGATION_ALL,
            steps=[
                coordinator_pb2.PlanStep(step_id=f"s{i}", capability="noop", input=step.input)
                for i in range(steps)
            ],
        ),
        metadata=step.metadata,
    )
    spec.timeout.FromSeconds(60)
    return spec


async def run_plan(stub: CoordinatorStub, spec: coordinator_pb2.TaskSpec) -> int:
    """Run one plan to its end; return the number of events streamed."""
    events = 0
    finished: coordinator_pb2.TaskFinished | None = None
    async for response in stub.StreamTask(coordinator_pb2.StreamTaskRequest(spec=spec)):
        events += 1
        if response.event.WhichOneof("kind") == "finished":
            finished = response.event.finished
    if finished is None or finished.state != common_pb2.TASK_STATE_SUCCEEDED:
        raise TaskFailedError(f"plan ended {finished}")
    return events


async def measure(*, durations: Durations, agents: int = 2) -> dict[str, Any]:
    """Plain tasks and plans, interleaved round by round, through one mesh."""
    rounds: dict[str, list[Phase]] = {}
    spec = plan_spec()
    async with bench_mesh(agents=agents) as mesh:
        channel = mesh.channel()
        try:
            stub = coordinator_stub(channel)
            plan_events = await run_plan(stub, spec)

            async def task_op() -> None:
                await run_task(stub)

            async def plan_op() -> None:
                await run_plan(stub, spec)

            for _ in range(durations.rounds):
                for phase in (
                    await closed_loop(
                        f"task c={CONCURRENCY * STEPS}",
                        task_op,
                        concurrency=CONCURRENCY * STEPS,
                        durations=durations,
                        pids=mesh.pids,
                    ),
                    await closed_loop(
                        f"plan of {STEPS} c={CONCURRENCY}",
                        plan_op,
                        concurrency=CONCURRENCY,
                        durations=durations,
                        pids=mesh.pids,
                    ),
                ):
                    rounds.setdefault(phase.name, []).append(phase)
        finally:
            await channel.close()
    return {
        "phases": {name: median_phase(p) for name, p in rounds.items()},
        "rounds": rounds,
        "steps": STEPS,
        "plan_events": plan_events,
    }


def report(result: dict[str, Any]) -> str:
    """Per step against per task: coordinator CPU, throughput, latency."""
    steps = result["steps"]
    rounds: dict[str, list[Phase]] = result["rounds"]
    phases: dict[str, Phase] = result["phases"]
    task_name = next(n for n in phases if n.startswith("task"))
    plan_name = next(n for n in phases if n.startswith("plan"))
    task, plan = phases[task_name], phases[plan_name]
    coordinator = cpu_of("coordinator")

    def per_step(phase: Phase) -> float:
        return coordinator(phase) / steps

    def steps_per_second(phase: Phase) -> float:
        return phase.rate * steps

    rows: list[tuple[str, str, str, Spread]] = [
        (
            "coordinator CPU per unit of work",
            fmt_time(per_step(plan) / 1e6),
            fmt_time(coordinator(task) / 1e6),
            _paired(rounds[plan_name], rounds[task_name], per_step, coordinator),
        ),
        (
            "units of work per second",
            fmt_rate(plan.rate * steps, " steps/s"),
            fmt_rate(task.rate, " tasks/s"),
            _paired(rounds[plan_name], rounds[task_name], steps_per_second, lambda p: p.rate),
        ),
        (
            f"p50 latency of a plan of {steps} vs one task",
            fmt_time(p50(plan)),
            fmt_time(p50(task)),
            paired_ratios(rounds[plan_name], rounds[task_name], p50),
        ),
    ]
    return "\n".join(
        [
            table(
                f"plans: {steps} parallel noop steps (AGGREGATION_ALL) vs plain noop tasks, "
                f"same mesh, same run ({result['plan_events']} stream events per plan)",
                ["measure", "plan step", "plain task", "ratio median (min-max)"],
                [[name, a, b, fmt_spread(s)] for name, a, b, s in rows],
            )
        ]
    )


def _paired(
    numerators: list[Phase],
    denominators: list[Phase],
    top: Callable[[Phase], float],
    bottom: Callable[[Phase], float],
) -> Spread:
    """``top(a) / bottom(b)`` for each round's pair (two metrics), summarized."""
    values = sorted(ratio(top(a), bottom(b)) for a, b in zip(numerators, denominators, strict=True))
    values = [v for v in values if not math.isnan(v)] or [math.nan]
    return Spread(statistics.median(values), values[0], values[-1])
