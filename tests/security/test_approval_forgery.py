"""A hostile agent cannot approve its own tool calls: the tool service as a real process.

The test holds the agent's certificate (what a compromised agent has) and calls a real tool
service whose policy requires approval of ``calculator``. Only a grant signed by the
coordinator's key for this task, tool, arguments and request, unexpired and unused, makes
the call run. A fabricated approval (the pre-grant shape, the agent's own signature), an
altered grant, and replays (another task, other arguments, the same grant twice, after
expiry) are each refused with ``PERMISSION_DENIED`` and its reason, published as a
``tool.failed`` audit event with outcome ``denied``, and the service stays SERVING.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator

import grpc
import pytest
import pytest_asyncio
from grpc_health.v1 import health_pb2, health_pb2_grpc

from hivewire.common.v1 import common_pb2
from hivewire.services.runtime.channels import secure_channel
from hivewire.services.runtime.errors import PermissionDenied
from hivewire.services.runtime.events import replay
from hivewire.services.runtime.grants import ApprovalSigner
from hivewire.services.tool.client import ToolClient
from hivewire.services.tool.domain import ApprovalGrant, ApprovalRequest, ToolOutcome
from hivewire.services.tool.sdk import arguments_digest
from hivewire.tool.v1 import tool_pb2, tool_pb2_grpc
from tests.conftest import Pki
from tests.helpers import NatsServer, ServiceProcess, eventually

pytestmark = [pytest.mark.asyncio(loop_scope="module"), pytest.mark.timeout(120)]

POLICY = """\
version = 1

