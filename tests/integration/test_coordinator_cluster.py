"""Two coordinators on one JetStream store: each task has one owner, clients use either.

Real coordinators (gRPC over mTLS) on a real nats-server, sharing a scripted agent. A
task runs on the coordinator that accepted it; the other one follows its events from
the journal, forwards cancels, answers and sub-tasks to the owner, and takes the task
over when the owner stops. tests/chaos/test_coordinator_cluster_kill.py kills them.
"""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path

import grpc
import pytest

from hivewire.common.v1 import common_pb2
from hivewire.coordinator.v1 import coordinator_pb2, coordinator_pb2_grpc
from hivewire.discovery.static import StaticRegistry
from hivewire.services.runtime.channels import secure_channel
from tests.conftest import Pki
from tests.helpers import NatsServer, eventually
from tests.support.coordinator_mesh import (
    Mesh,
    assert_contiguous,
    collect,
    error_of,
    jetstream_mesh,
    spec,
)

pytestmark = pytest.mark.timeout(120)

S = common_pb2
C = coordinator_pb2


def member(
    pki: Pki, nats_url: str, registry: StaticRegistry, workdir: Path
) -> contextlib.AbstractAsyncContextManager[Mesh]:
    """One coordinator of the cluster (its own stack, so a test can stop it alone)."""
    return jetstream_mesh(
        pki.dir,
        nats_url,
        registry,
        db_path=workdir.with_suffix(".db"),
        # Long enough for a loaded machine: takeovers here follow a graceful stop, which
        # deletes the lease key at once.
        lease_ttl=5.0,
        lease_heartbeat=0.2,
        cancel_grace=2.0,
    )


def instance_of(mesh: Mesh) -> str:
    cluster = mesh.running.coordinator._cluster
    assert cluster is not None
    return cluster.instance_id


async def test_any_coordinator_answers_for_a_task_another_one_runs(
    pki: Pki, tmp_path: Path
) -> None:
    async with (
        NatsServer(tmp_path / "nats") as nats,
        StaticRegistry() as registry,
        member(pki, nats.url, registry, tmp_path / "a") as a,
        member(pki, nats.url, registry, tmp_path / "b") as b,
    ):
        agent = await a.agent(capabilities=("echo",), max_concurrency=8)
        on_a, on_b = a.client(), b.client()

        # Input asked on A's task, answered through B; B's watcher sees every event.
        asked = (await on_a.SubmitTask(C.SubmitTaskRequest(spec=spec(script={"ask": "q?"})))).task
        assert asked.coordinator_id == instance_of(a)
        watcher = asyncio.create_task(
            collect(on_b.WatchTask(C.WatchTaskRequest(task_id=asked.task_id), timeout=30))
        )
        outcome_watcher = asyncio.create_task(
            collect(
                on_b.WatchTask(
                    C.WatchTaskRequest(task_id=asked.task_id, outcome_only=True), timeout=30
                )
            )
        )

        async def waiting() -> C.Task:
            task = (await on_b.GetTask(C.GetTaskRequest(task_id=asked.task_id))).task
            assert task.state == S.TASK_STATE_INPUT_REQUIRED
            return task

        pending = (await eventually(waiting)).pending_input
        answered = await on_b.ProvideInput(
            C.ProvideInputRequest(
                task_id=asked.task_id,
                response=S.InputResponse(
                    request_id=pending.request_id, value=S.Payload(text="yes")
                ),
            )
        )
        assert answered.task.state == S.TASK_STATE_RUNNING
        events = await asyncio.wait_for(watcher, 30)
        assert_contiguous(events)
        assert events[-1].finished.output.text == "answer:yes"
        # Following A's journal from B, an outcome-only watcher gets the request, its
        # answer and the end.
        outcome = await asyncio.wait_for(outcome_watcher, 30)
        assert [e.WhichOneof("kind") for e in outcome] == [
            "input_required",
            "state_changed",
            "finished",
        ]
        assert outcome[-1] == events[-1]

        # A cancel sent to B reaches the agent through A.
        hung = (await on_a.SubmitTask(C.SubmitTaskRequest(spec=spec(script={"hang": True})))).task
        await asyncio.wait_for(agent.wait_started(2), 30)
        cancelled = await on_b.CancelTask(C.CancelTaskRequest(task_id=hung.task_id, reason="x"))
        assert cancelled.task.state == S.TASK_STATE_CANCELLED
        await eventually(
            lambda: any(e.cancelled for e in agent.stats.executions if e.task_id == hung.task_id)
        )

        # Someone else's task stays invisible through the other coordinator too.
        other = b.client("agent")
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await other.CancelTask(C.CancelTaskRequest(task_id=asked.task_id))
        assert error_of(refused.value).reason == "TASK_NOT_FOUND"

        # A sub-task submitted to B under A's task is A's: it runs with its parent.
        parent = (await on_a.SubmitTask(C.SubmitTaskRequest(spec=spec(script={"hang": True})))).task
        child_spec = spec(script={"steps": 1})
        child_spec.parent_task_id = parent.task_id
        child = (await on_b.SubmitTask(C.SubmitTaskRequest(spec=child_spec))).task
        assert child.parent_task_id == parent.task_id
        assert child.coordinator_id == instance_of(a)
        child_events = await collect(
            on_b.WatchTask(C.WatchTaskRequest(task_id=child.task_id), timeout=30)
        )
        assert child_events[-1].finished.state == S.TASK_STATE_SUCCEEDED
        await on_b.CancelTask(C.CancelTaskRequest(task_id=parent.task_id))

        # An idempotent resubmission to B returns A's task.
        keyed = spec(script={"steps": 1}, key="once")
        first = (await on_a.SubmitTask(C.SubmitTaskRequest(spec=keyed))).task
        again = await on_b.SubmitTask(C.SubmitTaskRequest(spec=keyed))
        assert again.deduplicated and again.task.task_id == first.task_id


