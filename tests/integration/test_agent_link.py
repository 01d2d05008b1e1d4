"""``AgentService.Link`` on a real agent over mTLS: many attempts on one stream."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest

from hivewire.agent.v1 import agent_pb2
from hivewire.common.v1 import common_pb2
from hivewire.services.agent import Agent, Payload, TaskContext, capability
from hivewire.services.agent.serve import AgentServer
from hivewire.services.runtime import metrics
from hivewire.services.runtime.authz import DEFAULT_POLICY
from hivewire.services.runtime.status import from_rpc_error
from tests.conftest import Pki
from tests.helpers import eventually
from tests.integration.test_agent_helpers import (
    TERMINAL,
    Coordinator,
    agent_settings,
    assignment,
    serve_in_process,
)

SERVICE = "hivewire.agent.v1.AgentService"


class GateAgent(Agent):
    """Handlers that wait for the test, per task id."""

    name = "gates"
    version = "1.0.0"
    description = "Link tests."
    max_concurrency = 3

    def __init__(self) -> None:
        self.gates: dict[str, asyncio.Event] = {}
        self.started: dict[str, asyncio.Event] = {}
        self.cancelled: set[str] = set()
        self.correlation: dict[str, str] = {}

    def gate(self, task_id: str) -> asyncio.Event:
        return self.gates.setdefault(task_id, asyncio.Event())

    def has_started(self, task_id: str) -> asyncio.Event:
        return self.started.setdefault(task_id, asyncio.Event())

    @capability
    async def wait(self, task: Payload, ctx: TaskContext) -> str:
        """Reports progress, waits for its gate, answers with its task id."""
        self.correlation[ctx.task_id] = ctx.correlation_id
        self.has_started(ctx.task_id).set()
        await ctx.progress(0.5, "waiting")
        try:
            await self.gate(ctx.task_id).wait()
        except asyncio.CancelledError:
            self.cancelled.add(ctx.task_id)
            raise
        return f"done {ctx.task_id}"

    @capability
    async def quick(self, task: Payload, ctx: TaskContext) -> str:
        """Answers at once."""
        return "quick"


class Link:
    """One Link stream, driven frame by frame; responses sorted by attempt."""

    def __init__(self, client: Coordinator) -> None:
        self.call: Any = client.stub.Link()
        self.by_key: dict[tuple[str, int], list[agent_pb2.ExecuteResponse]] = {}
        self.refusals: dict[tuple[str, int], agent_pb2.LinkRefusal] = {}
        self.messages = 0

    async def send(self, *frames: agent_pb2.LinkFrame) -> None:
        await self.call.write(agent_pb2.LinkRequest(frames=frames))

    async def assign(self, task_id: str, capability: str = "wait", **kwargs: Any) -> None:
        request = assignment(capability, task_id=task_id, **kwargs)
        await self.send(
            agent_pb2.LinkFrame(
                task_id=task_id,
                attempt=request.assign.attempt,
                request=request,
                correlation_id="cid-link",
            )
        )

    async def read(self, *, timeout: float = 15.0) -> None:
        async with asyncio.timeout(timeout):
            message = await self.call.read()
        assert message is not grpc.aio.EOF, "link ended"
        self.messages += 1
        for response in message.responses:
            self.by_key.setdefault((response.task_id, response.attempt), []).append(response)
        for refusal in message.refusals:
            self.refusals[(refusal.task_id, refusal.attempt)] = refusal

    def kinds(self, task_id: str, attempt: int = 1) -> list[str]:
        return [str(m.WhichOneof("kind")) for m in self.by_key.get((task_id, attempt), [])]

    async def until(self, done: Any, *, timeout: float = 15.0) -> None:
        while not done():
            await self.read(timeout=timeout)

    def ended(self, task_id: str, attempt: int = 1) -> bool:
        kinds = self.kinds(task_id, attempt)
        return bool(kinds) and kinds[-1] in TERMINAL

    def last(self, task_id: str, attempt: int = 1) -> agent_pb2.ExecuteResponse:
        return self.by_key[(task_id, attempt)][-1]


async def start(link: Link, agent: GateAgent, *task_ids: str) -> None:
    """Assign ``task_ids`` (attempt 1) on ``link`` and wait until each handler runs."""
    for task_id in task_ids:
        await link.assign(task_id)
    for task_id in task_ids:
        await asyncio.wait_for(agent.has_started(task_id).wait(), 10)


def started_calls(method: str) -> float:
    return metrics.SERVER_STARTED.labels("bidi_stream", SERVICE, method)._value.get()


@pytest.fixture
async def agent() -> GateAgent:
    return GateAgent()


@pytest.fixture
async def served(pki: Pki, agent: GateAgent) -> AsyncIterator[AgentServer]:
    async with serve_in_process(agent, agent_settings(pki.dir)) as running:
        yield running


@pytest.fixture
async def client(pki: Pki, served: AgentServer) -> AsyncIterator[Coordinator]:
    coordinator = Coordinator(f"127.0.0.1:{served.port}", pki.files("coordinator"))
    try:
        yield coordinator
    finally:
        await coordinator.close()


async def test_many_attempts_share_one_link(client: Coordinator, agent: GateAgent) -> None:
    links, executes = started_calls("Link"), started_calls("Execute")
    link = Link(client)
    for task_id in ("a", "b", "c"):
        await link.assign(task_id)
    await link.until(lambda: all(k in link.by_key for k in (("a", 1), ("b", 1), ("c", 1))))
    for task_id in ("c", "a", "b"):  # out of order: each ends on its own
        agent.gate(task_id).set()
        await link.until(lambda t=task_id: link.ended(t))
    # A second round on the same stream.
    await link.assign("a", attempt=2)
    agent.gate("a").set()
    await link.until(lambda: link.ended("a", 2))

    for key in (("a", 1), ("b", 1), ("c", 1), ("a", 2)):
        kinds = link.kinds(*key)
        assert kinds == ["started", "progress", "result"], (key, kinds)
        assert [m.sequence for m in link.by_key[key]] == [1, 2, 3]
        assert link.by_key[key][-1].result.output.text == f"done {key[0]}"
    assert started_calls("Link") - links == 1
    assert started_calls("Execute") == executes
    # The frame's correlation id reached the handler when the assignment had its own.
    assert agent.correlation["a"] == "cid-test"
    link.call.cancel()


async def test_a_handler_that_ends_at_once_sends_started_and_result_in_one_message(
    client: Coordinator,
) -> None:
    # What a quick attempt says goes as one stream message (one write here, one read and
    # one commit at the coordinator), in order. It rests on the result being queued
    # within link._START_TURNS loop turns of started (three on CPython 3.11); a handler
    # that waits sends started on its own (test_many_attempts_share_one_link sees every
    # attempt's first messages while their gates are still shut).
    link = Link(client)
    await link.assign("q", capability="quick")
    await link.until(lambda: link.ended("q"))
    assert link.kinds("q") == ["started", "result"]
    assert link.messages == 1
    link.call.cancel()


async def test_cancel_one_attempt_leaves_the_others_running(
    client: Coordinator, agent: GateAgent, served: AgentServer
) -> None:
    link = Link(client)
    await start(link, agent, "x", "y")
    await link.send(
        agent_pb2.LinkFrame(
            task_id="x",
            attempt=1,
            request=agent_pb2.ExecuteRequest(cancel=agent_pb2.CancelExecution(reason="stop x")),
        )
    )
    await link.until(lambda: link.ended("x"))
    error = link.last("x").error.error
    assert (error.code, error.reason) == ("CANCELLED", "CANCELLED")
    assert "x" in agent.cancelled and "y" not in agent.cancelled
    assert served.runtime.in_flight == 1

    agent.gate("y").set()
    await link.until(lambda: link.ended("y"))
    assert link.last("y").result.output.text == "done y"
    link.call.cancel()


async def test_close_frame_stops_an_attempt_without_an_answer(
    client: Coordinator, agent: GateAgent, served: AgentServer
) -> None:
    link = Link(client)
    await start(link, agent, "quiet", "other")
    await link.send(agent_pb2.LinkFrame(task_id="quiet", attempt=1, close=True))
    await eventually(lambda: "quiet" in agent.cancelled, timeout=10)
    agent.gate("other").set()
    await link.until(lambda: link.ended("other"))
    assert not link.ended("quiet")
    assert served.runtime.in_flight == 0
    link.call.cancel()


async def test_a_broken_link_stops_every_attempt_on_it(
    client: Coordinator, agent: GateAgent, served: AgentServer
) -> None:
    link = Link(client)
    await start(link, agent, "p", "q")
    assert served.runtime.in_flight == 2
    link.call.cancel()
    await eventually(lambda: agent.cancelled == {"p", "q"}, timeout=10)
    await eventually(lambda: served.runtime.in_flight == 0, timeout=10)


async def test_half_close_stops_what_runs_and_ends_the_stream(
    client: Coordinator, agent: GateAgent, served: AgentServer
) -> None:
    link = Link(client)
    await start(link, agent, "h")
    await link.call.done_writing()
    async with asyncio.timeout(10):
        while (message := await link.call.read()) is not grpc.aio.EOF:
            assert all(r.WhichOneof("kind") not in TERMINAL for r in message.responses)
        assert await link.call.code() == grpc.StatusCode.OK
    assert "h" in agent.cancelled
    await eventually(lambda: served.runtime.in_flight == 0, timeout=10)


async def test_each_attempt_keeps_its_assignment_deadline(
    client: Coordinator, agent: GateAgent
) -> None:
    link = Link(client)
    await link.assign("late", deadline_in=0.3)
    await link.assign("fine")
    await link.until(lambda: link.ended("late"))
    error = link.last("late").error.error
    assert (error.code, error.reason) == ("DEADLINE_EXCEEDED", "DEADLINE_EXCEEDED")
    assert "late" in agent.cancelled
    agent.gate("fine").set()
    await link.until(lambda: link.ended("fine"))
    assert link.last("fine").WhichOneof("kind") == "result"
    link.call.cancel()


async def test_refusals_carry_what_execute_would_end_with(
    client: Coordinator, agent: GateAgent
) -> None:
    link = Link(client)
    await link.assign("nope", capability="missing")
    bad = assignment("wait", task_id="bad-deadline")
    bad.assign.deadline.nanos = 2_000_000_000  # not a valid timestamp
    await link.send(agent_pb2.LinkFrame(task_id="bad-deadline", attempt=1, request=bad))
    for task_id in ("f1", "f2", "f3", "f4"):  # max_concurrency 3: the fourth is refused
        await link.assign(task_id)
    await link.until(lambda: len(link.refusals) == 3)

    unknown = link.refusals[("nope", 1)].error
    assert (unknown.code, unknown.reason) == ("INVALID_ARGUMENT", "UNKNOWN_CAPABILITY")
    deadline = link.refusals[("bad-deadline", 1)].error
    assert (deadline.code, deadline.reason) == ("INVALID_ARGUMENT", "INVALID_ASSIGNMENT")
    full = link.refusals[("f4", 1)].error
    assert (full.code, full.reason, full.retryable) == (
        "RESOURCE_EXHAUSTED",
        "AGENT_OVERLOADED",
        True,
    )
    # The same refusal on an Execute call, for comparison.
    ex = client.execute()
    await ex.send(assignment("wait", task_id="f5"))
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await ex.next()
    domain = from_rpc_error(caught.value)
    assert (caught.value.code().name, domain.reason) == (full.code, full.reason)
    for task_id in ("f1", "f2", "f3"):
        agent.gate(task_id).set()
    await link.until(lambda: all(link.ended(t) for t in ("f1", "f2", "f3")))
    link.call.cancel()


async def test_input_for_an_attempt_never_assigned_is_refused(client: Coordinator) -> None:
    link = Link(client)
    await link.send(
        # A cancel for an unknown attempt is dropped (it crosses an attempt's end).
        agent_pb2.LinkFrame(
            task_id="ghost",
            attempt=1,
            request=agent_pb2.ExecuteRequest(cancel=agent_pb2.CancelExecution()),
        ),
        agent_pb2.LinkFrame(
            task_id="ghost",
            attempt=2,
            request=agent_pb2.ExecuteRequest(input=common_pb2.InputResponse(request_id="r")),
        ),
    )
    await link.until(lambda: bool(link.refusals))
    assert list(link.refusals) == [("ghost", 2)]
    error = link.refusals[("ghost", 2)].error
    assert (error.code, error.reason) == ("INVALID_ARGUMENT", "ASSIGNMENT_REQUIRED")
    link.call.cancel()


async def test_a_frame_without_an_attempt_key_ends_the_stream(
    client: Coordinator, agent: GateAgent, served: AgentServer
) -> None:
    link = Link(client)
    await start(link, agent, "dup")
    await link.send(agent_pb2.LinkFrame(attempt=1, close=True))
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await link.until(lambda: False)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert from_rpc_error(caught.value).reason == "LINK_FRAME_INVALID"
    assert "dup" in agent.cancelled
    await eventually(lambda: served.runtime.in_flight == 0, timeout=10)


async def test_a_second_assignment_of_a_running_attempt_is_refused_alone(
    client: Coordinator, agent: GateAgent, served: AgentServer
) -> None:
    link = Link(client)
    await start(link, agent, "dup", "bystander")
    await link.send(
        agent_pb2.LinkFrame(task_id="dup", attempt=1, request=assignment("wait", task_id="dup"))
    )
    await link.until(lambda: ("dup", 1) in link.refusals)
    error = link.refusals[("dup", 1)].error
    assert (error.code, error.reason) == ("ABORTED", "ATTEMPT_ALREADY_RUNNING")
    # The link and both running attempts go on.
    assert not agent.cancelled
    assert served.runtime.in_flight == 2
    for task_id in ("dup", "bystander"):
        agent.gate(task_id).set()
        await link.until(lambda task_id=task_id: link.ended(task_id))
        assert link.last(task_id).result.output.text == f"done {task_id}"
    link.call.cancel()


async def test_only_the_coordinator_may_link(pki: Pki, served: AgentServer) -> None:
    other = Coordinator(f"127.0.0.1:{served.port}", pki.files("client"))
    try:
        link = Link(other)
        await link.assign("t")
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await link.read()
        assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
    finally:
        await other.close()


@pytest.mark.parametrize(
    ("role", "allowed"), [("coordinator", True), ("client", False), ("agent", False)]
)
def test_the_shipped_policy_allows_link_to_whoever_may_execute(role: str, allowed: bool) -> None:
    caller = f"spiffe://hivewire.local/{role}/x"
    for method in ("Execute", "Link"):
        assert DEFAULT_POLICY.allows(caller, f"/{SERVICE}/{method}") is allowed


async def test_shutdown_ends_the_link_once_its_attempts_have(pki: Pki, agent: GateAgent) -> None:
    # A grace period far longer than the test's timeout: the link must end by itself.
    settings = agent_settings(pki.dir).model_copy(update={"grace_period": 600.0})
    async with serve_in_process(agent, settings) as running:
        client = Coordinator(f"127.0.0.1:{running.port}", pki.files("coordinator"))
        try:
            link = Link(client)
            await start(link, agent, "last")
            stopping = asyncio.create_task(running.server.stop())
            assert running.servicer is not None
            servicer = running.servicer
            await eventually(lambda: servicer.draining, timeout=10)
            await link.assign("late")
            await link.until(lambda: ("late", 1) in link.refusals)
            refused = link.refusals[("late", 1)].error
            assert (refused.code, refused.reason, refused.retryable) == (
                "UNAVAILABLE",
                "AGENT_SHUTTING_DOWN",
                True,
            )
            agent.gate("last").set()
            await link.until(lambda: link.ended("last"))
            assert link.last("last").result.output.text == "done last"
            async with asyncio.timeout(15):
                assert await link.call.read() is grpc.aio.EOF
                assert await link.call.code() == grpc.StatusCode.OK
                await stopping
        finally:
            await client.close()


async def test_an_attempt_closed_in_the_message_that_assigned_it_frees_its_slot(
    client: Coordinator, agent: GateAgent, served: AgentServer
) -> None:
    # The coordinator batches what piled up during its last write: an attempt cancelled
    # right after it was assigned arrives as [assign, close] in one message.
    link = Link(client)
    request = assignment("wait", task_id="brief")
    await link.send(
        agent_pb2.LinkFrame(task_id="brief", attempt=1, request=request),
        agent_pb2.LinkFrame(task_id="brief", attempt=1, close=True),
    )
    # The link goes on: another attempt runs to its end.
    await start(link, agent, "after")
    agent.gate("after").set()
    await link.until(lambda: link.ended("after"))
    await eventually(lambda: served.runtime.in_flight == 0, timeout=10)
    link.call.cancel()


async def test_a_link_that_breaks_right_after_assigning_frees_the_slots(
    client: Coordinator, agent: GateAgent, served: AgentServer
) -> None:
    link = Link(client)
    await link.send(
        agent_pb2.LinkFrame(task_id="x", attempt=1, request=assignment("wait", task_id="x")),
        agent_pb2.LinkFrame(task_id="x", attempt=0),  # breaks the protocol: the link ends
    )
    with pytest.raises(grpc.aio.AioRpcError):
        while await link.call.read() is not grpc.aio.EOF:
            pass
    await eventually(lambda: served.runtime.in_flight == 0, timeout=10)
