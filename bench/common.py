"""Measurement helpers shared by every benchmark: closed loops, percentiles, CPU and RSS.

Standard library only (grpcio_versions runs :mod:`bench.echo`, which uses this module,
in virtual environments that hold nothing but grpcio and protobuf).

Wall-clock rates on a small shared machine are noisy, so every phase also records the
CPU time each process spent (``/proc/<pid>/stat`` for children, ``process_time`` for
this one): CPU per operation barely moves when a neighbour steals a core, and it is
what a ratio between two variants should be read from first.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import socket
import statistics
import time
from collections.abc import Awaitable, Callable, Coroutine, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
"""The repository root (children run with it as working directory and on PYTHONPATH)."""

SELF = "client"
"""Name under which this process's own CPU time is reported."""

_CLK_TCK = os.sysconf("SC_CLK_TCK")
_PAGE = os.sysconf("SC_PAGE_SIZE")


@dataclass(frozen=True)
class Durations:
    """How long each phase runs.

    Attributes:
        warmup: Seconds run first and thrown away (connections, caches, JIT-free but
            allocator and branch predictors settle).
        measure: Seconds measured.
        rounds: Times each comparison is repeated, variants interleaved; the median of
            the rounds is reported.
    """

    warmup: float = 0.5
    measure: float = 2.0
    rounds: int = 3


QUICK = Durations(warmup=0.2, measure=0.6, rounds=1)
DEFAULT = Durations(warmup=0.4, measure=1.2, rounds=5)


@dataclass(frozen=True)
class Stats:
    """Latency percentiles, in seconds."""

    count: int
    p50: float
    p95: float
    p99: float
    mean: float


def percentile(ordered: Sequence[float], q: float) -> float:
    """Nearest-rank percentile of already sorted samples (``q`` in 0..100)."""
    if not ordered:
        return math.nan
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


def summarize(samples: Sequence[float]) -> Stats:
    """Percentiles of latency samples (seconds)."""
    ordered = sorted(samples)
    return Stats(
        count=len(ordered),
        p50=percentile(ordered, 50),
        p95=percentile(ordered, 95),
        p99=percentile(ordered, 99),
        mean=statistics.fmean(ordered) if ordered else math.nan,
    )


def proc_cpu(pid: int) -> float:
    """CPU seconds (user + system, every thread) a process has used so far."""
    with open(f"/proc/{pid}/stat", encoding="ascii") as f:
        # The command name (field 2) may contain spaces: split after its ')'.
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _CLK_TCK


def proc_rss(pid: int) -> int:
    """Resident set size of a process, in bytes."""
    with open(f"/proc/{pid}/statm", encoding="ascii") as f:
        return int(f.read().split()[1]) * _PAGE


def cpu_snapshot(pids: Mapping[str, int]) -> dict[str, float]:
    """CPU seconds of this process (as :data:`SELF`) and of each named child."""
    snap = {SELF: time.process_time()}
    for name, pid in pids.items():
        snap[name] = proc_cpu(pid)
    return snap


