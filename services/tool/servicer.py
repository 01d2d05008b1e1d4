"""gRPC adapter of the tool service: ``hivewire.tool.v1.ToolService``.

Translates requests into :class:`~hivewire.services.tool.domain.ToolCall` values (caller
from the peer certificate's SPIFFE id, deadline from the call, task and correlation ids
from the request or its metadata) and events back into stream messages. Domain errors
are raised as they are; the runtime's interceptor turns them into rich statuses.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import Any

import grpc

from hivewire.services.runtime import metadata as md
from hivewire.services.runtime.authz import caller_spiffe_id
from hivewire.services.runtime.errors import FieldViolation, InvalidArgument
from hivewire.services.runtime.logging import correlation_id_var, task_id_var
from hivewire.services.tool.convert import (
    approval_from_proto,
    descriptor_to_proto,
    event_to_proto,
    from_struct,
)
from hivewire.services.tool.domain import ToolCall
from hivewire.services.tool.service import ToolService
from hivewire.tool.v1 import tool_pb2, tool_pb2_grpc

logger = logging.getLogger(__name__)

SERVICE_NAME = tool_pb2.DESCRIPTOR.services_by_name["ToolService"].full_name
"""``hivewire.tool.v1.ToolService``."""

Context = grpc.aio.ServicerContext[Any, Any]


def _metadata_value(context: Context, key: str) -> str:
    for item in context.invocation_metadata() or ():
        if item[0] == key and isinstance(item[1], str):
            return item[1]
    return ""


class ToolServicer(tool_pb2_grpc.ToolServiceServicer):
    """``ToolService`` over a :class:`ToolService`."""

    def __init__(self, service: ToolService) -> None:
        """Wrap the domain service."""
        self._service = service

    async def ListTools(
        self, request: tool_pb2.ListToolsRequest, context: Context
    ) -> tool_pb2.ListToolsResponse:
        """List the tools the caller may call."""
        caller = caller_spiffe_id(context) or ""
        tools = self._service.list_tools(caller, request.name_prefix)
        return tool_pb2.ListToolsResponse(tools=[descriptor_to_proto(info) for info in tools])

    async def InvokeTool(
        self, request: tool_pb2.InvokeToolRequest, context: Context
    ) -> AsyncIterator[tool_pb2.InvokeToolResponse]:
        """Run a tool and stream its progress, then its result, error or approval request."""
        if not request.tool_name:
            raise InvalidArgument(violations=[FieldViolation("tool_name", "is required")])
        try:
            arguments = from_struct(request.arguments)
        except ValueError as exc:
            raise InvalidArgument(violations=[FieldViolation("arguments", str(exc))]) from None
        task_id = request.task_id or _metadata_value(context, md.TASK_ID)
        if task_id:
            # Each RPC runs in its own context: this tags the call's log lines only.
            task_id_var.set(task_id)
        call = ToolCall(
            tool_name=request.tool_name,
            arguments=arguments,
            caller=caller_spiffe_id(context) or "",
            task_id=task_id,
            call_id=request.call_id,
            correlation_id=request.metadata.correlation_id or correlation_id_var.get() or "",
            approval=approval_from_proto(request),
            timeout=context.time_remaining(),
        )
        sequence = 0
        async for event in self._service.invoke(call):
            sequence += 1
            yield event_to_proto(event, sequence)
