"""The A2A gateway's handler (services/a2a/handler.py): the operations it does not offer."""

from __future__ import annotations

import grpc
import pytest
from a2a.server.context import ServerCallContext
from a2a.types import a2a_pb2 as a2a
from a2a.utils.errors import PushNotificationNotSupportedError

from hivewire.coordinator.v1 import coordinator_pb2_grpc
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
