"""Settings of the tool service: the ``tool`` section, and the tool
service process's settings (the shared ones plus that section).

Every field is set from the environment as ``HIVEWIRE_TOOL__<FIELD>``; lists and the MCP
server table are JSON (``HIVEWIRE_TOOL__HTTP_ALLOWED_HOSTS='["127.0.0.1"]'``), and plain
lists of names may also be given comma-separated (``HIVEWIRE_TOOL__PLUGINS=acme,weather``).
docs/tools.md documents each one.

This module imports nothing of the service itself (only pydantic and the shared
settings), so it loads without the service.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import NoDecode

from hivewire.services.runtime.config import Settings
from hivewire.services.runtime.sections import Section

MCP_SERVER_NAME_PATTERN = r"^[a-z0-9][a-z0-9_-]{0,62}$"
"""MCP server names prefix their tools (``<server>.<tool>``): short, lower case, no dots."""


def _split_names(value: object) -> object:
    """Accept ``"a, b"`` as well as a JSON list for list-of-names settings."""
    if isinstance(value, str):
        if value.lstrip().startswith("["):
            return json.loads(value)
        return [part.strip() for part in value.split(",") if part.strip()]
    return value


# The environment source must hand these over undecoded so "a,b" reaches the validator.
NameList = Annotated[list[str], NoDecode]


class McpServerSettings(Section):
    """One Model Context Protocol server whose tools the service offers.

    Exactly one of ``command`` (a stdio server the service starts as a child process)
    and ``url`` (a streamable-HTTP server that already runs) is set.
    """

    name: str = Field(
        pattern=MCP_SERVER_NAME_PATTERN,
        description="Prefix of the server's tools: they are listed as <name>.<tool>.",
    )
    command: str | None = Field(None, description="Executable of a stdio server.")
    args: list[str] = Field(default_factory=list, description="Arguments of the stdio server.")
    env: dict[str, str] = Field(
        default_factory=dict, description="Extra environment variables of the stdio server."
    )
    cwd: Path | None = Field(None, description="Working directory of the stdio server.")
    url: str | None = Field(None, description="Endpoint of a streamable-HTTP server (…/mcp).")
    requires_approval: bool = Field(
        False, description="Whether every tool of this server needs a person's approval."
    )
    timeout: float = Field(60.0, gt=0, description="Cap (s) on one call to this server's tools.")
    connect_timeout: float = Field(
        15.0, gt=0, description="Seconds to wait for the server at startup before going on."
    )

    @model_validator(mode="after")
    def _one_transport(self) -> McpServerSettings:
        if (self.command is None) == (self.url is None):
            raise ValueError(f"MCP server {self.name!r}: set exactly one of command and url")
        if self.url is not None and not self.url.startswith(("http://", "https://")):
            raise ValueError(f"MCP server {self.name!r}: url must be http:// or https://")
        return self


class ToolSettings(Section):
    """The ``tool`` section: limits, policy, plugins, built-in options and MCP servers."""

    policy_file: Path | None = Field(
        None,
        description=(
            "TOML policy of which caller may call which tool. Unset: agents "
            "(spiffe://hivewire.local/agent/*) may call every tool, nobody else any."
        ),
    )
    default_timeout: float = Field(
        30.0, gt=0, description="Cap (s) on a call of a tool that declares no timeout."
    )
    max_timeout: float = Field(
        300.0, gt=0, description="Hard cap (s) on any call, whatever the tool or caller says."
    )
    max_result_bytes: int = Field(
        256 * 1024,
        ge=1024,
        description="Largest result (JSON) and text a call returns; larger ones are truncated.",
    )
    max_concurrent_calls: int = Field(
        64, ge=1, description="Calls running at once; more get RESOURCE_EXHAUSTED."
    )
    max_sync_threads: int = Field(
        16,
        ge=1,
        description=(
            "Threads for synchronous tools, including threads of timed-out calls that have "
            "not returned yet; when all are busy, calls of sync tools get RESOURCE_EXHAUSTED."
        ),
    )
    plugins: NameList = Field(
        default_factory=lambda: ["*"],
        description="Entry point names (globs) of the hivewire.tools group to load; [] = none.",
    )
    disabled_tools: NameList = Field(
        default_factory=list, description="Tool names (globs) never offered, whatever the source."
    )
    http_allowed_hosts: NameList = Field(
        default_factory=list,
        description=(
            "Hosts http_fetch may reach: names or globs (api.example.com, *.example.org), "
            "optionally with :port. Empty = http_fetch refuses every URL."
        ),
    )
    http_max_bytes: int = Field(
        1024 * 1024, ge=1, description="Largest response body http_fetch reads."
    )
    http_timeout: float = Field(10.0, gt=0, description="Cap (s) on one http_fetch call.")
    http_max_redirects: int = Field(5, ge=0, description="Redirects http_fetch follows.")
    regex_timeout: float = Field(
        1.0, gt=0, description="Cap (s) on one regular expression run by the text tool."
    )
    text_max_chars: int = Field(1_000_000, ge=1, description="Longest text the text tool accepts.")
    approval_issuers: NameList = Field(
        default_factory=lambda: ["spiffe://hivewire.local/coordinator/*"],
        description="SPIFFE id globs whose certificates may sign tool approvals.",
    )
    grant_ledger: Literal["nats", "process"] = Field(
        "nats",
        description=(
            "Where used approvals are remembered: nats (a KV bucket shared by every tool "
            "service of the mesh) or process (this process only)."
        ),
    )
    grant_ledger_ttl: float = Field(
        86400.0,
        gt=0,
        description="Seconds a used approval is remembered; longer-lived grants are refused.",
    )
    mcp_servers: list[McpServerSettings] = Field(
        default_factory=list, description="MCP servers whose tools are offered."
    )
    mcp_serve_port: int | None = Field(
        None,
        ge=0,
        le=65535,
        description=(
            "HTTPS port of the service's own MCP server (streamable HTTP at /mcp, TLS; "
            "callers: a mesh client certificate or a bearer credential); "
            "unset = no MCP server, 0 = any free port (docs/interop.md)."
        ),
    )

    @field_validator("plugins", "disabled_tools", "http_allowed_hosts", mode="before")
    @classmethod
    def _names(cls, value: Any) -> Any:
        return _split_names(value)

    @model_validator(mode="after")
    def _unique_servers(self) -> ToolSettings:
        names = [server.name for server in self.mcp_servers]
        duplicates = sorted({name for name in names if names.count(name) > 1})
        if duplicates:
            raise ValueError(f"MCP server names must be unique: {', '.join(duplicates)}")
        return self


class ToolProcessSettings(Settings):
    """The tool service process's settings: the shared ones and the ``tool`` section."""

    tool: ToolSettings = Field(
        default_factory=ToolSettings, description="Tool service (docs/tools.md)."
    )
