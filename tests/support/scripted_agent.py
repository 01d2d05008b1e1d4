"""A real AgentService whose behaviour each task's input scripts, for coordinator tests.

It is served with the runtime's ``ServiceServer`` (real mTLS, health, interceptors) and
registered in a real registry, so the coordinator talks to it exactly as to a real agent.
The task input's ``json`` field says what to do:

* ``{"steps": 3}``: started, 3 progress events, then a result ``"done:<text>"``.
* ``{"partials": 2}``: that many partial chunks before the result.
* ``{"gate": "name"}``: after started, wait until the test opens the gate (per task).
* ``{"hold": "name", "steps": n}``: emit n progress events, then wait for the gate.
* ``{"hang": true}``: started, then wait until cancelled (cancel message or call cancel).
* ``{"ask": "question"}``: ask for input, then answer with what the client said.
* ``{"fail": "retryable"}`` / ``{"fail": "permanent"}``: end with a classified error.
* ``{"fail_attempts": 2}``: retryable error on attempts 1..2, then succeed.
* ``{"fail_until": "fixed"}``: retryable error on every attempt until ``gate("fixed")`` is set.
* ``{"abort": "UNAVAILABLE"}``: end the call with that status (a broken agent).
* ``{"sleep": 0.5}``: work that long (a slow agent; deadlines).

An agent started with ``script=`` applies that script to every task (under the task's
own), for agents that behave one way whatever they are given.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from google.protobuf import json_format

from hivewire.agent.v1 import agent_pb2, agent_pb2_grpc
from hivewire.common.v1 import common_pb2
from hivewire.discovery import Instance, Registry, new_instance_id
from hivewire.services.runtime.config import load_settings
from hivewire.services.runtime.server import ServiceBinding, ServiceServer
from hivewire.services.runtime.tls import describe_cert

SERVICE = agent_pb2.DESCRIPTOR.services_by_name["AgentService"].full_name


@dataclass
class Execution:
    """What one Execute call received."""

    task_id: str
    attempt: int
    capability: str
    metadata: dict[str, str]
    time_remaining: float | None
    assignment: agent_pb2.TaskAssignment
    cancelled: bool = False
    finished: bool = False


@dataclass
class AgentStats:
    """What the agent observed, for assertions."""

    executions: list[Execution] = field(default_factory=list)
    in_flight: int = 0
    max_in_flight: int = 0
    completed: list[str] = field(default_factory=list)


class ScriptedAgent(agent_pb2_grpc.AgentServiceServicer):
    """The scripted servicer (see the module docstring)."""

    def __init__(
        self,
        name: str,
        *,
        capabilities: tuple[str, ...],
        max_concurrency: int,
        script: dict[str, Any] | None = None,
    ) -> None:
        self.name = name
        self.script = dict(script or {})
        self.agent_id = new_instance_id(name)
        self.capabilities = capabilities
        self.max_concurrency = max_concurrency
        self.stats = AgentStats()
        self._gates: dict[str, asyncio.Event] = {}
        self.started = asyncio.Condition()

    def gate(self, name: str) -> asyncio.Event:
        """The gate a task scripted with ``{"gate": name}`` waits on."""
        return self._gates.setdefault(name, asyncio.Event())

    async def wait_started(self, count: int = 1) -> None:
        """Wait until at least ``count`` executions have started."""
        async with self.started:
            await self.started.wait_for(lambda: len(self.stats.executions) >= count)

    async def Describe(
        self, request: agent_pb2.DescribeRequest, context: Any
    ) -> agent_pb2.DescribeResponse:
        return agent_pb2.DescribeResponse(
            agent_id=self.agent_id,
            in_flight=self.stats.in_flight,
            card=agent_pb2.AgentCard(
                name=self.name,
                version="1.0.0",
                description="scripted test agent",
                max_concurrency=self.max_concurrency,
                capabilities=[
                    agent_pb2.Capability(name=c, description=f"does {c}") for c in self.capabilities
                ],
            ),
        )

    async def Execute(  # type: ignore[override]
        self, request_iterator: AsyncIterator[agent_pb2.ExecuteRequest], context: Any
    ) -> AsyncIterator[agent_pb2.ExecuteResponse]:
        first = await anext(aiter(request_iterator))
        assign = first.assign
        execution = Execution(
            task_id=assign.task_id,
            attempt=assign.attempt,
            capability=assign.capability,
            metadata={k: v for k, v in context.invocation_metadata()},
            time_remaining=context.time_remaining(),
            assignment=assign,
        )
        script = {
            **self.script,
            **(
                json_format.MessageToDict(assign.input.json)
                if assign.input.HasField("json")
                else {}
            ),
        }
        stats = self.stats
        stats.in_flight += 1
        stats.max_in_flight = max(stats.max_in_flight, stats.in_flight)
        async with self.started:
            stats.executions.append(execution)
            self.started.notify_all()
        seq = 0

        def msg(**kind: Any) -> agent_pb2.ExecuteResponse:
            nonlocal seq
            seq += 1
            return agent_pb2.ExecuteResponse(task_id=assign.task_id, sequence=seq, **kind)

        inbox: asyncio.Queue[agent_pb2.ExecuteRequest] = asyncio.Queue()
        cancelled = asyncio.Event()

        async def read() -> None:
            async for request in request_iterator:
                if request.WhichOneof("kind") == "cancel":
                    execution.cancelled = True
                    cancelled.set()
                else:
                    await inbox.put(request)

        reader = asyncio.create_task(read())

        async def until_cancelled_or(waitable: Any) -> bool:
            """Wait for ``waitable``; True if a cancel came first."""
            waiter = asyncio.ensure_future(waitable)
            cancel = asyncio.ensure_future(cancelled.wait())
            done, _ = await asyncio.wait({waiter, cancel}, return_when=asyncio.FIRST_COMPLETED)
            for pending in (waiter, cancel):
                pending.cancel()
            return cancel in done

        cancel_error = msg(
            error=agent_pb2.ExecutionError(
                error=common_pb2.ErrorDetail(code="CANCELLED", reason="CANCELLED", message="stop")
            )
        )
        try:
            yield msg(
                started=agent_pb2.ExecutionStarted(agent_id=self.agent_id, agent_name=self.name)
            )
            for i in range(int(script.get("steps", 0))):
                yield msg(
                    progress=common_pb2.Progress(
                        fraction=(i + 1) / (int(script["steps"]) + 1), step=f"step-{i + 1}"
                    )
                )
            for i in range(int(script.get("partials", 0))):
                yield msg(
                    partial=common_pb2.PartialResult(
                        artifact_id="out",
                        content=common_pb2.Payload(text=f"chunk{i}"),
                        append=True,
                        last_chunk=i == int(script["partials"]) - 1,
                    )
                )
            gate_name = script.get("gate") or script.get("hold")
            if gate_name:
                if await until_cancelled_or(self.gate(f"{gate_name}").wait()):
                    yield cancel_error
                    return
            if script.get("hang"):
                await cancelled.wait()
                yield cancel_error
                return
            if "sleep" in script:
                if await until_cancelled_or(asyncio.sleep(float(script["sleep"]))):
                    yield cancel_error
                    return
            if "ask" in script:
                yield msg(
                    input_required=common_pb2.InputRequest(
                        request_id=f"q-{assign.attempt}",
                        kind=common_pb2.INPUT_KIND_TEXT,
                        prompt=str(script["ask"]),
                    )
                )
                answer_task = asyncio.ensure_future(inbox.get())
                if await until_cancelled_or(answer_task):
                    yield cancel_error
                    return
                answer = answer_task.result()
                yield msg(
                    result=agent_pb2.ExecutionResult(
                        output=common_pb2.Payload(text=f"answer:{answer.input.value.text}")
                    )
                )
                return
            if "abort" in script:
                await context.abort(getattr(grpc.StatusCode, script["abort"]), "scripted abort")
            fail = script.get("fail")
            if fail is None and assign.attempt <= int(script.get("fail_attempts", 0)):
                fail = "retryable"
            broken_until = script.get("fail_until")
            if fail is None and broken_until is not None and not self.gate(broken_until).is_set():
                # Every attempt fails until the test opens the gate (the cause is fixed).
                fail = "retryable"
            if fail is not None:
                yield msg(
                    error=agent_pb2.ExecutionError(
                        error=common_pb2.ErrorDetail(
                            code="UNAVAILABLE" if fail == "retryable" else "INVALID_ARGUMENT",
                            reason="SCRIPTED_FAILURE",
                            message=f"scripted {fail} failure",
                            retryable=fail == "retryable",
                        ),
                        usage=common_pb2.Usage(total_tokens=5),
                    )
                )
                return
            yield msg(
                result=agent_pb2.ExecutionResult(
                    output=common_pb2.Payload(text=f"done:{assign.input.text}"),
                    usage=common_pb2.Usage(prompt_tokens=3, completion_tokens=4, total_tokens=7),
                )
            )
            stats.completed.append(assign.task_id)
        finally:
            execution.finished = True
            stats.in_flight -= 1
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await reader


def _add_without_link(agent: ScriptedAgent, server: grpc.aio.Server) -> None:
    handlers = {
        "Execute": grpc.stream_stream_rpc_method_handler(
            agent.Execute,
            request_deserializer=agent_pb2.ExecuteRequest.FromString,
            response_serializer=agent_pb2.ExecuteResponse.SerializeToString,
        ),
        "Describe": grpc.unary_unary_rpc_method_handler(
            agent.Describe,
            request_deserializer=agent_pb2.DescribeRequest.FromString,
            response_serializer=agent_pb2.DescribeResponse.SerializeToString,
        ),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))


@contextlib.asynccontextmanager
async def serve_scripted_agent(
    registry: Registry,
    certs_dir: Any,
    *,
    name: str = "scripted",
    capabilities: tuple[str, ...] = ("echo",),
    max_concurrency: int = 4,
    identity: str = "agent",
    register: bool = True,
    script: dict[str, Any] | None = None,
    without_link: bool = False,
    agent_class: type[ScriptedAgent] = ScriptedAgent,
) -> AsyncIterator[tuple[ScriptedAgent, ServiceServer]]:
    """Serve a scripted agent over mTLS on 127.0.0.1 and register it while the block runs.

    With ``without_link`` only ``Execute`` and ``Describe`` are served, as by an agent
    built before ``Link`` existed (``Link`` answers UNIMPLEMENTED); otherwise ``Link`` is
    the generated stub's, which the authz interceptor refuses (PERMISSION_DENIED), unless
    ``agent_class`` (a subclass) serves one of its own.
    """
    agent = agent_class(
        name, capabilities=capabilities, max_concurrency=max_concurrency, script=script
    )
    settings = load_settings(
        host="127.0.0.1", port=0, certs_dir=certs_dir, identity=identity, grace_period=1.0
    )
    server = ServiceServer(
        settings,
        [
            ServiceBinding(
                SERVICE,
                (lambda s: _add_without_link(agent, s))
                if without_link
                else (lambda s: agent_pb2_grpc.add_AgentServiceServicer_to_server(agent, s)),
            )
        ],
    )
    async with server:
        instance = Instance(
            service="hivewire-agent",
            instance_id=agent.agent_id,
            address="127.0.0.1",
            port=server.port,
            tags=capabilities,
            meta={
                "name": name,
                "version": "1.0.0",
                "max_concurrency": str(max_concurrency),
                # As real agents register it: the coordinator lets the agent running a
                # task (and only it) attach sub-tasks to the task.
                "spiffe_id": describe_cert(Path(certs_dir) / f"{identity}.pem").spiffe_id or "",
            },
        )
        if register:
            await registry.register(instance)
        try:
            yield agent, server
        finally:
            if register:
                with contextlib.suppress(Exception):
                    await registry.deregister(agent.agent_id)
