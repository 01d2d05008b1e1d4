"""Bounded memory on the agent link: an agent that floods cannot fill the coordinator.

The agent here is a raw ``AgentService`` (real gRPC server, real mTLS) whose ``Link``
writes an attempt's progress events as fast as grpc takes them, as a buggy or hostile
agent holding a valid certificate could. The coordinator holds at most
``link_buffer_bytes`` of a link's messages for attempts that have not taken them, and an
attempt takes no more while ``journal_backlog_bytes`` of its task's events wait for the
store: past that, the coordinator stops reading the link and HTTP/2 flow control holds
the agent back. Nothing is dropped: every event arrives, in order, once the store goes on.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from hivewire.agent.v1 import agent_pb2
from hivewire.common.v1 import common_pb2
from hivewire.coordinator.v1 import coordinator_pb2
from hivewire.discovery.static import StaticRegistry
from hivewire.services.coordinator.dispatch import AgentLease
from hivewire.services.coordinator.journal import EVENTS_KEPT
from hivewire.services.coordinator.link import AgentLink, LinkAttempt, open_stream
from hivewire.services.coordinator.sqlite_store import SqliteTaskStore
from hivewire.services.runtime import metadata as md
from hivewire.services.runtime.metrics import REGISTRY
from tests.conftest import Pki
from tests.helpers import eventually
from tests.integration.test_agent_helpers import assignment
from tests.integration.test_coordinator_link import lease_at
from tests.support.coordinator_mesh import Mesh, collect, spec, start_mesh
from tests.support.scripted_agent import ScriptedAgent, serve_scripted_agent

pytestmark = pytest.mark.timeout(120)

S = common_pb2
C = coordinator_pb2
Key = tuple[str, int]
BATCH = 64
"""Progress events the flooding agent puts in one ``LinkResponse``."""


class Flooder(ScriptedAgent):
    """Floods: input ``"<count>:<bytes>"`` is that many progress events of that size.

    Each attempt sends ``started``, waits for :attr:`go`, then writes its events
    (``step`` numbers them from 0) as fast as the stream takes them, then a result; on
    a ``Link`` in messages of :data:`BATCH` events, on an ``Execute`` call one by one.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.go = asyncio.Event()
        #: Events written to the stream so far, per attempt.
        self.sent: dict[Key, int] = {}
        #: Attempts on a Link stopped by a cancel or close frame before their end.
        self.stopped: set[Key] = set()

    async def flood(
        self, assign: agent_pb2.TaskAssignment, attempt: int
    ) -> AsyncIterator[list[agent_pb2.ExecuteResponse]]:
        """The attempt's messages, :data:`BATCH` progress events at a time."""
        count, size = (int(n) for n in assign.input.text.split(":"))
        key = (assign.task_id, attempt)

        def message(**kind: Any) -> agent_pb2.ExecuteResponse:
            return agent_pb2.ExecuteResponse(task_id=assign.task_id, attempt=attempt, **kind)

        yield [message(started=agent_pb2.ExecutionStarted())]
        await self.go.wait()
        pad = "x" * size
        for first in range(0, count, BATCH):
            steps = range(first, min(first + BATCH, count))
            yield [message(progress=S.Progress(step=str(i), message=pad)) for i in steps]
            self.sent[key] = steps[-1] + 1
        result = agent_pb2.ExecutionResult(output=S.Payload(text=f"flooded {count}"))
        yield [message(result=result)]

    async def Execute(  # type: ignore[override]
        self, request_iterator: AsyncIterator[agent_pb2.ExecuteRequest], context: Any
    ) -> AsyncIterator[agent_pb2.ExecuteResponse]:
        first = await anext(aiter(request_iterator))
        async for batch in self.flood(first.assign, max(1, first.assign.attempt)):
            for response in batch:
                yield response

    async def Link(  # type: ignore[override]
        self, request_iterator: AsyncIterator[agent_pb2.LinkRequest], context: Any
    ) -> AsyncIterator[agent_pb2.LinkResponse]:
        out: asyncio.Queue[agent_pb2.LinkResponse] = asyncio.Queue(1)
        floods: dict[Key, asyncio.Task[None]] = {}

        async def read() -> None:
            async for request in request_iterator:
                for frame in request.frames:
                    key = (frame.task_id, frame.attempt)
                    if frame.request.HasField("assign"):
                        floods[key] = asyncio.create_task(flood(frame.request.assign, key[1]))
                    elif key in floods:  # a cancel or a close: stop it
                        floods[key].cancel()

        async def flood(assign: agent_pb2.TaskAssignment, attempt: int) -> None:
            try:
                async for batch in self.flood(assign, attempt):
                    await out.put(agent_pb2.LinkResponse(responses=batch))
            except asyncio.CancelledError:
                self.stopped.add((assign.task_id, attempt))
                raise

        reader = asyncio.create_task(read())
        try:
            while True:
                yield await out.get()
        finally:
            reader.cancel()
            for task in floods.values():
                task.cancel()


