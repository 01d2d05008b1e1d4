"""The ``events.v1.Event`` envelope: event types, subjects, headers and trace context.

Nothing here talks to NATS; :mod:`.publisher` and :mod:`.subscriber` use these helpers
so that every service builds envelopes, subjects and headers the same way.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Mapping
from typing import Final, Required, TypeAlias, TypedDict, Unpack

from opentelemetry.context import Context
from opentelemetry.trace import Status, StatusCode

from hivewire.events.v1 import events_pb2
from hivewire.services.runtime import tracing
from hivewire.services.runtime.logging import correlation_id_var

from .headers import HEADER_CORRELATION_ID, HEADER_MSG_ID, HEADER_TRACEPARENT, HEADER_TRACESTATE
from .settings import DLQ_SUBJECT_PREFIX, EVENTS_SUBJECT_PREFIX

__all__ = [
    "CATEGORIES",
    "EVENT_TYPES",
    "EventData",
    "EventFields",
    "build_event",
    "build_traced_event",
    "category_of",
    "dlq_subject_for",
    "event_headers",
    "event_subject",
    "filter_subject",
    "header_value",
]

EventData: TypeAlias = (
    events_pb2.TaskEventData
    | events_pb2.AgentEventData
    | events_pb2.ModelEventData
    | events_pb2.ToolEventData
    | events_pb2.WorkflowEventData
    | events_pb2.ProjectEventData
    | events_pb2.SecurityEventData
)
"""The typed data an event carries; its message type must match the event's category."""

# category -> (oneof field of Event.data, data message type)
_DATA_FIELDS: Final[dict[str, tuple[str, type[EventData]]]] = {
    "task": ("task", events_pb2.TaskEventData),
    "agent": ("agent", events_pb2.AgentEventData),
    "model": ("model", events_pb2.ModelEventData),
    "tool": ("tool", events_pb2.ToolEventData),
    "workflow": ("workflow", events_pb2.WorkflowEventData),
    "project": ("project", events_pb2.ProjectEventData),
    "security": ("security", events_pb2.SecurityEventData),
}

CATEGORIES: Final[tuple[str, ...]] = tuple(_DATA_FIELDS)
"""Every event category, in the order of the ``Event.data`` oneof."""

EVENT_TYPES: Final[Mapping[str, frozenset[str]]] = {
    "task": frozenset(
        {
            "created",
            "assigned",
            "started",
            "progress",
            "input_required",
            "completed",
            "failed",
            "cancelled",
            "retried",
            "dead_lettered",
            "requeued",
            # The coordinator's other task events (TaskEventData.event carries them).
            "state_changed",
            "partial",
            "activity",
            "step",
        }
    ),
    "agent": frozenset({"registered", "deregistered", "health_changed"}),
    "model": frozenset({"request_started", "request_completed", "failed"}),
    "tool": frozenset({"invoked", "completed", "failed", "approval_requested"}),
    "workflow": frozenset(
        {"started", "step_completed", "step_failed", "compensated", "completed", "failed"}
    ),
    # Projects are defined by deployments: any well-formed event name is accepted.
    "project": frozenset(),
    "security": frozenset({"authn_failed", "authz_denied"}),
}
"""The events of each category (DESIGN.md section 5); ``project`` is open-ended."""

_NAME = re.compile(r"^[a-z][a-z0-9_]*$")
_TOKEN = re.compile(r"^([a-z0-9_]+|\*|>)$")
_TRACEPARENT = re.compile(r"^[0-9a-f]{2}-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}$")
_MAX_HEADER = 1024


def category_of(event_type: str) -> str:
    """Return the category of ``event_type`` after checking it is a known event type.

    Args:
        event_type: ``"<category>.<event>"``, for example ``"task.completed"``.

    Raises:
        ValueError: The type is malformed, its category unknown, or (outside ``project``)
            its event is not one of :data:`EVENT_TYPES`.
    """
    category, dot, name = event_type.partition(".")
    if not dot or not _NAME.match(category) or not _NAME.match(name):
        raise ValueError(f"event type {event_type!r} is not '<category>.<event>' (lower_snake)")
    known = EVENT_TYPES.get(category)
    if known is None:
        raise ValueError(f"unknown event category {category!r} (expected one of {CATEGORIES})")
    if known and name not in known:
        raise ValueError(f"unknown {category} event {name!r} (expected one of {sorted(known)})")
    return category


def event_subject(event_type: str) -> str:
    """Return the NATS subject of an event type: ``hivewire.events.<category>.<event>``."""
    return f"{EVENTS_SUBJECT_PREFIX}.{event_type}"


def filter_subject(pattern: str) -> str:
    """Turn a subscription pattern into a NATS filter subject under ``hivewire.events``.

    ``"task.*"`` becomes ``hivewire.events.task.*``; ``">"`` (or ``""``) is every event;
    a pattern already starting with ``hivewire.events`` is kept as it is.

    Raises:
        ValueError: The pattern is not made of NATS tokens (``a-z0-9_``, ``*``, ``>``).
    """
    pattern = pattern.strip()
    if pattern in ("", ">"):
        return f"{EVENTS_SUBJECT_PREFIX}.>"
    if pattern == EVENTS_SUBJECT_PREFIX or pattern.startswith(EVENTS_SUBJECT_PREFIX + "."):
        tokens = pattern.split(".")[2:]
        prefix_given = True
    else:
        tokens = pattern.split(".")
        prefix_given = False
    bad = [t for t in tokens if not _TOKEN.match(t)]
    if not tokens or bad or (">" in tokens[:-1]):
        raise ValueError(f"bad event pattern {pattern!r} (e.g. 'task.*', 'task.completed', '>')")
    return pattern if prefix_given else f"{EVENTS_SUBJECT_PREFIX}.{pattern}"


