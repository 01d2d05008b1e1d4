"""Typed async client of the tool service, for agents.

::

    async with secure_channel("127.0.0.1:50053", tls_files) as channel:
        tools = ToolClient(channel)
        outcome = await tools.invoke("calculator", {"expression": "2 ** 10"}, task_id=task_id)
        if isinstance(outcome, ApprovalRequest):
            approval = ...  # ask a person through the coordinator, quoting outcome.arguments_digest
            outcome = await tools.invoke("calculator", args, task_id=task_id, approval=approval)

gRPC errors come back as the :class:`HivewireError` subclass the service raised
(``InvalidArgument`` with field violations, ``NotFound``, ``PermissionDenied``,
``DeadlineExceeded``...). A tool that ran and failed (an ``error`` stream message) is
raised too, as the subclass for its code with its reason and ``metadata["tool_error"]
== "true"``; :meth:`ToolClient.stream` yields it as a :class:`ErrorInfo` value instead.
"""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from typing import Any, TypedDict, Unpack

import grpc
from google.rpc import error_details_pb2, status_pb2

from hivewire.services.base.keywords import check_keywords
from hivewire.services.runtime import metadata as md
from hivewire.services.runtime.convert import to_struct
from hivewire.services.runtime.errors import ERROR_DOMAIN, HivewireError, Internal
from hivewire.services.runtime.status import from_rpc_error, from_rpc_status
from hivewire.services.runtime.values import ErrorInfo, ProgressUpdate
from hivewire.services.tool.convert import (
    approval_to_proto,
    descriptor_from_proto,
    event_from_proto,
)
from hivewire.services.tool.domain import (
    ApprovalGrant,
    ApprovalRequest,
    InvokeEvent,
    ToolInfo,
    ToolOutcome,
)
from hivewire.services.tool.sdk import normalize_json
from hivewire.tool.v1 import tool_pb2, tool_pb2_grpc

__all__ = ["DEFAULT_TIMEOUT", "InvokeOptions", "ToolClient", "failure_error"]

DEFAULT_TIMEOUT = 60.0
"""Deadline (s) of a tool call that gives none."""

ProgressHandler = Callable[[ProgressUpdate], Awaitable[None] | None]


class InvokeOptions(TypedDict, total=False):
    """The options of one tool call (:meth:`ToolClient.stream`, :meth:`ToolClient.invoke`).

    Attributes:
        task_id: The task the call is for.
        call_id: An id for the call (the service mints one when empty).
        approval: The approval, for tools that need one.
        timeout: Deadline in seconds (pass the task's remaining time; absent:
            :data:`DEFAULT_TIMEOUT`, None: the channel's).
        metadata: Extra call metadata.
    """

    task_id: str
    call_id: str
    approval: ApprovalGrant | None
    timeout: float | None
    metadata: Sequence[tuple[str, str]]


def failure_error(failure: ErrorInfo, tool_name: str = "") -> HivewireError:
    """The exception for a tool's error result: the class for its code, with its reason.

    Args:
        failure: The tool's classified error.
        tool_name: The tool, added to the metadata.

    Returns:
        A :class:`HivewireError` subclass instance with ``metadata["tool_error"] == "true"``.
    """
    code = next(
        (c.value[0] for c in grpc.StatusCode if c.name == failure.code),
        grpc.StatusCode.UNKNOWN.value[0],
    )
    info = error_details_pb2.ErrorInfo(
        reason=failure.reason or "TOOL_ERROR",
        domain=ERROR_DOMAIN,
        metadata={**failure.metadata, "tool_error": "true", "tool": tool_name},
    )
    status = status_pb2.Status(code=code, message=failure.message)
    status.details.add().Pack(info)
    return from_rpc_status(status)


