"""The NATS message headers of events and dead letters (no NATS import: cheap to load)."""

from __future__ import annotations

from typing import Final

__all__ = [
    "HEADER_BATCH_COMMIT",
    "HEADER_BATCH_ID",
    "HEADER_BATCH_SEQUENCE",
    "HEADER_CONSUMER",
    "HEADER_CORRELATION_ID",
    "HEADER_DELIVERY_COUNT",
    "HEADER_LAST_ERROR",
    "HEADER_MSG_ID",
    "HEADER_ORIGINAL_SEQUENCE",
    "HEADER_ORIGINAL_STREAM",
    "HEADER_ORIGINAL_SUBJECT",
    "HEADER_TRACEPARENT",
    "HEADER_TRACESTATE",
]

# Headers of every event message.
HEADER_MSG_ID: Final = "Nats-Msg-Id"
HEADER_CORRELATION_ID: Final = "X-Correlation-Id"
HEADER_TRACEPARENT: Final = "traceparent"
HEADER_TRACESTATE: Final = "tracestate"
# Headers JetStream keeps on the events of an atomic batch (see batch.py).
HEADER_BATCH_ID: Final = "Nats-Batch-Id"
HEADER_BATCH_SEQUENCE: Final = "Nats-Batch-Sequence"
HEADER_BATCH_COMMIT: Final = "Nats-Batch-Commit"
# Extra headers of a dead letter.
HEADER_ORIGINAL_SUBJECT: Final = "X-Hivewire-Original-Subject"
HEADER_ORIGINAL_STREAM: Final = "X-Hivewire-Original-Stream"
HEADER_ORIGINAL_SEQUENCE: Final = "X-Hivewire-Original-Sequence"
HEADER_DELIVERY_COUNT: Final = "X-Hivewire-Delivery-Count"
HEADER_LAST_ERROR: Final = "X-Hivewire-Last-Error"
HEADER_CONSUMER: Final = "X-Hivewire-Consumer"
