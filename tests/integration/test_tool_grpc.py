"""The tool service as a real process over mTLS: built-in, plugin and MCP tools, errors.

One service process serves the whole module (starting one costs about a second and a
half, with its MCP server child): plugins installed through a real entry-point
dist-info on its ``PYTHONPATH``, a policy file, and the demo MCP server over stdio.
After every kind of failure the test checks that the service still answers health
checks with SERVING.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
import pytest_asyncio
from google.protobuf import json_format
from grpc_health.v1 import health_pb2, health_pb2_grpc

from hivewire.services.runtime.channels import secure_channel
from hivewire.services.runtime.errors import (
    DeadlineExceeded,
    HivewireError,
    Internal,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    Unavailable,
)
from hivewire.services.runtime.grants import ApprovalSigner
from hivewire.services.tool.client import ToolClient
from hivewire.services.tool.domain import (
    ApprovalGrant,
    ApprovalRequest,
    ProgressUpdate,
    ToolFailure,
    ToolOutcome,
    ToolSource,
)
from hivewire.services.tool.sdk import arguments_digest
from hivewire.tool.v1 import tool_pb2, tool_pb2_grpc
from tests.conftest import Pki
from tests.helpers import ServiceProcess, eventually, grpcurl
from tests.support.mcp_servers import DEMO_SERVER
from tests.support.tool_plugins import install_plugins, pythonpath

pytestmark = pytest.mark.asyncio(loop_scope="module")

SERVICE = "hivewire.tool.v1.ToolService"


def tool_env(workdir: Path, **extra: str) -> dict[str, str]:
    """Environment of a tool service with the test plugins, a policy and the demo MCP server."""
    site = install_plugins(workdir / "site")
    policy = workdir / "policy.toml"
    policy.write_text(
        """