class ToolClient:
    """Calls a tool service over an existing (long-lived) channel."""

    def __init__(self, channel: grpc.aio.Channel) -> None:
        """Wrap a channel from ``runtime.channels`` (mTLS, correlation id)."""
        self._stub = tool_pb2_grpc.ToolServiceStub(channel)

    async def list_tools(
        self,
        *,
        name_prefix: str = "",
        timeout: float | None = None,  # noqa: ASYNC109 - the gRPC deadline of the call
    ) -> list[ToolInfo]:
        """Tools this client's identity may call.

        Args:
            name_prefix: Only names starting with this.
            timeout: Deadline in seconds (the channel default when None).

        Returns:
            The tools with their schemas.

        Raises:
            HivewireError: The call failed.
        """
        try:
            response = await self._stub.ListTools(
                tool_pb2.ListToolsRequest(name_prefix=name_prefix), timeout=timeout
            )
        except grpc.aio.AioRpcError as err:
            raise from_rpc_error(err) from None
        return [descriptor_from_proto(descriptor) for descriptor in response.tools]

    async def stream(
        self,
        name: str,
        arguments: Mapping[str, Any] | None = None,
        **options: Unpack[InvokeOptions],
    ) -> AsyncIterator[InvokeEvent]:
        """Invoke a tool and yield every message of its stream as a value.

        Args:
            name: The tool.
            arguments: Its arguments (a JSON object).
            **options: The call's options (:class:`InvokeOptions`: ``task_id``,
                ``call_id``, ``approval``, ``timeout``, ``metadata``).

        Yields:
            ``ProgressUpdate`` values, then one ``ToolOutcome``, ``ErrorInfo`` or
            ``ApprovalRequest``.

        Raises:
            HivewireError: The call was refused or failed (gRPC status).
        """
        check_keywords("ToolClient.stream", options, InvokeOptions.__optional_keys__)
        task_id = options.get("task_id", "")
        request = tool_pb2.InvokeToolRequest(
            tool_name=name,
            arguments=to_struct(normalize_json(dict(arguments or {}))),
            task_id=task_id,
            call_id=options.get("call_id", ""),
        )
        approval = options.get("approval")
        if approval is not None:
            request.approval.CopyFrom(approval_to_proto(approval))
        call_metadata = list(options.get("metadata", ()))
        if task_id:
            call_metadata.append((md.TASK_ID, task_id))
        call = self._stub.InvokeTool(
            request,
            timeout=options.get("timeout", DEFAULT_TIMEOUT),
            metadata=call_metadata or None,
        )
        try:
            async for response in call:
                event = event_from_proto(response)
                if event is None:
                    continue
                if not isinstance(event, ProgressUpdate):
                    # The last message: let the call end with its status before handing
                    # it out. Callers stop reading here; without this every call would
                    # end with a cancel (a RST_STREAM, and a CANCELLED call the service
                    # has to unwind) instead of OK.
                    await call.code()
                yield event
        except grpc.aio.AioRpcError as err:
            raise from_rpc_error(err) from None
        finally:
            call.cancel()  # a no-op once the call has its status

    async def invoke(
        self,
        name: str,
        arguments: Mapping[str, Any] | None = None,
        *,
        on_progress: ProgressHandler | None = None,
        **options: Unpack[InvokeOptions],
    ) -> ToolOutcome | ApprovalRequest:
        """Invoke a tool and wait for its result.

        Args:
            name: The tool.
            arguments: Its arguments (a JSON object).
            on_progress: Called with each progress report (sync or async).
            **options: The call's options, as for :meth:`stream`.

        Returns:
            The result, or the approval request when the tool needs an approval first.

        Raises:
            HivewireError: The call was refused, timed out, or the tool failed (then the
                class for the failure's code, ``metadata["tool_error"] == "true"``).
        """
        check_keywords("ToolClient.invoke", options, InvokeOptions.__optional_keys__)
        async for event in self.stream(name, arguments, **options):
            if isinstance(event, ProgressUpdate):
                if on_progress is not None:
                    outcome = on_progress(event)
                    if inspect.isawaitable(outcome):
                        await outcome
                continue
            if isinstance(event, ErrorInfo):
                raise failure_error(event, name)
            return event
        raise Internal(
            f"the stream of {name} ended without a result", reason="TOOL_STREAM_INCOMPLETE"
        )
