"""`hivewire up` end to end: the whole mesh as real processes, driven like a user would.

One mesh per module (it takes a few seconds to start on 2 cores): nats-server, the
coordinator, the model service (deterministic backend, so the run is reproducible),
the tool service and the three example agents, each its own process on its own port
(ephemeral ports picked for the test), over mutual TLS. Then grpcurl, the metrics
endpoints, the CLI and Ctrl-C are exercised against it.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import ssl
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from hivewire.services.runtime.events import replay
from hivewire.services.runtime.tls import nats_tls_options
from tests.helpers import GrpcurlResult, assert_nats_refused, dead_address, eventually, grpcurl
from tests.support.up_mesh import HIVEWIRE, RunningMesh, hivewire_up

pytestmark = pytest.mark.timeout(300)

SERVICE_NAMES = {
    "coordinator": "hivewire.coordinator.v1.CoordinatorService",
    "model": "hivewire.model.v1.ModelService",
    "tool": "hivewire.tool.v1.ToolService",
    "agent-summarizer": "hivewire.agent.v1.AgentService",
    "agent-researcher": "hivewire.agent.v1.AgentService",
    "agent-calculator": "hivewire.agent.v1.AgentService",
    "a2a": "lf.a2a.v1.A2AService",
}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie still answers kill(0); it is gone as far as a user can tell.
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except FileNotFoundError:
        return False


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningMesh]:
    with hivewire_up(tmp_path_factory.mktemp("mesh"), state_dir=None) as running:
        yield running


def test_up_runs_the_demo_task_live_and_prints_a_grpcurl_command(mesh: RunningMesh) -> None:
    text = mesh.output()
    assert "model backend: deterministic" in text
    # Live progress: state changes, progress steps, tool calls and streamed partials.
    assert "running: started on agent researcher" in text
    assert "progress" in text and "tool_call text" in text and "partial answer" in text
    assert "finished: succeeded" in text
    assert "demo task exit status: 0" in text
    printed = [line for line in text.splitlines() if "CoordinatorService/StreamTask" in line]
    assert printed and "/grpcurl -cacert" in printed[0], text


def test_endpoints_file_lists_every_service_and_the_client_identity(mesh: RunningMesh) -> None:
    services = mesh.endpoints["services"]
    # And the NATS guard (no RPCs of its own: health and metrics; docs/security.md).
    assert set(services) == set(SERVICE_NAMES) | {"nats-guard"}
    for entry in services.values():
        host, port = entry["address"].rsplit(":", 1)
        assert host == "127.0.0.1" and int(port) > 0
        assert entry["metrics"]
    for path in mesh.endpoints["tls"].values():
        assert Path(path).is_file()
    assert mesh.endpoints["nats"]["url"].startswith("tls://127.0.0.1:")


async def test_up_starts_the_a2a_gateway_and_prints_its_url(mesh: RunningMesh) -> None:
    from tests.support.a2a_mesh import client_ssl_context

    url = mesh.endpoints["a2a"]["url"]
    assert url.startswith("https://127.0.0.1:")
    card_url = mesh.endpoints["a2a"]["card"]
    assert f"A2A gateway: {url} (agent card: {card_url}" in mesh.output()

    async def skills() -> set[str]:
        async with httpx.AsyncClient(verify=client_ssl_context(mesh.tls)) as http:
            card = (await http.get(card_url)).json()
        found = {skill["id"] for skill in card["skills"]}
        assert {"summarize", "research", "calculate"} <= found, found
        return found

    await eventually(skills, timeout=30, interval=0.2)


@pytest.mark.parametrize("name", sorted(SERVICE_NAMES))
async def test_grpcurl_lists_and_describes_each_service_via_reflection(
    mesh: RunningMesh, name: str
) -> None:
    listed = await grpcurl("list", tls=mesh.tls, address=mesh.address(name))
    assert listed.returncode == 0, listed
    services = set(listed.stdout.split())
    assert {SERVICE_NAMES[name], "grpc.health.v1.Health"} <= services
    described = await grpcurl(
        "describe", SERVICE_NAMES[name], tls=mesh.tls, address=mesh.address(name)
    )
    assert described.returncode == 0, described
    assert "rpc " in described.stdout
    health = await grpcurl(
        "grpc.health.v1.Health/Check", tls=mesh.tls, address=mesh.address(name), input="{}"
    )
    assert health.returncode == 0, health
    assert health.json() == {"status": "SERVING"}


async def test_printed_grpcurl_command_streams_a_task(mesh: RunningMesh) -> None:
    # The exact line `hivewire up` printed, pasted into a shell.
    [command] = [
        line for line in mesh.output().splitlines() if "CoordinatorService/StreamTask" in line
    ]
    shell = await asyncio.create_subprocess_exec(
        "bash",
        "-c",
        command,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        cwd=mesh.root,
    )
    async with asyncio.timeout(120):
        stdout, stderr = await shell.communicate()
    result = GrpcurlResult(
        args=("bash", "-c", command),
        returncode=shell.returncode or 0,
        stdout=stdout.decode(),
        stderr=stderr.decode(),
    )
    assert result.returncode == 0, result
    events = [m["event"] for m in result.messages()]
    assert "snapshot" in events[0]
    sequences = [int(e["sequence"]) for e in events[1:]]
    assert sequences == list(range(sequences[0], sequences[0] + len(sequences)))
    assert any("partial" in e for e in events)
    assert events[-1]["finished"]["state"] == "TASK_STATE_SUCCEEDED"


async def test_grpcurl_streams_only_the_outcome_when_asked(mesh: RunningMesh) -> None:
    request = {
        "spec": {"capability": "summarize", "input": {"text": "hivewire streams every step."}},
        "outcomeOnly": True,
    }
    result = await grpcurl(
        "hivewire.coordinator.v1.CoordinatorService/StreamTask",
        tls=mesh.tls,
        address=mesh.address("coordinator"),
        input=json.dumps(request),
        timeout=120,
    )
    assert result.returncode == 0, result
    events = [m["event"] for m in result.messages()]
    kinds = [sorted(set(e) & {"snapshot", "stateChanged", "partial", "finished"}) for e in events]
    assert kinds == [["snapshot"], ["finished"]], events
    assert events[-1]["finished"]["state"] == "TASK_STATE_SUCCEEDED"


async def test_no_client_certificate_is_refused(mesh: RunningMesh) -> None:
    result = await grpcurl(
        "list", tls=None, address=mesh.address("coordinator"), flags=["-insecure"]
    )
    assert result.returncode != 0
    assert "hivewire" not in result.stdout


async def test_metrics_endpoint_counts_the_calls_just_made(mesh: RunningMesh) -> None:
    address = mesh.address("tool")
    for _ in range(3):
        checked = await grpcurl(
            "grpc.health.v1.Health/Check", tls=mesh.tls, address=address, input="{}"
        )
        assert checked.returncode == 0, checked
    metrics = mesh.endpoints["services"]["tool"]["metrics"]
    async with httpx.AsyncClient() as http:
        text = (await http.get(f"http://{metrics}/metrics")).text
    lines = [
        line
        for line in text.splitlines()
        if line.startswith("grpc_server_handled_total{")
        and 'grpc_method="Check"' in line
        and 'grpc_code="OK"' in line
    ]
    assert lines, text
    assert float(lines[0].rsplit(" ", 1)[1]) >= 3


def test_cli_lists_agents_and_tasks(mesh: RunningMesh) -> None:
    env = mesh.clean_env()
    common = ["--address", mesh.address("coordinator"), "--certs-dir", str(mesh.root / "certs")]
    agents = subprocess.run(
        [HIVEWIRE, "agents", *common], capture_output=True, text=True, env=env, timeout=60
    )
    assert agents.returncode == 0, agents.stderr
    for capability in ("summarize", "research", "calculate"):
        assert capability in agents.stdout
    tasks = subprocess.run(
        [HIVEWIRE, "tasks", *common], capture_output=True, text=True, env=env, timeout=60
    )
    assert tasks.returncode == 0, tasks.stderr
    assert "research" in tasks.stdout


def test_cli_without_a_client_certificate_says_how_to_get_one(mesh: RunningMesh) -> None:
    result = subprocess.run(
        [HIVEWIRE, "submit", "--identity", "bob", "--address", mesh.address("coordinator")]
        + ["--certs-dir", str(mesh.root / "certs"), "calculate", "1 + 1"],
        capture_output=True,
        text=True,
        env=mesh.clean_env(),
        timeout=60,
    )
    assert result.returncode == 6, result
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert "hivewire certs issue --name bob" in lines[0]


async def test_up_prints_the_dashboard_url_and_it_serves(mesh: RunningMesh) -> None:
    url = mesh.endpoints["dashboard"]
    assert url.startswith("https://localhost:"), url
    assert f"dashboard: {url}" in mesh.output()
    tls = mesh.tls
    context = ssl.create_default_context(cafile=str(tls.ca))
    context.load_cert_chain(str(tls.cert), str(tls.key))
    async with httpx.AsyncClient(verify=context, timeout=10) as http:
        me = await http.get(url + "api/me")
        page = await http.get(url)
    assert me.status_code == 200 and me.json()["identity"].startswith("spiffe://")
    assert page.status_code == 200 and "<title>hivewire</title>" in page.text


async def test_a_refused_nats_connection_becomes_a_security_event(mesh: RunningMesh) -> None:
    # The NATS guard `hivewire up` runs follows nats-server's log (docs/security.md).
    url = mesh.endpoints["nats"]["url"]
    await assert_nats_refused(url, tls=ssl.create_default_context(cafile=str(mesh.tls.ca)))
    reader = nats_tls_options(url, mesh.tls)

    async def published() -> None:
        reasons = [
            r.event.security.reason
            async for r in replay(url, "security.authn_failed", nats_options=reader)
        ]
        assert "NATS_NO_CERTIFICATE" in reasons, reasons

    await eventually(published, timeout=30, interval=0.5)


def test_several_coordinators_on_sqlite_are_refused(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HIVEWIRE_")}
    result = subprocess.run(
        [HIVEWIRE, "up", "--coordinators", "2", "--state-dir", str(tmp_path / "state")],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=60,
    )
    assert result.returncode == 2, result
    assert result.stderr.startswith("Error: several coordinators share their tasks through")
    assert "add --store jetstream" in result.stderr, result
    assert not (tmp_path / "state").exists()  # refused before anything started


async def test_a_killed_coordinator_is_restarted_and_the_mesh_keeps_running(
    mesh: RunningMesh,
) -> None:
    old_pid = mesh.endpoints["services"]["coordinator"]["pid"]
    os.kill(old_pid, signal.SIGKILL)

    async def restarted() -> int:
        services = json.loads((mesh.state_dir / "endpoints.json").read_text())["services"]
        new_pid = int(services["coordinator"]["pid"])
        assert new_pid != old_pid and _alive(new_pid)
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
    assert f"coordinator (pid {old_pid}) exited with -9; restarted as pid {new_pid}" in (
        mesh.output()
    )
    # The restarted coordinator runs tasks, reached through a list whose first entry
    # is dead (the CLI skips it); the SQLite file kept the tasks of before the kill.
    common = ["--certs-dir", str(mesh.root / "certs")]
    with dead_address() as dead:
        address = ["--address", f"{dead},{mesh.address('coordinator')}"]
        submitted = await asyncio.to_thread(
            subprocess.run,
            [HIVEWIRE, "submit", *address, *common, "calculate", "6 * 7"],
            capture_output=True,
            text=True,
            env=mesh.clean_env(),
            timeout=120,
        )
    assert submitted.returncode == 0, submitted
    assert submitted.stdout.strip().endswith("6 * 7 = 42"), submitted
    assert f"coordinator {dead} unreachable" in submitted.stderr
    listed = await asyncio.to_thread(
        subprocess.run,
        [HIVEWIRE, "tasks", "--address", mesh.address("coordinator"), *common],
        capture_output=True,
        text=True,
        env=mesh.clean_env(),
        timeout=60,
    )
    assert listed.returncode == 0 and "research" in listed.stdout, listed


def test_ctrl_c_stops_every_process(mesh: RunningMesh) -> None:
    """Runs last in this module: SIGINT (Ctrl-C) leaves no mesh process behind."""
    # endpoints.json as it is now (a restarted coordinator has a new pid).
    endpoints = json.loads((mesh.state_dir / "endpoints.json").read_text())
    pids = [entry["pid"] for entry in endpoints["services"].values()]
    assert all(_alive(pid) for pid in pids)
    mesh.process.send_signal(signal.SIGINT)
    assert mesh.process.wait(timeout=90) == 0, mesh.output()
    assert "all processes stopped." in mesh.output()
    assert not [pid for pid in pids if _alive(pid)]
    leftovers = subprocess.run(
        ["pgrep", "-f", str(mesh.state_dir / "nats-server.conf")], capture_output=True
    )
    assert leftovers.returncode == 1, leftovers.stdout
