"""W3C trace context crosses every hop: caller -> service -> downstream service.

Two real mTLS servers on 127.0.0.1. The first takes ``traceparent``/``tracestate`` from
its caller, exposes them to its handler (and so to events published there), and its
channel passes them on when it calls the second. A malformed ``traceparent`` is dropped.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from hivewire.services.runtime.authz import DEFAULT_POLICY_TOML
from hivewire.services.runtime.channels import secure_channel
from hivewire.services.runtime.config import load_settings
from hivewire.services.runtime.logging import TraceContext, trace_context_var
from hivewire.services.runtime.server import ServiceBinding, ServiceServer
from tests.conftest import Pki

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
        seen.append((trace_context_var.get(), dict(context.invocation_metadata() or ())))
        if forward_to:
            call = downstream[0].unary_unary(f"/{forward_to}/Echo")
            return bytes(await call(request))
        return request

    handler = grpc.method_handlers_generic_handler(
        name, {"Echo": grpc.unary_unary_rpc_method_handler(echo)}
    )
    return ServiceBinding(name, lambda server: server.add_generic_rpc_handlers((handler,)))


@pytest.fixture
async def chain(
    pki: Pki, tmp_path: Path
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
        downstream.append(secure_channel(second.address, pki.files("tool")))
        client = secure_channel(first.address, pki.files("client"))
        try:
            yield client, first_seen, second_seen
        finally:
            await client.close()
            await downstream[0].close()


async def test_trace_context_reaches_the_handler_and_the_next_hop(
    chain: tuple[grpc.aio.Channel, list[Any], list[Any]],
) -> None:
    client, first_seen, second_seen = chain
    call = client.unary_unary("/hw.test.First/Echo")
    reply = await call(b"ping", metadata=(("traceparent", TRACEPARENT), ("tracestate", TRACESTATE)))
    assert reply == b"ping"
    assert first_seen[0][0] == TraceContext(TRACEPARENT, TRACESTATE)
    assert second_seen[0][0] == TraceContext(TRACEPARENT, TRACESTATE)
    assert second_seen[0][1]["traceparent"] == TRACEPARENT
    assert second_seen[0][1]["tracestate"] == TRACESTATE
    # The correlation id rides along too, the same on both hops.
    assert first_seen[0][1]["x-correlation-id"] == second_seen[0][1]["x-correlation-id"]


async def test_a_malformed_traceparent_is_dropped(
    chain: tuple[grpc.aio.Channel, list[Any], list[Any]],
) -> None:
    client, first_seen, second_seen = chain
    call = client.unary_unary("/hw.test.First/Echo")
    await call(b"x", metadata=(("traceparent", "not-a-trace"),))
    assert first_seen[0][0] is None
    assert "traceparent" not in second_seen[0][1]
