"""Bounded retention on a real coordinator: purge of finished tasks, tombstones, key windows."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest

from hivewire.coordinator.v1 import coordinator_pb2
from hivewire.services.coordinator.model import now_ns
from tests.conftest import Pki
from tests.helpers import eventually
from tests.integration.test_coordinator_cli import cli
from tests.support.coordinator_mesh import Mesh, collect, error_of, spec, start_mesh

pytestmark = pytest.mark.timeout(60)

HOUR_NS = 3600 * 10**9


async def finished_task(mesh: Mesh, **kwargs: object) -> str:
    client = mesh.client()
    submitted = await client.SubmitTask(coordinator_pb2.SubmitTaskRequest(spec=spec(**kwargs)))  # type: ignore[arg-type]
    task_id = submitted.task.task_id
    await collect(client.WatchTask(coordinator_pb2.WatchTaskRequest(task_id=task_id)))
    return task_id


async def reason_of_get(mesh: Mesh, task_id: str, stem: str = "client") -> str:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await mesh.client(stem).GetTask(coordinator_pb2.GetTaskRequest(task_id=task_id))
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    return error_of(caught.value).reason


async def test_a_purged_task_is_gone_and_says_so(pki: Pki, tmp_path: Path) -> None:
    async with start_mesh(
        pki.dir, tmp_path / "c.db", finished_cache_size=0, task_retention=3600
    ) as mesh:
        await mesh.agent()
        done = await finished_task(mesh)
        running = await mesh.client().SubmitTask(
            coordinator_pb2.SubmitTaskRequest(spec=spec(script={"hang": True}))
        )
        assert mesh.running.retention is not None

        # Within the retention nothing goes.
        assert (await mesh.running.retention.purge_once()).tasks == 0
        # Two hours later the finished task goes, the running one stays.
        result = await mesh.running.retention.purge_once(now=now_ns() + 2 * HOUR_NS)
        assert result.tasks == 1

        assert await reason_of_get(mesh, done) == "TASK_PURGED"
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await collect(mesh.client().WatchTask(coordinator_pb2.WatchTaskRequest(task_id=done)))
        assert error_of(caught.value).reason == "TASK_PURGED"
        assert "purged" in (caught.value.details() or "")
        # Someone else learns nothing, and an id that never existed is just unknown.
        pki.issue(role="client", name="mallory", stem="client-mallory")
        assert await reason_of_get(mesh, done, "client-mallory") == "TASK_NOT_FOUND"
        assert await reason_of_get(mesh, "0" * 32) == "TASK_NOT_FOUND"

        still = await mesh.client().GetTask(
            coordinator_pb2.GetTaskRequest(task_id=running.task.task_id)
        )
        assert still.task.task_id == running.task.task_id
        listed = await mesh.client().ListTasks(coordinator_pb2.ListTasksRequest())
        assert [t.task_id for t in listed.tasks] == [running.task.task_id]

        # The command line says it in one line, with its own exit status.
        shown = await cli(mesh, "tasks", running.task.task_id)
        assert shown.code == 0 and running.task.task_id in shown.out, shown
        purged = await cli(mesh, "tasks", done)
        assert purged.code == 5, purged
        assert purged.err.startswith("Error: NOT_FOUND TASK_PURGED: "), purged.err
        assert "purged" in purged.err and len(purged.err.splitlines()) == 1


async def test_the_background_purge_runs_by_itself(pki: Pki, tmp_path: Path) -> None:
    async with start_mesh(
        pki.dir,
        tmp_path / "c.db",
        finished_cache_size=0,
        task_retention=0.001,
        purge_interval=0.05,
    ) as mesh:
        await mesh.agent()
        done = await finished_task(mesh)
        client = mesh.client()

        async def purged() -> None:
            try:
                await client.GetTask(coordinator_pb2.GetTaskRequest(task_id=done))
            except grpc.aio.AioRpcError as exc:
                assert error_of(exc).reason == "TASK_PURGED"
            else:
                raise AssertionError("the task is still there")

        await eventually(purged, timeout=20)
        assert await mesh.running.store.count_tasks() == 0


async def test_an_idempotency_key_answers_only_within_its_window(pki: Pki, tmp_path: Path) -> None:
    # A window of a nanosecond: every resubmission comes after it.
    async with start_mesh(pki.dir, tmp_path / "c.db", idempotency_window=1e-9) as mesh:
        await mesh.agent()
        client = mesh.client()
        first = await finished_task(mesh, key="once-a-day")
        again = await client.SubmitTask(
            coordinator_pb2.SubmitTaskRequest(spec=spec(key="once-a-day"))
        )
        assert not again.deduplicated and again.task.task_id != first
        third = await client.SubmitTask(
            coordinator_pb2.SubmitTaskRequest(spec=spec(key="once-a-day"))
        )
        assert not third.deduplicated
        assert len({first, again.task.task_id, third.task.task_id}) == 3
        # The earlier tasks are still there, only their key is free.
        old = await client.GetTask(coordinator_pb2.GetTaskRequest(task_id=first))
        assert old.task.task_id == first

    # Within the (default, 24 h) window the key answers with its task.
    async with start_mesh(pki.dir, tmp_path / "d.db") as mesh:
        await mesh.agent()
        client = mesh.client()
        first = await finished_task(mesh, key="k")
        again = await client.SubmitTask(coordinator_pb2.SubmitTaskRequest(spec=spec(key="k")))
        assert again.deduplicated and again.task.task_id == first
