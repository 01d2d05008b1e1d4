"""An attempt's trace on the coordinator and the agent, with spans exported and without.

With an exporter (here: this test process's collector) an attempt on a ``Link`` gets
its SERVER span (a child of the context its frame carried) and its handler a span
under it; the handler's model and tool calls are children of that. Without one
(``tracing.spans_kept()`` false) none of these spans is made, nor the coordinator's
attempt and CLIENT spans, nor the calls' CLIENT spans: the carried context is current
instead, so the handler's downstream calls still carry the task's ``traceparent`` and
its log lines the task's trace id. Real agent, real model and tool
servicers (recording what each call carried), real mTLS.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import Any

import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from hivewire.agent.v1 import agent_pb2
from hivewire.common.v1 import common_pb2
from hivewire.services.agent import Agent, Payload, TaskContext, capability
from hivewire.services.agent.link import EXECUTE_METHOD
from hivewire.services.agent.serve import AgentServer
from hivewire.services.coordinator.link import open_stream
from hivewire.services.runtime import metadata as md
from hivewire.services.runtime import tracing
from hivewire.services.runtime.logging import ContextFilter
from tests.conftest import Pki
from tests.integration.test_agent_clients import RecordingModel, RecordingTools, serve_downstream
from tests.integration.test_agent_helpers import (
    Coordinator,
    agent_settings,
    assignment,
    serve_in_process,
)
from tests.integration.test_agent_link import Link
from tests.integration.test_coordinator_link import lease_on

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_ID = "00f067aa0ba902b7"
TRACEPARENT = f"00-{TRACE_ID}-{PARENT_ID}-01"
TRACESTATE = "vendor=x"
GENERATE = "/hivewire.model.v1.ModelService/Generate"


class CallingAgent(Agent):
    """A handler that logs, asks the model and calls a tool."""

    name = "calling"
    max_concurrency = 4

    def __init__(self) -> None:
        self.log_ids: dict[str, tuple[str | None, str | None]] = {}

    @capability("call")
    async def call(self, task: Payload, ctx: TaskContext) -> str:
        # What a log line of the handler carries (the filter every handler installs).
        record = logging.LogRecord("handler", logging.INFO, __file__, 0, "working", None, None)
        ContextFilter().filter(record)
        self.log_ids[ctx.task_id] = (record.__dict__["trace_id"], record.__dict__["span_id"])
        await ctx.model.generate(task.text, model="echo", max_tokens=4)
        await ctx.tools.invoke("adder", {"a": 1, "b": 2})
        return "called"


class Mesh:
    """The agent, its recording model and tools, and a coordinator's client."""

    def __init__(
        self,
        agent: CallingAgent,
        model: RecordingModel,
        tools: RecordingTools,
        served: AgentServer,
        client: Coordinator,
    ) -> None:
        self.agent, self.model, self.tools = agent, model, tools
        self.served, self.client = served, client

    def downstream_traceparents(self) -> list[str]:
        """The ``traceparent`` each model and tool call carried (model calls first)."""
        calls = [*self.model.calls, *self.tools.calls]
        return [c.metadata.get("traceparent", "") for c in calls]


@pytest.fixture
async def mesh(pki: Pki) -> AsyncIterator[Mesh]:
    agent = CallingAgent()
    async with serve_downstream(pki) as (address, model, tools):
        settings = agent_settings(pki.dir, model_address=address, tool_address=address)
        async with serve_in_process(agent, settings) as served:
            client = Coordinator(f"127.0.0.1:{served.port}", pki.files("coordinator"))
            try:
                yield Mesh(agent, model, tools, served, client)
            finally:
                await client.close()


async def run_on_link(mesh: Mesh, task_id: str, *, traceparent: str, tracestate: str = "") -> None:
    """One attempt of ``call`` on a Link whose frame carries ``traceparent``; to its result."""
    link = Link(mesh.client)
    request = assignment("call", text="hi", task_id=task_id)
    await link.send(
        agent_pb2.LinkFrame(
            task_id=task_id,
            attempt=1,
            request=request,
            traceparent=traceparent,
            tracestate=tracestate,
        )
    )
    await link.until(lambda: link.ended(task_id))
    assert link.kinds(task_id)[-1] == "result"
    assert link.last(task_id).result.output.text == "called"
    link.call.cancel()


