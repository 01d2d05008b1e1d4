"""The agent's side of a ``Link`` stream: many attempts over one long-lived stream.

:class:`LinkSession` is what one ``Link`` call runs on the agent. Each frame from the
coordinator names an attempt by ``(task_id, attempt)``; an assignment starts that
attempt in a task of its own (``runtime.execute``, exactly as an ``Execute`` call
would), cancel and input frames are routed to it, and a ``close`` frame stops it
without an answer (what cancelling an ``Execute`` call does). Every attempt's events
go into one queue that :meth:`LinkSession.responses` drains: whatever has piled up
goes out in one ``LinkResponse`` (up to ``LINK_BATCH_BYTES``, so that two results that
each fit a message do not make one too big to send), and it never waits for more to
batch. Like an ``Execute`` stream, an attempt takes its next event only once the
stream has sent the previous one, so the partial chunks that pile up meanwhile are
joined into one message (``Execution.events()``). A message too big for the server to
send ends its own attempt with a ``RESOURCE_EXHAUSTED`` refusal, what its ``Execute``
call would have ended with, instead of ending the stream of every attempt.

Bad frames:

* no attempt key (empty ``task_id`` or attempt 0): not a frame of this protocol, so
  the stream ends with ``INVALID_ARGUMENT`` (``LINK_FRAME_INVALID``) and every attempt
  on it stops;
* an assignment for an attempt that still runs here (a coordinator that let the task
  go and took it back before the first run had unwound): a refusal ``ABORTED`` /
  ``ATTEMPT_ALREADY_RUNNING`` for that attempt alone, which the coordinator retries as
  a new attempt; the other attempts on the link go on;
* an invalid assignment (missing fields, bad deadline, unknown capability) or an
  agent at its maximum: a :class:`LinkRefusal` for that attempt, carrying what an
  ``Execute`` call would have ended with;
* input (or an empty frame) for an attempt that is not running: a refusal
  ``INVALID_ARGUMENT`` / ``ASSIGNMENT_REQUIRED``; cancel and close frames for such an
  attempt are dropped (they cross the attempt's last message in normal operation).

When the agent shuts down, :meth:`LinkSession.drain` refuses new assignments
(``UNAVAILABLE`` / ``AGENT_SHUTTING_DOWN``, what a stopping server answers a new
``Execute`` call) and ends the stream once the attempts on it have ended, so the
server's grace period is not spent waiting for a link that carries nothing.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass

from hivewire.agent.v1 import agent_pb2
from hivewire.common.v1 import common_pb2
from hivewire.services.agent import convert
from hivewire.services.agent.runtime import AgentRuntime, Execution
from hivewire.services.base.lifecycle import Drain, cancel_and_wait
from hivewire.services.runtime import tracing
from hivewire.services.runtime.config import DEFAULT_MAX_MESSAGE_BYTES, LINK_BATCH_BYTES
from hivewire.services.runtime.errors import (
    Aborted,
    FieldViolation,
    HivewireError,
    InvalidArgument,
    ResourceExhausted,
    Unavailable,
)
from hivewire.services.runtime.logging import bind_correlation_id

logger = logging.getLogger(__name__)

__all__ = ["EXECUTE_METHOD", "LinkSession"]

_SERVICE = agent_pb2.DESCRIPTOR.services_by_name["AgentService"].full_name
EXECUTE_METHOD = f"/{_SERVICE}/Execute"
"""What each attempt's server span is named after (it is an Execute, carried on a Link)."""

MAX_BATCH = 256
"""Most messages one ``LinkResponse`` carries."""

Key = tuple[str, int]

_ENVELOPE_BYTES = 16
"""What a ``LinkResponse`` adds around one message it carries alone (tag and length)."""


@dataclass
class _Running:
    execution: Execution
    task: asyncio.Task[None]


class _End:
    """Marks the end of the response queue."""


_END = _End()

_START_TURNS = 6
"""Loop turns a lone ``started`` waits for the attempt's next event before it is sent.

A handler that returns at once has its result queued on the third turn (CPython 3.11:
the supervisor's wait, its emit, the attempt's take); twice that leaves room for a
handler that awaits something already done. The wait ends as soon as anything is
queued, so only a message that stays a lone ``started`` pays all six turns."""


def _lone_start(response: agent_pb2.LinkResponse) -> bool:
    return (
        len(response.responses) == 1
        and not response.refusals
        and response.responses[0].WhichOneof("kind") == "started"
    )


_Outgoing = agent_pb2.ExecuteResponse | agent_pb2.LinkRefusal | _End


