"""The coordinator's attempts on agents' Link streams: real agents, real mTLS.

The coordinator tests with the scripted agent (which serves only ``Execute``) cover
the fallback; these run the SDK's agent runtime, which serves ``Link``.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from hivewire.agent.v1 import agent_pb2, agent_pb2_grpc
from hivewire.common.v1 import common_pb2
from hivewire.coordinator.v1 import coordinator_pb2
from hivewire.discovery import Instance
from hivewire.services.agent import Agent, Payload, TaskContext, capability
from hivewire.services.agent.serve import AgentServer
from hivewire.services.coordinator.dispatch import AgentEntry, AgentLease, AttemptError
from hivewire.services.coordinator.link import AgentLink, AttemptStream, LinkAttempt, open_stream
from hivewire.services.coordinator.settings import CoordinatorProcessSettings
from hivewire.services.runtime import metadata as md
from hivewire.services.runtime import metrics
from hivewire.services.runtime.breaker import CircuitBreaker
from hivewire.services.runtime.channels import secure_channel
from hivewire.services.runtime.config import load_settings
from hivewire.services.runtime.tls import TlsFiles
from hivewire.services.runtime.tracing import tracer
from tests.conftest import Pki
from tests.helpers import eventually
from tests.integration.test_agent_helpers import agent_settings, assignment, serve_in_process
from tests.support.coordinator_mesh import Mesh, collect, spec, start_mesh

pytestmark = pytest.mark.timeout(60)

S = common_pb2
C = coordinator_pb2
SERVICE = "hivewire.agent.v1.AgentService"


def started_calls(method: str) -> float:
    """Calls of ``method`` started on agents in this process so far (any call type)."""
    return sum(
        sample.value
        for family in metrics.SERVER_STARTED.collect()
        for sample in family.samples
        if sample.name.endswith("_total")
        and sample.labels.get("grpc_service") == SERVICE
        and sample.labels.get("grpc_method") == method
    )


class Worker(Agent):
    """``wait`` holds until the test opens the task's gate (or ``open`` is set)."""

    name = "worker"
    version = "1.0.0"
    description = "Link tests."
    max_concurrency = 8

    def __init__(self, *, open_all: bool = False) -> None:
        self.open_all = open_all
        self.gates: dict[str, asyncio.Event] = {}
        self.running: set[str] = set()
        self.cancelled: set[str] = set()

    def gate(self, text: str) -> asyncio.Event:
        return self.gates.setdefault(text, asyncio.Event())

    @capability
    async def wait(self, task: Payload, ctx: TaskContext) -> str:
        """Waits for the gate named by the input text."""
        self.running.add(task.text)
        try:
            if not self.open_all:
                await self.gate(task.text).wait()
        except asyncio.CancelledError:
            self.cancelled.add(task.text)
            raise
        finally:
            self.running.discard(task.text)
        return f"done {task.text}"


@contextlib.asynccontextmanager
async def registered_agent(mesh: Mesh, pki: Pki, agent: Agent) -> AsyncIterator[AgentServer]:
    """Serve ``agent`` (the real runtime) and register it where the coordinator looks."""
    async with serve_in_process(agent, agent_settings(pki.dir)) as running:
        instance = Instance(
            service="hivewire-agent",
            instance_id=running.runtime.agent_id,
            address="127.0.0.1",
            port=running.port,
            tags=tuple(running.runtime.card.capability_names),
            meta={"name": running.runtime.card.name, "max_concurrency": "8"},
        )
        await mesh.registry.register(instance)
        try:
            yield running
        finally:
            with contextlib.suppress(Exception):
                await mesh.registry.deregister(instance.instance_id)


@pytest.fixture
async def mesh(pki: Pki, tmp_path: Path) -> AsyncIterator[Mesh]:
    async with start_mesh(pki.dir, tmp_path / "coordinator.db") as m:
        yield m


async def run_to_end(mesh: Mesh, text: str, **kwargs: object) -> C.Task:
    client = mesh.client()
    submitted = await client.SubmitTask(
        C.SubmitTaskRequest(spec=spec("wait", text=text, **kwargs))  # type: ignore[arg-type]
    )
    await collect(client.WatchTask(C.WatchTaskRequest(task_id=submitted.task.task_id)))
    return (await client.GetTask(C.GetTaskRequest(task_id=submitted.task.task_id))).task


