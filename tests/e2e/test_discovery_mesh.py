"""Discovery end to end: real processes over mTLS find each other through the registry.

* Embedded registry (NATS KV, short TTL from the discovery URL): a mesh of a coordinator
  and three agents (two replicas of one agent on one host, plus the calculator); a fourth
  agent with a capability nobody else has joins later and runs a task; after ``kill -9``
  its capability's tasks wait QUEUED (nothing fails) and ``ListAgents`` / ``hivewire
  agents`` stop showing it once its TTL passed; started again, it runs them all.
* Consul (the stand-in, with ACLs and mTLS gRPC checks): ``HIVEWIRE_DISCOVERY`` and
  ``HIVEWIRE_CONSUL_TOKEN`` in the environment of the launcher ``hivewire up`` uses (the
  coordinator) and of a single service (an agent) switch both to Consul, with no NATS
  anywhere. A task completes; a hung agent (SIGSTOP) turns critical and is dropped from
  selection, its task waits QUEUED and runs once the agent resumes.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from hivewire.common.v1 import common_pb2
from hivewire.coordinator.v1 import coordinator_pb2, coordinator_pb2_grpc
from hivewire.services.mesh.launcher import Launcher, ProcessSpec, python_module
from hivewire.services.runtime.channels import secure_channel
from tests.conftest import Pki
from tests.helpers import NatsServer, ServiceProcess, eventually, free_port
from tests.support.consul_standin import AclToken, ConsulStandin, Timing
from tests.support.coordinator_mesh import spec
from tests.support.e2e_mesh import (
    CALCULATOR,
    PACED,
    REPO_ROOT,
    agent_process,
    coordinator_process,
    wait_for_agents,
)

pytestmark = pytest.mark.timeout(180)

S = common_pb2
C = coordinator_pb2
if TYPE_CHECKING:
    # Only the .pyi declares the async stub type.
    Stub = coordinator_pb2_grpc.CoordinatorServiceAsyncStub

REVERSER = "tests.support.discovery_agents:ReverserAgent"
HIVEWIRE = str(Path(sys.executable).parent / "hivewire")
# Registry TTL of the embedded test: a killed agent is gone within it.
TTL = "3s"
# Bounds for eventually(): a TTL plus heartbeat, expiry-marker and scheduling slack on a
# loaded 2-core machine. They bound waits; nothing asserts how long anything took.
SETTLE = 30.0


@contextlib.asynccontextmanager
async def coordinator_client(pki: Pki, address: str) -> AsyncIterator[Stub]:
    channel = secure_channel(address, pki.files("client"))
    try:
        stub: Stub = coordinator_pb2_grpc.CoordinatorServiceStub(channel)
        yield stub
    finally:
        await channel.close()


def reverser_process(
    workdir: Path, *, certs_dir: Path, discovery: str, env: dict[str, str] | None = None
) -> ServiceProcess:
    """The fourth agent, with its own discovery URL in its environment."""
    return ServiceProcess(
        "hivewire.services.agent",
        REVERSER,
        "--name",
        "reverser",
        "--identity",
        "agent",
        workdir=workdir,
        name="reverser",
        certs_dir=certs_dir,
        env={
            "HIVEWIRE_DISCOVERY": discovery,
            "HIVEWIRE_GRACE_PERIOD": "2",
            "PYTHONPATH": str(REPO_ROOT),
            **(env or {}),
        },
    )


async def agents_with(client: Stub, capability: str) -> list[C.AgentStatus]:
    response = await client.ListAgents(C.ListAgentsRequest(capability=capability), timeout=5)
    return list(response.agents)


async def state_of(client: Stub, task_id: str) -> C.Task:
    return (await client.GetTask(C.GetTaskRequest(task_id=task_id), timeout=5)).task


async def finished(client: Stub, task_id: str) -> C.Task:
    """Follow a task to its end; returns the final task."""
    async with asyncio.timeout(SETTLE * 2):
        events = [r.event async for r in client.WatchTask(C.WatchTaskRequest(task_id=task_id))]
    assert events[-1].HasField("finished"), events[-1]
    return await state_of(client, task_id)


async def hivewire_agents(pki: Pki, address: str, *args: str) -> str:
    """``hivewire agents`` as a user runs it; returns stdout."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("HIVEWIRE_")}
    env["HIVEWIRE_CERTS_DIR"] = str(pki.dir)
    proc = await asyncio.create_subprocess_exec(
        HIVEWIRE,
        "agents",
        *args,
        "--address",
        address,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env,
    )
    async with asyncio.timeout(60):
        out, err = await proc.communicate()
    assert proc.returncode == 0, err.decode()
    return out.decode()


# -- embedded registry -----------------------------------------------------------------


