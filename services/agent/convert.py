"""Protobuf <-> domain conversions of the agent runtime (the only place that knows both)."""

from __future__ import annotations

import math
from datetime import UTC, datetime, timedelta

from hivewire.agent.v1 import agent_pb2
from hivewire.common.v1 import common_pb2
from hivewire.services.agent import runtime as rt
from hivewire.services.agent.sdk import (
    Activity,
    ActivityKind,
    AgentCardInfo,
    InputAnswer,
    InputKind,
    Payload,
    TaskInfo,
    Usage,
)
from hivewire.services.runtime.convert import (
    duration,
    error_detail,
    optional_struct,
    optional_struct_dict,
    same_named,
    timestamp,
)
from hivewire.services.runtime.errors import FieldViolation, InvalidArgument

_INPUT_KINDS = {
    InputKind.TEXT: common_pb2.INPUT_KIND_TEXT,
    InputKind.APPROVAL: common_pb2.INPUT_KIND_APPROVAL,
}
_ACTIVITY_KINDS = {
    ActivityKind.MODEL_CALL: common_pb2.ACTIVITY_KIND_MODEL_CALL,
    ActivityKind.TOOL_CALL: common_pb2.ACTIVITY_KIND_TOOL_CALL,
}


# --- small values ---------------------------------------------------------------------


def payload_to_proto(payload: Payload) -> common_pb2.Payload:
    """The domain payload as ``common.v1.Payload``."""
    return common_pb2.Payload(
        text=payload.text,
        json=optional_struct(payload.json),
        data=payload.data,
        content_type=payload.content_type,
    )


def payload_from_proto(message: common_pb2.Payload) -> Payload:
    """``common.v1.Payload`` as the domain payload."""
    return Payload(
        text=message.text,
        json=optional_struct_dict(message, "json"),
        data=bytes(message.data),
        content_type=message.content_type,
    )


#: The counts domain usage and ``common.v1.Usage`` both keep under these names (and
#: ``total_tokens``, which falls back to the sum when a message lacks it).
_USAGE_COUNTS = ("prompt_tokens", "completion_tokens", "model_calls", "tool_calls")


def usage_to_proto(usage: Usage) -> common_pb2.Usage:
    """Domain usage as ``common.v1.Usage``."""
    message = common_pb2.Usage(**same_named(usage, _USAGE_COUNTS), total_tokens=usage.total_tokens)
    if usage.time_to_first_token is not None:
        message.time_to_first_token.CopyFrom(duration(usage.time_to_first_token))
    if usage.total_time:
        message.total_time.CopyFrom(duration(usage.total_time))
    return message


def usage_from_proto(message: common_pb2.Usage) -> Usage:
    """``common.v1.Usage`` as domain usage."""
    ttft = (
        message.time_to_first_token.ToTimedelta().total_seconds()
        if message.HasField("time_to_first_token")
        else None
    )
    return Usage(
        **same_named(message, _USAGE_COUNTS),
        total_tokens=message.total_tokens or message.prompt_tokens + message.completion_tokens,
        time_to_first_token=ttft,
        total_time=message.total_time.ToTimedelta().total_seconds()
        if message.HasField("total_time")
        else 0.0,
    )


def activity_to_proto(activity: Activity) -> common_pb2.Activity:
    """A domain activity as ``common.v1.Activity``."""
    message = common_pb2.Activity(
        kind=_ACTIVITY_KINDS[activity.kind],
        name=activity.name,
        summary=activity.summary,
        done=activity.done,
        started_at=timestamp(activity.started_at),
    )
    if activity.usage is not None:
        message.usage.CopyFrom(usage_to_proto(activity.usage))
    if activity.error is not None:
        message.error.CopyFrom(error_detail(activity.error))
    return message


# --- agent card -------------------------------------------------------------------------


#: What :class:`AgentCardInfo` and ``agent.v1.AgentCard`` call the same.
_CARD_FIELDS = ("name", "version", "description", "max_concurrency")
#: What :class:`CapabilitySpec` and ``agent.v1.Capability`` call the same.
_CAPABILITY_FIELDS = ("name", "description", "input_description", "output_description")


def card_to_proto(card: AgentCardInfo) -> agent_pb2.AgentCard:
    """The agent card as ``agent.v1.AgentCard``."""
    message = agent_pb2.AgentCard(**same_named(card, _CARD_FIELDS), labels=dict(card.labels))
    for spec in card.capabilities:
        message.capabilities.add(
            **same_named(spec, _CAPABILITY_FIELDS),
            input_schema=optional_struct(spec.input_schema),
            output_schema=optional_struct(spec.output_schema),
        )
    return message


def describe_to_proto(description: rt.AgentDescription) -> agent_pb2.DescribeResponse:
    """The runtime's description as ``DescribeResponse``."""
    return agent_pb2.DescribeResponse(
        card=card_to_proto(description.card),
        agent_id=description.agent_id,
        in_flight=description.in_flight,
    )


