"""The hivewire task commands as a real process against a real coordinator."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import Pki
from tests.helpers import dead_address, eventually, reserved_port
from tests.support.coordinator_mesh import Mesh, start_mesh

pytestmark = pytest.mark.timeout(90)

HIVEWIRE = str(Path(sys.executable).parent / "hivewire")


@dataclass
class Result:
    code: int
    out: str
    err: str


@pytest.fixture
async def mesh(pki: Pki, tmp_path: Path) -> AsyncIterator[Mesh]:
    async with start_mesh(pki.dir, tmp_path / "coordinator.db") as m:
        yield m


async def cli(mesh: Mesh, *args: str, address: str | None = None) -> Result:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HIVEWIRE_")}
    env["HIVEWIRE_CERTS_DIR"] = str(mesh.pki_dir)
    proc = await asyncio.create_subprocess_exec(
        HIVEWIRE,
        *args,
        "--address",
        address or mesh.address,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env,
    )
    out, err = await proc.communicate()
    assert proc.returncode is not None
    return Result(proc.returncode, out.decode(), err.decode())


async def test_submit_follows_the_task_and_prints_the_output(mesh: Mesh) -> None:
    await mesh.agent()
    result = await cli(mesh, "submit", "echo", "hello", "--input-json", '{"steps": 2}')
    assert result.code == 0, result
    assert result.out == "done:hello\n"
    lines = result.err.splitlines()
    assert lines[0].startswith("#1 task ")
    assert any("progress 33% step-1" in line for line in lines)
    assert lines[-1].endswith("finished: succeeded")


def event_kinds(out: str) -> list[str]:
    """The kind of each ``--json`` line: the one field besides the task's id and numbers."""
    kinds = []
    for line in out.splitlines():
        event = json.loads(line)
        (kind,) = (k for k in event if k not in ("taskId", "sequence", "time", "attempt"))
        kinds.append(kind)
    return kinds


async def test_outcome_only_shows_the_start_and_the_end(mesh: Mesh) -> None:
    await mesh.agent()
    args = ("submit", "echo", "hello", "--input-json", '{"steps": 2}')
    full = await cli(mesh, *args, "--json")
    only = await cli(mesh, *args, "--json", "--outcome-only")
    assert full.code == 0 and only.code == 0, (full, only)
    assert "progress" in event_kinds(full.out)
    assert event_kinds(only.out) == ["snapshot", "finished"]
    text = await cli(mesh, *args, "--outcome-only")
    assert text.code == 0 and text.out == "done:hello\n", text
    assert not any("progress" in line for line in text.err.splitlines())
    assert text.err.splitlines()[-1].endswith("finished: succeeded")
    task_id = json.loads(only.out.splitlines()[-1])["taskId"]
    watched = await cli(mesh, "watch", task_id, "--json", "--outcome-only")
    assert watched.code == 0, watched
    assert event_kinds(watched.out) == ["snapshot", "finished"]


async def test_detach_watch_tasks_and_json(mesh: Mesh) -> None:
    agent = await mesh.agent()
    detached = await cli(mesh, "submit", "echo", "later", "--input-json", '{"gate": "g"}', "-d")
    assert detached.code == 0, detached
    task_id = detached.out.strip()
    assert len(task_id) == 32
    await agent.wait_started()
    agent.gate("g").set()
    watched = await cli(mesh, "watch", task_id, "--json")
    assert watched.code == 0, watched
    events = [json.loads(line) for line in watched.out.splitlines()]
    assert "snapshot" in events[0]
    assert events[-1]["finished"]["state"] == "TASK_STATE_SUCCEEDED"
    resumed = await cli(mesh, "watch", task_id, "--after", str(len(events) - 2))
    assert resumed.code == 0 and resumed.out == "done:later\n"
    listed = await cli(mesh, "tasks")
    assert listed.code == 0, listed
    assert task_id in listed.out and "succeeded" in listed.out
    only_running = await cli(mesh, "tasks", "--state", "running", "--json")
    assert only_running.code == 0 and only_running.out == ""
    bad_state = await cli(mesh, "tasks", "--state", "sleeping")
    assert bad_state.code == 2


