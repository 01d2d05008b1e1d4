"""Agents delegating: ``ctx.subtask`` / ``ctx.fan_out`` and the planner example.

A real coordinator (in-process, mTLS), real SDK agents served by the runtime and
registered in the coordinator's registry, scripted agents doing the steps, and for
the planner a real model service talking to an Ollama stand-in.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from google.protobuf import json_format

from hivewire.common.v1 import common_pb2
from hivewire.coordinator.v1 import coordinator_pb2
from hivewire.discovery import Instance
from hivewire.services.agent import (
    Agent,
    Payload,
    SubtaskError,
    SubtaskRequest,
    TaskContext,
    capability,
)
from hivewire.services.agent.examples.planner import PlannerAgent
from hivewire.services.model.settings import ModelSettings
from hivewire.services.runtime.errors import Unavailable
from hivewire.services.runtime.tls import describe_cert
from tests.conftest import Pki
from tests.helpers import eventually
from tests.integration.test_agent_helpers import agent_settings, serve_in_process
from tests.support.coordinator_mesh import Mesh, collect, start_mesh
from tests.support.model_harness import serve_model
from tests.support.ollama_standin import OllamaStandin

pytestmark = pytest.mark.timeout(90)

S = common_pb2
C = coordinator_pb2


class Delegator(Agent):
    """Delegates to other agents in every way the SDK allows."""

    name = "delegator"
    max_concurrency = 8

    @capability("fan")
    async def fan(self, task: Payload, ctx: TaskContext) -> dict[str, Any]:
        results = await ctx.fan_out([SubtaskRequest("echo", "one"), SubtaskRequest("echo", "two")])
        return {"outputs": [r.output.text for r in results], "ids": [r.task_id for r in results]}

    @capability("deep")
    async def deep(self, task: Payload, ctx: TaskContext) -> str:
        try:
            inner = await ctx.subtask("deep")
        except SubtaskError as err:
            return f"{err.reason}@{ctx.task_id}"
        return inner.output.text

    @capability("wait")
    async def wait(self, task: Payload, ctx: TaskContext) -> str:
        result = await ctx.subtask("echo", {"hang": True})
        return result.output.text

    @capability("plan-wait")
    async def plan_wait(self, task: Payload, ctx: TaskContext) -> str:
        result = await ctx.subtask(
            plan={
                "steps": [
                    {
                        "step_id": "done-first",
                        "capability": "echo",
                        "compensation_capability": "undo",
                    },
                    {
                        "step_id": "hangs",
                        "capability": "echo",
                        "input": {"json": {"hang": True}},
                    },
                ]
            }
        )
        return result.output.text

    @capability("follow")
    async def follow(self, task: Payload, ctx: TaskContext) -> dict[str, Any]:
        seen: list[str] = []
        result = await ctx.subtask(
            "echo", {"steps": 2}, on_event=lambda event: seen.append(event.WhichOneof("kind"))
        )
        return {"kinds": seen, "output": result.output.text}

    @capability("fails")
    async def fails(self, task: Payload, ctx: TaskContext) -> str:
        await ctx.subtask("echo", {"fail": "permanent"})
        return "unreachable"


@contextlib.asynccontextmanager
async def sdk_agent(
    mesh: Mesh, agent: Agent, *, identity: str, **section: Any
) -> AsyncIterator[None]:
    """Serve an SDK agent that reaches the mesh's coordinator and is routed to by it."""
    settings = agent_settings(
        mesh.pki_dir, identity=identity, coordinator_address=mesh.address, **section
    )
    async with serve_in_process(agent, settings) as running:
        card = agent.card()
        instance = Instance(
            service="hivewire-agent",
            instance_id=f"{agent.agent_name()}-1",
            address="127.0.0.1",
            port=running.port,
            tags=tuple(card.capability_names),
            meta={
                "name": agent.agent_name(),
                "version": "1.0.0",
                "max_concurrency": "8",
                "spiffe_id": mesh_spiffe_id(mesh, identity),
            },
        )
        await mesh.registry.register(instance)
        try:
            yield
        finally:
            with contextlib.suppress(Exception):
                await mesh.registry.deregister(instance.instance_id)


def mesh_spiffe_id(mesh: Mesh, stem: str) -> str:
    return describe_cert(mesh.pki_dir / f"{stem}.pem").spiffe_id or ""


@pytest.fixture
async def mesh(pki: Pki, tmp_path: Path) -> AsyncIterator[Mesh]:
    async with start_mesh(pki.dir, tmp_path / "coordinator.db", max_subtask_depth=3) as m:
        yield m


async def finished(mesh: Mesh, capability_name: str, text: str = "") -> C.Task:
    client = mesh.client()
    events = await collect(
        client.StreamTask(
            C.StreamTaskRequest(
                spec=C.TaskSpec(capability=capability_name, input=S.Payload(text=text))
            )
        )
    )
    return (await client.GetTask(C.GetTaskRequest(task_id=events[0].task_id))).task


