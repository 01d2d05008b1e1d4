"""Mapping between A2A protocol messages and hivewire's tasks, events and payloads.

Plain functions over protobuf messages on both sides (A2A's types are protobuf too, from
the official ``a2a-sdk``); no I/O. docs/interop.md has the tables these implement.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeAlias

from a2a.types import a2a_pb2 as a2a
from google.protobuf import json_format, struct_pb2

from hivewire.common.v1 import common_pb2
from hivewire.coordinator.v1 import coordinator_pb2
from hivewire.services.runtime.errors import FieldViolation, InvalidArgument

A2aEvent: TypeAlias = a2a.Task | a2a.TaskStatusUpdateEvent | a2a.TaskArtifactUpdateEvent
"""What a hivewire event becomes on an A2A stream."""

META_KEY = "hivewire"
"""Key of hivewire's own fields in A2A ``metadata`` objects (sequence, progress...)."""

SKILL_KEY = "skill"
"""Key of the skill (hivewire capability) in a message's or request's metadata."""

RESULT_ARTIFACT = "result"
"""Artifact id of a task's final output (partial outputs keep their own ids)."""

TEXT_MEDIA = "text/plain"
JSON_MEDIA = "application/json"

S = common_pb2
C = coordinator_pb2

STATE_TO_A2A: Mapping[S.TaskState.ValueType, a2a.TaskState] = {
    S.TASK_STATE_UNSPECIFIED: a2a.TASK_STATE_UNSPECIFIED,
    S.TASK_STATE_QUEUED: a2a.TASK_STATE_SUBMITTED,
    S.TASK_STATE_ASSIGNED: a2a.TASK_STATE_SUBMITTED,
    S.TASK_STATE_RUNNING: a2a.TASK_STATE_WORKING,
    S.TASK_STATE_INPUT_REQUIRED: a2a.TASK_STATE_INPUT_REQUIRED,
    S.TASK_STATE_SUCCEEDED: a2a.TASK_STATE_COMPLETED,
    S.TASK_STATE_FAILED: a2a.TASK_STATE_FAILED,
    S.TASK_STATE_CANCELLED: a2a.TASK_STATE_CANCELED,
    S.TASK_STATE_DEAD_LETTERED: a2a.TASK_STATE_FAILED,
}
"""hivewire task state -> A2A task state (docs/interop.md, "Task states")."""

A2A_TO_STATE: Mapping[a2a.TaskState, S.TaskState.ValueType] = {
    a2a.TASK_STATE_SUBMITTED: S.TASK_STATE_QUEUED,
    a2a.TASK_STATE_WORKING: S.TASK_STATE_RUNNING,
    a2a.TASK_STATE_INPUT_REQUIRED: S.TASK_STATE_INPUT_REQUIRED,
    a2a.TASK_STATE_AUTH_REQUIRED: S.TASK_STATE_INPUT_REQUIRED,
    a2a.TASK_STATE_COMPLETED: S.TASK_STATE_SUCCEEDED,
    a2a.TASK_STATE_FAILED: S.TASK_STATE_FAILED,
    a2a.TASK_STATE_REJECTED: S.TASK_STATE_FAILED,
    a2a.TASK_STATE_CANCELED: S.TASK_STATE_CANCELLED,
}
"""A2A task state -> hivewire task state (remote A2A agents, docs/interop.md)."""

TERMINAL_A2A = frozenset(
    {
        a2a.TASK_STATE_COMPLETED,
        a2a.TASK_STATE_FAILED,
        a2a.TASK_STATE_CANCELED,
        a2a.TASK_STATE_REJECTED,
    }
)
INTERRUPTED_A2A = frozenset({a2a.TASK_STATE_INPUT_REQUIRED, a2a.TASK_STATE_AUTH_REQUIRED})

_PRIORITIES = {
    "low": S.PRIORITY_LOW,
    "medium": S.PRIORITY_MEDIUM,
    "high": S.PRIORITY_HIGH,
    "critical": S.PRIORITY_CRITICAL,
}
_YES = frozenset({"y", "yes", "approve", "approved", "ok", "true", "allow"})


# --- parts and payloads -------------------------------------------------------------


