"""The mesh's NATS: mutual TLS with the mesh CA and a permission set per identity.

A real nats-server configured as ``hivewire up`` configures it (services/mesh/
nats_security.py). Refused at connect: a plaintext client, a TLS client without a
certificate, a certificate of another CA, and a mesh certificate whose SPIFFE id the
server does not list. Refused per subject: an agent publishing task events or writing the
tool service's registry entry, and an event reader publishing anything. Allowed: each
service publishing its own events and registry entries, and readers replaying events.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import AsyncIterator
from pathlib import Path

import nats
import nats.errors
import pytest
import pytest_asyncio
from nats.aio.client import Client as NatsClient

from hivewire.discovery import Instance, open_registry
from hivewire.events.v1 import events_pb2
from hivewire.services.coordinator.cluster import Cluster
from hivewire.services.coordinator.jetstream_store import JetStreamTaskStore
from hivewire.services.runtime.events import EventPublisher, replay
from hivewire.services.runtime.tls import TlsFiles, nats_tls_options
from tests.conftest import Pki
from tests.helpers import NatsServer, eventually

pytestmark = [pytest.mark.asyncio(loop_scope="module"), pytest.mark.timeout(90)]


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def secure_nats(
    pki: Pki, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[NatsServer]:
    async with NatsServer(tmp_path_factory.mktemp("secure-nats"), certs_dir=pki.dir) as server:
        yield server


class Connection:
    """A NATS client that records the server's asynchronous errors (permission denials)."""

    def __init__(self) -> None:
        self.errors: list[str] = []
        self.client: NatsClient | None = None

    async def connect(self, url: str, **options: object) -> NatsClient:
        async def on_error(exc: Exception) -> None:
            self.errors.append(str(exc))

        self.client = await nats.connect(
            servers=[url],
            allow_reconnect=False,
            max_reconnect_attempts=1,
            connect_timeout=2,
            error_cb=on_error,
            **options,  # type: ignore[arg-type]
        )
        return self.client

    def denied(self, subject: str) -> bool:
        # nats-py lower-cases the server's -ERR text.
        return any(
            "permissions violation" in e.lower() and subject.lower() in e.lower()
            for e in self.errors
        )


@contextlib.asynccontextmanager
async def connected(server: NatsServer, files: TlsFiles) -> AsyncIterator[Connection]:
    connection = Connection()
    await connection.connect(server.url, **nats_tls_options(server.url, files))
    try:
        yield connection
    finally:
        assert connection.client is not None
        await connection.client.close()


async def refused(url: str, **options: object) -> None:
    with pytest.raises((nats.errors.NoServersError, nats.errors.Error, OSError, ssl.SSLError)):
        await Connection().connect(url, **options)


def client_context(ca: Path, cert: Path | None = None, key: Path | None = None) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(ca))
    if cert is not None:
        context.load_cert_chain(str(cert), str(key))
    return context


# -- who may connect ----------------------------------------------------------------------


async def test_plaintext_and_certificateless_clients_are_refused(
    secure_nats: NatsServer, pki: Pki
) -> None:
    await refused(f"nats://127.0.0.1:{secure_nats.port}")
    await refused(secure_nats.url, tls=client_context(pki.dir / "ca.pem"))


async def test_a_certificate_of_another_ca_is_refused(
    secure_nats: NatsServer, pki: Pki, foreign_pki: Pki
) -> None:
    foreign = foreign_pki.files("coordinator")
    context = client_context(pki.dir / "ca.pem", foreign.cert, foreign.key)
    await refused(secure_nats.url, tls=context)


async def test_an_identity_the_server_does_not_list_is_refused(
    secure_nats: NatsServer, pki: Pki
) -> None:
    # Issued after the server started: same CA, but no user maps its SPIFFE id.
    late = pki.issue(role="agent", name="latecomer", stem="agent-latecomer")
    await refused(secure_nats.url, **nats_tls_options(secure_nats.url, late))


# -- what each identity may do -------------------------------------------------------------


async def test_only_the_coordinator_publishes_task_events(
    secure_nats: NatsServer, pki: Pki
) -> None:
    async with (
        connected(secure_nats, pki.files("admin")) as watcher,
        connected(secure_nats, pki.files("agent")) as agent,
        connected(secure_nats, pki.files("coordinator")) as coordinator,
    ):
        assert watcher.client and agent.client and coordinator.client
        seen: list[str] = []

        async def on_message(msg: nats.aio.msg.Msg) -> None:
            seen.append(msg.data.decode())

        await watcher.client.subscribe("hivewire.events.task.>", cb=on_message)
        await watcher.client.flush()
        await agent.client.publish("hivewire.events.task.completed", b"forged")
        await agent.client.flush()
        await eventually(lambda: agent.denied("hivewire.events.task.completed"), timeout=10)
        await coordinator.client.publish("hivewire.events.task.completed", b"real")
        await coordinator.client.flush()
        await eventually(lambda: "real" in seen, timeout=10)
        assert seen == ["real"] and not coordinator.errors