class LinkSession:
    """The attempts of one ``Link`` stream on this agent.

    Args:
        runtime: Runs the attempts.
        queue_size: Messages buffered for the stream before attempts wait for it to
            drain (back-pressure, like each attempt's own outbox).
        max_message_bytes: The server's largest message: an attempt's message bigger
            than that ends only its attempt (as its Execute call would end), never
            the stream of every attempt.
    """

    def __init__(
        self,
        runtime: AgentRuntime,
        *,
        queue_size: int = 1024,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    ) -> None:
        self._runtime = runtime
        self._max_message_bytes = max_message_bytes
        self._running: dict[Key, _Running] = {}
        self._out: asyncio.Queue[_Outgoing] = asyncio.Queue(queue_size)
        self._failure: HivewireError | None = None
        self._closed = False
        self._drain = Drain(idle=lambda: not self._running, end=self._end_soon)
        self._ending: set[asyncio.Task[None]] = set()
        # Set (and replaced) each time the stream has sent a message. An Event, not a
        # shared future: cancelling one waiter must not cancel the others' wait.
        self._sent = asyncio.Event()

    # -- frames from the coordinator ------------------------------------------------

    async def read(self, requests: AsyncIterator[agent_pb2.LinkRequest]) -> None:
        """Apply every frame of ``requests``; at their end stop what still runs.

        A frame that makes the stream invalid ends it (see the module doc); the
        error is raised by :meth:`responses`.
        """
        try:
            async for request in requests:
                for frame in request.frames:
                    await self.handle(frame)
        except HivewireError as err:
            self._failure = err
        finally:
            await self.close()
            await self._out.put(_END)

    async def handle(self, frame: agent_pb2.LinkFrame) -> None:
        """Apply one frame.

        Raises:
            InvalidArgument: The frame names no attempt.
        """
        if self._closed:
            return  # the link is ending: nothing starts or changes any more
        if not frame.task_id or frame.attempt == 0:
            raise InvalidArgument(
                "every Link frame must name its attempt",
                [FieldViolation("frames.task_id", "task_id and attempt are required")],
                reason="LINK_FRAME_INVALID",
            )
        key = (frame.task_id, frame.attempt)
        running = self._running.get(key)
        kind = frame.request.WhichOneof("kind") if frame.HasField("request") else None
        if frame.close:
            if running is not None:
                running.task.cancel()
            return
        if kind == "assign":
            if running is not None:
                await self._refuse(
                    key,
                    Aborted(
                        f"attempt {frame.attempt} of task {frame.task_id} still runs on "
                        "this agent; try again as a new attempt",
                        reason="ATTEMPT_ALREADY_RUNNING",
                    ),
                )
                return
            await self._start(key, frame)
        elif running is None:
            if kind == "cancel":
                logger.debug("cancel of attempt %s not running here; dropped", key)
                return
            await self._refuse(
                key,
                InvalidArgument(
                    "the first message of an attempt must be an assignment",
                    [FieldViolation("assign", "the first message must carry assign")],
                    reason="ASSIGNMENT_REQUIRED",
                ),
            )
        elif kind == "cancel":
            running.execution.cancel(frame.request.cancel.reason)
        elif kind == "input":
            running.execution.answer(convert.answer_from_proto(frame.request.input))
        else:
            logger.warning("task %s: empty Link frame ignored", frame.task_id)

    async def _start(self, key: Key, frame: agent_pb2.LinkFrame) -> None:
        assign = frame.request.assign
        try:
            if self._drain.draining:
                raise Unavailable("the agent is shutting down", reason="AGENT_SHUTTING_DOWN")
            if assign.task_id != frame.task_id or max(1, assign.attempt) != frame.attempt:
                raise InvalidArgument(
                    "the assignment names another attempt than its frame",
                    [FieldViolation("assign.attempt", "must match the frame's task and attempt")],
                    reason="INVALID_ASSIGNMENT",
                )
            # The deadline is the assignment's own: there is no call deadline per attempt.
            info = convert.task_info_from_proto(assign)
            if not info.correlation_id and frame.correlation_id:
                info = dataclasses.replace(info, correlation_id=frame.correlation_id)
            task_input = convert.payload_from_proto(assign.input)
            execution = self._runtime.execute(info, task_input)
        except HivewireError as err:
            await self._refuse(key, err)
            return
        task = asyncio.create_task(
            self._run(key, execution, frame), name=f"agent-link-{key[0]}-{key[1]}"
        )
        self._running[key] = _Running(execution, task)
        task.add_done_callback(lambda _task: self._ended(key, execution, task))

    async def _refuse(self, key: Key, err: HivewireError) -> None:
        logger.info("attempt %s refused: %s %s", key, err.code.name, err.reason)
        await self._out.put(
            agent_pb2.LinkRefusal(
                task_id=key[0],
                attempt=key[1],
                error=common_pb2.ErrorDetail(
                    code=err.code.name,
                    reason=err.reason,
                    message=err.message,
                    retryable=err.retryable,
                    metadata=err.metadata,
                ),
            )
        )

    async def _run(self, key: Key, execution: Execution, frame: agent_pb2.LinkFrame) -> None:
        task_id, attempt = key
        with (
            bind_correlation_id(execution.info.correlation_id or None),
            tracing.server_span(
                EXECUTE_METHOD,
                frame.traceparent,
                frame.tracestate,
                attributes={"hivewire.task_id": task_id, "hivewire.attempt": attempt},
            ),
        ):
            async with execution:
                async for out in execution.events():
                    message = convert.response_to_proto(task_id, out)
                    message.attempt = attempt
                    size = message.ByteSize() + _ENVELOPE_BYTES
                    if size > self._max_message_bytes:
                        # What the server answers an Execute call that sends it.
                        await self._refuse(
                            key,
                            ResourceExhausted(
                                "Sent message larger than max "
                                f"({size} vs. {self._max_message_bytes})"
                            ),
                        )
                        return  # leaving the block stops the attempt
                    await self._out.put(message)
                    if not out.terminal and message.WhichOneof("kind") != "started":
                        # Take the next event once the stream has sent this one, as
                        # Execute does: what piles up meanwhile goes as one
                        # (partial chunks are joined by ``events()``). Not after
                        # ``started``: nothing joins it, and a quick handler's outcome
                        # may still reach its message (see responses).
                        await self._sent.wait()

    def _ended(self, key: Key, execution: Execution, task: asyncio.Task[None]) -> None:
        """An attempt's task is done: forget it (its slot is free).

        Also when the task was cancelled before its first step (a close frame right
        after the assignment, the link ending): ``_run`` never ran, so neither did the
        ``async with`` that frees the slot.
        """
        execution.discard()
        running = self._running.get(key)
        if running is not None and running.task is task:
            del self._running[key]
        self._drain.settle()

    def drain(self) -> None:
        """Take no new attempts; end the stream once the running ones have ended."""
        self._drain.start()

    def _end_soon(self) -> None:
        task = asyncio.create_task(self._out.put(_END))
        self._ending.add(task)
        task.add_done_callback(self._ending.discard)

    async def close(self) -> None:
        """Stop every attempt still running (the link ended or broke)."""
        if self._closed:
            return
        self._closed = True
        tasks = [r.task for r in self._running.values()]
        if tasks:
            logger.info("link ended with %d attempts running; stopping them", len(tasks))
        await cancel_and_wait(tasks, suppress=(Exception,))

    # -- messages to the coordinator ------------------------------------------------

    async def responses(self) -> AsyncIterator[agent_pb2.LinkResponse]:
        """The stream's messages: whatever piled up per message, until the link ends.

        Raises:
            InvalidArgument: A frame made the stream invalid.
        """
        out = self._out
        ended = False
        held: _Outgoing | None = None
        while not ended:
            item, held = (held, None) if held is not None else (await out.get(), None)
            response = agent_pb2.LinkResponse()
            size = 0
            while True:
                if isinstance(item, agent_pb2.ExecuteResponse | agent_pb2.LinkRefusal):
                    # At most LINK_BATCH_BYTES per message, unless one message is bigger.
                    size += item.ByteSize()
                    if size > LINK_BATCH_BYTES and (response.responses or response.refusals):
                        held = item
                        break
                    if isinstance(item, agent_pb2.ExecuteResponse):
                        response.responses.append(item)
                    else:
                        response.refusals.append(item)
                else:
                    ended = True
                    break
                if out.empty() and _lone_start(response):
                    # A lone ``started``: let a handler that ends at once put its
                    # outcome behind it (a few loop turns), so both go as one message.
                    for _ in range(_START_TURNS):
                        await asyncio.sleep(0)
                        if not out.empty():
                            break
                if out.empty() or len(response.responses) >= MAX_BATCH:
                    break
                item = out.get_nowait()
            if response.responses or response.refusals:
                yield response
                sent, self._sent = self._sent, asyncio.Event()
                sent.set()
        if self._failure is not None:
            raise self._failure
