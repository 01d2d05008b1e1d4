"""Plans against a real coordinator and real (scripted) agents over mTLS.

Fan-out with ALL, FIRST_SUCCESS, VOTE and an aggregator agent; dependencies passing
outputs on; the saga compensating in reverse order; cancelling a plan; resuming a
plan after a restart; one live stream for the whole plan; bad plans refused before
anything runs.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import json_format, struct_pb2

from hivewire.common.v1 import common_pb2
from hivewire.coordinator.v1 import coordinator_pb2
from hivewire.services.runtime.errors import FailedPrecondition, InvalidArgument
from tests.conftest import Pki
from tests.helpers import eventually
from tests.support.coordinator_mesh import (
    Mesh,
    assert_contiguous,
    collect,
    error_of,
    start_mesh,
)

pytestmark = pytest.mark.timeout(90)

S = common_pb2
C = coordinator_pb2


@pytest.fixture
async def mesh(pki: Pki, tmp_path: Path) -> AsyncIterator[Mesh]:
    async with start_mesh(pki.dir, tmp_path / "coordinator.db", max_subtask_depth=2) as m:
        yield m


def step(
    step_id: str,
    capability: str = "echo",
    *,
    text: str = "",
    script: dict[str, Any] | None = None,
    depends_on: tuple[str, ...] = (),
    compensation: str = "",
) -> C.PlanStep:
    payload = S.Payload(text=text or step_id)
    if script is not None:
        payload.json.CopyFrom(json_format.ParseDict(script, struct_pb2.Struct()))
    return C.PlanStep(
        step_id=step_id,
        capability=capability,
        input=payload,
        depends_on=list(depends_on),
        compensation_capability=compensation,
    )


def plan_spec(
    *steps: C.PlanStep, aggregation: int = 0, aggregator: str = "", max_attempts: int = 0
) -> C.TaskSpec:
    return C.TaskSpec(
        plan=C.Plan(
            steps=list(steps),
            aggregation=aggregation,  # type: ignore[arg-type]
            aggregator_capability=aggregator,
        ),
        max_attempts=max_attempts,
    )


def step_events(events: list[C.TaskEvent]) -> list[tuple[str, str, str]]:
    """(step id, kind, state) of every step event, in order."""
    return [
        (
            e.step.step_id,
            C.StepEventKind.Name(e.step.kind).removeprefix("STEP_EVENT_KIND_").lower(),
            S.TaskState.Name(e.step.state).removeprefix("TASK_STATE_").lower(),
        )
        for e in events
        if e.HasField("step")
    ]


def output_json(task: C.Task) -> dict[str, Any]:
    return json_format.MessageToDict(task.output.json)


async def run_plan(mesh: Mesh, task_spec: C.TaskSpec) -> tuple[C.Task, list[C.TaskEvent]]:
    """Stream a plan to its end; return it and its whole history (from sequence 1)."""
    client = mesh.client()
    streamed = await collect(client.StreamTask(C.StreamTaskRequest(spec=task_spec)))
    assert streamed[0].HasField("snapshot")
    assert_contiguous(streamed[1:], streamed[0].sequence + 1)
    assert streamed[-1].HasField("finished")
    task_id = streamed[0].task_id
    events = await collect(mesh.client().WatchTask(C.WatchTaskRequest(task_id=task_id)))
    assert_contiguous(events)
    assert events[-len(streamed) + 1 :] == streamed[1:]
    task = (await client.GetTask(C.GetTaskRequest(task_id=task_id))).task
    return task, events


async def test_fan_out_of_ten_steps_over_three_agents_aggregates_all(mesh: Mesh) -> None:
    agents = [await mesh.agent(f"worker-{i}", max_concurrency=2) for i in range(3)]
    steps = [step(f"s{i}", script={"steps": 1}) for i in range(10)]
    task, events = await run_plan(mesh, plan_spec(*steps))

    assert task.state == S.TASK_STATE_SUCCEEDED
    assert output_json(task) == {f"s{i}": f"done:s{i}" for i in range(10)}
    # Every agent took part, and each step is a task of its own with this parent.
    assert all(a.stats.completed for a in agents)
    listed = (
        await mesh.client().ListTasks(C.ListTasksRequest(parent_task_id=task.task_id, page_size=50))
    ).tasks
    assert sorted(t.step_id for t in listed) == sorted(f"s{i}" for i in range(10))
    assert all(t.parent_task_id == task.task_id and t.role == C.TASK_ROLE_STEP for t in listed)
    assert all(t.state == S.TASK_STATE_SUCCEEDED and t.depth == 1 for t in listed)
    assert [s.state for s in task.steps] == [S.TASK_STATE_SUCCEEDED] * 10
    # The parent's own stream carries each step's start, progress and end.
    seen = step_events(events)
    for i in range(10):
        mine = [k for sid, k, _ in seen if sid == f"s{i}"]
        assert mine[0] == "started" and mine[-1] == "finished" and "progress" in mine
    # Usage of the plan is the sum of its steps'.
    assert task.usage.total_tokens == sum(t.usage.total_tokens for t in listed) == 70
    types = [t for t, subject, _, _ in mesh.events.published if subject == task.task_id]
    assert types[0] == "task.created"
    assert "workflow.started" in types and types.count("workflow.step_completed") == 10
    assert types[-1] == "workflow.completed"
    sequences = [
        seq
        for t, subject, _, seq in mesh.events.published
        if subject == task.task_id and t.startswith("workflow.")
    ]
    assert sequences == sorted(sequences) and sequences[-1] == task.last_sequence


async def test_watch_resumes_a_plan_exactly_once_in_order(mesh: Mesh) -> None:
    await mesh.agent(max_concurrency=4)
    steps = [step("a", script={"steps": 2}), step("b", depends_on=("a",)), step("c")]
    task, events = await run_plan(mesh, plan_spec(*steps))
    client = mesh.client()
    whole = await collect(client.WatchTask(C.WatchTaskRequest(task_id=task.task_id)))
    assert [e.sequence for e in whole] == [e.sequence for e in events]
    middle = len(whole) // 2
    rest = await collect(
        client.WatchTask(
            C.WatchTaskRequest(task_id=task.task_id, after_sequence=whole[middle].sequence)
        )
    )
    assert [e.SerializeToString() for e in rest] == [
        e.SerializeToString() for e in whole[middle + 1 :]
    ]


async def test_dependencies_pass_outputs_on_in_the_input_json(mesh: Mesh) -> None:
    agent = await mesh.agent(max_concurrency=4)
    steps = [
        step("a", text="alpha"),
        step("b", text="beta"),
        step("c", text="gamma", script={"steps": 1}, depends_on=("a", "b")),
    ]
    task, events = await run_plan(mesh, plan_spec(*steps))
    assert task.state == S.TASK_STATE_SUCCEEDED
    third = next(x for x in agent.stats.executions if x.assignment.input.text == "gamma")
    given = json_format.MessageToDict(third.assignment.input.json)
    assert given == {"steps": 1, "dependencies": {"a": "done:alpha", "b": "done:beta"}}
    # c started only after both a and b had finished.
    order = [(sid, kind) for sid, kind, _ in step_events(events)]
    assert order.index(("c", "started")) > order.index(("a", "finished"))
    assert order.index(("c", "started")) > order.index(("b", "finished"))


async def test_first_success_wins_and_the_others_are_cancelled(mesh: Mesh) -> None:
    agent = await mesh.agent(max_concurrency=4)
    steps = [
        step("slow-1", script={"hang": True}),
        step("slow-2", script={"hang": True}),
        step("quick", script={"gate": "quick"}),
    ]
    client = mesh.client()
    call = client.StreamTask(
        C.StreamTaskRequest(spec=plan_spec(*steps, aggregation=C.AGGREGATION_FIRST_SUCCESS))
    )
    await agent.wait_started(3)
    agent.gate("quick").set()
    events = [r.event async for r in call]
    task = (await client.GetTask(C.GetTaskRequest(task_id=events[0].task_id))).task
    assert task.state == S.TASK_STATE_SUCCEEDED
    assert task.output.text == "done:quick"

    async def losers_cancelled() -> None:
        hung = [x for x in agent.stats.executions if x.assignment.input.text.startswith("slow")]
        assert len(hung) == 2 and all(x.cancelled and x.finished for x in hung)

    await eventually(losers_cancelled)
    await eventually(lambda: _nothing_left(mesh))
    listed = (await client.ListTasks(C.ListTasksRequest(parent_task_id=task.task_id))).tasks
    states = {t.step_id: t.state for t in listed}
    assert states == {
        "quick": S.TASK_STATE_SUCCEEDED,
        "slow-1": S.TASK_STATE_CANCELLED,
        "slow-2": S.TASK_STATE_CANCELLED,
    }


async def test_vote_takes_the_majority(mesh: Mesh) -> None:
    await mesh.agent(max_concurrency=4)
    steps = [step("v1", text="A"), step("v2", text="B"), step("v3", text="A")]
    task, _ = await run_plan(mesh, plan_spec(*steps, aggregation=C.AGGREGATION_VOTE))
    assert task.state == S.TASK_STATE_SUCCEEDED
    assert task.output.text == "done:A"


async def test_a_tied_vote_fails_with_the_counts(mesh: Mesh) -> None:
    await mesh.agent(max_concurrency=4)
    steps = [step("v1", text="A"), step("v2", text="B")]
    task, _ = await run_plan(mesh, plan_spec(*steps, aggregation=C.AGGREGATION_VOTE))
    assert task.state == S.TASK_STATE_FAILED
    assert task.error.reason == "VOTE_TIE"
    assert "1 for [v1]" in task.error.message and "1 for [v2]" in task.error.message


async def test_an_aggregator_agent_gets_every_output_with_provenance(mesh: Mesh) -> None:
    await mesh.agent("workers", max_concurrency=4)
    aggregator = await mesh.agent("combiner", capabilities=("combine",))
    steps = [step("x", text="one"), step("y", text="two")]
    task, events = await run_plan(
        mesh, plan_spec(*steps, aggregation=C.AGGREGATION_AGGREGATOR, aggregator="combine")
    )
    assert task.state == S.TASK_STATE_SUCCEEDED
    assert task.output.text == "done:"  # the aggregator's own result
    (execution,) = aggregator.stats.executions
    given = json_format.MessageToDict(execution.assignment.input.json)["outputs"]
    assert [o["step_id"] for o in given] == ["x", "y"]
    assert [o["output"] for o in given] == ["done:one", "done:two"]
    assert all(o["agent_id"] and o["attempt"] == 1 and o["task_id"] for o in given)
    assert all(o["usage"]["totalTokens"] == "7" for o in given)
    assert ("_aggregate", "finished", "succeeded") in step_events(events)


async def test_a_failing_third_step_compensates_step_two_then_step_one(mesh: Mesh) -> None:
    await mesh.agent("workers", capabilities=("echo",), max_concurrency=4)
    undo = await mesh.agent("undoer", capabilities=("undo",))
    steps = [
        step("book-flight", compensation="undo"),
        step("book-hotel", depends_on=("book-flight",), compensation="undo"),
        step("charge-card", script={"fail": "permanent"}, depends_on=("book-hotel",)),
    ]
    task, events = await run_plan(mesh, plan_spec(*steps))

    assert task.state == S.TASK_STATE_FAILED
    assert task.error.reason == "SCRIPTED_FAILURE"
    assert task.error.metadata["step_id"] == "charge-card"
    compensated = [
        json_format.MessageToDict(x.assignment.input.json)["step_id"] for x in undo.stats.executions
    ]
    assert compensated == ["book-hotel", "book-flight"]
    first = json_format.MessageToDict(undo.stats.executions[0].assignment.input.json)
    assert first == {"step_id": "book-hotel", "input": "book-hotel", "output": "done:book-hotel"}
    saga = [(sid, kind) for sid, kind, _ in step_events(events) if "compensation" in kind]
    assert saga == [
        ("book-hotel", "compensation_started"),
        ("book-hotel", "compensation_finished"),
        ("book-flight", "compensation_started"),
        ("book-flight", "compensation_finished"),
    ]
    by_id = {s.step_id: s for s in task.steps}
    assert by_id["book-hotel"].compensation_state == S.TASK_STATE_SUCCEEDED
    assert by_id["book-flight"].compensation_state == S.TASK_STATE_SUCCEEDED
    assert by_id["charge-card"].state == S.TASK_STATE_FAILED
    types = [t for t, subject, _, _ in mesh.events.published if subject == task.task_id]
    assert types.count("workflow.compensated") == 2
    assert "workflow.step_failed" in types and types[-1] == "workflow.failed"


async def test_compensation_follows_the_order_of_completion_not_of_the_plan(
    mesh: Mesh,
) -> None:
    agent = await mesh.agent("workers", capabilities=("echo",), max_concurrency=4)
    undo = await mesh.agent("undoer", capabilities=("undo",))
    steps = [
        step("early", script={"gate": "early"}, compensation="undo"),
        step("late", script={"gate": "late"}, compensation="undo"),
        step("fails", script={"fail": "permanent"}, depends_on=("early", "late")),
    ]
    client = mesh.client()
    parent = (await client.SubmitTask(C.SubmitTaskRequest(spec=plan_spec(*steps)))).task
    await agent.wait_started(2)
    # The step declared second finishes first.
    agent.gate("late").set()

    async def late_done() -> None:
        task = (await client.GetTask(C.GetTaskRequest(task_id=parent.task_id))).task
        assert {s.step_id: s.state for s in task.steps}["late"] == S.TASK_STATE_SUCCEEDED

    await eventually(late_done)
    agent.gate("early").set()
    events = await collect(client.WatchTask(C.WatchTaskRequest(task_id=parent.task_id)))
    assert events[-1].finished.state == S.TASK_STATE_FAILED
    undone = [
        json_format.MessageToDict(x.assignment.input.json)["step_id"] for x in undo.stats.executions
    ]
    # Reverse order of completion: "early" finished last, so it is undone first.
    assert undone == ["early", "late"]


async def test_a_failing_compensation_is_retried_recorded_and_the_others_still_run(
    mesh: Mesh,
) -> None:
    await mesh.agent("workers", capabilities=("echo",), max_concurrency=4)
    broken = await mesh.agent(
        "broken-undo", capabilities=("undo-broken",), script={"fail": "retryable"}
    )
    undo = await mesh.agent("undoer", capabilities=("undo",))
    steps = [
        step("first", compensation="undo"),
        step("second", depends_on=("first",), compensation="undo-broken"),
        step("third", script={"fail": "permanent"}, depends_on=("second",)),
    ]
    task, events = await run_plan(mesh, plan_spec(*steps, max_attempts=2))
    assert task.state == S.TASK_STATE_FAILED
    assert task.error.metadata["step_id"] == "third"
    by_id = {s.step_id: s for s in task.steps}
    # The broken compensation ran twice (retried like any task), then was recorded...
    assert [x.attempt for x in broken.stats.executions] == [1, 2]
    assert by_id["second"].compensation_state == S.TASK_STATE_DEAD_LETTERED
    # ...and the compensation of the first step still ran after it.
    assert by_id["first"].compensation_state == S.TASK_STATE_SUCCEEDED
    assert len(undo.stats.executions) == 1
    saga = [(sid, kind, st) for sid, kind, st in step_events(events) if "compensation" in kind]
    assert saga == [
        ("second", "compensation_started", "queued"),
        ("second", "compensation_finished", "dead_lettered"),
        ("first", "compensation_started", "queued"),
        ("first", "compensation_finished", "succeeded"),
    ]


async def test_cancelling_a_plan_cancels_running_steps_and_compensates(mesh: Mesh) -> None:
    agent = await mesh.agent("workers", capabilities=("echo",), max_concurrency=4)
    undo = await mesh.agent("undoer", capabilities=("undo",))
    client = mesh.client()
    steps = [step("done-first", compensation="undo"), step("hangs", script={"hang": True})]
    submitted = (await client.SubmitTask(C.SubmitTaskRequest(spec=plan_spec(*steps)))).task

    async def first_done_and_second_running() -> None:
        task = (await client.GetTask(C.GetTaskRequest(task_id=submitted.task_id))).task
        states = {s.step_id: s.state for s in task.steps}
        assert states["done-first"] == S.TASK_STATE_SUCCEEDED
        assert states["hangs"] == S.TASK_STATE_RUNNING

    await eventually(first_done_and_second_running)
    await client.CancelTask(C.CancelTaskRequest(task_id=submitted.task_id, reason="changed mind"))
    events = await collect(client.WatchTask(C.WatchTaskRequest(task_id=submitted.task_id)))
    task = (await client.GetTask(C.GetTaskRequest(task_id=submitted.task_id))).task
    assert task.state == S.TASK_STATE_CANCELLED
    assert events[-1].finished.state == S.TASK_STATE_CANCELLED
    hung = next(x for x in agent.stats.executions if x.assignment.input.text == "hangs")
    assert hung.cancelled
    assert len(undo.stats.executions) == 1
    assert {s.step_id: s.compensation_state for s in task.steps}["done-first"] == (
        S.TASK_STATE_SUCCEEDED
    )
    # Cancelling again changes nothing.
    again = await client.CancelTask(C.CancelTaskRequest(task_id=submitted.task_id))
    assert again.task.state == S.TASK_STATE_CANCELLED


async def test_a_plan_resumes_after_a_restart_without_rerunning_succeeded_steps(
    pki: Pki, tmp_path: Path
) -> None:
    db = tmp_path / "coordinator.db"
    steps = [
        step("done", script={"steps": 1}),
        step("running", script={"hold": "never", "steps": 1}),
        step("waiting", depends_on=("done", "running")),
    ]
    async with start_mesh(pki.dir, db) as mesh:
        agent = await mesh.agent(max_concurrency=4)
        client = mesh.client()
        submitted = (await client.SubmitTask(C.SubmitTaskRequest(spec=plan_spec(*steps)))).task

        async def halfway() -> None:
            task = (await client.GetTask(C.GetTaskRequest(task_id=submitted.task_id))).task
            states = {s.step_id: s.state for s in task.steps}
            assert states["done"] == S.TASK_STATE_SUCCEEDED
            assert states["running"] == S.TASK_STATE_RUNNING

        await eventually(halfway)
        before = await client.GetTask(C.GetTaskRequest(task_id=submitted.task_id))
        await mesh.running.coordinator.stop()
    first_run = [x.assignment.input.text for x in agent.stats.executions]
    assert sorted(first_run) == ["done", "running"]

    async with start_mesh(pki.dir, db) as mesh:
        agent = await mesh.agent(max_concurrency=4)
        client = mesh.client()
        agent.gate("never").set()
        events = await collect(
            client.WatchTask(
                C.WatchTaskRequest(
                    task_id=submitted.task_id, after_sequence=before.task.last_sequence
                )
            )
        )
        task = (await client.GetTask(C.GetTaskRequest(task_id=submitted.task_id))).task
    assert task.state == S.TASK_STATE_SUCCEEDED
    assert output_json(task) == {
        "done": "done:done",
        "running": "done:running",
        "waiting": "done:waiting",
    }
    # The step that had succeeded did not run again; the running one ran as attempt 2.
    second_run = sorted((x.assignment.input.text, x.attempt) for x in agent.stats.executions)
    assert second_run == [("running", 2), ("waiting", 1)]
    assert_contiguous(events, before.task.last_sequence + 1)


@pytest.mark.parametrize(
    ("bad", "field", "words"),
    [
        (plan_spec(), "spec.plan.steps", "at least one step"),
        (
            plan_spec(*[step(f"s{i}") for i in range(65)]),
            "spec.plan.steps",
            "exceed the limit of 64",
        ),
        (plan_spec(step("a"), step("a")), "spec.plan.steps[1].step_id", "duplicate"),
        (plan_spec(step("a", depends_on=("zz",))), "spec.plan.steps[0].depends_on[0]", "zz"),
        (
            plan_spec(
                step("a", depends_on=("c",)),
                step("b", depends_on=("a",)),
                step("c", depends_on=("b",)),
            ),
            "spec.plan.steps",
            "dependency cycle: a -> c -> b -> a",
        ),
        (
            plan_spec(step("a"), aggregation=C.AGGREGATION_AGGREGATOR),
            "spec.plan.aggregator_capability",
            "required",
        ),
        (
            C.TaskSpec(capability="echo", plan=C.Plan(steps=[step("a")])),
            "spec.capability",
            "must be empty when a plan is given",
        ),
        (plan_spec(step("", capability="")), "spec.plan.steps[0].step_id", "required"),
    ],
)
async def test_bad_plans_are_refused_before_anything_runs(
    mesh: Mesh, bad: C.TaskSpec, field: str, words: str
) -> None:
    agent = await mesh.agent()
    client = mesh.client()
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await client.SubmitTask(C.SubmitTaskRequest(spec=bad))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    err = error_of(info.value)
    assert isinstance(err, InvalidArgument)
    matching = [v for v in err.violations if v.field == field]
    assert matching and words in matching[0].description, err.violations
    assert (await client.ListTasks(C.ListTasksRequest())).tasks == []
    assert agent.stats.executions == []


async def test_a_plan_with_several_problems_gets_one_violation_each(mesh: Mesh) -> None:
    client = mesh.client()
    bad = plan_spec(step("a", depends_on=("nope",)), step("a"), step("b", capability="Bad!"))
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await client.SubmitTask(C.SubmitTaskRequest(spec=bad))
    fields = sorted(v.field for v in error_of(info.value).violations)  # type: ignore[attr-defined]
    assert fields == [
        "spec.plan.steps[0].depends_on[0]",
        "spec.plan.steps[1].step_id",
        "spec.plan.steps[2].capability",
    ]


async def test_sub_tasks_inherit_and_nest_only_so_deep(mesh: Mesh) -> None:
    agent = await mesh.agent(max_concurrency=8)
    client = mesh.client()
    as_agent = mesh.client("agent")
    parent = (
        await client.SubmitTask(
            C.SubmitTaskRequest(
                spec=C.TaskSpec(
                    capability="echo",
                    input=S.Payload(
                        json=json_format.ParseDict({"hang": True}, struct_pb2.Struct())
                    ),
                    token_budget=100,
                )
            )
        )
    ).task
    hang = S.Payload(json=json_format.ParseDict({"hang": True}, struct_pb2.Struct()))
    # An agent may attach work only to a task it runs: not before it got the task...
    with pytest.raises(grpc.aio.AioRpcError) as early:
        await mesh.client("agent-calculator").SubmitTask(
            C.SubmitTaskRequest(spec=C.TaskSpec(capability="echo", parent_task_id=parent.task_id))
        )
    assert early.value.code() == grpc.StatusCode.NOT_FOUND
    await agent.wait_started(1)
    await _running(client, parent.task_id)
    # ...and another agent identity never.
    with pytest.raises(grpc.aio.AioRpcError) as other:
        await mesh.client("agent-calculator").SubmitTask(
            C.SubmitTaskRequest(spec=C.TaskSpec(capability="echo", parent_task_id=parent.task_id))
        )
    assert other.value.code() == grpc.StatusCode.NOT_FOUND
    child = (
        await as_agent.SubmitTask(
            C.SubmitTaskRequest(
                spec=C.TaskSpec(capability="echo", input=hang, parent_task_id=parent.task_id)
            )
        )
    ).task
    assert child.parent_task_id == parent.task_id and child.depth == 1
    assert child.role == C.TASK_ROLE_SUBTASK
    assert child.spec.metadata.correlation_id == parent.spec.metadata.correlation_id
    assert child.spec.token_budget == 100
    assert child.deadline.ToNanoseconds() <= parent.deadline.ToNanoseconds()
    await _running(as_agent, child.task_id)
    grandchild = (
        await as_agent.SubmitTask(
            C.SubmitTaskRequest(
                spec=C.TaskSpec(capability="echo", input=hang, parent_task_id=child.task_id)
            )
        )
    ).task
    assert grandchild.depth == 2
    await _running(as_agent, grandchild.task_id)
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await as_agent.SubmitTask(
            C.SubmitTaskRequest(
                spec=C.TaskSpec(capability="echo", parent_task_id=grandchild.task_id)
            )
        )
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    err = error_of(info.value)
    assert isinstance(err, FailedPrecondition) and err.reason == "SUBTASK_DEPTH_EXCEEDED"
    assert "nested 3 deep; the limit is 2" in err.message
    # The agent cannot read the client's task, and the client cannot read the agent's.
    with pytest.raises(grpc.aio.AioRpcError) as denied:
        await as_agent.GetTask(C.GetTaskRequest(task_id=parent.task_id))
    assert denied.value.code() == grpc.StatusCode.NOT_FOUND
    # Cancelling the parent cancels the whole family.
    await agent.wait_started(3)
    await client.CancelTask(C.CancelTaskRequest(task_id=parent.task_id))

    async def family_cancelled() -> None:
        for task_id in (child.task_id, grandchild.task_id):
            task = (await as_agent.GetTask(C.GetTaskRequest(task_id=task_id))).task
            assert task.state == S.TASK_STATE_CANCELLED

    await eventually(family_cancelled)
    await eventually(lambda: _all_cancelled(agent))
    await eventually(lambda: _nothing_left(mesh))


async def _nothing_left(mesh: Mesh) -> None:
    """Nothing of finished plans, steps or sub-tasks stays in the coordinator's memory."""
    memory = mesh.running.coordinator.memory()
    for name in ("plans_running", "plan_children", "subtask_parents", "projects_active"):
        assert memory[name] == 0, memory


