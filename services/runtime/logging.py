"""Structured logging with the correlation, task, trace and span ids on every record.

The first server interceptor sets :data:`correlation_id_var`; code that works on a
task wraps it in :func:`bind_task`; the OpenTelemetry span current when a record is
made gives its trace and span ids. :class:`ContextFilter`, installed on the handler
by :func:`setup_logging`, stamps them on every record that handler sees, including
records from libraries, so every line can be joined across services and with traces.
"""

from __future__ import annotations

import json
import logging
import sys
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import Any, TextIO

from opentelemetry import trace

correlation_id_var: ContextVar[str | None] = ContextVar("hivewire_correlation_id", default=None)
"""Correlation id of the request being handled (set by the server interceptor)."""

task_id_var: ContextVar[str | None] = ContextVar("hivewire_task_id", default=None)
"""Id of the task being worked on, when known (set with :func:`bind_task`)."""

_HANDLER_MARK = "_hivewire_handler"

# Attributes every LogRecord has; anything else on a record came from `extra=`.
_RECORD_ATTRS = frozenset(vars(logging.LogRecord("x", logging.INFO, "x", 0, "x", None, None))) | {
    "message",
    "asctime",
    "correlation_id",
    "task_id",
    "trace_id",
    "span_id",
    "context",
}


def new_correlation_id() -> str:
    """Mint a correlation id (32 hex characters)."""
    return uuid.uuid4().hex


@contextmanager
def bind_task(task_id: str | None) -> Iterator[None]:
    """Attach a task id to every log record emitted inside the block.

    Args:
        task_id: The task being worked on.
    """
    token = task_id_var.set(task_id)
    try:
        yield
    finally:
        task_id_var.reset(token)


@contextmanager
def bind_correlation_id(correlation_id: str | None) -> Iterator[None]:
    """Attach a correlation id to log records and outgoing calls inside the block.

    Args:
        correlation_id: The id to carry on (for example from a NATS header).
    """
    token = correlation_id_var.set(correlation_id)
    try:
        yield
    finally:
        correlation_id_var.reset(token)


class ContextFilter(logging.Filter):
    """Stamp ``correlation_id``, ``task_id``, ``trace_id``, ``span_id`` and ``context``.

    ``context`` is ``" [cid=<id> task=<id> trace=<id> span=<id>]"`` with only the ids
    that are set (empty when none is), so the text format needs no conditional logic.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        """Add the context attributes; never drops a record."""
        # A record may cross several handlers; keep what was stamped first.
        fields = record.__dict__
        cid = fields.setdefault("correlation_id", correlation_id_var.get())
        task = fields.setdefault("task_id", task_id_var.get())
        if "trace_id" not in fields:
            span = trace.get_current_span().get_span_context()
            valid = span.is_valid
            fields["trace_id"] = f"{span.trace_id:032x}" if valid else None
            fields["span_id"] = f"{span.span_id:016x}" if valid else None
        parts = []
        if cid:
            parts.append(f"cid={cid}")
        if task:
            parts.append(f"task={task}")
        if fields["trace_id"]:
            parts.append(f"trace={fields['trace_id']} span={fields['span_id']}")
        fields["context"] = f" [{' '.join(parts)}]" if parts else ""
        return True


TEXT_FORMAT = "%(asctime)s %(levelname)-7s %(name)s%(context)s: %(message)s"


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, ids, extras, exception."""

    def format(self, record: logging.LogRecord) -> str:
        """Render the record as a single JSON line."""
        entry: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key in ("correlation_id", "task_id", "trace_id", "span_id"):
            value = getattr(record, key, None)
            if value:
                entry[key] = value
        for key, value in record.__dict__.items():
            if key not in _RECORD_ATTRS and not key.startswith("_"):
                entry[key] = value
        if record.exc_info:
            entry["exc_info"] = self.formatException(record.exc_info)
        if record.stack_info:
            entry["stack_info"] = self.formatStack(record.stack_info)
        return json.dumps(entry, default=str, ensure_ascii=False)


def setup_logging(level: str, fmt: str, *, stream: TextIO | None = None) -> None:
    """Configure the root logger once per process.

    Replaces a handler installed by an earlier call (so it is safe to call twice) and
    leaves handlers added by others (pytest's, for instance) alone.

    Args:
        level: Root level name (``DEBUG``, ``INFO``...).
        fmt: ``"text"`` for humans, ``"json"`` for one JSON object per line.
        stream: Where to write; standard error by default.
    """
    if fmt not in ("text", "json"):
        raise ValueError(f"unknown log format {fmt!r} (expected 'text' or 'json')")
    handler = logging.StreamHandler(stream or sys.stderr)
    setattr(handler, _HANDLER_MARK, True)
    handler.addFilter(ContextFilter())
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    for old in [h for h in root.handlers if getattr(h, _HANDLER_MARK, False)]:
        root.removeHandler(old)
        old.close()
    root.addHandler(handler)
    root.setLevel(level.upper())
    # gRPC's and asyncio's chatter at DEBUG drowns the service's own lines.
    for noisy in ("asyncio", "grpc._cython.cygrpc", "urllib3", "httpx", "httpcore"):
        logging.getLogger(noisy).setLevel(max(logging.INFO, root.level))