async def test_many_tasks_share_one_link_per_agent(mesh: Mesh, pki: Pki) -> None:
    async with registered_agent(mesh, pki, Worker(open_all=True)):
        await eventually(lambda: mesh.running.pool.has_capacity("wait"), timeout=10)
        links, executes = started_calls("Link"), started_calls("Execute")
        tasks = await asyncio.gather(*(run_to_end(mesh, f"t{i}") for i in range(12)))
        assert {t.state for t in tasks} == {S.TASK_STATE_SUCCEEDED}
        assert sorted(t.output.text for t in tasks) == sorted(f"done t{i}" for i in range(12))
        assert started_calls("Link") - links == 1
        assert started_calls("Execute") == executes


async def test_the_switch_off_uses_execute_calls(pki: Pki, tmp_path: Path) -> None:
    async with start_mesh(pki.dir, tmp_path / "c.db", agent_link=False) as mesh:
        async with registered_agent(mesh, pki, Worker(open_all=True)):
            await eventually(lambda: mesh.running.pool.has_capacity("wait"), timeout=10)
            links, executes = started_calls("Link"), started_calls("Execute")
            tasks = await asyncio.gather(*(run_to_end(mesh, f"t{i}") for i in range(3)))
            assert {t.state for t in tasks} == {S.TASK_STATE_SUCCEEDED}
            assert started_calls("Execute") - executes == 3
            assert started_calls("Link") == links


async def test_cancelling_one_task_leaves_the_others_on_the_link_running(
    mesh: Mesh, pki: Pki
) -> None:
    worker = Worker()
    async with registered_agent(mesh, pki, worker):
        client = mesh.client()
        ids = {}
        for text in ("keep", "drop"):
            submitted = await client.SubmitTask(C.SubmitTaskRequest(spec=spec("wait", text=text)))
            ids[text] = submitted.task.task_id
        await eventually(lambda: worker.running == {"keep", "drop"}, timeout=10)

        await client.CancelTask(C.CancelTaskRequest(task_id=ids["drop"], reason="not needed"))
        await collect(client.WatchTask(C.WatchTaskRequest(task_id=ids["drop"])))
        dropped = (await client.GetTask(C.GetTaskRequest(task_id=ids["drop"]))).task
        assert dropped.state == S.TASK_STATE_CANCELLED
        assert worker.cancelled == {"drop"} and worker.running == {"keep"}

        worker.gate("keep").set()
        await collect(client.WatchTask(C.WatchTaskRequest(task_id=ids["keep"])))
        kept = (await client.GetTask(C.GetTaskRequest(task_id=ids["keep"]))).task
        assert kept.state == S.TASK_STATE_SUCCEEDED and kept.output.text == "done keep"


async def test_a_killed_agent_fails_every_attempt_on_its_link_and_they_retry_elsewhere(
    mesh: Mesh, pki: Pki
) -> None:
    first = Worker()
    client = mesh.client()
    async with registered_agent(mesh, pki, first) as doomed:
        ids = []
        for text in ("one", "two"):
            submitted = await client.SubmitTask(C.SubmitTaskRequest(spec=spec("wait", text=text)))
            ids.append(submitted.task.task_id)
        await eventually(lambda: first.running == {"one", "two"}, timeout=10)
        async with registered_agent(mesh, pki, Worker(open_all=True)) as spare:
            # The agent's process dies: its server goes away at once, link and all.
            await doomed.server.server.stop(None)
            for task_id in ids:
                await collect(client.WatchTask(C.WatchTaskRequest(task_id=task_id)))
            for task_id in ids:
                task = (await client.GetTask(C.GetTaskRequest(task_id=task_id))).task
                assert task.state == S.TASK_STATE_SUCCEEDED
                assert [a.agent_id for a in task.attempts] == [
                    doomed.runtime.agent_id,
                    spare.runtime.agent_id,
                ]
                broken = task.attempts[0].error
                assert broken.retryable and broken.code in ("UNAVAILABLE", "CANCELLED")


async def test_an_agent_without_link_gets_execute_calls(mesh: Mesh) -> None:
    scripted = await mesh.agent()  # serves Execute only (the generated stub's Link)
    links = started_calls("Link")
    client = mesh.client()
    for text in ("a", "b", "c"):
        submitted = await client.SubmitTask(C.SubmitTaskRequest(spec=spec(text=text)))
        await collect(client.WatchTask(C.WatchTaskRequest(task_id=submitted.task.task_id)))
        task = (await client.GetTask(C.GetTaskRequest(task_id=submitted.task.task_id))).task
        assert task.state == S.TASK_STATE_SUCCEEDED and len(task.attempts) == 1
    assert len(scripted.stats.executions) == 3
    # Tried once, then remembered for the instance.
    assert started_calls("Link") - links == 1


