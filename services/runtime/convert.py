"""Conversions of the well-known protobuf types every service uses.

``google.protobuf.Struct`` (JSON objects in payloads, schemas and tool arguments),
``Timestamp``, ``Duration`` and ``common.v1.ErrorDetail``: one implementation, so a
number, a time or an error reads the same whichever service wrote it. Each service's
own ``convert.py`` keeps only the conversions of its own messages.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from typing import Any, Protocol

from google.protobuf import duration_pb2, json_format, struct_pb2, timestamp_pb2
from google.protobuf.message import Message

from hivewire.common.v1 import common_pb2
from hivewire.services.runtime.values import ErrorInfo

__all__ = [
    "ClassifiedError",
    "duration",
    "duration_seconds",
    "error_detail",
    "error_info",
    "optional_struct",
    "optional_struct_dict",
    "same_named",
    "struct_to_dict",
    "timestamp",
    "to_struct",
]

_NANOS = 1_000_000_000
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_LARGEST_DOUBLE_INT = 2**1023


class ClassifiedError(Protocol):
    """An error as it travels in a stream: the fields of ``common.v1.ErrorDetail``."""

    @property
    def code(self) -> str:
        """GRPC status code name, e.g. ``"UNAVAILABLE"``."""
        ...

    @property
    def reason(self) -> str:
        """Stable UPPER_SNAKE reason."""
        ...

    @property
    def message(self) -> str:
        """Human-readable explanation."""
        ...

    @property
    def retryable(self) -> bool:
        """Whether another attempt may succeed."""
        ...

    @property
    def metadata(self) -> Mapping[str, str]:
        """Extra string context."""
        ...


def same_named(source: object, names: Iterable[str]) -> dict[str, Any]:
    """The attributes ``names`` of ``source``, by name, to pass on as keywords.

    For the fields a message and a domain value (or store row) call the same:
    ``Task(**same_named(record, FIELDS), created_at=...)``. The names are listed, never
    taken from the source, so only the fields named are copied.
    """
    return {name: getattr(source, name) for name in names}


def _representable(value: Any) -> Any:
    """Swap numbers a double cannot hold (huge ints) for their decimal strings."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and abs(value) >= _LARGEST_DOUBLE_INT:
        return str(value)
    if isinstance(value, Mapping):
        return {key: _representable(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_representable(item) for item in value]
    return value


def to_struct(value: Mapping[str, Any] | None) -> struct_pb2.Struct:
    """A JSON object as a ``google.protobuf.Struct`` (numbers become doubles).

    Integers too large for a double travel as their decimal strings instead of
    failing the conversion. None gives an empty Struct.
    """
    struct = struct_pb2.Struct()
    if value:
        struct.update(_representable(dict(value)))
    return struct


def struct_to_dict(struct: struct_pb2.Struct) -> dict[str, Any]:
    """A ``google.protobuf.Struct`` as a JSON object (numbers come back as floats)."""
    result: dict[str, Any] = json_format.MessageToDict(struct)
    return result


def optional_struct(value: Mapping[str, Any] | None) -> struct_pb2.Struct | None:
    """:func:`to_struct` for an optional ``Struct`` field: None leaves the field unset."""
    return None if value is None else to_struct(value)


def optional_struct_dict(message: Message, field: str) -> dict[str, Any] | None:
    """The JSON object of a message's optional ``Struct`` field, None when it is unset."""
    return struct_to_dict(getattr(message, field)) if message.HasField(field) else None


def timestamp(moment: datetime) -> timestamp_pb2.Timestamp:
    """A datetime as a Timestamp (naive datetimes are taken as local time).

    What ``Timestamp.FromDatetime`` gives, in integer arithmetic (a quarter of its cost:
    the agent stamps every event it sends).
    """
    since = moment.astimezone(UTC) - _EPOCH
    return timestamp_pb2.Timestamp(
        seconds=since.days * 86_400 + since.seconds, nanos=since.microseconds * 1_000
    )


def duration(seconds: float) -> duration_pb2.Duration:
    """Seconds as a Duration, to the nanosecond (negative values become zero)."""
    total = max(round(seconds * _NANOS), 0)
    return duration_pb2.Duration(seconds=total // _NANOS, nanos=total % _NANOS)


def duration_seconds(value: duration_pb2.Duration) -> float:
    """A Duration in seconds."""
    return value.seconds + value.nanos / _NANOS


def error_detail(error: ClassifiedError) -> common_pb2.ErrorDetail:
    """A classified error (an :class:`~hivewire.services.runtime.errors.ErrorInfo`...) as
    ``common.v1.ErrorDetail``.
    """
    return common_pb2.ErrorDetail(
        code=error.code,
        reason=error.reason,
        message=error.message,
        retryable=error.retryable,
        metadata=dict(error.metadata),
    )


def error_info(error: ClassifiedError) -> ErrorInfo:
    """A classified error (a ``common.v1.ErrorDetail``, a tool's ``ToolError``, an agent's
    ``AgentError``...) as the plain :class:`~hivewire.services.runtime.values.ErrorInfo`.
    """
    return ErrorInfo(
        code=error.code,
        reason=error.reason,
        message=error.message,
        retryable=error.retryable,
        metadata=dict(error.metadata),
    )