@dataclass
class Phase:
    """One measured phase: a closed loop of one operation.

    Attributes:
        name: What was measured, e.g. ``"unary c=1"``.
        concurrency: Operations in flight at once.
        ops: Operations completed in the measured window.
        seconds: Wall-clock length of the window.
        latency: Per-operation latency percentiles (None when not recorded).
        cpu_us: CPU microseconds per operation, per process (``client`` = this one).
    """

    name: str
    concurrency: int
    ops: int
    seconds: float
    latency: Stats | None
    cpu_us: dict[str, float] = field(default_factory=dict)

    @property
    def rate(self) -> float:
        """Operations per second."""
        return self.ops / self.seconds if self.seconds > 0 else math.nan

    @property
    def cpu_total_us(self) -> float:
        """CPU microseconds per operation summed over every measured process."""
        return sum(self.cpu_us.values())

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (rate and total CPU included)."""
        data = asdict(self)
        data["rate"] = self.rate
        data["cpu_total_us"] = self.cpu_total_us
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Phase:
        """Inverse of :meth:`to_dict`."""
        latency = data.get("latency")
        return cls(
            name=data["name"],
            concurrency=data["concurrency"],
            ops=data["ops"],
            seconds=data["seconds"],
            latency=Stats(**latency) if latency else None,
            cpu_us=dict(data.get("cpu_us", {})),
        )


async def closed_loop(
    name: str,
    op: Callable[[], Awaitable[Any]],
    *,
    concurrency: int,
    durations: Durations,
    pids: Mapping[str, int] | None = None,
    record_latency: bool = True,
) -> Phase:
    """Run ``op`` back to back from ``concurrency`` workers; measure after a warm-up.

    Each worker starts a new operation as soon as its previous one finished, until the
    window closes (a closed loop: the offered load adapts to the system, so the rate is
    the system's capacity at that concurrency and latencies include no queueing from
    an open-loop overload).

    Args:
        name: Label of the phase.
        op: One operation (a call, a round trip, a task).
        concurrency: Number of workers.
        durations: Warm-up and measured seconds.
        pids: Child processes whose CPU time is attributed to the phase.
        record_latency: Keep per-operation latencies.

    Returns:
        The measured phase.
    """

    async def run(seconds: float, latencies: list[float] | None) -> int:
        end = time.perf_counter() + seconds
        done = 0

        async def worker() -> None:
            nonlocal done
            while True:
                start = time.perf_counter()
                if start >= end:
                    return
                await op()
                if latencies is not None:
                    latencies.append(time.perf_counter() - start)
                done += 1

        async with asyncio.TaskGroup() as tg:
            for _ in range(concurrency):
                tg.create_task(worker())
        return done

    if durations.warmup > 0:
        await run(durations.warmup, None)
    latencies: list[float] | None = [] if record_latency else None
    before = cpu_snapshot(pids or {})
    started = time.perf_counter()
    ops = await run(durations.measure, latencies)
    seconds = time.perf_counter() - started
    after = cpu_snapshot(pids or {})
    cpu_us = {k: (after[k] - before[k]) / ops * 1e6 if ops else math.nan for k in after}
    return Phase(
        name=name,
        concurrency=concurrency,
        ops=ops,
        seconds=seconds,
        latency=summarize(latencies) if latencies is not None else None,
        cpu_us=cpu_us,
    )


def median_phase(phases: Sequence[Phase]) -> Phase:
    """Combine rounds of one phase: medians of rate, percentiles and CPU per op."""
    if len(phases) == 1:
        return phases[0]
    first = phases[0]
    rate = statistics.median(p.rate for p in phases)
    latency: Stats | None = None
    stats = [p.latency for p in phases if p.latency is not None]
    if stats:
        latency = Stats(
            count=sum(s.count for s in stats),
            p50=statistics.median(s.p50 for s in stats),
            p95=statistics.median(s.p95 for s in stats),
            p99=statistics.median(s.p99 for s in stats),
            mean=statistics.median(s.mean for s in stats),
        )
    keys = first.cpu_us.keys()
    cpu = {k: statistics.median(p.cpu_us.get(k, math.nan) for p in phases) for k in keys}
    seconds = sum(p.seconds for p in phases)
    # ops is rebuilt from the median rate so rate stays consistent with it.
    return Phase(
        name=first.name,
        concurrency=first.concurrency,
        ops=round(rate * seconds),
        seconds=seconds,
        latency=latency,
        cpu_us=cpu,
    )


@dataclass(frozen=True)
class Spread:
    """A ratio measured once per round: its median and its range."""

    median: float
    low: float
    high: float


def paired_ratios(
    numerators: Sequence[Phase],
    denominators: Sequence[Phase],
    metric: Callable[[Phase], float],
) -> Spread:
    """``metric(a) / metric(b)`` for each round's pair, summarized.

    Both sides of a pair ran back to back, so each per-round ratio saw the same
    machine; the median of those is steadier than the ratio of two medians.
    """
    values = sorted(
        ratio(metric(a), metric(b)) for a, b in zip(numerators, denominators, strict=True)
    )
    values = [v for v in values if not math.isnan(v)] or [math.nan]
    return Spread(statistics.median(values), values[0], values[-1])


def p50(phase: Phase) -> float:
    """The phase's median latency (NaN when not recorded)."""
    return phase.latency.p50 if phase.latency else math.nan


def p99(phase: Phase) -> float:
    """The phase's 99th percentile latency (NaN when not recorded)."""
    return phase.latency.p99 if phase.latency else math.nan


def cpu_total(phase: Phase) -> float:
    """CPU µs per operation, every process."""
    return phase.cpu_total_us


def inverse_rate(phase: Phase) -> float:
    """Seconds per operation (so that a ratio > 1 means slower, like the others)."""
    return 1 / phase.rate if phase.rate else math.nan


def cpu_of(process: str) -> Callable[[Phase], float]:
    """A metric: CPU µs per operation of one process."""
    return lambda phase: phase.cpu_us.get(process, math.nan)


