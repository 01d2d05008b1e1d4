"""One no-op task's path at c=1, hop by hop: wall time, CPU, commits, loop turns.

Starts the benchmark mesh (``bench/meshrun.py``) with ``bench/hops_site`` first on the
services' ``PYTHONPATH``: its ``sitecustomize`` wraps a few functions of the coordinator
and the agent (the handler's yields, journal emits and commit callbacks, the SQLite
store's transactions, link reads and writes, the agent's frames and sends, a call's
entry into the server's outermost interceptor) and records a monotonic timestamp and
the thread's CPU time at each, and the start of every event-loop turn. Runs
``--tasks`` ``StreamTask`` no-op tasks one after the other from a plain grpc.aio client
(as ``bench/chain.py``'s: no hivewire interceptor, no correlation id sent unless
``--correlation-id``), stamping the client's send, each event read and the call's end,
then prints, per hop, the median wall time (p25-p75) and the CPU of the thread that
ran it (when one thread did), and counts per task: store transactions, link messages
each way, the coordinator's loop turns.

    python bench/hops.py --tasks 300
    python bench/hops.py --tasks 300 --pythonpath /tmp/older-code   # another version
    python bench/hops.py --tasks 300 --correlation-id   # the client sends its own id

The instrumentation costs time itself (a tuple per point, a wrapper per yield): read
the hops against each other, and the whole task against ``bench/ab.py``'s c=1 p50.
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import collections
import os
import signal
import statistics
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import instrumented_pythonpath, run_instrumented, wait_until
from bench.echo import open_channel
from bench.mesh import noop_spec
from bench.meshrun import bench_mesh, coordinator_stub
from hivewire.coordinator.v1 import coordinator_pb2

CID = (("x-correlation-id", "bench-hops"),) if os.environ.get("HOPS_CID") else None
SITE = Path(__file__).resolve().parent / "hops_site"

# (hop, from point, to point); points are labels of bench/hops_site (``emit2``: the
# journal's emit of event 2; ``client_event5``: the client reads event 5...).
HOPS = (
    ("client send -> StreamTask handler", "client_send", "handler"),
    ("client send -> outermost interceptor", "client_send", "outer"),
    ("outermost interceptor -> handler", "outer", "handler"),
    ("submit: validation and record -> QUEUED emitted", "handler", "emit1"),
    ("QUEUED emitted -> ASSIGNED emitted", "emit1", "emit2"),
    ("QUEUED queued -> the store thread starts its transaction", "emit1", "tx_start1"),
    ("transaction of QUEUED (store thread)", "tx_start1", "tx_end1"),
    ("commit -> journal callback on the loop", "tx_end1", "committed1"),
    ("callback -> snapshot handed to grpc", "committed1", "yield1"),
    ("snapshot handed to grpc -> client reads it", "yield1", "client_event1"),
    ("ASSIGNED emitted -> link write starts", "emit2", "link_write_assign"),
    ("link write -> agent reads the frame", "link_write_assign", "agent_frame_assign"),
    ("agent: frame -> started handed to grpc", "agent_frame_assign", "agent_send_started"),
    ("agent: started -> result handed to grpc", "agent_send_started", "agent_send_result"),
    ("agent's started -> coordinator reads it", "agent_send_started", "link_read_started"),
    ("agent's result -> coordinator reads it", "agent_send_result", "link_read_result"),
    ("link read -> attempt applies the result", "link_read_result", "applied_result"),
    ("result applied -> SUCCEEDED and finished emitted", "applied_result", "emit5"),
    ("finished queued -> its transaction starts", "emit5", "tx_start5"),
    ("transaction of the last events (store thread)", "tx_start5", "tx_end5"),
    ("commit -> journal callback on the loop", "tx_end5", "committed5"),
    ("callback -> event 4 handed to grpc", "committed5", "yield4"),
    ("event 4 handed to grpc -> written (its completion)", "yield4", "written4"),
    ("finished handed to grpc -> client reads it", "yield5", "client_event5"),
    ("client reads finished -> the call ends (status)", "client_event5", "client_end"),
    ("whole task, at the client", "client_send", "client_end"),
)

Point = tuple[int, int | None, str | None]  # ns, thread CPU ns, thread


def _read(path: Path) -> list[list[str]]:
    return [line.rstrip("\n").split("\t") for line in path.read_text().splitlines()]


def _split(field: str) -> list[tuple[str, str]]:
    return [tuple(x.rsplit(":", 1)) for x in field.split(",") if ":" in x]  # type: ignore[misc]


def analyze(directory: Path, client: list[tuple[int, str, str, str]], skip: int) -> str:
    """The hop table and the counts per task of one run's records."""
    tasks: dict[str, dict[str, Point]] = collections.OrderedDict()

    def put(task: str, name: str, ns: int, cpu: int | None = None, th: str | None = None) -> None:
        tasks.setdefault(task, {}).setdefault(name, (ns, cpu, th))

    for ns, label, task, detail in client:
        put(task, f"{label}{detail}", ns)
    coordinator = next(directory.glob("coordinator-*.tsv"))
    agent = next(directory.glob("agent-*.tsv"))
    counts: collections.Counter[str] = collections.Counter()
    pending_outer: Point | None = None
    for path in (coordinator, agent):
        for ns_s, cpu_s, th, label, task, detail in _read(path):
            ns, cpu = int(ns_s), int(cpu_s)
            counts[label] += 1
            if label == "outer":
                # A call entering the server's first interceptor: the next handler's
                # (tasks run one after the other), if it is a StreamTask.
                if detail.endswith("/StreamTask"):
                    pending_outer = (ns, cpu, th)
                continue
            if label == "handler" and pending_outer is not None:
                put(task, "outer", *pending_outer)
                pending_outer = None
            if label in ("handler", "applied"):
                put(task, label if label == "handler" else f"applied_{detail}", ns, cpu, th)
            elif label in ("emit", "committed", "yield", "written"):
                put(task, f"{label}{detail.split(':')[0]}", ns, cpu, th)
            elif label in ("tx_start", "tx_end"):
                for task_id, seq in _split(detail):
                    put(task_id, f"{label}{seq}", ns, cpu, th)
            elif label == "agent_frame":
                put(task, f"agent_frame_{detail}", ns, cpu, th)
            else:
                for task_id, kind in _split(detail):
                    put(task_id, f"{label}_{kind}", ns, cpu, th)
    rows = [d for d in list(tasks.values())[skip:] if "client_send" in d and "client_end" in d]
    turns_file = coordinator.with_suffix(".turns")
    turns = sorted(memoryview(turns_file.read_bytes()).cast("q").tolist())
    out = [
        f"{len(rows)} tasks at c=1 (the first {skip} left out); median (p25-p75) µs; CPU: "
        "of the thread that ran the hop, when one thread ran it",
        "",
        "| hop | wall µs | CPU µs |",
        "|---|--:|--:|",
    ]
    for name, start, end in HOPS:
        wall = sorted((d[end][0] - d[start][0]) / 1000 for d in rows if start in d and end in d)
        cpu = [
            (d[end][1] - d[start][1]) / 1000  # type: ignore[operator]
            for d in rows
            if start in d and end in d and d[start][2] is not None and d[start][2] == d[end][2]
        ]
        if not wall:
            out.append(f"| {name} | - | - |")
            continue
        spread = f"({wall[len(wall) // 4]:,.0f}-{wall[len(wall) * 3 // 4]:,.0f})"
        cpu_text = f"{statistics.median(cpu):,.0f}" if cpu else "-"
        out.append(f"| {name} | {statistics.median(wall):,.0f} {spread} | {cpu_text} |")
    per_task = sum(1 for _, label, _, _ in client if label == "client_send")
    loop_turns = [
        bisect.bisect_left(turns, d["client_end"][0])
        - bisect.bisect_left(turns, d["client_send"][0])
        for d in rows
    ]
    out += [
        "",
        f"per task ({per_task} tasks): store transactions {counts['tx_start'] / per_task:.2f}, "
        f"link messages to the agent {counts['link_write'] / per_task:.2f} and back "
        f"{counts['link_read'] / per_task:.2f}, events to the client "
        f"{counts['yield'] / per_task:.2f}, coordinator loop turns from the client's send "
        f"to the call's end {statistics.median(loop_turns):.0f} (median)",
    ]
    return "\n".join(out)


