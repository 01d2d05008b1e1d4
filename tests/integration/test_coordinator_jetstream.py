"""A real coordinator on the JetStream store: tasks, plans and a restart, on a real nats-server.

The store contract itself runs against both backends in tests/unit/test_coordinator_store.py;
here the whole coordinator runs on JetStream, and a second coordinator process life picks
the work up from the same buckets and stream.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from hivewire.common.v1 import common_pb2
from hivewire.coordinator.v1 import coordinator_pb2
from hivewire.discovery.static import StaticRegistry
from tests.conftest import Pki
from tests.helpers import NatsServer, eventually
from tests.support.coordinator_mesh import assert_contiguous, collect, jetstream_mesh

pytestmark = pytest.mark.timeout(90)

S = common_pb2
C = coordinator_pb2


async def test_a_coordinator_on_jetstream_runs_plans_and_resumes_after_a_restart(
    pki: Pki, tmp_path: Path
) -> None:
    async with NatsServer(tmp_path / "nats") as nats, StaticRegistry() as registry:
        async with jetstream_mesh(pki.dir, nats.url, registry) as mesh:
            agent = await mesh.agent(max_concurrency=4)
            client = mesh.client()
            done = await collect(
                client.StreamTask(
                    C.StreamTaskRequest(
                        spec=C.TaskSpec(
                            plan=C.Plan(
                                steps=[
                                    C.PlanStep(step_id="a", capability="echo"),
                                    C.PlanStep(step_id="b", capability="echo", depends_on=["a"]),
                                ]
                            )
                        )
                    )
                )
            )
            assert done[-1].finished.state == S.TASK_STATE_SUCCEEDED
            plan_id = done[0].task_id
            hold = C.TaskSpec(
                capability="echo",
                input=S.Payload(text="later"),
                idempotency_key="k-1",
            )
            hold.input.json.update({"hold": "never", "steps": 1})
            held = (await client.SubmitTask(C.SubmitTaskRequest(spec=hold))).task

            async def progressed() -> None:
                task = (await client.GetTask(C.GetTaskRequest(task_id=held.task_id))).task
                assert task.progress.step == "step-1"

            await eventually(progressed)
            await mesh.running.coordinator.stop()
        assert len(agent.stats.executions) == 3

        async with jetstream_mesh(pki.dir, nats.url, registry) as mesh:
            agent = await mesh.agent(max_concurrency=4)
            agent.gate("never").set()
            client = mesh.client()
            again = await client.SubmitTask(C.SubmitTaskRequest(spec=hold))
            assert again.deduplicated and again.task.task_id == held.task_id
            events = await collect(client.WatchTask(C.WatchTaskRequest(task_id=held.task_id)))
            assert_contiguous(events)
            assert events[-1].finished.state == S.TASK_STATE_SUCCEEDED
            task = (await client.GetTask(C.GetTaskRequest(task_id=held.task_id))).task
            assert task.attempts[0].error.reason == "COORDINATOR_RESTARTED"
            # The finished plan's whole journal is still there, gap-free.
            plan_events = await collect(client.WatchTask(C.WatchTaskRequest(task_id=plan_id)))
            assert_contiguous(plan_events)
            assert plan_events[-1].finished.state == S.TASK_STATE_SUCCEEDED
            steps = (await client.ListTasks(C.ListTasksRequest(parent_task_id=plan_id))).tasks
            assert sorted(t.step_id for t in steps) == ["a", "b"]
