"""What the dashboard shows and does, for one logged-in person, over the coordinator's API.

The dashboard calls the coordinator with its own mTLS identity (an admin by default)
and acts **on behalf of** the person logged in (their SPIFFE id, from their client
certificate or their login token):

* every action is checked against the mesh authorization policy for *that person's*
  identity and the RPC it stands for (ListTasks, SubmitTask, CancelTask...), so the
  dashboard never lets anyone do what the mesh would not let them do directly;
* a person who is not an admin sees and cancels only their tasks: the ones they own,
  and the ones they submitted through the dashboard (labelled ``submitted_by``);
* a task's timeline is ``WatchTask``, the same journal that feeds every client.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncGenerator
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from google.protobuf import json_format

from hivewire.common.v1 import common_pb2
from hivewire.coordinator.v1 import coordinator_pb2, coordinator_pb2_grpc
from hivewire.services.runtime.authz import AuthzPolicyStore
from hivewire.services.runtime.errors import FieldViolation, InvalidArgument, PermissionDenied

__all__ = ["SUBMITTED_BY", "Backend", "User"]

SUBMITTED_BY = "submitted_by"
"""Label of tasks submitted through the dashboard: who submitted them."""

_SERVICE = "/hivewire.coordinator.v1.CoordinatorService/"


@dataclass(frozen=True)
class User:
    """The person logged in: the identity the mesh policy judges."""

    identity: str
    admin: bool


def _dict(message: Any) -> dict[str, Any]:
    result: dict[str, Any] = json_format.MessageToDict(message, preserving_proto_field_name=True)
    return result


class Backend:
    """The dashboard's domain: listing, following, submitting and cancelling.

    Args:
        stub: The coordinator client (the dashboard's own identity).
        policy: The mesh authorization policy, applied to the person's identity.
        admin_prefix: SPIFFE id prefix of admins (who see every task).
        nats_url: Where the recent events come from; None hides them.
        events_window: Seconds of event history the events stream starts with.
    """

    def __init__(
        self,
        stub: coordinator_pb2_grpc.CoordinatorServiceAsyncStub,
        policy: AuthzPolicyStore,
        *,
        admin_prefix: str,
        nats_url: str | None,
        events_window: float = 900.0,
    ) -> None:
        self._stub = stub
        self._policy = policy
        self._admin_prefix = admin_prefix
        self._nats_url = nats_url
        self._events_window = events_window

    def user(self, identity: str) -> User:
        """The person behind a SPIFFE id."""
        return User(identity, identity.startswith(self._admin_prefix))

    def _require(self, user: User, rpc: str) -> None:
        if not self._policy.allows(user.identity, _SERVICE + rpc):
            raise PermissionDenied(
                f"{user.identity} may not call {rpc}", reason="CALLER_NOT_ALLOWED"
            )

    def _may_see(self, user: User, task: coordinator_pb2.Task) -> bool:
        return (
            user.admin
            or task.owner == user.identity
            or task.spec.labels.get(SUBMITTED_BY) == user.identity
        )

    async def agents(self, user: User) -> list[dict[str, Any]]:
        """The agents the coordinator routes to."""
        self._require(user, "ListAgents")
        response = await self._stub.ListAgents(coordinator_pb2.ListAgentsRequest())
        return [
            {
                "agent_id": agent.agent_id,
                "name": agent.card.name,
                "address": agent.address,
                "capabilities": [c.name for c in agent.card.capabilities],
                "health": coordinator_pb2.AgentHealth.Name(agent.health)
                .removeprefix("AGENT_HEALTH_")
                .lower(),
                "in_flight": agent.in_flight,
                "max_concurrency": agent.card.max_concurrency,
                "circuit": "open" if agent.circuit_open else "closed",
            }
            for agent in response.agents
        ]

    async def tasks(
        self, user: User, *, state: str = "", capability: str = "", limit: int = 50
    ) -> list[dict[str, Any]]:
        """Tasks newest first, filtered by state name and capability."""
        self._require(user, "ListTasks")
        states = []
        if state:
            key = f"TASK_STATE_{state.upper()}"
            if key not in common_pb2.TaskState.keys() or key.endswith("UNSPECIFIED"):
                raise InvalidArgument(violations=[FieldViolation("state", "unknown state")])
            states.append(common_pb2.TaskState.Value(key))
        request = coordinator_pb2.ListTasksRequest(
            states=states, capability=capability, page_size=min(max(limit, 1), 200)
        )
        found: list[coordinator_pb2.Task] = []
        if user.admin:
            found = list((await self._stub.ListTasks(request)).tasks)
        else:
            # Their own tasks, and the ones the dashboard submitted for them.
            for owner in (user.identity, ""):
                request.owner = owner
                page = await self._stub.ListTasks(request)
                found += [t for t in page.tasks if self._may_see(user, t)]
            unique = {t.task_id: t for t in found}
            found = sorted(
                unique.values(), key=lambda t: t.created_at.ToNanoseconds(), reverse=True
            )
        return [_summary(task) for task in found[:limit]]

    async def _visible(self, user: User, task_id: str) -> coordinator_pb2.Task:
        task = (await self._stub.GetTask(coordinator_pb2.GetTaskRequest(task_id=task_id))).task
        if not self._may_see(user, task):
            raise PermissionDenied("not your task", reason="TASK_NOT_VISIBLE")
        return task

    async def submit(self, user: User, *, capability: str, text: str) -> dict[str, Any]:
        """Submit a task for the person (labelled with who submitted it)."""
        self._require(user, "SubmitTask")
        spec = coordinator_pb2.TaskSpec(
            capability=capability,
            input=common_pb2.Payload(text=text),
            labels={SUBMITTED_BY: user.identity},
            metadata=common_pb2.RequestMetadata(source="dashboard", user_id=user.identity),
        )
        response = await self._stub.SubmitTask(coordinator_pb2.SubmitTaskRequest(spec=spec))
        return _summary(response.task)

    async def cancel(self, user: User, task_id: str) -> dict[str, Any]:
        """Cancel one of the person's tasks (any task for an admin)."""
        self._require(user, "CancelTask")
        await self._visible(user, task_id)
        response = await self._stub.CancelTask(
            coordinator_pb2.CancelTaskRequest(
                task_id=task_id, reason=f"cancelled by {user.identity}"
            )
        )
        return _summary(response.task)

    async def timeline(self, user: User, task_id: str) -> AsyncGenerator[dict[str, Any], None]:
        """A task's events from its first, then live until it ends (``WatchTask``).

        Raises:
            PermissionDenied: The person may not watch it (before anything streams).
        """
        self._require(user, "WatchTask")
        await self._visible(user, task_id)
        return self._follow(task_id)

    async def _follow(self, task_id: str) -> AsyncGenerator[dict[str, Any], None]:
        call = self._stub.WatchTask(
            coordinator_pb2.WatchTaskRequest(task_id=task_id, include_snapshot=False)
        )
        try:
            async for response in call:
                yield _event(response.event)
        finally:
            call.cancel()

    async def events(self, user: User) -> AsyncGenerator[dict[str, Any], None]:
        """Recent mesh events from NATS, then live ones (admins: all; others: their tasks')."""
        if self._nats_url is None:
            return
        from hivewire.services.runtime.events import replay

        async with contextlib.aclosing(
            replay(
                self._nats_url,
                ">",
                start=timedelta(seconds=self._events_window),
                follow=True,
            )
        ) as received:
            async for item in received:
                event = item.event
                if not user.admin and event.WhichOneof("data") == "task":
                    if event.task.owner != user.identity and not user.admin:
                        continue
                yield {
                    "type": event.type,
                    "subject": event.subject,
                    "time": event.time.ToJsonString(),
                    "source": event.source,
                    "sequence": item.stream_sequence,
                }


def _summary(task: coordinator_pb2.Task) -> dict[str, Any]:
    return {
        "task_id": task.task_id,
        "capability": task.spec.capability,
        "state": common_pb2.TaskState.Name(task.state).removeprefix("TASK_STATE_").lower(),
        "owner": task.owner,
        "submitted_by": task.spec.labels.get(SUBMITTED_BY, ""),
        "created_at": task.created_at.ToJsonString(),
        "attempt": task.attempt,
        "agent_id": task.agent_id,
    }


def _event(event: coordinator_pb2.TaskEvent) -> dict[str, Any]:
    kind = event.WhichOneof("kind") or ""
    detail = _dict(getattr(event, kind)) if kind else {}
    text = ""
    if kind == "partial":
        text = event.partial.content.text
    elif kind == "progress":
        text = f"{event.progress.fraction:.0%} {event.progress.step} {event.progress.message}"
    elif kind == "state_changed":
        text = common_pb2.TaskState.Name(event.state_changed.to_state).removeprefix("TASK_STATE_")
        text = f"{text.lower()}: {event.state_changed.reason}"
    elif kind == "finished":
        state = common_pb2.TaskState.Name(event.finished.state).removeprefix("TASK_STATE_")
        text = state.lower()
        if event.finished.HasField("output"):
            text += f": {event.finished.output.text}"
        if event.finished.HasField("error"):
            text += f": {event.finished.error.reason} {event.finished.error.message}"
    elif kind == "input_required":
        text = event.input_required.prompt
    return {
        "sequence": event.sequence,
        "kind": kind,
        "time": event.time.ToJsonString(),
        "attempt": event.attempt,
        "text": text.strip(),
        "detail": detail,
    }
