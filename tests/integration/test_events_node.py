"""The Node.js subscriber in examples/node-events decodes events published from Python."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
from pathlib import Path

import pytest

from hivewire.events.v1 import events_pb2
from hivewire.services.runtime.events import EventPublisher, replay
from tests.helpers import NatsServer

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "node-events"


async def run(*command: str, cwd: Path, timeout: float) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        *command, cwd=cwd, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    try:
        async with asyncio.timeout(timeout):
            stdout, stderr = await proc.communicate()
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    assert proc.returncode is not None
    return proc.returncode, stdout.decode(), stderr.decode()


@pytest.fixture(scope="module")
def node_example(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the example with its locked dependencies installed (``npm ci``)."""
    if shutil.which("node") is None or shutil.which("npm") is None:
        pytest.skip("node and npm are not installed: the Node.js example cannot run here")
    work = tmp_path_factory.mktemp("node-events")
    for name in ("package.json", "package-lock.json", "subscribe.js"):
        shutil.copy2(EXAMPLE / name, work / name)
    done = subprocess.run(
        ["npm", "ci", "--no-audit", "--no-fund", "--prefer-offline", "--ignore-scripts"],
        cwd=work,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, f"npm ci failed\n{done.stdout}\n{done.stderr}"
    return work


async def test_node_subscriber_decodes_the_envelope(
    nats_server: NatsServer, node_example: Path
) -> None:
    async with EventPublisher(nats_server.url, source="coordinator/node-test") as publisher:
        for i in range(3):
            publisher.publish(
                "task.created",
                subject=f"task-{i}",
                data=events_pb2.TaskEventData(task_id=f"task-{i}", capability="summarize"),
                task_sequence=1,
            )
        publisher.publish(
            "agent.registered",
            subject="agent-1",
            data=events_pb2.AgentEventData(agent_id="agent-1", name="researcher"),
        )
        publisher.publish(
            "task.completed",
            subject="task-0",
            data=events_pb2.TaskEventData(task_id="task-0"),
            task_sequence=9,
        )
        assert await publisher.flush(10)
    stored = [r async for r in replay(nats_server.url)]
    script = str(node_example / "subscribe.js")
    proto = str(ROOT / "proto")

    code, out, err = await run(
        "node", script, "--server", nats_server.url, "--count", "5", "--proto", proto,
        cwd=node_example,
        timeout=60,
    )  # fmt: skip
    assert code == 0, err
    expected = [
        f"#{r.stream_sequence} {r.type} {r.event.subject} "
        f"task_sequence={r.event.task_sequence} data={r.event.WhichOneof('data')} id={r.id}"
        for r in stored
    ]
    assert out.splitlines() == expected

    code, out, err = await run(
        "node", script, "--server", nats_server.url, "--filter", "task.>", "--from-seq", "2",
        "--count", "3", "--json", "--proto", proto,
        cwd=node_example,
        timeout=60,
    )  # fmt: skip
    assert code == 0, err
    decoded = [json.loads(line) for line in out.splitlines()]
    tasks = [r for r in stored if r.type.startswith("task.")][1:]
    assert [d["stream_sequence"] for d in decoded] == [r.stream_sequence for r in tasks]
    assert [d["msg_id"] for d in decoded] == [r.id for r in tasks]
    assert [d["event"]["id"] for d in decoded] == [r.id for r in tasks]
    assert decoded[0]["event"]["task"] == {"task_id": "task-1", "capability": "summarize"}
    assert decoded[2]["event"]["task_sequence"] == "9"
    assert decoded[2]["event"]["source"] == "coordinator/node-test"
