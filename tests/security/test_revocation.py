"""A revoked certificate is refused by a running service, without a restart.

A real tool service reads the deny list ``revoked.txt`` that ``hivewire certs revoke``
writes. Revoking one agent's certificate refuses it (``UNAUTHENTICATED``,
``CERT_REVOKED``) from a following call while other agents carry on; a reissued
certificate of the same identity works; listing the SPIFFE id refuses the identity.
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import grpc
import pytest

from hivewire.services.runtime.channels import secure_channel
from hivewire.services.runtime.status import from_rpc_error
from hivewire.services.runtime.tls import TlsFiles
from hivewire.tool.v1 import tool_pb2, tool_pb2_grpc
from tests.conftest import Pki
from tests.helpers import ServiceProcess, eventually

pytestmark = pytest.mark.timeout(120)

HIVEWIRE = Path(sys.executable).parent / "hivewire"


async def list_tools(address: str, files: TlsFiles) -> grpc.StatusCode | str:
    """OK, or the refusal's reason."""
    channel = secure_channel(address, files)
    try:
        stub = tool_pb2_grpc.ToolServiceStub(channel)
        await stub.ListTools(tool_pb2.ListToolsRequest(), timeout=10)
        return grpc.StatusCode.OK
    except grpc.aio.AioRpcError as err:
        assert err.code() == grpc.StatusCode.UNAUTHENTICATED, err
        return from_rpc_error(err).reason
    finally:
        await channel.close()


async def test_revoked_certificates_and_identities_are_refused(pki: Pki, tmp_path: Path) -> None:
    victim = pki.issue(role="agent", name="victim", stem="agent-victim")
    deny_list = pki.dir / "revoked.txt"
    process = ServiceProcess(
        "hivewire.services.tool",
        workdir=tmp_path,
        certs_dir=pki.dir,
        identity="tool",
        env={
            "HIVEWIRE_DISCOVERY": "static",
            "HIVEWIRE_EVENTS__ENABLED": "false",
            "HIVEWIRE_TOOL__PLUGINS": "",
            "HIVEWIRE_REVOKED_CERTS_FILE": str(deny_list),
        },
    )
    async with process:
        assert await list_tools(process.address, victim) == grpc.StatusCode.OK
        revoke = await asyncio.create_subprocess_exec(
            str(HIVEWIRE), "certs", "revoke", "agent-victim", "--dir", str(pki.dir),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        out, err = await revoke.communicate()
        assert revoke.returncode == 0, (out, err)
        assert b"revoked agent-victim" in out

        async def refused() -> None:
            assert await list_tools(process.address, victim) == "CERT_REVOKED"

        await eventually(refused, timeout=15)
        assert await list_tools(process.address, pki.files("agent")) == grpc.StatusCode.OK

        # A new certificate for the same identity has a new serial: accepted.
        renewed = pki.issue(role="agent", name="victim", stem="agent-victim")
        assert await list_tools(process.address, renewed) == grpc.StatusCode.OK

        # Listing the identity refuses every certificate it has.
        with deny_list.open("a") as f:
            f.write("spiffe://hivewire.local/agent/victim  # removed from the mesh\n")

        async def identity_refused() -> None:
            assert await list_tools(process.address, renewed) == "CERT_REVOKED"

        await eventually(identity_refused, timeout=15)
