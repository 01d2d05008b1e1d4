"""Conversions between the coordinator's domain values, protobuf messages and store rows."""

from __future__ import annotations

import base64
import binascii
import json

from google.protobuf import timestamp_pb2
from google.protobuf.message import Message

from hivewire.agent.v1 import agent_pb2
from hivewire.common.v1 import common_pb2
from hivewire.coordinator.v1 import coordinator_pb2
from hivewire.services.coordinator.model import AgentView, TaskRecord
from hivewire.services.coordinator.store import TaskRow
from hivewire.services.coordinator.webhook_store import DeliveryRow, WebhookRow
from hivewire.services.runtime.convert import duration, duration_seconds, same_named
from hivewire.services.runtime.errors import (
    FailedPrecondition,
    FieldViolation,
    HivewireError,
    InvalidArgument,
    NotFound,
)

__all__ = [
    "agent_status",
    "copy_present",
    "decode_page_token",
    "duration",
    "duration_seconds",
    "encode_page_token",
    "error_detail",
    "record_from_row",
    "record_to_row",
    "task_to_proto",
    "timestamp_ns",
]


def timestamp_ns(value_ns: int) -> timestamp_pb2.Timestamp:
    """Nanoseconds since the epoch as a Timestamp."""
    return timestamp_pb2.Timestamp(
        seconds=value_ns // 1_000_000_000, nanos=value_ns % 1_000_000_000
    )


def ns_from_timestamp(value: timestamp_pb2.Timestamp) -> int:
    """A Timestamp as nanoseconds since the epoch."""
    return value.seconds * 1_000_000_000 + value.nanos


def copy_present(message: Message, **fields: Message | None) -> None:
    """Set the named message fields of ``message`` to the values given (None: left unset)."""
    for name, value in fields.items():
        if value is not None:
            getattr(message, name).CopyFrom(value)


# -- tasks -------------------------------------------------------------------------------

#: What a task's store row keeps under its record's names (read back into the record).
_ROW_FIELDS = (
    "task_id",
    "owner",
    "state",
    "created_ns",
    "updated_ns",
    "deadline_ns",
    "not_before_ns",
    "last_sequence",
)
#: What its ``Task`` message (the row's data) keeps under its record's names.
_TASK_FIELDS = (
    "attempt",
    "agent_id",
    "usage",
    "parent_task_id",
    "step_id",
    "role",
    "project_id",
    "depth",
)


def _dynamic_part(record: TaskRecord) -> coordinator_pb2.Task:
    task = coordinator_pb2.Task(
        **same_named(record, _TASK_FIELDS),
        task_id=record.task_id,
        state=record.state,
        owner=record.owner,
        created_at=timestamp_ns(record.created_ns),
        updated_at=timestamp_ns(record.updated_ns),
        deadline=timestamp_ns(record.deadline_ns),
        last_sequence=record.last_sequence,
        attempts=record.attempts,
        steps=record.steps,
        coordinator_id=record.coordinator,
    )
    copy_present(
        task,
        progress=record.progress,
        output=record.output,
        error=record.error,
        pending_input=record.pending_input,
    )
    return task


def task_to_proto(record: TaskRecord) -> coordinator_pb2.Task:
    """The ``coordinator.v1.Task`` of a record."""
    task = _dynamic_part(record)
    task.spec.CopyFrom(record.spec)
    return task


def record_to_row(record: TaskRecord, spec_bytes: bytes) -> TaskRow:
    """The store row of a record.

    Args:
        record: The task.
        spec_bytes: ``record.spec`` serialized (cached by the caller: it never changes).
    """
    return TaskRow(
        **same_named(record, _ROW_FIELDS),
        capability=record.capability,
        priority=record.priority,
        idempotency_key=record.spec.idempotency_key,
        spec=spec_bytes,
        data=_dynamic_part(record).SerializeToString(),
        parent_task_id=record.parent_task_id,
        project_id=record.project_id,
        coordinator=record.coordinator,
    )


def record_from_row(row: TaskRow) -> TaskRecord:
    """Rebuild a record from its store row."""
    task = coordinator_pb2.Task.FromString(row.data)
    return TaskRecord(
        **same_named(row, _ROW_FIELDS),
        **same_named(task, _TASK_FIELDS),
        spec=coordinator_pb2.TaskSpec.FromString(row.spec),
        progress=task.progress if task.HasField("progress") else None,
        output=task.output if task.HasField("output") else None,
        error=task.error if task.HasField("error") else None,
        pending_input=task.pending_input if task.HasField("pending_input") else None,
        attempts=list(task.attempts),
        steps=list(task.steps),
        coordinator=row.coordinator or task.coordinator_id,
    )


def record_from_task(task: coordinator_pb2.Task) -> TaskRecord:
    """Rebuild a record from a whole ``Task`` (the answer of another coordinator)."""
    dynamic = coordinator_pb2.Task()
    dynamic.CopyFrom(task)
    dynamic.ClearField("spec")
    return record_from_row(
        TaskRow(
            task_id=task.task_id,
            owner=task.owner,
            capability=task.spec.capability,
            state=task.state,
            priority=task.spec.priority,
            created_ns=ns_from_timestamp(task.created_at),
            updated_ns=ns_from_timestamp(task.updated_at),
            deadline_ns=ns_from_timestamp(task.deadline),
            idempotency_key=task.spec.idempotency_key,
            not_before_ns=0,
            last_sequence=task.last_sequence,
            spec=task.spec.SerializeToString(),
            data=dynamic.SerializeToString(),
            coordinator=task.coordinator_id,
        )
    )


