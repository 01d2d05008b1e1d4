"""The shared service runtime end to end: a real mTLS grpc.aio server on 127.0.0.1.

A small test service built with ``grpc.method_handlers_generic_handler`` (raw bytes, no
protos) covers the four call kinds, domain errors, unexpected exceptions and handlers
that wait for the test to release them.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import socket
import ssl
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from hivewire.services.runtime import errors
from hivewire.services.runtime.authz import DEFAULT_POLICY_TOML
from hivewire.services.runtime.channels import ChannelPool, secure_channel
from hivewire.services.runtime.config import Settings, load_settings
from hivewire.services.runtime.interceptors import CORRELATION_ID_KEY
from hivewire.services.runtime.logging import (
    ContextFilter,
    bind_correlation_id,
    correlation_id_var,
)
from hivewire.services.runtime.server import ServiceBinding, ServiceServer
from hivewire.services.runtime.status import from_rpc_error
from hivewire.services.runtime.tls import TlsFiles, peer_spiffe_id
from tests.conftest import Pki
from tests.helpers import eventually

SERVICE = "hivewire.test.v1.RuntimeTestService"
# The mesh's built-in authz policy plus the test service, which clients may call.
AUTHZ_POLICY = f'''{DEFAULT_POLICY_TOML}
[[rules]]
callers = ["client/*"]
allow = ["{SERVICE}/*"]
'''
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING

test_logger = logging.getLogger("hivewire.tests.runtime")


def _errors_by_name() -> dict[bytes, errors.HivewireError]:
    return {
        b"invalid": errors.InvalidArgument(
            "bad request",
            [
                errors.FieldViolation("task.priority", "must not be PRIORITY_UNSPECIFIED"),
                errors.FieldViolation("task.capability", "is required"),
            ],
        ),
        b"not_found": errors.NotFound("task", "t-42", reason="TASK_NOT_FOUND"),
        b"exists": errors.AlreadyExists("agent", "planner-1", reason="AGENT_ALREADY_REGISTERED"),
        b"precondition": errors.FailedPrecondition(
            "task already finished",
            [("TASK_STATE", "task/t-42", "task is SUCCEEDED")],
            reason="TASK_ALREADY_FINISHED",
        ),
        b"aborted": errors.Aborted("lost the race"),
        b"unauthenticated": errors.Unauthenticated("no token"),
        b"denied": errors.PermissionDenied("agents may not call the coordinator"),
        b"exhausted": errors.ResourceExhausted(
            "slow down",
            [("principal:alice", "10 submissions per second")],
            retry_after=1.5,
            reason="RATE_LIMITED",
            metadata={"limit": "10"},
        ),
        b"unavailable": errors.Unavailable(
            "no healthy agent", retry_after=0.25, reason="NO_HEALTHY_AGENT"
        ),
        b"deadline": errors.DeadlineExceeded("task deadline passed"),
        b"cancelled": errors.Cancelled("task cancelled"),
        b"unimplemented": errors.Unimplemented("not built yet"),
        b"internal": errors.Internal("invariant broken"),
    }


@dataclass
class Probe:
    """What the test service saw and the gates the tests open."""

    correlation_ids: list[str | None] = field(default_factory=list)
    peers: list[str | None] = field(default_factory=list)
    time_remaining: list[float | None] = field(default_factory=list)
    stream_started: asyncio.Event = field(default_factory=asyncio.Event)
    release: asyncio.Event = field(default_factory=asyncio.Event)
    cancelled: asyncio.Event = field(default_factory=asyncio.Event)


def make_service(probe: Probe) -> ServiceBinding:
    """A raw-bytes service exercising every handler shape."""

    async def echo(request: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> bytes:
        probe.correlation_ids.append(correlation_id_var.get())
        probe.peers.append(peer_spiffe_id(context))
        probe.time_remaining.append(context.time_remaining())
        test_logger.info("echo handled")
        return request

    async def fail(request: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> bytes:
        raise _errors_by_name()[request]

    async def boom(request: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> bytes:
        raise RuntimeError("secret internals: password=hunter2")

    async def count(
        request: bytes, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[bytes]:
        # Server stream (async generator): n messages; "wait" holds the last one until
        # the test releases it; "fail" raises a domain error after two messages.
        n = int(request.split(b":")[-1])
        for i in range(n):
            if i == n - 1 and request.startswith(b"wait"):
                probe.stream_started.set()
                try:
                    await probe.release.wait()
                except asyncio.CancelledError:
                    probe.cancelled.set()
                    raise
            if i == 2 and request.startswith(b"fail"):
                raise errors.Unavailable("backend went away", reason="BACKEND_DOWN")
            yield b"%d" % i

    async def count_writer(request: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        # Server stream, reader/writer style.
        for i in range(int(request)):
            await context.write(b"%d" % i)

    async def total(
        requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext[Any, Any]
    ) -> bytes:
        return b"%d" % sum([int(r) async for r in requests])

    async def chat(
        requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[bytes]:
        async for r in requests:
            if r == b"boom":
                raise ValueError("unexpected")
            yield r.upper()

    handlers = {
        "Echo": grpc.unary_unary_rpc_method_handler(echo),
        "Fail": grpc.unary_unary_rpc_method_handler(fail),
        "Boom": grpc.unary_unary_rpc_method_handler(boom),
        "Count": grpc.unary_stream_rpc_method_handler(count),
        "CountWriter": grpc.unary_stream_rpc_method_handler(count_writer),
        "Total": grpc.stream_unary_rpc_method_handler(total),
        "Chat": grpc.stream_stream_rpc_method_handler(chat),
    }
    generic = grpc.method_handlers_generic_handler(SERVICE, handlers)
    return ServiceBinding(
        SERVICE,
        lambda server: server.add_generic_rpc_handlers([generic]),
        # As if its first message carried the id (the coordinator's StreamTask).
        id_in_response_methods=("CountWriter",),
    )


@pytest.fixture
def server_dir(pki: Pki, tmp_path: Path) -> Path:
    """A private copy of the coordinator's files (tests may rotate them)."""
    directory = tmp_path / "server-certs"
    directory.mkdir()
    for name in ("ca.pem", "coordinator.pem", "coordinator.key"):
        shutil.copy(pki.dir / name, directory / name)
    return directory


