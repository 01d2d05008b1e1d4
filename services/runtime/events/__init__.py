"""Events on NATS: the one place in hivewire that talks to NATS JetStream for events.

* :class:`EventPublisher` — non-blocking, outage-proof publishing of
  ``events.v1.Event`` envelopes on ``hivewire.events.<category>.<event>``.
* :func:`subscribe` / :class:`Subscription` — durable at-least-once consumers with
  de-duplication, retries with back-off and a dead-letter stream.
* :func:`replay` — read history from a time or a sequence, optionally following.
* :func:`ensure_stream` — create the ``HIVEWIRE_EVENTS`` and ``HIVEWIRE_DLQ`` streams.

See docs/events.md for subjects, headers, guarantees and settings.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from . import headers
from .headers import *  # noqa: F403 (the header names, cheap to load)
from .settings import (
    DEFAULT_DLQ_STREAM,
    DEFAULT_EVENTS_STREAM,
    DLQ_SUBJECT_PREFIX,
    EVENTS_SUBJECT_PREFIX,
    EventsSettings,
    StreamSettings,
)

# Everything else loads on first use: importing the settings (as config.py does)
# must not pull in the NATS client and its HTTP stack.
if TYPE_CHECKING:
    from ._nats import (
        ensure_stream,
    )
    from .envelope import (
        CATEGORIES,
        EVENT_TYPES,
        EventData,
        build_event,
        build_traced_event,
        category_of,
        dlq_subject_for,
        event_subject,
        filter_subject,
    )
    from .publisher import (
        EventPublisher,
        ProgressCoalescer,
    )
    from .redrive import redrive
    from .subscriber import (
        DEFAULT_BACKOFF,
        DeliverFrom,
        Handler,
        ReceivedEvent,
        Subscription,
        SubscriptionStats,
        replay,
        subscribe,
    )

_LAZY: dict[str, str] = {
    "ensure_stream": "._nats",
    "CATEGORIES": ".envelope",
    "EVENT_TYPES": ".envelope",
    "EventData": ".envelope",
    "build_event": ".envelope",
    "build_traced_event": ".envelope",
    "category_of": ".envelope",
    "dlq_subject_for": ".envelope",
    "event_subject": ".envelope",
    "filter_subject": ".envelope",
    "EventPublisher": ".publisher",
    "ProgressCoalescer": ".publisher",
    "DEFAULT_BACKOFF": ".subscriber",
    "DeliverFrom": ".subscriber",
    "Handler": ".subscriber",
    "ReceivedEvent": ".subscriber",
    "Subscription": ".subscriber",
    "SubscriptionStats": ".subscriber",
    "redrive": ".redrive",
    "replay": ".subscriber",
    "subscribe": ".subscriber",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value


__all__ = [
    "CATEGORIES",
    "DEFAULT_BACKOFF",
    "DEFAULT_DLQ_STREAM",
    "DEFAULT_EVENTS_STREAM",
    "DLQ_SUBJECT_PREFIX",
    "EVENTS_SUBJECT_PREFIX",
    "EVENT_TYPES",
    "DeliverFrom",
    "EventData",
    "EventPublisher",
    "EventsSettings",
    "Handler",
    "ProgressCoalescer",
    "ReceivedEvent",
    "StreamSettings",
    "Subscription",
    "SubscriptionStats",
    "build_event",
    "build_traced_event",
    "category_of",
    "dlq_subject_for",
    "ensure_stream",
    "event_subject",
    "filter_subject",
    "redrive",
    "replay",
    "subscribe",
]
__all__ += headers.__all__