# -- errors ------------------------------------------------------------------------------


def error_detail(err: HivewireError) -> common_pb2.ErrorDetail:
    """A domain error as the ``ErrorDetail`` carried in events and session rejections.

    Field violations and resource names go into ``metadata`` so that a client
    reading a ``SessionRejected`` sees the same details a unary call would give.
    """
    metadata = dict(err.metadata)
    if isinstance(err, InvalidArgument):
        for violation in err.violations:
            metadata[f"field:{violation.field}"] = violation.description
    elif isinstance(err, NotFound):
        metadata.setdefault("resource_type", err.resource_type)
        metadata.setdefault("resource_name", err.resource_name)
    elif isinstance(err, FailedPrecondition):
        for v in err.violations:
            metadata[f"precondition:{v.type}"] = f"{v.subject}: {v.description}"
    return common_pb2.ErrorDetail(
        code=err.code.name,
        reason=err.reason,
        message=err.message,
        retryable=err.retryable,
        metadata=metadata,
    )


def make_error(
    code: str, reason: str, message: str, *, retryable: bool = False
) -> common_pb2.ErrorDetail:
    """Build an ``ErrorDetail``."""
    return common_pb2.ErrorDetail(code=code, reason=reason, message=message, retryable=retryable)


# -- agents ------------------------------------------------------------------------------


def agent_status(view: AgentView) -> coordinator_pb2.AgentStatus:
    """The ``AgentStatus`` of an agent view."""
    card = agent_pb2.AgentCard()
    if view.card is not None:
        card.CopyFrom(view.card)
    else:
        card.name = view.name
        card.version = view.version
        card.max_concurrency = view.max_concurrency
        card.capabilities.extend(agent_pb2.Capability(name=c) for c in view.capabilities)
    if view.draining:
        health = coordinator_pb2.AGENT_HEALTH_DRAINING
    elif view.healthy:
        health = coordinator_pb2.AGENT_HEALTH_HEALTHY
    else:
        health = coordinator_pb2.AGENT_HEALTH_UNHEALTHY
    return coordinator_pb2.AgentStatus(
        agent_id=view.agent_id,
        card=card,
        address=view.address,
        health=health,
        in_flight=view.in_flight,
        circuit_open=view.circuit_open,
        last_seen=timestamp_ns(view.last_seen_ns),
    )


# -- page tokens -------------------------------------------------------------------------


def encode_page_token(created_ns: int, task_id: str, fingerprint: str) -> str:
    """An opaque token for the page after ``(created_ns, task_id)``.

    ``fingerprint`` identifies the filter the token was issued for, so a token is not
    reused with a different filter by mistake.
    """
    raw = json.dumps({"c": created_ns, "t": task_id, "f": fingerprint}, separators=(",", ":"))
    return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")


def decode_page_token(token: str, fingerprint: str) -> tuple[int, str]:
    """The ``(created_ns, task_id)`` cursor of a page token.

    Raises:
        InvalidArgument: The token is malformed or was issued for another filter.
    """
    bad = InvalidArgument(
        violations=[FieldViolation("page_token", "malformed page token; pass next_page_token")],
        reason="INVALID_PAGE_TOKEN",
    )
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        data = json.loads(raw)
    except (binascii.Error, ValueError, UnicodeDecodeError):
        raise bad from None
    if (
        not isinstance(data, dict)
        or not isinstance(data.get("c"), int)
        or not isinstance(data.get("t"), str)
        or not isinstance(data.get("f"), str)
    ):
        raise bad
    if data["f"] != fingerprint:
        raise InvalidArgument(
            violations=[
                FieldViolation("page_token", "page token was issued for different filters")
            ],
            reason="INVALID_PAGE_TOKEN",
        )
    return int(data["c"]), str(data["t"])


def _scalar_fields(message_type: type[Message]) -> tuple[str, ...]:
    """The names of a message's fields that are neither messages nor lists of them."""
    return tuple(f.name for f in message_type.DESCRIPTOR.fields if f.message_type is None)


# What the API shows of a webhook and a delivery: each scalar field of its message is the
# row's column of that name (a secret is never one of them); the times are converted.
_REGISTRATION_FIELDS = _scalar_fields(coordinator_pb2.WebhookRegistration)
_DELIVERY_FIELDS = _scalar_fields(coordinator_pb2.WebhookDelivery)


def webhook_registration(row: WebhookRow) -> coordinator_pb2.WebhookRegistration:
    """A registered webhook as the API shows it (never with its secret)."""
    return coordinator_pb2.WebhookRegistration(
        **same_named(row, _REGISTRATION_FIELDS), created_at=timestamp_ns(row.created_ns)
    )


def webhook_delivery(row: DeliveryRow) -> coordinator_pb2.WebhookDelivery:
    """One webhook delivery as the API shows it."""
    delivery = coordinator_pb2.WebhookDelivery(
        **same_named(row, _DELIVERY_FIELDS), created_at=timestamp_ns(row.created_ns)
    )
    if row.next_at_ns:
        delivery.next_attempt_at.CopyFrom(timestamp_ns(row.next_at_ns))
    return delivery