async def _running(client: Any, task_id: str) -> None:
    async def check() -> None:
        task = (await client.GetTask(C.GetTaskRequest(task_id=task_id))).task
        assert task.state == S.TASK_STATE_RUNNING

    await eventually(check)


async def _all_cancelled(agent: Any) -> None:
    assert len(agent.stats.executions) == 3
    assert all(x.cancelled and x.finished for x in agent.stats.executions)


async def test_projects_group_tasks_and_report_progress(mesh: Mesh, pki: Pki) -> None:
    await mesh.agent(max_concurrency=4)
    client = mesh.client()
    project = (
        await client.CreateProject(
            C.CreateProjectRequest(name="launch", goal="ship it", attributes={"team": "a"})
        )
    ).project
    assert project.owner.endswith("/client") and project.attributes["team"] == "a"
    plain = C.TaskSpec(capability="echo", input=S.Payload(text="x"), project_id=project.project_id)
    planned = plan_spec(step("p1"), step("p2"))
    planned.project_id = project.project_id
    await collect(client.StreamTask(C.StreamTaskRequest(spec=plain)))
    await collect(client.StreamTask(C.StreamTaskRequest(spec=planned)))
    got = (await client.GetProject(C.GetProjectRequest(project_id=project.project_id))).project
    counts = {c.state: c.count for c in got.progress.tasks_by_state}
    # One task, one plan and its two steps.
    assert counts == {S.TASK_STATE_SUCCEEDED: 4}
    assert got.progress.total_tasks == 4 and got.progress.active_tasks == 0
    assert got.progress.usage.total_tokens == 21  # three units of work, 7 tokens each
    listed = (await client.ListProjects(C.ListProjectsRequest())).projects
    assert [p.project_id for p in listed] == [project.project_id]
    by_project = (await client.ListTasks(C.ListTasksRequest(project_id=project.project_id))).tasks
    assert len(by_project) == 4
    # Another client sees nothing of it.
    pki.issue(role="client", name="bob", stem="bob-projects")
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await mesh.client("bob-projects").GetProject(
            C.GetProjectRequest(project_id=project.project_id)
        )
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    await eventually(lambda: _published(mesh, project.project_id, "project.completed"))
    await eventually(lambda: _nothing_left(mesh))
    assert _types(mesh, project.project_id)[0] == "project.created"
    with pytest.raises(grpc.aio.AioRpcError) as bad:
        await client.SubmitTask(
            C.SubmitTaskRequest(spec=C.TaskSpec(capability="echo", project_id="nope"))
        )
    assert bad.value.code() == grpc.StatusCode.NOT_FOUND


def _types(mesh: Mesh, subject: str) -> list[str]:
    return [t for t, s, _, _ in mesh.events.published if s == subject]


async def _published(mesh: Mesh, subject: str, event_type: str) -> None:
    assert event_type in _types(mesh, subject)
