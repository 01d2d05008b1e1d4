"""Prometheus metrics of the model service (default registry, ``hivewire_model_*``).

Labels are backend, model, operation and outcome names, never ids. Model names come
from callers (a catch-all backend or a ``backend/`` prefix takes any name), so they go
through :data:`model_label`: the first 64 distinct ones are labels, later ones ``_other``.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

from hivewire.services.runtime.breaker import CircuitState
from hivewire.services.runtime.metrics import BoundedLabel

model_label = BoundedLabel(limit=64)
"""The ``model`` label of a model name (bounded: callers choose names)."""

REQUESTS = Counter(
    "hivewire_model_requests_total",
    "Model calls by backend, operation (generate, chat, embed) and outcome.",
    ("backend", "operation", "outcome"),
)
PROMPT_TOKENS = Counter(
    "hivewire_model_prompt_tokens_total", "Tokens sent to models.", ("model", "backend")
)
COMPLETION_TOKENS = Counter(
    "hivewire_model_completion_tokens_total", "Tokens produced by models.", ("model", "backend")
)
TIME_TO_FIRST_TOKEN = Histogram(
    "hivewire_model_time_to_first_token_seconds",
    "Time from the request to the first generated text.",
    ("model", "backend"),
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0),
)
REQUEST_SECONDS = Histogram(
    "hivewire_model_request_seconds",
    "Duration of model calls, to the last token.",
    ("backend", "operation"),
    buckets=(0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0),
)
BACKEND_ERRORS = Counter(
    "hivewire_model_backend_errors_total",
    "Failed backend calls by backend and error reason.",
    ("backend", "reason"),
)
CIRCUIT_STATE = Gauge(
    "hivewire_model_circuit_state",
    "Circuit breaker state per backend: 0 closed, 1 open, 2 half-open.",
    ("backend",),
)
INFLIGHT = Gauge("hivewire_model_inflight_requests", "Model calls in progress.", ("backend",))


def record_circuit_state(backend: str, state: CircuitState) -> None:
    """Breaker listener that keeps :data:`CIRCUIT_STATE` current."""
    CIRCUIT_STATE.labels(backend=backend).set(state.value)
