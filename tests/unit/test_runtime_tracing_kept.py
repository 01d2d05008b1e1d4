"""Spans made only while they go somewhere (``tracing.spans_kept``), the context kept either way.

Without an exporter the hot paths carry the context they were given instead of making a
span nobody sees: an attempt's SERVER span (``server_span``), its handler's span
(``kept_span``), the coordinator's attempt span (``resumed`` with a name) and its
CLIENT span (``client_span``). These check what each gives in both cases.
"""

from __future__ import annotations

import pytest
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from hivewire.common.v1 import common_pb2
from hivewire.services.runtime import tracing

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_ID = "00f067aa0ba902b7"
TRACEPARENT = f"00-{TRACE_ID}-{PARENT_ID}-01"


def current_ids() -> tuple[str, str]:
    ids = tracing.current_ids()
    assert ids is not None
    return ids


@pytest.mark.parametrize(
    ("traceparent", "tracestate", "flags"),
    [
        (TRACEPARENT, "", 1),
        (f"00-{TRACE_ID}-{PARENT_ID}-00", "vendor=x,other=y", 0),
        # Not what a hivewire peer writes, but valid W3C: the standard extraction.
        (f"01-{TRACE_ID}-{PARENT_ID}-01-future", "", 1),
    ],
)
def test_a_carried_context_is_the_callers_span_as_it_came(
    traceparent: str, tracestate: str, flags: int
) -> None:
    span = trace.get_current_span(tracing.carried_context(traceparent, tracestate))
    assert not span.is_recording()
    context = span.get_span_context()
    assert (f"{context.trace_id:032x}", f"{context.span_id:016x}") == (TRACE_ID, PARENT_ID)
    assert context.is_remote and context.trace_flags == flags
    assert context.trace_state.to_header() == tracestate


@pytest.mark.parametrize(
    "traceparent",
    ["", "garbage", f"00-{'0' * 32}-{PARENT_ID}-01", f"ff-{TRACE_ID}-{PARENT_ID}-01"],
)
def test_without_a_valid_context_a_new_trace_is_carried(traceparent: str) -> None:
    first = trace.get_current_span(tracing.carried_context(traceparent)).get_span_context()
    second = trace.get_current_span(tracing.carried_context(traceparent)).get_span_context()
    assert first.is_valid and second.is_valid and first.trace_id != second.trace_id
    assert first.trace_flags.sampled and f"{first.trace_id:032x}" != TRACE_ID


@pytest.mark.parametrize("kept", [True, False])
def test_server_span_and_kept_span_follow_the_exporter(
    spans: InMemorySpanExporter, monkeypatch: pytest.MonkeyPatch, kept: bool
) -> None:
    monkeypatch.setattr(tracing, "spans_kept", lambda: kept)
    with (
        tracing.server_span("/pkg.Service/Execute", TRACEPARENT, attributes={"k": "v"}) as span,
        tracing.kept_span("handle noop"),
    ):
        trace_id, span_id = current_ids()
    assert trace_id == TRACE_ID
    finished = spans.get_finished_spans()
    if kept:
        server, handler = sorted(finished, key=lambda s: s.name != "/pkg.Service/Execute")
        assert server.parent is not None and f"{server.parent.span_id:016x}" == PARENT_ID
        assert handler.parent is not None and handler.parent.span_id == server.context.span_id
        assert span_id == f"{handler.context.span_id:016x}"
    else:
        assert finished == ()
        assert not span.is_recording() and span_id == PARENT_ID
    assert trace.get_current_span() is trace.INVALID_SPAN  # detached after the block


@pytest.mark.parametrize("kept", [True, False])
def test_the_coordinators_attempt_and_client_spans_follow_the_exporter(
    spans: InMemorySpanExporter, monkeypatch: pytest.MonkeyPatch, kept: bool
) -> None:
    monkeypatch.setattr(tracing, "spans_kept", lambda: kept)
    stored = common_pb2.RequestMetadata(traceparent=TRACEPARENT)
    with tracing.resumed(stored, "attempt noop"):
        attempt_ids = current_ids()
        client, headers = tracing.client_span("/pkg.Service/Execute")
        client.end()
    carried = headers["traceparent"].split("-")
    assert carried[1] == attempt_ids[0] == TRACE_ID
    finished = {s.name: s for s in spans.get_finished_spans()}
    if kept:
        attempt, call = finished["attempt noop"], finished["/pkg.Service/Execute"]
        assert call.parent is not None and call.parent.span_id == attempt.context.span_id
        assert carried[2] == f"{call.context.span_id:016x}"
    else:
        # No span: the stored context goes on as it is, to the agent too.
        assert finished == {}
        assert not client.is_recording()
        assert attempt_ids[1] == carried[2] == PARENT_ID
        assert headers["traceparent"] == TRACEPARENT


def test_a_client_span_outside_any_trace_carries_none_when_not_kept(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(tracing, "spans_kept", lambda: False)
    token = otel_context.attach(otel_context.Context())
    try:
        span, headers = tracing.client_span("/pkg.Service/Execute")
    finally:
        otel_context.detach(token)
    assert headers == {} and not span.get_span_context().is_valid
