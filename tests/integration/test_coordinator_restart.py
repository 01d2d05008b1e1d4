"""Durability across a coordinator restart (in-process; the kill -9 case is in tests/e2e)."""

from __future__ import annotations

from pathlib import Path

import pytest

from hivewire.common.v1 import common_pb2
from hivewire.coordinator.v1 import coordinator_pb2
from tests.conftest import Pki
from tests.helpers import eventually
from tests.support.coordinator_mesh import assert_contiguous, collect, spec, start_mesh

pytestmark = pytest.mark.timeout(60)

S = common_pb2
C = coordinator_pb2


async def test_unfinished_tasks_survive_a_restart(pki: Pki, tmp_path: Path) -> None:
    db = tmp_path / "coordinator.db"
    async with start_mesh(pki.dir, db) as mesh:
        agent = await mesh.agent()
        client = mesh.client()
        running = (
            await client.SubmitTask(
                C.SubmitTaskRequest(spec=spec(script={"steps": 2, "hold": "never"}))
            )
        ).task
        queued = (await client.SubmitTask(C.SubmitTaskRequest(spec=spec("later")))).task
        keyed = (await client.SubmitTask(C.SubmitTaskRequest(spec=spec("later", key="k-1")))).task
        done = (await client.SubmitTask(C.SubmitTaskRequest(spec=spec()))).task
        await collect(client.WatchTask(C.WatchTaskRequest(task_id=done.task_id)))

        async def progressed() -> None:
            task = (await client.GetTask(C.GetTaskRequest(task_id=running.task_id))).task
            assert task.progress.step == "step-2"

        await eventually(progressed)
        before = await collect(client.WatchTask(C.WatchTaskRequest(task_id=done.task_id)))
        seen_running = []
        async for response in client.WatchTask(C.WatchTaskRequest(task_id=running.task_id)):
            seen_running.append(response.event)
            if response.event.HasField("progress") and response.event.progress.step == "step-2":
                break
        # Stop the coordinator first (as a SIGTERM would), while the agent still runs.
        await mesh.running.coordinator.stop()
    # The coordinator stopped with one task running and two queued.
    assert agent.stats.executions[0].attempt == 1

    async with start_mesh(pki.dir, db) as mesh:
        client = mesh.client()
        after = (await client.GetTask(C.GetTaskRequest(task_id=running.task_id))).task
        assert after.state == S.TASK_STATE_QUEUED
        assert after.attempts[0].error.reason == "COORDINATOR_RESTARTED"
        again = await client.SubmitTask(C.SubmitTaskRequest(spec=spec("later", key="k-1")))
        assert again.deduplicated and again.task.task_id == keyed.task_id

        agent = await mesh.agent(capabilities=("echo", "later"))
        results = {
            t.task_id: await collect(client.WatchTask(C.WatchTaskRequest(task_id=t.task_id)))
            for t in (queued, keyed)
        }
        for events in results.values():
            assert_contiguous(events)
            assert events[-1].finished.state == S.TASK_STATE_SUCCEEDED
        # The interrupted task runs again as attempt 2; a client resuming its watch
        # continues exactly where it stopped.
        agent.gate("never").set()
        resumed = await collect(
            client.WatchTask(
                C.WatchTaskRequest(
                    task_id=running.task_id, after_sequence=seen_running[-1].sequence
                )
            )
        )
        assert_contiguous(seen_running + resumed)
        assert resumed[-1].finished.state == S.TASK_STATE_SUCCEEDED
        attempts = [e.attempt for e in agent.stats.executions if e.task_id == running.task_id]
        assert attempts == [2]
        # Finished tasks keep their whole history.
        assert await collect(client.WatchTask(C.WatchTaskRequest(task_id=done.task_id))) == before
        assert sorted(e.task_id for e in agent.stats.executions) == sorted(
            [running.task_id, queued.task_id, keyed.task_id]
        )
