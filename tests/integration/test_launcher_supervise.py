"""The launcher restarts a process that dies and gives up on a crash loop, with the reason.

Real child processes (this interpreter running a few lines of Python): one that reports
ready through its ports file and then waits, killed with SIGKILL; one that exits as soon
as it starts; one without a restart policy.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from pathlib import Path

import pytest

from hivewire.services.mesh.launcher import (
    Launcher,
    ManagedProcess,
    ProcessSpec,
    RestartPolicy,
)
from tests.helpers import eventually

pytestmark = pytest.mark.timeout(60)

# Writes its ports file (what a real service does once SERVING), then waits to be stopped.
SERVE = """
import json, os, sys, time
with open(sys.argv[1] + ".tmp", "w") as f:
    json.dump({"grpc": 1, "pid": os.getpid()}, f)
os.replace(sys.argv[1] + ".tmp", sys.argv[1])
print("serving", os.getpid(), flush=True)
while True:
    time.sleep(3600)
"""
FAIL = "import sys; print('cannot start: bad setting', flush=True); sys.exit(3)"
FAST = RestartPolicy(max_restarts=3, window=60.0, initial_delay=0.01, max_delay=0.05)


def _serving(tmp: Path, name: str, restart: RestartPolicy | None) -> ProcessSpec:
    ports = tmp / f"{name}.json"
    return ProcessSpec(
        name=name,
        argv=[sys.executable, "-c", SERVE, str(ports)],
        log_file=tmp / f"{name}.log",
        ports_file=ports,
        ready_timeout=30,
        restart=restart,
    )


async def test_a_killed_process_with_a_policy_is_restarted_in_its_place(tmp_path: Path) -> None:
    restarts: list[tuple[int, int]] = []

    def on_restart(dead: ManagedProcess, new: ManagedProcess) -> None:
        restarts.append((dead.pid, new.pid))

    async with Launcher(grace_period=5) as launcher:
        first = await launcher.start(_serving(tmp_path, "coordinator", FAST))
        other = await launcher.start(_serving(tmp_path, "agent", None))
        supervisor = asyncio.ensure_future(launcher.supervise(on_restart=on_restart))
        os.kill(first.pid, signal.SIGKILL)

        async def restarted() -> None:
            assert restarts and restarts[0][0] == first.pid

        await eventually(restarted, timeout=30)
        new_pid = restarts[0][1]
        assert new_pid != first.pid
        # The replacement is ready (it wrote its ports file again) and keeps its place
        # in the start order, so it is still stopped after the agent.
        ports = json.loads((tmp_path / "coordinator.json").read_text())
        assert ports["pid"] == new_pid
        assert [c.spec.name for c in launcher.children] == ["coordinator", "agent"]
        assert launcher.children[0].pid == new_pid and launcher.children[0].running
        assert other.running
        assert not supervisor.done()
        supervisor.cancel()
        with pytest.raises(asyncio.CancelledError):
            await supervisor
    assert not other.running and not launcher.children


async def test_a_crash_loop_stops_supervision_with_the_reason(tmp_path: Path) -> None:
    spec = ProcessSpec(
        name="coordinator-2",
        argv=[sys.executable, "-c", FAIL],
        log_file=tmp_path / "c2.log",
        restart=FAST,
    )
    async with Launcher(grace_period=5) as launcher:
        await launcher.start(spec)
        async with asyncio.timeout(30):
            reason = await launcher.supervise()
    assert reason.startswith("coordinator-2 is crash-looping: it died 4 times within 60s")
    assert "(last exit 3)" in reason and "cannot start: bad setting" in reason
    # Three restarts, each of which ran and failed: four runs in the log.
    assert (tmp_path / "c2.log").read_text().count("cannot start") == 4


async def test_a_process_without_a_policy_ends_supervision(tmp_path: Path) -> None:
    async with Launcher(grace_period=5) as launcher:
        coordinator = await launcher.start(_serving(tmp_path, "coordinator", FAST))
        agent = await launcher.start(_serving(tmp_path, "agent-calculator", None))
        supervisor = asyncio.ensure_future(launcher.supervise())
        os.kill(agent.pid, signal.SIGKILL)
        async with asyncio.timeout(30):
            reason = await supervisor
        assert reason == f"agent-calculator (exit {-signal.SIGKILL}) exited unexpectedly"
        assert coordinator.running
