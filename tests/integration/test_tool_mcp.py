"""The MCP bridge against real MCP servers: streamable HTTP, and servers that are down.

(The stdio transport, progress and reconnection after a crash are covered through the
service process in test_tool_grpc.py.)
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from hivewire.services.runtime.values import ErrorInfo, ProgressUpdate
from hivewire.services.tool.domain import (
    ToolCall,
    ToolOutcome,
    ToolSource,
)
from hivewire.services.tool.service import ToolService, open_tool_service
from hivewire.services.tool.settings import ToolSettings
from tests.helpers import eventually
from tests.support.mcp_servers import DEMO_SERVER

AGENT = "spiffe://hivewire.local/agent/test"


@pytest.fixture
async def http_mcp_url(tmp_path: Path) -> AsyncIterator[str]:
    """A real streamable-HTTP MCP server on 127.0.0.1 (the demo server, in its own process)."""
    port_file = tmp_path / "mcp-port.json"
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        str(DEMO_SERVER),
        "--http",
        str(port_file),
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=(tmp_path / "mcp.log").open("wb"),
    )

    def ready() -> str:
        if proc.returncode is not None:
            raise RuntimeError(f"MCP server exited: {(tmp_path / 'mcp.log').read_text()}")
        return str(json.loads(port_file.read_text())["url"])

    try:
        yield await eventually(ready, timeout=20, retry_on=(FileNotFoundError,))
    finally:
        with contextlib.suppress(ProcessLookupError):
            proc.terminate()
        await proc.wait()


async def events(service: ToolService, name: str, arguments: dict[str, Any]) -> list[Any]:
    call = ToolCall(tool_name=name, arguments=arguments, caller=AGENT)
    return [event async for event in service.invoke(call)]


async def test_streamable_http_server(http_mcp_url: str) -> None:
    settings = ToolSettings(plugins=[], mcp_servers=[{"name": "remote", "url": http_mcp_url}])
    async with open_tool_service(settings) as service:
        listed = {t.name: t for t in service.list_tools(AGENT)}
        assert {"remote.add", "remote.countdown", "remote.fail"} <= set(listed)
        assert listed["remote.add"].source is ToolSource.MCP
        assert listed["remote.add"].output_schema is not None

        [added] = await events(service, "remote.add", {"a": 5, "b": 6})
        assert added == ToolOutcome(result={"result": 11}, text="11")

        *progress, done = await events(service, "remote.countdown", {"steps": 2})
        assert [p.message for p in progress if isinstance(p, ProgressUpdate)] == [
            "step 1",
            "step 2",
        ]
        assert isinstance(done, ToolOutcome) and done.text == "liftoff"

        [failed] = await events(service, "remote.fail", {"reason": "x"})
        assert isinstance(failed, ErrorInfo) and failed.reason == "MCP_TOOL_ERROR"


async def test_servers_that_are_down_do_not_stop_the_service(tmp_path: Path) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        closed_port = sock.getsockname()[1]
    settings = ToolSettings(
        plugins=[],
        mcp_servers=[
            {"name": "gone", "url": f"http://127.0.0.1:{closed_port}/mcp", "connect_timeout": 2},
            {"name": "missing", "command": str(tmp_path / "no-such-binary"), "connect_timeout": 2},
        ],
    )
    async with asyncio.timeout(15), open_tool_service(settings) as service:
        names = {t.name for t in service.list_tools(AGENT)}
        assert "calculator" in names
        assert not any(name.startswith(("gone.", "missing.")) for name in names)
        assert service.bridge is not None
        assert not any(c.connected for c in service.bridge.connections)
        [ok] = await events(service, "calculator", {"expression": "1 + 1"})
        assert isinstance(ok, ToolOutcome)
