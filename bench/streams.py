"""Concurrent streams: N open ``WatchTask`` streams on one coordinator.

A few tasks are kept running (the benchmark agent's ``hold`` capability); N watchers
are spread over them and over several client connections (``STREAMS_PER_CONNECTION``
each, as many clients would). Measured:

* memory per stream: the coordinator's RSS with every stream open (each has received
  its first message, so it is live on the server) minus its RSS before, divided by N;
  the same for this client process;
* how fast streams open (streams/s) and the coordinator's CPU per opened stream;
* fan-out: the tasks are cancelled and the time until every watcher has received the
  final event and its stream has ended.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from typing import TYPE_CHECKING, Any

import grpc

from bench.common import fmt_rate, fmt_time, proc_cpu, proc_rss, table
from bench.meshrun import bench_mesh, coordinator_stub
from hivewire.common.v1 import common_pb2
from hivewire.coordinator.v1 import coordinator_pb2

if TYPE_CHECKING:
    from bench.meshrun import CoordinatorStub

HELD_TASKS = 8
STREAMS_PER_CONNECTION = 100
OPEN_BATCH = 100
"""Streams opened at once (one batch is awaited before the next starts)."""


def hold_spec() -> coordinator_pb2.TaskSpec:
    """A task that runs until cancelled."""
    spec = coordinator_pb2.TaskSpec(
        capability="hold",
        input=common_pb2.Payload(text="hold"),
        metadata=common_pb2.RequestMetadata(source="hivewire-bench"),
    )
    spec.timeout.FromSeconds(600)
    return spec


async def _open(stub: CoordinatorStub, task_id: str) -> grpc.aio.UnaryStreamCall[Any, Any]:
    call = stub.WatchTask(
        coordinator_pb2.WatchTaskRequest(task_id=task_id, include_snapshot=True),
        timeout=600,
    )
    first = await call.read()
    if first is grpc.aio.EOF:
        raise RuntimeError(f"watch of {task_id} ended at once")
    return call


async def _drain(call: grpc.aio.UnaryStreamCall[Any, Any]) -> None:
    while await call.read() is not grpc.aio.EOF:
        pass


async def _drain_counted(call: grpc.aio.UnaryStreamCall[Any, Any]) -> bool:
    """Read a stream to its end; False when it ended with an error instead."""
    try:
        await _drain(call)
    except grpc.aio.AioRpcError:
        return False
    return True


async def measure(*, streams: int) -> dict[str, Any]:
    """Open ``streams`` WatchTask streams, measure memory, then the fan-out of the end.

    Returns:
        The numbers (bytes, seconds, counts).
    """
    async with bench_mesh(agents=1) as mesh:
        coordinator = mesh.coordinator.pid
        connections = max(1, -(-streams // STREAMS_PER_CONNECTION))
        channels = [
            mesh.channel(**{"grpc.use_local_subchannel_pool": 1, "hivewire.bench.connection": i})
            for i in range(connections)
        ]
        try:
            stubs = [coordinator_stub(c) for c in channels]
            submitted = [
                await stubs[0].SubmitTask(coordinator_pb2.SubmitTaskRequest(spec=hold_spec()))
                for _ in range(HELD_TASKS)
            ]
            task_ids = [s.task.task_id for s in submitted]
            # Connect every channel (TLS handshakes are not part of a stream's cost).
            await asyncio.gather(*(c.channel_ready() for c in channels))
            for stub in stubs:
                await _drain_one(stub, task_ids[0])
            rss_before = proc_rss(coordinator)
            client_before = proc_rss(os.getpid())
            cpu_before = proc_cpu(coordinator)
            started = time.perf_counter()
            calls: list[grpc.aio.UnaryStreamCall[Any, Any]] = []
            for first in range(0, streams, OPEN_BATCH):
                batch = range(first, min(first + OPEN_BATCH, streams))
                calls.extend(
                    await asyncio.gather(
                        *(
                            _open(stubs[i // STREAMS_PER_CONNECTION], task_ids[i % HELD_TASKS])
                            for i in batch
                        )
                    )
                )
            open_seconds = time.perf_counter() - started
            open_cpu = proc_cpu(coordinator) - cpu_before
            rss_open = proc_rss(coordinator)
            client_open = proc_rss(os.getpid())

            started = time.perf_counter()
            cpu_before = proc_cpu(coordinator)
            await asyncio.gather(
                *(
                    stubs[0].CancelTask(coordinator_pb2.CancelTaskRequest(task_id=t))
                    for t in task_ids
                )
            )
            # A client process holding this many streams may answer the server's
            # keepalive pings late on a busy machine: such a stream is counted, not fatal.
            ended = await asyncio.gather(*(_drain_counted(c) for c in calls))
            fanout_seconds = time.perf_counter() - started
            fanout_cpu = proc_cpu(coordinator) - cpu_before
            rss_after = proc_rss(coordinator)
        finally:
            for channel in channels:
                await channel.close()
    return {
        "streams": streams,
        "connections": connections,
        "held_tasks": HELD_TASKS,
        "rss_before": rss_before,
        "rss_open": rss_open,
        "rss_after": rss_after,
        "client_rss_before": client_before,
        "client_rss_open": client_open,
        "open_seconds": open_seconds,
        "open_cpu": open_cpu,
        "fanout_seconds": fanout_seconds,
        "fanout_cpu": fanout_cpu,
        "failed": ended.count(False),
    }


async def _drain_one(stub: CoordinatorStub, task_id: str) -> None:
    """Open and close one watch per connection first (warms both ends' code paths)."""
    call = await _open(stub, task_id)
    call.cancel()
    with contextlib.suppress(asyncio.CancelledError, grpc.aio.AioRpcError):
        await _drain(call)


def report(result: dict[str, Any]) -> str:
    """The streams table."""
    n = result["streams"]
    kib = 1024
    mib = kib * kib
    rows = [
        ["streams open (over connections)", f"{n:,} ({result['connections']})"],
        [
            "coordinator RSS before / with streams",
            f"{result['rss_before'] / mib:.1f} MiB / {result['rss_open'] / mib:.1f} MiB",
        ],
        [
            "coordinator memory per stream",
            f"{(result['rss_open'] - result['rss_before']) / n / kib:.1f} KiB",
        ],
        [
            "client memory per stream",
            f"{(result['client_rss_open'] - result['client_rss_before']) / n / kib:.1f} KiB",
        ],
        ["streams opened per second", fmt_rate(n / result["open_seconds"])],
        ["coordinator CPU per opened stream", f"{result['open_cpu'] / n * 1e6:.0f} µs"],
        [
            f"fan-out: cancel {result['held_tasks']} tasks -> all {n:,} streams ended",
            fmt_time(result["fanout_seconds"]),
        ],
        ["streams that ended with an error instead", f"{result.get('failed', 0):,}"],
        ["coordinator CPU per stream ended", f"{result['fanout_cpu'] / n * 1e6:.0f} µs"],
        [
            "coordinator RSS after the streams ended",
            f"{result['rss_after'] / mib:.1f} MiB",
        ],
    ]
    return table(
        f"concurrent streams: {n:,} WatchTask streams on one coordinator",
        ["measure", "value"],
        rows,
    )
