"""Per-principal rate limits on a real coordinator: one client floods, the others carry on.

The coordinator (no agents: accepted tasks stay queued, so they count as active) allows
each principal a burst of 3 submissions refilled at one per 10 s, and alice at most 2
tasks queued or running. A client that floods gets ``RESOURCE_EXHAUSTED`` with
``RetryInfo`` and ``QuotaFailure``, and nothing of a refused submission is stored;
another client submits undisturbed.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass

import grpc
import pytest
import pytest_asyncio
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from hivewire.common.v1 import common_pb2
from hivewire.coordinator.v1 import coordinator_pb2, coordinator_pb2_grpc
from hivewire.services.runtime.channels import secure_channel
from tests.conftest import Pki
from tests.helpers import ServiceProcess

pytestmark = [pytest.mark.asyncio(loop_scope="module"), pytest.mark.timeout(120)]

C = coordinator_pb2
ALICE = "spiffe://hivewire.local/client/alice"


@dataclass
class Clients:
    flooder: coordinator_pb2_grpc.CoordinatorServiceAsyncStub
    bystander: coordinator_pb2_grpc.CoordinatorServiceAsyncStub
    alice: coordinator_pb2_grpc.CoordinatorServiceAsyncStub


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def clients(pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Clients]:
    workdir = tmp_path_factory.mktemp("rate-limits")
    files = {
        "flooder": pki.issue(role="client", name="flooder", stem="client-flooder"),
        "bystander": pki.issue(role="client", name="bystander", stem="client-bystander"),
        "alice": pki.issue(role="client", name="alice", stem="client-alice"),
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
            "HIVEWIRE_COORDINATOR__QUOTAS__SUBMIT_RATE": "0.1",
            "HIVEWIRE_COORDINATOR__QUOTAS__SUBMIT_BURST": "3",
            "HIVEWIRE_COORDINATOR__QUOTAS__PRINCIPALS": json.dumps({ALICE: {"max_active": 2}}),
        },
    )
    async with process:
        channels = {name: secure_channel(process.address, f) for name, f in files.items()}
        try:
            stubs = {
                name: coordinator_pb2_grpc.CoordinatorServiceStub(channel)
                for name, channel in channels.items()
            }
            yield Clients(**stubs)  # type: ignore[arg-type]
        finally:
            for channel in channels.values():
                await channel.close()


def request(text: str) -> C.SubmitTaskRequest:
    return C.SubmitTaskRequest(
        spec=C.TaskSpec(capability="calculate", input=common_pb2.Payload(text=text))
    )


async def flood(
    stub: coordinator_pb2_grpc.CoordinatorServiceAsyncStub, count: int
) -> tuple[int, list[grpc.aio.AioRpcError]]:
    accepted, refused = 0, []
    for i in range(count):
        try:
            await stub.SubmitTask(request(f"{i} + 1"), timeout=10)
            accepted += 1
        except grpc.aio.AioRpcError as err:
            refused.append(err)
    return accepted, refused


def details(err: grpc.aio.AioRpcError) -> tuple[str, float, str]:
    status = rpc_status.from_call(err)
    assert status is not None
    reason, delay, subject = "", 0.0, ""
    for packed in status.details:
        info, retry, quota = (
            error_details_pb2.ErrorInfo(),
            error_details_pb2.RetryInfo(),
            error_details_pb2.QuotaFailure(),
        )
        if packed.Unpack(info):
            reason = info.reason
        elif packed.Unpack(retry):
            delay = retry.retry_delay.ToTimedelta().total_seconds()
        elif packed.Unpack(quota):
            subject = quota.violations[0].subject
    return reason, delay, subject


async def listed(stub: coordinator_pb2_grpc.CoordinatorServiceAsyncStub) -> int:
    return len((await stub.ListTasks(C.ListTasksRequest(page_size=100), timeout=10)).tasks)


async def test_a_flooding_client_is_limited_and_the_others_are_not(clients: Clients) -> None:
    accepted, refused = await flood(clients.flooder, 12)
    assert 3 <= accepted < 12 and refused
    for err in refused:
        assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        reason, delay, subject = details(err)
        assert reason == "RATE_LIMITED" and delay > 0
        assert subject == "principal:spiffe://hivewire.local/client/flooder"
    # Nothing of a refused submission was stored.
    assert await listed(clients.flooder) == accepted
    # The bystander's bucket is its own: its burst goes through right after the flood.
    assert await flood(clients.bystander, 3) == (3, [])
    assert await listed(clients.bystander) == 3


async def test_the_active_task_cap(clients: Clients) -> None:
    accepted, refused = await flood(clients.alice, 3)
    assert accepted == 2 and len(refused) == 1
    reason, delay, subject = details(refused[0])
    assert reason == "TOO_MANY_ACTIVE_TASKS" and delay > 0 and subject == f"principal:{ALICE}"
    assert await listed(clients.alice) == 2