[[rules]]
callers = ["spiffe://hivewire.local/agent/*"]
allow = ["*"]
require_approval = ["calculator"]
"""

ARGS = {"expression": "6*7"}
TASK = "task-approved"
REQUEST = "task-approved-1-input-1"


class Mesh:
    def __init__(
        self, nats: NatsServer, tool: ServiceProcess, tools: ToolClient, twin: ToolClient
    ) -> None:
        self.nats, self.tool, self.tools = nats, tool, tools
        self.twin = twin
        """A second tool service process on the same NATS (a replica)."""


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def mesh(pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Mesh]:
    workdir = tmp_path_factory.mktemp("approval-forgery")
    policy = workdir / "policy.toml"
    policy.write_text(POLICY)
    async with contextlib.AsyncExitStack() as stack:
        # The mesh's NATS as `hivewire up` serves it: mTLS, per-identity permissions.
        nats = await stack.enter_async_context(NatsServer(workdir / "nats", certs_dir=pki.dir))
        tools = []
        for name in ("tool", "tool-twin"):
            tool = await stack.enter_async_context(
                ServiceProcess(
                    "hivewire.services.tool",
                    workdir=workdir,
                    name=name,
                    certs_dir=pki.dir,
                    identity="tool",
                    nats_url=nats.url,
                    env={
                        "HIVEWIRE_DISCOVERY": "static",
                        "HIVEWIRE_TOOL__PLUGINS": "",
                        "HIVEWIRE_TOOL__POLICY_FILE": str(policy),
                    },
                )
            )
            channel = secure_channel(tool.address, pki.files("agent"))
            stack.push_async_callback(channel.close)
            tools.append((tool, ToolClient(channel)))
        yield Mesh(nats, tools[0][0], tools[0][1], tools[1][1])


def coordinator_grant(
    pki: Pki,
    *,
    task_id: str = TASK,
    digest: str = "",
    request_id: str = REQUEST,
    ttl: float = 300.0,
    now: float | None = None,
    stem: str = "coordinator",
) -> common_pb2.SignedApproval:
    return ApprovalSigner(pki.files(stem), ttl=ttl).sign(
        task_id=task_id,
        tool_name="calculator",
        arguments_digest=digest or arguments_digest(ARGS),
        request_id=request_id,
        approved_by=pki.spiffe_id("client"),
        now=now,
    )


async def denied(mesh: Mesh, call_id: str, grant: ApprovalGrant, **call: object) -> str:
    arguments = call.pop("arguments", ARGS)
    with pytest.raises(PermissionDenied) as err:
        await mesh.tools.invoke(
            "calculator",
            arguments,  # type: ignore[arg-type]
            call_id=call_id,
            task_id=str(call.pop("task_id", TASK)),
            approval=grant,
        )
    return err.value.reason


async def audit(mesh: Mesh, call_id: str) -> list[tuple[str, str, str]]:
    found = []
    async for received in replay(
        mesh.nats.url, "tool.*", nats_options=mesh.nats.client_options("client")
    ):
        data = received.event.tool
        if data.call_id == call_id:
            found.append((received.type, data.outcome, data.error.reason))
    return found


async def serving(mesh: Mesh, pki: Pki) -> None:
    channel = secure_channel(mesh.tool.address, pki.files("agent"))
    try:
        reply = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=""), timeout=5
        )
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
    finally:
        await channel.close()


async def test_only_the_coordinators_grant_runs_the_call_and_only_once(
    mesh: Mesh, pki: Pki
) -> None:
    asked = await mesh.tools.invoke("calculator", ARGS, task_id=TASK)
    assert isinstance(asked, ApprovalRequest)
    grant = ApprovalGrant(REQUEST, "alice", asked.arguments_digest, coordinator_grant(pki))
    done = await mesh.tools.invoke(
        "calculator", ARGS, task_id=TASK, approval=grant, call_id="forgery-ok"
    )
    assert isinstance(done, ToolOutcome) and done.result["value"] == 42
    assert await denied(mesh, "forgery-replay", grant) == "APPROVAL_REPLAYED"

    async def audited() -> None:
        assert await audit(mesh, "forgery-ok") == [
            ("tool.invoked", "", ""),
            ("tool.completed", "ok", ""),
        ]
        assert await audit(mesh, "forgery-replay") == [
            ("tool.failed", "denied", "APPROVAL_REPLAYED")
        ]

    await eventually(audited, timeout=15)


@pytest.mark.parametrize(
    ("case", "reason"),
    [
        ("fabricated", "APPROVAL_UNSIGNED"),
        ("self-signed", "APPROVAL_UNTRUSTED"),
        ("altered", "APPROVAL_SIGNATURE_INVALID"),
        ("other-task", "APPROVAL_TASK_MISMATCH"),
        ("other-arguments", "APPROVAL_DIGEST_MISMATCH"),
        ("expired", "APPROVAL_EXPIRED"),
    ],
)
async def test_a_forged_or_replayed_approval_is_refused_and_audited(
    mesh: Mesh, pki: Pki, case: str, reason: str
) -> None:
    digest = arguments_digest(ARGS)
    call: dict[str, object] = {}
    if case == "fabricated":
        # What an agent could send before grants: its own word, the right digest.
        grant = ApprovalGrant(REQUEST, "alice", digest)
    elif case == "self-signed":
        grant = ApprovalGrant(REQUEST, "alice", digest, coordinator_grant(pki, stem="agent"))
    elif case == "altered":
        # A real grant for another task, rewritten to name this one.
        signed = coordinator_grant(pki, task_id="task-other")
        claims = common_pb2.ApprovalClaims.FromString(signed.claims)
        claims.task_id = TASK
        signed.claims = claims.SerializeToString()
        grant = ApprovalGrant(REQUEST, "alice", digest, signed)
    elif case == "other-task":
        grant = ApprovalGrant(REQUEST, "alice", digest, coordinator_grant(pki))
        call["task_id"] = "task-other"
    elif case == "other-arguments":
        grant = ApprovalGrant(REQUEST, "alice", digest, coordinator_grant(pki))
        other = {"expression": "1+1"}
        call["arguments"] = other
        grant = ApprovalGrant(REQUEST, "alice", arguments_digest(other), grant.signed)
    else:
        old = coordinator_grant(pki, ttl=30, now=time.time() - 31)
        grant = ApprovalGrant(REQUEST, "alice", digest, old)
    call_id = f"forgery-{case}"
    assert await denied(mesh, call_id, grant, **call) == reason

    async def audited() -> None:
        assert await audit(mesh, call_id) == [("tool.failed", "denied", reason)]

    await eventually(audited, timeout=15)
    await serving(mesh, pki)


async def test_grpc_status_is_permission_denied(mesh: Mesh, pki: Pki) -> None:
    # The raw status too, as any gRPC client (not only ours) sees it.
    channel = secure_channel(mesh.tool.address, pki.files("agent"))
    try:
        request = tool_pb2.InvokeToolRequest(tool_name="calculator", task_id=TASK)
        request.arguments.update(ARGS)
        request.approval.request_id = REQUEST
        request.approval.arguments_digest = arguments_digest(ARGS)
        call = tool_pb2_grpc.ToolServiceStub(channel).InvokeTool(request, timeout=10)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            async for _ in call:
                pass
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    finally:
        await channel.close()


async def test_a_grant_is_used_once_across_tool_service_processes(mesh: Mesh, pki: Pki) -> None:
    task, request = "task-twins", "task-twins-1-input-1"
    signed = coordinator_grant(pki, task_id=task, request_id=request)
    grant = ApprovalGrant(request, "alice", arguments_digest(ARGS), signed)

    async def use(tools: ToolClient, call_id: str) -> object:
        try:
            return await tools.invoke(
                "calculator", ARGS, task_id=task, approval=grant, call_id=call_id
            )
        except PermissionDenied as err:
            return err.reason

    # The same grant at two replicas at once: exactly one runs the call.
    both = await asyncio.gather(use(mesh.tools, "twins-a"), use(mesh.twin, "twins-b"))
    ran = [r for r in both if isinstance(r, ToolOutcome)]
    assert len(ran) == 1 and ran[0].result["value"] == 42, both
    assert [r for r in both if not isinstance(r, ToolOutcome)] == ["APPROVAL_REPLAYED"]
    # And neither takes it again later (a restarted process is one more process).
    for tools, call_id in ((mesh.tools, "twins-c"), (mesh.twin, "twins-d")):
        assert await use(tools, call_id) == "APPROVAL_REPLAYED"
