"""OpenTelemetry spans cross every hop: caller -> service -> downstream service.

Two real mTLS servers on 127.0.0.1 with the standard interceptor chain. A call made
inside a span gives a client span, a server span in the first service (its child), a
client span for the downstream call and a server span in the second service: one
trace, each span the child of the one before. A ``traceparent`` given as plain call
metadata (grpcurl -H) is continued; a malformed one starts a new trace.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from hivewire.services.runtime import tracing
from hivewire.services.runtime.authz import DEFAULT_POLICY_TOML
from hivewire.services.runtime.channels import secure_channel
from hivewire.services.runtime.config import load_settings
from hivewire.services.runtime.server import ServiceBinding, ServiceServer
from hivewire.services.runtime.tls import channel_credentials
from tests.conftest import Pki
from tests.helpers import eventually

TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
TRACESTATE = "vendor=opaque"
# The mesh's built-in authz policy plus the two test services.
AUTHZ_POLICY = f"""{DEFAULT_POLICY_TOML}
[[rules]]
callers = ["client/*", "tool/*"]
allow = ["hw.test.*"]
"""


def _binding(
    name: str, seen: list[Any], downstream: list[grpc.aio.Channel], *, forward_to: str = ""
) -> ServiceBinding:
    async def echo(request: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> bytes:
        seen.append((tracing.current_ids(), dict(context.invocation_metadata() or ())))
        if forward_to:
            call = downstream[0].unary_unary(f"/{forward_to}/Echo")
            return bytes(await call(request))
        return request

    handler = grpc.method_handlers_generic_handler(
        name, {"Echo": grpc.unary_unary_rpc_method_handler(echo)}
    )
    return ServiceBinding(name, lambda server: server.add_generic_rpc_handlers((handler,)))


@pytest.fixture
def first_address() -> list[str]:
    """Filled with the first server's address by ``chain``."""
    return []


@pytest.fixture
async def chain(
    pki: Pki, tmp_path: Path, first_address: list[str]
) -> AsyncIterator[tuple[grpc.aio.Channel, list[Any], list[Any]]]:
    authz = tmp_path / "authz.toml"
    authz.write_text(AUTHZ_POLICY, encoding="utf-8")
    settings = load_settings(
        host="127.0.0.1", port=0, certs_dir=pki.dir, identity="tool", authz_policy_file=authz
    )
    first_seen: list[Any] = []
    second_seen: list[Any] = []
    downstream: list[grpc.aio.Channel] = []
    async with (
        ServiceServer(settings, [_binding("hw.test.Second", second_seen, [])]) as second,
        ServiceServer(
            settings,
            [_binding("hw.test.First", first_seen, downstream, forward_to="hw.test.Second")],
        ) as first,
    ):
        first_address.append(first.address)
        downstream.append(secure_channel(second.address, pki.files("tool")))
        client = secure_channel(first.address, pki.files("client"))
        try:
            yield client, first_seen, second_seen
        finally:
            await client.close()
            await downstream[0].close()


async def bare_echo(pki: Pki, address: str, metadata: tuple[tuple[str, str], ...]) -> bytes:
    """Call the first service from a client without OpenTelemetry (grpcurl -H ...)."""
    async with grpc.aio.secure_channel(address, channel_credentials(pki.files("client"))) as bare:
        return bytes(await bare.unary_unary("/hw.test.First/Echo")(b"ping", metadata=metadata))


def by_kind(spans: InMemorySpanExporter, kind: SpanKind, name: str) -> Any:
    found = [s for s in spans.get_finished_spans() if s.kind == kind and s.name.endswith(name)]
    assert len(found) == 1, [(s.name, s.kind) for s in spans.get_finished_spans()]
    return found[0]


