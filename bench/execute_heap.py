"""One agent alone under Execute calls: its RSS and C heap against calls done.

Starts the benchmark agent as its own process (no registry, no events, a metrics port)
and calls ``AgentService.Execute`` on it directly with the coordinator's certificate,
``--concurrency`` at a time, each call the way the coordinator makes it: the
assignment, read to the result, half-close, wait for the status. Every second it
samples the agent's RSS and its C heap in use (``hivewire_c_heap_bytes``), and prints
the least-squares slope of each against calls done after ``--warmup`` calls (bytes
per call and KiB per 1,000 calls).

Without the coordinator, the model or the tool service in the way, a few KiB per 1,000
calls are measurable in a minute or two; this is how the agent's native leak of the
soak was found (docs/performance.md, Soak).

    .venv/bin/python bench/execute_heap.py --calls 20000
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import grpc

from bench.common import ROOT, free_port, proc_rss
from bench.soak import C_HEAP_IN_USE, scrape, slope_per_1000
from hivewire.agent.v1 import agent_pb2, agent_pb2_grpc
from hivewire.common.v1 import common_pb2
from hivewire.services.mesh.launcher import Launcher, ProcessSpec, python_module
from hivewire.services.runtime.channels import secure_channel
from hivewire.services.runtime.pki import init_pki
from hivewire.services.runtime.tls import TlsFiles


async def execute_once(stub: agent_pb2_grpc.AgentServiceStub, n: int, capability: str) -> None:
    """One Execute call, ended like the coordinator ends it."""
    call = stub.Execute(timeout=120)
    assignment = agent_pb2.TaskAssignment(
        task_id=f"heap-{n}", attempt=1, capability=capability, input=common_pb2.Payload(text="x")
    )
    await call.write(agent_pb2.ExecuteRequest(assign=assignment))
    while (message := await call.read()) is not grpc.aio.EOF:
        if message.WhichOneof("kind") in ("result", "error"):
            await call.done_writing()
    await call.code()


async def run(calls: int, warmup: int, concurrency: int, capability: str) -> dict[str, float]:
    """Drive the agent and return the slopes after the warm-up."""
    with tempfile.TemporaryDirectory(prefix="hivewire-execute-heap-") as tmp:
        state = Path(tmp)
        init_pki(state / "certs")
        ports_file = state / "agent.json"
        metrics_port = free_port()
        spec = ProcessSpec(
            name="agent",
            argv=python_module("hivewire.services.agent", "bench.agent:BenchAgent"),
            env={
                "PYTHONPATH": str(ROOT),
                "HIVEWIRE_HOST": "127.0.0.1",
                "HIVEWIRE_PORT": "0",
                "HIVEWIRE_CERTS_DIR": str(state / "certs"),
                "HIVEWIRE_IDENTITY": "agent",
                "HIVEWIRE_LOG_LEVEL": "WARNING",
                "HIVEWIRE_METRICS_PORT": str(metrics_port),
                "HIVEWIRE_EVENTS__ENABLED": "false",
                "HIVEWIRE_AGENT__REGISTRATION": "false",
                "HIVEWIRE_AGENT__MODEL_ADDRESS": "127.0.0.1:9",
                "HIVEWIRE_AGENT__TOOL_ADDRESS": "127.0.0.1:9",
                "HIVEWIRE_AGENT__MAX_CONCURRENCY": str(max(64, concurrency)),
                "HIVEWIRE_PORTS_FILE": str(ports_file),
            },
            ports_file=ports_file,
            log_file=state / "agent.log",
            ready_timeout=120.0,
        )
        async with Launcher(grace_period=5.0) as launcher:
            agent = await launcher.start(spec)
            channel = secure_channel(
                f"127.0.0.1:{agent.ports['grpc']}",
                TlsFiles.for_identity(state / "certs", "coordinator"),
            )
            stub = agent_pb2_grpc.AgentServiceStub(channel)
            numbers = iter(range(calls))
            done = 0
            samples: list[tuple[int, int, int]] = []

            async def worker() -> None:
                nonlocal done
                for n in numbers:
                    await execute_once(stub, n, capability)
                    done += 1

            async def sampler() -> None:
                while done < calls:
                    heap = await asyncio.to_thread(scrape, metrics_port, (C_HEAP_IN_USE,))
                    samples.append((done, proc_rss(agent.pid), int(heap[C_HEAP_IN_USE])))
                    await asyncio.sleep(1.0)

            began = time.monotonic()
            sampling = asyncio.create_task(sampler())
            await asyncio.gather(*(worker() for _ in range(concurrency)))
            elapsed = time.monotonic() - began
            await sampling
            await channel.close()
    after = [s for s in samples if s[0] >= warmup]
    rss = slope_per_1000([(n, r / 1024) for n, r, _ in after])
    heap = slope_per_1000([(n, h / 1024) for n, _, h in after])
    return {
        "calls": calls,
        "rate": calls / elapsed,
        "samples": len(after),
        "rss_kib_per_1000": rss,
        "c_heap_kib_per_1000": heap,
        "c_heap_bytes_per_call": heap * 1024 / 1000,
    }


def main() -> None:
    """Command line."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=20_000, help="Execute calls (20,000)")
    parser.add_argument("--warmup", type=int, default=4_000, help="calls before the slope")
    parser.add_argument("--concurrency", type=int, default=4, help="calls in flight (4)")
    parser.add_argument("--capability", default="noop", help="the agent's capability (noop)")
    args = parser.parse_args()
    if args.warmup >= args.calls:
        parser.error("--warmup must be below --calls")
    result = asyncio.run(run(args.calls, args.warmup, args.concurrency, args.capability))
    print(json.dumps({k: round(v, 1) for k, v in result.items()}, indent=1))


if __name__ == "__main__":
    main()
