"""The Prometheus and Grafana files load, and every service's live /metrics passes promtool.

``promtool`` (from Debian's prometheus package, put in .venv/tools by ``make promtool``)
checks the scrape config and the alert rules; then a mesh of real processes
(coordinator, model, tool, an agent) runs a task, each process's /metrics is scraped and
checked with ``promtool check metrics``, and every metric the Grafana dashboard and the
alert rules query is found among them.
"""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import subprocess
from pathlib import Path

import httpx
import pytest

from hivewire.common.v1 import common_pb2
from hivewire.coordinator.v1 import coordinator_pb2, coordinator_pb2_grpc
from hivewire.services.runtime.channels import secure_channel
from tests.conftest import Pki
from tests.helpers import NatsServer, ServiceProcess
from tests.support.e2e_mesh import (
    CALCULATOR,
    REPO_ROOT,
    agent_process,
    coordinator_process,
    mesh_process,
    wait_for_agents,
)

pytestmark = pytest.mark.timeout(150)

DEPLOY = REPO_ROOT / "deploy"
DASHBOARD = DEPLOY / "grafana" / "hivewire.json"
RULES = DEPLOY / "prometheus" / "alerts.yml"
_SUFFIXES = ("_bucket", "_count", "_sum")
_NAME = re.compile(r"\b(hivewire_[a-z0-9_]+|grpc_[a-z_]+)\b")


def promtool() -> str:
    """The promtool ``make promtool`` installs (or one on PATH); missing is a failure."""
    local = REPO_ROOT / ".venv" / "tools" / "promtool"
    found = str(local) if local.exists() else shutil.which("promtool")
    assert found, "promtool is missing: run `make promtool` (Debian's prometheus package)"
    return found


def run_promtool(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [promtool(), *args], input=stdin, capture_output=True, text=True, timeout=60
    )


def queried_metrics() -> set[str]:
    """Metric names used by the dashboard's and the alert rules' expressions."""
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    exprs.append(RULES.read_text())
    names = set()
    for expr in exprs:
        for name in _NAME.findall(expr):
            for suffix in _SUFFIXES:
                if name.endswith(suffix):
                    name = name.removesuffix(suffix)
                    break
            names.add(name)
    return names


def exposed_metrics(text: str) -> set[str]:
    """Metric families a /metrics page declares (``# TYPE name kind``)."""
    return {
        line.split()[2] for line in text.splitlines() if line.startswith("# TYPE ")
    } | {  # counters are declared without _total but sampled with it
        line.split()[2] + "_total"
        for line in text.splitlines()
        if line.startswith("# TYPE ") and line.split()[3] == "counter"
    }


def test_the_prometheus_config_and_alert_rules_load() -> None:
    config = run_promtool("check", "config", str(DEPLOY / "prometheus" / "prometheus.yml"))
    assert config.returncode == 0, config.stdout + config.stderr
    assert "SUCCESS: 6 rules found" in config.stdout
    rules = run_promtool("check", "rules", str(RULES))
    assert rules.returncode == 0, rules.stdout + rules.stderr


def test_the_grafana_dashboard_is_a_dashboard() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] and 8 <= len(dashboard["uid"]) <= 40
    assert dashboard["title"] and isinstance(dashboard["schemaVersion"], int)
    titles = {p["title"] for p in dashboard["panels"]}
    assert {
        "Task rate",
        "Task latency (accepted to finished)",
        "Queue depth",
        "Agent load",
        "Circuit breakers",
        "Model tokens",
        "Model time to first token",
        "Tool calls and errors",
        "Event publish lag",
    } <= titles
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for p in dashboard["panels"]:
        grid = p["gridPos"]
        assert grid["x"] + grid["w"] <= 24 and p["targets"], p["title"]
        for target in p["targets"]:
            assert target["datasource"]["type"] == "prometheus"


async def test_every_service_metrics_page_passes_promtool_and_feeds_the_dashboard(
    pki: Pki, tmp_path: Path
) -> None:
    pages: dict[str, str] = {}
    async with contextlib.AsyncExitStack() as stack:
        nats = await stack.enter_async_context(NatsServer(tmp_path / "nats"))
        coordinator = await stack.enter_async_context(
            coordinator_process(
                tmp_path, certs_dir=pki.dir, nats_url=nats.url, db_path=tmp_path / "c.db"
            )
        )
        services: dict[str, ServiceProcess] = {"coordinator": coordinator}
        for name, extra in (
            ("model", {"HIVEWIRE_MODEL__DEFAULT_BACKEND": "deterministic"}),
            ("tool", {}),
        ):
            services[name] = await stack.enter_async_context(
                mesh_process(
                    f"hivewire.services.{name}",
                    workdir=tmp_path,
                    certs_dir=pki.dir,
                    identity=name,
                    nats_url=nats.url,
                    env=extra,
                )
            )
        services["agent"] = await stack.enter_async_context(
            agent_process(
                tmp_path, CALCULATOR, name="calculator", certs_dir=pki.dir, nats_url=nats.url
            )
        )
        channel = secure_channel(coordinator.address, pki.files("client"))
        stack.push_async_callback(channel.close)
        client: coordinator_pb2_grpc.CoordinatorServiceAsyncStub = (
            coordinator_pb2_grpc.CoordinatorServiceStub(channel)
        )
        await wait_for_agents(client, 1)
        spec = coordinator_pb2.TaskSpec(
            capability="calculate", input=common_pb2.Payload(text="6 * 7")
        )
        events = [
            r.event async for r in client.StreamTask(coordinator_pb2.StreamTaskRequest(spec=spec))
        ]
        assert events[-1].finished.state == common_pb2.TASK_STATE_SUCCEEDED

        async with httpx.AsyncClient(timeout=10) as http:
            for name, process in services.items():
                assert process.metrics_port, f"{name} serves no metrics"
                response = await http.get(f"http://127.0.0.1:{process.metrics_port}/metrics")
                assert response.status_code == 200, name
                pages[name] = response.text

    for name, page in pages.items():
        checked = run_promtool("check", "metrics", stdin=page)
        assert checked.returncode == 0, f"{name}: {checked.stdout}{checked.stderr}"

    exposed = set().union(*(exposed_metrics(p) for p in pages.values()))
    missing = queried_metrics() - exposed
    assert not missing, f"the dashboard or the alerts query metrics no service exposes: {missing}"
    assert "hivewire_coordinator_task_seconds" in exposed_metrics(pages["coordinator"])
