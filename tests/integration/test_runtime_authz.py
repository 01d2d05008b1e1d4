"""Authorization by identity per RPC, over real mTLS (DESIGN.md section 6).

One ``ServiceServer`` hosts probe servicers registered under the real service names
(coordinator, agent, model, tool); each probe records that it ran and which
:class:`CallerIdentity` the authz interceptor handed it. Callers use the mesh's real
certificates, so the SPIFFE ids come from the TLS handshake.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from hivewire.agent.v1 import agent_pb2, agent_pb2_grpc
from hivewire.coordinator.v1 import coordinator_pb2, coordinator_pb2_grpc
from hivewire.model.v1 import model_pb2, model_pb2_grpc
from hivewire.services.runtime.authz import REASON, AuthzPolicyError, CallerIdentity, current_caller
from hivewire.services.runtime.channels import secure_channel
from hivewire.services.runtime.config import Settings, load_settings
from hivewire.services.runtime.errors import PermissionDenied
from hivewire.services.runtime.server import ServiceBinding, ServiceServer
from hivewire.services.runtime.status import from_rpc_error
from hivewire.tool.v1 import tool_pb2, tool_pb2_grpc
from tests.conftest import Pki
from tests.helpers import eventually

COORDINATOR = "hivewire.coordinator.v1.CoordinatorService"
AGENT = "hivewire.agent.v1.AgentService"
MODEL = "hivewire.model.v1.ModelService"
TOOL = "hivewire.tool.v1.ToolService"


@dataclass
class Probe:
    """What the servicers saw: (method, caller) per call that reached them."""

    calls: list[tuple[str, CallerIdentity | None]] = field(default_factory=list)

    def saw(self, method: str) -> None:
        self.calls.append((method, current_caller()))


class CoordinatorProbe(coordinator_pb2_grpc.CoordinatorServiceServicer):
    def __init__(self, probe: Probe) -> None:
        self.probe = probe

    async def GetTask(self, request: Any, context: Any) -> coordinator_pb2.GetTaskResponse:
        self.probe.saw("GetTask")
        return coordinator_pb2.GetTaskResponse()

    async def SubmitTask(self, request: Any, context: Any) -> coordinator_pb2.SubmitTaskResponse:
        self.probe.saw("SubmitTask")
        return coordinator_pb2.SubmitTaskResponse()

    async def Session(  # type: ignore[override]
        self, request_iterator: AsyncIterator[Any], context: Any
    ) -> AsyncIterator[coordinator_pb2.SessionResponse]:
        self.probe.saw("Session")
        async for _ in request_iterator:
            yield coordinator_pb2.SessionResponse()


class AgentProbe(agent_pb2_grpc.AgentServiceServicer):
    def __init__(self, probe: Probe) -> None:
        self.probe = probe

    async def Execute(  # type: ignore[override]
        self, request_iterator: AsyncIterator[Any], context: Any
    ) -> AsyncIterator[agent_pb2.ExecuteResponse]:
        self.probe.saw("Execute")
        async for _ in request_iterator:
            yield agent_pb2.ExecuteResponse()

    async def Describe(self, request: Any, context: Any) -> agent_pb2.DescribeResponse:
        self.probe.saw("Describe")
        return agent_pb2.DescribeResponse()


class ModelProbe(model_pb2_grpc.ModelServiceServicer):
    def __init__(self, probe: Probe) -> None:
        self.probe = probe

    async def Chat(  # type: ignore[override]
        self, request: Any, context: Any
    ) -> AsyncIterator[model_pb2.ChatResponse]:
        self.probe.saw("Chat")
        yield model_pb2.ChatResponse(sequence=1)

    async def ListModels(self, request: Any, context: Any) -> model_pb2.ListModelsResponse:
        self.probe.saw("ListModels")
        return model_pb2.ListModelsResponse()


class ToolProbe(tool_pb2_grpc.ToolServiceServicer):
    def __init__(self, probe: Probe) -> None:
        self.probe = probe

    async def ListTools(self, request: Any, context: Any) -> tool_pb2.ListToolsResponse:
        self.probe.saw("ListTools")
        return tool_pb2.ListToolsResponse()

    async def InvokeTool(  # type: ignore[override]
        self, request: Any, context: Any
    ) -> AsyncIterator[tool_pb2.InvokeToolResponse]:
        self.probe.saw("InvokeTool")
        yield tool_pb2.InvokeToolResponse(sequence=1)


def bindings(probe: Probe) -> list[ServiceBinding]:
    return [
        ServiceBinding(
            COORDINATOR,
            lambda s: coordinator_pb2_grpc.add_CoordinatorServiceServicer_to_server(
                CoordinatorProbe(probe), s
            ),
        ),
        ServiceBinding(
            AGENT, lambda s: agent_pb2_grpc.add_AgentServiceServicer_to_server(AgentProbe(probe), s)
        ),
        ServiceBinding(
            MODEL, lambda s: model_pb2_grpc.add_ModelServiceServicer_to_server(ModelProbe(probe), s)
        ),
        ServiceBinding(
            TOOL, lambda s: tool_pb2_grpc.add_ToolServiceServicer_to_server(ToolProbe(probe), s)
        ),
    ]


# -- calls, one per RPC kind ------------------------------------------------------------

Call = Callable[[grpc.aio.Channel], Awaitable[object]]


async def get_task(ch: grpc.aio.Channel) -> object:
    stub = coordinator_pb2_grpc.CoordinatorServiceStub(ch)
    return await stub.GetTask(coordinator_pb2.GetTaskRequest(task_id="t"), timeout=10)


async def submit_task(ch: grpc.aio.Channel) -> object:
    stub = coordinator_pb2_grpc.CoordinatorServiceStub(ch)
    return await stub.SubmitTask(coordinator_pb2.SubmitTaskRequest(), timeout=10)


async def session(ch: grpc.aio.Channel) -> object:
    stub = coordinator_pb2_grpc.CoordinatorServiceStub(ch)
    return await _write_then_read(stub.Session(timeout=10), coordinator_pb2.SessionRequest())


async def execute(ch: grpc.aio.Channel) -> object:
    stub = agent_pb2_grpc.AgentServiceStub(ch)
    first = agent_pb2.ExecuteRequest(assign=agent_pb2.TaskAssignment(task_id="t"))
    return await _write_then_read(stub.Execute(timeout=10), first)


async def _write_then_read(call: Any, first: Any) -> list[Any]:
    # The coordinator drives Execute this way: an explicit write, then reads. A refusal
    # must reach the writer as PERMISSION_DENIED, not as a failed write.
    await call.write(first)
    await call.done_writing()
    return [response async for response in call]


async def describe(ch: grpc.aio.Channel) -> object:
    stub = agent_pb2_grpc.AgentServiceStub(ch)
    return await stub.Describe(agent_pb2.DescribeRequest(), timeout=10)


async def chat(ch: grpc.aio.Channel) -> object:
    stub = model_pb2_grpc.ModelServiceStub(ch)
    return [r async for r in stub.Chat(model_pb2.ChatRequest(model="m"), timeout=10)]


async def list_models(ch: grpc.aio.Channel) -> object:
    stub = model_pb2_grpc.ModelServiceStub(ch)
    return await stub.ListModels(model_pb2.ListModelsRequest(), timeout=10)


async def list_tools(ch: grpc.aio.Channel) -> object:
    stub = tool_pb2_grpc.ToolServiceStub(ch)
    return await stub.ListTools(tool_pb2.ListToolsRequest(), timeout=10)


async def invoke_tool(ch: grpc.aio.Channel) -> object:
    stub = tool_pb2_grpc.ToolServiceStub(ch)
    return [r async for r in stub.InvokeTool(tool_pb2.InvokeToolRequest(), timeout=10)]


CALLS: dict[str, tuple[str, Call]] = {
    "GetTask": (f"/{COORDINATOR}/GetTask", get_task),
    "SubmitTask": (f"/{COORDINATOR}/SubmitTask", submit_task),
    "Session": (f"/{COORDINATOR}/Session", session),
    "Execute": (f"/{AGENT}/Execute", execute),
    "Describe": (f"/{AGENT}/Describe", describe),
    "Chat": (f"/{MODEL}/Chat", chat),
    "ListModels": (f"/{MODEL}/ListModels", list_models),
    "ListTools": (f"/{TOOL}/ListTools", list_tools),
    "InvokeTool": (f"/{TOOL}/InvokeTool", invoke_tool),
}

# DESIGN.md section 6 under the built-in policy: identity stem -> RPCs it may call.
ALLOWED: dict[str, set[str]] = {
    "client": {"GetTask", "SubmitTask", "Session"},
    "coordinator": {"Execute", "Describe"},
    "agent": {"Chat", "ListModels", "ListTools", "InvokeTool", "GetTask", "SubmitTask"},
    "agent-researcher": {"Chat", "ListTools", "SubmitTask"},
    "admin": set(CALLS),
    "model": set(),
    "tool": set(),
}
MATRIX = [
    (stem, rpc, rpc in allowed)
    for stem, allowed in ALLOWED.items()
    for rpc in (CALLS if stem != "agent-researcher" else sorted(allowed))
]


# -- fixtures ---------------------------------------------------------------------------


def make_settings(pki: Pki, **overrides: Any) -> Settings:
    return load_settings(
        host="127.0.0.1",
        port=0,
        certs_dir=pki.dir,
        identity="coordinator",
        grace_period=0.5,
        **overrides,
    )


@pytest.fixture
def probe() -> Probe:
    return Probe()


@pytest.fixture
async def server(pki: Pki, probe: Probe) -> AsyncIterator[ServiceServer]:
    async with ServiceServer(make_settings(pki), bindings(probe)) as srv:
        yield srv


async def expect_refused(call: Call, ch: grpc.aio.Channel, caller: str, method: str) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call(ch)
    assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED, info.value
    err = from_rpc_error(info.value)
    assert isinstance(err, PermissionDenied)
    assert err.reason == REASON
    assert err.metadata == {"caller": caller, "method": method}


# -- the built-in policy ----------------------------------------------------------------


@pytest.mark.parametrize(("stem", "rpc", "allowed"), MATRIX)
async def test_default_policy_per_identity_and_rpc(
    server: ServiceServer, probe: Probe, pki: Pki, stem: str, rpc: str, allowed: bool
) -> None:
    method, call = CALLS[rpc]
    spiffe_id = pki.spiffe_id(stem)
    async with secure_channel(server.address, pki.files(stem)) as ch:
        if allowed:
            await call(ch)
            role, _, name = spiffe_id.removeprefix("spiffe://hivewire.local/").partition("/")
            assert probe.calls == [(rpc, CallerIdentity(spiffe_id, role, name))]
        else:
            await expect_refused(call, ch, spiffe_id, method)
            # Refused before the servicer ran.
            assert probe.calls == []


async def test_health_and_reflection_are_open_to_every_identity(
    server: ServiceServer, pki: Pki, grpcurl: Any
) -> None:
    for stem in ("client", "coordinator", "agent", "model", "tool", "admin"):
        async with secure_channel(server.address, pki.files(stem)) as ch:
            health = health_pb2_grpc.HealthStub(ch)
            for service in ("", MODEL, AGENT):
                response = await health.Check(
                    health_pb2.HealthCheckRequest(service=service), timeout=10
                )
                assert response.status == health_pb2.HealthCheckResponse.SERVING, (stem, service)
    for stem in ("client", "model"):
        listed = await grpcurl("list", tls=pki.files(stem), address=server.address)
        assert listed.returncode == 0, listed
        assert {COORDINATOR, AGENT, MODEL, TOOL, "grpc.health.v1.Health"} <= set(
            listed.stdout.split()
        )
        described = await grpcurl("describe", MODEL, tls=pki.files(stem), address=server.address)
        assert described.returncode == 0, described
        assert "rpc Chat" in described.stdout


async def test_grpcurl_sees_the_refusal_reason(
    server: ServiceServer, pki: Pki, grpcurl: Any
) -> None:
    result = await grpcurl(
        f"{MODEL}/ListModels", tls=pki.files("client"), address=server.address, input="{}"
    )
    assert result.returncode == 64 + grpc.StatusCode.PERMISSION_DENIED.value[0], result
    assert "PermissionDenied" in result.stderr
    assert "may not call" in result.stderr


# -- a policy file ----------------------------------------------------------------------

CUSTOM = """
version = 1

