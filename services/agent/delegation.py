"""``ctx.subtask``: the coordinator client a handler delegates work with.

A sub-task is an ordinary task with this task as its parent, submitted with
``StreamTask`` on the agent's own identity and followed to its end on the same
stream. The coordinator ties it to the parent (deadline, remaining budget,
correlation id, cancelled with the parent); this side adds the handler's own
cancellation: a handler cancelled while it waits cancels the sub-task too.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
from collections.abc import Callable
from typing import Any

import grpc
from google.protobuf import json_format

from hivewire.common.v1 import common_pb2
from hivewire.coordinator.v1 import coordinator_pb2, coordinator_pb2_grpc
from hivewire.services.agent.clients import Endpoint
from hivewire.services.agent.convert import payload_from_proto, payload_to_proto, usage_from_proto
from hivewire.services.agent.sdk import (
    Payload,
    SubtaskError,
    SubtaskRequest,
    SubtaskResult,
    TaskContext,
    valid_reason,
)
from hivewire.services.runtime import metadata as md
from hivewire.services.runtime.errors import HivewireError, InvalidArgument
from hivewire.services.runtime.status import from_rpc_error

logger = logging.getLogger(__name__)

__all__ = ["TaskSubtasks", "bind_subtasks"]

C = coordinator_pb2
_CANCEL_TIMEOUT = 5.0


class TaskSubtasks:
    """Runs sub-tasks for one task attempt (``ctx.subtask`` / ``ctx.fan_out``).

    Args:
        ctx: The parent task's context.
        endpoint: Where the coordinator is.
        default_timeout: Deadline of a sub-task of a task that has no deadline.
    """

    def __init__(self, ctx: TaskContext, endpoint: Endpoint, *, default_timeout: float) -> None:
        self._ctx = ctx
        self._endpoint = endpoint
        self._default_timeout = default_timeout
        self._count = 0

    def _key(self, request: SubtaskRequest) -> str:
        # Every sub-task gets an idempotency key, so one cancelled before its id came
        # back can still be found (and cancelled) by submitting the same key again.
        self._count += 1
        return request.idempotency_key or (
            f"subtask:{self._ctx.task_id}:{self._ctx.attempt}:{self._count}"
        )

    def _spec(self, request: SubtaskRequest) -> C.TaskSpec:
        spec = C.TaskSpec(
            capability=request.capability,
            parent_task_id=self._ctx.task_id,
            # The SDK takes a plain int (a number of ``common.v1.Priority``).
            priority=common_pb2.Priority.ValueType(request.priority),
            token_budget=request.token_budget,
            labels=dict(request.labels),
            idempotency_key=self._key(request),
        )
        if request.input is not None:
            spec.input.CopyFrom(payload_to_proto(Payload.of(request.input)))
        if request.plan is not None:
            if isinstance(request.plan, C.Plan):
                spec.plan.CopyFrom(request.plan)
            else:
                try:
                    json_format.ParseDict(request.plan, spec.plan)
                except (json_format.ParseError, TypeError, AttributeError) as exc:
                    raise SubtaskError(
                        "PLAN_MALFORMED", f"the plan is not a valid Plan: {exc}"
                    ) from exc
        remaining = self._ctx.time_remaining()
        timeout = request.timeout if request.timeout is not None else remaining
        if timeout is not None:
            spec.timeout.FromNanoseconds(max(int(timeout * 1e9), 1))
        return spec

    async def run(
        self, request: SubtaskRequest, *, on_event: Callable[[Any], Any] | None = None
    ) -> SubtaskResult:
        """Submit a sub-task, follow it to its end and return its result.

        Raises:
            SubtaskError: It did not succeed, or the coordinator refused it.
        """
        spec = self._spec(request)
        remaining = self._ctx.time_remaining()
        stub: coordinator_pb2_grpc.CoordinatorServiceAsyncStub = (
            coordinator_pb2_grpc.CoordinatorServiceStub(await self._endpoint.channel())
        )
        metadata = (
            [(md.CORRELATION_ID, self._ctx.correlation_id)] if self._ctx.correlation_id else []
        )
        # Without a listener only the outcome is of use: the coordinator sends the
        # snapshot and the end, not every event (an older one ignores the field).
        call = stub.StreamTask(
            C.StreamTaskRequest(spec=spec, outcome_only=on_event is None),
            timeout=(remaining if remaining is not None else self._default_timeout) + 5.0,
            metadata=metadata,
        )
        task_id = ""
        try:
            async for response in call:
                event = response.event
                task_id = task_id or event.task_id
                if on_event is not None:
                    outcome = on_event(event)
                    if inspect.isawaitable(outcome):
                        await outcome
                if event.HasField("finished"):
                    return _result(task_id, event.finished)
        except asyncio.CancelledError:
            await self._cancel(stub, task_id, spec)
            raise
        except grpc.RpcError as exc:
            err = from_rpc_error(exc)
            if task_id:
                # The stream broke (not the sub-task): it goes on; wait for its end.
                return await self._watch(stub, task_id, on_event, err)
            raise _refused(err) from exc
        raise SubtaskError(
            "SUBTASK_STREAM_INCOMPLETE",
            f"the stream of sub-task {task_id} ended without its result",
            metadata={"subtask_id": task_id},
        )

    async def _watch(
        self,
        stub: coordinator_pb2_grpc.CoordinatorServiceAsyncStub,
        task_id: str,
        on_event: Callable[[Any], Any] | None,
        cause: HivewireError,
    ) -> SubtaskResult:
        remaining = self._ctx.time_remaining()
        try:
            async for response in stub.WatchTask(
                C.WatchTaskRequest(task_id=task_id, outcome_only=on_event is None),
                timeout=(remaining if remaining is not None else self._default_timeout) + 5.0,
            ):
                if on_event is not None:
                    outcome = on_event(response.event)
                    if inspect.isawaitable(outcome):
                        await outcome
                if response.event.HasField("finished"):
                    return _result(task_id, response.event.finished)
        except asyncio.CancelledError:
            await self._cancel(stub, task_id, None)
            raise
        except grpc.RpcError as exc:
            raise _refused(from_rpc_error(exc), task_id) from exc
        raise _refused(cause, task_id)

    async def _cancel(
        self,
        stub: coordinator_pb2_grpc.CoordinatorServiceAsyncStub,
        task_id: str,
        spec: C.TaskSpec | None,
    ) -> None:
        # The parent's cancellation must reach the sub-task even while we are being
        # cancelled: shield the calls, bound them, and never let them hide the cancel.
        async def cancel() -> None:
            known = task_id
            if not known and spec is not None:
                # Cancelled before its id came back: the same key finds it (or creates
                # it, to be cancelled at once).
                submitted = await stub.SubmitTask(
                    C.SubmitTaskRequest(spec=spec), timeout=_CANCEL_TIMEOUT
                )
                known = submitted.task.task_id
            if known:
                await stub.CancelTask(
                    C.CancelTaskRequest(task_id=known, reason="the parent's handler was cancelled"),
                    timeout=_CANCEL_TIMEOUT,
                )

        with contextlib.suppress(Exception, asyncio.CancelledError):
            await asyncio.shield(cancel())


def _result(task_id: str, finished: C.TaskFinished) -> SubtaskResult:
    if finished.state == common_pb2.TASK_STATE_SUCCEEDED:
        return SubtaskResult(
            task_id=task_id,
            output=payload_from_proto(finished.output),
            usage=usage_from_proto(finished.usage),
        )
    state = common_pb2.TaskState.Name(finished.state).removeprefix("TASK_STATE_").lower()
    error = finished.error
    raise SubtaskError(
        error.reason if valid_reason(error.reason) else "SUBTASK_FAILED",
        f"sub-task {task_id} {state}: {error.message or error.reason}",
        metadata={"subtask_id": task_id, "state": state, **dict(error.metadata)},
    )


def _refused(err: HivewireError, task_id: str = "") -> SubtaskError:
    message = err.message
    if isinstance(err, InvalidArgument) and err.violations:
        message += ": " + "; ".join(f"{v.field}: {v.description}" for v in err.violations)
    metadata = {"code": err.code.name}
    if task_id:
        metadata["subtask_id"] = task_id
    reason = err.reason if valid_reason(err.reason) else err.code.name
    return SubtaskError(reason, message, metadata=metadata)


def bind_subtasks(
    endpoint: Endpoint, *, default_timeout: float = 30.0
) -> Callable[[TaskContext], None]:
    """The runtime hook that gives every task context its sub-task client.

    Args:
        endpoint: Where the coordinator is.
        default_timeout: Deadline of sub-tasks of a task without a deadline.
    """

    def bind(ctx: TaskContext) -> None:
        ctx.bind_subtasks(TaskSubtasks(ctx, endpoint, default_timeout=default_timeout))

    return bind