async def test_an_agent_built_before_link_gets_execute_calls(mesh: Mesh) -> None:
    async with mesh.temporary_agent("older", without_link=True) as older:
        client = mesh.client()
        tasks = []
        for text in ("a", "b", "c"):
            submitted = await client.SubmitTask(C.SubmitTaskRequest(spec=spec(text=text)))
            await collect(client.WatchTask(C.WatchTaskRequest(task_id=submitted.task.task_id)))
            tasks.append(
                (await client.GetTask(C.GetTaskRequest(task_id=submitted.task.task_id))).task
            )
        assert [t.state for t in tasks] == [S.TASK_STATE_SUCCEEDED] * 3
        assert [len(t.attempts) for t in tasks] == [1, 1, 1]
        assert len(older.stats.executions) == 3
        entry = next(e for e in mesh.running.pool._agents.values() if e.agent_id == older.agent_id)
        assert entry.link_unsupported and entry.link is None


# -- the attempt handle, against a real agent ------------------------------------------


def lease_on(pki: Pki, running: AgentServer) -> contextlib.AbstractAsyncContextManager[AgentLease]:
    """A lease on ``running`` as the pool makes it (a stub on a plain mTLS channel)."""
    return lease_at(pki, running.port, running.runtime.agent_id)


@contextlib.asynccontextmanager
async def lease_at(pki: Pki, port: int, agent_id: str) -> AsyncIterator[AgentLease]:
    """A lease on the agent at ``port`` as the pool makes it (see :func:`lease_on`)."""
    files = TlsFiles.for_identity(pki.dir, "coordinator")
    channel = secure_channel(f"127.0.0.1:{port}", files)
    entry = AgentEntry(
        instance=Instance(
            service="hivewire-agent", instance_id=agent_id, address="127.0.0.1", port=port
        ),
        max_concurrency=8,
        breaker=CircuitBreaker("agent:test"),
    )
    try:
        yield AgentLease(entry=entry, stub=agent_pb2_grpc.AgentServiceStub(channel), probe=False)
    finally:
        entry.close_link()
        await channel.close()


def _metadata(task_id: str) -> list[tuple[str, str]]:
    return [(md.TASK_ID, task_id), (md.ATTEMPT, "1"), (md.CORRELATION_ID, "cid-1")]


def assert_deadline_error(err: AttemptError) -> None:
    """What an attempt past the task's deadline fails with, on Execute and on a Link."""
    detail = err.detail
    assert (detail.code, detail.reason, detail.retryable) == (
        "DEADLINE_EXCEEDED",
        "DEADLINE_EXCEEDED",
        False,
    )
    assert detail.message == "the task's deadline passed while the agent ran it"
    assert err.verdict == "none"


async def test_the_coordinator_enforces_each_attempts_deadline(pki: Pki) -> None:
    worker = Worker()
    async with (
        serve_in_process(worker, agent_settings(pki.dir)) as running,
        lease_on(pki, running) as lease,
    ):
        slow = open_stream(lease, timeout=0.3, metadata=_metadata("slow"), link=True)
        other = open_stream(lease, timeout=30, metadata=_metadata("other"), link=True)
        assert isinstance(slow, LinkAttempt) and isinstance(other, LinkAttempt)
        # The assignment's own deadline is far: only the coordinator's clock ends it.
        await slow.send(assignment("wait", text="slow", task_id="slow", deadline_in=60))
        await other.send(assignment("wait", text="other", task_id="other", deadline_in=60))
        assert (await slow.receive() or agent_pb2.ExecuteResponse()).HasField("started")
        with pytest.raises(AttemptError) as caught:
            while await slow.receive():
                pass
        assert_deadline_error(caught.value)
        # The agent was told to stop it; the other attempt on the link runs on.
        await eventually(lambda: "slow" in worker.cancelled, timeout=10)
        assert worker.running == {"other"}
        worker.gate("other").set()
        kinds = []
        while (message := await other.receive()) is not None:
            kinds.append(message.WhichOneof("kind"))
            if kinds[-1] in ("result", "error"):
                break
        assert kinds[-1] == "result"
        other.cancel()


async def test_an_execute_deadline_is_classified_the_same(pki: Pki) -> None:
    worker = Worker()
    async with (
        serve_in_process(worker, agent_settings(pki.dir)) as running,
        lease_on(pki, running) as lease,
    ):
        stream = open_stream(lease, timeout=0.3, metadata=_metadata("slow"), link=False)
        await stream.send(assignment("wait", text="slow", task_id="slow", deadline_in=60))
        with pytest.raises(AttemptError) as caught:
            while await stream.receive():
                pass
        stream.cancel()
        assert_deadline_error(caught.value)