async def test_a_service_writes_only_its_own_registry_entries(
    secure_nats: NatsServer, pki: Pki
) -> None:
    agent_files = pki.files("agent")
    # Through the real registry: the agent registers itself (its own kind of entry).
    async with open_registry(
        "nats",
        nats_url=secure_nats.url,
        nats_options=nats_tls_options(secure_nats.url, agent_files),
    ) as registry:
        await registry.register(
            Instance(service="hivewire-agent", instance_id="a-1", address="127.0.0.1", port=1)
        )
        assert [i.instance_id for i in await registry.resolve("hivewire-agent")] == ["a-1"]
        # A forged tool entry (to redirect agents to its own "tool service") is refused.
        async with connected(secure_nats, agent_files) as agent:
            assert agent.client is not None
            subject = "$KV.hivewire-registry.hivewire-tool.fake"
            await agent.client.publish(subject, b'{"service":"hivewire-tool"}')
            await agent.client.flush()
            await eventually(lambda: agent.denied(subject), timeout=10)
        assert await registry.resolve("hivewire-tool") == []


async def test_event_readers_read_and_do_not_write(secure_nats: NatsServer, pki: Pki) -> None:
    url = secure_nats.url
    async with EventPublisher(
        url, source="tool/t-1", nats_options=nats_tls_options(url, pki.files("tool"))
    ) as events:
        events.publish(
            "tool.completed", subject="call-1", data=events_pb2.ToolEventData(call_id="call-1")
        )
        await events.flush()
    reader_options = nats_tls_options(url, pki.files("client"))
    got = [r.type async for r in replay(url, "tool.*", nats_options=reader_options)]
    assert got == ["tool.completed"]
    async with connected(secure_nats, pki.files("client")) as reader:
        assert reader.client is not None
        for subject in ("hivewire.events.tool.completed", "$KV.hivewire-registry.hivewire-agent.x"):
            await reader.client.publish(subject, b"x")
            await reader.client.flush()
            await eventually(lambda s=subject: reader.denied(s), timeout=10)  # type: ignore[misc]


async def test_a_denied_request_times_out_rather_than_succeeds(
    secure_nats: NatsServer, pki: Pki
) -> None:
    # JetStream publishes of a forbidden subject never get an ack.
    async with connected(secure_nats, pki.files("model")) as model:
        assert model.client is not None
        js = model.client.jetstream(timeout=1)
        with pytest.raises((nats.errors.TimeoutError, asyncio.TimeoutError, nats.errors.Error)):
            await js.publish("hivewire.events.task.created", b"x")
        ok = await js.publish("hivewire.events.model.request_completed", b"x")
        assert ok.stream == "HIVEWIRE_EVENTS"


class _EchoHost:
    """The coordinator side of the cluster reduced to an echo (the NATS side is real)."""

    async def take_over(self, rows: object, previous: str) -> None:
        return None

    def drop(self, task_id: str) -> None:
        return None

    def abandon(self) -> None:
        return None

    def wake(self) -> None:
        return None

    async def answer(self, op: str, caller: str, body: bytes, correlation_id: str) -> bytes:
        return f"{op}:{caller}:".encode() + body


async def test_coordinators_share_the_store_and_answer_each_other(
    secure_nats: NatsServer, pki: Pki
) -> None:
    # Two coordinators' clusters on the secured server: the store's buckets (leases,
    # the active-task index) and the request subjects are theirs to use.
    options = nats_tls_options(secure_nats.url, pki.files("coordinator"))
    async with contextlib.AsyncExitStack() as stack:
        clusters = []
        for name in ("coordinator-a", "coordinator-b"):
            store = await stack.enter_async_context(
                JetStreamTaskStore(secure_nats.url, connect=options)
            )
            cluster = Cluster(store, name, lease_ttl=5.0, heartbeat=0.5, request_timeout=5.0)
            await cluster.join(_EchoHost())
            stack.push_async_callback(cluster.leave)
            clusters.append(cluster)
        answer = await clusters[0].request(
            "coordinator-b", "ping", b"x", caller="spiffe://hivewire.local/client/c"
        )
        assert answer == b"ping:spiffe://hivewire.local/client/c:x"
    # Nobody else may listen to (or answer for) a coordinator.
    async with connected(secure_nats, pki.files("agent")) as agent:
        assert agent.client is not None
        await agent.client.subscribe("hivewire.coordinator.coordinator-a")
        await agent.client.flush()
        await eventually(lambda: agent.denied("hivewire.coordinator.coordinator-a"), timeout=10)
