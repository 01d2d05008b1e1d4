"""A tool call that needs a person's approval, end to end through real processes over mTLS.

nats-server, the coordinator, the model service (deterministic backend), the tool
service with a policy that requires approval of ``http_fetch`` and an allow-list naming a
loopback web site this module runs, and the researcher example agent, all found through
the embedded NATS registry. A client starts a ``research`` task that fetches a page: the
task waits in input-required with the tool name and the digest of the arguments, the
page is untouched until a person answers, then fetched exactly once after a yes and
never after a no. Answers go through the ``Session`` stream and through ``ProvideInput``.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

import grpc
import pytest
import pytest_asyncio
from google.protobuf import json_format, struct_pb2

from hivewire.common.v1 import common_pb2
from hivewire.coordinator.v1 import coordinator_pb2, coordinator_pb2_grpc
from hivewire.services.runtime.channels import secure_channel
from hivewire.services.runtime.events import ReceivedEvent, replay
from hivewire.services.tool.sdk import arguments_digest
from tests.conftest import Pki
from tests.helpers import NatsServer, ServiceProcess, eventually
from tests.support.e2e_mesh import agent_process, coordinator_process, wait_for_agents
from tests.support.tool_mesh import (
    MODEL_SERVICE,
    RESEARCHER,
    TOOL_SERVICE,
    CountingSite,
    model_process,
    tool_process,
    wait_until_registered,
)

pytestmark = [pytest.mark.asyncio(loop_scope="module"), pytest.mark.timeout(120)]

S = common_pb2
C = coordinator_pb2

PAGE = (
    "Saturn has the most moons of any planet. Jupiter is the largest planet in the "
    "solar system. The weather on Mars is cold."
)
QUESTION = "Which planet has most moons?"
MOONS = "Saturn has the most moons of any planet."
CLIENT_ID = "spiffe://hivewire.local/client/client"

# The mesh's usual policy: agents may call every tool, fetching needs a person's yes.
POLICY = """\
version = 1

