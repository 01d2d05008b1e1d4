"""The A2A gateway's handler (services/a2a/handler.py): the operations it does not offer."""

from __future__ import annotations

import grpc
import pytest
from a2a.server.context import ServerCallContext
from a2a.types import a2a_pb2 as a2a
from a2a.utils.errors import PushNotificationNotSupportedError

from hivewire.agent.v1 import agent_pb2
from hivewire.common.v1 import common_pb2 as S
from hivewire.coordinator.v1 import coordinator_pb2 as C
from hivewire.coordinator.v1 import coordinator_pb2_grpc
from hivewire.services.a2a.callers import ACTING_KEY, Acting
from hivewire.services.a2a.card import CardSource
from hivewire.services.a2a.handler import GatewayHandler
from hivewire.services.a2a.settings import A2aSettings


async def test_every_push_notification_operation_is_refused() -> None:
    # The channel is never used: refusing needs no coordinator.
    async with grpc.aio.insecure_channel("127.0.0.1:1") as channel:
        stub = coordinator_pb2_grpc.CoordinatorServiceStub(channel)
        handler = GatewayHandler(stub, CardSource(stub, interval=1.0), A2aSettings())
        refusals = [
            (handler.on_create_task_push_notification_config, a2a.TaskPushNotificationConfig()),
            (
                handler.on_get_task_push_notification_config,
                a2a.GetTaskPushNotificationConfigRequest(),
            ),
            (
                handler.on_list_task_push_notification_configs,
                a2a.ListTaskPushNotificationConfigsRequest(),
            ),
            (
                handler.on_delete_task_push_notification_config,
                a2a.DeleteTaskPushNotificationConfigRequest(),
            ),
        ]
        for operation, request in refusals:
            with pytest.raises(PushNotificationNotSupportedError):
                await operation(request, ServerCallContext())


class _Coordinator:
    """A coordinator stub whose tasks end at once: it records the watches asked for."""

    def __init__(self, owner: str) -> None:
        self.owner = owner
        self.watches: list[C.WatchTaskRequest] = []
        self.task = C.Task(task_id="t1", state=S.TASK_STATE_QUEUED, last_sequence=1)

    async def ListAgents(self, request: object, **_: object) -> C.ListAgentsResponse:
        card = agent_pb2.AgentCard(name="echo", capabilities=[agent_pb2.Capability(name="echo")])
        agent = C.AgentStatus(card=card, health=C.AGENT_HEALTH_HEALTHY)
        return C.ListAgentsResponse(agents=[agent])

    async def SubmitTask(self, request: C.SubmitTaskRequest, **_: object) -> C.SubmitTaskResponse:
        self.task.spec.CopyFrom(request.spec)
        self.task.owner = self.owner
        return C.SubmitTaskResponse(task=self.task)

    def WatchTask(self, request: C.WatchTaskRequest, **_: object) -> object:
        self.watches.append(request)
        finished = C.TaskEvent(
            task_id="t1",
            sequence=2,
            finished=C.TaskFinished(state=S.TASK_STATE_SUCCEEDED, output=S.Payload(text="ok")),
        )

        class Call:
            def __aiter__(self) -> object:
                async def events() -> object:
                    yield C.WatchTaskResponse(event=finished)

                return events()

            def cancel(self) -> None:
                pass

        self.task.state = S.TASK_STATE_SUCCEEDED
        self.task.last_sequence = 2
        return Call()

    async def GetTask(self, request: C.GetTaskRequest, **_: object) -> C.GetTaskResponse:
        return C.GetTaskResponse(task=self.task)


async def test_a_blocking_send_waits_for_the_outcome_alone_and_a_stream_for_every_event() -> None:
    caller = "spiffe://hivewire.local/client/alice"
    coordinator = _Coordinator(owner=caller)
    cards = CardSource(coordinator, interval=1.0)  # type: ignore[arg-type]
    await cards.refresh()
    handler = GatewayHandler(coordinator, cards, A2aSettings())  # type: ignore[arg-type]
    context = ServerCallContext()
    context.state[ACTING_KEY] = Acting.of(caller)

    def request() -> a2a.SendMessageRequest:
        message = a2a.Message(message_id="m1", role=a2a.ROLE_USER)
        message.parts.add().text = "hi"
        message.metadata["skill"] = "echo"
        return a2a.SendMessageRequest(message=message)

    task = await handler.on_message_send(request(), context)
    assert task.status.state == a2a.TASK_STATE_COMPLETED
    # The blocking send's wait follows only what ends it; the task it answers with is
    # read afterwards, its artifacts from every stored event.
    assert [w.outcome_only for w in coordinator.watches] == [True, False]
    coordinator.task.state = S.TASK_STATE_QUEUED
    updates = [u async for u in handler.on_message_send_stream(request(), context)]
    assert updates[-1].status.state == a2a.TASK_STATE_COMPLETED
    # A stream shows every event.
    assert [w.outcome_only for w in coordinator.watches] == [True, False, False]