async def run(args: argparse.Namespace) -> str:
    """Run the tasks through an instrumented mesh; the table."""
    with tempfile.TemporaryDirectory(prefix="hivewire-hops-") as tmp:
        directory = Path(tmp)
        env = {"PYTHONPATH": instrumented_pythonpath(SITE, args.pythonpath), "BENCH_HOPS_DIR": tmp}
        client: list[tuple[int, str, str, str]] = []
        async with bench_mesh(agents=1, service_env=env) as mesh:
            channel = open_channel(mesh.address, mesh.certs)
            stub = coordinator_stub(channel)
            metadata = (("x-correlation-id", "bench-hops"),) if args.correlation_id else None
            try:
                for _ in range(args.tasks):
                    sent = time.monotonic_ns()
                    task_id = ""
                    call = stub.StreamTask(
                        coordinator_pb2.StreamTaskRequest(spec=noop_spec()), metadata=metadata
                    )
                    async for response in call:
                        event = response.event
                        task_id = event.task_id
                        client.append(
                            (time.monotonic_ns(), "client_event", task_id, str(event.sequence))
                        )
                    client.append((time.monotonic_ns(), "client_end", task_id, ""))
                    client.append((sent, "client_send", task_id, ""))
            finally:
                await channel.close()
            for name in ("coordinator", "agent-0"):
                os.kill(mesh.pids[name], signal.SIGUSR1)
            await asyncio.to_thread(
                wait_until, partial(_dumped, directory), f"records in {directory}"
            )
        return analyze(directory, client, args.skip)


def _dumped(directory: Path) -> bool:
    """Whether both services have written their records (``.turns`` is written last)."""
    return all(list(directory.glob(f"{n}-*.turns")) for n in ("coordinator", "agent"))


def main(argv: list[str] | None = None) -> int:
    """Command line: ``python bench/hops.py --tasks 300``."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", type=int, default=300, help="tasks, one after the other")
    parser.add_argument("--skip", type=int, default=30, help="first tasks left out (warm-up)")
    parser.add_argument(
        "--correlation-id",
        action="store_true",
        help="the client sends an x-correlation-id (as hivewire's own clients do)",
    )
    return run_instrumented(parser, run, argv)


if __name__ == "__main__":
    sys.exit(main())