@pytest.fixture
def settings(server_dir: Path, tmp_path: Path) -> Settings:
    authz = tmp_path / "authz.toml"
    authz.write_text(AUTHZ_POLICY, encoding="utf-8")
    return load_settings(
        authz_policy_file=authz,
        host="127.0.0.1",
        port=0,
        metrics_port=0,
        certs_dir=server_dir,
        identity="coordinator",
        grace_period=5.0,
        ports_file=tmp_path / "ports.json",
    )


@pytest.fixture
def probe() -> Probe:
    return Probe()


@pytest.fixture
async def server(settings: Settings, probe: Probe) -> AsyncIterator[ServiceServer]:
    async with ServiceServer(settings, [make_service(probe)]) as srv:
        yield srv


@pytest.fixture
def client_files(pki: Pki) -> TlsFiles:
    return pki.files("client")


@pytest.fixture
async def channel(server: ServiceServer, client_files: TlsFiles) -> AsyncIterator[grpc.aio.Channel]:
    async with secure_channel(server.address, client_files) as ch:
        yield ch


@pytest.fixture
async def plain_channel(
    server: ServiceServer, client_files: TlsFiles
) -> AsyncIterator[grpc.aio.Channel]:
    """A bare grpc.aio channel, as a foreign client has (no hivewire interceptor)."""
    ca, cert, key = client_files.read()
    credentials = grpc.ssl_channel_credentials(ca, key, cert)
    async with grpc.aio.secure_channel(server.address, credentials) as ch:
        yield ch


def unary(channel: grpc.aio.Channel, method: str) -> grpc.aio.UnaryUnaryMultiCallable[Any, Any]:
    return channel.unary_unary(f"/{SERVICE}/{method}")


