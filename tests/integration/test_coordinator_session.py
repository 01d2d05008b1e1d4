"""The bidirectional Session, and bad input answered with precise statuses."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from google.protobuf import duration_pb2

from hivewire.common.v1 import common_pb2
from hivewire.coordinator.v1 import coordinator_pb2
from hivewire.services.runtime.errors import InvalidArgument, NotFound
from tests.conftest import Pki
from tests.helpers import eventually
from tests.support.coordinator_mesh import Mesh, assert_contiguous, error_of, spec, start_mesh

pytestmark = pytest.mark.timeout(60)

S = common_pb2
C = coordinator_pb2


@pytest.fixture
async def mesh(pki: Pki, tmp_path: Path) -> AsyncIterator[Mesh]:
    async with start_mesh(pki.dir, tmp_path / "coordinator.db", max_input_bytes=1024) as m:
        yield m


def start(ref: str, task_spec: C.TaskSpec) -> C.SessionRequest:
    return C.SessionRequest(start=C.SessionStart(client_ref=ref, spec=task_spec))


async def test_session_runs_several_tasks_with_cancel_and_input(mesh: Mesh) -> None:
    agent = await mesh.agent(max_concurrency=8)
    client = mesh.client()
    call = client.Session()
    await call.write(start("plain", spec(script={"steps": 2})))
    await call.write(start("asks", spec(script={"ask": "colour?"})))
    await call.write(start("hangs", spec(script={"hang": True})))
    await call.write(C.SessionRequest(cancel=C.SessionCancel(task_id="no-such-task")))

    refs: dict[str, str] = {}
    events: dict[str, list[C.TaskEvent]] = {}
    rejected: list[C.SessionRejected] = []
    answered = cancelled = half_closed = False
    async for response in call:
        kind = response.WhichOneof("kind")
        if kind == "accepted":
            refs[response.accepted.client_ref] = response.accepted.task_id
            events.setdefault(response.accepted.task_id, [])
            continue
        if kind == "rejected":
            rejected.append(response.rejected)
            continue
        event = response.event
        # Every event names its task, and each task's events arrive in order.
        events.setdefault(event.task_id, []).append(event)
        if event.HasField("input_required") and not answered:
            answered = True
            await call.write(
                C.SessionRequest(
                    input=C.SessionInput(
                        task_id=event.task_id,
                        response=S.InputResponse(
                            request_id=event.input_required.request_id,
                            value=S.Payload(text="blue"),
                        ),
                    )
                )
            )
        if (
            not cancelled
            and "hangs" in refs
            and event.task_id == refs["hangs"]
            and event.HasField("state_changed")
            and event.state_changed.to_state == S.TASK_STATE_RUNNING
        ):
            cancelled = True
            await call.write(C.SessionRequest(cancel=C.SessionCancel(task_id=refs["hangs"])))
        if cancelled and answered and not half_closed:
            # The session ends once the client is done and every task finished.
            half_closed = True
            await call.done_writing()

    assert set(refs) == {"plain", "asks", "hangs"}
    finished = {ref: events[refs[ref]][-1].finished for ref in refs}
    assert finished["plain"].state == S.TASK_STATE_SUCCEEDED
    assert finished["asks"].output.text == "answer:blue"
    assert finished["hangs"].state == S.TASK_STATE_CANCELLED
    for task_events in events.values():
        assert_contiguous(task_events)
    # The bad cancel was rejected and the session carried on.
    assert len(rejected) == 1
    assert rejected[0].task_id == "no-such-task"
    assert rejected[0].error.code == "NOT_FOUND"
    assert rejected[0].error.reason == "TASK_NOT_FOUND"
    assert any(e.cancelled for e in agent.stats.executions)


async def test_session_rejects_a_bad_start_and_stays_open(mesh: Mesh) -> None:
    await mesh.agent()
    call = mesh.client().Session()
    await call.write(start("bad", spec(capability="")))
    first = await call.read()
    assert first.WhichOneof("kind") == "rejected"
    assert first.rejected.client_ref == "bad"
    assert first.rejected.error.code == "INVALID_ARGUMENT"
    assert "field:spec.capability" in first.rejected.error.metadata
    await call.write(start("good", spec()))
    await call.done_writing()
    responses = [r async for r in call]
    assert responses[0].accepted.client_ref == "good"
    assert responses[-1].event.finished.state == S.TASK_STATE_SUCCEEDED


async def test_session_watch_of_an_existing_task(mesh: Mesh) -> None:
    agent = await mesh.agent()
    client = mesh.client()
    task = (
        await client.SubmitTask(C.SubmitTaskRequest(spec=spec(script={"steps": 3, "hold": "g"})))
    ).task
    call = client.Session()
    await call.write(C.SessionRequest(watch=C.SessionWatch(task_id=task.task_id, after_sequence=1)))
    await call.done_writing()
    await agent.wait_started()
    agent.gate("g").set()
    responses = [r async for r in call]
    events = [r.event for r in responses]
    assert_contiguous(events, start=2)
    assert events[-1].finished.state == S.TASK_STATE_SUCCEEDED


async def test_session_sends_only_the_outcome_of_tasks_that_ask_for_it(mesh: Mesh) -> None:
    await mesh.agent(max_concurrency=8)
    client = mesh.client()
    done = (await client.SubmitTask(C.SubmitTaskRequest(spec=spec(script={"steps": 2})))).task
    call = client.Session()
    await call.write(
        C.SessionRequest(
            start=C.SessionStart(
                client_ref="quiet", spec=spec(script={"steps": 2, "ask": "?"}), outcome_only=True
            )
        )
    )
    await call.write(start("loud", spec(script={"steps": 2})))
    await call.write(
        C.SessionRequest(watch=C.SessionWatch(task_id=done.task_id, outcome_only=True))
    )
    await call.done_writing()
    refs: dict[str, str] = {}
    kinds: dict[str, list[str]] = {}
    async for response in call:
        if response.HasField("accepted"):
            refs[response.accepted.client_ref] = response.accepted.task_id
            continue
        event = response.event
        kinds.setdefault(event.task_id, []).append(str(event.WhichOneof("kind")))
        if event.HasField("input_required"):
            await client.ProvideInput(
                C.ProvideInputRequest(
                    task_id=event.task_id,
                    response=S.InputResponse(
                        request_id=event.input_required.request_id, value=S.Payload(text="x")
                    ),
                )
            )
    assert kinds[refs["quiet"]] == ["input_required", "state_changed", "finished"]
    assert kinds[done.task_id] == ["finished"]
    loud = kinds[refs["loud"]]
    assert loud[-1] == "finished" and loud.count("progress") == 2 and "state_changed" in loud


async def test_session_that_disconnects_cancels_nothing(mesh: Mesh) -> None:
    agent = await mesh.agent()
    client = mesh.client()
    call = client.Session()
    await call.write(start("t", spec(script={"gate": "later"})))
    accepted = await call.read()
    task_id = accepted.accepted.task_id
    await agent.wait_started()
    call.cancel()
    agent.gate("later").set()
    events = [r.event async for r in client.WatchTask(C.WatchTaskRequest(task_id=task_id))]
    assert events[-1].finished.state == S.TASK_STATE_SUCCEEDED


def _duration(seconds: int, nanos: int = 0) -> duration_pb2.Duration:
    return duration_pb2.Duration(seconds=seconds, nanos=nanos)


@pytest.mark.parametrize(
    ("task_spec", "field"),
    [
        (C.TaskSpec(), "spec.capability"),
        (C.TaskSpec(capability="Not Valid!"), "spec.capability"),
        (C.TaskSpec(capability="echo", priority=9), "spec.priority"),  # type: ignore[arg-type]
        (C.TaskSpec(capability="echo", timeout=_duration(-5)), "spec.timeout"),
        (C.TaskSpec(capability="echo", max_attempts=99), "spec.max_attempts"),
        (
            C.TaskSpec(capability="echo", input=S.Payload(text="x" * 2000)),
            "spec.input",
        ),
        (
            C.TaskSpec(capability="echo", input=S.Payload(data=b"raw")),
            "spec.input.content_type",
        ),
    ],
)
async def test_bad_specs_are_invalid_argument_with_the_field(
    mesh: Mesh, task_spec: C.TaskSpec, field: str
) -> None:
    client = mesh.client()
    for call in (
        client.SubmitTask(C.SubmitTaskRequest(spec=task_spec)),
        _first(client.StreamTask(C.StreamTaskRequest(spec=task_spec))),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await call
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        err = error_of(info.value)
        assert isinstance(err, InvalidArgument)
        assert field in [v.field for v in err.violations]


async def _first(call: object) -> object:
    async for response in call:  # type: ignore[attr-defined]
        return response
    return None


async def test_missing_spec_unknown_task_and_bad_page_token(mesh: Mesh) -> None:
    client = mesh.client()
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await client.SubmitTask(C.SubmitTaskRequest())
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert [v.field for v in error_of(info.value).violations] == ["spec"]  # type: ignore[attr-defined]

    for call in (
        client.GetTask(C.GetTaskRequest(task_id="nope")),
        client.CancelTask(C.CancelTaskRequest(task_id="nope")),
        _first(client.WatchTask(C.WatchTaskRequest(task_id="nope"))),
        client.ProvideInput(
            C.ProvideInputRequest(task_id="nope", response=S.InputResponse(request_id="q"))
        ),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await call
        assert info.value.code() == grpc.StatusCode.NOT_FOUND
        err = error_of(info.value)
        assert isinstance(err, NotFound)
        assert (err.reason, err.resource_type, err.resource_name) == (
            "TASK_NOT_FOUND",
            "task",
            "nope",
        )

    with pytest.raises(grpc.aio.AioRpcError) as info:
        await client.GetTask(C.GetTaskRequest())
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT

    for token in ("%%%", "bm90LWpzb24", "eyJjIjogMX0"):
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await client.ListTasks(C.ListTasksRequest(page_token=token))
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        err = error_of(info.value)
        assert err.reason == "INVALID_PAGE_TOKEN"
        assert [v.field for v in err.violations] == ["page_token"]  # type: ignore[attr-defined]

    with pytest.raises(grpc.aio.AioRpcError) as info:
        await client.ListTasks(C.ListTasksRequest(states=[S.TASK_STATE_UNSPECIFIED]))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT

    # A token is bound to the filters it was issued for.
    for _ in range(3):
        await client.SubmitTask(C.SubmitTaskRequest(spec=spec("nobody")))
    page = await client.ListTasks(C.ListTasksRequest(page_size=1))
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await client.ListTasks(
            C.ListTasksRequest(page_size=1, capability="other", page_token=page.next_page_token)
        )
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_a_session_starts_a_plan_and_follows_it_to_the_end(mesh: Mesh) -> None:
    await mesh.agent(max_concurrency=4)
    plan = C.Plan(
        steps=[
            C.PlanStep(step_id="a", capability="echo", input=S.Payload(text="1")),
            C.PlanStep(step_id="b", capability="echo", input=S.Payload(text="2")),
        ]
    )

    async def requests() -> AsyncIterator[C.SessionRequest]:
        yield start("plan", C.TaskSpec(plan=plan))

    responses = [r async for r in mesh.client().Session(requests())]
    assert responses[0].accepted.client_ref == "plan"
    events = [r.event for r in responses[1:]]
    assert_contiguous(events)
    assert {e.step.step_id for e in events if e.HasField("step")} == {"a", "b"}
    assert events[-1].finished.state == S.TASK_STATE_SUCCEEDED


async def test_provide_input_to_a_task_not_waiting(mesh: Mesh) -> None:
    client = mesh.client()
    task = (await client.SubmitTask(C.SubmitTaskRequest(spec=spec("nobody")))).task
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await client.ProvideInput(
            C.ProvideInputRequest(task_id=task.task_id, response=S.InputResponse(request_id="q"))
        )
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert error_of(info.value).reason == "TASK_NOT_WAITING_FOR_INPUT"
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await client.ProvideInput(C.ProvideInputRequest(task_id=task.task_id))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT


@pytest.mark.parametrize(
    ("value", "field"),
    [
        (S.Payload(text="x" * 2000), "response.value"),
        (S.Payload(data=b"raw"), "response.value.content_type"),
    ],
)
async def test_an_input_answer_follows_the_rules_of_a_task_input(
    mesh: Mesh, value: S.Payload, field: str
) -> None:
    await mesh.agent()
    client = mesh.client()
    task = (await client.SubmitTask(C.SubmitTaskRequest(spec=spec(script={"ask": "colour?"})))).task

    async def asking() -> str:
        current = (await client.GetTask(C.GetTaskRequest(task_id=task.task_id))).task
        assert current.state == S.TASK_STATE_INPUT_REQUIRED
        return current.pending_input.request_id

    request_id = await eventually(asking)
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await client.ProvideInput(
            C.ProvideInputRequest(
                task_id=task.task_id,
                response=S.InputResponse(request_id=request_id, value=value),
            )
        )
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in [v.field for v in error_of(info.value).violations]  # type: ignore[attr-defined]
    # The task still waits, and a good answer still ends it.
    answered = await client.ProvideInput(
        C.ProvideInputRequest(
            task_id=task.task_id,
            response=S.InputResponse(request_id=request_id, value=S.Payload(text="blue")),
        )
    )
    assert answered.task.state == S.TASK_STATE_RUNNING


async def test_long_timeouts_are_capped(mesh: Mesh) -> None:
    task = (
        await mesh.client().SubmitTask(
            C.SubmitTaskRequest(spec=C.TaskSpec(capability="echo", timeout=_duration(10**8)))
        )
    ).task
    assert task.spec.timeout.seconds == int(mesh.running.settings.coordinator.max_timeout)


async def test_session_deduplicated_start_is_followed_once(mesh: Mesh) -> None:
    await mesh.agent()
    call = mesh.client().Session()
    await call.write(start("one", spec(key="same", script={"steps": 2})))
    await call.write(start("two", spec(key="same", script={"steps": 2})))
    await call.done_writing()
    responses = [r async for r in call]
    accepted = [r.accepted for r in responses if r.HasField("accepted")]
    assert [a.deduplicated for a in accepted] == [False, True]
    assert accepted[0].task_id == accepted[1].task_id
    events = [r.event for r in responses if r.HasField("event")]
    assert_contiguous(events)
    assert events[-1].finished.state == S.TASK_STATE_SUCCEEDED


async def test_a_task_followed_twice_keeps_its_first_choice_of_events(mesh: Mesh) -> None:
    await mesh.agent()
    call = mesh.client().Session()
    quiet = C.SessionStart(client_ref="one", spec=spec(key="same", script={"steps": 2}))
    quiet.outcome_only = True
    await call.write(C.SessionRequest(start=quiet))
    # The same task again (deduplicated), this time asking for every event.
    await call.write(start("two", spec(key="same", script={"steps": 2})))
    await call.done_writing()
    responses = [r async for r in call]
    accepted = [r.accepted for r in responses if r.HasField("accepted")]
    assert [a.deduplicated for a in accepted] == [False, True]
    events = [r.event for r in responses if r.HasField("event")]
    assert [e.WhichOneof("kind") for e in events] == ["finished"]
