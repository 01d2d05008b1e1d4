"""Security signals: every refused authentication or authorization is counted and logged.

``hivewire_security_denials_total{kind, reason}`` counts refusals (``kind`` is ``authn``
for a bad credential, ``authz`` for a caller the policy does not allow); the log line
names the caller's identity and the method, never the credential. A serving process
that publishes events also turns each refusal into a ``security.authn_failed`` or
``security.authz_denied`` event (:func:`publish_denials`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from prometheus_client import Counter

from hivewire.events.v1 import events_pb2
from hivewire.services.runtime.eventsink import EventSink

logger = logging.getLogger(__name__)

DENIALS = Counter(
    "hivewire_security_denials_total",
    "Calls refused by authentication (authn) or authorization (authz), by reason.",
    ["kind", "reason"],
)

DenialSink = Callable[[str, str, str, str], None]
"""``sink(kind, reason, caller, method)``: called once per refusal."""

_sink: DenialSink | None = None


def set_denial_sink(sink: DenialSink | None) -> None:
    """Route refusals to ``sink`` as well (None: metrics and logs only)."""
    global _sink
    _sink = sink


def record_denial(kind: str, reason: str, caller: str, method: str) -> None:
    """Count, log and (with a sink) publish one refusal.

    Args:
        kind: ``authn`` or ``authz``.
        reason: The refusal's ``ErrorInfo.reason``.
        caller: The identity the call came with (its certificate's SPIFFE id, or the
            principal of its credential); never the credential itself.
        method: The full gRPC method name.
    """
    DENIALS.labels(kind, reason).inc()
    logger.info(
        "security: %s refused %s for %s (%s)", kind, method, caller or "no identity", reason
    )
    if _sink is not None:
        try:
            _sink(kind, reason, caller, method)
        except Exception:  # a failing sink must not turn a refusal into INTERNAL
            logger.exception("security: the denial sink failed")


_EVENT_TYPES = {"authn": "security.authn_failed", "authz": "security.authz_denied"}


def publish_denials(events: EventSink[events_pb2.SecurityEventData] | None) -> None:
    """Publish every refusal of this process as a ``security.*`` event (None: stop)."""
    if events is None:
        set_denial_sink(None)
        return

    def sink(kind: str, reason: str, caller: str, method: str) -> None:
        data = events_pb2.SecurityEventData(kind=kind, reason=reason, caller=caller, method=method)
        events.publish(_EVENT_TYPES[kind], subject=caller or "anonymous", data=data)

    set_denial_sink(sink)
