"""ctx.model and ctx.tools over real mTLS gRPC: deadline, ids, budget, activities, usage, approvals.

The model and tool services here are small recording servicers on a real ServiceServer,
so the test can see exactly what metadata and fields every downstream call carried.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import AsyncIterator
from typing import Any

import pytest

from hivewire.common.v1 import common_pb2
from hivewire.model.v1 import model_pb2, model_pb2_grpc
from hivewire.services.agent import Agent, Payload, TaskContext, capability
from hivewire.services.agent.sdk import Sampling
from hivewire.services.agent.serve import AgentServer
from hivewire.services.runtime import tracing
from hivewire.services.runtime.config import load_settings
from hivewire.services.runtime.errors import Unavailable
from hivewire.services.runtime.server import ServiceBinding, ServiceServer
from hivewire.tool.v1 import tool_pb2, tool_pb2_grpc
from tests.conftest import Pki
from tests.integration.test_agent_helpers import (
    Coordinator,
    agent_settings,
    assignment,
    serve_in_process,
)

DIGEST = "d1g35t"


@dataclasses.dataclass
class Seen:
    """One downstream call as the service saw it."""

    method: str
    metadata: dict[str, str]
    time_remaining: float | None
    request: Any


class RecordingModel(model_pb2_grpc.ModelServiceServicer):
    def __init__(self) -> None:
        self.calls: list[Seen] = []
        self.contexts: list[tuple[str, str] | None] = []
        """The (trace id, span id) each call's handler ran in."""

    def _record(self, method: str, request: Any, context: Any) -> None:
        meta = {k: v for k, v in context.invocation_metadata() if isinstance(v, str)}
        self.calls.append(Seen(method, meta, context.time_remaining(), request))
        self.contexts.append(tracing.current_ids())

    async def _reply(self, prompt: str) -> AsyncIterator[Any]:
        if prompt == "fail":
            raise Unavailable("backend is down", retry_after=1.0, reason="BACKEND_DOWN")
        for seq, text in enumerate(("Hel", "lo", "!"), start=1):
            yield seq, model_pb2.TokenChunk(text=text), None
        usage = common_pb2.Usage(prompt_tokens=5, completion_tokens=3, total_tokens=8)
        yield (
            4,
            None,
            model_pb2.Completion(
                finish_reason=model_pb2.FINISH_REASON_STOP,
                usage=usage,
                model="echo-1",
                backend="test",
            ),
        )

    async def Generate(self, request: Any, context: Any) -> AsyncIterator[Any]:
        self._record("Generate", request, context)
        async for seq, chunk, done in self._reply(request.prompt):
            if chunk is not None:
                yield model_pb2.GenerateResponse(sequence=seq, chunk=chunk)
            else:
                yield model_pb2.GenerateResponse(sequence=seq, done=done)

    async def Chat(self, request: Any, context: Any) -> AsyncIterator[Any]:
        self._record("Chat", request, context)
        async for seq, chunk, done in self._reply(request.messages[-1].content):
            if chunk is not None:
                yield model_pb2.ChatResponse(sequence=seq, chunk=chunk)
            else:
                yield model_pb2.ChatResponse(sequence=seq, done=done)

    async def Embed(self, request: Any, context: Any) -> Any:
        self._record("Embed", request, context)
        return model_pb2.EmbedResponse(
            embeddings=[model_pb2.Embedding(values=[float(len(t)), 1.0]) for t in request.inputs],
            model="embed-1",
            usage=common_pb2.Usage(prompt_tokens=2, total_tokens=2),
        )


