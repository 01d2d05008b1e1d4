"""Consul-specific behaviour of the Consul registry backend.

Against the Consul stand-in (and, for the gRPC check over mTLS, also a real
``consul agent -dev`` when one is on PATH): the registration payload, Consul's blocking
query client rules (index reset, rate limit), outages, an agent that loses its state, the
critical-service reaper, ACL tokens, and gRPC health checks against a real mTLS grpc.aio
server.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Iterable
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from prometheus_client import REGISTRY

from hivewire.discovery import (
    META_INSTANCE_NAME,
    Instance,
    Registry,
    RegistryError,
    RegistryUnavailableError,
    new_instance_id,
    open_registry,
)
from hivewire.services.runtime.tls import server_credentials
from tests.conftest import Pki
from tests.helpers import ServiceProcess, dead_address, eventually, reserved_port
from tests.support.consul_agent import RealConsul, consul_binary
from tests.support.consul_standin import AclToken, ConsulStandin, Timing

REPO_ROOT = Path(__file__).resolve().parents[2]
SERVICE = "hivewire-agent"
HEALTH_SERVICE = "hivewire.agent.v1.AgentService"
SERVER_NAME = "default.agent.hivewire.local"  # a DNS SAN of the "agent" test certificate
SETTLE = 15.0

pytestmark = pytest.mark.timeout(90)

TIMING = Timing(min_interval=0.1, reap_interval=0.2, deregister_minimum=1.0, check_timeout=2.0)
OPTIONS: dict[str, Any] = {
    "ttl": 2.0,
    "watch_wait": 10.0,
    "watch_interval": 0.05,
    "request_timeout": 2.0,
    "backoff_max": 0.3,
    "grpc_interval": 0.2,
    "grpc_timeout": 1.0,
    "deregister_critical_after": 1.0,
}


@pytest.fixture
async def standin() -> AsyncIterator[ConsulStandin]:
    async with ConsulStandin(timing=TIMING) as agent:
        yield agent


def registry(
    agent: ConsulStandin | RealConsul, *, token: str | None = None, **extra: Any
) -> Registry:
    return open_registry(
        f"consul://{agent.address}", nats_url="", consul_token=token, **{**OPTIONS, **extra}
    )


def instance(name: str, *, port: int | None = None, meta: dict[str, str] | None = None) -> Instance:
    return Instance(
        service=SERVICE,
        instance_id=new_instance_id(name),
        address="127.0.0.1",
        port=port or reserved_port(),
        tags=("summarize",),
        meta={META_INSTANCE_NAME: name, **(meta or {})},
    )


def ids(instances: Iterable[Instance]) -> list[str]:
    return sorted(i.instance_id for i in instances)


async def next_set(watch: AsyncIterator[list[Instance]], within: float = SETTLE) -> list[Instance]:
    async with asyncio.timeout(within):
        return await anext(watch)


async def until_set(watch: AsyncIterator[list[Instance]], expected: list[str]) -> None:
    async with asyncio.timeout(SETTLE):
        while ids(await anext(watch)) != expected:
            pass


def metric(name: str) -> float:
    return REGISTRY.get_sample_value(name, {"backend": "consul"}) or 0.0


# -- registration ----------------------------------------------------------------------


async def test_registration_carries_ids_tags_meta_and_both_checks(standin: ConsulStandin) -> None:
    worker = instance(
        "worker",
        meta={"version": "1.2.0", "tls_server_name": SERVER_NAME, "grpc_health_service": "x.Y"},
    )
    async with registry(standin, checks=("ttl", "grpc"), deregister_critical_after=90.0) as reg:
        await reg.register(worker)
        iid = worker.instance_id
        assert standin.service_ids(SERVICE) == [iid]
        ttl = standin.check_definition(f"ttl:{iid}")
        grpc_check = standin.check_definition(f"grpc:{iid}")
        assert ttl is not None and grpc_check is not None
        assert ttl["TTL"] == 2_000_000_000
        assert ttl["DeregisterCriticalServiceAfter"] == 90_000_000_000
        assert grpc_check["GRPC"] == f"127.0.0.1:{worker.port}/x.Y"
        assert grpc_check["GRPCUseTLS"] is True
        assert grpc_check["TLSServerName"] == SERVER_NAME
        assert grpc_check["Interval"] == 200_000_000
        assert grpc_check["DeregisterCriticalServiceAfter"] == 90_000_000_000
        # The TTL check starts passing; the gRPC one critical until its first run.
        assert standin.check_status(f"ttl:{iid}") == "passing"


async def test_registering_the_same_id_again_replaces_the_definition(
    standin: ConsulStandin,
) -> None:
    first = instance("same")
    moved = Instance(
        service=first.service,
        instance_id=first.instance_id,
        address="127.0.0.1",
        port=reserved_port(),
        tags=("summarize", "plan"),
        meta=dict(first.meta),
    )
    async with registry(standin) as reg:
        await reg.register(first)
        await reg.register(moved)
        (found,) = await reg.resolve(SERVICE)
        assert found.port == moved.port and found.tags == ("summarize", "plan")
        assert standin.service_ids(SERVICE) == [first.instance_id]


# -- blocking query client rules -------------------------------------------------------


async def test_watch_resets_its_index_when_the_index_goes_backwards(standin: ConsulStandin) -> None:
    a, b = instance("a"), instance("b")
    async with registry(standin) as owner, registry(standin, watch_wait=1.0) as watcher:
        await owner.register(a)
        watch = watcher.watch(SERVICE)
        latest: list[list[Instance]] = []

        async def consume() -> None:
            async for current in watch:
                latest.append(current)

        consumer = asyncio.create_task(consume())
        try:
            await eventually(lambda: bool(latest) and ids(latest[-1]) == [a.instance_id])
            seen = len(standin.requests)
            standin.reset_index(1)
            standin.drop_long_polls()

            def reset_sent() -> bool:
                # A client that kept its old, now future, index would never see a change
                # before its wait ran out, again and again.
                return any(
                    path.startswith(f"/v1/health/service/{SERVICE}")
                    and 0 < int(query.get("index", "0")) <= standin.index
                    for _, path, query in standin.requests[seen:]
                )

            await eventually(reset_sent, timeout=SETTLE)
            await owner.register(b)
            await eventually(lambda: ids(latest[-1]) == ids([a, b]), timeout=SETTLE)
        finally:
            consumer.cancel()
            with pytest.raises(asyncio.CancelledError):
                await consumer


async def test_watch_loop_is_rate_limited_under_churn(standin: ConsulStandin) -> None:
    flapper = instance("flapper")
    refill = 1.0
    async with (
        registry(standin) as owner,
        registry(standin, watch_interval=refill, watch_burst=2) as watcher,
    ):
        await owner.register(flapper)
        watch = watcher.watch(SERVICE)
        latest: list[list[Instance]] = []

        async def consume() -> None:
            async for current in watch:
                latest.append(current)

        consumer = asyncio.create_task(consume())
        try:
            await eventually(lambda: bool(latest) and ids(latest[-1]) == [flapper.instance_id])
            before = standin.count_requests("GET", "/v1/health/service/")
            start = time.monotonic()
            for flip in range(20):
                await owner.set_healthy(flapper.instance_id, flip % 2 == 1)
            elapsed = time.monotonic() - start
            queries = standin.count_requests("GET", "/v1/health/service/") - before
            # Token bucket: at most the burst plus one query per refill interval. Only a
            # loop without a limit (one query per change) can exceed it.
            assert queries <= 2 + elapsed / refill + 1, (queries, elapsed)
            # And it still converges on the final state.
            await eventually(lambda: ids(latest[-1]) == [flapper.instance_id], timeout=SETTLE)
        finally:
            consumer.cancel()
            with pytest.raises(asyncio.CancelledError):
                await consumer


# -- outages ---------------------------------------------------------------------------


async def test_outage_while_watching_keeps_last_known_and_recovers(standin: ConsulStandin) -> None:
    a, b = instance("a"), instance("b")
    async with registry(standin) as owner, registry(standin) as watcher:
        await owner.register(a)
        watch = watcher.watch(SERVICE)
        latest: list[list[Instance]] = []

        async def consume() -> None:
            async for current in watch:
                latest.append(current)

        consumer = asyncio.create_task(consume())
        try:
            await eventually(lambda: bool(latest) and ids(latest[-1]) == [a.instance_id])
            errors = metric("hivewire_registry_watch_errors_total")
            await standin.stop_http()
            await eventually(lambda: metric("hivewire_registry_watch_errors_total") > errors)
            assert not consumer.done()  # the watch did not raise
            assert ids(latest[-1]) == [a.instance_id]  # last known set kept
            with pytest.raises(RegistryUnavailableError):
                await watcher.resolve(SERVICE)
            await owner.register(b)  # must not raise; registered once Consul is back
            await standin.start_http()
            await eventually(lambda: ids(latest[-1]) == ids([a, b]), timeout=SETTLE)
        finally:
            consumer.cancel()
            with pytest.raises(asyncio.CancelledError):
                await consumer


async def test_a_refused_connection_is_said_in_words() -> None:
    with dead_address() as address:
        registry = open_registry(f"consul://{address}", nats_url="", **OPTIONS)
        async with registry:
            with pytest.raises(RegistryUnavailableError) as info:
                await registry.resolve(SERVICE)
    message = str(info.value)
    assert message == (
        f"consul at http://{address}: connection refused (is the Consul agent running there?)"
    ), message


async def test_agent_restart_losing_state_re_registers_and_watch_recovers(
    standin: ConsulStandin,
) -> None:
    a = instance("a")
    async with registry(standin) as owner, registry(standin, watch_wait=1.0) as watcher:
        await owner.register(a)
        watch = watcher.watch(SERVICE)
        try:
            await until_set(watch, [a.instance_id])
            again = metric("hivewire_registry_reregistrations_total")
            await standin.restart()
            # The next TTL pass gets 404: the instance is registered again.
            await eventually(lambda: standin.service_ids(SERVICE) == [a.instance_id])
            assert metric("hivewire_registry_reregistrations_total") > again
            assert ids(await watcher.resolve(SERVICE)) == [a.instance_id]
            await owner.deregister(a.instance_id)
            await until_set(watch, [])
        finally:
            await watch.aclose()  # type: ignore[attr-defined]


# -- the reaper ------------------------------------------------------------------------


async def test_reaper_removes_a_killed_instance(standin: ConsulStandin, tmp_path: Path) -> None:
    proc = ServiceProcess(
        "tests.support.registrant",
        "--discovery", f"consul://{standin.address}",
        "--name", "doomed",
        "--port", str(reserved_port()),
        "--options", json.dumps(OPTIONS),
        workdir=tmp_path,
        env={"PYTHONPATH": str(REPO_ROOT)},
    )  # fmt: skip
    await proc.start()
    try:
        iid = proc.ports["instance_id"]
        assert standin.service_ids(SERVICE) == [iid]
        await proc.kill()
        # TTL expires -> critical -> after DeregisterCriticalServiceAfter the agent reaps it.
        await standin.wait_for(lambda s: s.check_status(f"ttl:{iid}") == "critical", within=SETTLE)
        assert "TTL expired" in (standin.check_output(f"ttl:{iid}") or "")
        await standin.wait_for(lambda s: not s.service_ids(SERVICE), within=SETTLE)
        assert any(kind == "reaped" for _, kind, _ in standin.events)
    finally:
        if proc.running:
            await proc.kill()


async def test_reaped_while_alive_registers_again(standin: ConsulStandin) -> None:
    a = instance("a")
    async with registry(standin) as owner:
        await owner.register(a)
        await standin.stop_http()
        # Heartbeats cannot get through: TTL expiry, then the reaper removes the service.
        await standin.wait_for(lambda s: not s.service_ids(SERVICE), within=SETTLE)
        await standin.start_http()
        await eventually(lambda: standin.service_ids(SERVICE) == [a.instance_id], timeout=SETTLE)

        async def passing_again() -> None:
            assert ids(await owner.resolve(SERVICE)) == [a.instance_id]

        await eventually(passing_again, timeout=SETTLE)


# -- ACL -------------------------------------------------------------------------------


@pytest.fixture
async def acl_standin() -> AsyncIterator[ConsulStandin]:
    tokens = [
        AclToken("writer-secret", service_prefix={"hivewire-": "write"}, node_prefix={"": "read"}),
        AclToken("reader-secret", service_prefix={"": "read"}, node_prefix={"": "read"}),
    ]
    async with ConsulStandin(timing=TIMING, acl_default_policy="deny", acl_tokens=tokens) as agent:
        yield agent


async def test_acl_token_is_sent_and_required(acl_standin: ConsulStandin) -> None:
    worker = instance("worker")
    async with (
        registry(acl_standin, token="writer-secret") as writer,
        registry(acl_standin, token="reader-secret") as reader,
        registry(acl_standin) as anonymous,
        registry(acl_standin, token="no-such-token") as unknown,
    ):
        await writer.register(worker)
        assert ids(await writer.resolve(SERVICE)) == [worker.instance_id]
        assert ids(await reader.resolve(SERVICE)) == [worker.instance_id]
        # Reads without permission are filtered, not refused (as Consul does).
        assert await anonymous.resolve(SERVICE) == []
        with pytest.raises(RegistryError, match="Permission denied"):
            await anonymous.register(instance("intruder"))
        with pytest.raises(RegistryError, match="Permission denied"):
            await reader.register(instance("reader"))
        with pytest.raises(RegistryError, match="ACL not found"):
            await unknown.register(instance("ghost"))
        with pytest.raises(RegistryError, match="ACL not found"):
            await unknown.resolve(SERVICE)
        # The writer's TTL passes carry the token too: still passing after several TTLs.
        beats = metric("hivewire_registry_heartbeats_total")
        await eventually(lambda: metric("hivewire_registry_heartbeats_total") >= beats + 4)
        assert acl_standin.check_status(f"ttl:{worker.instance_id}") == "passing"
        assert ids(await reader.resolve(SERVICE)) == [worker.instance_id]


async def test_configured_token_wins_over_consul_http_token(
    acl_standin: ConsulStandin, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CONSUL_HTTP_TOKEN", "no-such-token")
    async with registry(acl_standin, token="writer-secret") as writer:
        await writer.register(instance("worker"))
        assert len(await writer.resolve(SERVICE)) == 1


# -- gRPC health checks against a real mTLS server -------------------------------------


class HealthServer:
    """A real grpc.aio server requiring client certificates, serving grpc.health.v1."""

    def __init__(self, pki: Pki) -> None:
        self.pki = pki
        self.servicer = health.aio.HealthServicer()
        self.server: grpc.aio.Server | None = None
        self.port = 0

    async def start(self) -> None:
        self.server = grpc.aio.server()
        health_pb2_grpc.add_HealthServicer_to_server(self.servicer, self.server)
        credentials = server_credentials(self.pki.files("agent"))
        self.port = self.server.add_secure_port(f"127.0.0.1:{self.port}", credentials)
        await self.server.start()
        await self.set(serving=True)

    async def set(self, *, serving: bool) -> None:
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if serving
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        await self.servicer.set(HEALTH_SERVICE, status)

    async def stop(self) -> None:
        if self.server is not None:
            await self.server.stop(0)


@pytest.fixture
async def health_server(pki: Pki) -> AsyncIterator[HealthServer]:
    server = HealthServer(pki)
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


def grpc_instance(port: int, *, server_name: str = SERVER_NAME) -> Instance:
    return instance(
        "checked",
        port=port,
        meta={"tls_server_name": server_name, "grpc_health_service": HEALTH_SERVICE},
    )


def agent_hcl(pki: Pki, files: Any) -> tuple[str, ...]:
    return (
        f'tls {{ defaults {{ ca_file = "{files.ca}" cert_file = "{files.cert}" '
        f'key_file = "{files.key}" }} }}',
        "enable_agent_tls_for_checks = true",
    )


@pytest.fixture(
    params=[
        "standin",
        pytest.param(
            "real",
            marks=pytest.mark.skipif(consul_binary() is None, reason="no `consul` binary on PATH"),
        ),
    ]
)
async def checking_agent(
    request: pytest.FixtureRequest, pki: Pki, tmp_path: Path
) -> AsyncIterator[ConsulStandin | RealConsul]:
    """A Consul agent with enable_agent_tls_for_checks and a certificate from the mesh CA."""
    files = pki.issue(role="consul", name="agent", stem="consul-agent")
    if request.param == "standin":
        async with ConsulStandin(timing=TIMING, agent_tls_for_checks=files) as agent:
            yield agent
        return
    real = RealConsul(tmp_path / "consul", hcl=agent_hcl(pki, files))
    await real.start()
    try:
        yield real
    finally:
        await real.stop()


async def test_grpc_check_with_agent_tls_follows_the_health_service(
    checking_agent: ConsulStandin | RealConsul, health_server: HealthServer
) -> None:
    checked = grpc_instance(health_server.port)
    async with registry(checking_agent, checks=("grpc",), deregister_critical_after=60.0) as reg:
        await reg.register(checked)
        watch = reg.watch(SERVICE)
        try:
            await until_set(watch, [checked.instance_id])
            await health_server.set(serving=False)
            await until_set(watch, [])
            if isinstance(checking_agent, ConsulStandin):
                output = checking_agent.check_output(f"grpc:{checked.instance_id}")
                assert output == (
                    f"gRPC 127.0.0.1:{health_server.port}/{HEALTH_SERVICE} "
                    "serving status: NOT_SERVING"
                )
            await health_server.set(serving=True)
            await until_set(watch, [checked.instance_id])
            await health_server.stop()
            await until_set(watch, [])
            if isinstance(checking_agent, ConsulStandin):
                output = checking_agent.check_output(f"grpc:{checked.instance_id}") or ""
                assert output.startswith("rpc error: code = Unavailable desc = ")
        finally:
            await watch.aclose()  # type: ignore[attr-defined]


async def test_grpc_check_without_agent_tls_cannot_pass_an_mtls_service(
    pki: Pki, health_server: HealthServer
) -> None:
    # Consul's default: system roots (here: the mesh CA) and no client certificate. The
    # service requires one, so the handshake fails and the check stays critical.
    async with ConsulStandin(timing=TIMING, system_roots=pki.files("agent").ca) as agent:
        checked = grpc_instance(health_server.port)
        async with registry(agent, checks=("grpc",), deregister_critical_after=60.0) as reg:
            await reg.register(checked)
            check_id = f"grpc:{checked.instance_id}"
            await agent.wait_for(
                lambda s: (s.check_output(check_id) or "").startswith(
                    "rpc error: code = Unavailable"
                ),
                within=SETTLE,
            )
            assert agent.check_status(check_id) == "critical"
            assert await reg.resolve(SERVICE) == []


async def test_grpc_check_verifies_the_tls_server_name(
    pki: Pki, health_server: HealthServer
) -> None:
    files = pki.issue(role="consul", name="agent", stem="consul-agent")
    async with ConsulStandin(timing=TIMING, agent_tls_for_checks=files) as agent:
        wrong = grpc_instance(health_server.port, server_name="model.model.hivewire.local")
        right = grpc_instance(health_server.port)
        async with registry(agent, checks=("grpc",), deregister_critical_after=60.0) as reg:
            await reg.register(wrong)
            await reg.register(right)

            async def only_right() -> None:
                assert ids(await reg.resolve(SERVICE)) == [right.instance_id]

            await eventually(only_right, timeout=SETTLE)
            await agent.wait_for(
                lambda s: (s.check_output(f"grpc:{wrong.instance_id}") or "").startswith(
                    "rpc error: code = Unavailable"
                ),
                within=SETTLE,
            )


async def test_not_serving_with_grpc_checks_only_uses_maintenance_mode(
    pki: Pki, health_server: HealthServer
) -> None:
    files = pki.issue(role="consul", name="agent", stem="consul-agent")
    async with ConsulStandin(timing=TIMING, agent_tls_for_checks=files) as agent:
        checked = grpc_instance(health_server.port)
        async with registry(agent, checks=("grpc",), deregister_critical_after=60.0) as reg:
            await reg.register(checked)

            async def listed(expected: list[str]) -> None:
                assert ids(await reg.resolve(SERVICE)) == expected

            await eventually(lambda: listed([checked.instance_id]), timeout=SETTLE)
            await reg.set_healthy(checked.instance_id, False)
            assert await reg.resolve(SERVICE) == []
            assert agent.check_status(f"_service_maintenance:{checked.instance_id}") == "critical"
            await reg.set_healthy(checked.instance_id, True)
            await eventually(lambda: listed([checked.instance_id]), timeout=SETTLE)
