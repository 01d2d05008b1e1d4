"""The A2A request handler of the gateway: every A2A operation as calls to the coordinator.

It implements the ``a2a-sdk`` :class:`~a2a.server.request_handlers.RequestHandler`
(the SDK's JSON-RPC/SSE routes and its gRPC servicer call it) over the coordinator's
public ``CoordinatorService``, holding no task state of its own: an A2A task *is* a
hivewire task (same id), so tasks survive a gateway restart and any gateway instance
can serve any task. Every coordinator call is made for the A2A caller
(:mod:`.callers`): its tasks are its own, and another caller's task is
``TaskNotFoundError``.

- ``SendMessage`` / ``SendStreamingMessage`` without a task id submit a task for the
  skill the message names; with the id of a task waiting for input they answer its
  pending input request (``ProvideInput``). The stream is the task snapshot, then the
  task's events mapped by :mod:`.convert`, until a terminal or input-required status.
- ``GetTask`` is the coordinator's task, with its artifacts rebuilt from the stored
  partial results; ``CancelTask`` is ``CancelTask``; ``ListTasks`` lists the caller's
  tasks.
- ``SubscribeToTask`` is ``WatchTask``: a client that sends the header
  ``Hivewire-After-Sequence: N`` (the ``metadata.hivewire.sequence`` of the last
  event it saw) gets exactly the events after N, replayed from the coordinator's
  store, then live ones.
"""

from __future__ import annotations

import contextlib
import logging
import uuid
from collections.abc import AsyncGenerator, Callable
from typing import Any, NoReturn

import grpc
from a2a.server.context import ServerCallContext
from a2a.server.request_handlers.request_handler import RequestHandler
from a2a.types import a2a_pb2 as a2a
from a2a.utils.errors import (
    A2AError,
    InternalError,
    InvalidParamsError,
    InvalidRequestError,
    PushNotificationNotSupportedError,
    TaskNotCancelableError,
    TaskNotFoundError,
    UnsupportedOperationError,
)

from hivewire.common.v1 import common_pb2
from hivewire.coordinator.v1 import coordinator_pb2, coordinator_pb2_grpc
from hivewire.services.a2a import convert
from hivewire.services.a2a.callers import Acting, acting
from hivewire.services.a2a.card import CardSource
from hivewire.services.a2a.settings import A2aSettings
from hivewire.services.runtime.errors import HivewireError
from hivewire.services.runtime.status import from_rpc_error

logger = logging.getLogger(__name__)

AFTER_SEQUENCE_HEADER = "hivewire-after-sequence"
"""Header (HTTP) or metadata key (gRPC) of the resume cursor of ``SubscribeToTask``."""

C = coordinator_pb2
_CALL_TIMEOUT = 30.0
Metadata = tuple[tuple[str, str], ...]


def a2a_error(err: HivewireError, *, task_id: str = "") -> A2AError:
    """The A2A error of a coordinator error (the reason and message carried in ``data``)."""
    data = {"code": err.code.name, "reason": err.reason, **err.metadata}
    if err.code == grpc.StatusCode.NOT_FOUND:
        return TaskNotFoundError(f"task {task_id} not found" if task_id else err.message, data)
    if err.code == grpc.StatusCode.INVALID_ARGUMENT:
        return InvalidParamsError(err.message, data)
    if err.code == grpc.StatusCode.FAILED_PRECONDITION:
        return UnsupportedOperationError(err.message, data)
    if err.code in (grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNAUTHENTICATED):
        return InvalidRequestError(err.message, data)
    return InternalError(f"{err.code.name} {err.reason}: {err.message}", data)


def _after_sequence(context: ServerCallContext) -> int | None:
    raw: str | None = None
    headers = context.state.get("headers")
    if isinstance(headers, dict):
        raw = headers.get(AFTER_SEQUENCE_HEADER)
    grpc_context = context.state.get("grpc_context")
    if raw is None and grpc_context is not None:
        for key, value in grpc_context.invocation_metadata() or ():
            if key.lower() == AFTER_SEQUENCE_HEADER:
                raw = value if isinstance(value, str) else value.decode()
    if raw is None or raw == "":
        return None
    try:
        value = int(raw)
    except ValueError:
        raise InvalidParamsError(f"{AFTER_SEQUENCE_HEADER} must be a number, got {raw!r}") from None
    if value < 0:
        raise InvalidParamsError(f"{AFTER_SEQUENCE_HEADER} must not be negative")
    return value


