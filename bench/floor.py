"""The floor: what a no-op task's messages cost in grpc.aio before hivewire does anything.

A hivewire no-op task is measured against the bare 2-hop chain (``bench/chain.py``).
This benchmark adds a third side to that comparison: a *floor* coordinator and agent,
bare grpc.aio servers (each a process, the mesh's certificates, no interceptors) that
speak hivewire's contracts with nothing else in them. For each task the floor's
client gets what hivewire's client gets from ``StreamTask`` (a snapshot, ``ASSIGNED``,
``RUNNING``, ``SUCCEEDED``, ``finished``: five messages), and the floor coordinator
sends the assignment over one long-lived ``AgentService.Link`` stream, as hivewire does,
to an agent that answers ``started`` and ``result`` in one message. Three floors, each
adding one of hivewire's guarantees, chosen per task by its capability:

* ``messages``: the messages alone (no state kept beyond the call);
* ``store``: each state change committed to SQLite before the client hears of it
  (WAL, ``synchronous=NORMAL``, one writer thread committing whatever waits as one
  transaction; ``QUEUED`` and ``ASSIGNED`` in one, ``SUCCEEDED`` and ``finished`` in
  one: the task's five events, as the coordinator stores them);
* ``events``: also each of those five events published to JetStream after its commit
  (the same nats-server as the mesh, ``sync_interval: always``, one subject), the acks
  of each window awaited in the background before the next window.

Each round runs, at every concurrency, the three floors, the hivewire task (``task``, and
``task-outcome``: the same with ``StreamTaskRequest.outcome_only``, two messages to the
client instead of five) and the chain, back to back, in an order that turns each round,
and takes the ratios of that round against the chain. What a floor reaches is a ceiling
for any Python implementation of the contract on grpc.aio: no validation, authorization,
scheduling, retries, deadlines, tracing, metrics, logs or outbox.

    python bench/floor.py [--rounds 3] [--measure 1.2] [--concurrency 1 16] [--json F]
    python bench/floor.py --only task task-outcome --rounds 12 --measure 2
    python bench/floor.py --sync-interval 2m
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import queue
import sqlite3
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import AsyncIterator, Mapping, Sequence
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import grpc
from google.protobuf.wrappers_pb2 import BytesValue

from bench.chain import CHAIN, TASK, phase_name, ratios, relay_chain
from bench.common import (
    DEFAULT,
    Durations,
    Phase,
    closed_loop,
    fmt_spread,
    fmt_time,
    median_phase,
    p50,
    p99,
    table,
)
from bench.echo import (
    PAYLOAD,
    UNARY,
    announce,
    open_channel,
    serve_process,
    server_credentials,
    wait_for_parent,
)
from bench.mesh import run_task
from bench.meshrun import bench_mesh, coordinator_stub
from hivewire.agent.v1 import agent_pb2, agent_pb2_grpc
from hivewire.common.v1 import common_pb2
from hivewire.coordinator.v1 import coordinator_pb2, coordinator_pb2_grpc

FLOORS = ("messages", "store", "events")
"""The floors, each adding one guarantee to the one before."""
CONCURRENCY = (1, 16)
OP_TIMEOUT = 60.0
"""Seconds one task may take before the run fails."""
TASK_OUTCOME = "task-outcome"
"""The hivewire task again, its client asking for the outcome alone (``outcome_only``)."""

QUEUED = common_pb2.TASK_STATE_QUEUED
ASSIGNED = common_pb2.TASK_STATE_ASSIGNED
RUNNING = common_pb2.TASK_STATE_RUNNING
SUCCEEDED = common_pb2.TASK_STATE_SUCCEEDED


# --- the floor agent --------------------------------------------------------------------


class _FloorAgent(agent_pb2_grpc.AgentServiceServicer):
    """``Link`` only: each assignment is answered with ``started`` and ``result``.

    Both go in one message, with those of every other assignment of the same
    ``LinkRequest``: a no-op needs no more (hivewire's agent joins what piles up).
    """

    async def Link(self, request_iterator: Any, context: grpc.aio.ServicerContext) -> None:
        while True:
            request = await context.read()
            if request is grpc.aio.EOF:
                return
            responses = []
            for frame in request.frames:
                if not frame.request.HasField("assign"):
                    continue
                assignment = frame.request.assign
                started, result = (
                    agent_pb2.ExecuteResponse(
                        task_id=assignment.task_id, attempt=assignment.attempt, sequence=sequence
                    )
                    for sequence in (1, 2)
                )
                started.started.agent_id = "floor"
                result.result.output.CopyFrom(assignment.input)
                responses += [started, result]
            await context.write(agent_pb2.LinkResponse(responses=responses))


# --- the floor coordinator --------------------------------------------------------------


class _Store:
    """SQLite as the coordinator keeps it: WAL, one writer thread, group commit."""

    def __init__(self, path: Path) -> None:
        self._queue: queue.SimpleQueue[
            tuple[list[tuple[str, int, bytes]], list[tuple[str, int, bytes]], Any, Any]
        ] = queue.SimpleQueue()
        self._path = path
        threading.Thread(target=self._run, name="floor-store", daemon=True).start()

    def put(
        self, tasks: list[tuple[str, int, bytes]], events: list[tuple[str, int, bytes]]
    ) -> asyncio.Future[None]:
        """Store task rows and events in the next transaction; the future is its commit."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[None] = loop.create_future()
        self._queue.put((tasks, events, loop, future))
        return future

    def _run(self) -> None:
        conn = sqlite3.connect(self._path, isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")
        conn.execute("CREATE TABLE tasks (task_id TEXT PRIMARY KEY, state INTEGER, row BLOB)")
        conn.execute(
            "CREATE TABLE events (task_id TEXT, sequence INTEGER, event BLOB,"
            " PRIMARY KEY (task_id, sequence))"
        )
        while True:
            batch = [self._queue.get()]
            while not self._queue.empty():
                batch.append(self._queue.get_nowait())
            conn.execute("BEGIN")
            for tasks, events, _, _ in batch:
                conn.executemany("INSERT OR REPLACE INTO tasks VALUES (?, ?, ?)", tasks)
                conn.executemany("INSERT INTO events VALUES (?, ?, ?)", events)
            conn.execute("COMMIT")
            for _, _, loop, future in batch:
                loop.call_soon_threadsafe(_resolve, future)


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


class _Publisher:
    """Events to JetStream once committed, as cheaply as nats-py allows with acks.

    Each event is a plain publish on one subject with a reply subject under one inbox
    subscription (no request future per message); a window of what waits is sent at
    once and its acks awaited, in the background, before the next. An ack that is an
    error, or acks that do not come, fail every later :meth:`publish` (and so the run).
    """

    SUBJECT = "floor.events"
    ACK_WAIT = 30.0

    def __init__(self, connection: Any) -> None:
        self._nc = connection
        self._waiting: asyncio.Queue[bytes] = asyncio.Queue()
        self._inbox = f"_INBOX.floor.{uuid.uuid4().hex}"
        self._acked = 0
        self._ack = asyncio.Event()
        self._failed: BaseException | None = None

    async def start(self) -> None:
        await self._nc.subscribe(f"{self._inbox}.*", cb=self._on_ack)
        self._task = asyncio.create_task(self._run())
        self._task.add_done_callback(self._ended)

    def publish(self, data: bytes) -> None:
        self.check()
        self._waiting.put_nowait(data)

    async def _on_ack(self, msg: Any) -> None:
        # nats-py swallows what a subscription callback raises: keep it instead. An ack
        # is a JSON body naming the stream; an error, or a status such as 503 (no
        # responders: no stream took it), is a failure.
        if not msg.data or b'"error"' in msg.data or (msg.headers or {}).get("Status"):
            self._failed = RuntimeError(f"JetStream did not store an event: {msg!r}")
        self._acked += 1
        self._ack.set()

    def _ended(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled():
            self._failed = task.exception() or RuntimeError("the publisher ended")

    def check(self) -> None:
        """Raise what made publishing fail, if anything did."""
        if self._failed is not None:
            raise RuntimeError(f"the floor's publisher failed: {self._failed!r}")

    async def _run(self) -> None:
        sent = 0
        while True:
            window = [await self._waiting.get()]
            while not self._waiting.empty() and len(window) < 256:
                window.append(self._waiting.get_nowait())
            for data in window:
                sent += 1
                await self._nc.publish(self.SUBJECT, data, reply=f"{self._inbox}.{sent}")
            async with asyncio.timeout(self.ACK_WAIT):
                while self._acked < sent:
                    self._ack.clear()
                    await self._ack.wait()


class _FloorCoordinator(coordinator_pb2_grpc.CoordinatorServiceServicer):
    """``StreamTask`` only, the task's five messages; the agent on one ``Link`` stream."""

    def __init__(self, link: Any, store: _Store, publisher: _Publisher) -> None:
        self._link = link
        self._store = store
        self._publisher = publisher
        self._frames: asyncio.Queue[agent_pb2.LinkFrame] = asyncio.Queue()
        self._answers: dict[str, asyncio.Queue[agent_pb2.ExecuteResponse]] = {}
        self._tasks = [asyncio.create_task(self._write()), asyncio.create_task(self._read())]

    async def _write(self) -> None:
        while True:
            frames = [await self._frames.get()]
            while not self._frames.empty():
                frames.append(self._frames.get_nowait())
            await self._link.write(agent_pb2.LinkRequest(frames=frames))

    async def _read(self) -> None:
        while True:
            response = await self._link.read()
            if response is grpc.aio.EOF:
                return
            for answer in response.responses:
                answers = self._answers.get(answer.task_id)
                if answers is not None:  # None: its call ended before the agent answered
                    answers.put_nowait(answer)

    async def _commit(
        self, floor: str, task: coordinator_pb2.Task, events: list[coordinator_pb2.TaskEvent]
    ) -> None:
        """What ``floor`` does with a state change before the client hears of it."""
        if floor == "messages":
            return
        stored = [(e.task_id, e.sequence, e.SerializeToString()) for e in events]
        await self._store.put([(task.task_id, task.state, task.SerializeToString())], stored)
        if floor == "events":
            for _, _, data in stored:
                self._publisher.publish(data)

    async def StreamTask(
        self, request: coordinator_pb2.StreamTaskRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[coordinator_pb2.StreamTaskResponse]:
        floor = request.spec.capability
        task_id = uuid.uuid4().hex
        answers: asyncio.Queue[agent_pb2.ExecuteResponse] = asyncio.Queue()
        self._answers[task_id] = answers
        try:
            task = coordinator_pb2.Task(
                task_id=task_id, spec=request.spec, state=QUEUED, owner="client", attempt=1
            )
            task.created_at.GetCurrentTime()
            task.updated_at.CopyFrom(task.created_at)
            task.deadline.FromNanoseconds(task.created_at.ToNanoseconds() + 60 * 10**9)
            queued = _change(task, 1, common_pb2.TASK_STATE_UNSPECIFIED, QUEUED)
            snapshot = coordinator_pb2.TaskEvent(task_id=task_id, sequence=1, snapshot=task)
            assigned = _change(task, 2, QUEUED, ASSIGNED)
            committed = self._commit(floor, task, [queued, assigned])
            self._frames.put_nowait(
                agent_pb2.LinkFrame(
                    task_id=task_id,
                    attempt=1,
                    request=agent_pb2.ExecuteRequest(
                        assign=agent_pb2.TaskAssignment(
                            task_id=task_id,
                            attempt=1,
                            capability=request.spec.capability,
                            input=request.spec.input,
                            deadline=task.deadline,
                            metadata=request.spec.metadata,
                        )
                    ),
                )
            )
            await committed
            yield coordinator_pb2.StreamTaskResponse(event=snapshot)
            yield coordinator_pb2.StreamTaskResponse(event=assigned)
            await answers.get()  # started
            running = _change(task, 3, ASSIGNED, RUNNING)
            await self._commit(floor, task, [running])
            yield coordinator_pb2.StreamTaskResponse(event=running)
            result = (await answers.get()).result
            task.output.CopyFrom(result.output)
            succeeded = _change(task, 4, RUNNING, SUCCEEDED)
            finished = coordinator_pb2.TaskEvent(
                task_id=task_id,
                sequence=5,
                attempt=1,
                finished=coordinator_pb2.TaskFinished(state=SUCCEEDED, output=result.output),
            )
            task.last_sequence = 5
            await self._commit(floor, task, [succeeded, finished])
            yield coordinator_pb2.StreamTaskResponse(event=succeeded)
            yield coordinator_pb2.StreamTaskResponse(event=finished)
        finally:
            del self._answers[task_id]


def _change(
    task: coordinator_pb2.Task,
    sequence: int,
    before: common_pb2.TaskState.ValueType,
    after: common_pb2.TaskState.ValueType,
) -> coordinator_pb2.TaskEvent:
    """The task's next event: a state change (the task's row follows it)."""
    task.state = after
    task.last_sequence = sequence
    task.updated_at.GetCurrentTime()
    event = coordinator_pb2.TaskEvent(
        task_id=task.task_id,
        sequence=sequence,
        attempt=task.attempt,
        state_changed=coordinator_pb2.StateChange(
            from_state=before,
            to_state=after,
            agent_id="floor",
        ),
    )
    event.time.CopyFrom(task.updated_at)
    return event


async def serve_agent(certs: Path) -> None:
    """The floor agent's process."""
    server = grpc.aio.server()
    agent_pb2_grpc.add_AgentServiceServicer_to_server(_FloorAgent(), server)
    port = server.add_secure_port("127.0.0.1:0", server_credentials(certs))
    await server.start()
    announce(port)
    await wait_for_parent()
    await server.stop(0)


async def serve_coordinator(certs: Path, agent: str, nats_url: str, state: Path) -> None:
    """The floor coordinator's process: its ``Link`` to ``agent``, its store and stream.

    Raises:
        RuntimeError: Publishing failed at some point (the process then exits with 1,
            which :func:`floor_services` turns into a failed run).
    """
    import nats
    from nats.js.api import StorageType, StreamConfig

    channel = open_channel(agent, certs)
    link = agent_pb2_grpc.AgentServiceStub(channel).Link()
    connection = await nats.connect(nats_url)
    js = connection.jetstream()
    await js.add_stream(StreamConfig(name="FLOOR", subjects=["floor.>"], storage=StorageType.FILE))
    publisher = _Publisher(connection)
    await publisher.start()
    servicer = _FloorCoordinator(link, _Store(state / "floor.db"), publisher)
    server = grpc.aio.server()
    coordinator_pb2_grpc.add_CoordinatorServiceServicer_to_server(servicer, server)
    port = server.add_secure_port("127.0.0.1:0", server_credentials(certs))
    await server.start()
    announce(port)
    await wait_for_parent()
    await server.stop(0)
    link.cancel()
    await channel.close()
    await connection.close()
    publisher.check()


# --- the run ----------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def floor_services(
    certs: Path, nats_url: str, state: Path, *, coordinator_python: str = sys.executable
) -> AsyncIterator[tuple[str, dict[str, int]]]:
    """Start the floor agent and coordinator; yield the coordinator's target and the pids.

    ``coordinator_python``: what runs the coordinator (a wrapper of the interpreter that
    profiles it, say).
    """
    common = ["--certs", str(certs)]
    async with serve_process("bench.floor", ["serve-agent", *common]) as agent:
        async with serve_process(
            "bench.floor",
            [
                "serve-coordinator",
                *common,
                "--agent",
                agent.target,
                "--nats",
                nats_url,
                "--state",
                str(state),
            ],
            python=coordinator_python,
        ) as coordinator:
            yield (
                coordinator.target,
                {
                    "floor-coordinator": coordinator.pid,
                    "floor-agent": agent.pid,
                },
            )
    if coordinator.process.returncode != 0:
        raise RuntimeError(
            f"the floor coordinator exited with {coordinator.process.returncode} (see its stderr)"
        )


async def measure(
    *,
    durations: Durations,
    concurrency: Sequence[int] = CONCURRENCY,
    sync_interval: str = "always",
    only: Sequence[str] = (),
) -> dict[str, Any]:
    """The floors, the hivewire task and the chain at each concurrency, every round.

    ``only`` names the sides to run (the chain always runs: every ratio is to it).

    Returns:
        ``{"concurrency": [...], "rounds": {name: [Phase per round]},
        "phases": {name: median Phase}}``; names are ``<side> c=<n>``, sides
        ``floor-messages``, ``floor-store``, ``floor-events``, ``task``, ``task-outcome``
        and ``chain``.
    """
    rounds: dict[str, list[Phase]] = {}
    async with (
        bench_mesh(agents=1, sync_interval=sync_interval) as mesh,
        relay_chain(mesh.certs) as chain,
    ):
        async with floor_services(mesh.certs, mesh.nats_url, mesh.state) as (floor, floor_pids):
            channels = [
                open_channel(target, mesh.certs) for target in (mesh.address, floor, chain.target)
            ]
            try:
                task_stub = coordinator_stub(channels[0])
                floor_stub = coordinator_stub(channels[1])
                call = channels[2].unary_unary(
                    UNARY,
                    request_serializer=BytesValue.SerializeToString,
                    response_deserializer=BytesValue.FromString,
                )
                await call(PAYLOAD, timeout=30, wait_for_ready=True)
                await run_task(task_stub)
                for name in FLOORS:
                    await task_op(floor_stub, name)()

                async def chain_op() -> None:
                    await call(PAYLOAD)

                floor_pids = {**floor_pids, "nats": mesh.pids["nats"]}
                sides: list[tuple[str, Any, Mapping[str, int]]] = [
                    *((f"floor-{name}", task_op(floor_stub, name), floor_pids) for name in FLOORS),
                    (TASK, task_op(task_stub, "noop"), mesh.pids),
                    (TASK_OUTCOME, task_op(task_stub, "noop", outcome_only=True), mesh.pids),
                    (CHAIN, chain_op, chain.pids),
                ]
                sides = [e for e in sides if not only or e[0] in only or e[0] == CHAIN]
                for i in range(durations.rounds):
                    # Each round in another order, turned and every other round reversed:
                    # no side always runs after the same one (the floor's background
                    # publishing, a mesh's warm caches).
                    order = sides[i % len(sides) :] + sides[: i % len(sides)]
                    if i % 2:
                        order.reverse()  # and each side after another one than before
                    for c in concurrency:
                        for side, op, pids in order:
                            phase = await closed_loop(
                                phase_name(side, c), op, concurrency=c, durations=durations,
                                pids=pids,
                            )  # fmt: skip
                            rounds.setdefault(phase.name, []).append(phase)
            finally:
                for channel in channels:
                    await channel.close()
    return {
        "concurrency": list(concurrency),
        "sides": [side for side, _, _ in sides if side != CHAIN],
        "rounds": rounds,
        "phases": {name: median_phase(p) for name, p in rounds.items()},
    }


def task_op(stub: Any, capability: str, *, outcome_only: bool = False) -> Any:
    """One task of ``capability`` followed to its end, as one operation of a phase."""

    async def op() -> None:
        async with asyncio.timeout(OP_TIMEOUT):  # a stuck side fails the run, never hangs it
            await run_task(stub, capability, outcome_only=outcome_only)

    return op


def report(result: Mapping[str, Any]) -> str:
    """Each side against the chain, per concurrency: median (min-max) of the rounds."""
    phases: dict[str, Phase] = result["phases"]
    rows = []
    for c in sorted(result["concurrency"], reverse=True):
        chain = phases[phase_name(CHAIN, c)]
        rows.append(
            [f"c={c}", CHAIN, f"{chain.rate:,.0f}/s", fmt_time(p50(chain)), fmt_time(p99(chain)),
             f"{chain.cpu_total_us:,.0f} µs", "1", "1", "1", "1"]
        )  # fmt: skip
        for side in result["sides"]:
            phase = phases[phase_name(side, c)]
            spread = ratios(result, c, side=side)
            rows.append(
                [
                    f"c={c}",
                    side,
                    f"{phase.rate:,.0f}/s",
                    fmt_time(p50(phase)),
                    fmt_time(p99(phase)),
                    f"{phase.cpu_total_us:,.0f} µs",
                    fmt_spread(spread["rate"]),
                    fmt_spread(spread["p50"]),
                    fmt_spread(spread["p99"]),
                    fmt_spread(spread["cpu"]),
                ]
            )
    cpu_rows = []
    for c in sorted(result["concurrency"], reverse=True):
        for side in result["sides"]:
            phase = phases[phase_name(side, c)]
            cpu_rows.append(
                [f"c={c}", side]
                + [f"{name} {us:,.0f}" for name, us in sorted(phase.cpu_us.items())]
            )
    return "\n".join(
        [
            table(
                "a no-op task on the floors, on hivewire and a bare chain call: medians of "
                "the rounds; ratios to the chain per round, median (min-max)",
                [
                    "c",
                    "side",
                    "rate",
                    "p50",
                    "p99",
                    "CPU/op",
                    "rate ratio",
                    "p50 ratio",
                    "p99 ratio",
                    "CPU ratio",
                ],
                rows,
            ),  # fmt: skip
            "CPU µs per operation by process (medians):",
            *("  " + "  ".join(row) for row in cpu_rows),
        ]
    )


def main(argv: Sequence[str] | None = None) -> int:
    """``python bench/floor.py``: measure and print; ``serve-*``: one floor process."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command")
    agent = sub.add_parser("serve-agent")
    agent.add_argument("--certs", type=Path, required=True)
    coordinator = sub.add_parser("serve-coordinator")
    coordinator.add_argument("--certs", type=Path, required=True)
    coordinator.add_argument("--agent", required=True)
    coordinator.add_argument("--nats", required=True)
    coordinator.add_argument("--state", type=Path, required=True)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--measure", type=float, default=DEFAULT.measure)
    parser.add_argument("--concurrency", type=int, nargs="+", default=list(CONCURRENCY))
    parser.add_argument("--json", type=Path, help="also write the phases as JSON")
    parser.add_argument(
        "--only",
        nargs="+",
        default=[],
        choices=[*(f"floor-{name}" for name in FLOORS), TASK, TASK_OUTCOME],
        help="run only these sides (and the chain)",
    )
    parser.add_argument(
        "--sync-interval",
        default="always",
        help="nats-server's JetStream sync_interval (the mesh's is always)",
    )
    args = parser.parse_args(argv)
    if args.command == "serve-agent":
        asyncio.run(serve_agent(args.certs))
        return 0
    if args.command == "serve-coordinator":
        with tempfile.TemporaryDirectory(dir=args.state, prefix="floor-") as tmp:
            asyncio.run(serve_coordinator(args.certs, args.agent, args.nats, Path(tmp)))
        return 0
    durations = Durations(warmup=DEFAULT.warmup, measure=args.measure, rounds=args.rounds)
    started = time.monotonic()
    result = asyncio.run(
        measure(
            durations=durations,
            concurrency=args.concurrency,
            sync_interval=args.sync_interval,
            only=args.only,
        )
    )
    print(report(result))
    print(f"({time.monotonic() - started:.0f} s)")
    if args.json:
        rounds = {k: [p.to_dict() for p in v] for k, v in result["rounds"].items()}
        args.json.write_text(json.dumps({**result, "phases": None, "rounds": rounds}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
