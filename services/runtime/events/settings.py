"""Settings of the event stream and of event publishing (the ``events`` settings section).

These are plain frozen pydantic models with no NATS import, so the shared
:class:`~hivewire.services.runtime.config.Settings` can nest them cheaply. Every field
is reachable from the environment, for example ``HIVEWIRE_EVENTS__STREAM__MAX_AGE=86400``
or ``HIVEWIRE_EVENTS__MAX_BUFFER=50000``.
"""

from __future__ import annotations

from pydantic import Field

from hivewire.services.runtime.sections import Section

__all__ = [
    "DEFAULT_DLQ_STREAM",
    "DEFAULT_EVENTS_STREAM",
    "DLQ_SUBJECT_PREFIX",
    "EVENTS_SUBJECT_PREFIX",
    "EventsSettings",
    "StreamSettings",
]

DEFAULT_EVENTS_STREAM = "HIVEWIRE_EVENTS"
DEFAULT_DLQ_STREAM = "HIVEWIRE_DLQ"
EVENTS_SUBJECT_PREFIX = "hivewire.events"
DLQ_SUBJECT_PREFIX = "hivewire.dlq"

_DAY = 86_400.0


class StreamSettings(Section):
    """Limits of the JetStream event store and of its dead-letter stream.

    Both streams use file storage and ``limits`` retention: events are kept until the
    first of ``max_age`` / ``max_bytes`` / ``max_msgs`` is reached, then the oldest are
    discarded. The defaults fit comfortably inside the 1 GB ``max_file_store`` that
    ``make run`` gives nats-server.
    """

    name: str = Field(DEFAULT_EVENTS_STREAM, description="Event stream name.")
    max_age: float = Field(7 * _DAY, gt=0, description="Seconds an event is kept.")
    max_bytes: int = Field(
        256 * 1024 * 1024, description="Size cap of the event stream in bytes (-1: none)."
    )
    max_msgs: int = Field(-1, description="Event count cap (-1: none).")
    duplicate_window: float = Field(
        300.0,
        gt=0,
        description=(
            "Seconds during which a re-sent Nats-Msg-Id is recognised and not stored twice; "
            "covers publisher retries across a NATS outage of that length."
        ),
    )
    replicas: int = Field(1, ge=1, le=5, description="Stream replicas (1 on a single server).")
    dlq_name: str = Field(DEFAULT_DLQ_STREAM, description="Dead-letter stream name.")
    dlq_max_age: float = Field(30 * _DAY, gt=0, description="Seconds a dead letter is kept.")
    dlq_max_bytes: int = Field(
        64 * 1024 * 1024, description="Size cap of the dead-letter stream in bytes (-1: none)."
    )


class EventsSettings(Section):
    """How a service publishes events (``Settings.events``)."""

    enabled: bool = Field(True, description="Publish events on NATS; false turns them off.")
    stream: StreamSettings = Field(default_factory=StreamSettings)
    max_buffer: int = Field(
        10_000,
        ge=1,
        description="Events held while NATS is unreachable; beyond it the oldest are dropped.",
    )
    progress_interval: float = Field(
        0.25,
        ge=0,
        description="At most one task.progress event per task per this many seconds (0: all).",
    )
    publish_timeout: float = Field(
        2.0, gt=0, description="Seconds to wait for JetStream's ack before re-sending."
    )
    close_timeout: float = Field(
        5.0, ge=0, description="Seconds a stopping service waits for buffered events to go out."
    )
    batch_min: int = Field(
        32,
        ge=0,
        description=(
            "A send window of at least this many events goes to JetStream as one atomic "
            "batch with one ack (when the stream allows it); smaller ones event by event. "
            "0: never batch."
        ),
    )
