"""A remote A2A agent as hivewire capabilities: the adapter agent against a real A2A server.

The test serves an A2A agent itself with the official ``a2a-sdk`` server
(``DefaultRequestHandler``, an ``AgentExecutor``, its JSON-RPC/SSE routes) over HTTPS.
Real processes: nats-server, the coordinator and the adapter agent
(``python -m hivewire.services.a2a.remote --card-url ...``), found through the embedded
registry. Tasks go to the remote skills through hivewire's own API like to any agent.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import pytest
import pytest_asyncio
from a2a.helpers import new_task_from_user_message, new_text_message
from a2a.server.agent_execution import AgentExecutor, RequestContext
from a2a.server.events import EventQueue
from a2a.server.request_handlers import DefaultRequestHandler
from a2a.server.routes import create_agent_card_routes, create_jsonrpc_routes
from a2a.server.tasks import InMemoryTaskStore, TaskUpdater
from a2a.types import a2a_pb2 as a2a
from google.protobuf import json_format
from starlette.applications import Starlette

from hivewire.common.v1 import common_pb2
from hivewire.coordinator.v1 import coordinator_pb2, coordinator_pb2_grpc
from hivewire.services.runtime.channels import secure_channel
from hivewire.services.runtime.https import HttpsServer
from tests.conftest import Pki
from tests.helpers import NatsServer, ServiceProcess, eventually
from tests.support.e2e_mesh import coordinator_process, mesh_process, wait_for_agents

pytestmark = [pytest.mark.asyncio(loop_scope="module"), pytest.mark.timeout(180)]

C = coordinator_pb2
S = common_pb2


@dataclass
class RemoteExecutor(AgentExecutor):
    """An outside A2A agent: shouts words, lingers until cancelled, asks for confirmation."""

    cancelled: list[str] = field(default_factory=list)
    asked: set[str] = field(default_factory=set)

    async def execute(self, context: RequestContext, event_queue: EventQueue) -> None:
        assert context.message is not None
        task = context.current_task
        if task is None:
            task = new_task_from_user_message(context.message)
            await event_queue.enqueue_event(task)
        updater = TaskUpdater(event_queue, task.id, task.context_id)
        skill = json_format.MessageToDict(context.message.metadata).get("skill", "")
        text = context.get_user_input()
        if skill == "shout":
            words = text.split()
            for i, word in enumerate(words):
                await updater.update_status(
                    a2a.TASK_STATE_WORKING, message=new_text_message(f"shouting {i + 1}")
                )
                await updater.add_artifact(
                    [a2a.Part(text=word.upper() + " ")],
                    artifact_id="shout",
                    append=i > 0,
                    last_chunk=i == len(words) - 1,
                )
            await updater.complete()
        elif skill == "linger":
            await updater.start_work(message=new_text_message("lingering"))
            await asyncio.Event().wait()  # until the framework cancels this on CancelTask
        elif skill == "Confirm Order":
            if task.id not in self.asked:  # the first message; then comes the answer
                self.asked.add(task.id)
                await updater.requires_input(message=new_text_message(f"Proceed with {text}?"))
                return
            await updater.add_artifact([a2a.Part(text=f"confirmed: {text}")], artifact_id="result")
            await updater.complete()
        else:
            await updater.failed(message=new_text_message(f"unknown skill {skill}"))

    async def cancel(self, context: RequestContext, event_queue: EventQueue) -> None:
        assert context.task_id is not None
        self.cancelled.append(context.task_id)
        updater = TaskUpdater(event_queue, context.task_id, context.context_id or "")
        await updater.cancel()


def remote_card(url: str) -> a2a.AgentCard:
    card = a2a.AgentCard(
        name="Outside Agent",
        description="An A2A agent hivewire did not build.",
        version="2.0.0",
        default_input_modes=["text/plain"],
        default_output_modes=["text/plain"],
    )
    card.supported_interfaces.add(url=url, protocol_binding="JSONRPC", protocol_version="1.0")
    card.capabilities.streaming = True
    for skill_id, description in (
        ("shout", "Shout the words back"),
        ("linger", "Work until cancelled"),
        ("Confirm Order", "Ask before confirming"),
    ):
        card.skills.add(id=skill_id, name=skill_id, description=description, tags=["test"])
    return card


@dataclass
class RemoteMesh:
    executor: RemoteExecutor
    remote: HttpsServer
    adapter: ServiceProcess
    client: coordinator_pb2_grpc.CoordinatorServiceAsyncStub


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def mesh(pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[RemoteMesh]:
    workdir = tmp_path_factory.mktemp("e2e-a2a-remote")
    executor = RemoteExecutor()
    async with contextlib.AsyncExitStack() as stack:
        card = a2a.AgentCard()
        app = Starlette()
        remote = HttpsServer(app, pki.files("client"), host="127.0.0.1", port=0,
                             require_client_cert=False)  # fmt: skip
        card.CopyFrom(remote_card(f"{remote.url}/"))
        handler = DefaultRequestHandler(executor, InMemoryTaskStore(), card)
        app.router.routes.extend(
            [*create_agent_card_routes(card), *create_jsonrpc_routes(handler, rpc_url="/")]
        )
        await stack.enter_async_context(remote)
        nats = await stack.enter_async_context(NatsServer(workdir / "nats"))
        coordinator = await stack.enter_async_context(
            coordinator_process(
                workdir, certs_dir=pki.dir, nats_url=nats.url, db_path=workdir / "c.db"
            )
        )
        adapter = await stack.enter_async_context(
            mesh_process(
                "hivewire.services.a2a.remote",
                "--card-url", f"{remote.url}/.well-known/agent-card.json",
                "--ca-file", str(pki.dir / "ca.pem"),
                workdir=workdir,
                name="adapter",
                certs_dir=pki.dir,
                identity="agent",
                nats_url=nats.url,
                env={"HIVEWIRE_A2A__CARD_REFRESH": "0.3"},
            )
        )  # fmt: skip
        channel = secure_channel(coordinator.address, pki.files("client"))
        stack.push_async_callback(channel.close)
        client: coordinator_pb2_grpc.CoordinatorServiceAsyncStub = (
            coordinator_pb2_grpc.CoordinatorServiceStub(channel)  # type: ignore[assignment]
        )
        await wait_for_agents(client, 1)
        yield RemoteMesh(executor, remote, adapter, client)


def spec(capability: str, text: str) -> C.TaskSpec:
    task = C.TaskSpec(capability=capability, input=S.Payload(text=text), max_attempts=1)
    task.timeout.FromSeconds(60)
    return task


async def test_the_remote_skills_are_capabilities_of_an_agent(mesh: RemoteMesh) -> None:
    async def described() -> None:
        # The coordinator learns the descriptions from the agent's Describe, just after
        # the agent appears in discovery.
        response = await mesh.client.ListAgents(C.ListAgentsRequest(), timeout=10)
        [agent] = response.agents
        assert agent.card.name == "outside-agent"
        assert agent.card.version == "2.0.0"
        caps = {c.name: c.description for c in agent.card.capabilities}
        assert caps == {
            "shout": "Shout the words back",
            "linger": "Work until cancelled",
            "confirm-order": "Ask before confirming",
        }
        assert agent.health == C.AGENT_HEALTH_HEALTHY

    await eventually(described, timeout=20, interval=0.1)


async def test_a_task_streams_from_the_remote_agent(mesh: RemoteMesh) -> None:
    events = [
        r.event
        async for r in mesh.client.StreamTask(C.StreamTaskRequest(spec=spec("shout", "a b c")))
    ]
    kinds = [e.WhichOneof("kind") for e in events]
    progress = [e.progress.message for e in events if e.HasField("progress")]
    assert "shouting 1" in progress and "shouting 3" in progress
    partials = [e.partial for e in events if e.HasField("partial")]
    assert [p.content.text for p in partials] == ["A ", "B ", "C "]
    assert [p.append for p in partials] == [False, True, True]
    assert partials[-1].last_chunk and partials[0].artifact_id == "shout"
    assert kinds[-1] == "finished"
    finished = events[-1].finished
    assert finished.state == S.TASK_STATE_SUCCEEDED, finished
    assert finished.output.text == "A B C "


async def test_plan_steps_route_to_the_remote_agent_like_to_any_agent(mesh: RemoteMesh) -> None:
    plan = C.Plan(
        steps=[
            C.PlanStep(step_id="first", capability="shout", input=S.Payload(text="hello there")),
            C.PlanStep(
                step_id="second",
                capability="shout",
                input=S.Payload(text="again"),
                depends_on=["first"],
            ),
        ]
    )
    task = C.TaskSpec(plan=plan, max_attempts=1)
    task.timeout.FromSeconds(60)
    events = [r.event async for r in mesh.client.StreamTask(C.StreamTaskRequest(spec=task))]
    finished = events[-1].finished
    assert finished.state == S.TASK_STATE_SUCCEEDED, finished
    assert json_format.MessageToDict(finished.output.json) == {
        "first": "HELLO THERE ",
        "second": "AGAIN ",
    }
    # The remote agent's streaming reaches the plan's own stream as step partials.
    partials = [
        e.step.partial.content.text
        for e in events
        if e.HasField("step") and e.step.HasField("partial")
    ]
    assert "HELLO " in partials and "AGAIN " in partials


async def test_cancelling_the_task_cancels_the_remote_task(mesh: RemoteMesh) -> None:
    call = mesh.client.StreamTask(C.StreamTaskRequest(spec=spec("linger", "forever")))
    task_id = ""
    async for response in call:
        event = response.event
        if event.HasField("snapshot"):
            task_id = event.snapshot.task_id
        if event.HasField("progress") and event.progress.message == "lingering":
            await mesh.client.CancelTask(C.CancelTaskRequest(task_id=task_id), timeout=10)
        if event.HasField("finished"):
            assert event.finished.state == S.TASK_STATE_CANCELLED
    await eventually(lambda: len(mesh.executor.cancelled) == 1, timeout=20, interval=0.05)


async def test_an_input_request_of_the_remote_agent_is_answered_in_hivewire(
    mesh: RemoteMesh,
) -> None:
    submitted = await mesh.client.SubmitTask(
        C.SubmitTaskRequest(spec=spec("confirm-order", "order 7")), timeout=10
    )
    task_id = submitted.task.task_id
    asked: Any = None
    call = mesh.client.WatchTask(C.WatchTaskRequest(task_id=task_id))
    async for response in call:
        event = response.event
        if event.HasField("input_required"):
            asked = event.input_required
            answer = S.InputResponse(request_id=asked.request_id, value=S.Payload(text="yes"))
            await mesh.client.ProvideInput(
                C.ProvideInputRequest(task_id=task_id, response=answer), timeout=10
            )
        if event.HasField("finished"):
            assert event.finished.state == S.TASK_STATE_SUCCEEDED, event.finished
            assert event.finished.output.text == "confirmed: yes"
    assert asked is not None and asked.prompt == "Proceed with order 7?"


async def test_health_follows_the_remote_card_endpoint(mesh: RemoteMesh) -> None:
    """Runs last: the remote agent goes away, the adapter stops taking tasks."""
    await mesh.remote.__aexit__(None, None, None)

    async def unhealthy() -> None:
        response = await mesh.client.ListAgents(C.ListAgentsRequest(), timeout=10)
        healthy = [a for a in response.agents if a.health == C.AGENT_HEALTH_HEALTHY]
        assert not healthy, healthy

    await eventually(unhealthy, timeout=30, interval=0.2)
