"""Soak: a real mesh under steady load for minutes, watching memory, descriptors and tasks.

One coordinator, one benchmark agent, the model service (deterministic backend) and
the tool service, each its own process, with nats-server for the registry and the
events. A closed loop of ``--concurrency`` clients runs ``StreamTask`` to
``finished`` for ``--minutes`` minutes; by default each task is the agent's ``soak``
capability, which makes one model call and one tool call, so every service does
per-task work.

Every few seconds it samples, per process, the resident set size (``/proc/<pid>/statm``)
and the open file descriptors (``/proc/<pid>/fd``), against the number of tasks done
so far. It prints:

* per process: RSS at the end of the warm-up and at the end, the least-squares slope
  of RSS against tasks done after the warm-up (KiB per 1,000 tasks: what each task
  leaves behind), open descriptors and unfinished asyncio tasks (the services'
  ``hivewire_asyncio_tasks`` gauge) at start and end;
* per minute: tasks, rate, p50 and p99 latency, errors;
* the coordinator's in-memory task structures at the end (``hivewire_coordinator_memory_*``)
  and the size of its SQLite files.

``--json`` keeps every sample; ``--plot`` draws RSS against tasks (matplotlib, in the
``bench`` extra). ``--heap-profile`` runs every service under :mod:`tracemalloc`, takes
a snapshot of each at the end of the warm-up and at the end (``SIGUSR2``, see
``services/runtime/heapdump.py``) and prints the allocation sites that grew.

Run it with ``make soak`` (10 minutes) or ``make soak-quick`` (2).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import signal
import sys
import tempfile
import time
import tracemalloc
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import fmt_rate, fmt_time, percentile, proc_rss, table
from bench.meshrun import BenchMesh, bench_mesh, coordinator_stub
from hivewire.common.v1 import common_pb2
from hivewire.coordinator.v1 import coordinator_pb2
from hivewire.services.coordinator.settings import CoordinatorSettings
from hivewire.services.runtime.heapdump import HEAP_DUMP_DIR_ENV

SAMPLE_SECONDS = 5.0
WARMUP_SECONDS = 60.0
CACHE_SIZE_ENV = "HIVEWIRE_COORDINATOR__FINISHED_CACHE_SIZE"
GAUGE_PREFIXES = ("hivewire_asyncio_tasks", "hivewire_coordinator_memory_")
"""Metrics read from each service at start and end."""


@dataclass
class Sample:
    """One look at every process.

    Attributes:
        t: Seconds since the load started.
        tasks: Tasks finished so far.
        rss: Resident set size per process, bytes.
        fds: Open file descriptors per process.
        db: Bytes of the coordinator's SQLite files (database and WAL).
        c_heap: Bytes the C heap holds allocated per service (``hivewire_c_heap_bytes``).
    """

    t: float
    tasks: int
    rss: dict[str, int]
    fds: dict[str, int]
    db: int = 0
    c_heap: dict[str, int] = field(default_factory=dict)


@dataclass
class SoakResult:
    """Everything a soak measured."""

    minutes: float
    warmup: float
    concurrency: int
    capability: str
    tasks: int = 0
    errors: int = 0
    samples: list[Sample] = field(default_factory=list)
    minute_rows: list[dict[str, float]] = field(default_factory=list)
    gauges_start: dict[str, dict[str, float]] = field(default_factory=dict)
    gauges_end: dict[str, dict[str, float]] = field(default_factory=dict)
    gauges_settled: dict[str, dict[str, float]] = field(default_factory=dict)
    db_bytes: dict[str, int] = field(default_factory=dict)
    heap_growth: dict[str, list[dict[str, Any]]] = field(default_factory=dict)


def open_fds(pid: int) -> int:
    """Open file descriptors of a process."""
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return -1


def slope_per_1000(points: Sequence[tuple[float, float]]) -> float:
    """Least-squares slope of ``y`` against ``x``, times 1,000 (NaN below two points)."""
    if len(points) < 2:
        return math.nan
    n = len(points)
    mx = sum(x for x, _ in points) / n
    my = sum(y for _, y in points) / n
    sxx = sum((x - mx) ** 2 for x, _ in points)
    if sxx == 0:
        return math.nan
    sxy = sum((x - mx) * (y - my) for x, y in points)
    return sxy / sxx * 1000


def scrape(port: int, prefixes: tuple[str, ...] = GAUGE_PREFIXES) -> dict[str, float]:
    """The series of one Prometheus endpoint whose names start with ``prefixes``."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    values: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith(prefixes):
            name, _, value = line.rpartition(" ")
            values[name] = float(value)
    return values