[[rules]]
description = "agents may call every tool; the MCP server's shout needs an approval"
callers = ["spiffe://hivewire.local/agent/*"]
allow = ["*"]
require_approval = ["demo.shout"]
"""
    )
    servers = [{"name": "demo", "command": sys.executable, "args": [str(DEMO_SERVER)]}]
    env = {
        "PYTHONPATH": pythonpath(site),
        "HIVEWIRE_DISCOVERY": "static",
        "HIVEWIRE_EVENTS__ENABLED": "false",
        # No NATS here: used approvals are remembered by this process (docs/tools.md).
        "HIVEWIRE_TOOL__GRANT_LEDGER": "process",
        "HIVEWIRE_TOOL__PLUGINS": "hw_*",
        "HIVEWIRE_TOOL__POLICY_FILE": str(policy),
        "HIVEWIRE_TOOL__MCP_SERVERS": json.dumps(servers),
        "HIVEWIRE_TOOL__HTTP_ALLOWED_HOSTS": "127.0.0.1",
        "HIVEWIRE_TOOL__MAX_RESULT_BYTES": "4096",
    }
    env.update(extra)
    return env


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def tool_service(
    pki: Pki, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[ServiceProcess]:
    workdir = tmp_path_factory.mktemp("tool-service")
    process = ServiceProcess(
        "hivewire.services.tool",
        workdir=workdir,
        certs_dir=pki.dir,
        identity="tool",
        env=tool_env(workdir),
    )
    async with process:
        yield process


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def agent_channel(tool_service: ServiceProcess, pki: Pki) -> AsyncIterator[grpc.aio.Channel]:
    channel = secure_channel(tool_service.address, pki.files("agent"))
    try:
        yield channel
    finally:
        await channel.close()


@pytest.fixture
def tools(agent_channel: grpc.aio.Channel) -> ToolClient:
    return ToolClient(agent_channel)


async def assert_serving(channel: grpc.aio.Channel) -> None:
    stub = health_pb2_grpc.HealthStub(channel)
    for service in ("", SERVICE):
        reply = await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING


async def metric(process: ServiceProcess, name: str, labels: dict[str, str]) -> float:
    async with httpx.AsyncClient(timeout=5) as http:
        text = (await http.get(f"http://127.0.0.1:{process.metrics_port}/metrics")).text
    wanted = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in text.splitlines():
        if line.startswith(f"{name}{{") and line.split("}")[0][len(name) + 1 :] == wanted:
            return float(line.rsplit(" ", 1)[1])
        if not labels and line.startswith(f"{name} "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


# -- listing and calling --------------------------------------------------------------


async def test_grpcurl_lists_and_calls(tool_service: ServiceProcess, pki: Pki) -> None:
    listed = await grpcurl("list", tls=pki.files("agent"), address=tool_service.address)
    assert listed.returncode == 0, listed
    assert SERVICE in listed.stdout.split()
    called = await grpcurl(
        f"{SERVICE}/InvokeTool",
        tls=pki.files("agent"),
        address=tool_service.address,
        input=json.dumps({"tool_name": "calculator", "arguments": {"expression": "6*7"}}),
    )
    assert called.returncode == 0, called
    [message] = called.messages()
    assert message["result"]["result"] == {"value": 42, "expression": "6*7"}
    assert message["sequence"] == "1"


async def test_list_tools_has_every_source(tools: ToolClient) -> None:
    listed = {t.name: t for t in await tools.list_tools()}
    assert listed["calculator"].source is ToolSource.BUILTIN
    assert listed["echo"].source is ToolSource.PLUGIN and listed["echo"].version == "1.2.3"
    assert listed["demo.add"].source is ToolSource.MCP and listed["demo.add"].version == "0.4.2"
    assert listed["delete_file"].requires_approval
    assert listed["demo.shout"].requires_approval  # from the policy file
    assert not listed["demo.add"].requires_approval
    assert "hw_broken_plugin" not in listed
    schema = listed["add_numbers"].input_schema
    assert schema["required"] == ["a", "b"]
    assert schema["properties"]["a"]["type"] == "integer"
    assert listed["demo.add"].input_schema["properties"]["b"]["type"] == "integer"
    assert [t.name for t in await tools.list_tools(name_prefix="demo.")] == [
        "demo.add",
        "demo.countdown",
        "demo.fail",
        "demo.shout",
        "demo.sleep",
    ]


async def test_call_builtin_plugin_and_mcp_tools(tools: ToolClient) -> None:
    calc = await tools.invoke("calculator", {"expression": "2 ** 16"}, task_id="task-1")
    assert isinstance(calc, ToolOutcome) and calc.result["value"] == 65536

    progress: list[ProgressUpdate] = []
    echo = await tools.invoke("echo", {"message": "hi", "repeat": 2}, on_progress=progress.append)
    assert isinstance(echo, ToolOutcome) and echo.result == {"result": "hi hi"}
    assert [p.message for p in progress] == ["1/2", "2/2"]

    added = await tools.invoke("add_numbers", {"a": 20, "b": 22})
    assert isinstance(added, ToolOutcome) and added.result == {"value": 42}

    mcp = await tools.invoke("demo.add", {"a": 40, "b": 2})
    assert isinstance(mcp, ToolOutcome) and mcp.result == {"result": 42} and mcp.text == "42"

    mcp_progress: list[ProgressUpdate] = []

    async def on_progress(update: ProgressUpdate) -> None:
        mcp_progress.append(update)

    countdown = await tools.invoke("demo.countdown", {"steps": 3}, on_progress=on_progress)
    assert isinstance(countdown, ToolOutcome) and countdown.text == "liftoff"
    assert [p.message for p in mcp_progress] == ["step 1", "step 2", "step 3"]
    assert mcp_progress[-1].fraction == pytest.approx(1.0)


async def test_results_are_truncated_to_the_limit(tools: ToolClient) -> None:
    big = await tools.invoke("big_output", {"size": 100_000})
    assert isinstance(big, ToolOutcome) and big.truncated
    assert len(big.text.encode()) <= 4096


# -- errors: right code and reason, service stays SERVING ------------------------------


async def test_schema_violation(tools: ToolClient, agent_channel: grpc.aio.Channel) -> None:
    with pytest.raises(InvalidArgument) as caught:
        await tools.invoke("add_numbers", {"a": "two", "extra": True})
    err = caught.value
    assert err.code == grpc.StatusCode.INVALID_ARGUMENT
    assert err.reason == "INVALID_TOOL_ARGUMENTS"
    assert {v.field for v in err.violations} == {"arguments.a", "arguments.b", "arguments.extra"}
    with pytest.raises(InvalidArgument) as mcp:
        await tools.invoke("demo.add", {"a": 1})
    assert [v.field for v in mcp.value.violations] == ["arguments.b"]
    await assert_serving(agent_channel)


async def test_unknown_tool(tools: ToolClient, agent_channel: grpc.aio.Channel) -> None:
    with pytest.raises(NotFound) as caught:
        await tools.invoke("no.such.tool", {})
    assert caught.value.reason == "TOOL_NOT_FOUND"
    assert caught.value.resource_name == "no.such.tool"
    await assert_serving(agent_channel)


async def test_timeouts(tools: ToolClient, agent_channel: grpc.aio.Channel) -> None:
    # The tool's own cap (0.5 s) fires first: the service answers with its reason.
    with pytest.raises(DeadlineExceeded) as capped:
        await tools.invoke("hang", {}, timeout=30)
    assert capped.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert capped.value.reason == "TOOL_TIMEOUT"
    # A sync plugin that blocks its thread and never checks: the call still ends on time.
    with pytest.raises(DeadlineExceeded) as blocked:
        await tools.invoke("sync_hang", {}, timeout=30)
    assert blocked.value.reason == "TOOL_TIMEOUT"
    added = await tools.invoke("add_numbers", {"a": 1, "b": 2})
    assert isinstance(added, ToolOutcome)
    # The caller's deadline fires first: DEADLINE_EXCEEDED, the call is over either way.
    with pytest.raises(DeadlineExceeded):
        await tools.invoke("slow", {"seconds": 60}, timeout=0.3)
    with pytest.raises(DeadlineExceeded):
        await tools.invoke("demo.sleep", {"seconds": 60}, timeout=0.3)
    await assert_serving(agent_channel)
    again = await tools.invoke("demo.add", {"a": 1, "b": 1})
    assert isinstance(again, ToolOutcome)


async def test_crashing_plugin(tools: ToolClient, agent_channel: grpc.aio.Channel) -> None:
    events = [e async for e in tools.stream("explode", {"note": "now"})]
    [failure] = events
    assert isinstance(failure, ToolFailure)
    assert (failure.code, failure.reason) == ("INTERNAL", "TOOL_CRASHED")
    assert "boom now" in failure.message
    with pytest.raises(Internal) as raised:
        await tools.invoke("explode", {})
    assert raised.value.reason == "TOOL_CRASHED"
    assert raised.value.metadata["tool_error"] == "true"
    with pytest.raises(HivewireError) as classified:
        await tools.invoke("refuse", {"what": "it"})
    assert classified.value.code == grpc.StatusCode.FAILED_PRECONDITION
    assert classified.value.reason == "REFUSED_ON_PURPOSE"
    with pytest.raises(HivewireError) as mcp_failed:
        await tools.invoke("demo.fail", {"reason": "testing"})
    assert mcp_failed.value.reason == "MCP_TOOL_ERROR"
    await assert_serving(agent_channel)


async def test_forbidden_caller(tool_service: ServiceProcess, pki: Pki) -> None:
    # An admin passes the mesh's authz policy; the tool policy only lets agents in.
    channel = secure_channel(tool_service.address, pki.files("admin"))
    try:
        client = ToolClient(channel)
        assert await client.list_tools() == []
        with pytest.raises(PermissionDenied) as caught:
            await client.invoke("calculator", {"expression": "1+1"})
        assert caught.value.code == grpc.StatusCode.PERMISSION_DENIED
        assert caught.value.reason == "TOOL_NOT_ALLOWED"
        with pytest.raises(PermissionDenied):
            await client.invoke("no.such.tool", {})
        await assert_serving(channel)
    finally:
        await channel.close()
    # A client never reaches the tool policy: the mesh refuses it the whole service.
    channel = secure_channel(tool_service.address, pki.files("client"))
    try:
        with pytest.raises(PermissionDenied) as caught:
            await ToolClient(channel).list_tools()
        assert caught.value.reason == "CALLER_NOT_ALLOWED"
        await assert_serving(channel)
    finally:
        await channel.close()


async def test_foreign_ca_is_refused_at_the_handshake(
    tool_service: ServiceProcess, foreign_pki: Pki
) -> None:
    channel = secure_channel(tool_service.address, foreign_pki.files("agent"))
    try:
        with pytest.raises(Unavailable):
            await ToolClient(channel).list_tools(timeout=5)
    finally:
        await channel.close()


# -- approval ---------------------------------------------------------------------------


def granted(pki: Pki, task_id: str, tool_name: str, digest: str, request_id: str) -> ApprovalGrant:
    """An approval as the agent gets it: with the coordinator's signed grant."""
    signed = ApprovalSigner(pki.files("coordinator")).sign(
        task_id=task_id,
        tool_name=tool_name,
        arguments_digest=digest,
        request_id=request_id,
        approved_by=pki.spiffe_id("client"),
    )
    return ApprovalGrant(request_id, "alice", digest, signed)


