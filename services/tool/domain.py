"""Value types of the tool service, shared by the domain, the servicer and the client."""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from hivewire.common.v1 import common_pb2
from hivewire.services.runtime.values import ErrorInfo, ProgressUpdate


class ToolSource(enum.Enum):
    """Where a tool comes from (``tool.v1.ToolSource``)."""

    BUILTIN = "builtin"
    PLUGIN = "plugin"
    MCP = "mcp"


@dataclass(frozen=True)
class ToolInfo:
    """A tool as listed to callers.

    Attributes:
        name: The name to invoke it by (MCP tools: ``<server>.<tool>``).
        description: What it does.
        input_schema: JSON Schema of the arguments object.
        output_schema: JSON Schema of the result object, if declared.
        requires_approval: Whether each call needs a person's approval (for this caller).
        source: Where it comes from.
        version: Its version, or "".
    """

    name: str
    description: str
    input_schema: Mapping[str, Any]
    output_schema: Mapping[str, Any] | None = None
    requires_approval: bool = False
    source: ToolSource = ToolSource.BUILTIN
    version: str = ""


@dataclass(frozen=True)
class ApprovalGrant:
    """A person's approval of one call (``tool.v1.Approval``).

    Attributes:
        request_id: The input request that was approved.
        approved_by: Who approved it.
        arguments_digest: Digest of the approved arguments; must match the call's.
        signed: The coordinator's signed grant, which the tool service verifies (the
            other fields are the caller's word only).
        in_process: Set only by this service's own MCP server, which asked the person
            itself (MCP elicitation): no grant travelled through anyone else, so there is
            nothing to verify. Never set from a request (convert.py cannot).
    """

    request_id: str
    approved_by: str
    arguments_digest: str
    signed: common_pb2.SignedApproval | None = None
    in_process: bool = False


@dataclass(frozen=True)
class ToolCall:
    """One invocation as the domain sees it.

    Attributes:
        tool_name: Which tool.
        arguments: The JSON arguments (already normalized: integral floats are ints).
        caller: The caller's SPIFFE id ("" when it has none).
        task_id: The task the call is for.
        call_id: Caller-chosen id of the call (one is minted when empty).
        correlation_id: Correlation id of the work.
        approval: The approval, for tools that need one.
        timeout: Seconds the caller still waits (its deadline), or None.
    """

    tool_name: str
    arguments: Mapping[str, Any]
    caller: str = ""
    task_id: str = ""
    call_id: str = ""
    correlation_id: str = ""
    approval: ApprovalGrant | None = None
    timeout: float | None = None


@dataclass(frozen=True)
class ToolOutcome:
    """The tool finished: its (possibly truncated) result.

    Attributes:
        result: The structured result object.
        text: Text rendering for models.
        truncated: Whether result or text was cut to the size limit.
    """

    result: Mapping[str, Any]
    text: str = ""
    truncated: bool = False


@dataclass(frozen=True)
class ApprovalRequest:
    """The call did not run: it needs an approval first.

    Attributes:
        tool_name: The tool.
        arguments_digest: What an approval must quote.
        prompt: The question to ask a person.
    """

    tool_name: str
    arguments_digest: str
    prompt: str


InvokeEvent = ProgressUpdate | ToolOutcome | ErrorInfo | ApprovalRequest
"""One message of a call's stream; every stream ends with a non-progress event."""