async def test_fan_out_runs_sub_tasks_on_other_agents(mesh: Mesh) -> None:
    echo = await mesh.agent(max_concurrency=4)
    async with sdk_agent(mesh, Delegator(), identity="agent"):
        task = await finished(mesh, "fan")
    assert task.state == S.TASK_STATE_SUCCEEDED, task.error
    out = json_format.MessageToDict(task.output.json)
    assert out["outputs"] == ["done:one", "done:two"]
    # The sub-tasks are tasks of their own, children of the delegating task.
    assert sorted(x.task_id for x in echo.stats.executions) == sorted(out["ids"])
    assert all(
        x.assignment.metadata.correlation_id == task.spec.metadata.correlation_id
        for x in echo.stats.executions
    )
    admin = mesh.client("admin")
    children = (await admin.ListTasks(C.ListTasksRequest(parent_task_id=task.task_id))).tasks
    assert sorted(c.task_id for c in children) == sorted(out["ids"])
    assert all(c.owner.endswith("/agent/default") and c.depth == 1 for c in children)


async def test_sub_tasks_stream_only_their_outcome_unless_a_listener_wants_events(
    mesh: Mesh, monkeypatch: pytest.MonkeyPatch
) -> None:
    await mesh.agent(max_concurrency=4)
    coordinator = mesh.running.coordinator
    asked: list[bool] = []
    stream = coordinator.stream

    async def recording(*args: Any, outcome_only: bool = False, **kwargs: Any) -> Any:
        asked.append(outcome_only)
        return await stream(*args, outcome_only=outcome_only, **kwargs)

    monkeypatch.setattr(coordinator, "stream", recording)
    async with sdk_agent(mesh, Delegator(), identity="agent"):
        fanned = await finished(mesh, "fan")
        followed = await finished(mesh, "follow")
    assert fanned.state == followed.state == S.TASK_STATE_SUCCEEDED
    # The client's streams ask for every event; fan's two sub-tasks only for their
    # outcome; follow's sub-task, which has a listener, for every event again.
    assert asked == [False, True, True, False, False]
    out = json_format.MessageToDict(followed.output.json)
    assert out["output"] == "done:"
    assert out["kinds"][0] == "snapshot" and out["kinds"][-1] == "finished"
    assert out["kinds"].count("progress") == 2 and "state_changed" in out["kinds"]


async def test_a_sub_task_whose_stream_breaks_is_watched_for_its_outcome_alone(
    mesh: Mesh, monkeypatch: pytest.MonkeyPatch
) -> None:
    await mesh.agent(max_concurrency=4)
    coordinator = mesh.running.coordinator
    stream, watch = coordinator.stream, coordinator.watch
    watched: list[bool] = []

    async def breaking(spec: Any, caller: Any, **kwargs: Any) -> Any:
        events = await stream(spec, caller, **kwargs)
        if "/agent/" not in caller.identity:
            return events  # the client's own stream

        async def first_then_break() -> Any:
            yield await anext(aiter(events))
            raise Unavailable("the stream broke")

        return first_then_break()

    async def recording(*args: Any, outcome_only: bool = False, **kwargs: Any) -> Any:
        watched.append(outcome_only)
        return await watch(*args, outcome_only=outcome_only, **kwargs)

    monkeypatch.setattr(coordinator, "stream", breaking)
    monkeypatch.setattr(coordinator, "watch", recording)
    async with sdk_agent(mesh, Delegator(), identity="agent"):
        task = await finished(mesh, "fan")
        followed = await finished(mesh, "follow")
    assert task.state == followed.state == S.TASK_STATE_SUCCEEDED, task.error
    assert json_format.MessageToDict(task.output.json)["outputs"] == ["done:one", "done:two"]
    # Each sub-task's broken stream went on as a watch: of its outcome alone, unless a
    # listener wants every event (it then gets those after the break too).
    assert watched == [True, True, False]
    kinds = json_format.MessageToDict(followed.output.json)["kinds"]
    assert kinds[0] == "snapshot" and kinds[-1] == "finished" and kinds.count("progress") == 2


async def test_nesting_stops_at_the_depth_limit(mesh: Mesh) -> None:
    async with sdk_agent(mesh, Delegator(), identity="agent"):
        task = await finished(mesh, "deep")
    # deep -> deep -> deep -> deep (depth 3) refuses the fourth level.
    assert task.state == S.TASK_STATE_SUCCEEDED
    assert task.output.text.startswith("SUBTASK_DEPTH_EXCEEDED@")


async def test_a_failed_sub_task_fails_the_handler_with_its_reason(mesh: Mesh) -> None:
    await mesh.agent(max_concurrency=4)
    async with sdk_agent(mesh, Delegator(), identity="agent"):
        task = await finished(mesh, "fails")
    assert task.state == S.TASK_STATE_FAILED
    assert task.error.reason == "SCRIPTED_FAILURE"
    assert task.error.metadata["state"] == "failed"