[[rules]]
description = "agents"
callers = ["spiffe://hivewire.local/agent/*"]
allow = ["*"]
require_approval = ["http_fetch"]
"""


@dataclass
class ApprovalMesh:
    nats: NatsServer
    tool: ServiceProcess
    site: CountingSite
    client: coordinator_pb2_grpc.CoordinatorServiceAsyncStub


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def mesh(pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[ApprovalMesh]:
    workdir = tmp_path_factory.mktemp("e2e-approval")
    policy = workdir / "tool-policy.toml"
    policy.write_text(POLICY)
    async with contextlib.AsyncExitStack() as stack:
        site = await stack.enter_async_context(CountingSite(PAGE))
        nats = await stack.enter_async_context(NatsServer(workdir / "nats", certs_dir=pki.dir))
        services = [
            coordinator_process(
                workdir, certs_dir=pki.dir, nats_url=nats.url, db_path=workdir / "c.db"
            ),
            model_process(workdir, certs_dir=pki.dir, nats_url=nats.url),
            tool_process(
                workdir,
                certs_dir=pki.dir,
                nats_url=nats.url,
                policy_file=policy,
                allowed_hosts=[site.host],
            ),
        ]
        for service in services:
            # Registered before starting, so a sibling that fails to start stops the others.
            stack.push_async_exit(service)
        await asyncio.gather(*(s.start() for s in services))
        coordinator, _, tool = services
        # The agent looks the model and tool services up on first use.
        await wait_until_registered(
            nats.url, [MODEL_SERVICE, TOOL_SERVICE], nats_options=nats.client_options()
        )
        await stack.enter_async_context(
            agent_process(
                workdir, RESEARCHER, name="researcher", certs_dir=pki.dir, nats_url=nats.url
            )
        )
        channel = secure_channel(coordinator.address, pki.files("client"))
        stack.push_async_callback(channel.close)
        client: coordinator_pb2_grpc.CoordinatorServiceAsyncStub = (
            coordinator_pb2_grpc.CoordinatorServiceStub(channel)
        )
        await wait_for_agents(client, 1)
        yield ApprovalMesh(nats, tool, site, client)


def research_spec(url: str) -> C.TaskSpec:
    payload = S.Payload()
    payload.json.CopyFrom(
        json_format.ParseDict({"question": QUESTION, "urls": [url]}, struct_pb2.Struct())
    )
    spec = C.TaskSpec(capability="research", input=payload)
    spec.timeout.FromSeconds(60)
    return spec


@dataclass
class Pause:
    """What the client saw while the task waited for its answer."""

    asked: common_pb2.InputRequest
    task: C.Task
    hits_before_answer: int


@dataclass
class Run:
    task_id: str
    pause: Pause
    events: list[C.TaskEvent]

    @property
    def finished(self) -> C.TaskFinished:
        assert self.events[-1].HasField("finished"), self.events[-1]
        return self.events[-1].finished


async def pause_checks(mesh: ApprovalMesh, task_id: str, event: C.TaskEvent, path: str) -> Pause:
    """Record the task and the site as they are while the approval is pending."""
    got = await mesh.client.GetTask(C.GetTaskRequest(task_id=task_id))
    return Pause(event.input_required, got.task, mesh.site.hits[path])


async def run_in_session(mesh: ApprovalMesh, path: str, *, approved: bool) -> Run:
    """Start the task, and answer its approval request, over one Session stream."""
    call = mesh.client.Session()
    await call.write(
        C.SessionRequest(
            start=C.SessionStart(client_ref="research", spec=research_spec(mesh.site.url(path)))
        )
    )
    task_id = ""
    pause: Pause | None = None
    events: list[C.TaskEvent] = []
    async for response in call:
        kind = response.WhichOneof("kind")
        if kind == "accepted":
            assert response.accepted.client_ref == "research"
            task_id = response.accepted.task_id
            continue
        assert kind == "event", response
        event = response.event
        assert event.task_id == task_id
        events.append(event)
        if event.HasField("input_required"):
            assert pause is None, "asked twice"
            pause = await pause_checks(mesh, task_id, event, path)
            await call.write(
                C.SessionRequest(
                    input=C.SessionInput(
                        task_id=task_id,
                        response=S.InputResponse(
                            request_id=event.input_required.request_id,
                            approved=approved,
                            comment="looked fine" if approved else "not this site",
                        ),
                    )
                )
            )
        if event.HasField("finished"):
            await call.done_writing()
    assert await call.code() == grpc.StatusCode.OK
    assert pause is not None, [e.WhichOneof("kind") for e in events]
    return Run(task_id, pause, events)


async def run_with_provide_input(mesh: ApprovalMesh, path: str, *, approved: bool) -> Run:
    """Submit the task, watch it, and answer with the unary ProvideInput."""
    submitted = await mesh.client.SubmitTask(
        C.SubmitTaskRequest(spec=research_spec(mesh.site.url(path)))
    )
    task_id = submitted.task.task_id
    pause: Pause | None = None
    events: list[C.TaskEvent] = []
    async for response in mesh.client.WatchTask(C.WatchTaskRequest(task_id=task_id)):
        event = response.event
        events.append(event)
        if event.HasField("input_required"):
            assert pause is None, "asked twice"
            pause = await pause_checks(mesh, task_id, event, path)
            answered = await mesh.client.ProvideInput(
                C.ProvideInputRequest(
                    task_id=task_id,
                    response=S.InputResponse(
                        request_id=event.input_required.request_id, approved=approved
                    ),
                )
            )
            assert answered.task.task_id == task_id
            assert answered.task.state != S.TASK_STATE_INPUT_REQUIRED
    assert pause is not None, [e.WhichOneof("kind") for e in events]
    return Run(task_id, pause, events)


RUNNERS = {"session": run_in_session, "provide_input": run_with_provide_input}


def assert_asked_for_the_fetch(run: Run, url: str) -> None:
    """The pause names http_fetch and the digest of exactly the arguments it will run with."""
    asked = run.pause.asked
    assert asked.kind == S.INPUT_KIND_APPROVAL
    assert asked.tool_name == "http_fetch"
    assert asked.arguments_digest == arguments_digest({"url": url})
    assert asked.request_id
    task = run.pause.task
    assert task.state == S.TASK_STATE_INPUT_REQUIRED, S.TaskState.Name(task.state)
    assert task.pending_input == asked
    # Nothing was fetched while the decision was pending.
    assert run.pause.hits_before_answer == 0
    states = [e.state_changed.to_state for e in run.events if e.HasField("state_changed")]
    asked_at = states.index(S.TASK_STATE_INPUT_REQUIRED)
    assert states[asked_at + 1] == S.TASK_STATE_RUNNING, states


async def tool_events(mesh: ApprovalMesh, digest: str) -> list[ReceivedEvent]:
    """The ``tool.*`` events on NATS of calls with these arguments."""
    return [
        r
        async for r in replay(
            mesh.nats.url, "tool.*", nats_options=mesh.nats.client_options("client")
        )
        if r.event.tool.arguments_digest == digest
    ]


def audit_lines(mesh: ApprovalMesh, digest: str) -> list[str]:
    """The tool service's audit log lines of calls with these arguments."""
    log = mesh.tool.stderr_path.read_text(errors="replace")
    return [line for line in log.splitlines() if f"digest={digest} " in line]