async def check_health(channel: grpc.aio.Channel, service: str = "") -> int:
    stub = health_pb2_grpc.HealthStub(channel)
    response = await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
    return response.status


# -- mTLS ----------------------------------------------------------------------------


async def test_health_reports_serving_over_mtls(
    server: ServiceServer, channel: grpc.aio.Channel
) -> None:
    assert await check_health(channel) == SERVING
    assert await check_health(channel, SERVICE) == SERVING
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await check_health(channel, "hivewire.nope.v1.Nothing")
    assert info.value.code() == grpc.StatusCode.NOT_FOUND


async def test_server_sees_the_client_spiffe_id(
    server: ServiceServer, channel: grpc.aio.Channel, probe: Probe, pki: Pki
) -> None:
    assert await unary(channel, "Echo")(b"hi") == b"hi"
    assert probe.peers == [pki.spiffe_id("client")]


async def test_client_without_certificate_is_refused(
    server: ServiceServer, client_files: TlsFiles
) -> None:
    creds = grpc.ssl_channel_credentials(root_certificates=client_files.ca.read_bytes())
    async with grpc.aio.secure_channel(server.address, creds) as ch:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await check_health(ch)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_client_with_foreign_ca_certificate_is_refused(
    server: ServiceServer, foreign_pki: Pki, client_files: TlsFiles
) -> None:
    foreign = foreign_pki.files("client")
    # Trusts the real server CA, but presents a certificate from another CA.
    creds = grpc.ssl_channel_credentials(
        root_certificates=client_files.ca.read_bytes(),
        private_key=foreign.key.read_bytes(),
        certificate_chain=foreign.cert.read_bytes(),
    )
    async with grpc.aio.secure_channel(server.address, creds) as ch:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await check_health(ch)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_client_refuses_a_server_from_a_foreign_ca(
    server: ServiceServer, foreign_pki: Pki
) -> None:
    async with secure_channel(server.address, foreign_pki.files("client")) as ch:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await check_health(ch)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE


def _server_cert_uris(address: str, files: TlsFiles) -> list[str]:
    """Handshake with the server and return the URI SANs of the certificate it shows."""
    host, port = address.rsplit(":", 1)
    context = ssl.create_default_context(cafile=str(files.ca))
    context.load_cert_chain(str(files.cert), str(files.key))
    context.set_alpn_protocols(["h2"])
    with socket.create_connection((host, int(port)), timeout=5) as raw:
        with context.wrap_socket(raw, server_hostname="localhost") as tls:
            cert = tls.getpeercert()
    assert cert is not None
    return [value for kind, value in cert.get("subjectAltName", ()) if kind == "URI"]


async def test_server_certificate_reloads_without_restart(
    server: ServiceServer, server_dir: Path, pki: Pki, client_files: TlsFiles
) -> None:
    before = await asyncio.to_thread(_server_cert_uris, server.address, client_files)
    assert before == [pki.spiffe_id("coordinator")]
    rotated = pki.issue(role="coordinator", name="rotated", stem="runtime-rotated-coordinator")
    # Key first, then certificate: the half-rotated pair in between must be skipped.
    shutil.copy(rotated.key, server_dir / "coordinator.key")
    shutil.copy(rotated.cert, server_dir / "coordinator.pem")

    async def shows_new_cert() -> None:
        uris = await asyncio.to_thread(_server_cert_uris, server.address, client_files)
        assert uris == ["spiffe://hivewire.local/coordinator/rotated"]

    await eventually(shows_new_cert, timeout=10)
    # The reloaded server still does gRPC.
    async with secure_channel(server.address, client_files) as ch:
        assert await check_health(ch) == SERVING


