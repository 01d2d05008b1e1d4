"""Real processes for end-to-end coordinator tests: nats-server, coordinator, agents."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from hivewire.coordinator.v1 import coordinator_pb2, coordinator_pb2_grpc
from tests.helpers import ServiceProcess, eventually

REPO_ROOT = Path(__file__).resolve().parents[2]

PACED = "tests.support.e2e_agents:PacedAgent"
CALCULATOR = "hivewire.services.agent.examples.calculator:CalculatorAgent"


MESH_ENV = {"HIVEWIRE_DISCOVERY": "nats", "HIVEWIRE_GRACE_PERIOD": "2"}
"""What every mesh process of these tests shares: the embedded registry, a short grace."""


def mesh_process(
    module: str,
    *args: str,
    workdir: Path,
    certs_dir: Path,
    nats_url: str,
    identity: str | None = None,
    name: str | None = None,
    env: Mapping[str, str] | None = None,
) -> ServiceProcess:
    """``python -m <module> <args>`` as a mesh member: ephemeral ports, the embedded
    registry on ``nats_url``, a 2 s grace period; ``env`` wins over those.
    """
    return ServiceProcess(
        module,
        *args,
        workdir=workdir,
        name=name,
        certs_dir=certs_dir,
        identity=identity,
        nats_url=nats_url,
        env={**MESH_ENV, **(env or {})},
    )


def coordinator_process(
    workdir: Path,
    *,
    certs_dir: Path,
    nats_url: str,
    db_path: Path,
    env: Mapping[str, str] | None = None,
) -> ServiceProcess:
    """``python -m hivewire.services.coordinator`` on an ephemeral port, embedded discovery."""
    return mesh_process(
        "hivewire.services.coordinator",
        workdir=workdir,
        certs_dir=certs_dir,
        identity="coordinator",
        nats_url=nats_url,
        env={
            "HIVEWIRE_COORDINATOR__DB_PATH": str(db_path),
            "HIVEWIRE_COORDINATOR__RETRY_INITIAL_BACKOFF": "0.05",
            "HIVEWIRE_COORDINATOR__RETRY_MAX_BACKOFF": "0.2",
            **(env or {}),
        },
    )


def agent_process(
    workdir: Path,
    target: str,
    *,
    name: str,
    certs_dir: Path,
    nats_url: str,
    max_concurrency: int | None = None,
) -> ServiceProcess:
    """``python -m hivewire.services.agent <target>`` registered in the embedded registry."""
    args = [target, "--name", name, "--identity", "agent"]
    if max_concurrency is not None:
        args += ["--max-concurrency", str(max_concurrency)]
    return mesh_process(
        "hivewire.services.agent",
        *args,
        workdir=workdir,
        name=name,
        certs_dir=certs_dir,
        nats_url=nats_url,
        # The agent modules of the tests live in this repository.
        env={"PYTHONPATH": str(REPO_ROOT)},
    )


async def wait_for_agents(
    stub: coordinator_pb2_grpc.CoordinatorServiceAsyncStub, count: int, *, timeout: float = 30.0
) -> list[coordinator_pb2.AgentStatus]:
    """Wait until the coordinator routes to ``count`` healthy agents."""

    async def ready() -> list[coordinator_pb2.AgentStatus]:
        response = await stub.ListAgents(coordinator_pb2.ListAgentsRequest(), timeout=5)
        healthy = [a for a in response.agents if a.health == coordinator_pb2.AGENT_HEALTH_HEALTHY]
        assert len(healthy) >= count, [a.agent_id for a in healthy]
        return healthy

    result: list[coordinator_pb2.AgentStatus] = await eventually(
        ready, timeout=timeout, interval=0.1, retry_on=(AssertionError, Exception)
    )
    return result
