"""The Node.js client in examples/node against a real mesh over mTLS.

Real processes: nats-server, the coordinator and the calculator example agent (embedded
NATS registry, ephemeral ports), and ``node submit.js`` with its locked npm dependencies
(``npm ci``), loading the contracts straight from proto/.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import pytest_asyncio

from hivewire.common.v1 import common_pb2
from hivewire.coordinator.v1 import coordinator_pb2, coordinator_pb2_grpc
from hivewire.services.runtime.channels import secure_channel
from hivewire.services.runtime.tls import TlsFiles
from tests.conftest import Pki
from tests.helpers import NatsServer, ServiceProcess, dead_address
from tests.support.e2e_mesh import (
    CALCULATOR,
    REPO_ROOT,
    agent_process,
    coordinator_process,
    wait_for_agents,
)
from tests.support.node import install_example, run_command

pytestmark = [pytest.mark.asyncio(loop_scope="module"), pytest.mark.timeout(120)]

EXAMPLE = REPO_ROOT / "examples" / "node"
PROTO = REPO_ROOT / "proto"
EVENT_LINE = re.compile(r"^#(\d+) (\w+)")


@dataclass(frozen=True)
class NodeResult:
    returncode: int
    stdout: str
    stderr: str

    def events(self) -> list[tuple[int, str, str]]:
        """(sequence, kind, rest of the line) of every event line printed."""
        found = []
        for line in self.stdout.splitlines():
            match = EVENT_LINE.match(line)
            if match:
                found.append((int(match[1]), match[2], line[match.end() :].strip()))
        return found

    def __str__(self) -> str:
        return f"exit {self.returncode}\n--- stdout\n{self.stdout}\n--- stderr\n{self.stderr}"


@dataclass
class NodeClient:
    """``examples/node`` installed in a scratch directory."""

    dir: Path

    async def run(self, *args: str, cwd: Path | None = None, timeout: float = 60) -> NodeResult:
        # No endpoints file of the developer's own mesh may leak into a test.
        env = {k: v for k, v in os.environ.items() if not k.startswith("HIVEWIRE_")}
        code, stdout, stderr = await run_command(
            "node", str(self.dir / "submit.js"), "--proto", str(PROTO), *args,
            cwd=cwd or self.dir,
            env=env,
            timeout=timeout,
        )  # fmt: skip
        return NodeResult(code, stdout, stderr)


@pytest.fixture(scope="module")
def node_client(tmp_path_factory: pytest.TempPathFactory) -> NodeClient:
    """A copy of the example with its locked dependencies installed (``npm ci``)."""
    files = ("package.json", "package-lock.json", "submit.js")
    return NodeClient(
        install_example(tmp_path_factory, EXAMPLE, files, what="Node.js client example")
    )


@dataclass
class Mesh:
    pki: Pki
    coordinator: ServiceProcess
    client: coordinator_pb2_grpc.CoordinatorServiceAsyncStub

    @property
    def address(self) -> str:
        return self.coordinator.address

    def tls_flags(self, files: TlsFiles) -> list[str]:
        return ["--ca", str(files.ca), "--cert", str(files.cert), "--key", str(files.key)]

    async def task_count(self) -> int:
        response = await self.client.ListTasks(
            coordinator_pb2.ListTasksRequest(page_size=500), timeout=10
        )
        return len(response.tasks)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def mesh(pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Mesh]:
    workdir = tmp_path_factory.mktemp("node-mesh")
    async with contextlib.AsyncExitStack() as stack:
        nats = await stack.enter_async_context(NatsServer(workdir / "nats"))
        coordinator = await stack.enter_async_context(
            coordinator_process(
                workdir, certs_dir=pki.dir, nats_url=nats.url, db_path=workdir / "c.db"
            )
        )
        agent = agent_process(
            workdir, CALCULATOR, name="calculator", certs_dir=pki.dir, nats_url=nats.url
        )
        await agent.start()
        stack.push_async_callback(agent.terminate)
        channel = secure_channel(coordinator.address, pki.files("client"))
        stack.push_async_callback(channel.close)
        client: coordinator_pb2_grpc.CoordinatorServiceAsyncStub = (
            coordinator_pb2_grpc.CoordinatorServiceStub(channel)
        )
        await wait_for_agents(client, 1)
        yield Mesh(pki, coordinator, client)


async def test_streams_a_task_to_success_over_mtls(mesh: Mesh, node_client: NodeClient) -> None:
    result = await node_client.run(
        "--address", mesh.address, *mesh.tls_flags(mesh.pki.files("client")),
        "--capability", "calculate", "--text", "1 + 2; 6 * 7",
    )  # fmt: skip
    assert result.returncode == 0, result
    assert result.stderr == "", result  # no warnings either (TLS SNI, proto includes)
    events = result.events()
    assert events[0][1] == "snapshot", result
    assert events[-1][1:] == ("finished", "SUCCEEDED"), result
    # The stored events after the snapshot are numbered without gaps.
    sequences = [seq for seq, _, _ in events[1:]]
    assert sequences == list(range(sequences[0], sequences[0] + len(sequences))), result
    progress = [rest for _, kind, rest in events if kind == "progress"]
    assert any("evaluate: 6 * 7 = 42" in p for p in progress), result
    assert result.stdout.splitlines()[-2:] == ["1 + 2 = 3", "6 * 7 = 42"], result

    # The coordinator agrees with what the client printed.
    task_id = events[0][2].split()[1]
    task = (
        await mesh.client.GetTask(coordinator_pb2.GetTaskRequest(task_id=task_id), timeout=10)
    ).task
    assert task.state == common_pb2.TASK_STATE_SUCCEEDED
    assert task.spec.capability == "calculate" and task.spec.input.text == "1 + 2; 6 * 7"
    assert task.owner == mesh.pki.spiffe_id("client")


async def test_runs_a_plan_and_prints_its_step_events(mesh: Mesh, node_client: NodeClient) -> None:
    plan = REPO_ROOT / "examples" / "plans" / "fan-out.json"
    result = await node_client.run(
        "--address", mesh.address, *mesh.tls_flags(mesh.pki.files("client")),
        "--plan", str(plan),
    )  # fmt: skip
    assert result.returncode == 0, result
    events = result.events()
    steps = [rest for _, kind, rest in events if kind == "step"]
    for step_id in ("powers", "products", "check"):
        assert any(s.startswith(f"{step_id} started QUEUED") for s in steps), result
        assert any(s.startswith(f"{step_id} finished SUCCEEDED") for s in steps), result
    assert events[-1][1:] == ("finished", "SUCCEEDED"), result
    output = json.loads(result.stdout.splitlines()[-1])
    assert output["check"]["text"] == "256 + 1024 = 1280", result


async def test_reads_address_and_certificates_from_endpoints_json(
    mesh: Mesh, node_client: NodeClient, tmp_path: Path
) -> None:
    files = mesh.pki.files("client")
    state = tmp_path / ".hivewire"
    state.mkdir()
    (state / "endpoints.json").write_text(
        json.dumps(
            {
                "services": {"coordinator": {"kind": "coordinator", "address": mesh.address}},
                "tls": {"ca": str(files.ca), "cert": str(files.cert), "key": str(files.key)},
            }
        )
    )
    # No connection flags at all: found as .hivewire/endpoints.json in the working directory.
    result = await node_client.run(
        "--capability", "calculate", "--json", '{"expressions": ["2 ** 10"]}', cwd=tmp_path
    )  # fmt: skip
    assert result.returncode == 0, result
    assert result.stdout.splitlines()[-1] == "2 ** 10 = 1024", result


async def test_fails_over_from_a_dead_coordinator_to_the_next(
    mesh: Mesh, node_client: NodeClient
) -> None:
    with dead_address() as dead:
        result = await node_client.run(
            "--address", f"{dead},{mesh.address}", *mesh.tls_flags(mesh.pki.files("client")),
            "--capability", "calculate", "--text", "6 * 7",
        )  # fmt: skip
    assert result.returncode == 0, result
    assert result.stderr == f"coordinator {dead} unreachable; trying the next one\n", result
    assert result.events()[-1][1:] == ("finished", "SUCCEEDED"), result
    assert result.stdout.splitlines()[-1] == "6 * 7 = 42", result


async def test_takes_the_coordinator_list_of_endpoints_json(
    mesh: Mesh, node_client: NodeClient, tmp_path: Path
) -> None:
    files = mesh.pki.files("client")
    with dead_address() as dead:
        (tmp_path / "endpoints.json").write_text(
            json.dumps(
                {
                    "services": {"coordinator": {"address": dead}},
                    "coordinators": [dead, mesh.address],
                    "tls": {"ca": str(files.ca), "cert": str(files.cert), "key": str(files.key)},
                }
            )
        )
        result = await node_client.run(
            "--endpoints", str(tmp_path / "endpoints.json"),
            "--capability", "calculate", "--text", "2 + 2",
        )  # fmt: skip
    assert result.returncode == 0, result
    assert f"coordinator {dead} unreachable" in result.stderr, result
    assert result.stdout.splitlines()[-1] == "2 + 2 = 4", result


async def test_when_no_coordinator_connects_the_call_says_unavailable(
    mesh: Mesh, node_client: NodeClient
) -> None:
    before = await mesh.task_count()
    with dead_address() as first, dead_address() as second:
        result = await node_client.run(
            "--address", f"{first},{second}", *mesh.tls_flags(mesh.pki.files("client")),
            "--capability", "calculate", "--text", "1 + 1",
        )  # fmt: skip
    assert result.returncode == 2, result
    lines = result.stderr.strip().splitlines()
    assert lines[:2] == [
        f"coordinator {first} unreachable; trying the next one",
        f"coordinator {second} unreachable; trying the next one",
    ], result
    assert len(lines) == 3 and lines[2].startswith("error: UNAVAILABLE"), result
    assert await mesh.task_count() == before


async def test_a_failed_task_exits_non_zero(mesh: Mesh, node_client: NodeClient) -> None:
    result = await node_client.run(
        "--address", mesh.address, *mesh.tls_flags(mesh.pki.files("client")),
        "--capability", "calculate", "--text", "1 / 0",
    )  # fmt: skip
    assert result.returncode == 1, result
    assert result.events()[-1][1:] == ("finished", "FAILED DIVISION_BY_ZERO: division by zero")


async def test_without_a_client_certificate_the_mesh_refuses(
    mesh: Mesh, node_client: NodeClient
) -> None:
    before = await mesh.task_count()
    ca = str(mesh.pki.files("client").ca)
    result = await node_client.run(
        "--address", mesh.address, "--ca", ca, "--capability", "calculate", "--text", "1 + 1"
    )  # fmt: skip
    assert result.returncode == 2, result
    assert result.events() == [], result
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result
    assert lines[0].startswith("error: UNAVAILABLE"), result
    assert "no client certificate" in lines[0] and "hivewire certs issue" in lines[0], result
    assert await mesh.task_count() == before


async def test_a_certificate_from_another_ca_is_refused(
    mesh: Mesh, node_client: NodeClient, foreign_pki: Pki
) -> None:
    before = await mesh.task_count()
    foreign = foreign_pki.files("client")
    result = await node_client.run(
        "--address", mesh.address,
        "--ca", str(mesh.pki.files("client").ca), "--cert", str(foreign.cert),
        "--key", str(foreign.key),
        "--capability", "calculate", "--text", "1 + 1",
    )  # fmt: skip
    assert result.returncode == 2, result
    assert re.fullmatch(r"error: UNAVAILABLE: .+\n", result.stderr), result
    assert "refused the TLS handshake" in result.stderr, result
    assert await mesh.task_count() == before


async def test_mesh_errors_are_one_line_with_code_and_reason(
    mesh: Mesh, node_client: NodeClient
) -> None:
    result = await node_client.run(
        "--address", mesh.address, *mesh.tls_flags(mesh.pki.files("client")),
        "--capability", "Not A Capability", "--text", "x",
    )  # fmt: skip
    assert result.returncode == 2, result
    assert result.events() == [], result
    match = re.fullmatch(r"error: ([A-Z_]+) ([A-Z_]+): (.+)\n", result.stderr)
    assert match, result
    assert match[1] == "INVALID_ARGUMENT", result