def pauses() -> float:
    return REGISTRY.get_sample_value("hivewire_coordinator_link_paused_total") or 0.0


def held_bytes() -> float:
    return REGISTRY.get_sample_value("hivewire_coordinator_link_held_bytes") or 0.0


@contextlib.contextmanager
def store_stalled(store: SqliteTaskStore) -> Any:
    """Hold the store's one thread (no commit happens) until the block ends."""
    gate = threading.Event()
    # A read runs on the storage thread: this one holds it until the gate opens.
    held = asyncio.ensure_future(store._read(lambda _conn: gate.wait()))
    try:
        yield
    finally:
        gate.set()
        held.add_done_callback(lambda f: f.exception())


@contextlib.asynccontextmanager
async def flood_mesh(
    pki: Pki, tmp_path: Path, **settings: Any
) -> AsyncIterator[tuple[Mesh, Flooder]]:
    async with start_mesh(pki.dir, tmp_path / "c.db", **settings) as mesh:
        async with serve_scripted_agent(
            mesh.registry, pki.dir, capabilities=("flood",), agent_class=Flooder
        ) as (agent, _server):
            assert isinstance(agent, Flooder)
            await eventually(lambda: mesh.running.pool.has_capacity("flood"), timeout=10)
            yield mesh, agent


def the_link(mesh: Mesh) -> AgentLink:
    (entry,) = mesh.running.pool._agents.values()
    assert isinstance(entry.link, AgentLink)
    return entry.link


# -- through the coordinator, with its store stalled --------------------------------------

COUNT = 20_000
SIZE = 1000
BUFFER = 256 * 1024
BACKLOG = 64 * 1024
MESSAGE = SIZE + 64
"""An upper bound of one progress event's size on the wire and in the journal."""


@pytest.mark.parametrize("link", [True, False], ids=["link", "execute"])
async def test_a_flooding_agent_is_held_back_while_the_store_is_stalled(
    pki: Pki, tmp_path: Path, link: bool
) -> None:
    async with flood_mesh(
        pki, tmp_path, agent_link=link, link_buffer_bytes=BUFFER, journal_backlog_bytes=BACKLOG
    ) as (mesh, agent):
        client = mesh.client()
        submitted = await client.SubmitTask(
            C.SubmitTaskRequest(spec=spec("flood", text=f"{COUNT}:{SIZE}"))
        )
        task_id = submitted.task.task_id
        rt = mesh.running.coordinator._tasks.get(task_id)
        assert rt is not None
        await eventually(lambda: rt.record.state == S.TASK_STATE_RUNNING, timeout=10)
        store = mesh.running.store
        assert isinstance(store, SqliteTaskStore)
        await store.flush()
        paused = pauses()
        key = (task_id, 1)
        with store_stalled(store):
            agent.go.set()
            if link:
                # The coordinator stops reading the link (its budget is used up)...
                await eventually(lambda: pauses() > paused, timeout=30)
            else:
                # The attempt stops reading its call (its task's backlog is full)...
                await eventually(lambda: rt.uncommitted > BACKLOG, timeout=30)
            # ...and stays stopped while the store commits nothing: the agent is held
            # back by flow control, far from done, and nothing grows.
            for _ in range(20):
                # Round trips through the coordinator (none needs the store).
                await client.GetTask(C.GetTaskRequest(task_id=task_id))
            if link:
                held = the_link(mesh)
                assert not held._room.is_set(), "the link reads on"
                assert held.held <= BUFFER + BATCH * MESSAGE
                assert held_bytes() >= held.held
            assert agent.sent.get(key, 0) < COUNT // 2, "the agent was not held back"
            assert rt.uncommitted <= BACKLOG + MESSAGE
            assert rt.record.last_sequence < agent.sent.get(key, 0) + 3
        # Once the store goes on, every event arrives, in order, and the task succeeds.
        events = await collect(client.WatchTask(C.WatchTaskRequest(task_id=task_id)))
        # Only the latest committed events stay in memory; watchers read older ones
        # from the store. Nothing stays counted once everything has committed.
        assert len(rt.events) <= 2 * EVENTS_KEPT
        assert rt.uncommitted == 0
        if link:
            assert the_link(mesh).held == 0
    steps = [int(e.progress.step) for e in events if e.WhichOneof("kind") == "progress"]
    assert steps == list(range(COUNT))
    assert events[-1].finished.state == S.TASK_STATE_SUCCEEDED
    assert events[-1].finished.output.text == f"flooded {COUNT}"
    assert agent.sent[key] == COUNT


