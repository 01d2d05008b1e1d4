"""Prometheus metrics of event publishing and consuming (never labelled by an id)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

__all__ = [
    "BATCHES",
    "BUFFERED",
    "COALESCED",
    "DEAD_LETTERED",
    "DROPPED",
    "HANDLED",
    "PUBLISHED",
    "PUBLISH_FAILED",
    "PUBLISH_LAG",
    "SUBSCRIBER_LAG",
]

PUBLISHED = Counter(
    "hivewire_events_published_total",
    "Events acknowledged by JetStream (re-sent copies that JetStream de-duplicated included).",
    ["category"],
)
PUBLISH_LAG = Histogram(
    "hivewire_events_publish_lag_seconds",
    "Time from publish() to JetStream's ack: buffering, outages and the round trip.",
    ["category"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
)
BATCHES = Counter(
    "hivewire_events_batches_total",
    "Send windows offered to JetStream as one atomic batch, by outcome: stored, or refused"
    " (then sent event by event).",
    ["outcome"],
)
PUBLISH_FAILED = Counter(
    "hivewire_events_publish_failed_total",
    "Publish attempts that got no ack (NATS down, timeout, stream error); the event is retried.",
    ["category"],
)
BUFFERED = Gauge(
    "hivewire_events_buffered",
    "Events waiting in this process's publish buffer.",
)
DROPPED = Counter(
    "hivewire_events_dropped_total",
    "Events given up: buffer_full (the oldest make room) or shutdown (NATS still down at exit).",
    ["reason"],
)
COALESCED = Counter(
    "hivewire_events_coalesced_total",
    "task.progress events replaced by a later one before they were sent.",
)
HANDLED = Counter(
    "hivewire_events_handled_total",
    "Event deliveries to subscribers by outcome: ok, retry (handler failed, nak with backoff),"
    " duplicate (already processed, acked without calling the handler).",
    ["consumer", "outcome"],
)
DEAD_LETTERED = Counter(
    "hivewire_events_dead_lettered_total",
    "Events moved to the dead-letter stream after exhausting their deliveries.",
    ["consumer"],
)
SUBSCRIBER_LAG = Gauge(
    "hivewire_events_subscriber_lag",
    "Events in the stream a durable consumer has not been delivered yet (num_pending).",
    ["consumer"],
)