C_HEAP_IN_USE = 'hivewire_c_heap_bytes{kind="in_use"}'


async def c_heap_all(ports: Mapping[str, int]) -> dict[str, int]:
    """Bytes of C heap in use per service (none where it is not reported)."""
    out: dict[str, int] = {}
    for name, port in ports.items():
        with contextlib.suppress(OSError):
            value = (await asyncio.to_thread(scrape, port, (C_HEAP_IN_USE,))).get(C_HEAP_IN_USE)
            if value is not None:
                out[name] = int(value)
    return out


async def scrape_all(ports: Mapping[str, int]) -> dict[str, dict[str, float]]:
    """:func:`scrape` of every service."""
    out: dict[str, dict[str, float]] = {}
    for name, port in ports.items():
        try:
            out[name] = await asyncio.to_thread(scrape, port)
        except OSError as exc:
            print(f"  (metrics of {name} unreadable: {exc})", file=sys.stderr)
    return out


def soak_spec(capability: str) -> coordinator_pb2.TaskSpec:
    """A task for the benchmark agent."""
    spec = coordinator_pb2.TaskSpec(
        capability=capability,
        input=common_pb2.Payload(text="ping"),
        metadata=common_pb2.RequestMetadata(source="hivewire-soak"),
    )
    spec.timeout.FromSeconds(60)
    return spec


def _db_sizes(mesh: BenchMesh) -> dict[str, int]:
    sizes = {}
    for suffix in ("", "-wal"):
        path = mesh.state / f"coordinator.db{suffix}"
        sizes[path.name] = path.stat().st_size if path.exists() else 0
    return sizes


