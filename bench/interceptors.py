"""Runtime overhead: hivewire's interceptor chain against a bare server, per call.

The same echo service (:mod:`bench.echo`) is hosted three ways, in interleaved rounds:

* ``bare``: ``grpc.aio.server()`` and a plain ``grpc.aio.secure_channel`` (the baseline);
* ``server chain``: hivewire's ``ServiceServer`` (correlation + logging, metrics and
  error-mapping interceptors, health, reflection, keepalive options), bare client;
* ``full runtime``: ``ServiceServer`` and hivewire's ``secure_channel`` (correlation
  client interceptor, client metrics, default deadline) — what a mesh hop pays.

The server's CPU per call is the cleanest measure of the server chain; the client's CPU
per call of the client interceptor.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bench.common import (
    PHASE_HEADERS,
    Durations,
    Phase,
    cpu_of,
    cpu_total,
    fmt_spread,
    inverse_rate,
    median_phase,
    p50,
    paired_ratios,
    phase_row,
    table,
)
from bench.echo import echo_server, open_channel, ping_pong_phase, unary_phases

VARIANTS: dict[str, tuple[str, str]] = {
    "bare": ("bare", "bare"),
    "server chain": ("runtime", "bare"),
    "full runtime": ("runtime", "runtime"),
}
"""name -> (server variant, client variant)."""


async def _measure_variant(
    certs: Path, server_variant: str, client_variant: str, durations: Durations
) -> list[Phase]:
    async with echo_server(certs, variant=server_variant) as server:
        pids = {"server": server.pid}
        channel = open_channel(server.target, certs, variant=client_variant)
        try:
            phases = await unary_phases(channel, durations=durations, pids=pids)
            phases.append(await ping_pong_phase(channel, durations=durations, pids=pids))
        finally:
            await channel.close()
    return phases


async def measure(certs: Path, *, durations: Durations) -> dict[str, Any]:
    """Every variant, ``durations.rounds`` interleaved rounds.

    Returns:
        ``{"variants": {variant: {phase: median Phase}}, "rounds": {variant: {phase:
        [Phase per round]}}}``.
    """
    rounds: dict[str, dict[str, list[Phase]]] = {name: {} for name in VARIANTS}
    for _ in range(durations.rounds):
        for name, (server_variant, client_variant) in VARIANTS.items():
            for phase in await _measure_variant(certs, server_variant, client_variant, durations):
                rounds[name].setdefault(phase.name, []).append(phase)
    return {
        "variants": {
            name: {phase: median_phase(ph) for phase, ph in phases.items()}
            for name, phases in rounds.items()
        },
        "rounds": rounds,
    }


def report(result: dict[str, Any]) -> str:
    """Per-variant tables and the overhead ratios against ``bare``."""
    variants: dict[str, dict[str, Phase]] = result["variants"]
    rounds: dict[str, dict[str, list[Phase]]] = result["rounds"]
    headers = [*PHASE_HEADERS, "client CPU µs/op", "server CPU µs/op", "total CPU µs/op"]
    rows = []
    for name, phases in variants.items():
        for phase in phases.values():
            row = phase_row(phase, procs=("client", "server"))
            row[0] = f"{name}: {phase.name}"
            rows.append(row)
    out = [table("runtime overhead: interceptor chain vs bare grpc.aio (same mTLS)", headers, rows)]
    ratio_rows = []
    for name, per_round in rounds.items():
        if name == "bare":
            continue
        for phase_name, measured in per_round.items():
            base = rounds["bare"][phase_name]
            delta = (
                variants[name][phase_name].cpu_total_us - variants["bare"][phase_name].cpu_total_us
            )
            ratio_rows.append(
                [
                    f"{name}: {phase_name}",
                    fmt_spread(paired_ratios(measured, base, cpu_of("server"))),
                    fmt_spread(paired_ratios(measured, base, cpu_of("client"))),
                    fmt_spread(paired_ratios(measured, base, cpu_total)),
                    f"{delta:+.0f}",
                    fmt_spread(paired_ratios(measured, base, p50)),
                    fmt_spread(paired_ratios(measured, base, inverse_rate)),
                ]
            )
    out.append(
        table(
            "runtime overhead as ratios to bare, per round: median (min-max); >1 = costs more",
            [
                "variant: phase",
                "server CPU",
                "client CPU",
                "total CPU",
                "Δ CPU µs/op",
                "p50 latency",
                "1/rate",
            ],
            ratio_rows,
        )
    )
    return "\n".join(out)