class GatewayHandler(RequestHandler):
    """A2A operations over the coordinator's ``CoordinatorService``."""

    def __init__(
        self,
        stub: coordinator_pb2_grpc.CoordinatorServiceAsyncStub,
        cards: CardSource,
        settings: A2aSettings,
    ) -> None:
        """Create the handler.

        Args:
            stub: The coordinator client (an mTLS channel of the gateway's identity;
                each call carries the A2A caller's metadata).
            cards: The card source (which skills exist).
            settings: The gateway's settings (default skill, task timeout).
        """
        self._stub = stub
        self._cards = cards
        self._settings = settings

    # -- coordinator calls -------------------------------------------------------------

    async def _call(self, task_id: str, call: Callable[[], Any]) -> Any:
        try:
            return await call()
        except grpc.aio.AioRpcError as exc:
            raise a2a_error(from_rpc_error(exc), task_id=task_id) from None

    async def _get(self, task_id: str, md: Metadata) -> coordinator_pb2.Task:
        if not task_id:
            raise InvalidParamsError("the task id is required")
        response = await self._call(
            task_id,
            lambda: self._stub.GetTask(
                C.GetTaskRequest(task_id=task_id), timeout=_CALL_TIMEOUT, metadata=md
            ),
        )
        task: coordinator_pb2.Task = response.task
        return task

    async def _events(
        self, task_id: str, after_sequence: int, md: Metadata, *, outcome_only: bool = False
    ) -> AsyncGenerator[coordinator_pb2.TaskEvent]:
        """The task's stored events after ``after_sequence``, then live ones (with
        ``outcome_only``: only input requests, their answers and the end).
        """
        call = self._stub.WatchTask(
            C.WatchTaskRequest(
                task_id=task_id, after_sequence=after_sequence, outcome_only=outcome_only
            ),
            metadata=md,
        )
        try:
            async for response in call:
                yield response.event
        except grpc.aio.AioRpcError as exc:
            raise a2a_error(from_rpc_error(exc), task_id=task_id) from None
        finally:
            call.cancel()

    async def _follow(
        self,
        task: coordinator_pb2.Task,
        after_sequence: int,
        md: Metadata,
        *,
        outcome_only: bool = False,
    ) -> AsyncGenerator[convert.A2aEvent]:
        """The task's snapshot, then its mapped events after the cursor, until final.

        ``outcome_only`` follows only what ends the wait (an input request, the end):
        for a caller that is answered with the whole task afterwards.
        """
        snapshot = convert.task_to_a2a(task)
        yield snapshot
        if convert.is_final(snapshot) and after_sequence >= task.last_sequence:
            return
        context_id = convert.context_of(task)
        events = self._events(task.task_id, after_sequence, md, outcome_only=outcome_only)
        async with contextlib.aclosing(events):
            async for event in events:
                for update in convert.event_to_a2a(event, context_id):
                    yield update
                    if convert.is_final(update):
                        return

    async def _artifacts(self, task: coordinator_pb2.Task, md: Metadata) -> list[a2a.Artifact]:
        """The task's artifacts, rebuilt from its stored partial results."""
        fold = convert.ArtifactFold()
        if task.last_sequence == 0:
            return []
        context_id = convert.context_of(task)
        async with contextlib.aclosing(self._events(task.task_id, 0, md)) as events:
            async for event in events:
                if event.HasField("partial") or event.HasField("finished"):
                    for update in convert.event_to_a2a(event, context_id):
                        if isinstance(update, a2a.TaskArtifactUpdateEvent):
                            fold.add(update)
                if event.sequence >= task.last_sequence:
                    break
        return fold.artifacts

    async def _view(self, task: coordinator_pb2.Task, md: Metadata) -> a2a.Task:
        return convert.task_to_a2a(task, await self._artifacts(task, md))

    # -- messages ----------------------------------------------------------------------

    async def _start(
        self, params: a2a.SendMessageRequest, caller: Acting, *, outcome_only: bool = False
    ) -> AsyncGenerator[convert.A2aEvent]:
        md = caller.metadata
        message = params.message
        if message.task_id:
            async for update in self._continue(message, md, outcome_only=outcome_only):
                yield update
            return
        try:
            options = convert.task_options(params, default_skill=self._settings.default_skill)
        except HivewireError as err:
            raise a2a_error(err) from None
        if options.skill not in self._cards.skill_ids:
            with contextlib.suppress(grpc.aio.AioRpcError):
                await self._cards.refresh()
        if options.skill not in self._cards.skill_ids:
            raise InvalidParamsError(
                f"no agent offers the skill {options.skill!r}; the card lists: "
                + (", ".join(sorted(self._cards.skill_ids)) or "none"),
                {"reason": "A2A_UNKNOWN_SKILL", "skill": options.skill},
            )
        context_id = message.context_id or uuid.uuid4().hex
        spec = convert.task_spec(
            params, options, context_id=context_id, default_timeout=self._settings.task_timeout
        )
        response = await self._call(
            "",
            lambda: self._stub.SubmitTask(
                C.SubmitTaskRequest(spec=spec), timeout=_CALL_TIMEOUT, metadata=md
            ),
        )
        task: coordinator_pb2.Task = response.task
        if task.owner != caller.identity:
            await self._disown(task, caller)
        logger.info("A2A message %s of %s started task %s (%s)", message.message_id,
                    caller.identity, task.task_id, options.skill)  # fmt: skip
        async for update in self._follow(task, task.last_sequence, md, outcome_only=outcome_only):
            yield update

    async def _disown(self, task: coordinator_pb2.Task, caller: Acting) -> None:
        """Cancel a task the coordinator gave to someone other than the caller, and fail.

        It happens only when the coordinator ignores the passed-on bearer credential (no
        end-user authentication configured there, unlike here): the task would belong
        to the gateway, shared by every bearer caller.
        """
        logger.error("task %s belongs to %s, not to the A2A caller %s: is end-user "
                     "authentication configured on the coordinator as on the gateway?",
                     task.task_id, task.owner, caller.identity)  # fmt: skip
        with contextlib.suppress(grpc.aio.AioRpcError):
            await self._stub.CancelTask(
                C.CancelTaskRequest(task_id=task.task_id, reason="not owned by its A2A caller"),
                timeout=_CALL_TIMEOUT,
                metadata=caller.metadata,
            )
        raise InternalError(
            "the coordinator does not see the A2A caller as the task's owner (its end-user "
            "authentication settings differ from the gateway's)",
            {"reason": "A2A_OWNER_MISMATCH", "owner": task.owner, "caller": caller.identity},
        )

    async def _continue(
        self, message: a2a.Message, md: Metadata, *, outcome_only: bool = False
    ) -> AsyncGenerator[convert.A2aEvent]:
        """Answer the pending input request of the task the message names, then follow it."""
        task = await self._get(message.task_id, md)
        if task.state != common_pb2.TASK_STATE_INPUT_REQUIRED or not task.HasField("pending_input"):
            raise UnsupportedOperationError(
                f"task {task.task_id} is {common_pb2.TaskState.Name(task.state)}: only a task "
                "that waits for input (input-required) takes another message",
                {"reason": "TASK_NOT_WAITING_FOR_INPUT", "taskId": task.task_id},
            )
        answer = convert.input_response(task.pending_input, message)
        cursor = task.last_sequence
        response = await self._call(
            task.task_id,
            lambda: self._stub.ProvideInput(
                C.ProvideInputRequest(task_id=task.task_id, response=answer),
                timeout=_CALL_TIMEOUT,
                metadata=md,
            ),
        )
        logger.info("A2A message %s answered input %s of task %s", message.message_id,
                    answer.request_id, task.task_id)  # fmt: skip
        async for update in self._follow(response.task, cursor, md, outcome_only=outcome_only):
            yield update

    async def on_message_send(
        self, params: a2a.SendMessageRequest, context: ServerCallContext
    ) -> a2a.Task | a2a.Message:
        """Start or continue a task; wait until it ends or asks for input (unless
        ``configuration.return_immediately``), then return it.
        """
        caller = acting(context)
        md = caller.metadata
        task_id = ""
        # The answer is the whole task, read when the wait ends: the wait itself needs
        # only what ends it, not every event (docs/coordinator.md, outcome_only).
        async with contextlib.aclosing(self._start(params, caller, outcome_only=True)) as stream:
            async for update in stream:
                if isinstance(update, a2a.Task):
                    task_id = update.id
                    if params.configuration.return_immediately or convert.is_final(update):
                        return update
        return await self._view(await self._get(task_id, md), md)

    async def on_message_send_stream(
        self, params: a2a.SendMessageRequest, context: ServerCallContext
    ) -> AsyncGenerator[convert.A2aEvent]:
        """Start or continue a task and stream it until it ends or asks for input."""
        async with contextlib.aclosing(self._start(params, acting(context))) as stream:
            async for update in stream:
                yield update

    # -- tasks -------------------------------------------------------------------------

    async def on_get_task(
        self, params: a2a.GetTaskRequest, context: ServerCallContext
    ) -> a2a.Task | None:
        """The task, its status message and its artifacts."""
        md = acting(context).metadata
        return await self._view(await self._get(params.id, md), md)

    async def on_list_tasks(
        self, params: a2a.ListTasksRequest, context: ServerCallContext
    ) -> a2a.ListTasksResponse:
        """The caller's tasks, newest first (filtered by context and state)."""
        request = C.ListTasksRequest(
            page_size=params.page_size if params.HasField("page_size") else 50,
            page_token=params.page_token,
        )
        if params.status:
            for state, mapped in convert.STATE_TO_A2A.items():
                if mapped == params.status:
                    request.states.append(state)
        response = await self._call(
            "",
            lambda: self._stub.ListTasks(
                request, timeout=_CALL_TIMEOUT, metadata=acting(context).metadata
            ),
        )
        tasks = [
            convert.task_to_a2a(task)
            for task in response.tasks
            if not params.context_id or convert.context_of(task) == params.context_id
        ]
        return a2a.ListTasksResponse(
            tasks=tasks, next_page_token=response.next_page_token, page_size=len(tasks)
        )

    async def on_cancel_task(
        self, params: a2a.CancelTaskRequest, context: ServerCallContext
    ) -> a2a.Task | None:
        """Cancel the task; a task that already ended otherwise is not cancelable."""
        task_id = params.id
        if not task_id:
            raise InvalidParamsError("the task id is required")
        md = acting(context).metadata
        try:
            response = await self._stub.CancelTask(
                C.CancelTaskRequest(task_id=task_id, reason="cancelled over A2A"),
                timeout=_CALL_TIMEOUT,
                metadata=md,
            )
        except grpc.aio.AioRpcError as exc:
            err = from_rpc_error(exc)
            if err.code == grpc.StatusCode.FAILED_PRECONDITION:
                raise TaskNotCancelableError(err.message, {"reason": err.reason}) from None
            raise a2a_error(err, task_id=task_id) from None
        return await self._view(response.task, md)

    async def on_subscribe_to_task(
        self, params: a2a.SubscribeToTaskRequest, context: ServerCallContext
    ) -> AsyncGenerator[convert.A2aEvent]:
        """Follow a task: its snapshot, then the events after the client's cursor (the
        ``Hivewire-After-Sequence`` header; none: only new events).
        """
        after = _after_sequence(context)
        md = acting(context).metadata
        task = await self._get(params.id, md)
        cursor = task.last_sequence if after is None else after
        async with contextlib.aclosing(self._follow(task, cursor, md)) as stream:
            async for update in stream:
                yield update

    # -- not offered -------------------------------------------------------------------

    async def _push_notifications_not_offered(
        self, params: object, context: ServerCallContext
    ) -> NoReturn:
        """Push notifications are not offered (the card says so)."""
        raise PushNotificationNotSupportedError()

    on_create_task_push_notification_config = _push_notifications_not_offered
    on_get_task_push_notification_config = _push_notifications_not_offered
    on_list_task_push_notification_configs = _push_notifications_not_offered
    on_delete_task_push_notification_config = _push_notifications_not_offered

    async def on_get_extended_agent_card(
        self, params: a2a.GetExtendedAgentCardRequest, context: ServerCallContext
    ) -> a2a.AgentCard:
        """There is no extended card beyond the public one."""
        raise UnsupportedOperationError("hivewire's gateway has no extended agent card")