async def test_exit_codes_for_failed_and_cancelled_tasks(mesh: Mesh) -> None:
    agent = await mesh.agent()
    failed = await cli(mesh, "submit", "echo", "--input-json", '{"fail": "permanent"}')
    assert failed.code == 3, failed
    assert "failed: INVALID_ARGUMENT SCRIPTED_FAILURE" in failed.err.splitlines()[-1]

    hanging = await cli(mesh, "submit", "echo", "--input-json", '{"hang": true}', "--detach")
    task_id = hanging.out.strip()
    await eventually(lambda: any(e.task_id == task_id for e in agent.stats.executions))
    cancelled = await cli(mesh, "cancel", task_id, "--reason", "stop")
    assert (cancelled.code, cancelled.out) == (0, f"{task_id} cancelled\n")
    watched = await cli(mesh, "watch", task_id)
    assert watched.code == 4, watched
    assert watched.err.splitlines()[-1].startswith(f"task {task_id} cancelled: CANCELLED")


async def test_errors_are_one_line_with_code_and_reason(mesh: Mesh) -> None:
    missing = await cli(mesh, "watch", "no-such-task")
    assert missing.code == 5
    assert missing.err == "Error: NOT_FOUND TASK_NOT_FOUND: task 'no-such-task' not found\n"
    invalid = await cli(mesh, "submit", "Bad Capability!", "--detach")
    assert invalid.code == 5
    assert invalid.err.startswith("Error: INVALID_ARGUMENT INVALID_ARGUMENT: spec.capability:")
    assert len(invalid.err.splitlines()) == 1
    down = await cli(mesh, "tasks", address=f"127.0.0.1:{reserved_port()}")
    assert down.code == 6
    assert down.err.startswith("Error: UNAVAILABLE") and len(down.err.splitlines()) == 1
    usage = await cli(mesh, "submit", "echo", "--priority", "urgent")
    assert usage.code == 2


async def test_agents_table(mesh: Mesh) -> None:
    agent = await mesh.agent("tabled", capabilities=("echo", "sum"), max_concurrency=5)
    await eventually(lambda: len(mesh.running.pool.views()) == 1)
    result = await cli(mesh, "agents")
    assert result.code == 0, result
    row = next(line for line in result.out.splitlines() if agent.agent_id in line)
    assert "tabled" in row and "healthy" in row and "0/5" in row and "echo,sum" in row
    as_json = await cli(mesh, "agents", "--capability", "sum", "--json")
    assert json.loads(as_json.out)["agentId"] == agent.agent_id


PLAN_YAML = """\
aggregation: all
steps:
  - step_id: a
    capability: echo
    input: first
  - step_id: b
    capability: echo
    input: second
  - step_id: c
    capability: echo
    input: third
    depends_on: [a, b]
"""


async def test_submit_a_plan_prints_a_line_per_step_event(mesh: Mesh, tmp_path: Path) -> None:
    await mesh.agent(max_concurrency=4)
    plan = tmp_path / "plan.yaml"
    plan.write_text(PLAN_YAML)
    result = await cli(mesh, "submit", "--plan", str(plan))
    assert result.code == 0, result
    assert json.loads(result.out) == {"a": "done:first", "b": "done:second", "c": "done:third"}
    lines = result.err.splitlines()
    for step_id in "abc":
        assert any(f"step {step_id} started: queued" in line for line in lines), lines
        assert any(f"step {step_id} finished: succeeded" in line for line in lines), lines
    assert lines[-1].endswith("finished: succeeded")
    parent = lines[0].split()[2]
    listed = await cli(mesh, "tasks", "--parent", parent)
    assert listed.code == 0 and listed.out.count("succeeded") == 3