async def test_an_agent_with_a_new_capability_joins_dies_and_comes_back(
    pki: Pki, tmp_path: Path
) -> None:
    async with contextlib.AsyncExitStack() as stack:
        # The mesh's NATS as `hivewire up` serves it: mTLS and per-identity permissions.
        nats = await stack.enter_async_context(NatsServer(tmp_path / "nats", certs_dir=pki.dir))
        # The first registry client creates the bucket and fixes its TTL; the others
        # (plain "nats") adopt it.
        discovery = f"nats?ttl={TTL}"
        coordinator = await stack.enter_async_context(
            coordinator_process(
                tmp_path,
                certs_dir=pki.dir,
                nats_url=nats.url,
                db_path=tmp_path / "c.db",
                env={"HIVEWIRE_DISCOVERY": discovery},
            )
        )
        # Two replicas of one agent on one host (same name, different ports) and the
        # calculator: the mesh before anything joins.
        base = [
            agent_process(
                tmp_path / f"replica-{i}", PACED, name="paced", certs_dir=pki.dir, nats_url=nats.url
            )
            for i in (1, 2)
        ]
        base.append(
            agent_process(
                tmp_path, CALCULATOR, name="calculator", certs_dir=pki.dir, nats_url=nats.url
            )
        )
        await asyncio.gather(*(a.start() for a in base))
        for agent in base:
            stack.push_async_callback(agent.terminate)
        client = await stack.enter_async_context(coordinator_client(pki, coordinator.address))
        mesh = await wait_for_agents(client, 3)
        replicas = [a for a in mesh if a.card.name == "paced"]
        assert len({a.address for a in replicas}) == 2, replicas
        assert await agents_with(client, "reverse") == []

        # A fourth agent with a new capability joins the running mesh.
        reverser = reverser_process(
            tmp_path / "reverser",
            certs_dir=pki.dir,
            discovery=discovery,
            env={"HIVEWIRE_NATS_URL": nats.url},
        )
        await reverser.start()
        stack.push_async_callback(reverser.kill)

        async def joined() -> C.AgentStatus:
            found = await agents_with(client, "reverse")
            assert len(found) == 1, found
            assert found[0].health == C.AGENT_HEALTH_HEALTHY
            return found[0]

        first = await eventually(joined, timeout=SETTLE)
        assert first.address == reverser.address
        assert first.card.name == "reverser"
        # What `hivewire agents` prints is what the registry sees.
        table = await hivewire_agents(pki, coordinator.address, "--capability", "reverse")
        rows = [line for line in table.splitlines() if first.agent_id in line]
        assert len(rows) == 1, table
        row = rows[0]
        for shown in ("reverser", "healthy", "0/4", reverser.address, "reverse"):
            assert shown in row, (shown, table)

        call = client.StreamTask(C.StreamTaskRequest(spec=spec("reverse", text="hivewire")))
        events = [r.event async for r in call]
        assert events[-1].finished.state == S.TASK_STATE_SUCCEEDED
        assert events[-1].finished.output.json["reversed"] == "eriwevih"
        assert int(events[-1].finished.output.json["pid"]) == reverser.pid

        # kill -9: no deregistration; the entry expires with its TTL.
        await reverser.kill()

        async def gone() -> None:
            assert await agents_with(client, "reverse") == []

        await eventually(gone, timeout=SETTLE)
        table = await hivewire_agents(pki, coordinator.address)
        assert first.agent_id not in table and "paced" in table

        waiting = [
            (
                await client.SubmitTask(
                    C.SubmitTaskRequest(spec=spec("reverse", text=f"task-{i}")), timeout=5
                )
            ).task.task_id
            for i in range(3)
        ]
        # Other capabilities keep flowing meanwhile; the waiting tasks are still QUEUED
        # after it, not failed and never attempted.
        other = await client.SubmitTask(C.SubmitTaskRequest(spec=spec("count")), timeout=5)
        done = await finished(client, other.task.task_id)
        assert done.state == S.TASK_STATE_SUCCEEDED
        for task_id in waiting:
            task = await state_of(client, task_id)
            assert task.state == S.TASK_STATE_QUEUED, task
            assert task.attempt == 0 and not task.attempts

        # The same agent comes back (a new process, a new instance): the queue drains.
        await reverser.start()
        second: C.AgentStatus = await eventually(joined, timeout=SETTLE)
        assert second.agent_id != first.agent_id
        for i, task_id in enumerate(waiting):
            task = await finished(client, task_id)
            assert task.state == S.TASK_STATE_SUCCEEDED, task
            assert task.output.json["reversed"] == f"task-{i}"[::-1]
            assert int(task.output.json["pid"]) == reverser.pid
            assert [a.agent_id for a in task.attempts] == [second.agent_id]


# -- Consul ----------------------------------------------------------------------------

CONSUL_TOKEN = "hivewire-e2e-writer"


@pytest.fixture
async def consul(pki: Pki) -> AsyncIterator[ConsulStandin]:
    """A Consul agent with ACLs (default deny) that runs mTLS gRPC checks with a mesh cert."""
    files = pki.issue(role="consul", name="agent", stem="consul-agent-e2e")
    token = AclToken(CONSUL_TOKEN, service_prefix={"hivewire-": "write"}, node_prefix={"": "read"})
    async with ConsulStandin(
        timing=Timing(min_interval=0.2),
        acl_default_policy="deny",
        acl_tokens=[token],
        agent_tls_for_checks=files,
    ) as standin:
        yield standin


