"""``CoordinatorService`` over gRPC: a thin adapter over :class:`Coordinator`.

Each method takes the caller's identity from the mTLS peer certificate, awaits the
domain and converts. Domain errors propagate to the error-mapping interceptor,
which turns them into rich statuses.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import grpc

from hivewire.coordinator.v1 import coordinator_pb2, coordinator_pb2_grpc
from hivewire.services.coordinator import convert
from hivewire.services.coordinator.deadletters import DeadLetters
from hivewire.services.coordinator.model import Caller
from hivewire.services.coordinator.service import Coordinator
from hivewire.services.coordinator.session import Session
from hivewire.services.coordinator.webhooks import Webhooks
from hivewire.services.runtime.authz import caller_spiffe_id
from hivewire.services.runtime.logging import correlation_id_var

__all__ = [
    "ID_IN_RESPONSE_METHODS",
    "SERVICE_NAME",
    "UNTRACED_METHODS",
    "CoordinatorServicer",
    "add_to_server",
]

SERVICE_NAME: str = coordinator_pb2.DESCRIPTOR.services_by_name["CoordinatorService"].full_name

UNTRACED_METHODS = ("WatchTask",)
"""Methods without an OTel server span: a watch only follows a task (its own spans are
the task's), and a span held open for each of 10,000 streams was ~5 KiB a stream."""

ID_IN_RESPONSE_METHODS = ("StreamTask",)
"""Streams whose first message carries the correlation id the work runs under: the
submitted task's ``spec.metadata.correlation_id``, in a snapshot sent once the task is
stored (the call's own id unless the spec names one, the submission repeats an earlier
one's idempotency key or the task is a sub-task, which takes its parent's). An id
minted for a caller that sent none is not sent ahead of it in initial metadata of its
own; it is in the trailers."""

Context = grpc.aio.ServicerContext[Any, Any]


class CoordinatorServicer(coordinator_pb2_grpc.CoordinatorServiceServicer):
    """Serves ``hivewire.coordinator.v1.CoordinatorService``.

    Args:
        coordinator: The domain service.
        dead_letters: Dead-letter operations over it.
        webhooks: Webhook registrations and deliveries.
    """

    def __init__(
        self, coordinator: Coordinator, dead_letters: DeadLetters, webhooks: Webhooks
    ) -> None:
        self._coordinator = coordinator
        self._dead_letters = dead_letters
        self._webhooks = webhooks

    def _caller(self, context: Context) -> Caller:
        return self._coordinator.caller(caller_spiffe_id(context))

    async def SubmitTask(
        self, request: coordinator_pb2.SubmitTaskRequest, context: Context
    ) -> coordinator_pb2.SubmitTaskResponse:
        """Store a task and return it at once."""
        caller = self._caller(context)
        record, deduplicated = await self._coordinator.submit(
            request.spec if request.HasField("spec") else None,
            caller,
            correlation_id=correlation_id_var.get(),
        )
        return coordinator_pb2.SubmitTaskResponse(
            task=convert.task_to_proto(record), deduplicated=deduplicated
        )

    async def StreamTask(
        self, request: coordinator_pb2.StreamTaskRequest, context: Context
    ) -> AsyncIterator[coordinator_pb2.StreamTaskResponse]:
        """Submit a task and stream its events, a snapshot first."""
        caller = self._caller(context)
        events = await self._coordinator.stream(
            request.spec if request.HasField("spec") else None,
            caller,
            correlation_id=correlation_id_var.get(),
            outcome_only=request.outcome_only,
        )
        async for event in events:
            yield coordinator_pb2.StreamTaskResponse(event=event)
            del event  # not held while the stream waits (the first is a snapshot)

    async def WatchTask(
        self, request: coordinator_pb2.WatchTaskRequest, context: Context
    ) -> AsyncIterator[coordinator_pb2.WatchTaskResponse]:
        """Replay a task's stored events after ``after_sequence``, then follow live."""
        caller = self._caller(context)
        events = await self._coordinator.watch(
            request.task_id,
            caller,
            after_sequence=request.after_sequence,
            include_snapshot=request.include_snapshot,
            outcome_only=request.outcome_only,
        )
        async for event in events:
            yield coordinator_pb2.WatchTaskResponse(event=event)
            # Not held while the stream waits for the next event (the first is a snapshot).
            del event

    async def GetTask(
        self, request: coordinator_pb2.GetTaskRequest, context: Context
    ) -> coordinator_pb2.GetTaskResponse:
        """Return a task."""
        record = await self._coordinator.get(request.task_id, self._caller(context))
        return coordinator_pb2.GetTaskResponse(task=convert.task_to_proto(record))

    async def ListTasks(
        self, request: coordinator_pb2.ListTasksRequest, context: Context
    ) -> coordinator_pb2.ListTasksResponse:
        """One page of tasks, newest first."""
        records, token = await self._coordinator.list_tasks(
            self._caller(context),
            states=list(request.states),
            capability=request.capability,
            owner=request.owner,
            parent_task_id=request.parent_task_id,
            project_id=request.project_id,
            page_size=request.page_size,
            page_token=request.page_token,
        )
        return coordinator_pb2.ListTasksResponse(
            tasks=[convert.task_to_proto(r) for r in records], next_page_token=token
        )

    async def CancelTask(
        self, request: coordinator_pb2.CancelTaskRequest, context: Context
    ) -> coordinator_pb2.CancelTaskResponse:
        """Cancel a task (idempotent)."""
        record = await self._coordinator.cancel(
            request.task_id, self._caller(context), request.reason
        )
        return coordinator_pb2.CancelTaskResponse(task=convert.task_to_proto(record))

    async def ProvideInput(
        self, request: coordinator_pb2.ProvideInputRequest, context: Context
    ) -> coordinator_pb2.ProvideInputResponse:
        """Answer a task's pending input request."""
        record = await self._coordinator.provide_input(
            request.task_id,
            request.response if request.HasField("response") else None,
            self._caller(context),
        )
        return coordinator_pb2.ProvideInputResponse(task=convert.task_to_proto(record))

    async def Session(
        self,
        request_iterator: AsyncIterator[coordinator_pb2.SessionRequest],
        context: Context,
    ) -> AsyncIterator[coordinator_pb2.SessionResponse]:
        """Many tasks over one bidirectional stream."""
        session = Session(self._coordinator, self._caller(context), correlation_id_var.get())
        async for response in session.run(request_iterator):
            yield response

    async def ListAgents(
        self, request: coordinator_pb2.ListAgentsRequest, context: Context
    ) -> coordinator_pb2.ListAgentsResponse:
        """The agents the coordinator routes to."""
        self._caller(context)
        views = self._coordinator.list_agents(request.capability)
        return coordinator_pb2.ListAgentsResponse(agents=[convert.agent_status(v) for v in views])

    async def CreateProject(
        self, request: coordinator_pb2.CreateProjectRequest, context: Context
    ) -> coordinator_pb2.CreateProjectResponse:
        """Create a project."""
        project = await self._coordinator.create_project(
            self._caller(context),
            name=request.name,
            goal=request.goal,
            attributes=dict(request.attributes),
        )
        return coordinator_pb2.CreateProjectResponse(project=project)

    async def GetProject(
        self, request: coordinator_pb2.GetProjectRequest, context: Context
    ) -> coordinator_pb2.GetProjectResponse:
        """A project with its aggregate progress."""
        project = await self._coordinator.get_project(request.project_id, self._caller(context))
        return coordinator_pb2.GetProjectResponse(project=project)

    async def ListProjects(
        self, request: coordinator_pb2.ListProjectsRequest, context: Context
    ) -> coordinator_pb2.ListProjectsResponse:
        """One page of projects, newest first."""
        projects, token = await self._coordinator.list_projects(
            self._caller(context), page_size=request.page_size, page_token=request.page_token
        )
        return coordinator_pb2.ListProjectsResponse(projects=projects, next_page_token=token)

    async def ListDeadLetters(
        self, request: coordinator_pb2.ListDeadLettersRequest, context: Context
    ) -> coordinator_pb2.ListDeadLettersResponse:
        """One page of dead letters, newest first."""
        letters, token = await self._dead_letters.page(
            self._caller(context),
            capability=request.capability,
            include_requeued=request.include_requeued,
            page_size=request.page_size,
            page_token=request.page_token,
        )
        return coordinator_pb2.ListDeadLettersResponse(
            dead_letters=[
                coordinator_pb2.DeadLetter(
                    task=convert.task_to_proto(letter.record),
                    requeued_as_task_id=letter.requeued_as,
                )
                for letter in letters
            ],
            next_page_token=token,
        )

    async def RequeueTask(
        self, request: coordinator_pb2.RequeueTaskRequest, context: Context
    ) -> coordinator_pb2.RequeueTaskResponse:
        """Run a dead letter again as a new task."""
        record, existed = await self._dead_letters.requeue(
            request.task_id, self._caller(context), reason=request.reason
        )
        return coordinator_pb2.RequeueTaskResponse(
            task=convert.task_to_proto(record), already_requeued=existed
        )

    async def PurgeDeadLetters(
        self, request: coordinator_pb2.PurgeDeadLettersRequest, context: Context
    ) -> coordinator_pb2.PurgeDeadLettersResponse:
        """Delete dead letters and their events."""
        deleted = await self._dead_letters.purge(
            self._caller(context),
            task_ids=list(request.task_ids),
            dead_before_ns=(
                # Plain arithmetic: an out-of-range timestamp selects nothing, never crashes.
                convert.ns_from_timestamp(request.dead_before)
                if request.HasField("dead_before")
                else 0
            ),
            everything=request.all,
        )
        return coordinator_pb2.PurgeDeadLettersResponse(task_ids=deleted)

    async def RegisterWebhook(
        self, request: coordinator_pb2.RegisterWebhookRequest, context: Context
    ) -> coordinator_pb2.RegisterWebhookResponse:
        """Register a webhook for the caller's tasks, or a project's."""
        row = await self._webhooks.register(
            self._caller(context),
            request.webhook if request.HasField("webhook") else None,
            project_id=request.project_id,
        )
        return coordinator_pb2.RegisterWebhookResponse(
            registration=convert.webhook_registration(row)
        )

    async def ListWebhooks(
        self, request: coordinator_pb2.ListWebhooksRequest, context: Context
    ) -> coordinator_pb2.ListWebhooksResponse:
        """The caller's webhooks, or a project's."""
        rows = await self._webhooks.registrations(
            self._caller(context), project_id=request.project_id
        )
        return coordinator_pb2.ListWebhooksResponse(
            registrations=[convert.webhook_registration(r) for r in rows]
        )

    async def DeleteWebhook(
        self, request: coordinator_pb2.DeleteWebhookRequest, context: Context
    ) -> coordinator_pb2.DeleteWebhookResponse:
        """Remove one of the caller's webhooks."""
        await self._webhooks.unregister(self._caller(context), request.webhook_id)
        return coordinator_pb2.DeleteWebhookResponse()

    async def ListWebhookDeliveries(
        self, request: coordinator_pb2.ListWebhookDeliveriesRequest, context: Context
    ) -> coordinator_pb2.ListWebhookDeliveriesResponse:
        """Deliveries of the caller's tasks' events, newest first."""
        rows = await self._webhooks.deliveries(
            self._caller(context),
            state=request.state,
            task_id=request.task_id,
            page_size=request.page_size,
            project_id=request.project_id,
        )
        return coordinator_pb2.ListWebhookDeliveriesResponse(
            deliveries=[convert.webhook_delivery(r) for r in rows]
        )


def add_to_server(servicer: CoordinatorServicer, server: grpc.aio.Server) -> None:
    """Register the servicer on a server."""
    coordinator_pb2_grpc.add_CoordinatorServiceServicer_to_server(servicer, server)
