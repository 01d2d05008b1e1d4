"""Prometheus metrics of the registry backends (labelled by backend, never by id)."""

from __future__ import annotations

from prometheus_client import Counter

__all__ = ["HEARTBEATS", "HEARTBEATS_FAILED", "REREGISTRATIONS", "WATCH_ERRORS"]

HEARTBEATS = Counter(
    "hivewire_registry_heartbeats_total",
    "Registry heartbeats (TTL pass, KV put) that succeeded.",
    ["backend"],
)
HEARTBEATS_FAILED = Counter(
    "hivewire_registry_heartbeats_failed_total",
    "Registry heartbeats (TTL pass, KV put) that failed.",
    ["backend"],
)
WATCH_ERRORS = Counter(
    "hivewire_registry_watch_errors_total",
    "Registry watch or resolve rounds that failed and were retried.",
    ["backend"],
)
REREGISTRATIONS = Counter(
    "hivewire_registry_reregistrations_total",
    "Instances registered again after the backend lost them (reaped, expired, restarted).",
    ["backend"],
)