async def test_one_trace_from_the_caller_through_both_hops(
    chain: tuple[grpc.aio.Channel, list[Any], list[Any]], spans: InMemorySpanExporter
) -> None:
    client, first_seen, second_seen = chain
    call = client.unary_unary("/hw.test.First/Echo")
    with tracing.tracer.start_as_current_span("caller") as root:
        reply = await call(b"ping")
    assert reply == b"ping"
    trace_id = root.get_span_context().trace_id

    first_client = by_kind(spans, SpanKind.CLIENT, "hw.test.First/Echo")
    first_server = by_kind(spans, SpanKind.SERVER, "hw.test.First/Echo")
    second_client = by_kind(spans, SpanKind.CLIENT, "hw.test.Second/Echo")
    second_server = by_kind(spans, SpanKind.SERVER, "hw.test.Second/Echo")
    chain_of_spans = [first_client, first_server, second_client, second_server]
    assert {s.context.trace_id for s in chain_of_spans} == {trace_id}
    assert first_client.parent.span_id == root.get_span_context().span_id
    for parent, child in zip(chain_of_spans, chain_of_spans[1:], strict=False):
        assert child.parent.span_id == parent.context.span_id, (parent.name, child.name)
    # Handlers run inside their server span (so do their log lines).
    assert first_seen[0][0] == (f"{trace_id:032x}", f"{first_server.context.span_id:016x}")
    assert second_seen[0][0][0] == f"{trace_id:032x}"
    assert second_seen[0][1]["traceparent"].split("-")[1] == f"{trace_id:032x}"
    # The correlation id rides along too, the same on both hops.
    assert first_seen[0][1]["x-correlation-id"] == second_seen[0][1]["x-correlation-id"]


async def test_a_traceparent_in_call_metadata_is_continued(
    chain: tuple[grpc.aio.Channel, list[Any], list[Any]],
    spans: InMemorySpanExporter,
    pki: Pki,
    first_address: list[str],
) -> None:
    _, first_seen, second_seen = chain
    assert not trace.get_current_span().get_span_context().is_valid
    reply = await bare_echo(
        pki, first_address[0], (("traceparent", TRACEPARENT), ("tracestate", TRACESTATE))
    )
    assert reply == b"ping"
    first_server = by_kind(spans, SpanKind.SERVER, "hw.test.First/Echo")
    assert f"{first_server.context.trace_id:032x}" == TRACEPARENT.split("-")[1]
    assert f"{first_server.parent.span_id:016x}" == TRACEPARENT.split("-")[2]
    assert first_seen[0][0][0] == TRACEPARENT.split("-")[1]
    assert second_seen[0][0][0] == TRACEPARENT.split("-")[1]
    assert second_seen[0][1]["tracestate"] == TRACESTATE


async def test_a_malformed_traceparent_starts_a_new_trace(
    chain: tuple[grpc.aio.Channel, list[Any], list[Any]],
    spans: InMemorySpanExporter,
    pki: Pki,
    first_address: list[str],
) -> None:
    _, first_seen, second_seen = chain
    await bare_echo(pki, first_address[0], (("traceparent", "not-a-trace"),))
    first_server = by_kind(spans, SpanKind.SERVER, "hw.test.First/Echo")
    assert first_server.parent is None
    assert first_seen[0][0][0] == f"{first_server.context.trace_id:032x}"
    assert second_seen[0][1]["traceparent"] != "not-a-trace"


