"""A long queue: submit and dispatch cost per task with 100 and with 100,000 tasks waiting.

Scheduling must not be linear in the queue's length. Two real coordinators run in this
process (each its own SQLite store under a temporary directory, its scheduler, its
agent pool; in-process so that their work can be timed per call), with one benchmark
agent as a process (started with :func:`bench.meshrun.bench_mesh`; the mesh's own
coordinator stays idle):

1. **fill**: with no agent known, the short queue gets ``sizes[0]`` ``noop`` tasks and
   the long one ``sizes[-1]`` (16 submissions at a time); they wait;
2. **memory**: this process's RSS after the long fill minus before it, per queued task
   (the task in memory, its queue entry, the SQLite page cache up to its bound), the
   objects the garbage collector tracks per queued task, and how long one full
   collection takes before and after the long fill (the event loop stops for it);
3. **submit**: ``ROUNDS`` rounds, each timing ``SAMPLE / ROUNDS`` submissions one after
   another into the short queue, then as many into the long one (CPU of this process
   and wall time per ``Coordinator.submit``: validation, the durable write, the enqueue);
4. **dispatch**: the agent (``AGENT_CONCURRENCY`` slots) is made known to the short
   queue's coordinator, then to the long one's, then to the short one's again, each
   time until ``SAMPLE / 2`` more tasks finished (the scheduler's pick, the ``Execute``
   call, the journal): the long queue against the mean of the two short runs.

Ratios are long ÷ short; ~1.0x means the cost does not grow with the queue.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import statistics
import tempfile
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

from bench.common import fmt_time, proc_rss, ratio, table
from bench.mesh import noop_spec
from bench.meshrun import BenchMesh, bench_mesh
from hivewire.coordinator.v1 import coordinator_pb2
from hivewire.discovery import Instance
from hivewire.discovery.static import StaticRegistry
from hivewire.services.coordinator.dispatch import AgentPool
from hivewire.services.coordinator.model import Caller
from hivewire.services.coordinator.service import Coordinator
from hivewire.services.coordinator.settings import CoordinatorSettings
from hivewire.services.coordinator.sqlite_store import SqliteTaskStore
from hivewire.services.runtime.channels import ChannelPool
from hivewire.services.runtime.tls import TlsFiles

SIZES = (100, 100_000)
QUICK_SIZES = (100, 10_000)
SAMPLE = 1000
"""Submissions timed into each queue (over ``ROUNDS``), and twice the tasks timed out of it."""
ROUNDS = 5
FILL_CONCURRENCY = 16
AGENT_CONCURRENCY = 16
CALLER = Caller(identity="spiffe://hivewire.local/client/bench", admin=False)


def waiting_spec() -> coordinator_pb2.TaskSpec:
    """A ``noop`` task whose deadline outlasts the longest fill."""
    spec = noop_spec()
    spec.timeout.FromSeconds(3600)
    return spec


@contextlib.asynccontextmanager
async def in_process_coordinator(
    state: Path, certs: Path
) -> AsyncIterator[tuple[Coordinator, StaticRegistry]]:
    """A coordinator in this process over a fresh SQLite store; agents come from ``registry``."""
    settings = CoordinatorSettings(db_path=state / "coordinator.db")
    files = TlsFiles.for_identity(certs, "coordinator")
    registry = StaticRegistry()
    async with contextlib.AsyncExitStack() as stack:
        await stack.enter_async_context(registry)
        store = await stack.enter_async_context(SqliteTaskStore(settings.db_path))
        channels = await stack.enter_async_context(ChannelPool(files))
        wake: list[Coordinator] = []
        pool = AgentPool(registry, channels, on_change=lambda: wake[0].wake() if wake else None)
        coordinator = Coordinator(settings, store=store, pool=pool)
        wake.append(coordinator)
        await stack.enter_async_context(coordinator)
        await stack.enter_async_context(pool)
        yield coordinator, registry


def agent_instance(mesh: BenchMesh) -> Instance:
    """The mesh's benchmark agent as this coordinator's registry entry."""
    agent = mesh.agents[0]
    return Instance(
        service="hivewire-agent",
        instance_id="bench-queue-agent",
        address="127.0.0.1",
        port=int(agent.ports["grpc"]),
        tags=("noop",),
        meta={"max_concurrency": str(AGENT_CONCURRENCY)},
    )


async def _submit_many(coordinator: Coordinator, count: int) -> None:
    left = count

    async def worker() -> None:
        nonlocal left
        while left > 0:
            left -= 1
            await coordinator.submit(waiting_spec(), CALLER)

    async with asyncio.TaskGroup() as tg:
        for _ in range(min(FILL_CONCURRENCY, count)):
            tg.create_task(worker())


async def _timed_submits(coordinator: Coordinator, count: int) -> tuple[float, float]:
    """(CPU s, wall s) per submission, ``count`` of them one after another."""
    cpu, wall = time.process_time(), time.perf_counter()
    for _ in range(count):
        await coordinator.submit(waiting_spec(), CALLER)
    return (time.process_time() - cpu) / count, (time.perf_counter() - wall) / count


async def _timed_dispatch(
    coordinator: Coordinator, registry: StaticRegistry, mesh: BenchMesh, count: int
) -> tuple[float, float]:
    """Make the agent known; (CPU s, wall s) per task until ``count`` more have finished."""
    done = asyncio.Event()
    finished = 0

    def on_event(rt: Any, event: Any) -> None:
        nonlocal finished
        if event.WhichOneof("kind") == "finished":
            finished += 1
            if finished == count:
                done.set()

    coordinator.listen(on_event)
    cpu, wall = time.process_time(), time.perf_counter()
    await registry.register(agent_instance(mesh))
    async with asyncio.timeout(900):
        await done.wait()
    result = (time.process_time() - cpu) / count, (time.perf_counter() - wall) / count
    await registry.deregister("bench-queue-agent")
    # Let the agent's slots drain before the next phase (tasks already sent finish).
    while coordinator.list_agents():  # noqa: ASYNC110 - the pool has no event for this
        await asyncio.sleep(0.05)
    return result


def _full_collection() -> float:
    """Seconds of one full collection of the garbage collector (the loop stops for it)."""
    started = time.perf_counter()
    gc.collect()
    return time.perf_counter() - started


async def measure(
    *, sizes: Sequence[int] = SIZES, sample: int = SAMPLE, rounds: int = ROUNDS
) -> dict[str, Any]:
    """Two coordinators at once, a short queue and a long one, measured alternately."""
    small_size, large_size = sizes[0], sizes[-1]
    per_round = max(sample // rounds, 1)
    submits: dict[str, list[tuple[float, float]]] = {"small": [], "large": []}
    dispatch: dict[str, list[tuple[float, float]]] = {"small": [], "large": []}
    with (
        tempfile.TemporaryDirectory(prefix="hivewire-bench-queue-") as small_dir,
        tempfile.TemporaryDirectory(prefix="hivewire-bench-queue-") as large_dir,
    ):
        async with (
            bench_mesh(agents=1, agent_concurrency=AGENT_CONCURRENCY) as mesh,
            in_process_coordinator(Path(small_dir), mesh.certs) as small,
            in_process_coordinator(Path(large_dir), mesh.certs) as large,
        ):
            await _submit_many(small[0], small_size)
            gc.collect()
            rss_before = proc_rss(os.getpid())
            objects_before = len(gc.get_objects())
            pause_before = _full_collection()
            started = time.perf_counter()
            await _submit_many(large[0], large_size)
            fill_seconds = time.perf_counter() - started
            gc.collect()
            rss_per_task = (proc_rss(os.getpid()) - rss_before) / large_size
            objects_per_task = (len(gc.get_objects()) - objects_before) / large_size
            pause_after = _full_collection()
            for _ in range(rounds):
                submits["small"].append(await _timed_submits(small[0], per_round))
                submits["large"].append(await _timed_submits(large[0], per_round))
            depth = {"small": small[0].queue_depth(), "large": large[0].queue_depth()}
            # Dispatch: short queue, long queue, short queue again (brackets the long one).
            for name, (coordinator, registry) in (("small", small), ("large", large)):
                dispatch[name].append(
                    await _timed_dispatch(coordinator, registry, mesh, sample // 2)
                )
            dispatch["small"].append(await _timed_dispatch(*small, mesh, sample // 2))
    return {
        "sizes": [small_size, large_size],
        "depth": depth,
        "fill_rate": large_size / fill_seconds,
        "rss_per_task": rss_per_task,
        "gc_objects_per_task": objects_per_task,
        "full_collection": [pause_before, pause_after],
        "submits": submits,
        "dispatch": dispatch,
        "sample": sample,
    }


def _spread(pairs: Sequence[tuple[float, float]], index: int) -> str:
    values = sorted(v[index] for v in pairs)
    mid = statistics.median(values)
    return (
        fmt_time(mid)
        if len(values) == 1
        else f"{fmt_time(mid)} ({fmt_time(values[0])}-{fmt_time(values[-1])})"
    )


def report(result: dict[str, Any]) -> str:
    """Submit and dispatch cost per task with the short and the long queue, and the ratio."""
    small, large = result["sizes"]
    submits, dispatch = result["submits"], result["dispatch"]
    rows = []
    for name, size in (("small", small), ("large", large)):
        rows.append(
            [
                f"{size:,} waiting ({result['depth'][name]:,} after the timed submits)",
                _spread(submits[name], 0),
                _spread(submits[name], 1),
                _spread(dispatch[name], 0),
                _spread(dispatch[name], 1),
            ]
        )
    submit_cpu = paired(submits["large"], submits["small"], 0)
    submit_wall = paired(submits["large"], submits["small"], 1)
    base = [statistics.fmean(v[i] for v in dispatch["small"]) for i in (0, 1)]
    rows.append(
        [
            f"{large:,} ÷ {small:,} (per round)",
            submit_cpu,
            submit_wall,
            f"{ratio(dispatch['large'][0][0], base[0]):.2f}x",
            f"{ratio(dispatch['large'][0][1], base[1]):.2f}x",
        ]
    )
    out = table(
        f"a queue of waiting tasks (two in-process coordinators, SQLite, measured alternately; "
        f"{result['sample']:,} submissions into each, {result['sample'] // 2:,} tasks out of "
        "each per dispatch phase through one agent process; CPU of the coordinators' process)",
        ["queue", "submit CPU", "submit wall", "dispatch CPU", "dispatch wall"],
        rows,
    )
    return out + (
        f"\nfill: {result['fill_rate']:,.0f} submissions/s into the long queue; "
        f"memory per queued task: {result['rss_per_task'] / 1024:.2f} KiB of RSS"
        + (
            f", {result['gc_objects_per_task']:.1f} objects the garbage collector tracks; "
            f"one full collection: {fmt_time(result['full_collection'][0])} before the long "
            f"fill, {fmt_time(result['full_collection'][1])} after it"
            if "full_collection" in result
            else ""
        )
    )


def paired(
    large: Sequence[tuple[float, float]], small: Sequence[tuple[float, float]], i: int
) -> str:
    """Per-round ratios large ÷ small of one column, median (min-max)."""
    values = sorted(ratio(a[i], b[i]) for a, b in zip(large, small, strict=True))
    mid = statistics.median(values)
    return f"{mid:.2f}x" if len(values) == 1 else f"{mid:.2f}x ({values[0]:.2f}-{values[-1]:.2f})"
