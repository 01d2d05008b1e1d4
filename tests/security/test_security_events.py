"""Refused calls become ``security.*`` events on the mesh's (mTLS) NATS.

A real coordinator publishing to a secured nats-server refuses an agent certificate
calling ``ListTasks`` (``security.authz_denied``) and a call with an unknown API key
(``security.authn_failed``); an event reader sees both, with the caller's identity and
the method, and never the credential.
"""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest

from hivewire.coordinator.v1 import coordinator_pb2, coordinator_pb2_grpc
from hivewire.services.runtime.channels import secure_channel
from hivewire.services.runtime.events import replay
from tests.conftest import Pki
from tests.helpers import NatsServer, ServiceProcess, eventually

pytestmark = pytest.mark.timeout(120)

C = coordinator_pb2
KEY = "hwk_000000000000_not-a-real-secret"


async def test_refusals_are_published_as_security_events(
    pki: Pki, mesh_nats_server: NatsServer, tmp_path: Path
) -> None:
    nats = mesh_nats_server
    process = ServiceProcess(
        "hivewire.services.coordinator",
        workdir=tmp_path,
        certs_dir=pki.dir,
        identity="coordinator",
        nats_url=nats.url,
        env={
            "HIVEWIRE_DISCOVERY": "static",
            "HIVEWIRE_COORDINATOR__DB_PATH": str(tmp_path / "c.db"),
            "HIVEWIRE_AUTH__API_KEYS_FILE": str(tmp_path / "keys.json"),
        },
    )
    async with process:
        for stem, metadata in (
            ("agent", ()),
            ("client", (("authorization", f"Bearer {KEY}"),)),
        ):
            channel = secure_channel(process.address, pki.files(stem))
            try:
                stub = coordinator_pb2_grpc.CoordinatorServiceStub(channel)
                with pytest.raises(grpc.aio.AioRpcError):
                    await stub.ListTasks(C.ListTasksRequest(), metadata=metadata, timeout=10)
            finally:
                await channel.close()

        reader = nats.client_options("client")

        async def published() -> dict[str, tuple[str, str, str, str]]:
            found = {
                r.type: (r.event.security.kind, r.event.security.reason,
                         r.event.security.caller, r.event.security.method)
                async for r in replay(nats.url, "security.*", nats_options=reader)
            }  # fmt: skip
            assert len(found) == 2, found
            return found

        events = await eventually(published, timeout=20)
    method = "/hivewire.coordinator.v1.CoordinatorService/ListTasks"
    assert events["security.authz_denied"] == (
        "authz", "CALLER_NOT_ALLOWED", "spiffe://hivewire.local/agent/default", method
    )  # fmt: skip
    assert events["security.authn_failed"] == (
        "authn", "API_KEY_INVALID", "spiffe://hivewire.local/client/client", method
    )  # fmt: skip
    assert KEY not in process.stdout_path.read_text() + process.stderr_path.read_text()
