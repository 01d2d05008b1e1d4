"""`hivewire up --coordinators 3 --store jetstream`: the HA shape on one machine.

One mesh per module (real processes: nats-server with JetStream, three coordinators
on their own ports sharing the JetStream task store, model, tool, the calculator
agent), driven with the `hivewire` CLI: through each coordinator, through a list whose
first address is dead, and through the registry (``--address discovery``). A
coordinator killed with SIGKILL is restarted by the launcher while the others keep
serving, and finds the tasks of before in JetStream; Ctrl-C stops everything.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from hivewire.common.v1 import common_pb2
from hivewire.coordinator.v1 import coordinator_pb2, coordinator_pb2_grpc
from hivewire.services.runtime.channels import secure_channel
from tests.helpers import dead_address, eventually, grpcurl
from tests.support.e2e_mesh import REPO_ROOT
from tests.support.node import install_example
from tests.support.up_mesh import HIVEWIRE, RunningMesh, hivewire_up

pytestmark = pytest.mark.timeout(300)

COORDINATORS = 3
NODE_EXAMPLE = REPO_ROOT / "examples" / "node"
NODE_LINE = re.compile(r"^#(\d+) (\w+) ?(.*)$")


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningMesh]:
    args = ["--store", "jetstream", "--coordinators", str(COORDINATORS)]
    args += ["--agent", "calculator", "--no-demo"]
    with hivewire_up(tmp_path_factory.mktemp("ha"), args=args) as running:
        yield running


@pytest.fixture(scope="module")
def node_client(tmp_path_factory: pytest.TempPathFactory) -> Path:
    files = ("package.json", "package-lock.json", "submit.js")
    return install_example(tmp_path_factory, NODE_EXAMPLE, files, what="Node.js client example")


async def _provide_input(
    mesh: RunningMesh, address: str, task_id: str, request_id: str, value: str
) -> None:
    channel = secure_channel(address, mesh.tls)
    try:
        stub = coordinator_pb2_grpc.CoordinatorServiceStub(channel)
        await stub.ProvideInput(
            coordinator_pb2.ProvideInputRequest(
                task_id=task_id,
                response=common_pb2.InputResponse(
                    request_id=request_id, value=common_pb2.Payload(text=value)
                ),
            ),
            timeout=30,
        )
    finally:
        await channel.close()


def _endpoints(mesh: RunningMesh) -> dict[str, object]:
    data: dict[str, object] = json.loads((mesh.state_dir / "endpoints.json").read_text())
    return data


async def _hivewire(mesh: RunningMesh, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    full_env = {**mesh.clean_env(), "HIVEWIRE_CERTS_DIR": str(mesh.root / "certs"), **env}
    return await asyncio.to_thread(
        subprocess.run,
        [HIVEWIRE, *args],
        capture_output=True,
        text=True,
        env=full_env,
        timeout=120,
    )


def test_endpoints_list_every_coordinator_and_the_store(mesh: RunningMesh) -> None:
    assert "task store: jetstream" in mesh.output()
    names = ["coordinator", *(f"coordinator-{i}" for i in range(2, COORDINATORS + 1))]
    services = mesh.endpoints["services"]
    assert [n for n in services if n.startswith("coordinator")] == names
    assert mesh.endpoints["coordinators"] == [services[n]["address"] for n in names]
    assert mesh.endpoints["store"] == "jetstream"
    assert len(set(mesh.endpoints["coordinators"])) == COORDINATORS


async def test_a_task_submitted_to_one_coordinator_is_watched_through_another(
    mesh: RunningMesh,
) -> None:
    first, second, third = mesh.endpoints["coordinators"]
    submitted = await _hivewire(
        mesh, "submit", "--detach", "--address", second, "calculate", "3 * 3"
    )
    assert submitted.returncode == 0, submitted
    task_id = submitted.stdout.strip()
    watched = await _hivewire(mesh, "watch", task_id, "--address", third)
    assert watched.returncode == 0, watched
    assert watched.stdout.strip().endswith("3 * 3 = 9"), watched
    shown = await _hivewire(mesh, "tasks", "--address", first)
    assert shown.returncode == 0 and task_id in shown.stdout, shown


async def test_a_followed_task_resumes_on_the_next_coordinator_when_its_own_dies(
    mesh: RunningMesh,
) -> None:
    first, second, third = mesh.endpoints["coordinators"]
    # A task that waits for input (the value of p) stays open while its watcher's
    # coordinator is killed.
    submitted = await _hivewire(
        mesh, "submit", "--detach", "--address", first,
        "solve", "--input-json", '{"expression": "p * 7"}',
    )  # fmt: skip
    assert submitted.returncode == 0, submitted
    task_id = submitted.stdout.strip()
    env = {**mesh.clean_env(), "HIVEWIRE_CERTS_DIR": str(mesh.root / "certs")}
    # Two watchers on the same coordinator: every event, and the outcome only.
    watcher, brief = [
        await asyncio.create_subprocess_exec(
            HIVEWIRE,
            "watch",
            task_id,
            "--json",
            "--no-input",
            *flags,
            "--address",
            f"{second},{third}",
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=env,
        )  # fmt: skip
        for flags in ((), ("--outcome-only",))
    ]
    shown: list[dict[str, Any]] = []
    brief_shown: list[dict[str, Any]] = []
    async with asyncio.timeout(60):
        for process, events in ((watcher, shown), (brief, brief_shown)):
            assert process.stdout is not None
            while not any("inputRequired" in event for event in events):
                line = await process.stdout.readline()
                assert line, "the watcher ended before the input request"
                events.append(json.loads(line))
    request_id = shown[-1]["inputRequired"]["requestId"]
    dead_pid = mesh.endpoints["services"]["coordinator-2"]["pid"]
    os.kill(dead_pid, signal.SIGKILL)

    await _provide_input(mesh, first, task_id, request_id, "6")
    async with asyncio.timeout(120):
        rest, errors = await watcher.communicate()
    assert watcher.returncode == 0, errors.decode()
    shown += [json.loads(line) for line in rest.decode().splitlines()]
    assert f"following task {task_id} on {third} after event #" in errors.decode()
    # Every event once, in order, no gap: the snapshot, then consecutive sequences.
    assert "snapshot" in shown[0]
    sequences = [int(event["sequence"]) for event in shown[1:]]
    assert sequences == list(range(sequences[0], sequences[0] + len(sequences))), sequences
    assert shown[-1]["finished"]["state"] == "TASK_STATE_SUCCEEDED", shown[-1]
    assert shown[-1]["finished"]["output"]["text"] == "p * 7 = 42"
    # The outcome-only watcher resumed as one: the start, the request, its answer, the end.
    async with asyncio.timeout(120):
        brief_rest, brief_errors = await brief.communicate()
    assert brief.returncode == 0, brief_errors.decode()
    brief_shown += [json.loads(line) for line in brief_rest.decode().splitlines()]
    assert f"following task {task_id} on {third} after event #" in brief_errors.decode()
    kinds = [
        next(k for k in e if k not in ("taskId", "sequence", "time", "attempt"))
        for e in brief_shown
    ]
    assert kinds == ["snapshot", "inputRequired", "stateChanged", "finished"], kinds
    brief_sequences = [int(event["sequence"]) for event in brief_shown[1:]]
    assert brief_sequences == sorted(set(brief_sequences))
    assert brief_shown[-1] == shown[-1]

    async def restarted() -> None:
        services = _endpoints(mesh)["services"]
        assert isinstance(services, dict)
        assert services["coordinator-2"]["pid"] != dead_pid

    await eventually(restarted, timeout=120, interval=0.2)


async def test_the_node_client_follows_its_task_through_the_death_of_its_coordinator(
    mesh: RunningMesh, node_client: Path
) -> None:
    """The Node client submits through coordinator-2, which then dies: the task is taken
    over by another coordinator, and the client follows it there to the end.
    """
    first, second, third = mesh.endpoints["coordinators"]
    tls = mesh.tls
    env = {k: v for k, v in os.environ.items() if not k.startswith("HIVEWIRE_")}
    client = await asyncio.create_subprocess_exec(
        "node", str(node_client / "submit.js"), "--proto", str(REPO_ROOT / "proto"),
        "--address", f"{second},{third}",
        "--ca", str(tls.ca), "--cert", str(tls.cert), "--key", str(tls.key),
        "--capability", "solve", "--json", '{"expression": "q * 6"}',
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=env,
        cwd=node_client,
    )  # fmt: skip
    assert client.stdout is not None
    lines: list[str] = []

    async def next_input_request() -> str:
        while True:
            line = (await client.stdout.readline()).decode()  # type: ignore[union-attr]
            assert line, f"the client ended early: {lines}"
            lines.append(line.rstrip("\n"))
            found = re.search(r" input_required .*request (\S+)\)$", lines[-1])
            if found:
                return found[1]

    async with asyncio.timeout(60):
        first_request = await next_input_request()
    task_id = lines[0].split()[3]
    services = _endpoints(mesh)["services"]
    assert isinstance(services, dict)
    os.kill(int(services["coordinator-2"]["pid"]), signal.SIGKILL)
    # Another coordinator takes the task over once coordinator-2's lease expires and runs
    # it again: the agent asks again, and the client shows it.
    async with asyncio.timeout(120):
        second_request = await next_input_request()
    assert second_request != first_request
    await _provide_input(mesh, first, task_id, second_request, "7")
    async with asyncio.timeout(120):
        rest, errors = await client.communicate()
    assert client.returncode == 0, (lines, rest.decode(), errors.decode())
    lines += rest.decode().splitlines()
    assert f"following task {task_id} on {third} after event #" in errors.decode()
    assert lines[-1] == "q * 6 = 42", lines
    events = [NODE_LINE.match(line) for line in lines[:-1]]
    assert all(events), lines
    assert events[0][2] == "snapshot" and events[-1][2] == "finished"  # type: ignore[index]
    sequences = [int(e[1]) for e in events[1:]]  # type: ignore[index]
    assert sequences == list(range(sequences[0], sequences[0] + len(sequences))), lines


async def test_the_cli_skips_a_dead_coordinator_of_its_list(mesh: RunningMesh) -> None:
    with dead_address() as dead:
        addresses = ",".join([dead, *mesh.endpoints["coordinators"]])
        result = await _hivewire(mesh, "submit", "--address", addresses, "calculate", "6 * 7")
    assert result.returncode == 0, result
    assert result.stdout.strip().endswith("6 * 7 = 42"), result
    assert result.stderr.startswith(f"coordinator {dead} unreachable; trying the next one\n")


async def test_the_cli_finds_the_coordinators_in_the_registry(mesh: RunningMesh) -> None:
    result = await _hivewire(
        mesh,
        "submit", "--address", "discovery", "calculate", "2 + 3",
        HIVEWIRE_NATS_URL=mesh.endpoints["nats"]["url"],
        HIVEWIRE_DISCOVERY="nats",
    )  # fmt: skip
    assert result.returncode == 0, result
    assert result.stdout.strip().endswith("2 + 3 = 5"), result
    # Without a registry to read, the one-line error says so.
    with dead_address() as dead:
        unreachable = await _hivewire(
            mesh,
            "tasks", "--address", "discovery",
            HIVEWIRE_NATS_URL=f"tls://{dead}",
            HIVEWIRE_DISCOVERY="nats",
        )  # fmt: skip
    assert unreachable.returncode == 6, unreachable
    assert unreachable.stderr == (
        f"Error: cannot read the registry (nats): connection refused to tls://{dead}"
        " (is NATS running there?)\n"
    ), unreachable


async def test_a_killed_coordinator_restarts_and_finds_its_tasks_in_jetstream(
    mesh: RunningMesh,
) -> None:
    before = await _hivewire(mesh, "tasks", "--json", "--address", mesh.address("coordinator"))
    assert before.returncode == 0, before
    task_ids = {json.loads(line)["taskId"] for line in before.stdout.splitlines()}
    assert task_ids, before

    old_pid = mesh.endpoints["services"]["coordinator"]["pid"]
    os.kill(old_pid, signal.SIGKILL)

    async def restarted() -> int:
        services = _endpoints(mesh)["services"]
        assert isinstance(services, dict)
        new_pid = int(services["coordinator"]["pid"])
        assert new_pid != old_pid
        health = await grpcurl(
            "grpc.health.v1.Health/Check",
            tls=mesh.tls,
            address=mesh.address("coordinator"),
            input="{}",
        )
        assert health.returncode == 0, health
        return new_pid

    new_pid = await eventually(restarted, timeout=120, interval=0.2)
    assert mesh.process.poll() is None, mesh.output()
    assert f"restarted as pid {new_pid}" in mesh.output()
    after = await _hivewire(mesh, "tasks", "--json", "--address", mesh.address("coordinator"))
    assert after.returncode == 0, after
    assert task_ids <= {json.loads(line)["taskId"] for line in after.stdout.splitlines()}
    again = await _hivewire(
        mesh, "submit", "--address", mesh.address("coordinator"), "calculate", "2 ** 10"
    )
    assert again.returncode == 0 and again.stdout.strip().endswith("2 ** 10 = 1024"), again


def test_ctrl_c_stops_the_mesh(mesh: RunningMesh) -> None:
    """Runs last in this module."""
    mesh.process.send_signal(signal.SIGINT)
    assert mesh.process.wait(timeout=90) == 0, mesh.output()
    assert "all processes stopped." in mesh.output()
    pids = [entry["pid"] for entry in json.loads(
        (mesh.state_dir / "endpoints.json").read_text()
    )["services"].values()]  # fmt: skip
    assert not [pid for pid in pids if Path(f"/proc/{pid}").exists()]