async def test_approval_required_then_approved(tools: ToolClient, pki: Pki) -> None:
    args = {"path": "/srv/data.csv"}
    asked = await tools.invoke("delete_file", args, task_id="task-approve")
    assert isinstance(asked, ApprovalRequest)
    assert asked.tool_name == "delete_file" and asked.prompt == "Delete /srv/data.csv?"
    assert asked.arguments_digest == arguments_digest(args)
    approval = granted(pki, "task-approve", "delete_file", asked.arguments_digest, "input-1")
    done = await tools.invoke("delete_file", args, task_id="task-approve", approval=approval)
    assert isinstance(done, ToolOutcome) and done.result == {"deleted": "/srv/data.csv"}

    with pytest.raises(PermissionDenied) as mismatch:
        await tools.invoke(
            "delete_file", {"path": "/etc/shadow"}, task_id="task-approve", approval=approval
        )
    assert mismatch.value.reason == "APPROVAL_DIGEST_MISMATCH"

    shout = await tools.invoke("demo.shout", {"text": "hey"}, task_id="task-shout")
    assert isinstance(shout, ApprovalRequest)
    loud = await tools.invoke(
        "demo.shout",
        {"text": "hey"},
        task_id="task-shout",
        approval=granted(pki, "task-shout", "demo.shout", shout.arguments_digest, "input-2"),
    )
    assert isinstance(loud, ToolOutcome) and loud.text == "HEY"