def env_pairs(pairs: Sequence[str]) -> dict[str, str]:
    """``KEY=VALUE`` words of a command line as an environment."""
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise SystemExit(f"not KEY=VALUE: {pair}")
        out[key] = value
    return out


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago (for servers that need a fixed port)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        port: int = s.getsockname()[1]
        return port


# --- formatting -------------------------------------------------------------------------


def add_code_option(parser: argparse.ArgumentParser) -> None:
    """``--pythonpath``: run the services on other code (an older version, installed apart)."""
    parser.add_argument("--pythonpath", default="", help="other code first on PYTHONPATH")


def run_instrumented(
    parser: argparse.ArgumentParser,
    run: Callable[[argparse.Namespace], Coroutine[Any, Any, str]],
    argv: Sequence[str] | None,
) -> int:
    """The command line of an instrumented run (``--pythonpath`` added): print its report."""
    add_code_option(parser)
    args = parser.parse_args(argv)
    print(asyncio.run(run(args)))
    return 0


def instrumented_pythonpath(site: Path, other: str) -> str:
    """PYTHONPATH of an instrumented service: its ``sitecustomize`` folder, ``other``, this code."""
    return ":".join(part for part in (str(site), other, str(ROOT)) if part)


def wait_until(done: Callable[[], bool], what: str, within: float = 30.0) -> None:
    """Poll ``done`` until it is true (a file a service writes on a signal, say).

    Raises:
        RuntimeError: Still not done after ``within`` seconds; ``what`` names it.
    """
    deadline = time.monotonic() + within
    while not done():
        if time.monotonic() > deadline:
            raise RuntimeError(f"no {what} after {within}s")
        time.sleep(0.05)


def fmt_time(seconds: float | None) -> str:
    """Seconds as µs below 1 ms, else ms."""
    if seconds is None or math.isnan(seconds):
        return "-"
    if seconds < 1e-3:
        return f"{seconds * 1e6:.0f} µs"
    if seconds < 1.0:
        return f"{seconds * 1e3:.2f} ms"
    return f"{seconds:.2f} s"


def fmt_rate(rate: float, unit: str = "/s") -> str:
    """An operations-per-second figure."""
    if math.isnan(rate):
        return "-"
    return f"{rate:,.0f}{unit}"


def fmt_ratio(value: float) -> str:
    """A ratio such as ``1.23x``."""
    if math.isnan(value) or math.isinf(value):
        return "-"
    return f"{value:.2f}x"


def fmt_spread(spread: Spread) -> str:
    """``1.23x (1.10-1.40)``: median of the per-round ratios and their range."""
    if math.isnan(spread.median):
        return "-"
    if spread.low == spread.high:
        return fmt_ratio(spread.median)
    return f"{spread.median:.2f}x ({spread.low:.2f}-{spread.high:.2f})"


def ratio(a: float, b: float) -> float:
    """``a / b``, NaN when ``b`` is zero or either side is unknown."""
    if b == 0 or math.isnan(a) or math.isnan(b):
        return math.nan
    return a / b


def table(title: str, headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A plain-text table (also valid Markdown) for the terminal and for docs."""
    widths = [len(h) for h in headers]
    for row in rows:
        for i, cell in enumerate(row):
            widths[i] = max(widths[i], len(cell))

    def line(cells: Sequence[str]) -> str:
        padded = [c.ljust(widths[i]) if i == 0 else c.rjust(widths[i]) for i, c in enumerate(cells)]
        return "| " + " | ".join(padded) + " |"

    sep = (
        "|"
        + "|".join("-" * (w + 2) if i == 0 else "-" * (w + 1) + ":" for i, w in enumerate(widths))
        + "|"
    )
    return "\n".join([f"\n{title}\n", line(headers), sep, *(line(r) for r in rows)])


def phase_row(phase: Phase, *, procs: Sequence[str] = ()) -> list[str]:
    """Rate, p50/p95/p99 and CPU per op of a phase, as table cells."""
    lat = phase.latency
    cells = [
        phase.name,
        fmt_rate(phase.rate),
        fmt_time(lat.p50 if lat else None),
        fmt_time(lat.p95 if lat else None),
        fmt_time(lat.p99 if lat else None),
    ]
    cells.extend(f"{phase.cpu_us.get(p, math.nan):.0f}" for p in procs)
    cells.append(f"{phase.cpu_total_us:.0f}")
    return cells


PHASE_HEADERS = ["phase", "rate", "p50", "p95", "p99"]
