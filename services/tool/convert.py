"""Conversions between ``tool.v1`` messages and the tool service's value types."""

from __future__ import annotations

from typing import Any

from google.protobuf import struct_pb2

from hivewire.common.v1 import common_pb2
from hivewire.services.runtime.convert import (
    error_detail,
    error_info,
    optional_struct,
    optional_struct_dict,
    struct_to_dict,
    to_struct,
)
from hivewire.services.runtime.values import ErrorInfo, ProgressUpdate
from hivewire.services.tool.domain import (
    ApprovalGrant,
    ApprovalRequest,
    InvokeEvent,
    ToolInfo,
    ToolOutcome,
    ToolSource,
)
from hivewire.services.tool.sdk import normalize_json
from hivewire.tool.v1 import tool_pb2

_SOURCES = {
    ToolSource.BUILTIN: tool_pb2.TOOL_SOURCE_BUILTIN,
    ToolSource.PLUGIN: tool_pb2.TOOL_SOURCE_PLUGIN,
    ToolSource.MCP: tool_pb2.TOOL_SOURCE_MCP,
}
_SOURCES_BACK = {value: key for key, value in _SOURCES.items()}


def from_struct(struct: struct_pb2.Struct) -> dict[str, Any]:
    """A ``Struct`` as plain JSON data, integral numbers as ints.

    Raises:
        ValueError: A number is NaN or infinite.
    """
    normalized: dict[str, Any] = normalize_json(struct_to_dict(struct))
    return normalized


def descriptor_to_proto(info: ToolInfo) -> tool_pb2.ToolDescriptor:
    """``ToolInfo`` -> ``ToolDescriptor``."""
    return tool_pb2.ToolDescriptor(
        name=info.name,
        description=info.description,
        input_schema=to_struct(info.input_schema),
        output_schema=optional_struct(info.output_schema),
        requires_approval=info.requires_approval,
        source=_SOURCES[info.source],
        version=info.version,
    )


def descriptor_from_proto(descriptor: tool_pb2.ToolDescriptor) -> ToolInfo:
    """``ToolDescriptor`` -> ``ToolInfo``."""
    return ToolInfo(
        name=descriptor.name,
        description=descriptor.description,
        input_schema=struct_to_dict(descriptor.input_schema),
        output_schema=optional_struct_dict(descriptor, "output_schema"),
        requires_approval=descriptor.requires_approval,
        source=_SOURCES_BACK.get(descriptor.source, ToolSource.BUILTIN),
        version=descriptor.version,
    )


def approval_from_proto(request: tool_pb2.InvokeToolRequest) -> ApprovalGrant | None:
    """The request's approval, or None when it carries none."""
    if not request.HasField("approval"):
        return None
    approval = request.approval
    return ApprovalGrant(
        request_id=approval.request_id,
        approved_by=approval.approved_by,
        arguments_digest=approval.arguments_digest,
        signed=approval.signed_approval if approval.HasField("signed_approval") else None,
    )


def approval_to_proto(approval: ApprovalGrant) -> tool_pb2.Approval:
    """``ApprovalGrant`` -> ``Approval``."""
    return tool_pb2.Approval(
        request_id=approval.request_id,
        approved_by=approval.approved_by,
        arguments_digest=approval.arguments_digest,
        signed_approval=approval.signed,
    )


def event_to_proto(event: InvokeEvent, sequence: int) -> tool_pb2.InvokeToolResponse:
    """One stream event as an ``InvokeToolResponse``."""
    response = tool_pb2.InvokeToolResponse(sequence=sequence)
    if isinstance(event, ProgressUpdate):
        response.progress.CopyFrom(
            common_pb2.Progress(fraction=event.fraction, step=event.step, message=event.message)
        )
    elif isinstance(event, ToolOutcome):
        response.result.CopyFrom(
            tool_pb2.ToolResult(
                result=to_struct(event.result), text=event.text, truncated=event.truncated
            )
        )
    elif isinstance(event, ErrorInfo):
        response.error.CopyFrom(error_detail(event))
    else:
        response.approval_required.CopyFrom(
            tool_pb2.ApprovalRequired(
                tool_name=event.tool_name,
                arguments_digest=event.arguments_digest,
                prompt=event.prompt,
            )
        )
    return response


def event_from_proto(response: tool_pb2.InvokeToolResponse) -> InvokeEvent | None:
    """An ``InvokeToolResponse`` as a stream event (None for an empty message)."""
    kind = response.WhichOneof("kind")
    if kind == "progress":
        p = response.progress
        return ProgressUpdate(fraction=p.fraction, step=p.step, message=p.message)
    if kind == "result":
        r = response.result
        return ToolOutcome(result=from_struct(r.result), text=r.text, truncated=r.truncated)
    if kind == "error":
        return error_info(response.error)
    if kind == "approval_required":
        a = response.approval_required
        return ApprovalRequest(
            tool_name=a.tool_name, arguments_digest=a.arguments_digest, prompt=a.prompt
        )
    return None