async def test_hivewire_discovery_consul_switches_the_services_to_consul(
    pki: Pki, tmp_path: Path, consul: ConsulStandin, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Short blocking queries: the stand-in's handler of a dead client's long poll only
    # ends with its wait, and the stand-in's shutdown waits for it.
    discovery = (
        f"consul://{consul.address}?checks=ttl,grpc&ttl=2s&grpc_interval=500ms"
        "&watch_interval=100ms&wait=2s"
    )
    # Nothing listens there: events are off and discovery must not touch NATS.
    no_nats = f"nats://127.0.0.1:{free_port()}"
    consul_env = {
        "HIVEWIRE_DISCOVERY": discovery,
        "HIVEWIRE_CONSUL_TOKEN": CONSUL_TOKEN,
        "HIVEWIRE_EVENTS__ENABLED": "false",
        "HIVEWIRE_NATS_URL": no_nats,
    }
    # `HIVEWIRE_DISCOVERY=consul://... hivewire up`: the launcher's own environment.
    for key in [k for k in os.environ if k.startswith("HIVEWIRE_")]:
        monkeypatch.delenv(key)
    for key, value in {**consul_env, "HIVEWIRE_CERTS_DIR": str(pki.dir)}.items():
        monkeypatch.setenv(key, value)
    agent = reverser_process(
        tmp_path / "reverser", certs_dir=pki.dir, discovery=discovery, env=consul_env
    )
    async with Launcher(grace_period=10.0) as launcher:
        ports_file = tmp_path / "coordinator.ports.json"
        coordinator = await launcher.start(
            ProcessSpec(
                name="coordinator",
                argv=python_module("hivewire.services.coordinator"),
                log_file=tmp_path / "coordinator.log",
                ports_file=ports_file,
                env={
                    "HIVEWIRE_PORT": "0",
                    "HIVEWIRE_METRICS_PORT": "0",
                    "HIVEWIRE_IDENTITY": "coordinator",
                    "HIVEWIRE_PORTS_FILE": str(ports_file),
                    "HIVEWIRE_GRACE_PERIOD": "2",
                    "HIVEWIRE_COORDINATOR__DB_PATH": str(tmp_path / "c.db"),
                },
            )
        )
        # A single service with the settings in its own environment.
        await agent.start()
        try:
            async with coordinator_client(pki, coordinator.ports["address"]) as client:
                (status,) = await wait_for_agents(client, 1)
                agent_id = status.agent_id
                assert status.address == agent.address
                # Both registered in Consul, the agent with a passing mTLS gRPC check.
                (coordinator_id,) = consul.service_ids("hivewire-coordinator")
                assert consul.service_ids("hivewire-agent") == [agent_id]
                await consul.wait_for(
                    lambda c: all(
                        c.check_status(f"{kind}:{sid}") == "passing"
                        for kind in ("ttl", "grpc")
                        for sid in (agent_id, coordinator_id)
                    ),
                    within=SETTLE,
                )
                definition = consul.check_definition(f"grpc:{agent_id}") or {}
                assert definition.get("GRPCUseTLS") is True, definition

                call = client.StreamTask(C.StreamTaskRequest(spec=spec("reverse", text="consul")))
                events = [r.event async for r in call]
                assert events[-1].finished.state == S.TASK_STATE_SUCCEEDED
                assert events[-1].finished.output.json["reversed"] == "lusnoc"

                # A hung agent: its checks turn critical, the coordinator stops routing
                # to it at once (it stays registered: not reaped, not deregistered).
                os.kill(agent.pid, signal.SIGSTOP)
                try:

                    async def dropped() -> None:
                        assert await agents_with(client, "reverse") == []

                    await eventually(dropped, timeout=SETTLE)
                    assert consul.service_ids("hivewire-agent") == [agent_id]
                    assert consul.check_status(f"ttl:{agent_id}") == "critical"
                    queued = await client.SubmitTask(
                        C.SubmitTaskRequest(spec=spec("reverse", text="later")), timeout=5
                    )
                    task = await state_of(client, queued.task.task_id)
                    assert task.state == S.TASK_STATE_QUEUED and not task.attempts
                finally:
                    os.kill(agent.pid, signal.SIGCONT)
                task = await finished(client, queued.task.task_id)
                assert task.state == S.TASK_STATE_SUCCEEDED, task
                assert task.output.json["reversed"] == "retal"
                assert [a.agent_id for a in task.attempts] == [agent_id]

                # SIGTERM deregisters from Consul at once.
                assert await agent.terminate() == 0
                assert consul.service_ids("hivewire-agent") == []
        finally:
            if agent.running:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(agent.pid, signal.SIGCONT)
                await agent.kill()
    assert consul.service_ids("hivewire-coordinator") == []
