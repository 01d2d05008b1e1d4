"""The tool service as an MCP server, used by the official ``mcp`` client SDK.

Real processes over mTLS: nats-server (the tool service's audit events) and the tool
service with ``HIVEWIRE_TOOL__MCP_SERVE_PORT`` set, an API key file, and a policy giving
three callers different tools: the certificates ``client/mcp`` and ``client/mcp-reader``
and the API key of ``client/ops-bot``. The client is the SDK's ``mcp.Client`` over
streamable HTTP, with a client certificate of the mesh CA or a bearer API key; each
caller is its own identity for the policy and the audit.
"""

from __future__ import annotations

import contextlib
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import httpx2
import mcp_types as types
import pytest
import pytest_asyncio
from mcp import Client, MCPError
from mcp.client.streamable_http import streamable_http_client
from mcp_types.jsonrpc import INVALID_PARAMS

from hivewire.services.runtime.authn import ApiKeyStore
from hivewire.services.runtime.events import replay
from hivewire.services.tool.sdk import arguments_digest
from tests.conftest import Pki
from tests.helpers import NatsServer, ServiceProcess, eventually
from tests.support.a2a_mesh import client_ssl_context
from tests.support.tool_mesh import tool_process

pytestmark = [pytest.mark.asyncio(loop_scope="module"), pytest.mark.timeout(120)]

MCP_IDENTITY = "spiffe://hivewire.local/client/mcp"
READER_IDENTITY = "spiffe://hivewire.local/client/mcp-reader"
BOT_IDENTITY = "spiffe://hivewire.local/client/ops-bot"
POLICY = """\
version = 1

[[rules]]
description = "agents"
callers = ["spiffe://hivewire.local/agent/*"]
allow = ["*"]

[[rules]]
description = "MCP assistants: arithmetic freely, JSON queries with a person's yes"
callers = ["spiffe://hivewire.local/client/mcp"]
allow = ["calculator", "json_query"]
require_approval = ["json_query"]

[[rules]]
description = "a reader assistant: text only"
callers = ["spiffe://hivewire.local/client/mcp-reader"]
allow = ["text"]

[[rules]]
description = "an operations bot with an API key: arithmetic and text"
callers = ["spiffe://hivewire.local/client/ops-bot"]
allow = ["calculator", "text"]
"""