async def test_cancelling_the_parent_cancels_the_sub_task(mesh: Mesh) -> None:
    echo = await mesh.agent(max_concurrency=4)
    client = mesh.client()
    async with sdk_agent(mesh, Delegator(), identity="agent"):
        parent = (
            await client.SubmitTask(C.SubmitTaskRequest(spec=C.TaskSpec(capability="wait")))
        ).task
        await echo.wait_started(1)
        await client.CancelTask(C.CancelTaskRequest(task_id=parent.task_id))

        async def child_cancelled() -> None:
            (execution,) = echo.stats.executions
            assert execution.cancelled and execution.finished

        await eventually(child_cancelled)
    admin = mesh.client("admin")
    (child,) = (await admin.ListTasks(C.ListTasksRequest(parent_task_id=parent.task_id))).tasks
    assert child.state == S.TASK_STATE_CANCELLED


async def test_cancelling_a_task_runs_the_saga_of_its_plan_sub_task(mesh: Mesh) -> None:
    echo = await mesh.agent(max_concurrency=4)
    undo = await mesh.agent("undoer", capabilities=("undo",))
    client = mesh.client()
    admin = mesh.client("admin")
    async with sdk_agent(mesh, Delegator(), identity="agent"):
        parent = (
            await client.SubmitTask(C.SubmitTaskRequest(spec=C.TaskSpec(capability="plan-wait")))
        ).task

        async def plan_half_done() -> C.Task:
            found = (await admin.ListTasks(C.ListTasksRequest(parent_task_id=parent.task_id))).tasks
            assert len(found) == 1
            plan = found[0]
            states = {s.step_id: s.state for s in plan.steps}
            assert states == {"done-first": S.TASK_STATE_SUCCEEDED, "hangs": S.TASK_STATE_RUNNING}
            return plan

        plan = await eventually(plan_half_done)
        await client.CancelTask(C.CancelTaskRequest(task_id=parent.task_id))
        events = await collect(admin.WatchTask(C.WatchTaskRequest(task_id=plan.task_id)))
    assert events[-1].finished.state == S.TASK_STATE_CANCELLED
    hung = next(x for x in echo.stats.executions if x.assignment.input.json)
    assert hung.cancelled
    (compensation,) = undo.stats.executions
    assert json_format.MessageToDict(compensation.assignment.input.json)["step_id"] == "done-first"


PLAN = {
    "steps": [
        {"step_id": "a", "capability": "echo", "input": {"text": "first"}},
        {"step_id": "b", "capability": "echo", "input": {"text": "second"}},
        {
            "step_id": "c",
            "capability": "echo",
            "input": {"text": "third"},
            "depends_on": ["a", "b"],
        },
    ],
    "aggregation": "AGGREGATION_ALL",
}


@contextlib.asynccontextmanager
async def planner(mesh: Mesh, pki: Pki, reply: str) -> AsyncIterator[OllamaStandin]:
    # The stand-in streams its reply word by word, as a real model would.
    async with OllamaStandin(models={"planner:1b": reply}) as ollama:
        settings = ModelSettings(
            routes={"planner:1b": "ollama"},
            default_model="planner:1b",
            backends=["ollama", "deterministic"],
            ollama_url=ollama.url,
        )
        async with serve_model(pki, settings) as model:
            async with sdk_agent(
                mesh,
                PlannerAgent(),
                identity="agent-planner",
                model_address=model.server.address,
            ):
                yield ollama


async def test_the_planner_turns_a_goal_into_a_plan_and_runs_it(mesh: Mesh, pki: Pki) -> None:
    echo = await mesh.agent(max_concurrency=4)
    reply = "Here is the plan:\n```json\n" + json.dumps(PLAN) + "\n```"
    async with planner(mesh, pki, reply) as ollama:
        task = await finished(mesh, "plan", "greet three times")
    assert task.state == S.TASK_STATE_SUCCEEDED, task.error
    out = json_format.MessageToDict(task.output.json)
    assert out["result"] == {"a": "done:first", "b": "done:second", "c": "done:third"}
    assert out["plan"] == PLAN
    assert len(echo.stats.executions) == 3
    assert "greet three times" in json.dumps(ollama.requests[-1].body)
    admin = mesh.client("admin")
    (plan_task,) = (await admin.ListTasks(C.ListTasksRequest(parent_task_id=task.task_id))).tasks
    assert plan_task.task_id == out["plan_task_id"] and len(plan_task.steps) == 3


@pytest.mark.parametrize(
    ("reply", "reason", "quoted"),
    [
        ("I would rather not plan today.", "PLAN_UNUSABLE", "rather not plan"),
        ('{"steps": [oops]}', "PLAN_UNUSABLE", "oops"),
        (
            json.dumps({"steps": [{"step_id": "a", "capability": "echo", "why": "because"}]}),
            "PLAN_UNUSABLE",
            "because",
        ),
        (
            json.dumps({"steps": [{"step_id": "a", "capability": "echo", "depends_on": ["a"]}]}),
            "PLAN_INVALID",
            "depends on itself",
        ),
    ],
)
async def test_an_unusable_model_answer_is_a_clear_failure(
    mesh: Mesh, pki: Pki, reply: str, reason: str, quoted: str
) -> None:
    echo = await mesh.agent(max_concurrency=4)
    async with planner(mesh, pki, reply):
        task = await finished(mesh, "plan", "do something")
    assert task.state == S.TASK_STATE_FAILED
    assert task.error.reason == reason
    assert quoted in task.error.message
    assert echo.stats.executions == []