class RecordingTools(tool_pb2_grpc.ToolServiceServicer):
    def __init__(self) -> None:
        self.calls: list[Seen] = []

    async def ListTools(self, request: Any, context: Any) -> Any:
        return tool_pb2.ListToolsResponse(
            tools=[
                tool_pb2.ToolDescriptor(name="adder", description="adds", requires_approval=True)
            ]
        )

    async def InvokeTool(self, request: Any, context: Any) -> AsyncIterator[Any]:
        meta = {k: v for k, v in context.invocation_metadata() if isinstance(v, str)}
        self.calls.append(Seen("InvokeTool", meta, context.time_remaining(), request))
        yield tool_pb2.InvokeToolResponse(
            sequence=1, progress=common_pb2.Progress(fraction=0.5, step="work")
        )
        if request.tool_name == "broken":
            yield tool_pb2.InvokeToolResponse(
                sequence=2,
                error=common_pb2.ErrorDetail(
                    code="UNAVAILABLE", reason="SOURCE_DOWN", message="source down", retryable=True
                ),
            )
            return
        if request.tool_name == "guarded" and request.approval.arguments_digest != DIGEST:
            yield tool_pb2.InvokeToolResponse(
                sequence=2,
                approval_required=tool_pb2.ApprovalRequired(
                    tool_name="guarded", arguments_digest=DIGEST, prompt="Run guarded?"
                ),
            )
            return
        total = sum(v for v in request.arguments.values() if isinstance(v, float))
        result = tool_pb2.ToolResult(text=str(total))
        result.result.update({"sum": total})
        yield tool_pb2.InvokeToolResponse(sequence=2, result=result)


class ServicesAgent(Agent):
    name = "services"
    max_concurrency = 4

    def __init__(self) -> None:
        self.progress: list[tuple[float, str, str]] = []

    @capability("stream")
    async def stream(self, task: Payload, ctx: TaskContext) -> dict[str, Any]:
        tokens = ctx.model.stream(task.text, model="echo", max_tokens=10)
        async for text in tokens:
            await ctx.partial(text)
        assert tokens.result is not None
        return {"text": tokens.result.text, "finish": tokens.result.finish_reason}

    @capability("sampled")
    async def sampled(self, task: Payload, ctx: TaskContext) -> str:
        sampling = Sampling(
            model="echo", temperature=0.5, top_p=0.25, max_tokens=7, stop=["\n"], seed=42
        )
        reply = await ctx.model.generate(task.text, system="be brief", **sampling)
        return reply.text

    @capability("chat")
    async def chat(self, task: Payload, ctx: TaskContext) -> str:
        reply = await ctx.model.chat(
            [("system", "be brief"), {"role": "user", "content": task.text}]
        )
        return reply.text

    @capability("embed")
    async def embed(self, task: Payload, ctx: TaskContext) -> dict[str, Any]:
        return {"vectors": await ctx.model.embed(["ab", "abcd"])}

    @capability("tool")
    async def tool(self, task: Payload, ctx: TaskContext) -> dict[str, Any]:
        assert task.json is not None
        out = await ctx.tools.invoke(
            str(task.json["tool"]),
            {"a": 2, "b": 3},
            on_progress=lambda f, s, m: self.progress.append((f, s, m)),
        )
        return {"result": dict(out.result), "text": out.text}

    @capability("list-tools")
    async def list_tools(self, task: Payload, ctx: TaskContext) -> dict[str, Any]:
        tools = await ctx.tools.list()
        return {"names": [t.name for t in tools], "approval": tools[0].requires_approval}


@contextlib.asynccontextmanager
async def serve_downstream(pki: Pki) -> AsyncIterator[tuple[str, RecordingModel, RecordingTools]]:
    """A recording model and tool service on one real mTLS server: its address and both."""
    model, tools = RecordingModel(), RecordingTools()
    settings = load_settings(
        host="127.0.0.1", port=0, certs_dir=pki.dir, identity="model", grace_period=0.5
    )
    bindings = [
        ServiceBinding(
            "hivewire.model.v1.ModelService",
            lambda s: model_pb2_grpc.add_ModelServiceServicer_to_server(model, s),
        ),
        ServiceBinding(
            "hivewire.tool.v1.ToolService",
            lambda s: tool_pb2_grpc.add_ToolServiceServicer_to_server(tools, s),
        ),
    ]
    async with ServiceServer(settings, bindings) as server:
        yield f"127.0.0.1:{server.port}", model, tools


@pytest.fixture
async def downstream(pki: Pki) -> AsyncIterator[tuple[str, RecordingModel, RecordingTools]]:
    async with serve_downstream(pki) as served:
        yield served


@pytest.fixture
async def agent() -> ServicesAgent:
    return ServicesAgent()


@pytest.fixture
async def served(
    pki: Pki, agent: ServicesAgent, downstream: tuple[str, RecordingModel, RecordingTools]
) -> AsyncIterator[AgentServer]:
    address = downstream[0]
    settings = agent_settings(pki.dir, model_address=address, tool_address=address)
    async with serve_in_process(agent, settings) as running:
        yield running


