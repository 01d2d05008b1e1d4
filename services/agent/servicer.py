"""``agent.v1.AgentService`` over gRPC: a thin adapter around :class:`AgentRuntime`.

``Execute`` authorizes the caller, reads the assignment, then runs two flows at once:
the runtime's events go out as ``ExecuteResponse`` messages while a reader task feeds
the coordinator's later messages (cancel, input answers) to the execution. Errors
before the stream starts are raised as domain errors; the shared interceptor maps
them to rich statuses. ``Link`` is the same per attempt, for many attempts over one
stream (:mod:`.link`), with the same authorization.

After the last message the reader is left to end by itself at the coordinator's
half-close (it half-closes right after the result), and is cancelled only if that does
not come within :data:`HALF_CLOSE_WAIT`. Cancelling a task that awaits a grpc.aio read
leaks the read's native batch (a ``gpr_malloc``'d op array that is freed only when the
awaiting coroutine sees the batch complete; grpc/grpc#43360): cancelling the reader of
every finished attempt cost the agent about 80 bytes of native heap per task.
"""

from __future__ import annotations

import asyncio
import fnmatch
import logging
from collections.abc import AsyncIterator, Sequence
from typing import Any

import grpc

from hivewire.agent.v1 import agent_pb2, agent_pb2_grpc
from hivewire.services.agent import convert
from hivewire.services.agent.link import LinkSession
from hivewire.services.agent.runtime import AgentRuntime, Execution
from hivewire.services.agent.settings import DEFAULT_ALLOWED_CALLERS
from hivewire.services.base.lifecycle import cancel_and_wait
from hivewire.services.runtime.authz import caller_spiffe_id
from hivewire.services.runtime.config import DEFAULT_MAX_MESSAGE_BYTES
from hivewire.services.runtime.errors import FieldViolation, InvalidArgument, PermissionDenied

logger = logging.getLogger(__name__)

SERVICE_NAME: str = agent_pb2.DESCRIPTOR.services_by_name["AgentService"].full_name
"""``hivewire.agent.v1.AgentService``."""

Context = grpc.aio.ServicerContext[Any, Any]

HALF_CLOSE_WAIT = 2.0
"""Seconds a finished attempt waits for the caller's half-close before it stops reading."""


class AgentServicer(agent_pb2_grpc.AgentServiceServicer):
    """Serves one agent runtime."""

    def __init__(
        self,
        runtime: AgentRuntime,
        *,
        allowed_callers: Sequence[str] = DEFAULT_ALLOWED_CALLERS,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    ) -> None:
        """Create the servicer.

        Args:
            runtime: The runtime that runs the handlers.
            allowed_callers: SPIFFE id patterns (``fnmatch``) allowed to call Execute and Link.
            max_message_bytes: The server's largest message (a Link checks each attempt's).
        """
        self._runtime = runtime
        self._max_message_bytes = max_message_bytes
        self._allowed = tuple(allowed_callers)
        self._links: set[LinkSession] = set()
        self._draining = False

    @property
    def draining(self) -> bool:
        """Whether :meth:`drain` ran (the agent is shutting down)."""
        return self._draining

    async def drain(self) -> None:
        """Shutting down: links take no new attempts and end once theirs have (a hook)."""
        self._draining = True
        for session in self._links:
            session.drain()

    def _authorize(self, context: Context) -> None:
        caller = caller_spiffe_id(context)
        if caller is None or not any(fnmatch.fnmatchcase(caller, p) for p in self._allowed):
            logger.warning("call refused for %s", caller or "a peer without a SPIFFE id")
            raise PermissionDenied(
                f"{caller or 'this caller'} may not run tasks on this agent",
                reason="CALLER_NOT_ALLOWED",
            )

    async def Execute(
        self,
        request_iterator: AsyncIterator[agent_pb2.ExecuteRequest],
        context: Context,
    ) -> AsyncIterator[agent_pb2.ExecuteResponse]:
        """Run one attempt of a task, streaming its events (see agent.proto)."""
        # Read the assignment before refusing anything: a status sent while the
        # caller's first write is in flight reaches it as a failed write (INTERNAL)
        # instead of the real code.
        first = await anext(aiter(request_iterator), None)
        self._authorize(context)
        if first is None or first.WhichOneof("kind") != "assign":
            raise InvalidArgument(
                "the first Execute message must be an assignment",
                [FieldViolation("assign", "the first message must carry assign")],
                reason="ASSIGNMENT_REQUIRED",
            )
        info = convert.task_info_from_proto(
            first.assign, call_time_remaining=context.time_remaining()
        )
        task_input = convert.payload_from_proto(first.assign.input)
        reader: asyncio.Task[None] | None = None
        finished = False
        try:
            async with self._runtime.execute(info, task_input) as execution:
                reader = asyncio.create_task(
                    _forward_requests(request_iterator, execution),
                    name=f"agent-requests-{info.task_id}",
                )
                async for out in execution.events():
                    yield convert.response_to_proto(info.task_id, out)
            finished = True
        finally:
            # The slot is free already (the execution block has ended).
            if reader is not None:
                await _stop_reading(reader, wait=HALF_CLOSE_WAIT if finished else 0.0)

    async def Link(
        self,
        request_iterator: AsyncIterator[agent_pb2.LinkRequest],
        context: Context,
    ) -> AsyncIterator[agent_pb2.LinkResponse]:
        """Run many attempts over one stream (see agent.proto and :mod:`.link`)."""
        # As in Execute: read the first message before refusing anything.
        requests = aiter(request_iterator)
        first = await anext(requests, None)
        self._authorize(context)
        if first is None:
            return
        session = LinkSession(self._runtime, max_message_bytes=self._max_message_bytes)
        if self._draining:
            session.drain()
        self._links.add(session)
        reader = asyncio.create_task(session.read(_prepend(first, requests)), name="agent-link")
        try:
            async for response in session.responses():
                yield response
        finally:
            self._links.discard(session)
            await session.close()
            await cancel_and_wait([reader], suppress=(grpc.RpcError, grpc.aio.UsageError))

    async def Describe(
        self, request: agent_pb2.DescribeRequest, context: Context
    ) -> agent_pb2.DescribeResponse:
        """Return the agent card and the tasks in flight."""
        return convert.describe_to_proto(self._runtime.describe())


async def _forward_requests(
    requests: AsyncIterator[agent_pb2.ExecuteRequest], execution: Execution
) -> None:
    """Feed the coordinator's later messages to the execution until it half-closes."""
    async for request in requests:
        kind = request.WhichOneof("kind")
        if kind == "cancel":
            execution.cancel(request.cancel.reason)
        elif kind == "input":
            execution.answer(convert.answer_from_proto(request.input))
        else:
            logger.warning("task %s: unexpected %s message ignored", execution.info.task_id, kind)


async def _prepend(
    first: agent_pb2.LinkRequest, rest: AsyncIterator[agent_pb2.LinkRequest]
) -> AsyncIterator[agent_pb2.LinkRequest]:
    yield first
    async for request in rest:
        yield request


async def _stop_reading(reader: asyncio.Task[None], *, wait: float) -> None:
    """Let ``reader`` end at the half-close for up to ``wait`` seconds, then cancel it."""
    try:
        if wait > 0 and not reader.done():
            await asyncio.wait({reader}, timeout=wait)
    finally:
        await cancel_and_wait([reader], suppress=(grpc.RpcError, grpc.aio.UsageError))
