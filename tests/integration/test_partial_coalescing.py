"""Partial chunks coalesced on their way out of the agent, over real mTLS servers.

Chunks a handler queues while the previous message is still being written travel as
one ``partial`` message (and so one stored event): a reader must rebuild exactly the
same artifacts, in the same order, and a lone chunk must go out at once.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import pytest

from hivewire.common.v1 import common_pb2
from hivewire.coordinator.v1 import coordinator_pb2
from hivewire.services.agent import Agent, Payload, TaskContext, capability
from hivewire.services.agent.serve import AgentServer
from hivewire.services.runtime.metrics import REGISTRY
from tests.conftest import Pki
from tests.integration.test_agent_helpers import (
    Coordinator,
    agent_settings,
    assignment,
    serve_in_process,
)
from tests.integration.test_agent_subtasks import sdk_agent
from tests.support.coordinator_mesh import Mesh, assert_contiguous, collect, start_mesh

pytestmark = pytest.mark.timeout(90)

C = coordinator_pb2


def script() -> list[tuple[str, str, bool]]:
    """What the ``burst`` capability sends: (artifact, text, append), and a progress
    event after the first 150 chunks (``"!"``).
    """
    sent: list[tuple[str, str, bool]] = []
    for i in range(150):
        sent.append(("story", f"tok{i} ", True))
    sent.append(("!", "", True))
    sent.append(("story", "rewritten:", False))  # replaces what came before
    for i in range(60):
        sent.append(("story", f"é{i}", True))
        sent.append(("notes", f"[{i}]", True))  # interleaved: never joined across
    return sent


class Streamer(Agent):
    """Streams chunks in the ways a model relay does."""

    name = "streamer"
    max_concurrency = 4

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.produced = asyncio.Event()

    @capability("burst")
    async def burst(self, task: Payload, ctx: TaskContext) -> str:
        """Everything in :func:`script` back to back (yielding when ``task.text`` asks)."""
        for artifact, text, append in script():
            if artifact == "!":
                await ctx.progress(0.5, "half")
            else:
                await ctx.partial(text, artifact_id=artifact, append=append)
            if task.text == "yield":
                await asyncio.sleep(0)
        await ctx.partial(b"\x00\x01", artifact_id="raw")
        await ctx.partial(b"\x02", artifact_id="raw", last_chunk=True)
        self.produced.set()
        return "done"

    @capability("lone")
    async def lone(self, task: Payload, ctx: TaskContext) -> str:
        """One chunk, then nothing until the test releases it."""
        await ctx.partial("first")
        await self.release.wait()
        return "done"


def expected_artifacts() -> dict[str, bytes]:
    out: dict[str, bytes] = {}
    for artifact, text, append in script():
        if artifact != "!":
            out[artifact] = (out.get(artifact, b"") if append else b"") + text.encode()
    out["raw"] = b"\x00\x01\x02"
    return out


def rebuild(partials: Sequence[common_pb2.PartialResult]) -> dict[str, bytes]:
    out: dict[str, bytes] = {}
    for p in partials:
        content = p.content.text.encode() + p.content.data
        out[p.artifact_id] = (out.get(p.artifact_id, b"") if p.append else b"") + content
    return out


def chunks_sent() -> int:
    return sum(1 for artifact, _, _ in script() if artifact != "!") + 2


@pytest.fixture
async def streamer() -> Streamer:
    return Streamer()


@pytest.fixture
async def agent(pki: Pki, streamer: Streamer) -> AsyncIterator[Coordinator]:
    served: AgentServer
    async with serve_in_process(streamer, agent_settings(pki.dir)) as served:
        client = Coordinator(f"127.0.0.1:{served.port}", pki.files("coordinator"))
        try:
            yield client
        finally:
            await client.close()


def _joined() -> float:
    return REGISTRY.get_sample_value("hivewire_agent_partials_joined_total") or 0.0


async def test_queued_chunks_go_out_as_one_with_every_byte_in_order(agent: Coordinator) -> None:
    joined = _joined()
    ex = agent.execute()
    await ex.send(assignment("burst"))
    final = await ex.finish()
    assert final.result.output.text == "done"
    assert [m.sequence for m in ex.received] == list(range(1, len(ex.received) + 1))
    partials = [m.partial for m in ex.received if m.WhichOneof("kind") == "partial"]
    assert rebuild(partials) == expected_artifacts()
    # The handler queued them without pausing: they were coalesced.
    assert len(partials) < chunks_sent()
    assert _joined() - joined == chunks_sent() - len(partials)
    # Nothing crossed the progress event: every chunk before it, before it.
    kinds = [m.WhichOneof("kind") for m in ex.received]
    at = kinds.index("progress")
    assert rebuild(partials[: at - 1]) == {
        "story": "".join(f"tok{i} " for i in range(150)).encode()
    }
    assert partials[at - 1].content.text.startswith("rewritten:") and not partials[at - 1].append
    # The last chunk of an artifact stays the last: "raw" ends with last_chunk.
    raw = [p for p in partials if p.artifact_id == "raw"]
    assert raw[-1].last_chunk and not any(p.last_chunk for p in raw[:-1])


async def test_a_slow_reader_gets_every_byte_in_order(
    agent: Coordinator, streamer: Streamer
) -> None:
    ex = agent.execute()
    await ex.send(assignment("burst", text="yield"))
    # Read nothing until the handler has produced everything: it all piles up.
    await asyncio.wait_for(streamer.produced.wait(), 30)
    await ex.finish()
    partials = [m.partial for m in ex.received if m.WhichOneof("kind") == "partial"]
    assert rebuild(partials) == expected_artifacts()
    assert [m.sequence for m in ex.received] == list(range(1, len(ex.received) + 1))


async def test_a_lone_chunk_is_sent_at_once(agent: Coordinator, streamer: Streamer) -> None:
    ex = agent.execute()
    await ex.send(assignment("lone"))
    # The handler is blocked on the release after its one chunk: the chunk arrives
    # anyway (nothing waits for a second one to join it).
    partial = await ex.until("partial")
    assert partial.partial.content.text == "first"
    assert not streamer.release.is_set()
    streamer.release.set()
    final = await ex.finish()
    assert final.result.output.text == "done"


@pytest.fixture
async def mesh(pki: Pki, tmp_path: Path) -> AsyncIterator[Mesh]:
    async with start_mesh(pki.dir, tmp_path / "coordinator.db") as m:
        yield m


@pytest.mark.parametrize("at_agent", [True, False], ids=["agent-coalesces", "journal-only"])
async def test_resume_by_sequence_after_coalesced_events(
    mesh: Mesh, streamer: Streamer, at_agent: bool
) -> None:
    # With the agent's coalescing off, one message per chunk reaches the coordinator,
    # whose journal joins those that arrive while the one before commits.
    async with sdk_agent(mesh, streamer, identity="agent", coalesce_partials=at_agent):
        client = mesh.client()
        events = await collect(
            client.StreamTask(
                C.StreamTaskRequest(
                    spec=C.TaskSpec(capability="burst", input=common_pb2.Payload(text=""))
                )
            )
        )
    assert events[-1].finished.state == common_pb2.TASK_STATE_SUCCEEDED
    assert_contiguous(events[1:], start=2)
    partial_events = [e for e in events if e.HasField("partial")]
    assert rebuild([e.partial for e in partial_events]) == expected_artifacts()
    if at_agent:
        assert len(partial_events) < chunks_sent()  # one stored event per coalesced chunk
    task_id = events[-1].task_id
    # Resuming after any partial event replays exactly the events after it.
    for resume in (partial_events[0], partial_events[len(partial_events) // 2]):
        replay = await collect(
            client.WatchTask(C.WatchTaskRequest(task_id=task_id, after_sequence=resume.sequence))
        )
        assert replay == [e for e in events[1:] if e.sequence > resume.sequence]
    await mesh.close_channels()


async def test_coalescing_can_be_turned_off(pki: Pki, streamer: Streamer) -> None:
    settings = agent_settings(pki.dir, coalesce_partials=False)
    async with serve_in_process(streamer, settings) as served:
        client = Coordinator(f"127.0.0.1:{served.port}", pki.files("coordinator"))
        try:
            ex = client.execute()
            await ex.send(assignment("burst"))
            await ex.finish()
        finally:
            await client.close()
    partials = [m.partial for m in ex.received if m.WhichOneof("kind") == "partial"]
    assert len(partials) == chunks_sent()
    assert rebuild(partials) == expected_artifacts()