async def soak(
    *,
    minutes: float,
    warmup: float,
    concurrency: int,
    capability: str,
    coordinator_env: Mapping[str, str] | None = None,
    extra_env: Mapping[str, str] | None = None,
    heap_profile: bool = False,
) -> SoakResult:
    """Run the mesh under load and sample it (see the module docstring)."""
    result = SoakResult(
        minutes=minutes, warmup=warmup, concurrency=concurrency, capability=capability
    )
    heap_dir = Path(tempfile.mkdtemp(prefix="hivewire-heap-")) if heap_profile else None
    service_env = dict(extra_env or {})
    if heap_dir:
        service_env.update(PYTHONTRACEMALLOC=str(HEAP_FRAMES), **{HEAP_DUMP_DIR_ENV: str(heap_dir)})
    heap_marks: list[int] = []
    cache_size = int(
        (coordinator_env or {}).get(
            CACHE_SIZE_ENV, CoordinatorSettings.model_fields["finished_cache_size"].default
        )
    )
    async with bench_mesh(
        agents=1,
        agent_concurrency=max(64, concurrency),
        model_and_tool=True,
        metrics=True,
        coordinator_env=dict(coordinator_env or {}),
        service_env=service_env,
        ready_timeout=300.0 if heap_profile else 60.0,
    ) as mesh:
        pids = {k: v for k, v in mesh.pids.items() if k != "nats"}
        pids["nats"] = mesh.nats.pid
        channel = mesh.channel()
        stub = coordinator_stub(channel)
        spec = soak_spec(capability)
        latencies: list[list[float]] = []
        errors: list[int] = []
        done = 0
        cache_full = asyncio.Event()
        if cache_size <= 0:
            cache_full.set()
        start = time.monotonic()
        end = start + minutes * 60

        async def worker() -> None:
            nonlocal done
            while (began := time.monotonic()) < end:
                minute = int((began - start) // 60)
                while len(latencies) <= minute:
                    latencies.append([])
                    errors.append(0)
                ok = False
                try:
                    state = 0
                    async for response in stub.StreamTask(
                        coordinator_pb2.StreamTaskRequest(spec=spec)
                    ):
                        if response.event.WhichOneof("kind") == "finished":
                            state = response.event.finished.state
                    ok = state == common_pb2.TASK_STATE_SUCCEEDED
                except Exception as exc:
                    if errors[minute] < 3:
                        print(f"  task failed: {exc!r:.200}", file=sys.stderr)
                if ok:
                    latencies[minute].append(time.monotonic() - began)
                    done += 1
                    if done >= cache_size:
                        cache_full.set()
                else:
                    errors[minute] += 1

        async def sampler() -> None:
            while True:
                result.samples.append(
                    Sample(
                        t=time.monotonic() - start,
                        tasks=done,
                        rss={k: proc_rss(p) for k, p in pids.items()},
                        fds={k: open_fds(p) for k, p in pids.items()},
                        db=sum(_db_sizes(mesh).values()),
                        c_heap=await c_heap_all(mesh.metrics_ports),
                    )
                )
                if time.monotonic() >= end:
                    return
                await asyncio.sleep(SAMPLE_SECONDS)

        services = {k: v for k, v in pids.items() if k != "nats"}

        async def gauges_after_warmup() -> None:
            await asyncio.sleep(min(warmup, minutes * 60))
            # The coordinator's finished-task cache fills with its first tasks (a bound by
            # design, about 10 KiB a task): the warm-up lasts until it is full too.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(cache_full.wait(), max(end - time.monotonic(), 0))
            result.warmup = time.monotonic() - start
            result.gauges_start = await scrape_all(mesh.metrics_ports)
            if heap_dir:
                heap_marks.append(done)
                signal_all(services)

        try:
            async with asyncio.TaskGroup() as tg:
                tg.create_task(sampler())
                tg.create_task(gauges_after_warmup())
                for _ in range(concurrency):
                    tg.create_task(worker())
            result.gauges_end = await scrape_all(mesh.metrics_ports)
            result.gauges_settled = await settled_gauges(mesh.metrics_ports)
            result.db_bytes = _db_sizes(mesh)
            if heap_dir and heap_marks:
                heap_marks.append(done)
                signal_all(services)
                result.heap_growth = await heap_growth(
                    heap_dir, services, tasks=heap_marks[1] - heap_marks[0]
                )
        finally:
            await channel.close()
        result.tasks = done
        result.errors = sum(errors)
        for minute, lat in enumerate(latencies):
            ordered = sorted(lat)
            seconds = min(60.0, minutes * 60 - minute * 60)
            result.minute_rows.append(
                {
                    "minute": minute + 1,
                    "tasks": len(ordered),
                    "rate": len(ordered) / seconds if seconds > 0 else math.nan,
                    "p50": percentile(ordered, 50),
                    "p99": percentile(ordered, 99),
                    "errors": errors[minute],
                }
            )
    return result


SETTLE_SECONDS = 30.0
"""How long the end of a run waits for the services' work in flight to wind down."""


async def settled_gauges(ports: Mapping[str, int]) -> dict[str, dict[str, float]]:
    """The gauges once the last tasks' work has wound down, or after ``SETTLE_SECONDS``.

    Right after the load stops the services still hold the last tasks' calls (an
    ``Execute`` waiting for its status, events on their way to NATS): asyncio tasks
    counted then are in flight, not kept. Settled means two scrapes a second apart
    that agree on every service's asyncio task count.
    """
    deadline = time.monotonic() + SETTLE_SECONDS
    previous = await scrape_all(ports)
    while True:
        await asyncio.sleep(1.0)
        current = await scrape_all(ports)
        same = all(
            current.get(name, {}).get("hivewire_asyncio_tasks")
            == previous.get(name, {}).get("hivewire_asyncio_tasks")
            for name in current
        )
        if same or time.monotonic() >= deadline:
            return current
        previous = current


HEAP_FRAMES = 12
"""Frames tracemalloc keeps per allocation with ``--heap-profile``."""
HEAP_TOP = 8


def signal_all(pids: Mapping[str, int]) -> None:
    """Ask every service for a heap snapshot (``SIGUSR2``, see ``runtime/heapdump.py``)."""
    for pid in pids.values():
        os.kill(pid, signal.SIGUSR2)


def _site(traceback: tracemalloc.Traceback) -> str:
    """The innermost frames of an allocation, the project's own first."""
    frames = list(reversed(traceback))  # innermost (the allocation) first
    ours = [f for f in frames if "/hivewire/" in f.filename or "/bench/" in f.filename]
    chosen = frames[:2] + [f for f in ours[:1] if f not in frames[:2]]
    return " <- ".join(f"{Path(f.filename).name}:{f.lineno}" for f in chosen)


async def heap_growth(
    directory: Path, pids: Mapping[str, int], *, tasks: int
) -> dict[str, list[dict[str, Any]]]:
    """Compare each service's two snapshots: the allocation sites that grew most."""
    deadline = time.monotonic() + 300
    growth: dict[str, list[dict[str, Any]]] = {}
    for name, pid in pids.items():
        first, second = directory / f"{pid}-1.snapshot", directory / f"{pid}-2.snapshot"
        for _ in range(600):  # each dump appears at once (written, then renamed)
            if second.exists() or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.5)
        if not first.exists() or not second.exists():
            print(f"  (no heap snapshots from {name})", file=sys.stderr)
            continue
        before = await asyncio.to_thread(tracemalloc.Snapshot.load, str(first))
        after = await asyncio.to_thread(tracemalloc.Snapshot.load, str(second))
        stats = await asyncio.to_thread(after.compare_to, before, "traceback")
        total = sum(s.size_diff for s in stats)
        rows = [
            {
                "site": "total (every site)",
                "kib": total / 1024,
                "per_1000": total / 1024 / tasks * 1000 if tasks else math.nan,
                "blocks": sum(s.count_diff for s in stats),
            }
        ]
        for stat in stats[:HEAP_TOP]:
            rows.append(
                {
                    "site": _site(stat.traceback),
                    "kib": stat.size_diff / 1024,
                    "per_1000": stat.size_diff / 1024 / tasks * 1000 if tasks else math.nan,
                    "blocks": stat.count_diff,
                }
            )
        growth[name] = rows
    return growth