async def test_a_refused_attempt_fails_like_a_refused_execute_call(pki: Pki) -> None:
    async with (
        serve_in_process(Worker(), agent_settings(pki.dir)) as running,
        lease_on(pki, running) as lease,
    ):
        details = []
        for link in (True, False):
            stream = open_stream(lease, timeout=10, metadata=_metadata("t"), link=link)
            await stream.send(assignment("missing", task_id="t"))
            with pytest.raises(AttemptError) as caught:
                await stream.receive()
            stream.cancel()
            details.append((caught.value.detail, caught.value.verdict))
        (on_link, link_verdict), (on_call, call_verdict) = details
        assert (on_link.code, on_link.reason, on_link.retryable, link_verdict) == (
            on_call.code,
            on_call.reason,
            on_call.retryable,
            call_verdict,
        )
        assert on_link.reason == "UNKNOWN_CAPABILITY"


def test_the_switch_is_a_coordinator_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    assert load_settings(CoordinatorProcessSettings).coordinator.agent_link is True
    monkeypatch.setenv("HIVEWIRE_COORDINATOR__AGENT_LINK", "false")
    assert load_settings(CoordinatorProcessSettings).coordinator.agent_link is False


async def test_each_attempt_on_a_link_has_its_spans_in_the_task_trace(
    pki: Pki, spans: InMemorySpanExporter
) -> None:
    async with (
        serve_in_process(Worker(open_all=True), agent_settings(pki.dir)) as running,
        lease_on(pki, running) as lease,
    ):
        for task_id in ("first", "second"):
            with tracer.start_as_current_span(f"attempt {task_id}"):
                stream = open_stream(lease, timeout=10, metadata=_metadata(task_id), link=True)
                await stream.send(assignment("wait", text=task_id, task_id=task_id))
                while (message := await stream.receive()) is not None:
                    if message.WhichOneof("kind") == "result":
                        break
                stream.cancel()
    finished = spans.get_finished_spans()
    method = "/hivewire.agent.v1.AgentService/Execute"
    for task_id in ("first", "second"):
        root = next(s for s in finished if s.name == f"attempt {task_id}")
        trace_id = root.context.trace_id
        client = next(
            s
            for s in finished
            if s.name == method and s.kind is SpanKind.CLIENT and s.context.trace_id == trace_id
        )
        server = next(
            s
            for s in finished
            if s.name == method and s.kind is SpanKind.SERVER and s.context.trace_id == trace_id
        )
        handler = next(
            s for s in finished if s.name == "handle wait" and s.context.trace_id == trace_id
        )
        assert client.parent is not None and client.parent.span_id == root.context.span_id
        assert server.parent is not None and server.parent.span_id == client.context.span_id
        assert server.attributes is not None
        assert server.attributes["hivewire.task_id"] == task_id
        assert handler.parent is not None and handler.parent.span_id == server.context.span_id


async def test_an_agent_registered_again_elsewhere_gets_a_new_link(pki: Pki) -> None:
    before, after = Worker(), Worker(open_all=True)
    async with (
        serve_in_process(before, agent_settings(pki.dir)) as old,
        serve_in_process(after, agent_settings(pki.dir)) as new,
        lease_on(pki, old) as lease,
    ):
        running = open_stream(lease, timeout=10, metadata=_metadata("running"), link=True)
        await running.send(assignment("wait", text="running", task_id="running"))
        await eventually(lambda: before.running == {"running"}, timeout=10)
        old_link = lease.entry.link
        assert isinstance(old_link, AgentLink)
        # Same instance id, another address (as the pool applies a new registration).
        lease.entry.instance = dataclasses.replace(lease.entry.instance, port=new.port)
        channel = secure_channel(
            f"127.0.0.1:{new.port}", TlsFiles.for_identity(pki.dir, "coordinator")
        )
        try:
            moved = AgentLease(
                entry=lease.entry, stub=agent_pb2_grpc.AgentServiceStub(channel), probe=False
            )
            later = open_stream(moved, timeout=10, metadata=_metadata("later"), link=True)
            await later.send(assignment("wait", text="later", task_id="later"))
            assert await until_end(later) == "done later"
            assert lease.entry.link is not old_link and not old_link.closed
            before.gate("running").set()
            assert await until_end(running) == "done running"
            assert old_link.closed
        finally:
            lease.entry.close_link()
            await channel.close()


async def until_end(stream: AttemptStream) -> str:
    """Read an attempt to its end; its output text."""
    while (message := await stream.receive()) is not None:
        if message.WhichOneof("kind") == "result":
            return message.result.output.text
    raise AssertionError("the attempt ended without a result")
