"""Where a service's domain code sends events: one Protocol for every service.

:class:`~hivewire.services.runtime.events.EventPublisher` implements it (and is what
the entry points pass in); tests pass recorders. It lives apart from
``runtime.events``, which imports the NATS client, so domain modules that only
publish stay import-light.
"""

from __future__ import annotations

from typing import Protocol, TypeVar

__all__ = ["EventSink", "NullSink"]

DataT = TypeVar("DataT", contravariant=True)
"""The typed ``data`` message of the events a service publishes (``TaskEventData``...)."""


class EventSink(Protocol[DataT]):
    """Publishes events without blocking: it buffers and sends in the background."""

    def publish(
        self,
        event_type: str,
        *,
        subject: str,
        data: DataT,
        task_sequence: int = 0,
        correlation_id: str | None = None,
    ) -> None:
        """Queue one event of ``event_type`` (``"task.completed"``) about ``subject``."""
        ...


class NullSink:
    """An :class:`EventSink` that drops everything (events off)."""

    def publish(self, event_type: str, **fields: object) -> None:
        """Drop the event (``fields`` are those of :meth:`EventSink.publish`)."""