# -- errors --------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(_errors_by_name()))
async def test_domain_errors_reach_the_client_with_code_reason_and_details(
    channel: grpc.aio.Channel, name: bytes
) -> None:
    expected = _errors_by_name()[name]
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await unary(channel, "Fail")(name)
    assert info.value.code() == expected.code
    got = from_rpc_error(info.value)
    assert type(got) is type(expected)
    assert got.reason == expected.reason
    assert got.message == expected.message
    assert got.metadata == expected.metadata
    assert got.retryable == expected.retryable
    for attr in ("violations", "resource_type", "resource_name", "quota_violations", "retry_after"):
        assert getattr(got, attr, None) == getattr(expected, attr, None), attr


async def test_unexpected_exception_becomes_internal_without_leaking(
    channel: grpc.aio.Channel, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.ERROR, logger="hivewire.services.runtime.interceptors")
    with bind_correlation_id("cid-boom-1"):
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await unary(channel, "Boom")(b"")
    assert info.value.code() == grpc.StatusCode.INTERNAL
    assert "hunter2" not in (info.value.details() or "")
    err = from_rpc_error(info.value)
    assert isinstance(err, errors.Internal)
    assert err.reason == "INTERNAL"
    assert err.metadata == {"correlation_id": "cid-boom-1"}
    # The traceback stays in the server log.
    logged = [r for r in caplog.records if r.exc_info and "hunter2" in str(r.exc_info[1])]
    assert logged, caplog.text


async def test_error_in_a_stream_arrives_after_the_messages_sent(channel: grpc.aio.Channel) -> None:
    received: list[bytes] = []
    call = channel.unary_stream(f"/{SERVICE}/Count")(b"fail:5")
    with pytest.raises(grpc.aio.AioRpcError) as info:
        async for message in call:
            received.append(message)
    assert received == [b"0", b"1"]
    err = from_rpc_error(info.value)
    assert isinstance(err, errors.Unavailable)
    assert err.reason == "BACKEND_DOWN"


async def test_unexpected_exception_in_bidi_stream_becomes_internal(
    channel: grpc.aio.Channel,
) -> None:
    call = channel.stream_stream(f"/{SERVICE}/Chat")()
    await call.write(b"hello")
    assert await call.read() == b"HELLO"
    await call.write(b"boom")
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call.read()
    assert info.value.code() == grpc.StatusCode.INTERNAL


async def test_all_call_kinds_work(channel: grpc.aio.Channel) -> None:
    assert await unary(channel, "Echo")(b"x") == b"x"
    assert [m async for m in channel.unary_stream(f"/{SERVICE}/Count")(b"3")] == [b"0", b"1", b"2"]
    assert [m async for m in channel.unary_stream(f"/{SERVICE}/CountWriter")(b"2")] == [b"0", b"1"]

    async def numbers() -> AsyncIterator[bytes]:
        for n in (b"1", b"2", b"39"):
            yield n

    assert await channel.stream_unary(f"/{SERVICE}/Total")(numbers()) == b"42"

    async def words() -> AsyncIterator[bytes]:
        for w in (b"a", b"b"):
            yield w

    assert [m async for m in channel.stream_stream(f"/{SERVICE}/Chat")(words())] == [b"A", b"B"]


# -- correlation id, deadline ---------------------------------------------------------------


