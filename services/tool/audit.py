"""Audit trail of tool calls: one log line, metrics and ``tool.*`` events per call.

Every call is logged on the ``hivewire.services.tool.audit`` logger (caller, tool,
argument digest, outcome, duration; never the arguments themselves) and counted in
Prometheus. With an event publisher, calls are also published:

- ``tool.invoked`` when the tool starts running,
- ``tool.completed`` when it returned a result,
- ``tool.failed`` when it failed, timed out, was cancelled, or the call was refused
  (unknown tool, bad arguments, caller not allowed, approval mismatch),
- ``tool.approval_requested`` when it needs an approval first.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass

from prometheus_client import Counter, Gauge, Histogram

from hivewire.events.v1 import events_pb2
from hivewire.services.runtime.convert import duration, error_detail
from hivewire.services.runtime.eventsink import EventSink
from hivewire.services.runtime.values import ErrorInfo

logger = logging.getLogger(__name__)

UNKNOWN_TOOL_LABEL = "_unknown"
"""Metric label for names that are not tools, so callers cannot grow label sets."""

CALLS = Counter(
    "hivewire_tool_calls_total",
    "Tool calls, by tool and outcome (ok, error, denied, timeout, approval_required).",
    ("tool", "outcome"),
)
ERRORS = Counter(
    "hivewire_tool_errors_total",
    "Tool calls that did not return a result, by tool and reason.",
    ("tool", "reason"),
)
DURATION = Histogram(
    "hivewire_tool_call_duration_seconds",
    "Time from the start of a tool call to its end, by tool.",
    ("tool",),
    buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300),
)
IN_FLIGHT = Gauge("hivewire_tool_calls_in_flight", "Tool calls running now.")


ToolEvents = EventSink[events_pb2.ToolEventData]
"""Where ``tool.*`` events go (``runtime.events.EventPublisher`` in a process)."""


@dataclass(frozen=True)
class AuditedCall:
    """Which call an audit entry is about: what every ``tool.*`` event starts with.

    Attributes:
        call_id: The call's id.
        tool_name: The tool's name.
        caller: The caller's SPIFFE id.
        task_id: The task, if any.
        arguments_digest: Digest of the arguments ("" when they could not be read).
    """

    call_id: str
    tool_name: str
    caller: str
    task_id: str
    arguments_digest: str

    def event_data(self) -> events_pb2.ToolEventData:
        """The event data naming this call (its fields are the message's, by name)."""
        return events_pb2.ToolEventData(**dataclasses.asdict(self))


@dataclass(frozen=True)
class AuditRecord:
    """What is known about a call when it ends (or pauses for approval).

    Attributes:
        call: Which call.
        outcome: ``ok``, ``error`` (also for cancelled calls, with reason ``CANCELLED``),
            ``denied``, ``timeout`` or ``approval_required``.
        duration: Seconds since the call started.
        error: The error, for calls that did not return a result.
        known_tool: Whether ``call.tool_name`` is a tool (else metrics use a fixed label).
    """

    call: AuditedCall
    outcome: str
    duration: float
    error: ErrorInfo | None = None
    known_tool: bool = True


class AuditTrail:
    """Logs, counts and publishes tool calls."""

    def __init__(self, publisher: ToolEvents | None = None) -> None:
        """Create the trail.

        Args:
            publisher: Where ``tool.*`` events go; None keeps them to logs and metrics.
        """
        self._publisher = publisher

    def _publish(self, event_type: str, data: events_pb2.ToolEventData) -> None:
        if self._publisher is None:
            return
        try:
            self._publisher.publish(event_type, subject=data.call_id, data=data)
        except Exception:
            # Events are best effort here: a broken publisher must not fail tool calls.
            logger.exception("could not publish %s for call %s", event_type, data.call_id)

    def invoked(self, call: AuditedCall) -> None:
        """Record that the tool started running."""
        IN_FLIGHT.inc()
        self._publish("tool.invoked", call.event_data())

    def finished(self, record: AuditRecord, *, started: bool) -> None:
        """Record the end of a call (or its pause for approval).

        Args:
            record: What happened.
            started: Whether :meth:`invoked` was recorded for it.
        """
        if started:
            IN_FLIGHT.dec()
        call = record.call
        label = call.tool_name if record.known_tool else UNKNOWN_TOOL_LABEL
        CALLS.labels(label, record.outcome).inc()
        DURATION.labels(label).observe(record.duration)
        if record.error is not None:
            ERRORS.labels(label, record.error.reason or record.error.code).inc()
        reason = f" reason={record.error.reason}" if record.error is not None else ""
        logger.info(
            "tool call call_id=%s caller=%s tool=%s digest=%s outcome=%s duration=%.3fs%s",
            call.call_id,
            call.caller or "-",
            call.tool_name,
            call.arguments_digest or "-",
            record.outcome,
            record.duration,
            reason,
        )
        data = call.event_data()
        data.outcome = record.outcome
        data.duration.CopyFrom(duration(record.duration))
        if record.error is not None:
            data.error.CopyFrom(error_detail(record.error))
        if record.outcome == "ok":
            event_type = "tool.completed"
        elif record.outcome == "approval_required":
            event_type = "tool.approval_requested"
        else:
            event_type = "tool.failed"
        self._publish(event_type, data)
