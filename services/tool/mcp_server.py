"""The tool service as a Model Context Protocol server: streamable HTTP over mutual TLS.

MCP-speaking assistants call hivewire's tools through the same domain code as gRPC
callers (:class:`~hivewire.services.tool.service.ToolService`), so the policy, the
approvals, the limits and the audit trail apply unchanged. Every MCP client acts as
its own identity: its client certificate's SPIFFE id, or the principal of its
``Authorization: Bearer`` API key or JWT when end-user authentication is configured
(:mod:`~hivewire.services.runtime.httpauth`; a request with neither is ``401``).
``tools/list`` shows exactly the tools the policy allows that caller, each with its JSON
Schema, and ``tools/call`` runs as that caller.

- Arguments that break a tool's schema, an unknown or forbidden tool: MCP error
  ``-32602`` (invalid params), with hivewire's reason and field violations in ``data``.
- A tool that fails: a result with ``isError`` and ``REASON: message`` as its text.
- A tool that needs a person's approval: the server asks the MCP client's user with a
  form elicitation (``approve: boolean``) and runs the call only on an accepted yes,
  with the approval recorded as coming from the caller's identity. A client that cannot
  elicit, or a "no", gets an ``isError`` result (``APPROVAL_REQUIRED`` /
  ``APPROVAL_DENIED``) and the tool does not run.

The official ``mcp`` SDK's low-level server does the protocol; the HTTPS server is
:class:`~hivewire.services.runtime.https.HttpsServer` with the mesh certificates.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import uuid
from typing import Any

import mcp_types as types
from mcp import MCPError
from mcp.server.context import ServerRequestContext
from mcp.server.lowlevel.server import Server
from mcp_types.jsonrpc import INTERNAL_ERROR, INVALID_PARAMS
from mcp_types.version import is_version_at_least
from starlette.applications import Starlette

from hivewire.services.runtime.config import Settings
from hivewire.services.runtime.errors import HivewireError, InvalidArgument
from hivewire.services.runtime.httpauth import HttpCaller, RequireCaller, http_authenticator
from hivewire.services.runtime.https import HttpsServer
from hivewire.services.runtime.version import hivewire_version
from hivewire.services.tool.domain import (
    ApprovalGrant,
    ApprovalRequest,
    ToolCall,
    ToolFailure,
    ToolInfo,
    ToolOutcome,
)
from hivewire.services.tool.sdk import arguments_digest, normalize_json
from hivewire.services.tool.service import ToolService

logger = logging.getLogger(__name__)

MCP_PATH = "/mcp"
"""Path of the streamable-HTTP endpoint."""

APPROVAL_KEY = "approval"
"""Key of the approval elicitation in an ``InputRequiredResult`` (protocol 2026-07-28)."""

_INPUT_REQUIRED_VERSION = "2026-07-28"
_APPROVAL_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "approve": {"type": "boolean", "title": "Approve", "description": "Run this tool call?"}
    },
    "required": ["approve"],
}


def _error(err: HivewireError) -> MCPError:
    data: dict[str, Any] = {"code": err.code.name, "reason": err.reason, **err.metadata}
    if isinstance(err, InvalidArgument):
        data["violations"] = [{"field": v.field, "description": v.description}
                              for v in err.violations]  # fmt: skip
    client_side = err.code.name in {"INVALID_ARGUMENT", "NOT_FOUND", "PERMISSION_DENIED"}
    return MCPError(INVALID_PARAMS if client_side else INTERNAL_ERROR, err.message, data)


def _text_result(text: str, *, error: bool) -> types.CallToolResult:
    return types.CallToolResult(content=[types.TextContent(type="text", text=text)], is_error=error)


def _tool(info: ToolInfo) -> types.Tool:
    description = info.description
    if info.requires_approval:
        description += " (each call needs a person's approval)"
    tool = types.Tool(
        name=info.name,
        description=description,
        input_schema=dict(info.input_schema),
        _meta={
            "hivewire/requiresApproval": info.requires_approval,
            "hivewire/source": info.source.value,
        },  # fmt: skip
    )
    return tool


def _outcome_result(outcome: ToolOutcome) -> types.CallToolResult:
    text = outcome.text or json.dumps(dict(outcome.result), ensure_ascii=False)
    return types.CallToolResult(
        content=[types.TextContent(type="text", text=text)],
        structured_content=dict(outcome.result),
        is_error=False,
    )


def _failure_result(failure: ToolFailure) -> types.CallToolResult:
    return _text_result(f"{failure.reason}: {failure.message}", error=True)


def _caller(ctx: ServerRequestContext[Any]) -> str:
    """The SPIFFE id of the request's caller (:class:`RequireCaller` put it in the scope)."""
    user = ctx.request.scope.get("user") if ctx.request is not None else None
    if not isinstance(user, HttpCaller):
        raise MCPError(INTERNAL_ERROR, "the request carries no authenticated caller")
    return user.caller.spiffe_id