# -- the attempt handles, against the flooding agent ---------------------------------------


@contextlib.asynccontextmanager
async def flood_lease(pki: Pki) -> AsyncIterator[tuple[AgentLease, Flooder]]:
    async with (
        StaticRegistry() as registry,
        serve_scripted_agent(
            registry, pki.dir, capabilities=("flood",), agent_class=Flooder, register=False
        ) as (agent, server),
        lease_at(pki, server.port, agent.agent_id) as lease,
    ):
        assert isinstance(agent, Flooder)
        agent.go.set()
        yield lease, agent


def attempt(lease: AgentLease, task_id: str, budget: int, timeout: float = 60) -> LinkAttempt:
    metadata = [(md.TASK_ID, task_id), (md.ATTEMPT, "1")]
    stream = open_stream(lease, timeout=timeout, metadata=metadata, link=True, buffer_bytes=budget)
    assert isinstance(stream, LinkAttempt)
    return stream


async def steps_until_result(stream: LinkAttempt) -> list[int]:
    steps = []
    while (message := await stream.receive()) is not None:
        kind = message.WhichOneof("kind")
        if kind == "progress":
            steps.append(int(message.progress.step))
        elif kind == "result":
            return steps
    raise AssertionError("the attempt ended without a result")


async def test_a_message_bigger_than_the_budget_goes_through(pki: Pki) -> None:
    async with flood_lease(pki) as (lease, _agent):
        stream = attempt(lease, "big", budget=1024)
        paused = pauses()
        await stream.send(assignment("flood", text="200:8000", task_id="big"))
        assert await steps_until_result(stream) == list(range(200))
        assert pauses() > paused
        assert lease.entry.link is not None and lease.entry.link.held == 0


async def test_an_attempt_that_ends_gives_back_what_it_did_not_take(pki: Pki) -> None:
    async with flood_lease(pki) as (lease, agent):
        budget = 64 * 1024
        flood = attempt(lease, "flood", budget=budget)
        other = attempt(lease, "other", budget=budget)
        link = lease.entry.link
        assert isinstance(link, AgentLink)
        paused = pauses()
        await flood.send(assignment("flood", text="100000:1000", task_id="flood"))
        # Nobody takes the flood's messages: the link stops reading.
        await eventually(lambda: pauses() > paused, timeout=30)
        assert budget <= link.held <= budget + BATCH * MESSAGE
        await other.send(assignment("flood", text="3:10", task_id="other"))
        # The attempt is given up without taking its messages: the link reads again,
        # the agent is told to stop it, and the other attempt gets to its end.
        flood.cancel()
        assert await steps_until_result(other) == [0, 1, 2]
        await eventually(lambda: ("flood", 1) in agent.stopped, timeout=10)
        assert agent.sent[("flood", 1)] < 100000 and not link.closed
        other.cancel()


async def test_a_paused_link_still_ends_its_attempts(pki: Pki) -> None:
    async with flood_lease(pki) as (lease, _agent):
        budget = 64 * 1024
        flood = attempt(lease, "flood", budget=budget)
        paused = pauses()
        await flood.send(assignment("flood", text="100000:1000", task_id="flood"))
        await eventually(lambda: pauses() > paused, timeout=30)
        link = lease.entry.link
        assert isinstance(link, AgentLink)
        # The agent leaves the pool while the reader waits for room: the attempt takes
        # what it was handed, in order, then the link's end (no result: its attempt
        # fails as AGENT_STREAM_BROKEN in the coordinator).
        lease.entry.close_link()
        steps = []
        while (message := await flood.receive()) is not None:
            if message.WhichOneof("kind") == "progress":
                steps.append(int(message.progress.step))
        assert steps and steps == list(range(len(steps)))
        await eventually(lambda: link._reader.done(), timeout=5)
        assert link.held == 0