async def test_correlation_id_travels_to_the_handler_and_back(
    channel: grpc.aio.Channel, probe: Probe, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.handler.addFilter(ContextFilter())
    caplog.set_level(logging.INFO, logger="hivewire.tests.runtime")
    with bind_correlation_id("cid-roundtrip-7"):
        call = unary(channel, "Echo")(b"x")
        assert await call == b"x"
    trailing = await call.trailing_metadata()
    assert trailing is not None and trailing.get(CORRELATION_ID_KEY) == "cid-roundtrip-7"
    assert probe.correlation_ids == ["cid-roundtrip-7"]
    handled = [r for r in caplog.records if r.getMessage() == "echo handled"]
    assert [getattr(r, "correlation_id", None) for r in handled] == ["cid-roundtrip-7"]


async def test_server_mints_a_correlation_id_when_the_caller_has_none(
    plain_channel: grpc.aio.Channel, probe: Probe
) -> None:
    call = unary(plain_channel, "Echo")(b"x", timeout=5)
    await call
    trailing = await call.trailing_metadata()
    failed = unary(plain_channel, "Fail")(b"not_found", timeout=5)
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await failed
    assert trailing is not None
    minted = trailing.get(CORRELATION_ID_KEY)
    assert isinstance(minted, str) and len(minted) == 32
    assert probe.correlation_ids == [minted]
    # An error keeps its id next to the rich status, and each call gets its own.
    error_cid = info.value.trailing_metadata().get(CORRELATION_ID_KEY)
    assert isinstance(error_cid, str) and len(error_cid) == 32 and error_cid != minted


async def test_streaming_calls_get_a_minted_correlation_id_up_front(
    plain_channel: grpc.aio.Channel,
) -> None:
    # A plain channel sends no id: the server mints one and sends it before any
    # message (the only message is held back until the test releases it).
    call = plain_channel.unary_stream(f"/{SERVICE}/Count")(b"wait:1", timeout=5)
    initial = await call.initial_metadata()
    call.cancel()
    minted = initial.get(CORRELATION_ID_KEY) if initial is not None else None
    assert isinstance(minted, str) and len(minted) == 32


async def test_a_stream_whose_first_message_carries_the_id_gets_it_with_the_status_only(
    plain_channel: grpc.aio.Channel,
) -> None:
    # No initial metadata of its own ahead of the messages: the headers that come with
    # the first message hold no id; the minted one is in the trailers.
    call = plain_channel.unary_stream(f"/{SERVICE}/CountWriter")(b"2", timeout=5)
    assert [m async for m in call] == [b"0", b"1"]
    initial = await call.initial_metadata()
    trailing = await call.trailing_metadata()
    assert initial is not None and CORRELATION_ID_KEY not in initial
    minted = trailing.get(CORRELATION_ID_KEY) if trailing is not None else None
    assert isinstance(minted, str) and len(minted) == 32


async def test_streaming_calls_echo_the_callers_correlation_id(
    channel: grpc.aio.Channel,
) -> None:
    # A caller that sent an id gets it back with the status (it knows it up front).
    with bind_correlation_id("cid-stream-3"):
        call = channel.unary_stream(f"/{SERVICE}/Count")(b"2")
    assert [m async for m in call] == [b"0", b"1"]
    trailing = await call.trailing_metadata()
    assert trailing is not None and trailing.get(CORRELATION_ID_KEY) == "cid-stream-3"


async def test_client_cancel_reaches_the_handler_through_the_interceptors(
    channel: grpc.aio.Channel, probe: Probe
) -> None:
    call = channel.unary_stream(f"/{SERVICE}/Count")(b"wait:2")
    assert await call.read() == b"0"
    await probe.stream_started.wait()
    call.cancel()
    await probe.cancelled.wait()


async def test_client_interceptor_mints_an_id_and_sets_the_default_deadline(
    server: ServiceServer, client_files: TlsFiles, probe: Probe
) -> None:
    async with secure_channel(server.address, client_files, default_timeout=7.0) as ch:
        await unary(ch, "Echo")(b"a")
        await unary(ch, "Echo")(b"b", timeout=60)
    first, second = probe.correlation_ids
    assert first and second and first != second
    short, long = probe.time_remaining
    # gRPC rounds deadlines up a little: compare with margins, not exact values.
    assert short is not None and 0 < short <= 8.0
    assert long is not None and 30.0 < long <= 61.0


async def test_channel_pool_reuses_one_channel_per_target(
    server: ServiceServer, client_files: TlsFiles
) -> None:
    async with ChannelPool(client_files) as pool:
        first = pool.get(server.address)
        assert pool.get(server.address) is first
        assert await check_health(first) == SERVING
        assert len(pool) == 1
    with pytest.raises(RuntimeError):
        pool.get(server.address)


# -- metrics, ports file ---------------------------------------------------------------


def _samples(text: str, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    found: dict[tuple[tuple[str, str], ...], float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name:
                found[tuple(sorted(sample.labels.items()))] = sample.value
    return found


async def _scrape(port: int | None) -> str:
    assert port is not None
    async with httpx.AsyncClient(timeout=5) as client:
        response = await client.get(f"http://127.0.0.1:{port}/metrics")
    response.raise_for_status()
    return response.text


def _key(method: str, grpc_type: str, code: str | None = None) -> tuple[tuple[str, str], ...]:
    labels = {"grpc_service": SERVICE, "grpc_method": method, "grpc_type": grpc_type}
    if code is not None:
        labels["grpc_code"] = code
    return tuple(sorted(labels.items()))


async def test_metrics_endpoint_counts_handled_calls_by_code(
    server: ServiceServer, channel: grpc.aio.Channel
) -> None:
    before = await _scrape(server.metrics_port)
    for _ in range(3):
        await unary(channel, "Echo")(b"x")
    with pytest.raises(grpc.aio.AioRpcError):
        await unary(channel, "Fail")(b"not_found")
    with pytest.raises(grpc.aio.AioRpcError):
        await unary(channel, "Boom")(b"")
    assert len([m async for m in channel.unary_stream(f"/{SERVICE}/Count")(b"4")]) == 4
    assert len([m async for m in channel.unary_stream(f"/{SERVICE}/CountWriter")(b"2")]) == 2

    async def counted() -> None:
        after = await _scrape(server.metrics_port)

        def delta(name: str, key: tuple[tuple[str, str], ...]) -> float:
            return _samples(after, name).get(key, 0.0) - _samples(before, name).get(key, 0.0)

        handled = "grpc_server_handled_total"
        assert delta(handled, _key("Echo", "unary", "OK")) == 3
        assert delta(handled, _key("Fail", "unary", "NOT_FOUND")) == 1
        assert delta(handled, _key("Boom", "unary", "INTERNAL")) == 1
        assert delta(handled, _key("Count", "server_stream", "OK")) == 1
        assert delta("grpc_server_started_total", _key("Echo", "unary")) == 3
        assert delta("grpc_server_msg_sent_total", _key("Count", "server_stream")) == 4
        assert delta("grpc_server_msg_sent_total", _key("CountWriter", "server_stream")) == 2
        assert delta("grpc_server_msg_received_total", _key("Echo", "unary")) == 3
        assert delta("grpc_server_handling_seconds_count", _key("Echo", "unary")) == 3
        # The client side of the same calls, from the hivewire channel's interceptor.
        client = "grpc_client_handled_total"
        assert delta(client, _key("Echo", "unary", "OK")) == 3
        assert delta(client, _key("Fail", "unary", "NOT_FOUND")) == 1
        assert delta(client, _key("Count", "server_stream", "OK")) == 1

    # The server records a call's status just after the client has seen it.
    await eventually(counted, timeout=10)


async def test_ports_file_is_written_once_serving_and_removed_on_stop(
    settings: Settings, probe: Probe, client_files: TlsFiles
) -> None:
    assert settings.ports_file is not None
    srv = ServiceServer(settings, [make_service(probe)])
    await srv.start()
    try:
        ports = json.loads(settings.ports_file.read_text())
        assert ports == {
            "grpc": srv.port,
            "metrics": srv.metrics_port,
            "address": f"127.0.0.1:{srv.port}",
            "pid": os.getpid(),
        }
        async with secure_channel(ports["address"], client_files) as ch:
            assert await check_health(ch) == SERVING
    finally:
        await srv.stop()
    assert not settings.ports_file.exists()


# -- graceful shutdown -------------------------------------------------------------------


async def _watch(channel: grpc.aio.Channel, service: str = "") -> AsyncIterator[int]:
    stub = health_pb2_grpc.HealthStub(channel)
    async for response in stub.Watch(health_pb2.HealthCheckRequest(service=service)):
        yield response.status


async def test_stop_turns_health_not_serving_first_and_lets_in_flight_streams_finish(
    settings: Settings, probe: Probe, client_files: TlsFiles
) -> None:
    seen_by_hook: list[int | None] = []
    srv = ServiceServer(settings, [make_service(probe)])

    async def hook() -> None:
        seen_by_hook.append(srv.health.status(SERVICE))

    srv.add_shutdown_hook(hook)
    await srv.start()
    async with secure_channel(srv.address, client_files) as ch:
        watch = _watch(ch, SERVICE)
        assert await anext(watch) == SERVING
        stream = ch.unary_stream(f"/{SERVICE}/Count")(b"wait:3")
        assert await stream.read() == b"0"
        assert await stream.read() == b"1"
        await probe.stream_started.wait()

        stopping = asyncio.create_task(srv.stop(grace=30))
        # Health goes NOT_SERVING and the Watch stream ends by itself.
        assert [status async for status in watch] == [NOT_SERVING]
        assert seen_by_hook == [NOT_SERVING]
        assert not stopping.done()
        # The in-flight call is still alive and completes normally once released.
        probe.release.set()
        assert await stream.read() == b"2"
        assert await stream.read() is grpc.aio.EOF
        assert await stream.code() == grpc.StatusCode.OK
        await stopping
    assert not probe.cancelled.is_set()


async def test_calls_still_running_after_the_grace_period_are_cancelled(
    settings: Settings, probe: Probe, client_files: TlsFiles
) -> None:
    srv = ServiceServer(settings, [make_service(probe)])
    await srv.start()
    async with secure_channel(srv.address, client_files) as ch:
        stream = ch.unary_stream(f"/{SERVICE}/Count")(b"wait:1")
        await probe.stream_started.wait()
        await srv.stop(grace=0.2)
        await probe.cancelled.wait()
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stream.read()
    assert info.value.code() in (grpc.StatusCode.CANCELLED, grpc.StatusCode.UNAVAILABLE)


async def test_stop_is_idempotent_and_a_second_call_shortens_the_grace(
    settings: Settings, probe: Probe, client_files: TlsFiles
) -> None:
    srv = ServiceServer(settings, [make_service(probe)])
    await srv.start()
    async with secure_channel(srv.address, client_files) as ch:
        call = ch.unary_stream(f"/{SERVICE}/Count")(b"wait:1")
        await probe.stream_started.wait()
        # A long grace keeps the first stop waiting on the in-flight stream...
        first = asyncio.create_task(srv.stop(grace=600))
        await eventually(lambda: srv.health.status() == NOT_SERVING)
        assert not first.done()
        assert not probe.cancelled.is_set()
        # ...and a second call with no grace cancels the stream and ends both stops
        # (well before the first one's 600 s: the test's own timeout is far shorter).
        await srv.stop(grace=0)
        await eventually(probe.cancelled.is_set)
        await first
        assert first.exception() is None
        with pytest.raises(grpc.aio.AioRpcError):
            await call.read()
    # Stopping a stopped server returns at once and changes nothing.
    await srv.stop()
    await srv.wait_for_termination()
    assert srv.health.status() == NOT_SERVING


async def test_every_watcher_of_a_service_is_notified(
    server: ServiceServer, channel: grpc.aio.Channel
) -> None:
    first, second = _watch(channel, SERVICE), _watch(channel, SERVICE)
    assert await anext(first) == SERVING
    assert await anext(second) == SERVING
    await server.set_serving(False, SERVICE)
    assert await anext(first) == NOT_SERVING
    assert await anext(second) == NOT_SERVING
    await first.aclose()
    await server.set_serving(True)
    assert await anext(second) == SERVING
    assert await check_health(channel) == SERVING
    await second.aclose()


async def test_unknown_method_is_unimplemented(channel: grpc.aio.Channel) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await channel.unary_unary(f"/{SERVICE}/Nope")(b"")
    assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED


@pytest.fixture(autouse=True)
def _no_leaked_correlation_id() -> Iterator[None]:
    yield
    assert correlation_id_var.get() is None
