"""What the event outbox costs the coordinator per task, in its own process.

The coordinator's journal (``services/coordinator/journal.py``) on a real SQLite store
(a temporary file, group commit) appends the five events of a plain task (created,
assigned, started, the state change to succeeded, finished) for many tasks at once,
three ways:

* ``events off``: no publisher (the floor: the store alone);
* ``direct``: the journal calls ``publish()`` of a publisher after each commit, what
  every event cost before the outbox (the envelope built in ``publish()``);
* ``outbox``: envelopes built before the commit, stored with the event, read back by
  the relay, handed to ``send()``, the rows deleted once "acknowledged".

The publisher is a stand-in that builds envelopes (``direct``) or acknowledges what it
is sent at once (``outbox``), so what is measured is the coordinator's side; NATS's
side is ``bench/events.py``. CPU of this process per task, variants interleaved round
by round, median and spread of the per-round ratios.

    .venv/bin/python -m bench.outbox [--tasks 2000] [--rounds 5] [--store jetstream]

With ``--store jetstream`` the store is the JetStream one on a throwaway nats-server
(``sync_interval: always``) and nats-server's CPU is counted too.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import statistics
import tempfile
import uuid
from collections.abc import Sequence
from pathlib import Path

from bench.common import cpu_snapshot
from bench.events import nats_server
from hivewire.common.v1 import common_pb2
from hivewire.coordinator.v1 import coordinator_pb2 as C
from hivewire.events.v1 import events_pb2
from hivewire.services.coordinator.jetstream_store import JetStreamTaskStore
from hivewire.services.coordinator.journal import Journal, TaskRuntime, TaskTable
from hivewire.services.coordinator.model import TaskRecord, now_ns
from hivewire.services.coordinator.outbox import OutboxRelay
from hivewire.services.coordinator.sqlite_store import SqliteTaskStore
from hivewire.services.coordinator.store import TaskStore
from hivewire.services.runtime.events import build_traced_event
from hivewire.services.runtime.eventsink import NullSink

QUEUED, ASSIGNED, RUNNING, SUCCEEDED = 1, 2, 3, 5


class DirectSink:
    """``publish()`` builds the envelope, as ``EventPublisher.publish`` does."""

    def __init__(self) -> None:
        self.count = 0

    def publish(
        self,
        event_type: str,
        *,
        subject: str,
        data: events_pb2.TaskEventData,
        task_sequence: int = 0,
        correlation_id: str | None = None,
    ) -> None:
        build_traced_event(
            event_type,
            source="coordinator/bench",
            subject=subject,
            data=data,
            task_sequence=task_sequence,
            correlation_id=correlation_id,
        )[0].SerializeToString()
        self.count += 1


class AckingSink:
    """``send()`` acknowledges at once (and serializes what it gets, as the publisher)."""

    enabled = True
    source = "coordinator/bench"

    def __init__(self, expected: int) -> None:
        self.count = 0
        self.expected = expected
        self.all_sent = asyncio.Event()

    def send(self, events: Sequence[events_pb2.Event]) -> asyncio.Future[None]:
        for event in events:
            event.SerializeToString()
        self.count += len(events)
        if self.count >= self.expected:
            self.all_sent.set()
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        done.set_result(None)
        return done


async def run_tasks(journal: Journal, tasks: int) -> None:
    """Five events per task, all tasks at once (what a busy coordinator commits)."""
    futures = []
    for _ in range(tasks):
        record = TaskRecord(
            task_id=str(uuid.uuid4()),
            spec=C.TaskSpec(capability="echo", input=common_pb2.Payload(text="hello")),
            owner="spiffe://hivewire.local/client/bench",
            state=QUEUED,
            created_ns=now_ns(),
            updated_ns=now_ns(),
            deadline_ns=now_ns() + 60 * 10**9,
        )
        rt = TaskRuntime(record, record.spec.SerializeToString())
        steps = [
            ("task.created", QUEUED, common_pb2.TASK_STATE_UNSPECIFIED),
            ("task.assigned", ASSIGNED, QUEUED),
            ("task.started", RUNNING, ASSIGNED),
            (None, SUCCEEDED, RUNNING),
        ]
        for publish, to_state, from_state in steps:
            record.state = to_state
            journal.emit(
                rt,
                publish=publish,
                state_changed=C.StateChange(from_state=from_state, to_state=to_state),  # type: ignore[arg-type]
            )
        futures.append(
            journal.emit(
                rt,
                publish="task.completed",
                finished=C.TaskFinished(state=SUCCEEDED, output=common_pb2.Payload(text="hi")),  # type: ignore[arg-type]
            )
        )
    await asyncio.gather(*futures)


async def one_phase(variant: str, tasks: int, store: str, workdir: Path) -> float:
    """CPU seconds per task for one variant: this process and nats-server (if any).

    Each phase has a store of its own (on JetStream a nats-server of its own: the
    journal's subjects are global, and the relay would scan the other phases' events).
    """
    async with contextlib.AsyncExitStack() as stack:
        pids: dict[str, int] = {}
        opened: TaskStore
        if store == "jetstream":
            url, process = await stack.enter_async_context(nats_server("always"))
            pids["nats"] = process.pid
            opened = await stack.enter_async_context(JetStreamTaskStore(url))
        else:
            opened = await stack.enter_async_context(
                SqliteTaskStore(workdir / f"{uuid.uuid4().hex}.db")
            )
        table = TaskTable(finished_cache_size=0, on_evict=lambda rt: None)
        sink: object = NullSink()
        if variant == "direct":
            sink = DirectSink()
        elif variant == "outbox":
            sink = AckingSink(5 * tasks)
        journal = Journal(opened, table, sink)  # type: ignore[arg-type]
        before = cpu_snapshot(pids)
        if isinstance(sink, AckingSink):
            async with OutboxRelay(opened, sink):
                await run_tasks(journal, tasks)
                # Until the relay has handed out every envelope (5 per task).
                await sink.all_sent.wait()
                await opened.flush()
        else:
            await run_tasks(journal, tasks)
        after = cpu_snapshot(pids)
        return sum(after[k] - before[k] for k in after) / tasks


VARIANTS = {"events off": "off", "direct": "direct", "outbox": "outbox"}


async def measure(
    *, tasks: int = 2000, rounds: int = 5, store: str = "sqlite"
) -> dict[str, list[float]]:
    """CPU seconds per task of each variant, one value per round (interleaved)."""
    results: dict[str, list[float]] = {v: [] for v in VARIANTS}
    with tempfile.TemporaryDirectory(prefix="hivewire-bench-outbox-") as tmp:
        await one_phase("outbox", max(tasks // 4, 1), store, Path(tmp))  # warm-up
        for _ in range(rounds):
            for variant, key in VARIANTS.items():
                results[variant].append(await one_phase(key, tasks, store, Path(tmp)))
    return results


def report(results: dict[str, list[float]], tasks: int, store: str = "sqlite") -> str:
    """The table of :func:`measure`'s results."""
    rounds = len(results["direct"])
    where = "SQLite" if store == "sqlite" else "JetStream (sync_interval: always)"
    cpu = "this process" if store == "sqlite" else "this process + nats-server"
    lines = [
        f"\noutbox: the coordinator's journal, {tasks} tasks x 5 events, {where}, "
        f"{rounds} round(s) (CPU of {cpu} per task)\n",
        "| variant    | CPU µs/task (median) | vs direct, per round: median (min-max) |",
        "|------------|---------------------:|----------------------------------------|",
    ]
    for variant in VARIANTS:
        ratios = [a / b for a, b in zip(results[variant], results["direct"], strict=True)]
        lines.append(
            f"| {variant:<10} | {statistics.median(results[variant]) * 1e6:>20,.0f} | "
            f"{statistics.median(ratios):.2f}x ({min(ratios):.2f}-{max(ratios):.2f}) |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--store", choices=("sqlite", "jetstream"), default="sqlite")
    args = parser.parse_args()
    result = asyncio.run(measure(tasks=args.tasks, rounds=args.rounds, store=args.store))
    print(report(result, args.tasks, args.store))