def payload_from_parts(parts: Iterable[a2a.Part]) -> common_pb2.Payload:
    """The hivewire payload of a message's parts.

    Text parts are joined (newline) into ``text``; the first data part holding an object
    becomes ``json`` (a non-object becomes ``{"value": ...}``); the first raw part becomes
    ``data`` with its media type. URL parts are kept as ``json.urls``.
    """
    payload = common_pb2.Payload()
    texts: list[str] = []
    urls: list[str] = []
    for part in parts:
        kind = part.WhichOneof("content")
        if kind == "text":
            texts.append(part.text)
        elif kind == "data" and not payload.HasField("json"):
            if part.data.WhichOneof("kind") == "struct_value":
                payload.json.CopyFrom(part.data.struct_value)
            else:
                payload.json.update({"value": json_format.MessageToDict(part.data)})
        elif kind == "raw" and not payload.data:
            payload.data = part.raw
            payload.content_type = part.media_type or "application/octet-stream"
        elif kind == "url":
            urls.append(part.url)
    if texts:
        payload.text = "\n".join(texts)
    if urls:
        payload.json.update({"urls": urls})
    return payload


def parts_from_payload(payload: common_pb2.Payload) -> list[a2a.Part]:
    """The A2A parts of a hivewire payload: text, JSON (a data part), bytes (a raw part)."""
    parts: list[a2a.Part] = []
    if payload.text:
        parts.append(a2a.Part(text=payload.text, media_type=TEXT_MEDIA))
    if payload.HasField("json"):
        parts.append(
            a2a.Part(data=struct_pb2.Value(struct_value=payload.json), media_type=JSON_MEDIA)
        )
    if payload.data:
        parts.append(a2a.Part(raw=payload.data, media_type=payload.content_type))
    return parts


def text_of(parts: Iterable[a2a.Part]) -> str:
    """The text parts of a message, joined by newlines."""
    return "\n".join(p.text for p in parts if p.WhichOneof("content") == "text")


def _meta(struct: struct_pb2.Struct) -> dict[str, Any]:
    return json_format.MessageToDict(struct) if struct.fields else {}


def _struct(values: Mapping[str, Any]) -> struct_pb2.Struct:
    out = struct_pb2.Struct()
    out.update(dict(values))
    return out


# --- requests -----------------------------------------------------------------------


@dataclass(frozen=True)
class TaskOptions:
    """What a message asks of the hivewire task besides its input."""

    skill: str
    priority: S.Priority.ValueType = S.PRIORITY_UNSPECIFIED
    timeout: float | None = None
    token_budget: int = 0
    labels: Mapping[str, str] = field(default_factory=dict)


def task_options(request: a2a.SendMessageRequest, *, default_skill: str = "") -> TaskOptions:
    """The skill and the task options of a ``SendMessage`` request.

    The skill is ``metadata.skill`` of the message, else of the request, else
    ``default_skill``. ``metadata.hivewire`` may set ``priority`` (low, medium, high,
    critical), ``timeoutSeconds``, ``tokenBudget`` and ``labels``.

    Raises:
        InvalidArgument: No skill named, or an option of the wrong type.
    """
    message_meta = _meta(request.message.metadata)
    request_meta = _meta(request.metadata)
    skill = str(message_meta.get(SKILL_KEY) or request_meta.get(SKILL_KEY) or default_skill)
    if not skill:
        raise InvalidArgument(
            "name the skill to run in the message's metadata.skill",
            [FieldViolation("message.metadata.skill", "required: a skill id of the agent card")],
            reason="A2A_SKILL_REQUIRED",
        )
    extra = {**request_meta.get(META_KEY, {}), **message_meta.get(META_KEY, {})}
    priority_name = str(extra.get("priority", "")).lower()
    if priority_name and priority_name not in _PRIORITIES:
        raise InvalidArgument(
            f"unknown priority {priority_name!r}",
            [FieldViolation("metadata.hivewire.priority", f"one of {', '.join(_PRIORITIES)}")],
        )
    try:
        timeout = float(extra["timeoutSeconds"]) if "timeoutSeconds" in extra else None
        budget = int(extra.get("tokenBudget", 0))
    except (TypeError, ValueError) as exc:
        raise InvalidArgument(
            f"bad hivewire option: {exc}",
            [FieldViolation("metadata.hivewire", "timeoutSeconds and tokenBudget are numbers")],
        ) from None
    labels = {str(k): str(v) for k, v in dict(extra.get("labels", {})).items()}
    return TaskOptions(
        skill=skill,
        priority=_PRIORITIES.get(priority_name, S.PRIORITY_UNSPECIFIED),
        timeout=timeout,
        token_budget=budget,
        labels=labels,
    )