def parent_ids(traceparents: list[str]) -> set[str]:
    """The parent span ids ``traceparents`` name."""
    return {tp.split("-")[2] for tp in traceparents}


def spans_named(spans: InMemorySpanExporter, name: str, kind: SpanKind | None = None) -> list[Any]:
    return [
        s for s in spans.get_finished_spans() if s.name == name and (kind is None or s.kind is kind)
    ]


@pytest.mark.parametrize("kept", [True, False], ids=["exported", "not-exported"])
async def test_an_attempt_on_a_link_joins_the_task_trace_with_or_without_its_spans(
    mesh: Mesh, spans: InMemorySpanExporter, monkeypatch: pytest.MonkeyPatch, kept: bool
) -> None:
    monkeypatch.setattr(tracing, "spans_kept", lambda: kept)
    await run_on_link(mesh, "t-link", traceparent=TRACEPARENT, tracestate=TRACESTATE)

    # The handler's model and tool calls carry the task's trace either way.
    traceparents = mesh.downstream_traceparents()
    assert len(traceparents) == 2
    assert all(tp.split("-")[1] == TRACE_ID for tp in traceparents), traceparents
    trace_id, span_id = mesh.agent.log_ids["t-link"]
    assert trace_id == TRACE_ID
    served_spans = spans_named(spans, GENERATE, SpanKind.SERVER)
    calls = spans_named(spans, GENERATE, SpanKind.CLIENT)
    servers = spans_named(spans, EXECUTE_METHOD, SpanKind.SERVER)
    handlers = spans_named(spans, "handle call")
    if kept:
        # The attempt's SERVER span under the frame's context, the handler's under it,
        # the model call under that; log lines carry the handler's span.
        (server,) = servers
        (handler,) = handlers
        assert server.parent is not None and f"{server.parent.span_id:016x}" == PARENT_ID
        assert server.context.trace_state.to_header() == TRACESTATE
        assert server.attributes is not None and server.attributes["hivewire.task_id"] == "t-link"
        assert handler.parent is not None and handler.parent.span_id == server.context.span_id
        (call,) = calls
        assert call.parent is not None and call.parent.span_id == handler.context.span_id
        # The model service continues the trace it was given.
        (served,) = served_spans
        assert served.context.trace_id == int(TRACE_ID, 16) and served.parent is not None
        assert served.parent.span_id == call.context.span_id
        assert span_id == f"{handler.context.span_id:016x}"
    else:
        # No span of the attempt, of its calls nor of the services it calls: the
        # carried context goes on as it came, to the model and tool services (whose
        # handlers run in it) and into the log lines.
        assert servers == handlers == calls == served_spans == []
        assert parent_ids(traceparents) == {PARENT_ID}
        assert mesh.model.calls[0].metadata.get("tracestate") == TRACESTATE
        assert mesh.model.contexts == [(TRACE_ID, PARENT_ID)]
        assert span_id == PARENT_ID