async def test_untraced_methods_get_no_server_span(
    pki: Pki, tmp_path: Path, spans: InMemorySpanExporter
) -> None:
    """A binding's ``untraced_methods`` (long-lived follow streams) make no server span;
    its other methods still do, and the handler runs either way.
    """
    authz = tmp_path / "authz.toml"
    authz.write_text(AUTHZ_POLICY, encoding="utf-8")
    settings = load_settings(
        host="127.0.0.1", port=0, certs_dir=pki.dir, identity="tool", authz_policy_file=authz
    )

    async def echo(request: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> bytes:
        return request

    handler = grpc.method_handlers_generic_handler(
        "hw.test.Quiet",
        {
            "Echo": grpc.unary_unary_rpc_method_handler(echo),
            "Follow": grpc.unary_unary_rpc_method_handler(echo),
        },
    )
    binding = ServiceBinding(
        "hw.test.Quiet",
        lambda server: server.add_generic_rpc_handlers((handler,)),
        untraced_methods=("Follow",),
    )
    async with ServiceServer(settings, [binding]) as server:
        async with grpc.aio.secure_channel(
            server.address, channel_credentials(pki.files("client"))
        ) as bare:
            assert bytes(await bare.unary_unary("/hw.test.Quiet/Follow")(b"a")) == b"a"
            assert bytes(await bare.unary_unary("/hw.test.Quiet/Echo")(b"b")) == b"b"
    names = [s.name for s in spans.get_finished_spans() if s.kind == SpanKind.SERVER]
    assert "/hw.test.Quiet/Echo" in names
    assert not [n for n in names if n.endswith("/Follow")]


@pytest.mark.parametrize(("name", "value"), [("tracestate", TRACESTATE), ("baggage", "user=alice")])
async def test_without_an_exporter_a_handler_runs_in_the_context_the_call_carried(
    chain: tuple[grpc.aio.Channel, list[Any], list[Any]],
    spans: InMemorySpanExporter,
    pki: Pki,
    first_address: list[str],
    monkeypatch: pytest.MonkeyPatch,
    name: str,
    value: str,
) -> None:
    # No span goes anywhere: no SERVER span is made, the handler (and its log lines and
    # downstream calls) runs in the caller's context as it came, with its tracestate
    # or another configured propagator's field (W3C baggage); a call that carried no
    # traceparent gets a trace of its own, its baggage kept.
    monkeypatch.setattr(tracing, "spans_kept", lambda: False)
    _, first_seen, second_seen = chain
    _, trace_id, parent_id, _ = TRACEPARENT.split("-")
    await bare_echo(pki, first_address[0], (("traceparent", TRACEPARENT), (name, value)))
    assert first_seen[0][0] == (trace_id, parent_id)
    assert second_seen[0][0] == (trace_id, parent_id)
    assert second_seen[0][1][name] == value
    alone = () if name == "tracestate" else ((name, value),)
    await bare_echo(pki, first_address[0], alone)
    own_trace, _ = first_seen[1][0]
    assert own_trace != trace_id and second_seen[1][0][0] == own_trace
    if alone:
        assert second_seen[1][1][name] == value
    assert [s for s in spans.get_finished_spans() if s.kind == SpanKind.SERVER] == []


async def test_a_cancelled_stream_ends_its_handler_in_the_carried_context(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # The caller cancels while the handler waits to send: the handler's finally runs in
    # the call's context, and the context is detached where it was attached (no
    # "Failed to detach context" error from OpenTelemetry).
    monkeypatch.setattr(tracing, "spans_kept", lambda: False)
    ended: list[Any] = []

    async def flood(request: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        try:
            while True:
                yield b"x" * 1_000_000
        finally:
            ended.append(tracing.current_ids())

    def same(data: bytes) -> bytes:
        return data

    handler = grpc.method_handlers_generic_handler(
        "hw.test.Flood", {"Flood": grpc.unary_stream_rpc_method_handler(flood, same, same)}
    )
    server = grpc.aio.server(interceptors=[tracing.server_interceptor()])
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    caplog.set_level(logging.ERROR, logger="opentelemetry.context")
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            call = channel.unary_stream("/hw.test.Flood/Flood")(
                b"", metadata=(("traceparent", TRACEPARENT),)
            )
            for _ in range(3):
                await call.read()
            call.cancel()
            await eventually(lambda: len(ended) == 1)
    finally:
        await server.stop(None)
    _, trace_id, parent_id, _ = TRACEPARENT.split("-")
    assert ended == [(trace_id, parent_id)]
    assert [r.getMessage() for r in caplog.records if r.name == "opentelemetry.context"] == []