def task_spec(
    request: a2a.SendMessageRequest,
    options: TaskOptions,
    *,
    context_id: str,
    default_timeout: float | None = None,
) -> coordinator_pb2.TaskSpec:
    """The hivewire task a new A2A message starts.

    The message id is the idempotency key (a retried send starts nothing new); the A2A
    context id is the task's session id.
    """
    message = request.message
    spec = C.TaskSpec(
        capability=options.skill,
        input=payload_from_parts(message.parts),
        priority=options.priority,
        idempotency_key=f"a2a:{message.message_id}" if message.message_id else "",
        token_budget=options.token_budget,
        metadata=S.RequestMetadata(source="a2a", session_id=context_id),
    )
    spec.labels.update(dict(options.labels))
    timeout = options.timeout if options.timeout is not None else default_timeout
    if timeout is not None:
        spec.timeout.FromMilliseconds(int(timeout * 1000))
    return spec


def input_response(
    pending: common_pb2.InputRequest, message: a2a.Message
) -> common_pb2.InputResponse:
    """A hivewire answer to ``pending`` from an A2A message that continues the task.

    Approvals read a data part ``{"approved": bool, "comment": str}`` or a text part
    (yes, y, approve, ok, true: approved; anything else: refused). Text requests get the
    message's payload as the value.
    """
    response = S.InputResponse(request_id=pending.request_id)
    payload = payload_from_parts(message.parts)
    if pending.kind == S.INPUT_KIND_APPROVAL:
        decision = _meta(payload.json) if payload.HasField("json") else {}
        if "approved" in decision:
            response.approved = bool(decision["approved"])
            response.comment = str(decision.get("comment", ""))
        else:
            response.approved = payload.text.strip().lower() in _YES
            response.comment = payload.text
    else:
        response.value.CopyFrom(payload)
    return response


# --- tasks and events ---------------------------------------------------------------


def _agent_message(
    task_id: str, context_id: str, text: str, data: Mapping[str, Any] | None = None
) -> a2a.Message:
    message = a2a.Message(
        message_id=uuid.uuid4().hex, task_id=task_id, context_id=context_id, role=a2a.ROLE_AGENT
    )
    if text:
        message.parts.append(a2a.Part(text=text, media_type=TEXT_MEDIA))
    if data:
        message.parts.append(
            a2a.Part(data=struct_pb2.Value(struct_value=_struct(data)), media_type=JSON_MEDIA)
        )
    return message


def input_request_message(
    task_id: str, context_id: str, request: common_pb2.InputRequest
) -> a2a.Message:
    """The agent message of an ``input-required`` status: the prompt and what to answer."""
    kind = "approval" if request.kind == S.INPUT_KIND_APPROVAL else "text"
    data: dict[str, Any] = {"requestId": request.request_id, "kind": kind}
    if request.tool_name:
        data["toolName"] = request.tool_name
        data["argumentsDigest"] = request.arguments_digest
    if request.HasField("schema"):
        data["schema"] = _meta(request.schema)
    return _agent_message(task_id, context_id, request.prompt, {META_KEY: data})


def error_text(error: common_pb2.ErrorDetail) -> str:
    """One line for people: ``REASON: message``."""
    if error.reason and error.message:
        return f"{error.reason}: {error.message}"
    return error.message or error.reason


def _status_message(task: coordinator_pb2.Task, context_id: str) -> a2a.Message | None:
    if task.state == S.TASK_STATE_INPUT_REQUIRED and task.HasField("pending_input"):
        return input_request_message(task.task_id, context_id, task.pending_input)
    if task.HasField("error") and (task.error.message or task.error.reason):
        return _agent_message(task.task_id, context_id, error_text(task.error))
    if task.HasField("progress") and task.progress.message:
        return _agent_message(task.task_id, context_id, task.progress.message)
    return None


