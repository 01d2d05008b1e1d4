"""Another principal's task is invisible: a real coordinator, two client certificates.

Mallory (a client certificate of the mesh CA) learns the id of Alice's task and tries
every way in: ``GetTask``, ``WatchTask``, ``CancelTask``, ``ProvideInput``, and a
``Session`` watch, cancel and input. Each is refused as ``NOT_FOUND`` (the task's
existence is not confirmed), and the task is untouched. An admin sees it; an agent
certificate may not list tasks at all (the narrowed default policy).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import grpc
import pytest
import pytest_asyncio

from hivewire.common.v1 import common_pb2
from hivewire.coordinator.v1 import coordinator_pb2, coordinator_pb2_grpc
from hivewire.services.runtime.channels import secure_channel
from hivewire.services.runtime.status import from_rpc_error
from tests.conftest import Pki
from tests.helpers import ServiceProcess

pytestmark = [pytest.mark.asyncio(loop_scope="module"), pytest.mark.timeout(120)]

C = coordinator_pb2
if TYPE_CHECKING:
    Stub = coordinator_pb2_grpc.CoordinatorServiceAsyncStub


@dataclass
class Mesh:
    alice: Stub
    mallory: Stub
    admin: Stub
    agent: Stub
    task_id: str


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def mesh(pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Mesh]:
    workdir = tmp_path_factory.mktemp("ownership")
    files = {
        "alice": pki.issue(role="client", name="alice", stem="client-alice"),
        "mallory": pki.issue(role="client", name="mallory", stem="client-mallory"),
        "admin": pki.files("admin"),
        "agent": pki.files("agent"),
    }
    process = ServiceProcess(
        "hivewire.services.coordinator",
        workdir=workdir,
        certs_dir=pki.dir,
        identity="coordinator",
        env={
            "HIVEWIRE_DISCOVERY": "static",
            "HIVEWIRE_EVENTS__ENABLED": "false",
            "HIVEWIRE_COORDINATOR__DB_PATH": str(workdir / "c.db"),
        },
    )
    async with process:
        channels = {name: secure_channel(process.address, f) for name, f in files.items()}
        try:
            stubs = {n: coordinator_pb2_grpc.CoordinatorServiceStub(c) for n, c in channels.items()}
            spec = C.TaskSpec(capability="calculate", input=common_pb2.Payload(text="1 + 1"))
            done = await stubs["alice"].SubmitTask(C.SubmitTaskRequest(spec=spec), timeout=10)
            yield Mesh(**stubs, task_id=done.task.task_id)  # type: ignore[arg-type]
        finally:
            for channel in channels.values():
                await channel.close()


async def refused(call: object) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        if hasattr(call, "__aiter__"):
            async for _ in call:  # type: ignore[attr-defined]
                pass
        else:
            await call  # type: ignore[misc]
    return err.value.code(), from_rpc_error(err.value).reason


async def test_unary_and_streaming_rpcs_on_anothers_task_are_not_found(mesh: Mesh) -> None:
    task_id = mesh.task_id
    answer = common_pb2.InputResponse(request_id="r-1", approved=True)
    calls = {
        "GetTask": mesh.mallory.GetTask(C.GetTaskRequest(task_id=task_id), timeout=10),
        "WatchTask": mesh.mallory.WatchTask(C.WatchTaskRequest(task_id=task_id), timeout=10),
        "CancelTask": mesh.mallory.CancelTask(C.CancelTaskRequest(task_id=task_id), timeout=10),
        "ProvideInput": mesh.mallory.ProvideInput(
            C.ProvideInputRequest(task_id=task_id, response=answer), timeout=10
        ),
    }
    for name, call in calls.items():
        code, _ = await refused(call)
        assert code == grpc.StatusCode.NOT_FOUND, name
    listed = await mesh.mallory.ListTasks(C.ListTasksRequest(), timeout=10)
    assert task_id not in {t.task_id for t in listed.tasks}
    code, _ = await refused(
        mesh.mallory.ListTasks(
            C.ListTasksRequest(owner="spiffe://hivewire.local/client/alice"), timeout=10
        )
    )
    assert code == grpc.StatusCode.PERMISSION_DENIED
    # Untouched: still queued, and its owner and an admin see it.
    for stub in (mesh.alice, mesh.admin):
        got = await stub.GetTask(C.GetTaskRequest(task_id=task_id), timeout=10)
        assert got.task.state == common_pb2.TASK_STATE_QUEUED


async def test_session_watch_cancel_and_input_on_anothers_task_are_rejected(
    mesh: Mesh,
) -> None:
    call = mesh.mallory.Session(timeout=20)
    requests = [
        C.SessionRequest(watch=C.SessionWatch(task_id=mesh.task_id)),
        C.SessionRequest(cancel=C.SessionCancel(task_id=mesh.task_id, reason="mine now")),
        C.SessionRequest(
            input=C.SessionInput(
                task_id=mesh.task_id,
                response=common_pb2.InputResponse(request_id="r-1", approved=True),
            )
        ),
    ]
    for request in requests:
        await call.write(request)
    rejected = []
    async for response in call:
        assert response.WhichOneof("kind") == "rejected", response
        rejected.append(response.rejected)
        if len(rejected) == len(requests):
            await call.done_writing()
    assert [r.task_id for r in rejected] == [mesh.task_id] * 3
    assert {r.error.code for r in rejected} == {"NOT_FOUND"}
    got = await mesh.alice.GetTask(C.GetTaskRequest(task_id=mesh.task_id), timeout=10)
    assert got.task.state == common_pb2.TASK_STATE_QUEUED


async def test_an_agent_identity_may_not_list_or_hold_sessions(mesh: Mesh) -> None:
    for call in (
        mesh.agent.ListTasks(C.ListTasksRequest(), timeout=10),
        mesh.agent.ListAgents(C.ListAgentsRequest(), timeout=10),
    ):
        assert await refused(call) == (grpc.StatusCode.PERMISSION_DENIED, "CALLER_NOT_ALLOWED")
    # Its own sub-task it may follow.
    spec = C.TaskSpec(capability="summarize", input=common_pb2.Payload(text="x"))
    sub = await mesh.agent.SubmitTask(C.SubmitTaskRequest(spec=spec), timeout=10)
    got = await mesh.agent.GetTask(C.GetTaskRequest(task_id=sub.task.task_id), timeout=10)
    assert got.task.owner == "spiffe://hivewire.local/agent/default"
    code, _ = await refused(mesh.agent.GetTask(C.GetTaskRequest(task_id=mesh.task_id)))
    assert code == grpc.StatusCode.NOT_FOUND
