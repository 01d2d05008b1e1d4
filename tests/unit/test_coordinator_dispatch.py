"""Agent selection: capacity, least load, avoidance, circuit breakers, departures."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from hivewire.discovery import Instance
from hivewire.discovery.static import StaticRegistry
from hivewire.events.v1 import events_pb2
from hivewire.services.coordinator.dispatch import AgentPool
from hivewire.services.runtime.breaker import BreakerOptions
from hivewire.services.runtime.channels import ChannelPool
from tests.conftest import Pki
from tests.helpers import eventually


def agent(name: str, *caps: str, concurrency: int = 2, port: int = 1) -> Instance:
    return Instance(
        service="hivewire-agent",
        instance_id=f"{name}-00000000",
        address="127.0.0.1",
        port=port,
        tags=caps or ("echo",),
        meta={"name": name, "version": "1.2.3", "max_concurrency": str(concurrency)},
    )


@pytest.fixture
async def pool(pki: Pki) -> AsyncIterator[AgentPool]:
    async with ChannelPool(pki.files("coordinator")) as channels:
        # Not started: the tests feed discovery views themselves.
        p = AgentPool(StaticRegistry(), channels, breaker=BreakerOptions(2, 60))
        yield p
        await p.stop()


async def test_capacity_is_never_exceeded(pool: AgentPool) -> None:
    pool.apply([agent("a", concurrency=2)])
    leases = [pool.acquire("echo") for _ in range(2)]
    assert all(leases)
    assert pool.acquire("echo") is None
    assert not pool.has_capacity("echo")
    pool.release(leases[0], "success")  # type: ignore[arg-type]
    assert pool.has_capacity("echo")
    assert pool.acquire("other") is None and not pool.known_capability("other")


async def test_least_loaded_of_two(pool: AgentPool) -> None:
    pool.apply([agent("a", concurrency=8, port=1), agent("b", concurrency=8, port=2)])
    picks = [pool.acquire("echo") for _ in range(8)]
    loads = {v.agent_id: v.in_flight for v in pool.views()}
    # With two agents both are always compared: the load stays balanced.
    assert sorted(loads.values()) == [4, 4]
    assert all(p is not None for p in picks)


async def test_avoided_agents_are_used_only_when_no_other_exists(pool: AgentPool) -> None:
    pool.apply([agent("a", port=1), agent("b", port=2)])
    for _ in range(2):
        lease = pool.acquire("echo", avoid={"a-00000000"})
        assert lease is not None and lease.agent_id == "b-00000000"
    # b is busy: wait for it rather than go back to a...
    assert pool.acquire("echo", avoid={"a-00000000"}) is None
    assert pool.acquire("echo") is not None
    # ...unless b is gone.
    pool.apply([agent("a", port=1)])
    fallback = pool.acquire("echo", avoid={"a-00000000"})
    assert fallback is not None and fallback.agent_id == "a-00000000"


async def test_open_circuit_excludes_an_agent(pool: AgentPool) -> None:
    pool.apply([agent("a", concurrency=4)])
    for _ in range(2):
        lease = pool.acquire("echo")
        assert lease is not None
        pool.release(lease, "failure")
    assert pool.acquire("echo") is None
    assert [v.circuit_open for v in pool.views()] == [True]


async def test_departed_agent_drains_then_disappears(pool: AgentPool) -> None:
    pool.apply([agent("a"), agent("b", port=2)])
    lease = pool.acquire("echo", avoid={"b-00000000"})
    assert lease is not None and lease.agent_id == "a-00000000"
    pool.apply([agent("b", port=2)])
    # No new task goes to it, but its running task keeps it listed as draining.
    assert all(pool.acquire("echo").agent_id == "b-00000000" for _ in range(2))  # type: ignore[union-attr]
    drained = {v.agent_id: v.draining for v in pool.views()}
    assert drained == {"a-00000000": True, "b-00000000": False}
    pool.release(lease, "success")
    assert [v.agent_id for v in pool.views()] == ["b-00000000"]


async def test_view_fields(pool: AgentPool) -> None:
    pool.apply([agent("a", "echo", "sum", concurrency=3)])
    (view,) = pool.views("sum")
    assert (view.name, view.version, view.max_concurrency) == ("a", "1.2.3", 3)
    assert view.capabilities == ("echo", "sum") and view.healthy and not view.draining
    assert pool.views("other") == []


class HealthEvents:
    """Records what the pool publishes."""

    def __init__(self) -> None:
        self.published: list[tuple[str, str, events_pb2.AgentEventData]] = []

    def publish(
        self,
        event_type: str,
        *,
        subject: str,
        data: events_pb2.AgentEventData,
        task_sequence: int = 0,
        correlation_id: str | None = None,
    ) -> None:
        self.published.append((event_type, subject, data))

    def changes(self) -> list[tuple[bool, str, str]]:
        assert {t for t, _, _ in self.published} <= {"agent.health_changed"}
        return [(d.healthy, d.circuit_state, d.reason) for _, _, d in self.published]


async def test_health_changes_are_published(pki: Pki) -> None:
    events = HealthEvents()
    async with ChannelPool(pki.files("coordinator")) as channels:
        pool = AgentPool(StaticRegistry(), channels, breaker=BreakerOptions(2, 0.05), events=events)
        pool.apply([agent("a", "echo", "sum", concurrency=4)])
        assert events.published == []  # joining is agent.registered, not a health change
        for _ in range(2):
            lease = pool.acquire("echo")
            assert lease is not None
            pool.release(lease, "failure")
        assert events.changes() == [(False, "open", "circuit open")]
        _, subject, data = events.published[0]
        assert subject == data.agent_id == "a-00000000"
        assert data.name == "a" and data.version == "1.2.3"
        assert list(data.capabilities) == ["echo", "sum"]
        assert data.address == "127.0.0.1:1"

        # After the reset timeout a probe goes through; its success closes the circuit.
        async def probe() -> None:
            lease = pool.acquire("echo")
            assert lease is not None and lease.probe
            pool.release(lease, "success")

        await eventually(probe, timeout=5)
        assert events.changes()[1:] == [
            (True, "half_open", "circuit half_open"),
            (True, "closed", "circuit closed"),
        ]

        busy = pool.acquire("echo")  # so that it drains instead of being forgotten
        pool.apply([])  # gone from discovery's healthy set
        pool.apply([agent("a", "echo", "sum", concurrency=4)])  # and back
        assert busy is not None
        pool.release(busy, "success")
        assert events.changes()[3:] == [
            (False, "closed", "left discovery's healthy set"),
            (True, "closed", "healthy in discovery again"),
        ]
        await pool.stop()
        assert len(events.published) == 5
