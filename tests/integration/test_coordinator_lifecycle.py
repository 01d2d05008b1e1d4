"""Coordinator over real mTLS with real (scripted) agents: submit, stream, watch, cancel, input."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

from hivewire.common.v1 import common_pb2
from hivewire.coordinator.v1 import coordinator_pb2
from hivewire.services.runtime import metadata as md
from tests.conftest import Pki
from tests.helpers import eventually
from tests.support.coordinator_mesh import (
    Mesh,
    assert_contiguous,
    collect,
    error_of,
    kinds,
    spec,
    start_mesh,
)

pytestmark = pytest.mark.timeout(60)

S = common_pb2


@pytest.fixture
async def mesh(pki: Pki, tmp_path: Path) -> AsyncIterator[Mesh]:
    async with start_mesh(pki.dir, tmp_path / "coordinator.db") as m:
        yield m


async def test_submit_then_watch_to_the_result(mesh: Mesh) -> None:
    agent = await mesh.agent()
    client = mesh.client()
    submitted = await client.SubmitTask(
        coordinator_pb2.SubmitTaskRequest(spec=spec(text="hello", script={"steps": 2}))
    )
    task = submitted.task
    assert task.task_id and not submitted.deduplicated
    assert task.state == S.TASK_STATE_QUEUED and task.last_sequence == 1
    assert task.owner == "spiffe://hivewire.local/client/client"
    assert task.spec.priority == S.PRIORITY_MEDIUM
    assert task.spec.timeout.seconds == 300

    events = await collect(client.WatchTask(coordinator_pb2.WatchTaskRequest(task_id=task.task_id)))
    assert_contiguous(events)
    states = [e.state_changed.to_state for e in events if e.HasField("state_changed")]
    assert states == [
        S.TASK_STATE_QUEUED,
        S.TASK_STATE_ASSIGNED,
        S.TASK_STATE_RUNNING,
        S.TASK_STATE_SUCCEEDED,
    ]
    assert kinds(events).count("progress") == 2
    assert events[-1].HasField("finished")
    assert events[-1].finished.output.text == "done:hello"
    assert events[-1].finished.usage.total_tokens == 7

    final = (await client.GetTask(coordinator_pb2.GetTaskRequest(task_id=task.task_id))).task
    assert final.state == S.TASK_STATE_SUCCEEDED
    assert final.last_sequence == events[-1].sequence
    assert final.attempt == 1 and len(final.attempts) == 1
    assert final.attempts[0].agent_id == agent.agent_id
    assert final.attempts[0].HasField("ended_at")
    assert final.output.text == "done:hello"
    assert final.progress.step == "step-2"

    # The agent got the task with its deadline and the metadata every hop carries.
    execution = agent.stats.executions[0]
    assert execution.attempt == 1
    assert execution.metadata[md.TASK_ID] == task.task_id
    assert execution.metadata[md.ATTEMPT] == "1"
    assert execution.metadata[md.CORRELATION_ID] == final.spec.metadata.correlation_id
    # gRPC rounds long deadlines up to whole seconds on the wire.
    assert execution.time_remaining is not None and 0 < execution.time_remaining <= 301.5

    # task.* events went out with the same sequence numbers as the stream.
    published = [(t, seq) for t, s, _, seq in mesh.events.published if s == task.task_id]
    by_type = dict(published)
    assert [t for t, _ in published][0] == "task.created"
    assert by_type["task.created"] == 1
    assert by_type["task.completed"] == events[-1].sequence
    assert {"task.assigned", "task.started", "task.progress"} <= set(by_type)


async def test_stream_task_starts_with_a_snapshot_and_ends_when_finished(mesh: Mesh) -> None:
    await mesh.agent()
    client = mesh.client()
    events = await collect(
        client.StreamTask(coordinator_pb2.StreamTaskRequest(spec=spec(script={"partials": 3})))
    )
    assert events[0].HasField("snapshot")
    snapshot = events[0].snapshot
    assert snapshot.state == S.TASK_STATE_QUEUED and snapshot.task_id
    assert events[0].sequence == snapshot.last_sequence == 1
    assert_contiguous(events[1:], start=2)
    # Three chunks; those that arrive while the one before commits share its event.
    partials = [e.partial for e in events if e.HasField("partial")]
    assert 1 <= len(partials) <= 3
    assert "".join(p.content.text for p in partials) == "chunk0chunk1chunk2"
    assert [p.last_chunk for p in partials] == [False] * (len(partials) - 1) + [True]
    assert events[-1].finished.state == S.TASK_STATE_SUCCEEDED


async def test_stream_task_of_a_plain_client_carries_the_minted_id_in_the_task(
    mesh: Mesh,
) -> None:
    # A client that sends no correlation id finds the one minted for it in the first
    # message (the submitted task) and in the trailers, with no headers of their own
    # sent ahead of the snapshot.
    await mesh.agent()
    call = mesh.client(plain=True).StreamTask(coordinator_pb2.StreamTaskRequest(spec=spec()))
    events = [response.event async for response in call]
    initial = await call.initial_metadata()
    trailing = await call.trailing_metadata()
    minted = events[0].snapshot.spec.metadata.correlation_id
    assert len(minted) == 32
    assert trailing is not None and trailing.get(md.CORRELATION_ID) == minted
    assert initial is not None and md.CORRELATION_ID not in initial
    assert events[-1].finished.state == S.TASK_STATE_SUCCEEDED
    # A watch of it (a stream whose first message is not its own call's) still gets the
    # watch call's id up front.
    watch = mesh.client(plain=True).WatchTask(
        coordinator_pb2.WatchTaskRequest(task_id=events[0].task_id)
    )
    headers = await watch.initial_metadata()
    assert headers is not None and len(headers.get(md.CORRELATION_ID, "")) == 32
    await collect(watch)
    # A spec that names its own id: the task runs under it; the call's minted id is
    # in the trailers only.
    own = spec()
    own.metadata.correlation_id = "order-42"
    call = mesh.client(plain=True).StreamTask(coordinator_pb2.StreamTaskRequest(spec=own))
    events = [response.event async for response in call]
    trailing = await call.trailing_metadata()
    assert events[0].snapshot.spec.metadata.correlation_id == "order-42"
    assert trailing is not None and len(trailing.get(md.CORRELATION_ID, "")) == 32


async def test_idempotency_key_returns_the_same_task_per_caller(mesh: Mesh, pki: Pki) -> None:
    await mesh.agent()
    client = mesh.client()
    first = await client.SubmitTask(coordinator_pb2.SubmitTaskRequest(spec=spec(key="order-1")))
    again = await client.SubmitTask(coordinator_pb2.SubmitTaskRequest(spec=spec(key="order-1")))
    assert again.deduplicated and not first.deduplicated
    assert again.task.task_id == first.task.task_id
    # Another caller with the same key gets its own task.
    pki.issue(role="client", name="bob", stem="client-bob")
    other = await mesh.client("client-bob").SubmitTask(
        coordinator_pb2.SubmitTaskRequest(spec=spec(key="order-1"))
    )
    assert not other.deduplicated and other.task.task_id != first.task.task_id
    await collect(client.WatchTask(coordinator_pb2.WatchTaskRequest(task_id=first.task.task_id)))
    # After it finished, the key still answers with the same task, and nothing ran twice.
    late = await client.SubmitTask(coordinator_pb2.SubmitTaskRequest(spec=spec(key="order-1")))
    assert late.deduplicated and late.task.task_id == first.task.task_id
    assert late.task.state == S.TASK_STATE_SUCCEEDED


async def test_many_watchers_each_get_every_event(mesh: Mesh) -> None:
    agent = await mesh.agent()
    client = mesh.client()
    task = (
        await client.SubmitTask(
            coordinator_pb2.SubmitTaskRequest(spec=spec(script={"steps": 3, "hold": "go"}))
        )
    ).task
    watchers = [
        asyncio.create_task(
            collect(client.WatchTask(coordinator_pb2.WatchTaskRequest(task_id=task.task_id)))
        )
        for _ in range(8)
    ]
    await agent.wait_started()
    agent.gate("go").set()
    results = await asyncio.gather(*watchers)
    for events in results:
        assert_contiguous(events)
        assert events == results[0]
        assert events[-1].finished.state == S.TASK_STATE_SUCCEEDED


async def test_reconnect_with_after_sequence_misses_and_repeats_nothing(mesh: Mesh) -> None:
    agent = await mesh.agent()
    client = mesh.client()
    task = (
        await client.SubmitTask(
            coordinator_pb2.SubmitTaskRequest(spec=spec(script={"steps": 5, "hold": "rest"}))
        )
    ).task
    call = client.WatchTask(coordinator_pb2.WatchTaskRequest(task_id=task.task_id))
    seen: list[coordinator_pb2.TaskEvent] = []
    # Read part of the stream, then drop the connection mid-stream.
    async for response in call:
        seen.append(response.event)
        if response.event.HasField("progress") and response.event.progress.step == "step-3":
            break
    call.cancel()
    # The task goes on without the watcher: disconnecting never cancels it.
    agent.gate("rest").set()
    resumed = await collect(
        client.WatchTask(
            coordinator_pb2.WatchTaskRequest(task_id=task.task_id, after_sequence=seen[-1].sequence)
        )
    )
    everything = seen + resumed
    assert_contiguous(everything)
    assert everything[-1].finished.state == S.TASK_STATE_SUCCEEDED
    assert not agent.stats.executions[0].cancelled


async def test_stream_task_outcome_only_sends_the_snapshot_and_the_end(mesh: Mesh) -> None:
    await mesh.agent()
    client = mesh.client()
    events = await collect(
        client.StreamTask(
            coordinator_pb2.StreamTaskRequest(
                spec=spec(text="hi", script={"steps": 2, "partials": 2}), outcome_only=True
            )
        )
    )
    assert kinds(events) == ["snapshot", "finished"]
    task_id = events[0].snapshot.task_id
    assert events[1].finished.output.text == "done:hi"
    # Every event was still stored and published: a full watch sees them all.
    stored = await collect(client.WatchTask(coordinator_pb2.WatchTaskRequest(task_id=task_id)))
    assert_contiguous(stored)
    assert events[1] == stored[-1]
    assert {"state_changed", "progress", "partial"} <= set(kinds(stored))
    published = {t for t, subject, _, _ in mesh.events.published if subject == task_id}
    assert {"task.created", "task.started", "task.progress", "task.completed"} <= published
    # A watcher can ask for the outcome alone too, with or without a snapshot.
    outcome = await collect(
        client.WatchTask(coordinator_pb2.WatchTaskRequest(task_id=task_id, outcome_only=True))
    )
    assert outcome == [stored[-1]]
    outcome = await collect(
        client.WatchTask(
            coordinator_pb2.WatchTaskRequest(
                task_id=task_id, include_snapshot=True, outcome_only=True
            )
        )
    )
    assert kinds(outcome) == ["snapshot", "finished"]
    # The flag opens nothing: someone else's task stays unknown to a caller.
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await collect(
            mesh.client("agent").WatchTask(
                coordinator_pb2.WatchTaskRequest(task_id=task_id, outcome_only=True)
            )
        )
    assert refused.value.code() == grpc.StatusCode.NOT_FOUND
    assert error_of(refused.value).reason == "TASK_NOT_FOUND"


async def test_stream_task_outcome_only_still_asks_for_input(mesh: Mesh) -> None:
    await mesh.agent()
    client = mesh.client()
    call = client.StreamTask(
        coordinator_pb2.StreamTaskRequest(
            spec=spec(script={"ask": "your name?", "steps": 1}), outcome_only=True
        )
    )
    stream = aiter(call)
    snapshot = (await anext(stream)).event
    asked = (await anext(stream)).event
    assert asked.input_required.prompt == "your name?"
    await client.ProvideInput(
        coordinator_pb2.ProvideInputRequest(
            task_id=snapshot.snapshot.task_id,
            response=S.InputResponse(
                request_id=asked.input_required.request_id, value=S.Payload(text="Ada")
            ),
        )
    )
    rest = [response.event async for response in stream]
    # The answer shows as the change out of INPUT_REQUIRED, then the end.
    assert kinds(rest) == ["state_changed", "finished"]
    assert rest[0].state_changed.from_state == S.TASK_STATE_INPUT_REQUIRED
    assert rest[0].state_changed.to_state == S.TASK_STATE_RUNNING
    assert rest[1].finished.output.text == "answer:Ada"


async def test_watch_include_snapshot(mesh: Mesh) -> None:
    await mesh.agent()
    client = mesh.client()
    task = (await client.SubmitTask(coordinator_pb2.SubmitTaskRequest(spec=spec()))).task
    done = await collect(client.WatchTask(coordinator_pb2.WatchTaskRequest(task_id=task.task_id)))
    events = await collect(
        client.WatchTask(
            coordinator_pb2.WatchTaskRequest(
                task_id=task.task_id, after_sequence=2, include_snapshot=True
            )
        )
    )
    assert events[0].HasField("snapshot")
    assert events[0].snapshot.state == S.TASK_STATE_SUCCEEDED
    assert events[1:] == done[2:]


async def test_cancel_a_running_task_reaches_the_agent(mesh: Mesh) -> None:
    agent = await mesh.agent()
    client = mesh.client()
    task = (
        await client.SubmitTask(coordinator_pb2.SubmitTaskRequest(spec=spec(script={"hang": True})))
    ).task
    watch = asyncio.create_task(
        collect(client.WatchTask(coordinator_pb2.WatchTaskRequest(task_id=task.task_id)))
    )
    await agent.wait_started()
    cancelled = await client.CancelTask(
        coordinator_pb2.CancelTaskRequest(task_id=task.task_id, reason="changed my mind")
    )
    assert cancelled.task.state == S.TASK_STATE_CANCELLED
    assert cancelled.task.error.reason == "CANCELLED"
    events = await watch
    assert events[-1].finished.state == S.TASK_STATE_CANCELLED
    assert_contiguous(events)
    await eventually(lambda: agent.stats.executions[0].cancelled and agent.stats.in_flight == 0)
    # Idempotent: again is fine and changes nothing.
    again = await client.CancelTask(coordinator_pb2.CancelTaskRequest(task_id=task.task_id))
    assert again.task.state == S.TASK_STATE_CANCELLED
    assert again.task.last_sequence == cancelled.task.last_sequence
    # The agent's slot is free again.
    await eventually(lambda: [a.in_flight for a in mesh.running.coordinator.list_agents()] == [0])


async def test_cancel_a_queued_task_and_a_finished_one(mesh: Mesh) -> None:
    client = mesh.client()
    queued = (
        await client.SubmitTask(coordinator_pb2.SubmitTaskRequest(spec=spec("nobody-does-this")))
    ).task
    cancelled = await client.CancelTask(coordinator_pb2.CancelTaskRequest(task_id=queued.task_id))
    assert cancelled.task.state == S.TASK_STATE_CANCELLED

    await mesh.agent()
    done = (await client.SubmitTask(coordinator_pb2.SubmitTaskRequest(spec=spec()))).task
    await collect(client.WatchTask(coordinator_pb2.WatchTaskRequest(task_id=done.task_id)))
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await client.CancelTask(coordinator_pb2.CancelTaskRequest(task_id=done.task_id))
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert error_of(info.value).reason == "TASK_ALREADY_FINISHED"


async def test_provide_input(mesh: Mesh) -> None:
    await mesh.agent()
    client = mesh.client()
    task = (
        await client.SubmitTask(
            coordinator_pb2.SubmitTaskRequest(spec=spec(script={"ask": "your name?"}))
        )
    ).task

    async def asking() -> coordinator_pb2.Task:
        current = (await client.GetTask(coordinator_pb2.GetTaskRequest(task_id=task.task_id))).task
        assert current.state == S.TASK_STATE_INPUT_REQUIRED
        return current

    waiting = await eventually(asking)
    assert waiting.pending_input.prompt == "your name?"
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await client.ProvideInput(
            coordinator_pb2.ProvideInputRequest(
                task_id=task.task_id, response=S.InputResponse(request_id="wrong")
            )
        )
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    answered = await client.ProvideInput(
        coordinator_pb2.ProvideInputRequest(
            task_id=task.task_id,
            response=S.InputResponse(
                request_id=waiting.pending_input.request_id, value=S.Payload(text="Ada")
            ),
        )
    )
    assert answered.task.state == S.TASK_STATE_RUNNING
    events = await collect(client.WatchTask(coordinator_pb2.WatchTaskRequest(task_id=task.task_id)))
    assert events[-1].finished.output.text == "answer:Ada"
    assert "input_required" in kinds(events)


async def test_list_tasks_filters_pages_and_owners(mesh: Mesh, pki: Pki) -> None:
    client = mesh.client()
    pki.issue(role="client", name="carol", stem="client-carol")
    carol = mesh.client("client-carol")
    mine = [
        (await client.SubmitTask(coordinator_pb2.SubmitTaskRequest(spec=spec("alpha")))).task
        for _ in range(5)
    ]
    theirs = (await carol.SubmitTask(coordinator_pb2.SubmitTaskRequest(spec=spec("beta")))).task
    await client.CancelTask(coordinator_pb2.CancelTaskRequest(task_id=mine[0].task_id))

    page1 = await client.ListTasks(coordinator_pb2.ListTasksRequest(page_size=2))
    assert [t.task_id for t in page1.tasks] == [mine[4].task_id, mine[3].task_id]
    page2 = await client.ListTasks(
        coordinator_pb2.ListTasksRequest(page_size=2, page_token=page1.next_page_token)
    )
    page3 = await client.ListTasks(
        coordinator_pb2.ListTasksRequest(page_size=2, page_token=page2.next_page_token)
    )
    assert [t.task_id for t in [*page2.tasks, *page3.tasks]] == [
        mine[2].task_id,
        mine[1].task_id,
        mine[0].task_id,
    ]
    assert page3.next_page_token == ""
    cancelled = await client.ListTasks(
        coordinator_pb2.ListTasksRequest(states=[S.TASK_STATE_CANCELLED])
    )
    assert [t.task_id for t in cancelled.tasks] == [mine[0].task_id]
    # A client sees only its own tasks; an admin sees everyone's.
    assert [
        t.task_id for t in (await carol.ListTasks(coordinator_pb2.ListTasksRequest())).tasks
    ] == [theirs.task_id]
    admin = mesh.client("admin")
    everyone = await admin.ListTasks(coordinator_pb2.ListTasksRequest(capability="beta"))
    assert [t.task_id for t in everyone.tasks] == [theirs.task_id]
    by_owner = await admin.ListTasks(coordinator_pb2.ListTasksRequest(owner=theirs.owner))
    assert [t.task_id for t in by_owner.tasks] == [theirs.task_id]
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await carol.ListTasks(coordinator_pb2.ListTasksRequest(owner=mine[0].owner))
    assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
    # Someone else's task is invisible, an admin may cancel it.
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await carol.GetTask(coordinator_pb2.GetTaskRequest(task_id=mine[1].task_id))
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    await admin.CancelTask(coordinator_pb2.CancelTaskRequest(task_id=theirs.task_id))


async def test_list_agents(mesh: Mesh) -> None:
    agent = await mesh.agent("lister", capabilities=("echo", "sum"), max_concurrency=3)
    client = mesh.client()

    async def listed() -> coordinator_pb2.AgentStatus:
        response = await client.ListAgents(coordinator_pb2.ListAgentsRequest())
        (status,) = response.agents
        assert status.card.description == "scripted test agent"  # filled in by Describe
        return status

    status = await eventually(listed)
    assert status.agent_id == agent.agent_id
    assert status.health == coordinator_pb2.AGENT_HEALTH_HEALTHY
    assert [c.name for c in status.card.capabilities] == ["echo", "sum"]
    assert status.card.max_concurrency == 3 and status.card.version == "1.0.0"
    assert status.in_flight == 0 and not status.circuit_open
    none = await client.ListAgents(coordinator_pb2.ListAgentsRequest(capability="other"))
    assert list(none.agents) == []
