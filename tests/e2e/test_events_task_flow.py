"""A whole task through real processes produces the expected task.* events on NATS.

nats-server, the coordinator process and the calculator example agent, as in
``make run``: the events a subscriber reads from JetStream line up, by task sequence,
with the events a client saw on the coordinator's gRPC stream.
"""

from __future__ import annotations

import contextlib
from collections import Counter
from pathlib import Path

import pytest

from hivewire.common.v1 import common_pb2
from hivewire.coordinator.v1 import coordinator_pb2, coordinator_pb2_grpc
from hivewire.services.runtime import metadata as md
from hivewire.services.runtime.channels import secure_channel
from hivewire.services.runtime.events import (
    HEADER_CORRELATION_ID,
    HEADER_MSG_ID,
    ReceivedEvent,
    replay,
    subscribe,
)
from tests.conftest import Pki
from tests.helpers import NatsServer, eventually
from tests.support.e2e_mesh import CALCULATOR, agent_process, coordinator_process, wait_for_agents

pytestmark = pytest.mark.timeout(120)

C = coordinator_pb2


async def task_events(nats: NatsServer, task_id: str) -> list[ReceivedEvent]:
    # Read as the client identity: an event reader of the mesh's mTLS NATS.
    reader = nats.client_options("client")
    return [
        r
        async for r in replay(nats.url, "task.*", nats_options=reader)
        if r.event.subject == task_id
    ]


async def test_a_task_produces_its_events_in_order(pki: Pki, tmp_path: Path) -> None:
    async with contextlib.AsyncExitStack() as stack:
        nats = await stack.enter_async_context(NatsServer(tmp_path / "nats", certs_dir=pki.dir))
        coordinator = await stack.enter_async_context(
            coordinator_process(
                tmp_path, certs_dir=pki.dir, nats_url=nats.url, db_path=tmp_path / "c.db"
            )
        )
        agent = await stack.enter_async_context(
            agent_process(
                tmp_path, CALCULATOR, name="calculator", certs_dir=pki.dir, nats_url=nats.url
            )
        )
        assert agent.running
        channel = secure_channel(coordinator.address, pki.files("client"))
        stack.push_async_callback(channel.close)
        client: coordinator_pb2_grpc.CoordinatorServiceAsyncStub = (
            coordinator_pb2_grpc.CoordinatorServiceStub(channel)
        )
        await wait_for_agents(client, 1)

        spec = C.TaskSpec(capability="calculate", input=common_pb2.Payload(text="1 + 2; 3 * 4"))
        call = client.StreamTask(
            C.StreamTaskRequest(spec=spec), metadata=((md.CORRELATION_ID, "cid-events-e2e"),)
        )
        grpc_events = [r.event async for r in call]
        task_id = grpc_events[0].snapshot.task_id
        finished = grpc_events[-1]
        assert finished.finished.state == common_pb2.TASK_STATE_SUCCEEDED

        async def completed() -> list[ReceivedEvent]:
            found = await task_events(nats, task_id)
            assert found and found[-1].type == "task.completed"
            return found

        on_nats: list[ReceivedEvent] = await eventually(completed, timeout=30)

        types = [r.type for r in on_nats]
        assert types[:3] == ["task.created", "task.assigned", "task.started"]
        assert types[-1] == "task.completed"
        assert "task.progress" in types
        # Every event of the task is on NATS, once, in order, with its gRPC sequence and
        # its deterministic id: a consumer tells a lost event by a gap.
        stored = [r.event async for r in client.WatchTask(C.WatchTaskRequest(task_id=task_id))]
        stored = [e for e in stored if not e.HasField("snapshot")]
        assert [e.sequence for e in stored] == list(range(1, finished.sequence + 1))
        assert [r.event.task_sequence for r in on_nats] == [e.sequence for e in stored]
        for received, counterpart in zip(on_nats, stored, strict=True):
            assert received.event.task.event == counterpart
            assert received.event.id == f"{task_id}:{counterpart.sequence}"
            kind = counterpart.WhichOneof("kind")
            if kind in ("progress", "partial", "activity", "step", "input_required"):
                assert received.type == f"task.{kind}"
            if received.type == "task.progress":
                assert received.event.task.progress == counterpart.progress
        assert {"task.state_changed", "task.activity"} <= set(types)
        for received in on_nats:
            assert received.event.correlation_id == "cid-events-e2e"
            assert received.headers[HEADER_CORRELATION_ID] == "cid-events-e2e"
            assert received.headers[HEADER_MSG_ID] == received.event.id
            assert received.event.source.startswith("coordinator/")
            assert received.event.task.task_id == task_id
        assert on_nats[-1].event.task.state == common_pb2.TASK_STATE_SUCCEEDED

        # A durable subscriber sees the same events, each once.
        calls: Counter[str] = Counter()

        async def handler(received: ReceivedEvent) -> None:
            if received.event.subject == task_id:
                calls[received.id] += 1

        async with subscribe(
            nats.url,
            "task.*",
            handler,
            durable="e2e-audit",
            nats_options=nats.client_options("client"),
        ):
            await eventually(lambda: len(calls) == len(on_nats), timeout=20)
        assert set(calls.values()) == {1}
        assert set(calls) == {r.id for r in on_nats}