def minute_floors(samples: Sequence[Sample], name: str) -> list[tuple[float, float]]:
    """(tasks, KiB) at each minute's lowest RSS: the level under the garbage collector's saw.

    Reference cycles are freed only by full collections, so RSS climbs and drops in a
    saw tooth; a leak lifts the bottoms of the teeth, which this follows.
    """
    by_minute: dict[int, Sample] = {}
    for s in samples:
        minute = int(s.t // 60)
        if minute not in by_minute or s.rss[name] < by_minute[minute].rss[name]:
            by_minute[minute] = s
    return [(s.tasks, s.rss[name] / 1024) for _, s in sorted(by_minute.items())]


def process_rows(result: SoakResult) -> list[list[str]]:
    """Per process: RSS at warm-up end and at the end, slope, fds, asyncio tasks."""
    samples = result.samples
    after = [s for s in samples if s.t >= result.warmup] or samples[-1:]
    first, last = after[0], samples[-1]
    rows = []
    for name in last.rss:
        points = [(s.tasks, s.rss[name] / 1024) for s in after]
        start_rss, end_rss = first.rss[name], last.rss[name]
        growth = (end_rss - start_rss) / start_rss * 100 if start_rss else math.nan
        start_tasks = result.gauges_start.get(name, {}).get("hivewire_asyncio_tasks")
        end_tasks = result.gauges_end.get(name, {}).get("hivewire_asyncio_tasks")
        settled_tasks = result.gauges_settled.get(name, {}).get("hivewire_asyncio_tasks")
        # The second half of the run alone: what is left once slow fills (caches,
        # retention reaching its steady state) are behind.
        half = [p for s, p in zip(after, points, strict=True) if s.t >= (first.t + last.t) / 2]
        floors = minute_floors(after, name)
        heap = [(s.tasks, s.c_heap[name] / 1024) for s in after if name in s.c_heap]
        rows.append(
            [
                name,
                f"{start_rss / 2**20:.1f} MB",
                f"{end_rss / 2**20:.1f} MB",
                f"{growth:+.1f} %",
                f"{slope_per_1000(points):+.1f}",
                f"{slope_per_1000(half):+.1f}" if len(half) > 1 else "-",
                f"{slope_per_1000(floors):+.1f}",
                f"{slope_per_1000(heap):+.1f}" if len(heap) > 1 else "-",
                f"{first.fds[name]} → {last.fds[name]}",
                "-"
                if start_tasks is None
                else f"{start_tasks:.0f} → {end_tasks or 0:.0f}"
                + ("" if settled_tasks is None else f" → {settled_tasks:.0f}"),
            ]
        )
    return rows


def report(result: SoakResult) -> str:
    """The soak's tables (Markdown)."""
    samples = result.samples
    total_s = samples[-1].t if samples else 0.0
    out = [
        f"soak: {result.minutes:g} min, concurrency {result.concurrency}, capability "
        f"{result.capability!r}; {result.tasks:,} tasks ({fmt_rate(result.tasks / total_s)} "
        f"mean), {result.errors} errors; warm-up {result.warmup:.0f} s",
        table(
            "per process (start = end of the warm-up; slope = least squares of RSS "
            "against tasks done after the warm-up; 2nd half = the same over the second "
            "half of the run; floor = the same over each minute's lowest RSS; C heap = the "
            "same of the C heap in use, hivewire_c_heap_bytes; asyncio tasks at the end of "
            "the warm-up, at the end of the load, and once the last tasks wound down)",
            [
                "process",
                "RSS start",
                "RSS end",
                "growth",
                "KiB / 1,000 tasks",
                "2nd half KiB / 1,000",
                "floor KiB / 1,000",
                "C heap KiB / 1,000",
                "open fds",
                "asyncio tasks",
            ],
            process_rows(result),
        ),
        table(
            "per minute",
            ["minute", "tasks", "rate", "p50", "p99", "errors"],
            [
                [
                    str(int(r["minute"])),
                    f"{int(r['tasks']):,}",
                    fmt_rate(r["rate"]),
                    fmt_time(r["p50"]),
                    fmt_time(r["p99"]),
                    str(int(r["errors"])),
                ]
                for r in result.minute_rows
            ],
        ),
    ]
    with_db = [s for s in samples if s.db]
    if with_db:
        marks = [with_db[len(with_db) * i // 4] for i in range(4)] + [with_db[-1]]
        out.append(
            table(
                "coordinator SQLite files (database + WAL) during the run",
                ["minute", "tasks done", "size"],
                [[f"{s.t / 60:.1f}", f"{s.tasks:,}", f"{s.db / 2**20:.1f} MB"] for s in marks],
            )
        )
    coordinator = result.gauges_end.get("coordinator", {})
    memory = {k: v for k, v in coordinator.items() if k.startswith("hivewire_coordinator_memory")}
    if memory:
        out.append(
            table(
                "coordinator in-memory task structures at the end",
                ["structure", "entries"],
                [[k, f"{v:.0f}"] for k, v in sorted(memory.items())],
            )
        )
    for name, rows in result.heap_growth.items():
        out.append(
            table(
                f"{name}: Python heap growth between the warm-up and the end (tracemalloc)",
                ["allocation site", "KiB", "KiB / 1,000 tasks", "blocks"],
                [
                    [r["site"], f"{r['kib']:+.1f}", f"{r['per_1000']:+.2f}", f"{r['blocks']:+d}"]
                    for r in rows
                ],
            )
        )
    if result.db_bytes:
        out.append(
            table(
                "coordinator SQLite files at the end",
                ["file", "size"],
                [[k, f"{v / 2**20:.1f} MB"] for k, v in result.db_bytes.items()],
            )
        )
    return "\n".join(out)


def plot(results: Mapping[str, SoakResult], path: Path) -> None:
    """RSS against tasks done, one line per process and run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = ["coordinator", "agent-0", "model", "tool", "SQLite files"]
    fig, axes = plt.subplots(1, len(names), figsize=(3.6 * len(names), 3.6), sharex=False)
    for ax, name in zip(axes, names, strict=True):
        for label, result in results.items():
            if name == "SQLite files":
                points = [(s.tasks, s.db) for s in result.samples if s.db]
            else:
                points = [(s.tasks, s.rss[name]) for s in result.samples if name in s.rss]
            ax.plot([x / 1000 for x, _ in points], [y / 2**20 for _, y in points], label=label)
        ax.set_title(name)
        ax.set_xlabel("tasks done (thousands)")
        ax.set_ylabel("MB on disk" if name == "SQLite files" else "RSS (MB)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"plot written to {path}")


def _result_from_json(data: Mapping[str, Any]) -> SoakResult:
    samples = [Sample(**s) for s in data["samples"]]
    fields = {k: v for k, v in data.items() if k != "samples"}
    return SoakResult(**fields, samples=samples)


def main(argv: Sequence[str] | None = None) -> None:
    """Command line: run a soak, print it, optionally keep JSON and draw a plot."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=10.0, help="load duration (10)")
    parser.add_argument("--quick", action="store_true", help="2 minutes, 30 s warm-up")
    parser.add_argument(
        "--warmup",
        type=float,
        default=None,
        help="seconds (60), and until the coordinator's finished-task cache is full",
    )
    parser.add_argument("--concurrency", type=int, default=4, help="tasks in flight (4)")
    parser.add_argument(
        "--capability", default="soak", help="soak (model + tool call) or noop (agent only)"
    )
    parser.add_argument(
        "--coordinator-env",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra coordinator setting, e.g. HIVEWIRE_COORDINATOR__TASK_RETENTION=60",
    )
    parser.add_argument(
        "--service-env",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra environment of every service, e.g. MALLOC_ARENA_MAX=2",
    )
    parser.add_argument(
        "--heap-profile",
        action="store_true",
        help="trace every service with tracemalloc (slower) and print the sites that grew",
    )
    parser.add_argument("--json", type=Path, help="write every sample here")
    parser.add_argument(
        "--plot",
        type=Path,
        help="draw RSS against tasks into this PNG (with --compare: every JSON given)",
    )
    parser.add_argument(
        "--compare",
        nargs="+",
        metavar="LABEL=FILE.json",
        help="do not run: plot and print earlier --json results",
    )
    args = parser.parse_args(argv)
    if args.plot:
        try:  # before a run of many minutes, not after it
            import matplotlib  # noqa: F401
        except ImportError:
            parser.error("--plot needs matplotlib: the bench extra (make soak installs it)")
    if args.compare:
        results = {}
        for item in args.compare:
            label, _, file = item.partition("=")
            results[label] = _result_from_json(json.loads(Path(file).read_text()))
            print(f"\n## {label}\n{report(results[label])}")
        if args.plot:
            plot(results, args.plot)
        return
    minutes = 2.0 if args.quick else args.minutes
    warmup = args.warmup if args.warmup is not None else (30.0 if args.quick else WARMUP_SECONDS)
    env = dict(item.split("=", 1) for item in args.coordinator_env)
    result = asyncio.run(
        soak(
            minutes=minutes,
            warmup=warmup,
            concurrency=args.concurrency,
            capability=args.capability,
            coordinator_env=env,
            extra_env=dict(item.split("=", 1) for item in args.service_env),
            heap_profile=args.heap_profile,
        )
    )
    print(report(result))
    if args.json:
        args.json.write_text(json.dumps(asdict(result), indent=1))
        print(f"samples written to {args.json}")
    if args.plot:
        plot({"this run": result}, args.plot)


if __name__ == "__main__":
    main()