async def test_a_stopped_coordinators_tasks_are_taken_over_and_watched_without_a_gap(
    pki: Pki, tmp_path: Path
) -> None:
    async with (
        NatsServer(tmp_path / "nats") as nats,
        StaticRegistry() as registry,
        member(pki, nats.url, registry, tmp_path / "b") as b,
    ):
        agent = await b.agent(capabilities=("echo",), max_concurrency=16)
        on_b = b.client()
        ids: list[str] = []
        seen: dict[str, list[C.TaskEvent]] = {}
        async with member(pki, nats.url, registry, tmp_path / "a") as a:
            on_a = a.client()
            for _ in range(6):
                held = spec(script={"hold": "h", "steps": 1})
                ids.append((await on_a.SubmitTask(C.SubmitTaskRequest(spec=held))).task.task_id)
            queued = (await on_a.SubmitTask(C.SubmitTaskRequest(spec=spec("nobody")))).task
            await asyncio.wait_for(agent.wait_started(6), 30)

            # A client follows the first task on A until A goes away.
            channel = secure_channel(a.address, pki.files("client"))
            watch_a = coordinator_pb2_grpc.CoordinatorServiceStub(channel)
            seen[ids[0]] = []

            async def follow() -> None:
                with contextlib.suppress(grpc.aio.AioRpcError):
                    async for r in watch_a.WatchTask(C.WatchTaskRequest(task_id=ids[0])):
                        seen[ids[0]].append(r.event)

            follower = asyncio.create_task(follow())
            await eventually(lambda: any(e.HasField("progress") for e in seen[ids[0]]))
            gone = instance_of(a)
        await follower
        await channel.close()

        async def owned_by_b() -> None:
            for task_id in [*ids, queued.task_id]:
                task = (await on_b.GetTask(C.GetTaskRequest(task_id=task_id))).task
                assert task.coordinator_id == instance_of(b), (task_id, task.coordinator_id)

        await eventually(owned_by_b, timeout=20)
        agent.gate("h").set()
        rest = await collect(
            on_b.WatchTask(
                C.WatchTaskRequest(task_id=ids[0], after_sequence=seen[ids[0]][-1].sequence),
                timeout=30,
            )
        )
        assert_contiguous(seen[ids[0]] + rest)
        for task_id in ids:
            events = await collect(on_b.WatchTask(C.WatchTaskRequest(task_id=task_id), timeout=30))
            assert_contiguous(events)
            assert events[-1].finished.state == S.TASK_STATE_SUCCEEDED
            task = (await on_b.GetTask(C.GetTaskRequest(task_id=task_id))).task
            assert task.attempts[0].error.reason == "COORDINATOR_RESTARTED"
            assert gone in task.attempts[0].error.message
            assert [a for a in task.attempts if not a.HasField("error")] == [task.attempts[-1]]
        task = (await on_b.GetTask(C.GetTaskRequest(task_id=queued.task_id))).task
        assert task.state == S.TASK_STATE_QUEUED


async def test_a_coordinator_that_cannot_heartbeat_lets_go_before_a_peer_takes_over(
    pki: Pki, tmp_path: Path
) -> None:
    async with (
        NatsServer(tmp_path / "nats") as nats,
        StaticRegistry() as registry,
        member(pki, nats.url, registry, tmp_path / "b") as b,
        member(pki, nats.url, registry, tmp_path / "a") as a,
    ):
        agent = await a.agent(capabilities=("echo",), max_concurrency=16)
        on_a, on_b = a.client(), b.client()
        ids = []
        for _ in range(3):
            held = spec(script={"hold": "h", "steps": 1})
            ids.append((await on_a.SubmitTask(C.SubmitTaskRequest(spec=held))).task.task_id)
        await asyncio.wait_for(agent.wait_started(3), 30)
        assert agent.stats.in_flight == 3

        # A's heartbeats stop reaching NATS (as when it is cut off from it).
        cluster = a.running.coordinator._cluster
        assert cluster is not None

        async def unreachable() -> bool:
            cluster._healthy_since = None
            return False

        cluster._beat = unreachable  # type: ignore[method-assign]

        async def taken_over() -> None:
            for task_id in ids:
                task = (await on_b.GetTask(C.GetTaskRequest(task_id=task_id))).task
                assert task.coordinator_id == instance_of(b)

        await eventually(taken_over, timeout=30)
        agent.gate("h").set()
        for task_id in ids:
            events = await collect(on_b.WatchTask(C.WatchTaskRequest(task_id=task_id), timeout=30))
            assert_contiguous(events)
            assert [e.finished.state for e in events if e.HasField("finished")] == [
                S.TASK_STATE_SUCCEEDED
            ]
        # A stopped its three attempts before B started its own: never six at once.
        assert agent.stats.max_in_flight == 3
        assert not a.running.coordinator._tasks.active
