"""Prometheus metrics of the agent runtime (default registry, never labelled by an id)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge

IN_FLIGHT = Gauge(
    "hivewire_agent_in_flight",
    "Tasks this agent process is running now (handlers not yet ended).",
)
EXECUTIONS = Counter(
    "hivewire_agent_executions_total",
    "Attempts run by this agent process, by capability and outcome.",
    ("capability", "outcome"),
)
REJECTED = Counter(
    "hivewire_agent_rejected_total",
    "Assignments refused because max_concurrency tasks were running.",
)
PARTIALS_JOINED = Counter(
    "hivewire_agent_partials_joined_total",
    "Partial chunks sent inside the message of the chunk before them (they queued up "
    "behind a busy stream and were coalesced).",
)
