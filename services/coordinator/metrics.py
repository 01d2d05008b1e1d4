"""Prometheus metrics of the coordinator (default registry; never labelled by an id)."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Protocol

from prometheus_client import Counter, Gauge, Histogram

from hivewire.coordinator.v1 import coordinator_pb2
from hivewire.services.coordinator.model import TaskRecord, state_name
from hivewire.services.runtime.breaker import CircuitState

TASKS_SUBMITTED = Counter(
    "hivewire_coordinator_tasks_submitted_total",
    "Tasks accepted (deduplicated submissions not counted).",
)
TASKS_DEDUPLICATED = Counter(
    "hivewire_coordinator_tasks_deduplicated_total",
    "Submissions answered with an earlier task because of their idempotency key.",
)
TASKS_FINISHED = Counter(
    "hivewire_coordinator_tasks_finished_total",
    "Tasks that reached a terminal state, by state.",
    ("state",),
)
TASKS_ACTIVE = Gauge(
    "hivewire_coordinator_tasks_active",
    "Tasks not yet finished, by state.",
    ("state",),
)
QUEUE_DEPTH = Gauge(
    "hivewire_coordinator_queue_depth",
    "Tasks waiting for an agent, by priority.",
    ("priority",),
)
ATTEMPTS = Counter(
    "hivewire_coordinator_attempts_total",
    "Attempts dispatched to agents, by outcome.",
    ("outcome",),
)
RETRIES = Counter("hivewire_coordinator_retries_total", "Attempts retried after a failure.")
TASKS_TAKEN_OVER = Counter(
    "hivewire_coordinator_tasks_taken_over_total",
    "Tasks claimed from another coordinator whose lease expired (or from this one's, "
    "after it let them go).",
)
TASKS_LET_GO = Counter(
    "hivewire_coordinator_tasks_let_go_total",
    "Tasks this coordinator let go: another one took them over, or its lease lapsed.",
)
QUEUE_WAIT_SECONDS = Histogram(
    "hivewire_coordinator_queue_wait_seconds",
    "Time from a task's (re)queueing to its dispatch.",
    buckets=(0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 10, 30, 60, 300),
)
AGENTS = Gauge("hivewire_coordinator_agents", "Known agents, by health.", ("health",))
AGENT_IN_FLIGHT = Gauge(
    "hivewire_coordinator_agent_in_flight", "Attempts running on agents, all agents together."
)
AGENT_SLOTS = Gauge(
    "hivewire_coordinator_agent_slots", "Sum of the max concurrency of healthy agents."
)
CIRCUITS = Gauge(
    "hivewire_coordinator_agent_circuits", "Agent circuit breakers, by state.", ("state",)
)
TASK_SECONDS = Histogram(
    "hivewire_coordinator_task_seconds",
    "Time from a task's acceptance to its terminal state, by that state.",
    ("state",),
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 900, 3600),
)
CAPABILITY_AGENTS = Gauge(
    "hivewire_coordinator_capability_agents",
    "Healthy agents that advertise each capability seen since start (0: none left).",
    ("capability",),
)
WATCHERS = Gauge(
    "hivewire_coordinator_watchers", "Open task event streams (watch, stream, session)."
)

_circuit_states: dict[str, CircuitState] = {}


def _recount() -> None:
    for candidate in CircuitState:
        count = sum(1 for s in _circuit_states.values() if s is candidate)
        CIRCUITS.labels(candidate.name.lower()).set(count)


def circuit_state_changed(name: str, state: CircuitState) -> None:
    """Breaker listener: keep the per-state circuit counts current."""
    _circuit_states[name] = state
    _recount()


def forget_circuit(name: str) -> None:
    """Drop a breaker that no longer exists from the counts."""
    if _circuit_states.pop(name, None) is not None:
        _recount()


MEMORY = Gauge(
    "hivewire_coordinator_memory_entries",
    "Entries of the coordinator's in-memory structures keyed by task, by structure "
    "(bounded by unfinished tasks or by a setting: steady growth is a leak).",
    ("structure",),
)


def bind_memory(counts: Callable[[], dict[str, int]]) -> None:
    """Report ``counts()`` (structure -> entries) as :data:`MEMORY`, read when scraped."""
    for name in counts():
        MEMORY.labels(name).set_function(partial(_entry, counts, name))


def _entry(counts: Callable[[], dict[str, int]], name: str) -> int:
    return counts().get(name, 0)


class _WithRecord(Protocol):
    """What the journal listener reads of a task (the journal's ``TaskRuntime``)."""

    @property
    def record(self) -> TaskRecord:
        """The task's state."""


def task_event_committed(rt: _WithRecord, event: coordinator_pb2.TaskEvent) -> None:
    """Journal listener: the latency of every task that finishes."""
    if event.WhichOneof("kind") != "finished":
        return
    seconds = (event.time.ToNanoseconds() - rt.record.created_ns) / 1e9
    TASK_SECONDS.labels(state_name(rt.record.state)).observe(max(seconds, 0.0))


# -- the event outbox (outbox.py) ---------------------------------------------------------

OUTBOX_WRITTEN = Counter(
    "hivewire_coordinator_outbox_written_total",
    "Task events stored with their NATS envelopes in the event outbox.",
)
OUTBOX_RELAYED = Counter(
    "hivewire_coordinator_outbox_relayed_total",
    "Outbox entries JetStream acknowledged and the relay recorded as published (what a "
    "restart sends again included): written minus relayed is the backlog.",
)
PARTIALS_JOINED = Counter(
    "hivewire_coordinator_partials_joined_total",
    "Partial results stored inside the event of the one before them (they arrived while "
    "the task's previous partial event was being committed).",
)


# -- agent links (link.py) ----------------------------------------------------------------

LINK_HELD_BYTES = Gauge(
    "hivewire_coordinator_link_held_bytes",
    "Bytes of agents' messages the agent links hold for attempts that have not taken them "
    "yet, all links together (each link at most its link_buffer_bytes plus one message).",
)
LINK_PAUSES = Counter(
    "hivewire_coordinator_link_paused_total",
    "Times an agent link stopped reading its stream because its attempts had not taken "
    "link_buffer_bytes of its messages (HTTP/2 flow control then holds the agent back).",
)