class McpToolServer:
    """``tools/list`` and ``tools/call`` of the MCP protocol over a :class:`ToolService`."""

    def __init__(self, service: ToolService, *, version: str = "") -> None:
        """Create the server.

        Args:
            service: The tool service's domain.
            version: The server version reported at initialization.
        """
        self._service = service
        self.server: Server[Any] = Server(
            "hivewire-tools",
            version=version,
            instructions="hivewire's tools, under hivewire's policy, approvals and audit.",
            on_list_tools=self._list_tools,
            on_call_tool=self._call_tool,
        )

    def app(self, host: str) -> Starlette:
        """The ASGI app serving the streamable-HTTP endpoint at :data:`MCP_PATH`."""
        return self.server.streamable_http_app(streamable_http_path=MCP_PATH, host=host)

    async def _list_tools(
        self, ctx: ServerRequestContext[Any], params: types.PaginatedRequestParams | None
    ) -> types.ListToolsResult:
        return types.ListToolsResult(
            tools=[_tool(info) for info in self._service.list_tools(_caller(ctx))]
        )

    async def _call_tool(
        self, ctx: ServerRequestContext[Any], params: types.CallToolRequestParams
    ) -> types.CallToolResult | types.InputRequiredResult:
        try:
            arguments = normalize_json(dict(params.arguments or {}))
        except (TypeError, ValueError) as exc:
            raise MCPError(INVALID_PARAMS, f"arguments are not JSON: {exc}") from None
        caller = _caller(ctx)
        call = ToolCall(
            tool_name=params.name,
            arguments=arguments,
            caller=caller,
            call_id=uuid.uuid4().hex,
            approval=self._answered_approval(params, arguments, caller),
        )
        outcome = await self._run(call)
        if isinstance(outcome, ApprovalRequest):
            return await self._ask_approval(ctx, params, call, outcome)
        return outcome

    async def _run(self, call: ToolCall) -> types.CallToolResult | ApprovalRequest:
        """Run the call through the domain: its result, its failure, or its approval request."""
        try:
            async for event in self._service.invoke(call):
                if isinstance(event, ToolOutcome):
                    return _outcome_result(event)
                if isinstance(event, ToolFailure):
                    return _failure_result(event)
                if isinstance(event, ApprovalRequest):
                    return event
        except HivewireError as err:
            raise _error(err) from None
        raise MCPError(INTERNAL_ERROR, f"tool {call.tool_name} ended without a result")

    def _answered_approval(
        self, params: types.CallToolRequestParams, arguments: Any, caller: str
    ) -> ApprovalGrant | None:
        """The approval carried by a retried call (protocol 2026-07-28), if any."""
        responses = params.input_responses or {}
        answer = responses.get(APPROVAL_KEY)
        if not isinstance(answer, types.ElicitResult):
            return None
        if answer.action != "accept" or not (answer.content or {}).get("approve"):
            return None
        return self._grant(arguments, caller)

    def _grant(self, arguments: Any, caller: str) -> ApprovalGrant:
        return ApprovalGrant(
            request_id=f"mcp-{uuid.uuid4().hex}",
            approved_by=f"{caller} (MCP elicitation)",
            arguments_digest=arguments_digest(arguments),
            in_process=True,
        )

    async def _ask_approval(
        self,
        ctx: ServerRequestContext[Any],
        params: types.CallToolRequestParams,
        call: ToolCall,
        request: ApprovalRequest,
    ) -> types.CallToolResult | types.InputRequiredResult:
        message = request.prompt or f"Run {request.tool_name}?"
        if is_version_at_least(ctx.protocol_version, _INPUT_REQUIRED_VERSION):
            if params.input_responses and APPROVAL_KEY in params.input_responses:
                return self._refused(request, call.caller)
            ask = types.ElicitRequest(
                params=types.ElicitRequestFormParams(
                    message=message, requested_schema=_APPROVAL_SCHEMA
                )
            )
            return types.InputRequiredResult(
                input_requests={APPROVAL_KEY: ask}, request_state=request.arguments_digest
            )
        try:
            answer = await ctx.session.elicit_form(
                message, _APPROVAL_SCHEMA, related_request_id=ctx.request_id
            )
        except Exception as exc:
            logger.info("MCP client cannot answer the approval of %s: %s", request.tool_name, exc)
            return _text_result(
                f"APPROVAL_REQUIRED: {request.tool_name} needs a person's approval and this "
                "MCP client cannot ask for it (no elicitation support)",
                error=True,
            )
        if answer.action != "accept" or not (answer.content or {}).get("approve"):
            return self._refused(request, call.caller)
        grant = self._grant(call.arguments, call.caller)
        outcome = await self._run(dataclasses.replace(call, approval=grant))
        if isinstance(outcome, ApprovalRequest):
            raise MCPError(INTERNAL_ERROR, f"the approval of {call.tool_name} was not accepted")
        return outcome

    def _refused(self, request: ApprovalRequest, caller: str) -> types.CallToolResult:
        logger.info("MCP call of %s refused by the approver (%s)", request.tool_name, caller)
        return _text_result(
            f"APPROVAL_DENIED: the call of {request.tool_name} was not approved", error=True
        )


def serve_mcp(service: ToolService, settings: Settings) -> HttpsServer:
    """The HTTPS server of the MCP endpoint (enter it with ``async with``)."""
    tool = settings.tool
    assert tool.mcp_serve_port is not None
    server = McpToolServer(service, version=hivewire_version())
    app = RequireCaller(server.app(settings.host), http_authenticator(settings))
    return HttpsServer(
        app,
        settings.tls_files(),
        host=settings.host,
        port=tool.mcp_serve_port,
        require_client_cert=False,
    )
