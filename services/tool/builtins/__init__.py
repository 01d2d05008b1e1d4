"""The built-in tools: ``calculator``, ``json_query``, ``http_fetch`` and ``text``.

:class:`Builtins` builds them from the settings and owns what they share (the pooled
HTTP client of ``http_fetch``), so the service opens it once and closes it on shutdown.
"""

from __future__ import annotations

import logging

import httpx

from hivewire.services.base.lifecycle import StartClose
from hivewire.services.tool.builtins.calculator import calculator
from hivewire.services.tool.builtins.http_fetch import make_http_fetch_tool
from hivewire.services.tool.builtins.json_query import json_query
from hivewire.services.tool.builtins.text import make_text_tool
from hivewire.services.tool.sdk import ToolDefinition, definition_of
from hivewire.services.tool.settings import ToolSettings

logger = logging.getLogger(__name__)

__all__ = ["Builtins"]


class Builtins(StartClose):
    """The built-in tools and their shared resources (an async context manager)."""

    def __init__(
        self, settings: ToolSettings, *, transport: httpx.AsyncBaseTransport | None = None
    ) -> None:
        """Prepare the built-ins.

        Args:
            settings: The tool settings (allow-list, limits).
            transport: HTTP transport for ``http_fetch`` (tests may inject one).
        """
        self._settings = settings
        self._transport = transport
        self._client: httpx.AsyncClient | None = None

    def _http(self) -> httpx.AsyncClient:
        if self._client is None:
            raise RuntimeError("built-in tools used outside their context")
        return self._client

    def definitions(self) -> list[ToolDefinition]:
        """Every built-in tool."""
        found = [definition_of(calculator), definition_of(json_query)]
        tools = [d for d in found if d is not None]
        tools.append(make_http_fetch_tool(self._settings, self._http))
        tools.append(make_text_tool(self._settings))
        return tools

    async def start(self) -> None:
        """Open the HTTP client of ``http_fetch``."""
        self._client = httpx.AsyncClient(
            transport=self._transport,
            trust_env=False,
            follow_redirects=False,
            timeout=httpx.Timeout(self._settings.http_timeout),
            limits=httpx.Limits(max_connections=32, max_keepalive_connections=8),
            headers={"User-Agent": "hivewire-tool/1"},
        )
        if not self._settings.http_allowed_hosts:
            logger.info("http_fetch: no allowed hosts configured, every URL will be refused")

    async def close(self) -> None:
        """Close the HTTP client."""
        if self._client is not None:
            await self._client.aclose()
            self._client = None