async def test_submit_a_plan_on_a_terminal_draws_a_tree(mesh: Mesh, tmp_path: Path) -> None:
    import pty

    await mesh.agent(max_concurrency=4)
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"steps": [{"step_id": "left", "capability": "echo"}]}))
    main, secondary = pty.openpty()
    env = {k: v for k, v in os.environ.items() if not k.startswith("HIVEWIRE_")}
    env.update(HIVEWIRE_CERTS_DIR=str(mesh.pki_dir), COLUMNS="120", TERM="xterm")
    proc = await asyncio.create_subprocess_exec(
        HIVEWIRE,
        "submit",
        "--plan",
        str(plan),
        "--no-input",
        "--address",
        mesh.address,
        stdin=secondary,
        stdout=secondary,
        stderr=secondary,
        env=env,
    )
    os.close(secondary)
    screen = b""
    loop = asyncio.get_running_loop()
    while True:
        try:
            chunk = await loop.run_in_executor(None, os.read, main, 65536)
        except OSError:  # the terminal closed: the process exited
            break
        if not chunk:
            break
        screen += chunk
    assert await proc.wait() == 0
    os.close(main)
    text = screen.decode(errors="replace")
    assert "├─ left" in text and "succeeded" in text
    assert '"left": "done:"' in text


async def test_bad_plans_from_the_cli(mesh: Mesh, tmp_path: Path) -> None:
    broken = tmp_path / "broken.yaml"
    broken.write_text("steps: [\n")
    unreadable = await cli(mesh, "submit", "--plan", str(broken))
    assert unreadable.code == 2 and "not valid yaml" in unreadable.err.lower()
    cycle = tmp_path / "cycle.yaml"
    cycle.write_text(
        "steps:\n  - {step_id: a, capability: echo, depends_on: [b]}\n"
        "  - {step_id: b, capability: echo, depends_on: [a]}\n"
    )
    refused = await cli(mesh, "submit", "--plan", str(cycle))
    assert refused.code == 5
    assert "dependency cycle: a -> b -> a" in refused.err
    both = await cli(mesh, "submit", "echo", "--plan", str(cycle))
    assert both.code == 2


async def test_projects_from_the_cli(mesh: Mesh, tmp_path: Path) -> None:
    await mesh.agent(max_concurrency=4)
    created = await cli(mesh, "projects", "create", "launch", "--goal", "ship it")
    assert created.code == 0, created
    project_id = created.out.strip()
    plan = tmp_path / "plan.yaml"
    plan.write_text(PLAN_YAML)
    ran = await cli(mesh, "submit", "--plan", str(plan), "--project", project_id)
    assert ran.code == 0, ran
    listed = await cli(mesh, "projects", "list")
    assert listed.code == 0 and project_id in listed.out and "launch" in listed.out
    shown = await cli(mesh, "projects", "show", project_id)
    assert shown.code == 0, shown
    assert "goal: ship it" in shown.out
    assert "tasks: 4 (0 active): succeeded 4" in shown.out
    missing = await cli(mesh, "projects", "show", "nope")
    assert missing.code == 5 and "PROJECT_NOT_FOUND" in missing.err


async def test_a_list_of_coordinators_skips_a_dead_one(mesh: Mesh) -> None:
    await mesh.agent()
    with dead_address() as dead:
        result = await cli(mesh, "submit", "echo", "hello", address=f"{dead},{mesh.address}")
        assert result.code == 0, result
        assert result.out == "done:hello\n"
        lines = result.err.splitlines()
        assert lines[0] == f"coordinator {dead} unreachable; trying the next one", result
        assert lines[1].startswith("#1 task ") and lines[-1].endswith("finished: succeeded")
        # The live one first: nothing is skipped, nothing is said.
        listed = await cli(mesh, "tasks", address=f"{mesh.address}, {dead}")
        assert listed.code == 0 and listed.err == "", listed
        assert "succeeded" in listed.out


async def test_no_coordinator_of_the_list_connects(mesh: Mesh) -> None:
    with dead_address() as first, dead_address() as second:
        down = await cli(mesh, "tasks", address=f"{first},{second}")
    assert down.code == 6, down
    lines = down.err.splitlines()
    assert lines[:2] == [
        f"coordinator {first} unreachable; trying the next one",
        f"coordinator {second} unreachable; trying the next one",
    ], down
    assert lines[2].startswith("Error: UNAVAILABLE") and len(lines) == 3, down
    assert f"(is a coordinator running at {first}, {second}?)" in lines[2], down
    malformed = await cli(mesh, "tasks", address=f"{mesh.address},nohost")
    assert malformed.code == 2 and "'nohost' is not host:port" in malformed.err, malformed
