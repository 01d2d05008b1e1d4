"""``serving``: a real mTLS server that registers once SERVING and deregisters on stop."""

from __future__ import annotations

import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from hivewire.discovery import Instance
from hivewire.discovery.static import StaticRegistry
from hivewire.services.runtime.bootstrap import Registration, service_process, serving
from hivewire.services.runtime.channels import secure_channel
from hivewire.services.runtime.config import Settings, load_settings
from hivewire.services.runtime.events import EventPublisher
from hivewire.services.runtime.eventsink import NullSink
from tests.conftest import Pki


def _settings(pki: Pki) -> Settings:
    return load_settings(
        host="127.0.0.1", port=0, certs_dir=pki.dir, identity="tool", grace_period=1.0
    )


async def test_registers_when_serving_and_deregisters_on_shutdown(pki: Pki) -> None:
    calls: list[str] = []
    registered: list[Instance] = []

    async def drain() -> None:
        # Hooks given by the service run before the deregistration.
        calls.append("drain")
        assert await registry.resolve("hivewire-test"), "deregistered before draining"

    async with StaticRegistry() as registry:
        registration = Registration(
            "hivewire-test", "test-1a2b3c4d", tags=("calculator",), meta={"name": "test"}
        )
        async with serving(
            _settings(pki),
            [],
            registry=registry,
            registration=registration,
            on_shutdown=[drain],
            on_registered=registered.append,
            on_deregistered=lambda i: calls.append(f"deregistered {i.instance_id}"),
        ) as running:
            [found] = await registry.resolve("hivewire-test", tag="calculator")
            assert found == running.instance == registered[0]
            assert (found.address, found.port) == ("127.0.0.1", running.server.port)
            assert dict(found.meta) == {"name": "test"}
            async with secure_channel(running.server.address, pki.files("client")) as channel:
                health = health_pb2_grpc.HealthStub(channel)
                reply = await health.Check(health_pb2.HealthCheckRequest(), timeout=5)
                assert reply.status == health_pb2.HealthCheckResponse.SERVING
        assert calls == ["drain", "deregistered test-1a2b3c4d"]
        assert await registry.resolve("hivewire-test") == []


async def test_without_a_registration_nothing_is_registered(pki: Pki) -> None:
    async with StaticRegistry() as registry:
        async with serving(_settings(pki), [], registry=registry) as running:
            assert running.instance is None
            assert running.server.port > 0
            assert registry.registered == {}


async def test_a_server_that_fails_to_start_registers_nothing(pki: Pki) -> None:
    settings = load_settings(
        host="127.0.0.1", port=0, certs_dir=pki.dir, identity="no-such-identity"
    )
    async with StaticRegistry() as registry:
        with pytest.raises(FileNotFoundError):
            async with serving(
                settings, [], registry=registry, registration=Registration("hivewire-x", "x-1")
            ):
                pass
        assert registry.registered == {}


async def test_a_misspelt_hook_is_refused_before_anything_serves(pki: Pki) -> None:
    async with StaticRegistry() as registry:
        with pytest.raises(TypeError, match="unexpected keyword argument 'on_shutdwn'"):
            async with serving(
                _settings(pki),
                [],
                registry=registry,
                registration=Registration("hivewire-x", "x-1"),
                on_shutdwn=[],  # type: ignore[call-arg]
            ):
                pass
        assert registry.registered == {}


async def test_a_service_process_serves_on_the_registry_it_is_given(pki: Pki) -> None:
    calls: list[str] = []

    async def drain() -> None:
        calls.append("drain")
        assert await registry.resolve("hivewire-test"), "deregistered before draining"

    sink = NullSink()
    async with StaticRegistry() as registry:
        async with service_process(_settings(pki), "test", events=sink, registry=registry) as p:
            assert p.instance_id.startswith("test-")
            assert p.events is sink
            assert await p.registry() is registry
            running = await p.start(
                [], Registration("hivewire-test", p.instance_id), on_shutdown=[drain]
            )
            [found] = await registry.resolve("hivewire-test")
            assert found == running.instance
            assert found.instance_id == p.instance_id
        assert calls == ["drain"]
        assert await registry.resolve("hivewire-test") == []
        # The registry it was given is the caller's: still open after the process ended.
        await registry.register(found)
        assert await registry.resolve("hivewire-test") == [found]


async def test_a_service_process_opens_its_own_registry_and_publisher_once(pki: Pki) -> None:
    settings = load_settings(
        host="127.0.0.1",
        port=0,
        certs_dir=pki.dir,
        identity="tool",
        grace_period=1.0,
        discovery="static",
        events={"enabled": False},
    )
    async with service_process(settings, "test") as process:
        assert isinstance(process.events, EventPublisher)
        assert not process.events.enabled
        registry = await process.registry()
        assert isinstance(registry, StaticRegistry)
        assert await process.registry() is registry
        running = await process.start([], None)
        assert running.instance is None
        assert running.server.port > 0