def context_of(task: coordinator_pb2.Task) -> str:
    """The A2A context id of a hivewire task (its session id, else its task id)."""
    return task.spec.metadata.session_id or task.task_id


def result_artifact(output: common_pb2.Payload) -> a2a.Artifact:
    """The artifact of a task's final output."""
    return a2a.Artifact(
        artifact_id=RESULT_ARTIFACT, name=RESULT_ARTIFACT, parts=parts_from_payload(output)
    )


def task_to_a2a(task: coordinator_pb2.Task, artifacts: Iterable[a2a.Artifact] = ()) -> a2a.Task:
    """The A2A view of a hivewire task: state, status message, artifacts, its first input."""
    context_id = context_of(task)
    out = a2a.Task(id=task.task_id, context_id=context_id)
    out.status.state = STATE_TO_A2A.get(task.state, a2a.TASK_STATE_UNSPECIFIED)
    out.status.timestamp.CopyFrom(task.updated_at)
    message = _status_message(task, context_id)
    if message is not None:
        out.status.message.CopyFrom(message)
    out.artifacts.extend(artifacts)
    if task.state == S.TASK_STATE_SUCCEEDED and RESULT_ARTIFACT not in {
        a.artifact_id for a in out.artifacts
    }:
        out.artifacts.append(result_artifact(task.output))
    first = a2a.Message(
        message_id=f"{task.task_id}-input",
        task_id=task.task_id,
        context_id=context_id,
        role=a2a.ROLE_USER,
        parts=parts_from_payload(task.spec.input),
    )
    out.history.append(first)
    meta: dict[str, Any] = {
        "skill": task.spec.capability,
        "sequence": task.last_sequence,
        "state": S.TaskState.Name(task.state),
        "attempt": task.attempt,
    }
    if task.state == S.TASK_STATE_DEAD_LETTERED:
        meta["deadLettered"] = True
    if task.HasField("usage"):
        meta["usage"] = json_format.MessageToDict(task.usage)
    out.metadata.update({META_KEY: meta})
    return out


def _status(
    task_id: str,
    context_id: str,
    state: a2a.TaskState,
    event: coordinator_pb2.TaskEvent,
    *,
    message: a2a.Message | None = None,
    extra: Mapping[str, Any] | None = None,
) -> a2a.TaskStatusUpdateEvent:
    update = a2a.TaskStatusUpdateEvent(task_id=task_id, context_id=context_id)
    update.status.state = state
    update.status.timestamp.CopyFrom(event.time)
    if message is not None:
        update.status.message.CopyFrom(message)
    update.metadata.update(
        {META_KEY: {"sequence": event.sequence, "event": event.WhichOneof("kind"), **(extra or {})}}
    )
    return update


def _artifact(
    task_id: str,
    context_id: str,
    event: coordinator_pb2.TaskEvent,
    artifact: a2a.Artifact,
    *,
    append: bool,
    last_chunk: bool,
) -> a2a.TaskArtifactUpdateEvent:
    update = a2a.TaskArtifactUpdateEvent(
        task_id=task_id, context_id=context_id, append=append, last_chunk=last_chunk
    )
    update.artifact.CopyFrom(artifact)
    update.metadata.update(
        {META_KEY: {"sequence": event.sequence, "event": event.WhichOneof("kind")}}
    )
    return update


