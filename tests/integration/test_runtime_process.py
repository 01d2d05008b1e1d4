"""The runtime as a real process (SIGTERM, second signal, ports file) and through grpcurl."""

from __future__ import annotations

import json
import os
import signal
import textwrap
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from hivewire.services.runtime.authz import DEFAULT_POLICY_TOML
from hivewire.services.runtime.channels import secure_channel
from hivewire.services.runtime.config import load_settings
from hivewire.services.runtime.server import ServiceServer
from tests.conftest import Pki
from tests.helpers import ServiceProcess, eventually

SERVICE = "hivewire.test.v1.HangService"
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING

# A minimal service main, as every hivewire service's __main__ looks.
SCRIPT = textwrap.dedent(
    f"""
    import asyncio

    import grpc

    from hivewire.services.runtime.config import load_settings
    from hivewire.services.runtime.logging import setup_logging
    from hivewire.services.runtime.server import ServiceBinding, ServiceServer, serve_until_signal


    async def hang(request, context):
        await asyncio.Event().wait()


    async def main():
        settings = load_settings()
        setup_logging(settings.log_level, settings.log_format)
        generic = grpc.method_handlers_generic_handler(
            "{SERVICE}", {{"Hang": grpc.unary_unary_rpc_method_handler(hang)}}
        )
        binding = ServiceBinding("{SERVICE}", lambda s: s.add_generic_rpc_handlers([generic]))
        await serve_until_signal(ServiceServer(settings, [binding]))


    asyncio.run(main())
    """
)


def service(pki: Pki, tmp_path: Path, grace: float) -> ServiceProcess:
    # The mesh's built-in authz policy plus the test service, which clients may call.
    authz = tmp_path / "authz.toml"
    authz.write_text(
        f'{DEFAULT_POLICY_TOML}\n[[rules]]\ncallers = ["client/*"]\nallow = ["{SERVICE}/*"]\n',
        encoding="utf-8",
    )
    return ServiceProcess.script(
        SCRIPT,
        workdir=tmp_path,
        name="runtime-svc",
        certs_dir=pki.dir,
        identity="coordinator",
        env={
            "HIVEWIRE_GRACE_PERIOD": str(grace),
            "HIVEWIRE_LOG_LEVEL": "DEBUG",
            "HIVEWIRE_AUTHZ_POLICY_FILE": str(authz),
        },
    )


async def test_sigterm_stops_gracefully_and_the_ports_file_is_right(
    pki: Pki, tmp_path: Path
) -> None:
    async with service(pki, tmp_path, grace=5) as proc:
        ports = json.loads(proc.ports_file.read_text())
        assert set(ports) == {"grpc", "metrics", "address", "pid"}
        assert ports["pid"] == proc.pid
        assert ports["address"] == f"127.0.0.1:{ports['grpc']}"
        assert isinstance(ports["metrics"], int) and ports["metrics"] > 0
        async with secure_channel(proc.address, pki.files("client")) as ch:
            stub = health_pb2_grpc.HealthStub(ch)
            watch = stub.Watch(health_pb2.HealthCheckRequest(service=SERVICE))
            assert (await watch.read()).status == SERVING
            os.kill(proc.pid, signal.SIGTERM)
            assert (await watch.read()).status == NOT_SERVING
            assert await watch.read() is grpc.aio.EOF
        assert await proc.wait(timeout=15) == 0
    assert not proc.ports_file.exists()
    assert "shutting down" in proc.stderr_path.read_text()


async def hang_started(metrics_port: int | None) -> None:
    """The service's own metrics say the Hang call is in flight."""
    async with httpx.AsyncClient(timeout=5) as client:
        text = (await client.get(f"http://127.0.0.1:{metrics_port}/metrics")).text
    started = [
        s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == "grpc_server_started_total" and s.labels.get("grpc_method") == "Hang"
    ]
    assert started == [1.0]


async def test_second_signal_cancels_calls_still_in_flight(pki: Pki, tmp_path: Path) -> None:
    # A grace period far beyond the test timeout: only the second signal can end it.
    async with service(pki, tmp_path, grace=3600) as proc:
        async with secure_channel(proc.address, pki.files("client")) as ch:
            stub = health_pb2_grpc.HealthStub(ch)
            watch = stub.Watch(health_pb2.HealthCheckRequest(service=""))
            assert (await watch.read()).status == SERVING
            hang = ch.unary_unary(f"/{SERVICE}/Hang")(b"", timeout=600)
            await eventually(lambda: hang_started(proc.metrics_port), timeout=15)
            os.kill(proc.pid, signal.SIGTERM)
            assert (await watch.read()).status == NOT_SERVING
            os.kill(proc.pid, signal.SIGINT)
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await hang
            assert info.value.code() in (grpc.StatusCode.CANCELLED, grpc.StatusCode.UNAVAILABLE)
        assert await proc.wait(timeout=30) == 0


# -- grpcurl -----------------------------------------------------------------------------


@pytest.fixture
async def server(pki: Pki) -> AsyncIterator[ServiceServer]:
    settings = load_settings(certs_dir=pki.dir, identity="coordinator", port=0)
    async with ServiceServer(settings, []) as srv:
        yield srv


async def test_grpcurl_lists_services_by_reflection_and_checks_health(
    server: ServiceServer, pki: Pki, grpcurl: Callable[..., Any]
) -> None:
    listed = await grpcurl("list", tls=pki.files("client"), address=server.address)
    assert listed.returncode == 0, listed
    assert set(listed.stdout.split()) >= {
        "grpc.health.v1.Health",
        "grpc.reflection.v1alpha.ServerReflection",
    }
    check = await grpcurl(
        "grpc.health.v1.Health/Check",
        tls=pki.files("client"),
        address=server.address,
        input='{"service": ""}',
    )
    assert check.returncode == 0, check
    assert check.json() == {"status": "SERVING"}


async def test_grpcurl_without_client_certificate_is_refused(
    server: ServiceServer, pki: Pki, grpcurl: Callable[..., Any]
) -> None:
    result = await grpcurl(
        "list", tls=None, address=server.address, flags=["-cacert", str(pki.dir / "ca.pem")]
    )
    assert result.returncode != 0
    assert "grpc.health.v1.Health" not in result.stdout


async def test_grpcurl_error_exit_code_carries_the_status(
    server: ServiceServer, pki: Pki, grpcurl: Callable[..., Any]
) -> None:
    result = await grpcurl(
        "grpc.health.v1.Health/Check",
        tls=pki.files("client"),
        address=server.address,
        input='{"service": "hivewire.nope.v1.Nothing"}',
    )
    assert result.returncode == 64 + grpc.StatusCode.NOT_FOUND.value[0], result
