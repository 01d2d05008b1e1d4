"""The standard server chain's CPU per call, this code against other code, in one run.

A grpc.aio server with hivewire's standard interceptors (``server_interceptors()``) and
the SDK tracer provider as every service installs it without an OTLP endpoint, and a
plain client in the same process; a unary call and a five-message server stream, 16
at a time. What is measured is the process's CPU per call (client and server: the
client is the same in both), so the difference between two code trees is what their
server chains cost. Each round runs both trees in fresh processes, the order turned
every round; ratios are other ÷ this per round, median (min-max).

    python bench/server_chain.py --pythonpath /path/to/other/tree   # e.g. main's
    python bench/server_chain.py --rounds 6 --calls 8000

Plain TCP on 127.0.0.1 (no TLS): the chain's own work, not the handshake or the
crypto, which are the same for both.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import time
from typing import Any

CONCURRENCY = 16
STREAMED = 5


async def _measure(calls: int) -> dict[str, float]:
    import grpc

    from hivewire.services.runtime import tracing
    from hivewire.services.runtime.interceptors import server_interceptors

    tracing.setup_tracing("bench", otlp_endpoint=None)

    async def unary(request: bytes, context: Any) -> bytes:
        return b"x"

    async def stream(request: bytes, context: Any) -> Any:
        for _ in range(STREAMED):
            yield b"y"

    def same(data: bytes) -> bytes:
        return data

    handler = grpc.method_handlers_generic_handler(
        "bench.Chain",
        {
            "Unary": grpc.unary_unary_rpc_method_handler(unary, same, same),
            "Stream": grpc.unary_stream_rpc_method_handler(stream, same, same),
        },
    )
    server = grpc.aio.server(interceptors=server_interceptors())
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    call_unary = channel.unary_unary("/bench.Chain/Unary")
    call_stream = channel.unary_stream("/bench.Chain/Stream")

    async def one_unary() -> None:
        await call_unary(b"")

    async def one_stream() -> None:
        async for _ in call_stream(b""):
            pass

    results: dict[str, float] = {}
    try:
        for name, one in (("unary", one_unary), ("stream", one_stream)):
            for _ in range(calls // 10 // CONCURRENCY):  # warm-up
                await asyncio.gather(*(one() for _ in range(CONCURRENCY)))
            start = time.process_time()
            for _ in range(calls // CONCURRENCY):
                await asyncio.gather(*(one() for _ in range(CONCURRENCY)))
            results[name] = (time.process_time() - start) / calls * 1e6
    finally:
        await channel.close()
        await server.stop(None)
    return results


def _child(pythonpath: str, calls: int) -> dict[str, float]:
    env = dict(os.environ)
    if pythonpath:
        env["PYTHONPATH"] = os.pathsep.join(p for p in (pythonpath, env.get("PYTHONPATH")) if p)
    out = subprocess.run(
        [sys.executable, __file__, "--child", "--calls", str(calls)],
        env=env,
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    parsed: dict[str, float] = json.loads(out.strip().splitlines()[-1])
    return parsed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--pythonpath", default="", help="the other code, first on PYTHONPATH")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--calls", type=int, default=4000, help="calls per phase")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(asyncio.run(_measure(args.calls))))
        return 0
    ratios: dict[str, list[float]] = {"unary": [], "stream": []}
    for round_ in range(args.rounds):
        sides = [("this", ""), ("other", args.pythonpath)]
        if round_ % 2:
            sides.reverse()
        measured = {side: _child(path, args.calls) for side, path in sides}
        print(
            f"round {round_ + 1}: "
            + "; ".join(
                f"{side} " + ", ".join(f"{k} {v:.0f} µs" for k, v in measured[side].items())
                for side in ("this", "other")
            )
        )
        for phase in ratios:
            ratios[phase].append(measured["other"][phase] / measured["this"][phase])
    for phase, values in ratios.items():
        print(
            f"{phase}: other ÷ this CPU per call {statistics.median(values):.2f}x "
            f"({min(values):.2f}-{max(values):.2f})"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