def event_to_a2a(event: coordinator_pb2.TaskEvent, context_id: str) -> list[A2aEvent]:
    """The A2A stream events of one hivewire task event (possibly none).

    Progress, retries and activities are ``working`` status updates (activities carry
    only metadata); partial results are artifact updates; an input request is the
    ``input-required`` status with the prompt; the finish is the result artifact (when
    succeeded) and then the terminal status. State changes to running or queued are
    status updates; the others are carried by the events that explain them.
    """
    task_id = event.task_id
    kind = event.WhichOneof("kind")
    if kind == "state_changed":
        change = event.state_changed
        if change.to_state in (S.TASK_STATE_QUEUED, S.TASK_STATE_ASSIGNED, S.TASK_STATE_RUNNING):
            state = STATE_TO_A2A[change.to_state]
            text = change.reason
            return [_status(task_id, context_id, state, event, message=_agent_message(
                task_id, context_id, text) if text else None)]  # fmt: skip
        return []
    if kind == "progress":
        progress = event.progress
        message = _agent_message(task_id, context_id, progress.message or progress.step)
        extra = {"progress": {"fraction": progress.fraction, "step": progress.step}}
        return [_status(task_id, context_id, a2a.TASK_STATE_WORKING, event, message=message,
                        extra=extra)]  # fmt: skip
    if kind == "partial":
        partial = event.partial
        artifact = a2a.Artifact(
            artifact_id=partial.artifact_id or "output",
            name=partial.name,
            parts=parts_from_payload(partial.content),
        )
        return [_artifact(task_id, context_id, event, artifact, append=partial.append,
                          last_chunk=partial.last_chunk)]  # fmt: skip
    if kind == "input_required":
        message = input_request_message(task_id, context_id, event.input_required)
        return [_status(task_id, context_id, a2a.TASK_STATE_INPUT_REQUIRED, event, message=message)]
    if kind == "activity":
        activity = json_format.MessageToDict(event.activity)
        return [_status(task_id, context_id, a2a.TASK_STATE_WORKING, event,
                        extra={"activity": activity})]  # fmt: skip
    if kind == "retry":
        retry = event.retry
        text = f"attempt {retry.failed_attempt} failed ({error_text(retry.error)}); retrying"
        return [_status(task_id, context_id, a2a.TASK_STATE_WORKING, event,
                        message=_agent_message(task_id, context_id, text))]  # fmt: skip
    if kind == "finished":
        return _finished(event, context_id)
    return []


def _finished(event: coordinator_pb2.TaskEvent, context_id: str) -> list[A2aEvent]:
    finished = event.finished
    task_id = event.task_id
    out: list[A2aEvent] = []
    if finished.state == S.TASK_STATE_SUCCEEDED:
        out.append(_artifact(task_id, context_id, event, result_artifact(finished.output),
                             append=False, last_chunk=True))  # fmt: skip
    message = None
    if finished.HasField("error") and (finished.error.message or finished.error.reason):
        message = _agent_message(task_id, context_id, error_text(finished.error))
    extra: dict[str, Any] = {"state": S.TaskState.Name(finished.state)}
    if finished.HasField("usage"):
        extra["usage"] = json_format.MessageToDict(finished.usage)
    out.append(_status(task_id, context_id, STATE_TO_A2A[finished.state], event,
                       message=message, extra=extra))  # fmt: skip
    return out


def is_final(update: A2aEvent) -> bool:
    """Whether an A2A stream ends after this event (a terminal or interrupted status)."""
    if isinstance(update, a2a.TaskStatusUpdateEvent):
        return update.status.state in TERMINAL_A2A or update.status.state in INTERRUPTED_A2A
    if isinstance(update, a2a.Task):
        return update.status.state in TERMINAL_A2A or update.status.state in INTERRUPTED_A2A
    return False


class ArtifactFold:
    """Artifacts rebuilt from a task's partial results, the way a streaming client sees them.

    Appended text chunks are joined into one text part; other parts are appended.
    """

    def __init__(self) -> None:
        self._artifacts: dict[str, a2a.Artifact] = {}

    def add(self, update: a2a.TaskArtifactUpdateEvent) -> None:
        """Apply one artifact update (append or replace)."""
        current = self._artifacts.get(update.artifact.artifact_id)
        if current is None or not update.append:
            self._artifacts[update.artifact.artifact_id] = a2a.Artifact()
            self._artifacts[update.artifact.artifact_id].CopyFrom(update.artifact)
            return
        for part in update.artifact.parts:
            last = current.parts[-1] if current.parts else None
            if (
                last is not None
                and last.WhichOneof("content") == "text"
                and part.WhichOneof("content") == "text"
            ):
                # Streamed text: one growing text part, as a reader expects it.
                last.text += part.text
            else:
                current.parts.append(part)

    @property
    def artifacts(self) -> list[a2a.Artifact]:
        """The artifacts, in the order they first appeared."""
        return list(self._artifacts.values())