async def test_approval_over_grpcurl_with_a_digest_computed_elsewhere(
    tool_service: ServiceProcess, pki: Pki
) -> None:
    # The digest is language-neutral: compute it here, send it through grpcurl's JSON.
    args = {"path": "/tmp/y"}
    digest = arguments_digest({"path": "/tmp/x"})
    grant = granted(pki, "task-grpcurl", "delete_file", digest, "r")
    request = {
        "tool_name": "delete_file",
        "task_id": "task-grpcurl",
        "arguments": {"path": "/tmp/x"},
        "approval": {
            "request_id": "r",
            "arguments_digest": digest,
            "signed_approval": json_format.MessageToDict(grant.signed),
        },
    }
    ran = await grpcurl(
        f"{SERVICE}/InvokeTool",
        tls=pki.files("agent"),
        address=tool_service.address,
        input=json.dumps(request),
    )
    assert ran.returncode == 0, ran
    assert ran.json()["result"]["result"] == {"deleted": "/tmp/x"}
    # The same grant for other arguments: the signed digest no longer matches.
    request["arguments"] = args
    refused = await grpcurl(
        f"{SERVICE}/InvokeTool",
        tls=pki.files("agent"),
        address=tool_service.address,
        input=json.dumps(request),
    )
    assert refused.returncode == 64 + grpc.StatusCode.PERMISSION_DENIED.value[0], refused
    assert "APPROVAL_DIGEST_MISMATCH" in refused.stderr