@pytest.mark.parametrize("via", sorted(RUNNERS))
async def test_approved_fetch_runs_once_and_the_task_succeeds(mesh: ApprovalMesh, via: str) -> None:
    path = f"/approved-{via}-{uuid.uuid4().hex[:8]}.txt"
    url = mesh.site.url(path)
    digest = arguments_digest({"url": url})

    run = await RUNNERS[via](mesh, path, approved=True)

    assert_asked_for_the_fetch(run, url)
    assert run.finished.state == S.TASK_STATE_SUCCEEDED, run.finished
    assert mesh.site.hits[path] == 1
    output = run.finished.output
    sources = {s["label"]: s["evidence"] for s in json_format.MessageToDict(output.json)["sources"]}
    assert MOONS in sources[url]
    # The model answered from that evidence: the deterministic backend quotes its prompt.
    assert MOONS in output.text
    fetches = [
        e.activity for e in run.events if e.HasField("activity") and e.activity.name == "http_fetch"
    ]
    assert [a.done for a in fetches] == [False, True]
    got = await mesh.client.GetTask(C.GetTaskRequest(task_id=run.task_id))
    assert got.task.state == S.TASK_STATE_SUCCEEDED and not got.task.HasField("pending_input")
    assert len(got.task.attempts) == 1

    async def audited() -> list[ReceivedEvent]:
        found = await tool_events(mesh, digest)
        assert [r.type for r in found] == [
            "tool.approval_requested",
            "tool.invoked",
            "tool.completed",
        ]
        return found

    events = await eventually(audited, timeout=20)
    for received in events:
        assert received.event.tool.tool_name == "http_fetch"
        assert received.event.tool.task_id == run.task_id
    assert events[-1].event.tool.outcome == "ok"
    outcomes = [line.split("outcome=")[1].split()[0] for line in audit_lines(mesh, digest)]
    assert outcomes == ["approval_required", "ok"]
    # The tool ran on the coordinator's signed grant, which names the client that said yes
    # (the agent's own "approved_by" is not trusted).
    log = mesh.tool.stderr_path.read_text(errors="replace")
    approved = [line for line in log.splitlines() if " of http_fetch approved by " in line]
    assert any(
        f"approved by {CLIENT_ID} (request {run.pause.asked.request_id}," in line
        for line in approved
    ), approved


@pytest.mark.parametrize("via", sorted(RUNNERS))
async def test_denied_fetch_never_runs_and_the_task_fails(mesh: ApprovalMesh, via: str) -> None:
    path = f"/denied-{via}-{uuid.uuid4().hex[:8]}.txt"
    url = mesh.site.url(path)
    digest = arguments_digest({"url": url})

    run = await RUNNERS[via](mesh, path, approved=False)

    assert_asked_for_the_fetch(run, url)
    finished = run.finished
    assert finished.state == S.TASK_STATE_FAILED, finished
    assert (finished.error.reason, finished.error.retryable) == ("TOOL_APPROVAL_DENIED", False)
    assert "http_fetch" in finished.error.message
    assert mesh.site.hits[path] == 0
    got = await mesh.client.GetTask(C.GetTaskRequest(task_id=run.task_id))
    assert got.task.state == S.TASK_STATE_FAILED
    assert got.task.error.reason == "TOOL_APPROVAL_DENIED"
    # A permanent failure: no retry on another attempt.
    assert len(got.task.attempts) == 1
    assert not [e for e in run.events if e.HasField("retry")]

    async def asked() -> list[ReceivedEvent]:
        found = await tool_events(mesh, digest)
        assert found, "no tool.approval_requested yet"
        return found

    events = await eventually(asked, timeout=20)
    # The call paused for approval and was never made: no invoked, completed or failed.
    assert [r.type for r in events] == ["tool.approval_requested"]
    assert events[0].event.tool.task_id == run.task_id
    assert events[0].event.tool.outcome == "approval_required"
    outcomes = [line.split("outcome=")[1].split()[0] for line in audit_lines(mesh, digest)]
    assert outcomes == ["approval_required"]