@pytest.fixture
async def coordinator(pki: Pki, served: AgentServer) -> AsyncIterator[Coordinator]:
    client = Coordinator(f"127.0.0.1:{served.port}", pki.files("coordinator"))
    try:
        yield client
    finally:
        await client.close()


async def test_model_stream_carries_task_identity_deadline_and_budget(
    coordinator: Coordinator, downstream: tuple[str, RecordingModel, RecordingTools]
) -> None:
    _, model, _ = downstream
    ex = coordinator.execute()
    await ex.send(
        assignment(
            "stream",
            text="say hello",
            task_id="t-model",
            attempt=2,
            correlation_id="cid-model",
            token_budget=1000,
            tokens_used=400,
            deadline_in=20,
        )
    )
    final = await ex.finish()

    assert final.result.output.json == {"text": "Hello!", "finish": "stop"}
    partials = [m.partial.content.text for m in ex.received if m.WhichOneof("kind") == "partial"]
    # Relayed chunk by chunk; chunks that queue up behind a busy stream travel together.
    assert "".join(partials) == "Hello!" and 1 <= len(partials) <= 3
    usage = final.result.usage
    assert (usage.prompt_tokens, usage.completion_tokens, usage.total_tokens) == (5, 3, 8)
    assert usage.model_calls == 1 and usage.HasField("time_to_first_token")

    activities = [m.activity for m in ex.received if m.WhichOneof("kind") == "activity"]
    assert [(a.kind, a.done) for a in activities] == [
        (common_pb2.ACTIVITY_KIND_MODEL_CALL, False),
        (common_pb2.ACTIVITY_KIND_MODEL_CALL, True),
    ]
    assert activities[1].usage.total_tokens == 8 and activities[1].name == "echo-1"

    (call,) = model.calls
    assert call.metadata["x-hivewire-task-id"] == "t-model"
    assert call.metadata["x-hivewire-attempt"] == "2"
    assert call.metadata["x-correlation-id"] == "cid-model"
    assert call.metadata["x-hivewire-token-budget"] == "600"
    assert call.time_remaining is not None and 0 < call.time_remaining <= 20
    assert call.request.task_id == "t-model"
    assert call.request.model == "echo" and call.request.params.max_tokens == 10


async def test_a_gathered_sampling_value_reaches_the_model(
    coordinator: Coordinator, downstream: tuple[str, RecordingModel, RecordingTools]
) -> None:
    _, model, _ = downstream
    ex = coordinator.execute()
    await ex.send(assignment("sampled", text="hi"))
    final = await ex.finish()
    assert final.result.output.text == "Hello!"
    (call,) = model.calls
    assert (call.method, call.request.model, call.request.system) == (
        "Generate",
        "echo",
        "be brief",
    )
    params = call.request.params
    assert (params.temperature, params.top_p, params.max_tokens) == (0.5, 0.25, 7)
    assert (list(params.stop), params.seed) == (["\n"], 42)


async def test_chat_and_embed_add_up_usage(
    coordinator: Coordinator, downstream: tuple[str, RecordingModel, RecordingTools]
) -> None:
    _, model, _ = downstream
    chat = coordinator.execute()
    await chat.send(assignment("chat", text="hi"))
    final = await chat.finish()
    assert final.result.output.text == "Hello!"
    roles = [m.role for m in model.calls[0].request.messages]
    assert roles == [model_pb2.CHAT_ROLE_SYSTEM, model_pb2.CHAT_ROLE_USER]
    assert "x-hivewire-token-budget" not in model.calls[0].metadata  # no budget: no limit

    embed = coordinator.execute()
    await embed.send(assignment("embed"))
    final = await embed.finish()
    assert final.result.output.json["vectors"] == [[2.0, 1.0], [4.0, 1.0]]
    assert final.result.usage.total_tokens == 2


async def test_spent_budget_fails_before_calling_the_model(
    coordinator: Coordinator, downstream: tuple[str, RecordingModel, RecordingTools]
) -> None:
    _, model, _ = downstream
    ex = coordinator.execute()
    await ex.send(assignment("stream", text="x", token_budget=50, tokens_used=50))
    error = (await ex.finish()).error.error
    assert (error.reason, error.retryable) == ("TOKEN_BUDGET_EXHAUSTED", False)
    assert model.calls == []


