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
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import nats
import nats.errors
import pytest
import pytest_asyncio
from nats.aio.client import Client as NatsClient
from prometheus_client import REGISTRY

from hivewire.discovery import Instance, Registry, open_registry
from hivewire.events.v1 import events_pb2
from hivewire.services.coordinator.cluster import Cluster, ClusterOptions
from hivewire.services.coordinator.jetstream_store import JetStreamTaskStore
from hivewire.services.runtime.events import EventPublisher, replay
from hivewire.services.runtime.tls import (
    TlsFiles,
    nats_identity,
    nats_tls_options,
    registry_owner,
)
from tests.conftest import Pki
from tests.helpers import NatsServer, assert_nats_refused, eventually

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


def client_context(ca: Path, cert: Path | None = None, key: Path | None = None) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(ca))
    if cert is not None:
        context.load_cert_chain(str(cert), str(key))
    return context


# -- who may connect ----------------------------------------------------------------------


async def test_plaintext_and_certificateless_clients_are_refused(
    secure_nats: NatsServer, pki: Pki
) -> None:
    await assert_nats_refused(f"nats://127.0.0.1:{secure_nats.port}")
    await assert_nats_refused(secure_nats.url, tls=client_context(pki.dir / "ca.pem"))


async def test_a_certificate_of_another_ca_is_refused(
    secure_nats: NatsServer, pki: Pki, foreign_pki: Pki
) -> None:
    foreign = foreign_pki.files("coordinator")
    context = client_context(pki.dir / "ca.pem", foreign.cert, foreign.key)
    await assert_nats_refused(secure_nats.url, tls=context)


async def test_an_identity_the_server_does_not_list_is_refused(
    secure_nats: NatsServer, pki: Pki
) -> None:
    # Issued after the server started: same CA, but no user maps its SPIFFE id.
    late = pki.issue(role="agent", name="latecomer", stem="agent-latecomer")
    await assert_nats_refused(secure_nats.url, **nats_tls_options(secure_nats.url, late))


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
        seen = await collected(watcher.client, "hivewire.events.task.>", lambda m: m.data.decode())
        await agent.client.publish("hivewire.events.task.completed", b"forged")
        await agent.client.flush()
        await eventually(lambda: agent.denied("hivewire.events.task.completed"), timeout=10)
        await coordinator.client.publish("hivewire.events.task.completed", b"real")
        await coordinator.client.flush()
        await eventually(lambda: "real" in seen, timeout=10)
        assert seen == ["real"] and not coordinator.errors


async def test_the_coordinator_publishes_agent_health_changes_and_no_other_agent_event(
    secure_nats: NatsServer, pki: Pki
) -> None:
    # The coordinator's dispatcher sees agents leave and circuits open: it publishes
    # agent.health_changed (services/coordinator/dispatch.py); the rest is the agents'.
    async with (
        connected(secure_nats, pki.files("admin")) as watcher,
        connected(secure_nats, pki.files("coordinator")) as coordinator,
    ):
        assert watcher.client and coordinator.client
        seen = await collected(watcher.client, "hivewire.events.agent.>", lambda m: m.subject)
        await coordinator.client.publish("hivewire.events.agent.registered", b"forged")
        await coordinator.client.flush()
        await eventually(lambda: coordinator.denied("hivewire.events.agent.registered"))
        await coordinator.client.publish("hivewire.events.agent.health_changed", b"real")
        await coordinator.client.flush()
        await eventually(lambda: seen == ["hivewire.events.agent.health_changed"], timeout=10)
        assert not coordinator.denied("hivewire.events.agent.health_changed")


async def collected(
    client: nats.aio.client.Client, subject: str, part: Callable[[nats.aio.msg.Msg], str]
) -> list[str]:
    """A list that fills with ``part`` of each message on ``subject`` (subscribed, flushed)."""
    seen: list[str] = []

    async def on_message(msg: nats.aio.msg.Msg) -> None:
        seen.append(part(msg))

    await client.subscribe(subject, cb=on_message)
    await client.flush()
    return seen


def registry_of(server: NatsServer, files: TlsFiles) -> Registry:
    """The embedded registry as a service opens it: keys under its identity's name."""
    return open_registry(
        "nats",
        nats_url=server.url,
        nats_options=nats_tls_options(server.url, files),
        owner=registry_owner(nats_identity(files)),
    )


