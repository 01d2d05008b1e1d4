"""The tool service with a real nats-server: tool.* events and registration in discovery."""

from __future__ import annotations

from pathlib import Path

import pytest

from hivewire.discovery import open_registry
from hivewire.services.runtime.channels import secure_channel
from hivewire.services.runtime.errors import PermissionDenied
from hivewire.services.runtime.events import replay
from hivewire.services.tool.client import ToolClient
from hivewire.services.tool.domain import ApprovalRequest, ToolOutcome
from hivewire.services.tool.sdk import arguments_digest
from tests.conftest import Pki
from tests.helpers import NatsServer, ServiceProcess, eventually
from tests.support.tool_plugins import install_plugins, pythonpath


async def tool_events(nats_url: str, call_id: str) -> list[tuple[str, str]]:
    found = []
    async for received in replay(nats_url, "tool.*"):
        data = received.event.tool
        if data.call_id == call_id:
            found.append((received.type, data.outcome))
    return found


async def test_calls_are_published_and_the_service_registers(
    pki: Pki, nats_server: NatsServer, tmp_path: Path
) -> None:
    site = install_plugins(tmp_path / "site")
    process = ServiceProcess(
        "hivewire.services.tool",
        workdir=tmp_path,
        certs_dir=pki.dir,
        identity="tool",
        nats_url=nats_server.url,
        env={
            "PYTHONPATH": pythonpath(site),
            "HIVEWIRE_DISCOVERY": "nats",
            "HIVEWIRE_TOOL__PLUGINS": "hw_test_tools",
        },
    )
    async with process:
        async with open_registry("nats", nats_url=nats_server.url) as registry:

            async def registered() -> None:
                instances = await registry.resolve("hivewire-tool", tag="calculator")
                # Not registered yet right after the ports file appears: poll, do not unpack.
                assert len(instances) == 1, instances
                instance = instances[0]
                assert instance.port == process.port
                assert "delete_file" in instance.tags

            await eventually(registered)

        channel = secure_channel(process.address, pki.files("agent"))
        try:
            tools = ToolClient(channel)
            done = await tools.invoke(
                "calculator", {"expression": "3*3"}, call_id="ev-ok", task_id="task-ev"
            )
            assert isinstance(done, ToolOutcome)
            asked = await tools.invoke("delete_file", {"path": "/x"}, call_id="ev-ask")
            assert isinstance(asked, ApprovalRequest)
            # An admin passes the mesh's authz policy, then the tool policy refuses it.
            client_channel = secure_channel(process.address, pki.files("admin"))
            try:
                with pytest.raises(PermissionDenied):
                    await ToolClient(client_channel).invoke(
                        "calculator", {"expression": "1"}, call_id="ev-denied"
                    )
            finally:
                await client_channel.close()
        finally:
            await channel.close()

        async def published() -> None:
            assert await tool_events(nats_server.url, "ev-ok") == [
                ("tool.invoked", ""),
                ("tool.completed", "ok"),
            ]
            assert await tool_events(nats_server.url, "ev-ask") == [
                ("tool.approval_requested", "approval_required")
            ]
            assert await tool_events(nats_server.url, "ev-denied") == [("tool.failed", "denied")]

        await eventually(published, timeout=15)

        completed = [r async for r in replay(nats_server.url, "tool.completed")]
        [received] = [r for r in completed if r.event.tool.call_id == "ev-ok"]
        data = received.event.tool
        assert received.event.subject == "ev-ok"
        assert data.task_id == "task-ev"
        assert data.caller == pki.spiffe_id("agent")
        assert data.arguments_digest == arguments_digest({"expression": "3*3"})
        assert data.duration.ToNanoseconds() > 0
        assert received.event.source.startswith("tool/")
        assert received.event.correlation_id

    async with open_registry("nats", nats_url=nats_server.url) as registry:

        async def deregistered() -> None:
            assert await registry.resolve("hivewire-tool") == []

        await eventually(deregistered)
