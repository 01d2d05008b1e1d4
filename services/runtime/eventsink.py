"""Where a service's domain code sends events: one Protocol for every service.

:class:`~hivewire.services.runtime.events.EventPublisher` implements it (and is what
the entry points pass in); tests pass recorders. It lives apart from
``runtime.events``, which imports the NATS client, so domain modules that only
publish stay import-light.
"""

from __future__ import annotations

from typing import Generic, Protocol, Required, TypedDict, TypeVar, Unpack

__all__ = ["EventSink", "NullSink"]

DataT = TypeVar("DataT", contravariant=True)
"""The typed ``data`` message of the events a service publishes (``TaskEventData``...)."""


class PublishFields(TypedDict, Generic[DataT], total=False):
    """What an event says besides its type: the keyword arguments of ``publish``.

    Attributes:
        subject: The id of what the event is about (task, agent, call, project id).
        data: The typed data.
        task_sequence: The task's event sequence number (task and workflow events).
        correlation_id: Defaults to the current correlation id.
    """

    subject: Required[str]
    data: Required[DataT]
    task_sequence: int
    correlation_id: str | None


class EventSink(Protocol[DataT]):
    """Publishes events without blocking: it buffers and sends in the background."""

    def publish(self, event_type: str, **fields: Unpack[PublishFields[DataT]]) -> None:
        """Queue one event of ``event_type`` (``"task.completed"``) about ``subject``."""
        ...


class NullSink:
    """An :class:`EventSink` that drops everything (events off)."""

    def publish(self, event_type: str, **fields: object) -> None:
        """Drop the event (``fields`` are those of :meth:`EventSink.publish`)."""
