"""End to end with real processes over mTLS: nats-server, the coordinator, agent processes.

One mesh per module (starting processes is the slow part): a coordinator process, three
agent processes of an SDK agent and the calculator example agent, all found through the
embedded NATS registry. Clients are real gRPC clients and the real grpcurl binary.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import grpc
import pytest
import pytest_asyncio
from google.protobuf import json_format, struct_pb2

from hivewire.common.v1 import common_pb2
from hivewire.coordinator.v1 import coordinator_pb2, coordinator_pb2_grpc
from hivewire.services.runtime.channels import secure_channel
from tests.conftest import Pki
from tests.helpers import NatsServer, ServiceProcess, eventually, grpcurl
from tests.support.e2e_mesh import (
    CALCULATOR,
    PACED,
    agent_process,
    coordinator_process,
    wait_for_agents,
)

pytestmark = [pytest.mark.asyncio(loop_scope="module"), pytest.mark.timeout(120)]

S = common_pb2
C = coordinator_pb2


@dataclass
class E2EMesh:
    pki: Pki
    coordinator: ServiceProcess
    agents: list[ServiceProcess]
    client: coordinator_pb2_grpc.CoordinatorServiceAsyncStub

    @property
    def address(self) -> str:
        return self.coordinator.address


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def mesh(pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[E2EMesh]:
    workdir = tmp_path_factory.mktemp("e2e-tasks")
    async with contextlib.AsyncExitStack() as stack:
        # The mesh's NATS as `hivewire up` serves it: mTLS and per-identity permissions.
        nats = await stack.enter_async_context(NatsServer(workdir / "nats", certs_dir=pki.dir))
        coordinator = await stack.enter_async_context(
            coordinator_process(
                workdir, certs_dir=pki.dir, nats_url=nats.url, db_path=workdir / "c.db"
            )
        )
        agents = [
            agent_process(workdir, PACED, name=f"paced-{i}", certs_dir=pki.dir, nats_url=nats.url)
            for i in range(3)
        ]
        agents.append(
            agent_process(
                workdir, CALCULATOR, name="calculator", certs_dir=pki.dir, nats_url=nats.url
            )
        )
        await asyncio.gather(*(a.start() for a in agents))
        for agent in agents:
            stack.push_async_callback(agent.terminate)
        channel = secure_channel(coordinator.address, pki.files("client"))
        stack.push_async_callback(channel.close)
        client: coordinator_pb2_grpc.CoordinatorServiceAsyncStub = (
            coordinator_pb2_grpc.CoordinatorServiceStub(channel)
        )
        await wait_for_agents(client, 4)
        yield E2EMesh(pki, coordinator, agents, client)


def spec(
    capability: str, *, text: str = "", data: dict[str, Any] | None = None, **kw: Any
) -> C.TaskSpec:
    payload = S.Payload(text=text)
    if data is not None:
        payload.json.CopyFrom(json_format.ParseDict(data, struct_pb2.Struct()))
    return C.TaskSpec(capability=capability, input=payload, **kw)


def assert_contiguous(events: list[C.TaskEvent], start: int = 1) -> None:
    sequences = [e.sequence for e in events]
    assert sequences == list(range(start, start + len(sequences))), sequences


async def watch(mesh: E2EMesh, task_id: str, after: int = 0) -> list[C.TaskEvent]:
    return [
        r.event
        async for r in mesh.client.WatchTask(
            C.WatchTaskRequest(task_id=task_id, after_sequence=after)
        )
    ]


async def test_submit_streams_live_progress_to_the_result(mesh: E2EMesh) -> None:
    call = mesh.client.StreamTask(
        C.StreamTaskRequest(spec=spec("calculate", text="1 + 2; 6 * 7; 2 ** 10"))
    )
    events = [r.event async for r in call]
    assert events[0].HasField("snapshot")
    assert_contiguous(events[1:], start=2)
    progress = [e.progress for e in events if e.HasField("progress")]
    assert [p.step for p in progress] == ["plan", "evaluate", "evaluate", "evaluate"]
    assert [p.fraction for p in progress] == sorted(p.fraction for p in progress)
    finished = events[-1].finished
    assert finished.state == S.TASK_STATE_SUCCEEDED
    assert finished.output.text.splitlines() == ["1 + 2 = 3", "6 * 7 = 42", "2 ** 10 = 1024"]
    task = (await mesh.client.GetTask(C.GetTaskRequest(task_id=events[0].snapshot.task_id))).task
    assert task.state == S.TASK_STATE_SUCCEEDED and len(task.attempts) == 1


async def test_cancel_mid_run(mesh: E2EMesh) -> None:
    task = (await mesh.client.SubmitTask(C.SubmitTaskRequest(spec=spec("forever")))).task
    call = mesh.client.WatchTask(C.WatchTaskRequest(task_id=task.task_id))
    events: list[C.TaskEvent] = []
    async for response in call:
        events.append(response.event)
        if response.event.HasField("progress"):
            cancelled = await mesh.client.CancelTask(
                C.CancelTaskRequest(task_id=task.task_id, reason="enough")
            )
            assert cancelled.task.state == S.TASK_STATE_CANCELLED
            break
    events += [r.event async for r in call]
    assert events[-1].finished.state == S.TASK_STATE_CANCELLED
    assert_contiguous(events)

    # The agent's handler was cancelled: its slot frees up.
    async def idle() -> None:
        response = await mesh.client.ListAgents(C.ListAgentsRequest(capability="forever"))
        assert sum(a.in_flight for a in response.agents) == 0

    await eventually(idle, timeout=10)
    again = await mesh.client.CancelTask(C.CancelTaskRequest(task_id=task.task_id))
    assert again.task.state == S.TASK_STATE_CANCELLED


async def test_input_through_a_session(mesh: E2EMesh) -> None:
    call = mesh.client.Session()
    await call.write(
        C.SessionRequest(
            start=C.SessionStart(
                client_ref="solve", spec=spec("solve", data={"expression": "x * 6"})
            )
        )
    )
    await call.write(
        C.SessionRequest(start=C.SessionStart(client_ref="ask", spec=spec("ask", text="name?")))
    )
    finished: dict[str, C.TaskFinished] = {}
    refs: dict[str, str] = {}
    answers = {"solve": "7", "ask": "Ada"}
    async for response in call:
        if response.HasField("accepted"):
            refs[response.accepted.task_id] = response.accepted.client_ref
        elif response.HasField("event"):
            event = response.event
            if event.HasField("input_required"):
                await call.write(
                    C.SessionRequest(
                        input=C.SessionInput(
                            task_id=event.task_id,
                            response=S.InputResponse(
                                request_id=event.input_required.request_id,
                                value=S.Payload(text=answers[refs[event.task_id]]),
                            ),
                        )
                    )
                )
            if event.HasField("finished"):
                finished[refs[event.task_id]] = event.finished
                if len(finished) == 2:
                    await call.done_writing()
        else:
            pytest.fail(f"rejected: {response.rejected}")
    assert finished["solve"].output.text == "x * 6 = 42"
    assert finished["ask"].output.text == "answer:Ada"


async def test_reconnect_mid_stream_sees_every_event_once(mesh: E2EMesh) -> None:
    task = (
        await mesh.client.SubmitTask(
            C.SubmitTaskRequest(spec=spec("count", data={"steps": 40, "interval": 0.01}))
        )
    ).task
    call = mesh.client.WatchTask(C.WatchTaskRequest(task_id=task.task_id))
    seen: list[C.TaskEvent] = []
    async for response in call:
        seen.append(response.event)
        if len(seen) == 12:
            break
    call.cancel()
    rest = await watch(mesh, task.task_id, after=seen[-1].sequence)
    everything = seen + rest
    assert_contiguous(everything)
    assert len([e for e in everything if e.HasField("progress")]) == 40
    assert everything[-1].finished.state == S.TASK_STATE_SUCCEEDED


async def test_two_hundred_concurrent_tasks_over_three_agents(mesh: E2EMesh) -> None:
    priorities = [S.PRIORITY_LOW, S.PRIORITY_MEDIUM, S.PRIORITY_HIGH, S.PRIORITY_CRITICAL]
    responses = await asyncio.gather(
        *(
            mesh.client.SubmitTask(
                C.SubmitTaskRequest(
                    spec=spec("count", text=str(i), data={"steps": 2}, priority=priorities[i % 4])
                )
            )
            for i in range(200)
        )
    )
    ids = [r.task.task_id for r in responses]
    assert len(set(ids)) == 200
    results = await asyncio.gather(*(watch(mesh, task_id) for task_id in ids))
    for task_id, events in zip(ids, results, strict=True):
        assert_contiguous(events)
        assert events[-1].finished.state == S.TASK_STATE_SUCCEEDED, task_id
        # Ran exactly once: one attempt, one assignment.
        assignments = [
            e
            for e in events
            if e.HasField("state_changed") and e.state_changed.to_state == S.TASK_STATE_ASSIGNED
        ]
        assert len(assignments) == 1
        assert events[-1].finished.output.json["attempt"] == 1
    agents = {
        e.state_changed.agent_id
        for events in results
        for e in events
        if e.HasField("state_changed") and e.state_changed.to_state == S.TASK_STATE_ASSIGNED
    }
    assert len(agents) == 3


async def test_grpcurl_stream_task(mesh: E2EMesh) -> None:
    request = {"spec": {"capability": "count", "input": {"json": {"steps": 3}}}}
    result = await grpcurl(
        "hivewire.coordinator.v1.CoordinatorService/StreamTask",
        tls=mesh.pki.files("client"),
        address=mesh.address,
        flags=["-d", json.dumps(request)],
    )
    assert result.returncode == 0, result
    messages = [m["event"] for m in result.messages()]
    assert "snapshot" in messages[0]
    assert [m["sequence"] for m in messages[1:]] == [str(n) for n in range(2, len(messages) + 1)]
    assert messages[-1]["finished"]["state"] == "TASK_STATE_SUCCEEDED"
    assert len([m for m in messages if "progress" in m]) == 3


async def test_grpcurl_session_from_stdin(mesh: E2EMesh) -> None:
    lines = [
        {
            "start": {
                "clientRef": "a",
                "spec": {"capability": "calculate", "input": {"text": "2 + 2"}},
            }
        },
        {
            "start": {
                "clientRef": "b",
                "spec": {"capability": "count", "input": {"json": {"steps": 2}}},
            }
        },
        {"start": {"clientRef": "bad", "spec": {"capability": ""}}},
    ]
    result = await grpcurl(
        "hivewire.coordinator.v1.CoordinatorService/Session",
        tls=mesh.pki.files("client"),
        address=mesh.address,
        input="\n".join(json.dumps(line) for line in lines),
    )
    assert result.returncode == 0, result
    messages = result.messages()
    # grpcurl prints proto field names (snake_case); it accepts either form as input.
    accepted = {
        m["accepted"]["client_ref"]: m["accepted"]["task_id"] for m in messages if "accepted" in m
    }
    assert set(accepted) == {"a", "b"}
    rejected = [m["rejected"] for m in messages if "rejected" in m]
    assert rejected[0]["client_ref"] == "bad" and rejected[0]["error"]["code"] == "INVALID_ARGUMENT"
    finished = {
        m["event"]["task_id"]: m["event"]["finished"]
        for m in messages
        if "finished" in m.get("event", {})
    }
    assert finished[accepted["a"]]["output"]["text"] == "2 + 2 = 4"
    assert finished[accepted["b"]]["state"] == "TASK_STATE_SUCCEEDED"


async def test_grpcurl_errors_carry_the_status(mesh: E2EMesh) -> None:
    result = await grpcurl(
        "hivewire.coordinator.v1.CoordinatorService/GetTask",
        tls=mesh.pki.files("client"),
        address=mesh.address,
        flags=["-d", '{"taskId": "no-such-task"}'],
    )
    assert result.returncode == 64 + grpc.StatusCode.NOT_FOUND.value[0], result
    listing = await grpcurl("list", tls=mesh.pki.files("client"), address=mesh.address)
    assert "hivewire.coordinator.v1.CoordinatorService" in listing.stdout.split()


async def test_grpcurl_submit_then_watch_from_a_sequence(mesh: E2EMesh) -> None:
    request = {
        "spec": {
            "capability": "calculate",
            "input": {"text": "2 ** 10"},
            "priority": "PRIORITY_HIGH",
            "timeout": "30s",
            "idempotencyKey": "grpcurl-demo-1",
        }
    }
    method = "hivewire.coordinator.v1.CoordinatorService/"
    files = mesh.pki.files("client")
    submitted = await grpcurl(
        method + "SubmitTask", tls=files, address=mesh.address, flags=["-d", json.dumps(request)]
    )
    assert submitted.returncode == 0, submitted
    task = submitted.json()["task"]
    assert task["spec"]["priority"] == "PRIORITY_HIGH" and task["spec"]["timeout"] == "30s"
    watched = await grpcurl(
        method + "WatchTask",
        tls=files,
        address=mesh.address,
        flags=["-d", json.dumps({"taskId": task["task_id"], "afterSequence": 3})],
    )
    assert watched.returncode == 0, watched
    events = [m["event"] for m in watched.messages()]
    assert events[0]["sequence"] == "4"
    assert events[-1]["finished"]["output"]["text"] == "2 ** 10 = 1024"