# Clients may read models but not chat; nothing else is allowed, not even health.
[[rules]]
callers = ["client/*"]
allow = ["hivewire.model.v1.ModelService/*"]
deny = ["/hivewire.model.v1.ModelService/Chat"]
"""


async def test_a_policy_file_replaces_the_default(pki: Pki, probe: Probe, tmp_path: Path) -> None:
    path = tmp_path / "authz.toml"
    path.write_text(CUSTOM, encoding="utf-8")
    async with (
        ServiceServer(make_settings(pki, authz_policy_file=path), bindings(probe)) as server,
        secure_channel(server.address, pki.files("client")) as ch,
    ):
        client = pki.spiffe_id("client")
        await list_models(ch)
        assert [rpc for rpc, _ in probe.calls] == ["ListModels"]
        await expect_refused(chat, ch, client, f"/{MODEL}/Chat")
        await expect_refused(get_task, ch, client, f"/{COORDINATOR}/GetTask")
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=10)
        assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert [rpc for rpc, _ in probe.calls] == ["ListModels"]


async def test_a_changed_policy_file_applies_without_restart(
    pki: Pki, probe: Probe, tmp_path: Path
) -> None:
    path = tmp_path / "authz.toml"
    path.write_text(CUSTOM, encoding="utf-8")
    os.utime(path, ns=(1_000_000_000, 1_000_000_000))
    async with (
        ServiceServer(make_settings(pki, authz_policy_file=path), bindings(probe)) as server,
        secure_channel(server.address, pki.files("client")) as ch,
    ):
        client = pki.spiffe_id("client")
        await expect_refused(chat, ch, client, f"/{MODEL}/Chat")
        path.write_text(CUSTOM.replace("deny =", "# deny ="), encoding="utf-8")
        os.utime(path, ns=(2_000_000_000, 2_000_000_000))

        async def chat_allowed() -> None:
            try:
                await chat(ch)
            except grpc.aio.AioRpcError as exc:
                raise AssertionError(f"still refused: {exc.code()}") from exc

        await eventually(chat_allowed, timeout=10, interval=0.1)
        assert [rpc for rpc, _ in probe.calls] == ["Chat"]


async def test_a_broken_policy_file_stops_the_server_from_starting(
    pki: Pki, probe: Probe, tmp_path: Path
) -> None:
    path = tmp_path / "authz.toml"
    path.write_text('[[rules]]\ncallers = ["client/*"]\nallow = ["nomethod"]\n', encoding="utf-8")
    server = ServiceServer(make_settings(pki, authz_policy_file=path), bindings(probe))
    with pytest.raises(AuthzPolicyError, match="names no method"):
        await server.start()
    assert not server.started
