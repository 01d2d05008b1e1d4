"""The A2A gateway used by the official A2A JavaScript SDK (``@a2a-js/sdk``) from Node.js.

Real processes over mTLS: nats-server, the coordinator, the interop test agent and the
gateway (see :mod:`tests.support.a2a_mesh`), and ``node examples/a2a-node/a2a.mjs``
with its locked npm dependencies (``npm ci``): the SDK's ``ClientFactory`` and
JSON-RPC transport over Node's fetch with the mesh CA and a client certificate.
"""

from __future__ import annotations

import json
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import pytest
import pytest_asyncio

from hivewire.common.v1 import common_pb2
from hivewire.coordinator.v1 import coordinator_pb2
from tests.conftest import Pki
from tests.support.a2a_mesh import SKILLS, A2aMesh, a2a_mesh
from tests.support.e2e_mesh import REPO_ROOT
from tests.support.node import install_example, run_command

pytestmark = [pytest.mark.asyncio(loop_scope="module"), pytest.mark.timeout(180)]

EXAMPLE = REPO_ROOT / "examples" / "a2a-node"


@dataclass(frozen=True)
class NodeRun:
    returncode: int
    stdout: str
    stderr: str

    @property
    def events(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.stdout.splitlines() if line.startswith("{")]

    def __str__(self) -> str:
        return f"exit {self.returncode}\n--- stdout\n{self.stdout}\n--- stderr\n{self.stderr}"


@dataclass
class NodeA2a:
    dir: Any
    mesh: A2aMesh

    async def run(self, *args: str) -> NodeRun:
        files = self.mesh.client_files
        env = {k: v for k, v in os.environ.items() if not k.startswith("HIVEWIRE_")}
        code, out, err = await run_command(
            "node", str(self.dir / "a2a.mjs"), *args,
            "--url", self.mesh.base_url,
            "--ca", str(files.ca), "--cert", str(files.cert), "--key", str(files.key),
            cwd=self.dir, env=env, timeout=90,
        )  # fmt: skip
        return NodeRun(code, out, err)


@pytest.fixture(scope="module")
def node_dir(tmp_path_factory: pytest.TempPathFactory) -> Any:
    files = ("package.json", "package-lock.json", "a2a.mjs")
    return install_example(tmp_path_factory, EXAMPLE, files, what="A2A Node.js client example")


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def node(
    pki: Pki, tmp_path_factory: pytest.TempPathFactory, node_dir: Any
) -> AsyncIterator[NodeA2a]:
    async with a2a_mesh(pki, tmp_path_factory.mktemp("e2e-a2a-node")) as mesh:
        yield NodeA2a(node_dir, mesh)


async def hivewire_task(node: NodeA2a, task_id: str) -> coordinator_pb2.Task:
    response = await node.mesh.coordinator_stub.GetTask(
        coordinator_pb2.GetTaskRequest(task_id=task_id), timeout=10
    )
    return response.task


async def test_the_card_round_trips_through_the_sdk_types(node: NodeA2a) -> None:
    result = await node.run("card")
    assert result.returncode == 0, result
    [card] = result.events
    assert card["roundTrip"] is True
    assert set(SKILLS) <= set(card["skills"])
    assert f"JSONRPC {node.mesh.base_url}" in card["interfaces"]
    assert f"GRPC {node.mesh.grpc_address}" in card["interfaces"]
    assert card["streaming"] is True and card["security"] == ["mtls"]


async def test_streams_a_skill_to_completion(node: NodeA2a) -> None:
    result = await node.run("stream", "spell", "red green blue")
    assert result.returncode == 0, result
    events = result.events
    assert events[0]["event"] == "task" and events[0]["state"] == "TASK_STATE_SUBMITTED"
    words = [e for e in events if e["event"] == "artifactUpdate" and e["artifactId"] == "words"]
    assert "".join(p["text"] for e in words for p in e["parts"]) == "red green blue "
    [final] = [e for e in events if e["event"] == "artifactUpdate" and e["artifactId"] == "result"]
    assert final["parts"] == [{"data": {"words": 3, "text": "red green blue"}}]
    assert events[-1]["state"] == "TASK_STATE_COMPLETED"
    task = await hivewire_task(node, events[0]["id"])
    assert task.state == common_pb2.TASK_STATE_SUCCEEDED


async def test_cancels_a_task_mid_way(node: NodeA2a) -> None:
    result = await node.run("cancel", "wait")
    assert result.returncode == 0, result
    [cancelled] = [e for e in result.events if e["event"] == "cancelled"]
    assert cancelled["state"] == "TASK_STATE_CANCELED"
    assert result.events[-1]["state"] == "TASK_STATE_CANCELED"
    task = await hivewire_task(node, cancelled["id"])
    assert task.state == common_pb2.TASK_STATE_CANCELLED


async def test_answers_an_input_request(node: NodeA2a) -> None:
    result = await node.run("ask", "greet", "Linus")
    assert result.returncode == 0, result
    asked = [e for e in result.events if e.get("state") == "TASK_STATE_INPUT_REQUIRED"]
    assert asked and asked[0]["text"] == "What is your name?"
    [final] = [e for e in result.events if e["event"] == "artifactUpdate"]
    assert final["parts"] == [{"text": "hello, Linus"}]
    assert result.events[-1]["state"] == "TASK_STATE_COMPLETED"


async def test_resubscribes_from_the_sequence_cursor(node: NodeA2a) -> None:
    first = await node.run("stream", "spell", "one two three four")
    assert first.returncode == 0, first
    task_id = first.events[0]["id"]
    sequences = [e["sequence"] for e in first.events[1:]]
    cursor = sequences[len(sequences) // 2]
    resumed = await node.run("resubscribe", task_id, "--after-sequence", str(cursor))
    assert resumed.returncode == 0, resumed
    assert resumed.events[0]["event"] == "task"
    assert [e["sequence"] for e in resumed.events[1:]] == [s for s in sequences if s > cursor]