async def test_an_attempt_without_a_trace_still_gets_one_when_spans_are_not_kept(
    mesh: Mesh, spans: InMemorySpanExporter, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A frame without traceparent started a new trace (its server span the root): the
    # attempt still has a trace id of its own for its calls and its log lines.
    monkeypatch.setattr(tracing, "spans_kept", lambda: False)
    await run_on_link(mesh, "t-first", traceparent="")
    await run_on_link(mesh, "t-second", traceparent="not-a-traceparent")
    first, second = (mesh.agent.log_ids[t][0] for t in ("t-first", "t-second"))
    assert first and second and first != second and TRACE_ID not in (first, second)
    carried = mesh.downstream_traceparents()
    assert len(carried) == 4
    assert {tp.split("-")[1] for tp in carried} == {first, second}, carried
    assert spans_named(spans, EXECUTE_METHOD, SpanKind.SERVER) == []


@pytest.mark.parametrize("kept", [True, False], ids=["exported", "not-exported"])
async def test_an_execute_call_has_a_handler_span_only_while_spans_are_kept(
    mesh: Mesh, spans: InMemorySpanExporter, monkeypatch: pytest.MonkeyPatch, kept: bool
) -> None:
    monkeypatch.setattr(tracing, "spans_kept", lambda: kept)
    with tracing.tracer.start_as_current_span("coordinator attempt") as root:
        execution = mesh.client.execute()
        await execution.send(assignment("call", text="hi", task_id="t-execute"))
        final = await execution.finish()
    assert final.result.output.text == "called"
    trace_id = f"{root.get_span_context().trace_id:032x}"
    traceparents = mesh.downstream_traceparents()
    assert len(traceparents) == 2
    assert all(tp.split("-")[1] == trace_id for tp in traceparents), traceparents
    assert mesh.agent.log_ids["t-execute"][0] == trace_id
    servers = spans_named(spans, EXECUTE_METHOD, SpanKind.SERVER)
    calls = spans_named(spans, GENERATE, SpanKind.CLIENT)
    handlers = spans_named(spans, "handle call")
    if kept:
        (server,), (handler,), (call,) = servers, handlers, calls
        assert handler.parent is not None and handler.parent.span_id == server.context.span_id
        assert call.parent is not None and call.parent.span_id == handler.context.span_id
    else:
        # No SERVER span either: the caller's span is the calls' parent.
        assert servers == handlers == calls == []
        root_id = f"{root.get_span_context().span_id:016x}"
        assert parent_ids(traceparents) == {root_id}
        assert mesh.agent.log_ids["t-execute"] == (trace_id, root_id)


@pytest.mark.parametrize("kept", [True, False], ids=["exported", "not-exported"])
async def test_the_coordinators_attempt_on_a_link_keeps_the_task_trace(
    mesh: Mesh,
    pki: Pki,
    spans: InMemorySpanExporter,
    monkeypatch: pytest.MonkeyPatch,
    kept: bool,
) -> None:
    # The coordinator's side as it runs an attempt: the task's stored context resumed
    # with the attempt's span, the attempt's stream opened on the agent's link.
    monkeypatch.setattr(tracing, "spans_kept", lambda: kept)
    stored = common_pb2.RequestMetadata(traceparent=TRACEPARENT, tracestate=TRACESTATE)
    metadata = [(md.TASK_ID, "t-coord"), (md.ATTEMPT, "1"), (md.CORRELATION_ID, "cid-coord")]
    async with lease_on(pki, mesh.served) as lease:
        with tracing.resumed(stored, "attempt call"):
            stream = open_stream(lease, timeout=10, metadata=metadata, link=True)
            await stream.send(assignment("call", text="hi", task_id="t-coord"))
            while (message := await stream.receive()) is not None:
                if message.WhichOneof("kind") == "result":
                    break
            stream.cancel()
    assert message is not None and message.result.output.text == "called"

    traceparents = mesh.downstream_traceparents()
    assert len(traceparents) == 2
    assert all(tp.split("-")[1] == TRACE_ID for tp in traceparents), traceparents
    assert mesh.agent.log_ids["t-coord"][0] == TRACE_ID
    calls = spans_named(spans, GENERATE, SpanKind.CLIENT)
    attempts = spans_named(spans, "attempt call")
    clients = spans_named(spans, EXECUTE_METHOD, SpanKind.CLIENT)
    servers = spans_named(spans, EXECUTE_METHOD, SpanKind.SERVER)
    handlers = spans_named(spans, "handle call")
    if kept:
        # The whole chain: stored context -> attempt -> CLIENT -> SERVER -> handler -> call.
        (attempt,), (client,), (server,), (handler,) = attempts, clients, servers, handlers
        (call,) = calls
        assert attempt.parent is not None and f"{attempt.parent.span_id:016x}" == PARENT_ID
        for child, parent in (
            (client, attempt),
            (server, client),
            (handler, server),
            (call, handler),
        ):
            assert child.parent is not None and child.parent.span_id == parent.context.span_id
            assert child.context.trace_id == int(TRACE_ID, 16)
    else:
        # None of the attempt's spans: the stored context goes on to the agent's calls.
        assert attempts == clients == servers == handlers == calls == []
        assert parent_ids(traceparents) == {PARENT_ID}
        assert mesh.model.calls[0].metadata.get("tracestate") == TRACESTATE