# -- cancellation, metrics, MCP reconnect ----------------------------------------------


async def test_client_cancel_stops_the_tool(
    tool_service: ServiceProcess, agent_channel: grpc.aio.Channel
) -> None:
    stub = tool_pb2_grpc.ToolServiceStub(agent_channel)
    before = await metric(
        tool_service, "hivewire_tool_calls_total", {"outcome": "error", "tool": "slow"}
    )
    request = tool_pb2.InvokeToolRequest(tool_name="slow", call_id="cancel-me")
    request.arguments.update({"seconds": 60})
    call = stub.InvokeTool(request, timeout=30)
    first = await call.read()
    assert first.WhichOneof("kind") == "progress"
    assert await metric(tool_service, "hivewire_tool_calls_in_flight", {}) == 1
    call.cancel()

    async def cancelled_on_the_server() -> None:
        assert await metric(tool_service, "hivewire_tool_calls_in_flight", {}) == 0
        after = await metric(
            tool_service, "hivewire_tool_calls_total", {"outcome": "error", "tool": "slow"}
        )
        assert after == before + 1

    await eventually(cancelled_on_the_server)
    await assert_serving(agent_channel)


async def test_metrics_per_tool(tools: ToolClient, tool_service: ServiceProcess) -> None:
    before = await metric(
        tool_service, "hivewire_tool_calls_total", {"outcome": "ok", "tool": "calculator"}
    )
    await tools.invoke("calculator", {"expression": "1+1"})
    after = await metric(
        tool_service, "hivewire_tool_calls_total", {"outcome": "ok", "tool": "calculator"}
    )
    assert after == before + 1
    assert (
        await metric(
            tool_service, "hivewire_tool_call_duration_seconds_count", {"tool": "calculator"}
        )
        >= 1
    )
    errors = await metric(
        tool_service, "hivewire_tool_errors_total", {"reason": "TOOL_CRASHED", "tool": "explode"}
    )
    await tools.stream("explode", {}).__anext__()
    assert (
        await metric(
            tool_service,
            "hivewire_tool_errors_total",
            {"reason": "TOOL_CRASHED", "tool": "explode"},
        )
        == errors + 1
    )


def _children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # The command may contain spaces and parentheses: fields follow the last ")".
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[1]) == pid:
            found.append(int(entry.name))
    return found


async def test_mcp_server_crash_is_survived(
    tools: ToolClient, tool_service: ServiceProcess, agent_channel: grpc.aio.Channel
) -> None:
    [mcp_child] = _children(tool_service.pid)
    os.kill(mcp_child, signal.SIGKILL)

    async def back() -> None:
        try:
            result: Any = await tools.invoke("demo.add", {"a": 2, "b": 3}, timeout=5)
        except Unavailable as exc:
            assert exc.reason == "MCP_SERVER_UNAVAILABLE"
            raise AssertionError("not reconnected yet") from exc
        assert isinstance(result, ToolOutcome) and result.result == {"result": 5}

    await eventually(back, timeout=20, interval=0.2)
    assert _children(tool_service.pid) and mcp_child not in _children(tool_service.pid)
    await assert_serving(agent_channel)