async def test_model_unavailable_is_a_retryable_failure(coordinator: Coordinator) -> None:
    ex = coordinator.execute()
    await ex.send(assignment("stream", text="fail"))
    final = await ex.finish()
    error = final.error.error
    assert (error.reason, error.code, error.retryable) == ("BACKEND_DOWN", "UNAVAILABLE", True)
    done = [m.activity for m in ex.received if m.WhichOneof("kind") == "activity"][-1]
    assert done.done and done.error.reason == "BACKEND_DOWN"


async def test_tool_call_reports_progress_activity_and_usage(
    coordinator: Coordinator,
    agent: ServicesAgent,
    downstream: tuple[str, RecordingModel, RecordingTools],
) -> None:
    _, _, tools = downstream
    ex = coordinator.execute()
    await ex.send(assignment("tool", json={"tool": "adder"}, task_id="t-tool", attempt=1))
    final = await ex.finish()
    assert final.result.output.json == {"result": {"sum": 5.0}, "text": "5.0"}
    assert final.result.usage.tool_calls == 1
    assert agent.progress == [(0.5, "work", "")]
    activities = [m.activity for m in ex.received if m.WhichOneof("kind") == "activity"]
    assert [(a.kind, a.name, a.done) for a in activities] == [
        (common_pb2.ACTIVITY_KIND_TOOL_CALL, "adder", False),
        (common_pb2.ACTIVITY_KIND_TOOL_CALL, "adder", True),
    ]
    (call,) = tools.calls
    assert call.metadata["x-hivewire-task-id"] == "t-tool"
    assert call.request.task_id == "t-tool" and call.request.call_id
    assert call.time_remaining is not None


async def test_tool_approval_is_asked_and_granted(
    coordinator: Coordinator, downstream: tuple[str, RecordingModel, RecordingTools]
) -> None:
    _, _, tools = downstream
    ex = coordinator.execute()
    await ex.send(assignment("tool", json={"tool": "guarded"}))
    asked = (await ex.until("input_required")).input_required
    assert asked.kind == common_pb2.INPUT_KIND_APPROVAL
    assert (asked.tool_name, asked.arguments_digest, asked.prompt) == (
        "guarded",
        DIGEST,
        "Run guarded?",
    )
    await ex.answer(asked.request_id, approved=True)
    final = await ex.finish()
    assert final.result.output.json["result"] == {"sum": 5.0}
    first, second = tools.calls
    assert not first.request.HasField("approval")
    assert second.request.approval.request_id == asked.request_id
    assert second.request.approval.arguments_digest == DIGEST
    assert second.request.approval.approved_by == "tester"


async def test_tool_approval_denied_is_permanent(
    coordinator: Coordinator, downstream: tuple[str, RecordingModel, RecordingTools]
) -> None:
    _, _, tools = downstream
    ex = coordinator.execute()
    await ex.send(assignment("tool", json={"tool": "guarded"}))
    asked = (await ex.until("input_required")).input_required
    await ex.answer(asked.request_id, approved=False)
    error = (await ex.finish()).error.error
    assert (error.reason, error.retryable) == ("TOOL_APPROVAL_DENIED", False)
    assert error.metadata["tool_name"] == "guarded"
    assert len(tools.calls) == 1


async def test_tool_error_keeps_the_tools_classification(coordinator: Coordinator) -> None:
    ex = coordinator.execute()
    await ex.send(assignment("tool", json={"tool": "broken"}))
    error = (await ex.finish()).error.error
    assert (error.reason, error.retryable, error.code) == ("SOURCE_DOWN", True, "UNAVAILABLE")
    assert error.metadata["tool_name"] == "broken"


async def test_list_tools(coordinator: Coordinator) -> None:
    ex = coordinator.execute()
    await ex.send(assignment("list-tools"))
    assert (await ex.finish()).result.output.json == {"names": ["adder"], "approval": True}


async def test_unknown_model_service_is_retryable_unavailable(pki: Pki) -> None:
    agent = ServicesAgent()
    async with serve_in_process(agent, agent_settings(pki.dir)) as running:
        client = Coordinator(f"127.0.0.1:{running.port}", pki.files("coordinator"))
        try:
            ex = client.execute()
            await ex.send(assignment("stream", text="hi"))
            error = (await ex.finish()).error.error
            assert (error.reason, error.retryable) == ("MODEL_UNAVAILABLE", True)
        finally:
            await client.close()
