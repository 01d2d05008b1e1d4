"""gRPC metadata keys hivewire carries on every hop (one place, used by servers and clients)."""

from __future__ import annotations

#: Correlation id of the work; minted at the edge when a client sends none.
CORRELATION_ID = "x-correlation-id"
#: The task a call is made for.
TASK_ID = "x-hivewire-task-id"
#: The attempt of that task.
ATTEMPT = "x-hivewire-attempt"
#: Tokens the task may still spend on model calls (absent or "0": no limit).
TOKEN_BUDGET = "x-hivewire-token-budget"  # noqa: S105 - a header name, not a secret
#: W3C trace context.
TRACEPARENT = "traceparent"
TRACESTATE = "tracestate"