@dataclass
class McpMesh:
    nats: NatsServer
    tool: ServiceProcess
    ssl: ssl.SSLContext
    reader_ssl: ssl.SSLContext
    anonymous_ssl: ssl.SSLContext
    bot_key: str

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.tool.ports['mcp']}/mcp"

    def client(
        self, *, tls: ssl.SSLContext | None = None, token: str = "", **kwargs: Any
    ) -> Client:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        http = httpx2.AsyncClient(
            verify=tls or self.ssl, headers=headers, timeout=httpx2.Timeout(30, read=120)
        )
        return Client(streamable_http_client(self.url, http_client=http), **kwargs)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def mesh(pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[McpMesh]:
    workdir = tmp_path_factory.mktemp("e2e-mcp")
    policy = workdir / "tool-policy.toml"
    policy.write_text(POLICY)
    bot_key, _ = ApiKeyStore(workdir / "api-keys.json").create("ops-bot")
    reader = pki.issue(role="client", name="mcp-reader", stem="mcp-reader")
    async with contextlib.AsyncExitStack() as stack:
        nats = await stack.enter_async_context(NatsServer(workdir / "nats"))
        tool = await stack.enter_async_context(
            tool_process(
                workdir,
                certs_dir=pki.dir,
                nats_url=nats.url,
                policy_file=policy,
                env={
                    "HIVEWIRE_TOOL__MCP_SERVE_PORT": "0",
                    "HIVEWIRE_AUTH__API_KEYS_FILE": str(workdir / "api-keys.json"),
                },
            )
        )
        anonymous = ssl.create_default_context(cafile=str(pki.files("mcp").ca))
        yield McpMesh(
            nats,
            tool,
            client_ssl_context(pki.files("mcp")),
            client_ssl_context(reader),
            anonymous,
            bot_key,
        )


async def tool_events(mesh: McpMesh, digest: str) -> list[tuple[str, str]]:
    return [
        (r.type, r.event.tool.caller)
        async for r in replay(mesh.nats.url, "tool.*")
        if r.event.tool.arguments_digest == digest
    ]


async def test_lists_exactly_the_tools_the_policy_allows_with_their_schemas(mesh: McpMesh) -> None:
    async with mesh.client() as client:
        listed = await client.list_tools()
    tools = {tool.name: tool for tool in listed.tools}
    assert set(tools) == {"calculator", "json_query"}
    schema = tools["calculator"].input_schema
    assert schema["type"] == "object"
    assert schema["required"] == ["expression"]
    assert schema["properties"]["expression"]["type"] == "string"
    assert tools["json_query"].meta is not None
    assert tools["json_query"].meta["hivewire/requiresApproval"] is True
    assert tools["calculator"].meta["hivewire/requiresApproval"] is False  # type: ignore[index]


async def test_calls_a_tool_under_the_audit(mesh: McpMesh) -> None:
    arguments = {"expression": "6 * 7 + 0"}
    async with mesh.client() as client:
        result = await client.call_tool("calculator", arguments)
    assert not result.is_error
    assert isinstance(result.content[0], types.TextContent)
    assert result.content[0].text == "42"
    assert result.structured_content == {"value": 42, "expression": "6 * 7 + 0"}

    async def audited() -> None:
        seen = await tool_events(mesh, arguments_digest(arguments))
        assert ("tool.completed", MCP_IDENTITY) in seen, seen

    await eventually(audited, timeout=20, interval=0.2)


async def test_a_failing_tool_is_an_error_result(mesh: McpMesh) -> None:
    async with mesh.client() as client:
        result = await client.call_tool("calculator", {"expression": "1 / 0"})
    assert result.is_error
    assert isinstance(result.content[0], types.TextContent)
    assert result.content[0].text.startswith("DIVISION_BY_ZERO")


async def test_a_schema_violation_is_an_mcp_error(mesh: McpMesh) -> None:
    async with mesh.client() as client:
        with pytest.raises(MCPError) as raised:
            await client.call_tool("calculator", {"expression": 7})
    assert raised.value.code == INVALID_PARAMS
    assert raised.value.data["reason"] == "INVALID_TOOL_ARGUMENTS"
    assert raised.value.data["violations"][0]["field"] == "arguments.expression"


async def test_a_tool_outside_the_policy_is_an_mcp_error(mesh: McpMesh) -> None:
    async with mesh.client() as client:
        with pytest.raises(MCPError) as raised:
            await client.call_tool("text", {"text": "x", "operation": "upper"})
    assert raised.value.code == INVALID_PARAMS
    assert raised.value.data["reason"] == "TOOL_NOT_ALLOWED"


def elicitation(answer: bool, asked: list[str]) -> Any:
    async def callback(context: Any, params: types.ElicitRequestParams) -> types.ElicitResult:
        asked.append(params.message)
        return types.ElicitResult(action="accept", content={"approve": answer})

    return callback


# "auto" negotiates protocol 2026-07-28 (the approval travels in an InputRequiredResult and
# the retried call); "legacy" the initialize handshake (a server-to-client elicitation).
MODES = pytest.mark.parametrize("mode", ["auto", "legacy"])


@MODES
async def test_a_tool_that_needs_approval_runs_after_the_person_says_yes(
    mesh: McpMesh, mode: str
) -> None:
    arguments = {"document": {"planets": ["Mercury", "Venus"]}, "query": f"planets[1] || '{mode}'"}
    asked: list[str] = []
    async with mesh.client(mode=mode, elicitation_callback=elicitation(True, asked)) as client:
        result = await client.call_tool("json_query", arguments)
    assert len(asked) == 1 and "json_query" in asked[0]
    assert not result.is_error, result
    assert result.structured_content == {"result": "Venus"}

    async def audited() -> None:
        seen = [kind for kind, _ in await tool_events(mesh, arguments_digest(arguments))]
        assert seen == ["tool.approval_requested", "tool.invoked", "tool.completed"], seen

    await eventually(audited, timeout=20, interval=0.2)


@MODES
async def test_a_tool_that_needs_approval_does_not_run_on_a_no(mesh: McpMesh, mode: str) -> None:
    arguments = {"document": {"a": 1}, "query": f"a || '{mode}'"}
    asked: list[str] = []
    async with mesh.client(mode=mode, elicitation_callback=elicitation(False, asked)) as client:
        result = await client.call_tool("json_query", arguments)
    assert len(asked) == 1
    assert result.is_error
    assert isinstance(result.content[0], types.TextContent)
    assert result.content[0].text.startswith("APPROVAL_DENIED")
    seen = [kind for kind, _ in await tool_events(mesh, arguments_digest(arguments))]
    assert "tool.invoked" not in seen and "tool.completed" not in seen


@MODES
async def test_without_elicitation_the_tool_does_not_run(mesh: McpMesh, mode: str) -> None:
    arguments = {"document": {"b": 2}, "query": f"b || '{mode}'"}
    async with mesh.client(mode=mode) as client:
        if mode == "auto":
            # The SDK client itself refuses the embedded elicitation it cannot answer.
            with pytest.raises(MCPError, match="Elicitation not supported"):
                await client.call_tool("json_query", arguments)
        else:
            result = await client.call_tool("json_query", arguments)
            assert result.is_error
            assert isinstance(result.content[0], types.TextContent)
            assert result.content[0].text.startswith("APPROVAL_REQUIRED: json_query")
    seen = [kind for kind, _ in await tool_events(mesh, arguments_digest(arguments))]
    assert seen == ["tool.approval_requested"], seen


async def test_each_caller_gets_the_tools_the_policy_allows_it(mesh: McpMesh) -> None:
    callers: dict[str, Client] = {
        "mcp certificate": mesh.client(),
        "reader certificate": mesh.client(tls=mesh.reader_ssl),
        "bot API key, no certificate": mesh.client(tls=mesh.anonymous_ssl, token=mesh.bot_key),
    }
    listed: dict[str, set[str]] = {}
    for name, client in callers.items():
        async with client:
            listed[name] = {tool.name for tool in (await client.list_tools()).tools}
    assert listed == {
        "mcp certificate": {"calculator", "json_query"},
        "reader certificate": {"text"},
        "bot API key, no certificate": {"calculator", "text"},
    }
    async with mesh.client(tls=mesh.reader_ssl) as reader:
        with pytest.raises(MCPError) as raised:
            await reader.call_tool("calculator", {"expression": "1 + 1"})
        assert raised.value.data["reason"] == "TOOL_NOT_ALLOWED"
        text = await reader.call_tool("text", {"text": "two words", "operation": "count"})
        assert not text.is_error, text
    arguments = {"expression": "40 + 2 + 0 * 1"}
    async with mesh.client(tls=mesh.anonymous_ssl, token=mesh.bot_key) as bot:
        result = await bot.call_tool("calculator", arguments)
        assert result.structured_content == {"value": 42, "expression": arguments["expression"]}
        with pytest.raises(MCPError) as raised:
            await bot.call_tool("json_query", {"document": {}, "query": "a"})
        assert raised.value.data["reason"] == "TOOL_NOT_ALLOWED"

    async def audited() -> None:
        seen = await tool_events(mesh, arguments_digest(arguments))
        assert ("tool.completed", BOT_IDENTITY) in seen, seen

    await eventually(audited, timeout=20, interval=0.2)


async def test_a_client_without_credentials_is_refused(
    mesh: McpMesh, pki: Pki, foreign_pki: Pki
) -> None:
    initialize = {"jsonrpc": "2.0", "id": 1, "method": "tools/list"}
    async with httpx2.AsyncClient(verify=mesh.anonymous_ssl) as http:
        refused = await http.post(mesh.url, json=initialize)
        assert refused.status_code == 401
        assert refused.headers["www-authenticate"] == 'Bearer realm="hivewire"'
        assert refused.json()["error"]["reason"] == "NO_CREDENTIALS"
        bad = await http.post(
            mesh.url, json=initialize, headers={"Authorization": "Bearer hwk_nope_nope"}
        )
        assert bad.status_code == 401
        assert bad.json()["error"]["reason"] == "API_KEY_INVALID"
    # The SDK client is refused too.
    with pytest.raises(BaseException) as raised:
        async with mesh.client(tls=mesh.anonymous_ssl) as client:
            await client.list_tools()
    # (the SDK reports the 401 as an error response without its status)
    assert any(isinstance(leaf, MCPError) for leaf in leaves(raised.value)), raised.value
    # A certificate of another CA does not get through the TLS handshake.
    foreign = ssl.create_default_context(cafile=str(pki.files("mcp").ca))
    files = foreign_pki.files("client")
    foreign.load_cert_chain(str(files.cert), str(files.key))
    async with httpx2.AsyncClient(verify=foreign) as http:
        with pytest.raises(httpx2.HTTPError):
            await http.post(mesh.url, json=initialize)


def leaves(error: BaseException) -> list[BaseException]:
    """The exceptions inside (nested) exception groups."""
    if isinstance(error, BaseExceptionGroup):
        return [leaf for inner in error.exceptions for leaf in leaves(inner)]
    return [error]
