"""The Node.js subscriber in examples/node-events decodes events published from Python."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from hivewire.events.v1 import events_pb2
from hivewire.services.runtime.events import EventPublisher, replay
from tests.conftest import Pki
from tests.helpers import NatsServer
from tests.support.node import install_example, run_command

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "node-events"


@pytest.fixture(scope="module")
def node_example(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the example with its locked dependencies installed (``npm ci``)."""
    files = ("package.json", "package-lock.json", "subscribe.js")
    return install_example(tmp_path_factory, EXAMPLE, files, what="Node.js example")


async def test_node_subscriber_decodes_the_envelope(
    mesh_nats_server: NatsServer, node_example: Path, pki: Pki
) -> None:
    # The mesh's NATS (mTLS, per-identity permissions) as the README's command reads it.
    nats_server = mesh_nats_server
    async with (
        EventPublisher(
            nats_server.url,
            source="coordinator/node-test",
            nats_options=nats_server.client_options("coordinator"),
        ) as publisher,
        EventPublisher(
            nats_server.url,
            source="agent/agent-1",
            nats_options=nats_server.client_options("agent"),
        ) as agent,
    ):
        for i in range(3):
            publisher.publish(
                "task.created",
                subject=f"task-{i}",
                data=events_pb2.TaskEventData(task_id=f"task-{i}", capability="summarize"),
                task_sequence=1,
            )
        assert await publisher.flush(10)
        # Only an agent may publish agent events.
        agent.publish(
            "agent.registered",
            subject="agent-1",
            data=events_pb2.AgentEventData(agent_id="agent-1", name="researcher"),
        )
        assert await agent.flush(10)
        publisher.publish(
            "task.completed",
            subject="task-0",
            data=events_pb2.TaskEventData(task_id="task-0"),
            task_sequence=9,
        )
        assert await publisher.flush(10)
    reader = nats_server.client_options("client")
    stored = [r async for r in replay(nats_server.url, nats_options=reader)]
    identity = ("--certs", str(pki.dir), "--identity", "client")
    script = str(node_example / "subscribe.js")
    proto = str(ROOT / "proto")

    code, out, err = await run_command(
        "node", script, "--server", nats_server.url, *identity, "--count", "5", "--proto", proto,
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

    code, out, err = await run_command(
        "node", script, "--server", nats_server.url, *identity, "--filter", "task.>",
        "--from-seq", "2",
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