async def test_a_service_writes_only_its_own_registry_entries(
    secure_nats: NatsServer, pki: Pki
) -> None:
    summarizer, researcher = pki.files("agent-summarizer"), pki.files("agent-researcher")
    # Through the real registry: each agent registers itself (its own entries).
    async with (
        registry_of(secure_nats, summarizer) as registry,
        registry_of(secure_nats, researcher) as other,
    ):
        await registry.register(
            Instance(service="hivewire-agent", instance_id="s-1", address="127.0.0.1", port=1)
        )
        await other.register(
            Instance(service="hivewire-agent", instance_id="r-1", address="127.0.0.1", port=2)
        )
        got = [i.instance_id for i in await registry.resolve("hivewire-agent")]
        assert got == ["r-1", "s-1"]
        async with connected(secure_nats, summarizer) as agent:
            assert agent.client is not None
            js = agent.client.jetstream(timeout=2)
            kv = await js.key_value("hivewire-registry")
            # Overwriting or deleting another agent's entry, a forged tool entry (to
            # redirect agents to its own "tool service"), an entry outside its name:
            # all refused.
            for key in (
                "hivewire-agent.researcher.r-1",
                "hivewire-tool.summarizer.fake",
                "hivewire-agent.fake",
            ):
                with pytest.raises((nats.errors.TimeoutError, nats.errors.Error)):
                    await kv.put(key, b'{"service":"hivewire-agent"}')
                await eventually(lambda k=key: agent.denied(f"$KV.hivewire-registry.{k}"))  # type: ignore[misc]
            with pytest.raises((nats.errors.TimeoutError, nats.errors.Error)):
                await kv.delete("hivewire-agent.researcher.r-1")
        assert [i.instance_id for i in await other.resolve("hivewire-agent")] == ["r-1", "s-1"]
        assert await registry.resolve("hivewire-tool") == []


async def test_nobody_reads_another_identity_replies(secure_nats: NatsServer, pki: Pki) -> None:
    async with (
        connected(secure_nats, pki.files("agent")) as agent,
        connected(secure_nats, pki.files("client")) as client,
    ):
        assert agent.client and client.client
        # Each identity's replies come to its own inbox prefix, and requests work.
        assert agent.client.new_inbox().startswith("_INBOX.agent.default.")
        assert client.client.new_inbox().startswith("_INBOX.client.client.")
        info = await client.client.jetstream(timeout=5).account_info()
        assert info.streams >= 0
        # Listening on someone else's replies (or on every inbox) is refused.
        for subject in ("_INBOX.client.client.>", "_INBOX.>"):
            await agent.client.subscribe(subject)
            await agent.client.flush()
            await eventually(lambda s=subject: agent.denied(s), timeout=10)  # type: ignore[misc]


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


async def test_a_service_sends_atomic_batches_within_its_permissions(
    secure_nats: NatsServer, pki: Pki
) -> None:
    """A batch's commit is a request: its reply comes back under the service's own inbox."""
    url = secure_nats.url
    stored_before = REGISTRY.get_sample_value(
        "hivewire_events_batches_total", {"outcome": "stored"}
    )
    async with EventPublisher(
        url, source="tool/t-2", nats_options=nats_tls_options(url, pki.files("tool")), batch_min=8
    ) as events:
        for n in range(40):  # queued before the sender runs: one window of forty
            events.publish(
                "tool.invoked", subject=f"batch-{n}", data=events_pb2.ToolEventData(call_id="b")
            )
        assert await events.flush(20)
    stored_after = REGISTRY.get_sample_value("hivewire_events_batches_total", {"outcome": "stored"})
    assert (stored_after or 0.0) == (stored_before or 0.0) + 1
    reader_options = nats_tls_options(url, pki.files("client"))
    got = [
        r.event.subject
        async for r in replay(url, "tool.invoked", nats_options=reader_options)
        if r.event.subject.startswith("batch-")
    ]
    assert got == [f"batch-{n}" for n in range(40)]


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
            cluster = Cluster(
                store,
                name,
                options=ClusterOptions(lease_ttl=5.0, heartbeat=0.5, request_timeout=5.0),
            )
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