# --- Execute stream ---------------------------------------------------------------------


def task_info_from_proto(
    assign: agent_pb2.TaskAssignment,
    *,
    call_time_remaining: float | None = None,
    now: datetime | None = None,
) -> TaskInfo:
    """Validate an assignment and turn it into :class:`TaskInfo`.

    The deadline is the earlier of the assignment's and the Execute call's own.

    Args:
        assign: The first message of an Execute stream.
        call_time_remaining: ``context.time_remaining()`` of the Execute call.
        now: The current time (for tests).

    Returns:
        The task info.

    Raises:
        InvalidArgument: A required field is missing or invalid.
    """
    violations: list[FieldViolation] = []
    if not assign.task_id:
        violations.append(FieldViolation("assign.task_id", "required"))
    if not assign.capability:
        violations.append(FieldViolation("assign.capability", "required"))
    if violations:
        raise InvalidArgument("invalid task assignment", violations, reason="INVALID_ASSIGNMENT")
    current = now or datetime.now(UTC)
    deadline: datetime | None = None
    if assign.HasField("deadline") and (assign.deadline.seconds or assign.deadline.nanos):
        try:
            deadline = assign.deadline.ToDatetime(tzinfo=UTC)
        except (ValueError, OverflowError) as exc:  # nanos out of range, year out of range
            violation = FieldViolation("assign.deadline", f"not a valid timestamp: {exc}")
            raise InvalidArgument(
                "invalid task assignment", [violation], reason="INVALID_ASSIGNMENT"
            ) from None
    if call_time_remaining is not None and math.isfinite(call_time_remaining):
        call_deadline = current + timedelta(seconds=max(0.0, call_time_remaining))
        deadline = call_deadline if deadline is None else min(deadline, call_deadline)
    meta = assign.metadata
    return TaskInfo(
        task_id=assign.task_id,
        attempt=max(1, assign.attempt),
        capability=assign.capability,
        correlation_id=meta.correlation_id,
        deadline=deadline,
        priority=int(assign.priority),
        token_budget=assign.token_budget,
        tokens_used=assign.tokens_used,
        labels=dict(assign.labels),
        source=meta.source,
        user_id=meta.user_id,
        session_id=meta.session_id,
    )


def answer_from_proto(message: common_pb2.InputResponse) -> InputAnswer:
    """``common.v1.InputResponse`` as a domain answer."""
    return InputAnswer(
        request_id=message.request_id,
        value=payload_from_proto(message.value),
        approved=message.approved,
        comment=message.comment,
        signed_approval=(message.signed_approval if message.HasField("signed_approval") else None),
    )


def input_request_to_proto(event: rt.InputNeeded) -> common_pb2.InputRequest:
    """A domain input request as ``common.v1.InputRequest``."""
    spec = event.request
    return common_pb2.InputRequest(
        request_id=spec.request_id,
        kind=_INPUT_KINDS[spec.kind],
        prompt=spec.prompt,
        tool_name=spec.tool_name,
        arguments_digest=spec.arguments_digest,
        schema=optional_struct(spec.schema),
    )


def response_to_proto(task_id: str, out: rt.Outgoing) -> agent_pb2.ExecuteResponse:
    """One outgoing runtime event as an ``ExecuteResponse``.

    Args:
        task_id: The task, repeated on every message.
        out: The sequenced event.

    Returns:
        The stream message.
    """
    message = agent_pb2.ExecuteResponse(
        task_id=task_id, sequence=out.sequence, time=timestamp(out.time)
    )
    event = out.event
    if isinstance(event, rt.Started):
        message.started.CopyFrom(
            agent_pb2.ExecutionStarted(agent_id=event.agent_id, agent_name=event.agent_name)
        )
    elif isinstance(event, rt.ProgressUpdate):
        message.progress.CopyFrom(
            common_pb2.Progress(fraction=event.fraction, step=event.step, message=event.message)
        )
    elif isinstance(event, rt.PartialChunk):
        message.partial.CopyFrom(
            common_pb2.PartialResult(
                artifact_id=event.artifact_id,
                content=payload_to_proto(event.content),
                append=event.append,
                last_chunk=event.last_chunk,
                name=event.name,
            )
        )
    elif isinstance(event, rt.InputNeeded):
        message.input_required.CopyFrom(input_request_to_proto(event))
    elif isinstance(event, rt.ActivityReport):
        message.activity.CopyFrom(activity_to_proto(event.activity))
    elif isinstance(event, rt.Finished):
        message.result.CopyFrom(
            agent_pb2.ExecutionResult(
                output=payload_to_proto(event.output), usage=usage_to_proto(event.usage)
            )
        )
    elif isinstance(event, rt.Failed):
        message.error.CopyFrom(
            agent_pb2.ExecutionError(
                error=error_detail(event.error), usage=usage_to_proto(event.usage)
            )
        )
    else:  # pragma: no cover - the union above is exhaustive
        raise TypeError(f"unknown runtime event {type(event).__name__}")
    return message
