"""The agent runtime over real gRPC and mTLS, driven by a coordinator-side client."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import grpc
import pytest

from hivewire.agent.v1 import agent_pb2
from hivewire.common.v1 import common_pb2
from hivewire.services.agent import (
    Agent,
    Payload,
    PermanentError,
    RetryableError,
    TaskContext,
    capability,
)
from hivewire.services.agent.serve import AgentServer
from hivewire.services.runtime.errors import (
    InvalidArgument,
    PermissionDenied,
    ResourceExhausted,
)
from hivewire.services.runtime.status import from_rpc_error
from tests.conftest import Pki
from tests.helpers import eventually
from tests.integration.test_agent_helpers import (
    Coordinator,
    agent_settings,
    assignment,
    serve_in_process,
)


class ProbeAgent(Agent):
    """An agent whose capabilities exercise every path of the runtime."""

    name = "probe"
    version = "1.2.3"
    description = "Test probe."
    max_concurrency = 2
    labels = {"purpose": "tests"}

    def __init__(self) -> None:
        self.started = asyncio.Event()
        self.cancelled = asyncio.Event()
        self.contexts: list[TaskContext] = []

    @capability(
        "steps",
        description="Reports progress, streams two chunks, echoes.",
        input="text",
        output="json with the echoed text",
        input_schema={"type": "object"},
    )
    async def steps(self, task: Payload, ctx: TaskContext) -> dict[str, Any]:
        await ctx.progress(0.25, "first", "starting")
        await ctx.partial("hel")
        await ctx.partial("lo", last_chunk=True)
        await ctx.progress(1.0, "done")
        return {"echo": task.text, "json": dict(task.json or {})}

    @capability
    async def block(self, task: Payload, ctx: TaskContext) -> str:
        """Waits until cancelled."""
        self.started.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            self.cancelled.set()
            raise
        return "never"

    @capability("ask")
    async def ask(self, task: Payload, ctx: TaskContext) -> str:
        answer = await ctx.request_input("What is your name?", schema={"type": "string"})
        return f"hello {answer.text}"

    @capability("boom")
    async def boom(self, task: Payload, ctx: TaskContext) -> str:
        raise ValueError("kaput")

    @capability("flaky")
    async def flaky(self, task: Payload, ctx: TaskContext) -> str:
        raise RetryableError("UPSTREAM_BUSY", "the upstream is busy")

    @capability("refuse")
    async def refuse(self, task: Payload, ctx: TaskContext) -> str:
        raise PermanentError("UNSUPPORTED_INPUT", "cannot do that", metadata={"why": "test"})

    @capability("odd-output")
    async def odd_output(self, task: Payload, ctx: TaskContext) -> Any:
        return 42

    @capability("info")
    async def info(self, task: Payload, ctx: TaskContext) -> dict[str, Any]:
        self.contexts.append(ctx)
        return {
            "task_id": ctx.task_id,
            "attempt": ctx.attempt,
            "correlation_id": ctx.correlation_id,
            "capability": ctx.capability,
            "has_deadline": ctx.deadline is not None,
            "remaining_positive": (ctx.time_remaining() or 0) > 0,
            "user": ctx.info.user_id,
            "tokens_remaining": ctx.tokens_remaining(),
        }


@pytest.fixture
async def probe() -> ProbeAgent:
    return ProbeAgent()


@pytest.fixture
async def served(pki: Pki, probe: ProbeAgent) -> AsyncIterator[AgentServer]:
    async with serve_in_process(probe, agent_settings(pki.dir)) as running:
        yield running


@pytest.fixture
async def coordinator(pki: Pki, served: AgentServer) -> AsyncIterator[Coordinator]:
    client = Coordinator(f"127.0.0.1:{served.port}", pki.files("coordinator"))
    try:
        yield client
    finally:
        await client.close()


async def test_events_arrive_in_order_and_end_with_result(coordinator: Coordinator) -> None:
    ex = coordinator.execute()
    await ex.send(assignment("steps", text="hi", json={"k": "v"}, task_id="t-steps"))
    final = await ex.finish()

    # The two chunks were queued back to back: they may travel as one (coalesced).
    kinds = ex.kinds()
    assert [k for k in kinds if k != "partial"] == ["started", "progress", "progress", "result"]
    assert kinds[2] == "partial" and kinds[-2:] == ["progress", "result"]
    assert [m.sequence for m in ex.received] == list(range(1, len(kinds) + 1))
    assert {m.task_id for m in ex.received} == {"t-steps"}
    started = ex.received[0].started
    assert started.agent_name == "probe" and started.agent_id.startswith("probe-")
    assert ex.received[1].progress.fraction == 0.25 and ex.received[1].progress.step == "first"
    partials = [m.partial for m in ex.received if m.WhichOneof("kind") == "partial"]
    assert "".join(p.content.text for p in partials) == "hello"
    assert all(p.append and p.artifact_id == "output" for p in partials)
    assert [p.last_chunk for p in partials] == [False] * (len(partials) - 1) + [True]
    output = final.result.output.json
    assert output["echo"] == "hi" and output["json"] == {"k": "v"}
    assert final.result.usage.HasField("total_time")


async def test_cancel_reaches_the_handler_and_ends_cancelled(
    coordinator: Coordinator, probe: ProbeAgent, served: AgentServer
) -> None:
    ex = coordinator.execute()
    await ex.send(assignment("block"))
    await ex.until("started")
    await asyncio.wait_for(probe.started.wait(), 10)
    await ex.cancel("user asked")
    final = await ex.finish(timeout=5)

    assert final.WhichOneof("kind") == "error"
    assert final.error.error.reason == "CANCELLED"
    assert final.error.error.code == "CANCELLED"
    assert "user asked" in final.error.error.message
    assert not final.error.error.retryable
    assert probe.cancelled.is_set()
    assert served.runtime.in_flight == 0


async def test_broken_stream_cancels_the_handler(
    coordinator: Coordinator, probe: ProbeAgent, served: AgentServer
) -> None:
    ex = coordinator.execute()
    await ex.send(assignment("block"))
    await ex.until("started")
    await asyncio.wait_for(probe.started.wait(), 10)
    assert served.runtime.in_flight == 1
    ex.call.cancel()

    await asyncio.wait_for(probe.cancelled.wait(), 10)
    await eventually(lambda: served.runtime.in_flight == 0, timeout=10)


async def test_request_input_round_trip(coordinator: Coordinator) -> None:
    ex = coordinator.execute()
    await ex.send(assignment("ask"))
    asked = (await ex.until("input_required")).input_required
    assert asked.kind == common_pb2.INPUT_KIND_TEXT
    assert asked.prompt == "What is your name?"
    assert asked.schema["type"] == "string"
    assert asked.request_id

    await ex.answer("not-the-right-id", text="Mallory")  # ignored: unknown request
    await ex.answer(asked.request_id, text="Ada")
    final = await ex.finish()
    assert final.result.output.text == "hello Ada"


async def test_exception_becomes_permanent_failure(coordinator: Coordinator) -> None:
    ex = coordinator.execute()
    await ex.send(assignment("boom"))
    final = await ex.finish()
    error = final.error.error
    assert (error.reason, error.retryable) == ("HANDLER_FAILED", False)
    assert "kaput" in error.message and "ValueError" in error.message
    assert error.metadata["exception_type"] == "ValueError"


async def test_retryable_and_permanent_errors_keep_their_class(coordinator: Coordinator) -> None:
    flaky = coordinator.execute()
    await flaky.send(assignment("flaky"))
    error = (await flaky.finish()).error.error
    assert (error.reason, error.retryable, error.code) == ("UPSTREAM_BUSY", True, "UNAVAILABLE")
    assert error.message == "the upstream is busy"

    refuse = coordinator.execute()
    await refuse.send(assignment("refuse"))
    error = (await refuse.finish()).error.error
    assert (error.reason, error.retryable) == ("UNSUPPORTED_INPUT", False)
    assert error.metadata["why"] == "test"


async def test_unsupported_return_value_is_a_permanent_failure(coordinator: Coordinator) -> None:
    ex = coordinator.execute()
    await ex.send(assignment("odd-output"))
    error = (await ex.finish()).error.error
    assert error.reason == "HANDLER_FAILED" and "TypeError" in error.message


async def test_deadline_cancels_the_handler(coordinator: Coordinator, probe: ProbeAgent) -> None:
    ex = coordinator.execute()
    await ex.send(assignment("block", deadline_in=0.5))
    final = await ex.finish(timeout=10)
    error = final.error.error
    assert (error.reason, error.code, error.retryable) == (
        "DEADLINE_EXCEEDED",
        "DEADLINE_EXCEEDED",
        False,
    )
    assert probe.cancelled.is_set()


async def test_past_deadline_fails_without_running_long(coordinator: Coordinator) -> None:
    ex = coordinator.execute()
    await ex.send(assignment("block", deadline_in=-5))
    final = await ex.finish()
    assert final.error.error.reason == "DEADLINE_EXCEEDED"


async def test_context_carries_the_assignment(coordinator: Coordinator, probe: ProbeAgent) -> None:
    ex = coordinator.execute()
    await ex.send(
        assignment(
            "info",
            task_id="t-info",
            attempt=3,
            correlation_id="cid-42",
            token_budget=100,
            tokens_used=30,
        )
    )
    output = (await ex.finish()).result.output.json
    assert output == {
        "task_id": "t-info",
        "attempt": 3.0,
        "correlation_id": "cid-42",
        "capability": "info",
        "has_deadline": True,
        "remaining_positive": True,
        "user": "tester",
        "tokens_remaining": 70.0,
    }
    assert probe.contexts[0].deadline is not None
    assert probe.contexts[0].deadline > datetime.now(UTC)


async def test_over_max_concurrency_is_resource_exhausted(
    coordinator: Coordinator, probe: ProbeAgent, served: AgentServer
) -> None:
    running = [coordinator.execute() for _ in range(2)]
    for ex in running:
        await ex.send(assignment("block"))
        await ex.until("started")
    assert served.runtime.in_flight == 2

    third = coordinator.execute()
    await third.send(assignment("steps"))
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await third.next()
    err = from_rpc_error(caught.value)
    assert isinstance(err, ResourceExhausted)
    assert err.reason == "AGENT_OVERLOADED" and err.retry_after is not None

    for ex in running:
        await ex.cancel()
        assert (await ex.finish()).error.error.reason == "CANCELLED"
    # A slot is free again: the next task runs.
    again = coordinator.execute()
    await again.send(assignment("steps"))
    assert (await again.finish()).WhichOneof("kind") == "result"


async def test_first_message_must_be_an_assignment(coordinator: Coordinator) -> None:
    ex = coordinator.execute()
    await ex.cancel()
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await ex.next()
    err = from_rpc_error(caught.value)
    assert isinstance(err, InvalidArgument) and err.reason == "ASSIGNMENT_REQUIRED"
    assert [v.field for v in err.violations] == ["assign"]


async def test_unknown_capability_is_invalid_argument(coordinator: Coordinator) -> None:
    ex = coordinator.execute()
    await ex.send(assignment("translate"))
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await ex.next()
    err = from_rpc_error(caught.value)
    assert isinstance(err, InvalidArgument) and err.reason == "UNKNOWN_CAPABILITY"
    assert err.violations[0].field == "assign.capability"


async def test_missing_task_id_is_invalid_argument(coordinator: Coordinator) -> None:
    ex = coordinator.execute()
    request = assignment("steps")
    request.assign.task_id = ""
    await ex.send(request)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await ex.next()
    err = from_rpc_error(caught.value)
    assert isinstance(err, InvalidArgument)
    assert [v.field for v in err.violations] == ["assign.task_id"]


@pytest.mark.parametrize("stem", ["client", "agent-summarizer", "admin"])
async def test_only_the_coordinator_may_execute(
    pki: Pki, served: AgentServer, probe: ProbeAgent, stem: str
) -> None:
    other = Coordinator(f"127.0.0.1:{served.port}", pki.files(stem))
    try:
        ex = other.execute()
        await ex.send(assignment("block"))
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await ex.next()
        assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
        err = from_rpc_error(caught.value)
        assert isinstance(err, PermissionDenied) and err.reason == "CALLER_NOT_ALLOWED"
        assert not probe.started.is_set()
        if stem == "admin":
            # Admins pass the mesh's authz policy; the agent's own check refused Execute.
            assert (await other.describe()).card.name == "probe"
        else:
            # The mesh's authz policy lets only the coordinator (and admins) call agents.
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await other.describe()
            assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
    finally:
        await other.close()


async def test_allowed_callers_is_a_setting(pki: Pki, tmp_path: Path) -> None:
    agent = ProbeAgent()
    # The mesh's authz policy lets both through; the agent's own setting decides.
    authz = tmp_path / "authz.toml"
    authz.write_text(
        '[[rules]]\ncallers = ["client/*", "coordinator/*"]\n'
        'allow = ["hivewire.agent.v1.AgentService/*"]\n',
        encoding="utf-8",
    )
    settings = agent_settings(
        pki.dir, allowed_callers=["spiffe://hivewire.local/client/*"]
    ).model_copy(update={"authz_policy_file": authz})
    async with serve_in_process(agent, settings) as running:
        for stem, allowed in (("client", True), ("coordinator", False)):
            client = Coordinator(f"127.0.0.1:{running.port}", pki.files(stem))
            try:
                ex = client.execute()
                await ex.send(assignment("steps"))
                if allowed:
                    assert (await ex.finish()).WhichOneof("kind") == "result"
                else:
                    with pytest.raises(grpc.aio.AioRpcError) as caught:
                        await ex.next()
                    assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
            finally:
                await client.close()


async def test_describe_returns_the_card_and_in_flight(
    coordinator: Coordinator, probe: ProbeAgent, served: AgentServer
) -> None:
    described = await coordinator.describe()
    card = described.card
    assert (card.name, card.version, card.description) == ("probe", "1.2.3", "Test probe.")
    assert card.max_concurrency == 2
    assert dict(card.labels) == {"purpose": "tests"}
    caps = {c.name: c for c in card.capabilities}
    assert set(caps) == {"steps", "block", "ask", "boom", "flaky", "refuse", "odd-output", "info"}
    assert caps["steps"].description == "Reports progress, streams two chunks, echoes."
    assert caps["steps"].input_description == "text"
    assert caps["steps"].output_description == "json with the echoed text"
    assert caps["steps"].input_schema["type"] == "object"
    assert caps["block"].description == "Waits until cancelled."
    assert described.agent_id == served.runtime.agent_id
    assert described.in_flight == 0

    ex = coordinator.execute()
    await ex.send(assignment("block"))
    await ex.until("started")
    assert (await coordinator.describe()).in_flight == 1
    await ex.cancel()
    await ex.finish()
    assert (await coordinator.describe()).in_flight == 0


async def test_max_concurrency_setting_overrides_the_class(pki: Pki) -> None:
    async with serve_in_process(
        ProbeAgent(), agent_settings(pki.dir, max_concurrency=7, name="probe-b")
    ) as running:
        client = Coordinator(f"127.0.0.1:{running.port}", pki.files("coordinator"))
        try:
            card = (await client.describe()).card
            assert (card.max_concurrency, card.name) == (7, "probe-b")
        finally:
            await client.close()


async def test_grpcurl_lists_and_describes_the_agent(
    pki: Pki, served: AgentServer, grpcurl: Any
) -> None:
    address = f"127.0.0.1:{served.port}"
    listed = await grpcurl("list", tls=pki.files("coordinator"), address=address)
    assert listed.returncode == 0, listed
    assert "hivewire.agent.v1.AgentService" in listed.stdout
    described = await grpcurl(
        "hivewire.agent.v1.AgentService/Describe",
        tls=pki.files("coordinator"),
        address=address,
        input="{}",
    )
    assert described.returncode == 0, described
    assert described.json()["card"]["name"] == "probe"
    health = await grpcurl(
        "grpc.health.v1.Health/Check",
        tls=pki.files("coordinator"),
        address=address,
        input='{"service": "hivewire.agent.v1.AgentService"}',
    )
    assert health.json()["status"] == "SERVING"


async def test_no_client_certificate_is_refused(
    pki: Pki, served: AgentServer, grpcurl: Any
) -> None:
    result = await grpcurl("list", tls=None, address=f"127.0.0.1:{served.port}")
    assert result.returncode != 0


def test_describe_request_has_no_fields() -> None:
    # The servicer ignores the request; guard against a contract change going unnoticed.
    assert agent_pb2.DescribeRequest.DESCRIPTOR.fields == []


class StubbornAgent(Agent):
    """A handler that swallows its cancellation until released."""

    name = "stubborn"
    max_concurrency = 1

    def __init__(self) -> None:
        self.started = asyncio.Event()
        self.release = asyncio.Event()
        self.ignored = 0

    @capability
    async def hold(self, task: Payload, ctx: TaskContext) -> str:
        """Ignores cancellation."""
        self.started.set()
        while True:
            try:
                await self.release.wait()
                return "released"
            except asyncio.CancelledError:
                self.ignored += 1


async def test_a_handler_ignoring_cancel_is_reported_ended_but_keeps_its_slot(pki: Pki) -> None:
    agent = StubbornAgent()
    async with serve_in_process(agent, agent_settings(pki.dir, cancel_grace=0.1)) as running:
        client = Coordinator(f"127.0.0.1:{running.port}", pki.files("coordinator"))
        try:
            ex = client.execute()
            await ex.send(assignment("hold"))
            await ex.until("started")
            await asyncio.wait_for(agent.started.wait(), 10)
            await ex.cancel()
            assert (await ex.finish()).error.error.reason == "CANCELLED"
            assert agent.ignored >= 1
            # The handler still runs, so its slot is still taken.
            assert (await client.describe()).in_flight == 1
            refused = client.execute()
            await refused.send(assignment("hold"))
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await refused.next()
            assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            agent.release.set()
            await eventually(lambda: running.runtime.in_flight == 0, timeout=10)
        finally:
            agent.release.set()
            await client.close()
