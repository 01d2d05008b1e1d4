"""Bridge to Model Context Protocol servers: their tools, listed and called as ours.

Each server in ``HIVEWIRE_TOOL__MCP_SERVERS`` gets a connection task that opens an
official ``mcp`` SDK client (stdio: the service starts the server as a child process;
streamable HTTP: it connects to the URL), lists the server's tools and registers them as
``<server>.<tool>``. Calls go through that one long-lived session.

A server that cannot be reached at startup does not stop the service: its tools are
missing until a retry (exponential back-off up to 30 s) succeeds. A call that finds the
connection broken gets ``UNAVAILABLE`` (reason ``MCP_SERVER_UNAVAILABLE``) and triggers
a reconnect; the tools stay listed meanwhile. A tool result flagged ``isError`` is a
classified error result (reason ``MCP_TOOL_ERROR``); an MCP protocol error is one too
(reason ``MCP_ERROR``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Mapping
from typing import Any

import anyio
from jsonschema.exceptions import SchemaError
from mcp import Client, MCPError, StdioServerParameters
from mcp.types import CONNECTION_CLOSED

from hivewire.services.base.lifecycle import StartStop, cancel_and_wait
from hivewire.services.runtime.errors import Unavailable
from hivewire.services.tool.domain import ToolInfo, ToolSource
from hivewire.services.tool.registry import Tool, ToolRegistry
from hivewire.services.tool.sdk import TOOL_NAME_PATTERN, ToolContext, ToolError, normalize_json
from hivewire.services.tool.settings import McpServerSettings

logger = logging.getLogger(__name__)

_MAX_BACKOFF = 30.0
_MAX_PAGES = 100
# What a broken transport raises from a call: the session's streams are closed or the
# child process is gone.
_TRANSPORT_ERRORS: tuple[type[BaseException], ...] = (
    anyio.ClosedResourceError,
    anyio.BrokenResourceError,
    anyio.EndOfStream,
    ConnectionError,
    OSError,
)


def _block_json(block: Any) -> Any:
    dump = getattr(block, "model_dump", None)
    if callable(dump):
        return dump(mode="json", by_alias=True, exclude_none=True)
    return str(block)


def _block_text(block: Any) -> str:
    kind = getattr(block, "type", "")
    if kind == "text":
        return str(getattr(block, "text", ""))
    if kind in ("image", "audio"):
        mime = getattr(block, "mime_type", "") or getattr(block, "mimeType", "")
        return f"[{kind} {mime}]"
    if kind == "resource_link":
        return f"[resource {getattr(block, 'uri', '')}]"
    if kind == "resource":
        resource = getattr(block, "resource", None)
        text = getattr(resource, "text", None)
        return str(text) if text is not None else f"[resource {getattr(resource, 'uri', '')}]"
    return f"[{kind}]"


class McpConnection:
    """One configured MCP server: its session, its tools, and reconnection."""

    def __init__(self, config: McpServerSettings, registry: ToolRegistry) -> None:
        """Prepare the connection (nothing runs until :meth:`run`).

        Args:
            config: The server's settings.
            registry: Where its tools are registered.
        """
        self.config = config
        self._registry = registry
        self._client: Client | None = None
        self._broken = asyncio.Event()
        self.ready = asyncio.Event()
        self.tool_names: list[str] = []

    @property
    def name(self) -> str:
        """The server's configured name (its tools' prefix)."""
        return self.config.name

    @property
    def connected(self) -> bool:
        """Whether a session is open now."""
        return self._client is not None

    def _target(self) -> StdioServerParameters | str:
        config = self.config
        if config.url is not None:
            return config.url
        assert config.command is not None
        return StdioServerParameters(
            command=config.command,
            args=list(config.args),
            env=dict(config.env) or None,
            cwd=config.cwd,
        )

    def mark_broken(self) -> None:
        """Ask the connection task to reconnect (a call saw the transport fail)."""
        self._broken.set()

    async def run(self) -> None:
        """Keep a session open until cancelled, reconnecting with back-off."""
        backoff = 0.5
        while True:
            try:
                async with contextlib.AsyncExitStack() as stack:
                    async with asyncio.timeout(self.config.connect_timeout):
                        client = await stack.enter_async_context(Client(self._target()))
                        tools = await self._list_tools(client)
                    self._client = client
                    self._register(tools, client)
                    self.ready.set()
                    backoff = 0.5
                    self._broken.clear()
                    await self._broken.wait()
                    logger.warning("MCP server %s: connection broken, reconnecting", self.name)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                logger.warning(
                    "MCP server %s unavailable (%s: %s); retrying in %.1fs",
                    self.name,
                    type(exc).__name__,
                    exc,
                    backoff,
                )
            finally:
                self._client = None
            # The first attempt is over either way: startup need not wait any longer.
            self.ready.set()
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, _MAX_BACKOFF)

    async def _list_tools(self, client: Client) -> list[Any]:
        tools: list[Any] = []
        cursor: str | None = None
        for _ in range(_MAX_PAGES):
            page = await client.list_tools(cursor=cursor)
            tools.extend(page.tools)
            cursor = page.next_cursor
            if cursor is None:
                break
        return tools

    def _register(self, remote_tools: list[Any], client: Client) -> None:
        server_info = client.server_info
        version = getattr(server_info, "version", "") or ""
        tools: list[Tool] = []
        for remote in remote_tools:
            name = f"{self.name}.{remote.name}"
            if not TOOL_NAME_PATTERN.match(name):
                logger.warning(
                    "MCP server %s: tool name %r not usable; skipped", self.name, remote.name
                )
                continue
            info = ToolInfo(
                name=name,
                description=(remote.description or remote.title or remote.name or "").strip(),
                input_schema=dict(remote.input_schema or {"type": "object"}),
                output_schema=dict(remote.output_schema) if remote.output_schema else None,
                requires_approval=self.config.requires_approval,
                source=ToolSource.MCP,
                version=version,
            )
            try:
                tools.append(McpTool(info, self, remote.name))
            except SchemaError as exc:
                logger.warning("MCP tool %s has an invalid input schema (%s); skipped", name, exc)
        self._registry.replace_group(f"mcp:{self.name}", tools)
        self.tool_names = [tool.name for tool in tools if self._registry.get(tool.name) is tool]
        logger.info(
            "MCP server %s: %d tool(s): %s", self.name, len(tools), ", ".join(self.tool_names)
        )

    async def call(
        self, remote_name: str, arguments: Mapping[str, Any], ctx: ToolContext
    ) -> tuple[dict[str, Any], str]:
        """Call a tool of this server.

        Raises:
            Unavailable: No session, or the transport failed during the call.
            ToolError: The tool reported an error, or the server answered with an MCP error.
        """
        client = self._client
        if client is None:
            raise Unavailable(
                f"MCP server {self.name} is not connected",
                retry_after=1.0,
                reason="MCP_SERVER_UNAVAILABLE",
            )

        async def on_progress(progress: float, total: float | None, message: str | None) -> None:
            fraction = progress / total if total else 0.0
            ctx.progress(fraction, "mcp", message or "")

        try:
            result = await client.call_tool(
                remote_name, dict(arguments), progress_callback=on_progress
            )
        except MCPError as exc:
            if exc.code == CONNECTION_CLOSED:
                self.mark_broken()
                raise Unavailable(
                    f"MCP server {self.name}: connection closed",
                    retry_after=1.0,
                    reason="MCP_SERVER_UNAVAILABLE",
                ) from None
            raise ToolError(
                f"MCP server {self.name}: {exc.message}",
                reason="MCP_ERROR",
                code="UNKNOWN",
                metadata={"mcp_code": str(exc.code)},
            ) from None
        except _TRANSPORT_ERRORS as exc:
            self.mark_broken()
            raise Unavailable(
                f"MCP server {self.name}: connection lost ({type(exc).__name__})",
                retry_after=1.0,
                reason="MCP_SERVER_UNAVAILABLE",
            ) from None
        text = "\n".join(_block_text(block) for block in result.content)
        if result.is_error:
            raise ToolError(
                text or f"{self.name}.{remote_name} failed", reason="MCP_TOOL_ERROR", code="UNKNOWN"
            )
        structured = result.structured_content
        if isinstance(structured, Mapping):
            data: dict[str, Any] = normalize_json(dict(structured))
        elif structured is not None:
            data = {"result": normalize_json(structured)}
        else:
            data = {"content": [_block_json(block) for block in result.content]}
        return data, text


class McpTool(Tool):
    """A tool of an MCP server, named ``<server>.<tool>``."""

    def __init__(self, info: ToolInfo, connection: McpConnection, remote_name: str) -> None:
        """Create the tool.

        Raises:
            jsonschema.exceptions.SchemaError: The server's input schema is invalid.
        """
        super().__init__(info, timeout=connection.config.timeout)
        self._connection = connection
        self.remote_name = remote_name

    async def call(
        self, arguments: Mapping[str, Any], ctx: ToolContext
    ) -> tuple[dict[str, Any], str]:
        """Call the remote tool through the server's session."""
        return await self._connection.call(self.remote_name, arguments, ctx)


class McpBridge(StartStop):
    """Every configured MCP server, connected for the service's lifetime."""

    def __init__(self, servers: list[McpServerSettings], registry: ToolRegistry) -> None:
        """Prepare the connections.

        Args:
            servers: The configured servers.
            registry: Where their tools go.
        """
        self.connections = [McpConnection(config, registry) for config in servers]
        self._tasks: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        """Connect to every server; wait for each one's first attempt."""
        for connection in self.connections:
            self._tasks.append(asyncio.create_task(connection.run(), name=f"mcp-{connection.name}"))
        # Wait for each server's first attempt, bounded by its connect timeout, so that a
        # service that reports SERVING lists the tools of every server that is up.
        waits = [
            asyncio.wait_for(connection.ready.wait(), connection.config.connect_timeout + 1.0)
            for connection in self.connections
        ]
        for connection, outcome in zip(
            self.connections, await asyncio.gather(*waits, return_exceptions=True), strict=True
        ):
            if isinstance(outcome, BaseException):
                logger.warning("MCP server %s: no answer at startup; retrying", connection.name)

    async def stop(self) -> None:
        """Stop every server's connection loop."""
        await cancel_and_wait(self._tasks, suppress=(Exception,))
        self._tasks.clear()