def dlq_subject_for(subject: str) -> str:
    """Return the dead-letter subject of an event subject.

    ``hivewire.events.task.completed`` becomes ``hivewire.dlq.task.completed``; any other
    subject is appended whole under ``hivewire.dlq``.
    """
    prefix = EVENTS_SUBJECT_PREFIX + "."
    suffix = subject[len(prefix) :] if subject.startswith(prefix) else subject
    return f"{DLQ_SUBJECT_PREFIX}.{suffix}"


def header_value(value: str) -> str:
    """Make ``value`` safe as a NATS header value: one line, at most 1024 characters."""
    flat = " ".join(value.split())
    return flat if len(flat) <= _MAX_HEADER else flat[: _MAX_HEADER - 3] + "..."


def build_event(
    event_type: str,
    *,
    source: str,
    subject: str,
    data: EventData,
    task_sequence: int = 0,
    correlation_id: str | None = None,
    traceparent: str | None = None,
    event_id: str | None = None,
    time_ns: int | None = None,
) -> events_pb2.Event:
    """Build an ``Event`` envelope.

    Args:
        event_type: ``"<category>.<event>"``, e.g. ``"task.completed"``.
        source: The publishing service instance, e.g. ``"coordinator/coordinator-1a2b"``.
        subject: The id of what the event is about (task, agent, call, project id).
        data: The typed data; its type must match the category.
        task_sequence: The task's event sequence number (task and workflow events).
        correlation_id: Defaults to the current correlation id (``correlation_id_var``).
        traceparent: The W3C ``traceparent`` of the work; defaults to the current span's.
        event_id: Defaults to a new random UUID.
        time_ns: Event time in ns since the epoch; defaults to now.

    Returns:
        The envelope.

    Raises:
        ValueError: Unknown event type, or data of another category's type.
    """
    category = category_of(event_type)
    field, expected = _DATA_FIELDS[category]
    if not isinstance(data, expected):
        raise ValueError(f"{event_type} carries {expected.__name__}, not {type(data).__name__}")
    if task_sequence < 0:
        raise ValueError("task_sequence must be >= 0")
    if correlation_id is None:
        correlation_id = correlation_id_var.get()
    if traceparent is None:
        current: dict[str, str] = {}
        tracing.inject(current)
        traceparent = current.get(HEADER_TRACEPARENT)
    event = events_pb2.Event(
        id=event_id or str(uuid.uuid4()),
        type=event_type,
        source=source,
        correlation_id=correlation_id or "",
        subject=subject,
        task_sequence=task_sequence,
    )
    if traceparent and _TRACEPARENT.match(traceparent):
        event.traceparent = traceparent
    if time_ns is None:
        event.time.GetCurrentTime()
    else:
        event.time.FromNanoseconds(time_ns)
    getattr(event, field).CopyFrom(data)
    return event


class EventFields(TypedDict, total=False):
    """The keyword arguments of :func:`build_event` but ``traceparent``."""

    source: Required[str]
    subject: Required[str]
    data: Required[EventData]
    task_sequence: int
    correlation_id: str | None
    event_id: str | None
    time_ns: int | None


def build_traced_event(
    event_type: str, *, parent: Context | None = None, **fields: Unpack[EventFields]
) -> tuple[events_pb2.Event, dict[str, str]]:
    """Build an envelope inside its PRODUCER span (a child of ``parent``, else the current span).

    The span's W3C context becomes the envelope's ``traceparent``; the other arguments
    are those of :func:`build_event`. The span is never made current (nothing runs in
    it but building the envelope): no context to attach and detach per event.

    Returns:
        The envelope and the span's W3C headers (for :func:`event_headers`).
    """
    nats_subject = event_subject(event_type)
    span = tracing.tracer.start_span(
        f"{nats_subject} publish",
        context=parent,
        kind=tracing.SpanKind.PRODUCER,
        attributes={
            "messaging.system": "nats",
            "messaging.operation.type": "publish",
            "messaging.destination.name": nats_subject,
        },
    )
    try:
        carrier = tracing.span_headers(span)
        event = build_event(event_type, traceparent=carrier.get(HEADER_TRACEPARENT, ""), **fields)
        span.set_attribute("messaging.message.id", event.id)
    except Exception as exc:
        span.record_exception(exc)
        span.set_status(Status(StatusCode.ERROR, f"{type(exc).__name__}: {exc}"))
        raise
    finally:
        span.end()
    return event, carrier


def event_headers(
    event: events_pb2.Event, trace_headers: Mapping[str, str] | None = None
) -> dict[str, str]:
    """Return the NATS headers of an event message.

    ``Nats-Msg-Id`` (the event id: JetStream drops a re-sent copy), ``X-Correlation-Id``
    and the W3C ``traceparent`` / ``tracestate`` when known.

    Args:
        event: The envelope.
        trace_headers: The W3C context the event was built in (``tracing.inject``);
            its ``tracestate`` goes along when its ``traceparent`` is the event's.
    """
    headers = {HEADER_MSG_ID: event.id}
    if event.correlation_id:
        headers[HEADER_CORRELATION_ID] = header_value(event.correlation_id)
    if event.traceparent:
        headers[HEADER_TRACEPARENT] = event.traceparent
        carried = trace_headers or {}
        state = carried.get(HEADER_TRACESTATE)
        if state and carried.get(HEADER_TRACEPARENT) == event.traceparent:
            headers[HEADER_TRACESTATE] = header_value(state)
    return headers