async def test_a_plan_publishes_its_workflow_events_with_its_sequence(
    pki: Pki, tmp_path: Path
) -> None:
    async with contextlib.AsyncExitStack() as stack:
        nats = await stack.enter_async_context(NatsServer(tmp_path / "nats", certs_dir=pki.dir))
        coordinator = await stack.enter_async_context(
            coordinator_process(
                tmp_path, certs_dir=pki.dir, nats_url=nats.url, db_path=tmp_path / "c.db"
            )
        )
        await stack.enter_async_context(
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
        plan = C.Plan(
            steps=[
                C.PlanStep(
                    step_id="a", capability="calculate", input=common_pb2.Payload(text="1+1")
                ),
                C.PlanStep(
                    step_id="b",
                    capability="calculate",
                    input=common_pb2.Payload(text="2+2"),
                    depends_on=["a"],
                ),
            ]
        )
        submitted = (await client.SubmitTask(C.SubmitTaskRequest(spec=C.TaskSpec(plan=plan)))).task
        grpc_events = [
            r.event async for r in client.WatchTask(C.WatchTaskRequest(task_id=submitted.task_id))
        ]
        assert grpc_events[-1].finished.state == common_pb2.TASK_STATE_SUCCEEDED

        async def completed() -> list[ReceivedEvent]:
            found = [
                r
                async for r in replay(
                    nats.url, "workflow.*", nats_options=nats.client_options("client")
                )
                if r.event.subject == submitted.task_id
            ]
            assert found and found[-1].type == "workflow.completed"
            return found

        on_nats: list[ReceivedEvent] = await eventually(completed, timeout=30)
        types = [r.type for r in on_nats]
        assert types == [
            "workflow.started",
            "workflow.step_completed",
            "workflow.step_completed",
            "workflow.completed",
        ]
        assert [r.event.workflow.step_id for r in on_nats[1:3]] == ["a", "b"]
        # Each carries the sequence of the parent event it reports, as on gRPC.
        by_sequence = {e.sequence: e for e in grpc_events}
        for received in on_nats:
            assert received.event.task_sequence in by_sequence
        finished_steps = [
            e.sequence
            for e in grpc_events
            if e.HasField("step") and e.step.kind == C.STEP_EVENT_KIND_FINISHED
        ]
        assert [r.event.task_sequence for r in on_nats[1:3]] == finished_steps
        assert on_nats[-1].event.task_sequence == grpc_events[-1].sequence
        # The steps' own task.* events are there too.
        step_ids = {
            t.task_id
            for t in (
                await client.ListTasks(C.ListTasksRequest(parent_task_id=submitted.task_id))
            ).tasks
        }
        assert len(step_ids) == 2
        for step_id in step_ids:
            found = await task_events(nats, step_id)
            assert found[-1].type == "task.completed"
