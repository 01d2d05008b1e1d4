"""Token relay: partial outputs streamed agent -> coordinator -> client over one task.

The benchmark agent's ``tokens`` capability sends N partial chunks (tokens), each
holding the ``time.monotonic_ns()`` it was sent at (CLOCK_MONOTONIC: one clock for
every process on the machine) and a space. Chunks that pile up behind a busy writer
travel as one partial event (coalesced on the way: docs/performance.md), so the
client counts both. It follows the task with ``StreamTask`` and takes:

* **tokens per second** (the target is read on this) and **events per second**: what
  reached the client over one task's stream, the agent sending as fast as the stream
  takes them, from the first token's sending to the last token's arrival;
* **CPU per token**: the coordinator's and the agent's CPU over the rate phase
  (steadier than the rate on a shared machine);
* **yielding**: the rate again with the handler giving the event loop a turn after
  each token, as a handler relaying a model's stream does (it awaits each token):
  fewer tokens pile up, so fewer travel together;
* **token -> client latency**: when a token reached the client minus when the agent
  sent it, at c=1 with the agent pacing tokens (``GAP_MS`` apart, like a model
  streaming), p50 and p99.

Every partial event is a journal event (stored in SQLite, fanned out to watchers).
Each round also runs the bare chain's unary call at c=1 (:mod:`bench.chain`), so the
latency is also given as a ratio to one bare 2-hop call.

Before/after in one run: ``python bench/tokens.py --variant before PYTHONPATH=...
--variant after`` runs one mesh per variant (each with its own environment, e.g. an
export of the older code first on ``PYTHONPATH``) and alternates their phases round
by round.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from google.protobuf.wrappers_pb2 import BytesValue

from bench.chain import relay_chain
from bench.common import (
    Durations,
    closed_loop,
    env_pairs,
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
"""Tokens of the rate phase (sent back to back)."""
PACED = 200
"""Tokens of the latency phase."""
GAP_MS = 5
"""Pause between paced tokens (a fast model: 200 tokens/s)."""


def tokens_spec(
    count: int, gap_ms: float = 0, *, yielding: bool = False
) -> coordinator_pb2.TaskSpec:
    """A ``tokens`` task: ``count`` tokens, ``gap_ms`` apart (or a loop turn apart)."""
    spec = coordinator_pb2.TaskSpec(
        capability="tokens",
        input=common_pb2.Payload(text=f"{count}:{gap_ms}" + (":yield" if yielding else "")),
        metadata=common_pb2.RequestMetadata(source="hivewire-bench"),
    )
    spec.timeout.FromSeconds(120)
    return spec


async def stream_tokens(
    stub: CoordinatorStub, count: int, gap_ms: float = 0, *, yielding: bool = False
) -> dict[str, Any]:
    """Run one ``tokens`` task.

    Returns:
        ``tokens_per_s``, ``events_per_s`` (at the client, from the first token's
        sending to the last token's arrival), ``events`` and ``latencies`` (one per
        token, seconds).
    """
    latencies: list[float] = []
    events = 0
    first_sent = last = 0
    finished = None
    call = stub.StreamTask(
        coordinator_pb2.StreamTaskRequest(spec=tokens_spec(count, gap_ms, yielding=yielding))
    )
    async for response in call:
        event = response.event
        kind = event.WhichOneof("kind")
        if kind == "partial":
            now = time.monotonic_ns()
            stamps = [int(s) for s in event.partial.content.text.split()]
            latencies.extend((now - stamp) / 1e9 for stamp in stamps)
            events += 1
            last = now
            first_sent = first_sent or stamps[0]
        elif kind == "finished":
            finished = event.finished
    if finished is None or finished.state != common_pb2.TASK_STATE_SUCCEEDED:
        raise RuntimeError(f"tokens task ended {finished}")
    if len(latencies) != count:
        raise RuntimeError(f"{len(latencies)} of {count} tokens arrived")
    window = (last - first_sent) / 1e9
    return {
        "tokens_per_s": count / window if window > 0 else float("nan"),
        "events_per_s": events / window if window > 0 else float("nan"),
        "events": events,
        "latencies": latencies,
    }


async def measure(
    *, durations: Durations, variants: dict[str, dict[str, str]] | None = None
) -> dict[str, Any]:
    """Rate and latency rounds of each variant (a mesh each), phases alternated.

    Args:
        durations: Rounds (and the chain phase's length).
        variants: Name -> extra environment of every service of that variant's mesh;
            default one variant, ``""``, with none.
    """
    variants = variants or {"": {}}
    flood = FLOOD if durations.rounds > 1 else FLOOD // 5
    results: dict[str, dict[str, Any]] = {
        name: {
            "tokens_per_s": [],
            "events_per_s": [],
            "tokens_per_event": [],
            "yielding_tokens_per_s": [],
            "yielding_tokens_per_event": [],
            "latency": [],
            "chain": [],
            "cpu_per_token": {"coordinator": [], "agent": []},
        }
        for name in variants
    }
    async with contextlib.AsyncExitStack() as stack:
        meshes = {}
        for name, env in variants.items():
            mesh = await stack.enter_async_context(bench_mesh(agents=1, service_env=env))
            channel = mesh.channel()
            stack.push_async_callback(channel.close)
            stub = coordinator_stub(channel)
            await stream_tokens(stub, 10)
            pids = {"coordinator": mesh.coordinator.pid, "agent": mesh.agents[0].pid}
            meshes[name] = (stub, pids)
        chain = await stack.enter_async_context(relay_chain(mesh.certs))
        chain_channel = open_channel(chain.target, mesh.certs)
        stack.push_async_callback(chain_channel.close)
        call = chain_channel.unary_unary(
            UNARY,
            request_serializer=BytesValue.SerializeToString,
            response_deserializer=BytesValue.FromString,
        )
        await call(PAYLOAD, timeout=30, wait_for_ready=True)

        async def chain_op() -> None:
            await call(PAYLOAD)

        for _ in range(durations.rounds):
            for name, (stub, pids) in meshes.items():
                out = results[name]
                cpu = {proc: proc_cpu(pid) for proc, pid in pids.items()}
                rate = await stream_tokens(stub, flood)
                for proc, pid in pids.items():
                    out["cpu_per_token"][proc].append((proc_cpu(pid) - cpu[proc]) / flood)
                out["tokens_per_s"].append(rate["tokens_per_s"])
                out["events_per_s"].append(rate["events_per_s"])
                out["tokens_per_event"].append(flood / rate["events"])
                relay = await stream_tokens(stub, flood, yielding=True)
                out["yielding_tokens_per_s"].append(relay["tokens_per_s"])
                out["yielding_tokens_per_event"].append(flood / relay["events"])
                paced = await stream_tokens(stub, PACED, GAP_MS)
                out["latency"].append(summarize(paced["latencies"]))
                out["chain"].append(
                    await closed_loop(
                        "chain c=1",
                        chain_op,
                        concurrency=1,
                        durations=durations,
                        pids=chain.pids,
                    )  # fmt: skip
                )
    return {"flood_tokens": flood, "paced_tokens": PACED, "gap_ms": GAP_MS, "variants": results}


def _spread(values: Sequence[float], fmt: str = "{:,.0f}") -> str:
    """``median (min-max)``."""
    if not values:
        return "-"
    return (
        f"{fmt.format(statistics.median(values))} "
        f"({fmt.format(min(values))}-{fmt.format(max(values))})"
    )


def report(result: dict[str, Any]) -> str:
    """Per variant and round: tokens/s, events/s, CPU per token, latency p50/p99."""
    rows = []
    summary = []
    for name, out in result["variants"].items():
        cpu = out["cpu_per_token"]
        yielding = out.get("yielding_tokens_per_s") or [float("nan")] * len(out["tokens_per_s"])
        yielding_per_event = out.get("yielding_tokens_per_event") or [float("nan")] * len(
            out["tokens_per_s"]
        )
        for i, (tokens_rate, events_rate, per_event, y_rate, y_per_event, lat, chain) in enumerate(
            zip(
                out["tokens_per_s"],
                out["events_per_s"],
                out["tokens_per_event"],
                yielding,
                yielding_per_event,
                out["latency"],
                out["chain"],
                strict=True,
            ),
            start=1,
        ):
            rows.append(
                [
                    f"{name} round {i}".strip(),
                    fmt_rate(tokens_rate, " tokens/s"),
                    fmt_rate(events_rate, " events/s"),
                    f"{per_event:.1f}",
                    *(f"{cpu[proc][i - 1] * 1e6:.0f} µs" for proc in ("coordinator", "agent")),
                    fmt_rate(y_rate, " tokens/s"),
                    f"{y_per_event:.1f}",
                    fmt_time(lat.p50),
                    fmt_time(lat.p99),
                    fmt_time(p50(chain)),
                    f"{lat.p50 / p50(chain):.2f}x",
                ]
            )
        summary.append(
            [
                name or "all rounds",
                _spread(out["tokens_per_s"]),
                _spread(out["events_per_s"]),
                _spread(out["tokens_per_event"], "{:.1f}"),
                _spread([c * 1e6 for c in cpu["coordinator"]]),
                _spread([c * 1e6 for c in cpu["agent"]]),
                _spread(yielding),
                _spread(yielding_per_event, "{:.1f}"),
                _spread([lat.p50 * 1e3 for lat in out["latency"]], "{:.2f}") + " ms",
                _spread([lat.p99 * 1e3 for lat in out["latency"]], "{:.1f}") + " ms",
            ]
        )
    headers = [
        "round",
        "tokens/s",
        "events/s",
        "tokens/event",
        "coordinator CPU/token",
        "agent CPU/token",
        "yielding: tokens/s",
        "tokens/event",
        "token p50",
        "token p99",
        "chain call p50",
        "p50 / chain",
    ]
    title = (
        f"token relay over one task's StreamTask: {result['flood_tokens']:,} tokens back to "
        "back (rate, CPU), the same with a loop turn after each token (yielding), "
        f"{result['paced_tokens']} tokens {result['gap_ms']} ms apart at c=1 "
        "(latency agent -> coordinator -> client, one machine clock)"
    )
    return "\n".join(
        [
            table(title, headers, rows),
            table(
                "median (min-max) over rounds; CPU in µs per token",
                [
                    "variant",
                    "tokens/s",
                    "events/s",
                    "tokens/event",
                    "coordinator CPU",
                    "agent CPU",
                    "yielding: tokens/s",
                    "tokens/event",
                    "token p50",
                    "token p99",
                ],
                summary,
            ),
        ]
    )


def _variant(words: Sequence[str]) -> tuple[str, dict[str, str]]:
    name, *pairs = words
    return name, env_pairs(pairs)


def main(argv: Sequence[str] | None = None) -> None:
    """Command line: one or more variants, alternated round by round."""
    parser = argparse.ArgumentParser(prog="bench/tokens.py", description=__doc__)
    parser.add_argument(
        "--variant",
        nargs="+",
        action="append",
        metavar="NAME [KEY=VALUE ...]",
        help="a mesh with this environment (repeat for each variant)",
    )
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=1.2, help="chain phase length")
    args = parser.parse_args(argv)
    variants = dict(_variant(v) for v in args.variant or [["after"]])
    durations = Durations(warmup=0.4, measure=args.seconds, rounds=args.rounds)
    result = asyncio.run(measure(durations=durations, variants=variants))
    print(report(result))


if __name__ == "__main__":
    main()
