"""Token relay: partial outputs streamed agent -> coordinator -> client over one task.

The benchmark agent's ``tokens`` capability sends N partial chunks, each holding the
``time.monotonic_ns()`` it was sent at (CLOCK_MONOTONIC: one clock for every process
on the machine). The client follows the task with ``StreamTask`` and takes:

* **relay rate**: partial events received per second over one task's stream, the agent
  sending as fast as the stream takes them (first to last chunk at the client);
* **CPU per event**: the coordinator's and the agent's CPU over the rate phase, per
  chunk (steadier than the rate on a shared machine);
* **token -> client latency**: when a chunk reached the client minus when the agent
  sent it, at c=1 with the agent pacing chunks (``GAP_MS`` apart, like a model
  streaming tokens), p50 and p99.

Every chunk is a journal event (stored in SQLite, fanned out to watchers), as a model
token relayed by an agent is. Each round also runs the bare chain's unary call at c=1
(:mod:`bench.chain`), so the latency is also given as a ratio to one bare 2-hop call.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from google.protobuf.wrappers_pb2 import BytesValue

from bench.chain import relay_chain
from bench.common import (
    Durations,
    Phase,
    Stats,
    closed_loop,
    fmt_rate,
    fmt_time,
    p50,
    proc_cpu,
    summarize,
    table,
)
from bench.echo import PAYLOAD, UNARY, open_channel
from bench.meshrun import bench_mesh, coordinator_stub
from hivewire.common.v1 import common_pb2
from hivewire.coordinator.v1 import coordinator_pb2

if TYPE_CHECKING:
    from bench.meshrun import CoordinatorStub

FLOOD = 5000
"""Chunks of the rate phase (sent back to back)."""
PACED = 200
"""Chunks of the latency phase."""
GAP_MS = 5
"""Pause between paced chunks (a fast model: 200 tokens/s)."""


def tokens_spec(count: int, gap_ms: float = 0) -> coordinator_pb2.TaskSpec:
    """A ``tokens`` task: ``count`` chunks, ``gap_ms`` apart."""
    spec = coordinator_pb2.TaskSpec(
        capability="tokens",
        input=common_pb2.Payload(text=f"{count}:{gap_ms}"),
        metadata=common_pb2.RequestMetadata(source="hivewire-bench"),
    )
    spec.timeout.FromSeconds(120)
    return spec


async def stream_tokens(
    stub: CoordinatorStub, count: int, gap_ms: float = 0
) -> tuple[float, list[float]]:
    """Run one ``tokens`` task; return (chunks per second at the client, latencies in s)."""
    latencies: list[float] = []
    first = last = 0.0
    finished = None
    call = stub.StreamTask(coordinator_pb2.StreamTaskRequest(spec=tokens_spec(count, gap_ms)))
    async for response in call:
        event = response.event
        kind = event.WhichOneof("kind")
        if kind == "partial":
            now = time.monotonic_ns()
            latencies.append((now - int(event.partial.content.text)) / 1e9)
            last = now / 1e9
            first = first or last
        elif kind == "finished":
            finished = event.finished
    if finished is None or finished.state != common_pb2.TASK_STATE_SUCCEEDED:
        raise RuntimeError(f"tokens task ended {finished}")
    if len(latencies) != count:
        raise RuntimeError(f"{len(latencies)} of {count} chunks arrived")
    rate = (count - 1) / (last - first) if last > first else float("nan")
    return rate, latencies


async def measure(*, durations: Durations) -> dict[str, Any]:
    """Rate and latency rounds, each next to the bare chain's unary c=1."""
    flood = FLOOD if durations.rounds > 1 else FLOOD // 5
    rates: list[float] = []
    latency_rounds: list[Stats] = []
    chain_rounds: list[Phase] = []
    cpu_per_event: dict[str, list[float]] = {"coordinator": [], "agent": []}
    async with bench_mesh(agents=1) as mesh, relay_chain(mesh.certs) as chain:
        channel = mesh.channel()
        chain_channel = open_channel(chain.target, mesh.certs)
        try:
            stub = coordinator_stub(channel)
            await stream_tokens(stub, 10)
            call = chain_channel.unary_unary(
                UNARY,
                request_serializer=BytesValue.SerializeToString,
                response_deserializer=BytesValue.FromString,
            )
            await call(PAYLOAD, timeout=30, wait_for_ready=True)

            async def chain_op() -> None:
                await call(PAYLOAD)

            pids = {"coordinator": mesh.coordinator.pid, "agent": mesh.agents[0].pid}
            for _ in range(durations.rounds):
                cpu = {name: proc_cpu(pid) for name, pid in pids.items()}
                rate, _ = await stream_tokens(stub, flood)
                rates.append(rate)
                for name, pid in pids.items():
                    cpu_per_event[name].append((proc_cpu(pid) - cpu[name]) / flood)
                _, latencies = await stream_tokens(stub, PACED, GAP_MS)
                latency_rounds.append(summarize(latencies))
                chain_rounds.append(
                    await closed_loop(
                        "chain c=1",
                        chain_op,
                        concurrency=1,
                        durations=durations,
                        pids=chain.pids,
                    )  # fmt: skip
                )
        finally:
            await chain_channel.close()
            await channel.close()
    return {
        "flood_chunks": flood,
        "paced_chunks": PACED,
        "gap_ms": GAP_MS,
        "rates": rates,
        "latency": latency_rounds,
        "chain": chain_rounds,
        "cpu_per_event": cpu_per_event,
    }


def report(result: dict[str, Any]) -> str:
    """Per round: relay rate, token latency p50/p99, and p50 ÷ one bare chain call."""
    rows = []
    cpu = result.get("cpu_per_event") or {"coordinator": [], "agent": []}
    for i, (rate, lat, chain) in enumerate(
        zip(result["rates"], result["latency"], result["chain"], strict=True), start=1
    ):
        rows.append(
            [
                f"round {i}",
                fmt_rate(rate, " events/s"),
                *(
                    f"{cpu[name][i - 1] * 1e6:.0f} µs" if len(cpu[name]) >= i else "-"
                    for name in ("coordinator", "agent")
                ),
                fmt_time(lat.p50),
                fmt_time(lat.p99),
                fmt_time(p50(chain)),
                f"{lat.p50 / p50(chain):.2f}x",
            ]
        )
    return table(
        f"token relay over one task's StreamTask: {result['flood_chunks']:,} chunks back to "
        f"back (rate), {result['paced_chunks']} chunks {result['gap_ms']} ms apart at c=1 "
        "(latency agent -> coordinator -> client, one machine clock)",
        [
            "round",
            "relay rate",
            "coordinator CPU/event",
            "agent CPU/event",
            "token p50",
            "token p99",
            "chain call p50",
            "p50 / chain",
        ],
        rows,
    )
