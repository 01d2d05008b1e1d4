"""One contract, every registry backend.

The same tests run against the embedded registry (a real nats-server), the Consul backend
on the in-process Consul stand-in, and the Consul backend on a real ``consul agent -dev``
when a ``consul`` binary is on PATH (skipped otherwise). Registrations come from this
process and from real subprocesses (``tests/support/registrant.py``) that are killed with
SIGKILL or stopped with SIGTERM.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import REGISTRY

from hivewire.discovery import (
    META_INSTANCE_NAME,
    Instance,
    Registry,
    RegistryUnavailableError,
    new_instance_id,
    open_registry,
)
from tests.helpers import NatsServer, ServiceProcess, eventually, reserved_port
from tests.support.consul_agent import RealConsul, consul_binary
from tests.support.consul_standin import ConsulStandin, Timing

REPO_ROOT = Path(__file__).resolve().parents[2]
SERVICE = "hivewire-agent"
TTL = 2.0
# Generous bounds for "eventually": a TTL, a heartbeat period, expiry-marker and check
# scheduling slack. They bound waits; nothing asserts how long anything took.
SETTLE = 15.0

pytestmark = pytest.mark.timeout(90)

NO_CONSUL = "no `consul` binary on PATH: the real-agent run of the contract is skipped"


@dataclass
class Backend:
    """How to reach one backend from this process and from subprocesses."""

    name: str
    kind: str  # embedded | consul
    url: str
    nats_url: str = ""
    options: dict[str, Any] = field(default_factory=dict)
    nats: NatsServer | None = None
    standin: ConsulStandin | None = None

    def registry(self, **overrides: Any) -> Registry:
        return open_registry(self.url, nats_url=self.nats_url, **{**self.options, **overrides})

    def registrant(
        self,
        workdir: Path,
        name: str,
        *,
        tags: Iterable[str] = (),
        label: str | None = None,
        port: int | None = None,
        explicit_name: bool = True,
        **overrides: Any,
    ) -> ServiceProcess:
        args = [
            "--discovery", self.url,
            "--nats-url", self.nats_url,
            "--service", SERVICE,
            "--name", name,
            "--port", str(port or reserved_port()),
            "--options", json.dumps({**self.options, **overrides}),
        ]  # fmt: skip
        for tag in tags:
            args += ["--tag", tag]
        if not explicit_name:
            args.append("--no-instance-name")
        return ServiceProcess(
            "tests.support.registrant",
            *args,
            workdir=workdir,
            name=label or name,
            env={"PYTHONPATH": str(REPO_ROOT)},
        )


@pytest.fixture(
    params=[
        "embedded",
        "consul-standin",
        pytest.param(
            "consul-real", marks=pytest.mark.skipif(consul_binary() is None, reason=NO_CONSUL)
        ),
    ]
)
async def backend(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Backend]:
    """A fresh backend per test."""
    if request.param == "embedded":
        async with NatsServer(tmp_path / "nats") as nats:
            yield _embedded(nats)
        return
    consul_options = {
        "ttl": TTL,
        "watch_wait": 10.0,
        "watch_interval": 0.05,
        "request_timeout": 5.0,
        "backoff_max": 0.5,
    }
    if request.param == "consul-standin":
        timing = Timing(min_interval=0.2, reap_interval=0.5, deregister_minimum=1.0)
        async with ConsulStandin(timing=timing) as standin:
            yield Backend(
                "consul-standin",
                "consul",
                f"consul://{standin.address}",
                options=consul_options,
                standin=standin,
            )
        return
    agent = RealConsul(tmp_path / "consul")
    await agent.start()
    try:
        yield Backend("consul-real", "consul", f"consul://{agent.address}", options=consul_options)
    finally:
        await agent.stop()


def _embedded(nats: NatsServer) -> Backend:
    return Backend(
        "embedded", "embedded", "nats", nats_url=nats.url, options={"ttl": TTL}, nats=nats
    )


def ids(instances: Iterable[Instance]) -> list[str]:
    return sorted(i.instance_id for i in instances)


async def next_set(watch: AsyncIterator[list[Instance]], within: float = SETTLE) -> list[Instance]:
    async with asyncio.timeout(within):
        return await anext(watch)


def instance(name: str, port: int | None = None, *, tags: Iterable[str] = ()) -> Instance:
    return Instance(
        service=SERVICE,
        instance_id=new_instance_id(name),
        address="127.0.0.1",
        port=port or reserved_port(),
        tags=tuple(tags),
        meta={META_INSTANCE_NAME: name, "version": "1.0.0", "max_concurrency": "4"},
    )


def heartbeats(backend: Backend) -> float:
    value = REGISTRY.get_sample_value(
        "hivewire_registry_heartbeats_total", {"backend": backend.kind}
    )
    return value or 0.0


# -- register / resolve / watch / deregister -------------------------------------------


async def test_register_resolve_deregister_across_clients(backend: Backend) -> None:
    planner = instance("planner", tags=("plan", "summarize"))
    async with backend.registry() as owner, backend.registry() as reader:
        assert await reader.resolve(SERVICE) == []
        await owner.register(planner)

        async def visible() -> None:
            found = await reader.resolve(SERVICE)
            assert found == [planner]

        await eventually(visible, timeout=SETTLE)
        (seen,) = await reader.resolve(SERVICE)
        assert seen.address == "127.0.0.1" and seen.port == planner.port
        assert seen.tags == ("plan", "summarize")
        assert dict(seen.meta)["version"] == "1.0.0"
        assert await reader.resolve("hivewire-model") == []

        await owner.deregister(planner.instance_id)

        async def gone() -> None:
            assert await reader.resolve(SERVICE) == []

        await eventually(gone, timeout=SETTLE)


async def test_watch_yields_current_set_then_every_change(backend: Backend) -> None:
    first = instance("first")
    second = instance("second")
    async with backend.registry() as owner, backend.registry() as watcher:
        await owner.register(first)
        watch = watcher.watch(SERVICE)
        try:

            async def current() -> None:
                assert ids(await watcher.resolve(SERVICE)) == [first.instance_id]

            await eventually(current, timeout=SETTLE)
            assert ids(await next_set(watch)) == [first.instance_id]
            before = heartbeats(backend)
            # Heartbeats rewrite entries without changing them; they must not be yielded.
            await eventually(lambda: heartbeats(backend) >= before + 2, timeout=SETTLE)
            await owner.register(second)
            assert ids(await next_set(watch)) == ids([first, second])
            await owner.deregister(first.instance_id)
            assert ids(await next_set(watch)) == [second.instance_id]
        finally:
            await watch.aclose()  # type: ignore[attr-defined]


async def test_health_transitions_serving_not_serving_serving(backend: Backend) -> None:
    worker = instance("worker", tags=("summarize",))
    async with backend.registry() as owner, backend.registry() as watcher:
        await owner.register(worker)
        watch = watcher.watch(SERVICE)
        try:
            first = await next_set(watch)
            if not first:
                first = await next_set(watch)
            assert ids(first) == [worker.instance_id]

            await owner.set_healthy(worker.instance_id, False)
            assert await next_set(watch) == []
            assert await watcher.resolve(SERVICE) == []
            assert await watcher.resolve(SERVICE, tag="summarize") == []

            await owner.set_healthy(worker.instance_id, True)
            assert ids(await next_set(watch)) == [worker.instance_id]
            assert ids(await watcher.resolve(SERVICE, tag="summarize")) == [worker.instance_id]
        finally:
            await watch.aclose()  # type: ignore[attr-defined]


async def test_two_instances_of_one_capability_and_resolve_by_tag(
    backend: Backend, tmp_path: Path
) -> None:
    procs = [
        backend.registrant(tmp_path, "sum-a", tags=("summarize",)),
        backend.registrant(tmp_path, "sum-b", tags=("summarize", "translate")),
        backend.registrant(tmp_path, "research", tags=("research",)),
    ]
    try:
        await asyncio.gather(*(p.start() for p in procs))
        sum_a, sum_b, research = (p.ports["instance_id"] for p in procs)
        async with backend.registry() as reader:

            async def all_three() -> None:
                assert ids(await reader.resolve(SERVICE)) == sorted([sum_a, sum_b, research])

            await eventually(all_three, timeout=SETTLE)
            assert ids(await reader.resolve(SERVICE, tag="summarize")) == sorted([sum_a, sum_b])
            assert ids(await reader.resolve(SERVICE, tag="translate")) == [sum_b]
            assert ids(await reader.resolve(SERVICE, tag="research")) == [research]
            assert await reader.resolve(SERVICE, tag="plan") == []
            ports = {i.instance_id: i.port for i in await reader.resolve(SERVICE)}
            assert ports[sum_a] == procs[0].port and ports[sum_b] == procs[1].port
    finally:
        for proc in procs:
            if proc.running:
                await proc.kill()


# -- process lifecycle -----------------------------------------------------------------


async def test_kill_9_of_a_registered_process_disappears_within_its_ttl(
    backend: Backend, tmp_path: Path
) -> None:
    doomed = backend.registrant(tmp_path, "doomed", tags=("summarize",))
    survivor = instance("survivor", tags=("summarize",))
    async with backend.registry() as reader:
        await reader.register(survivor)
        await doomed.start()
        try:
            doomed_id = doomed.ports["instance_id"]
            watch = reader.watch(SERVICE)
            try:
                both = sorted([doomed_id, survivor.instance_id])

                async def registered() -> None:
                    assert ids(await reader.resolve(SERVICE)) == both

                await eventually(registered, timeout=SETTLE)
                current = await next_set(watch)
                while ids(current) != both:
                    current = await next_set(watch)

                await doomed.kill()
                # Expiry (embedded) or a critical TTL check (Consul) removes it; the watch
                # reports it without anyone polling.
                after = await next_set(watch, within=TTL + SETTLE)
                assert ids(after) == [survivor.instance_id]
                assert ids(await reader.resolve(SERVICE, tag="summarize")) == [survivor.instance_id]
            finally:
                await watch.aclose()  # type: ignore[attr-defined]
        finally:
            if doomed.running:
                await doomed.kill()


async def test_restart_with_the_same_name_leaves_no_stale_instance(
    backend: Backend, tmp_path: Path
) -> None:
    # A long TTL: the stale entry would outlive the test unless the restart replaces it.
    long_ttl = 60.0
    first = backend.registrant(tmp_path, "agent-x", label="agent-x-1", ttl=long_ttl)
    second = backend.registrant(tmp_path, "agent-x", label="agent-x-2", ttl=long_ttl)
    other = backend.registrant(tmp_path, "agent-y", ttl=long_ttl)
    try:
        await first.start()
        await other.start()
        stale_id = first.ports["instance_id"]
        await first.kill()
        await second.start()
        fresh_id = second.ports["instance_id"]
        assert fresh_id != stale_id
        async with backend.registry(ttl=long_ttl) as reader:

            async def replaced() -> None:
                assert ids(await reader.resolve(SERVICE)) == sorted(
                    [fresh_id, other.ports["instance_id"]]
                )

            await eventually(replaced, timeout=SETTLE)
    finally:
        for proc in (first, second, other):
            if proc.running:
                await proc.kill()


async def test_replicas_of_one_agent_on_one_host_coexist_and_a_restart_replaces_itself(
    backend: Backend, tmp_path: Path
) -> None:
    # What `hivewire agent serve` registers: the agent's name in the instance id, no
    # explicit instance name, so replicas on one host differ only by port. A long TTL:
    # a stale entry would outlive the test unless the restart replaces it.
    long_ttl = 60.0
    port_a, port_b = reserved_port(), reserved_port()

    def replica(label: str, port: int) -> ServiceProcess:
        return backend.registrant(
            tmp_path,
            "summarizer",
            label=label,
            port=port,
            explicit_name=False,
            tags=("summarize",),
            ttl=long_ttl,
        )

    first, second, restarted = replica("a-1", port_a), replica("b", port_b), replica("a-2", port_a)
    try:
        await first.start()
        await second.start()
        first_id, second_id = first.ports["instance_id"], second.ports["instance_id"]
        assert first_id.startswith("summarizer-") and second_id.startswith("summarizer-")
        async with backend.registry(ttl=long_ttl) as reader:

            async def both() -> None:
                assert ids(await reader.resolve(SERVICE)) == sorted([first_id, second_id])
                assert ids(await reader.resolve(SERVICE, tag="summarize")) == sorted(
                    [first_id, second_id]
                )

            await eventually(both, timeout=SETTLE)

            # kill -9 of replica a, then a restart of it on the same host and port.
            await first.kill()
            await restarted.start()
            fresh_id = restarted.ports["instance_id"]

            async def replaced() -> None:
                assert ids(await reader.resolve(SERVICE)) == sorted([fresh_id, second_id])

            await eventually(replaced, timeout=SETTLE)
    finally:
        for proc in (first, second, restarted):
            if proc.running:
                await proc.kill()


async def test_graceful_stop_deregisters_at_once(backend: Backend, tmp_path: Path) -> None:
    proc = backend.registrant(tmp_path, "polite", ttl=60.0)
    await proc.start()
    try:
        polite_id = proc.ports["instance_id"]
        async with backend.registry(ttl=60.0) as reader:

            async def present() -> None:
                assert ids(await reader.resolve(SERVICE)) == [polite_id]

            await eventually(present, timeout=SETTLE)
            assert await proc.terminate() == 0

            async def absent() -> None:
                assert await reader.resolve(SERVICE) == []

            # Well within the 60 s TTL: deregistration, not expiry.
            await eventually(absent, timeout=SETTLE)
    finally:
        if proc.running:
            await proc.kill()


async def test_closing_the_registry_deregisters_and_ends_watches(backend: Backend) -> None:
    owner = backend.registry(ttl=60.0)
    await owner.start()
    leaving = instance("leaving")
    async with backend.registry(ttl=60.0) as watcher:
        await owner.register(leaving)
        watch = watcher.watch(SERVICE)
        current = await next_set(watch)
        while ids(current) != [leaving.instance_id]:
            current = await next_set(watch)
        await owner.close()
        assert await next_set(watch) == []

        own_watch = watcher.watch(SERVICE)
        assert await next_set(own_watch) == []
        await watcher.close()

        async def drained() -> None:
            async for _ in own_watch:
                pass

        async with asyncio.timeout(SETTLE):
            await drained()
        await watch.aclose()  # type: ignore[attr-defined]


# -- embedded backend: NATS outages ----------------------------------------------------


@pytest.fixture
def embedded(nats_server: NatsServer) -> Backend:
    """The embedded backend alone (Consul outages are in test_consul_backend.py)."""
    return _embedded(nats_server)


async def test_embedded_watch_survives_a_nats_restart(embedded: Backend) -> None:
    assert embedded.nats is not None
    before = instance("before")
    after = instance("after")
    async with embedded.registry() as owner, embedded.registry() as watcher:
        await owner.register(before)
        watch = watcher.watch(SERVICE)
        try:
            current = await next_set(watch)
            while ids(current) != [before.instance_id]:
                current = await next_set(watch)
            await embedded.nats.restart()
            await owner.register(after)
            # The watch rebuilt itself after the reconnect: no exception, and it sees both.
            current = await next_set(watch)
            while ids(current) != ids([before, after]):
                current = await next_set(watch)
        finally:
            await watch.aclose()  # type: ignore[attr-defined]


async def test_embedded_registration_during_an_outage_lands_when_nats_is_back(
    embedded: Backend,
) -> None:
    assert embedded.nats is not None
    late = instance("late")
    async with embedded.registry(request_timeout=1.0) as owner:
        await embedded.nats.stop()
        with pytest.raises(RegistryUnavailableError):
            await owner.resolve(SERVICE)
        await owner.register(late)  # must not raise: retried in the background
        await embedded.nats.start()
        async with embedded.registry() as reader:

            async def landed() -> None:
                assert ids(await reader.resolve(SERVICE)) == [late.instance_id]

            await eventually(landed, timeout=SETTLE)
