"""The agent runtime: runs capability handlers for assigned tasks (no gRPC in here).

One :class:`AgentRuntime` per agent process owns the agent instance and the
concurrency limit. Each Execute stream becomes one :class:`Execution`: an async
context manager that starts a supervisor task, which runs the handler in its own
task and turns everything it does into sequenced :class:`Outgoing` events ending in
exactly one :class:`Finished` or :class:`Failed`.

Why a supervisor and a separate handler task: a cancel or the deadline must end the
attempt promptly even when a handler is slow to notice its cancellation, and the
terminal event must be sent from a task that is not itself being cancelled.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, TypeAlias

from hivewire.services.agent import metrics as agent_metrics
from hivewire.services.agent.sdk import (
    Activity,
    Agent,
    AgentCardInfo,
    AgentError,
    ErrorInfo,
    Handler,
    InputAnswer,
    InputRequestSpec,
    Output,
    Payload,
    TaskContext,
    TaskInfo,
    Usage,
)
from hivewire.services.base.lifecycle import StartClose, cancel_and_wait, ended_within
from hivewire.services.runtime import partials, tracing
from hivewire.services.runtime.convert import error_info
from hivewire.services.runtime.errors import (
    FieldViolation,
    HivewireError,
    InvalidArgument,
    ResourceExhausted,
)
from hivewire.services.runtime.logging import bind_correlation_id, bind_task
from hivewire.services.runtime.values import ProgressUpdate

logger = logging.getLogger(__name__)

__all__ = [
    "ActivityReport",
    "AgentDescription",
    "AgentRuntime",
    "ClientBinder",
    "Event",
    "Execution",
    "Failed",
    "Finished",
    "InputNeeded",
    "Outgoing",
    "PartialChunk",
    "ProgressUpdate",
    "Started",
    "classify",
    "coalesce",
    "continues",
]

# --- events -------------------------------------------------------------------------


@dataclass(frozen=True)
class Started:
    """The agent accepted the assignment."""

    agent_id: str
    agent_name: str


@dataclass(frozen=True)
class PartialChunk:
    """The handler streamed a chunk of output."""

    content: Payload
    artifact_id: str
    append: bool
    last_chunk: bool
    name: str


@dataclass(frozen=True)
class InputNeeded:
    """The handler waits for a person's answer."""

    request: InputRequestSpec


@dataclass(frozen=True)
class ActivityReport:
    """The handler called a model or a tool."""

    activity: Activity


@dataclass(frozen=True)
class Finished:
    """The attempt succeeded (terminal)."""

    output: Payload
    usage: Usage


@dataclass(frozen=True)
class Failed:
    """The attempt failed (terminal)."""

    error: ErrorInfo
    usage: Usage


Event: TypeAlias = (
    Started | ProgressUpdate | PartialChunk | InputNeeded | ActivityReport | Finished | Failed
)


@dataclass(frozen=True)
class Outgoing:
    """An event with its position in the attempt's stream.

    Attributes:
        sequence: Position within the attempt, from 1.
        time: When it was produced (UTC).
        event: What happened.
    """

    sequence: int
    time: datetime
    event: Event

    @property
    def terminal(self) -> bool:
        """Whether this is the attempt's last event."""
        return isinstance(self.event, Finished | Failed)


_Queued: TypeAlias = tuple[datetime, Event]
"""An event waiting in an attempt's outbox, with when it was produced."""


def continues(head: PartialChunk, last: PartialChunk, then: PartialChunk) -> bool:
    """Whether ``then`` can be sent in one chunk with the run ``head`` .. ``last``.

    The rule of :mod:`hivewire.services.runtime.partials`: it appends to the same
    artifact (same id and name) that ``last`` did not end, and the run and ``then``
    carry only text, or only bytes of one content type (JSON never merges).
    """
    return partials.continues(head, last, then, _content_key)


def _content_key(chunk: PartialChunk) -> partials.ContentKey | None:
    content = chunk.content
    return partials.content_key(
        content.text, content.data, content.content_type, has_json=content.json is not None
    )


def coalesce(run: list[PartialChunk]) -> PartialChunk:
    """One chunk for a run of chunks that :func:`continues` allows to join.

    Its content is the run's contents in order; it replaces or appends as the first
    chunk did, and ends the artifact when the last one does. What a reader rebuilds
    from it is byte for byte what it rebuilds from the run.
    """
    if len(run) == 1:
        return run[0]
    head = run[0]
    content = head.content
    if content.data:
        merged = Payload(
            data=b"".join(c.content.data for c in run), content_type=content.content_type
        )
    else:
        merged = Payload(
            text="".join(c.content.text for c in run), content_type=content.content_type
        )
    return PartialChunk(merged, head.artifact_id, head.append, run[-1].last_chunk, head.name)


def _content_size(content: Payload) -> int:
    return len(content.text) + len(content.data)


@dataclass(frozen=True)
class AgentDescription:
    """The agent card plus live state (``Describe``)."""

    card: AgentCardInfo
    agent_id: str
    in_flight: int


ClientBinder: TypeAlias = Callable[[TaskContext], None]
"""Attaches task-bound model/tool clients to a fresh context (``ctx.bind_clients``)."""


# --- classification -------------------------------------------------------------------


def classify(exc: BaseException) -> ErrorInfo:
    """Turn what a handler raised into a classified error.

    Args:
        exc: The exception.

    Returns:
        :class:`AgentError` and :class:`HivewireError` keep their reason and
        retryability; anything else is a permanent ``HANDLER_FAILED`` with the message.
    """
    if isinstance(exc, AgentError):
        return error_info(exc)
    if isinstance(exc, HivewireError):
        return ErrorInfo(exc.code.name, exc.reason, exc.message, exc.retryable, exc.metadata)
    text = str(exc) or type(exc).__name__
    return ErrorInfo(
        code="UNKNOWN",
        reason="HANDLER_FAILED",
        message=f"{type(exc).__name__}: {text}",
        retryable=False,
        metadata={"exception_type": type(exc).__name__},
    )


def _cancelled(reason: str) -> ErrorInfo:
    return ErrorInfo("CANCELLED", "CANCELLED", reason or "cancelled by the coordinator")


def _deadline_exceeded() -> ErrorInfo:
    return ErrorInfo("DEADLINE_EXCEEDED", "DEADLINE_EXCEEDED", "the task's deadline passed")


# --- runtime --------------------------------------------------------------------------


class AgentRuntime(StartClose):
    """Runs one agent's handlers under a concurrency limit.

    Use as an async context manager around serving: entering runs the agent's
    ``setup``, leaving cancels what still runs and runs ``teardown``.
    """

    def __init__(
        self,
        agent: Agent,
        *,
        agent_id: str,
        max_concurrency: int | None = None,
        name: str | None = None,
        bind_clients: ClientBinder | None = None,
        cancel_grace: float = 1.0,
        outbox_size: int = 256,
        coalesce_partials: bool = True,
    ) -> None:
        """Create the runtime.

        Args:
            agent: The agent instance.
            agent_id: This running instance's id (reported in ``started``/``Describe``).
            max_concurrency: Overrides the agent's own ``max_concurrency``.
            name: Overrides the agent card's name.
            bind_clients: Attaches model/tool clients to every task context.
            cancel_grace: Seconds a cancelled handler gets to unwind before the attempt
                is reported ended anyway.
            outbox_size: Events buffered per attempt before the handler waits for the
                coordinator to read (back-pressure).
            coalesce_partials: Send partial chunks queued behind a busy stream as one
                (:func:`coalesce`); False sends one message per chunk.
        """
        self.agent = agent
        self.agent_id = agent_id
        card = agent.card(max_concurrency=max_concurrency)
        self.card = dataclasses.replace(card, name=name) if name else card
        if self.card.max_concurrency < 1:
            raise ValueError("max_concurrency must be at least 1")
        self._bind_clients = bind_clients
        self._cancel_grace = cancel_grace
        self._outbox_size = outbox_size
        self._coalesce = coalesce_partials
        self._in_flight = 0
        self._stragglers: set[asyncio.Task[object]] = set()
        self._closed = False
        self._logger = logging.getLogger(f"hivewire.agent.{self.card.name}")

    @property
    def in_flight(self) -> int:
        """Tasks whose handler is running (or being cancelled)."""
        return self._in_flight

    @property
    def stragglers(self) -> int:
        """Handlers that ignored their cancellation and still run after their stream."""
        return len(self._stragglers)

    @property
    def max_concurrency(self) -> int:
        """The concurrency limit."""
        return self.card.max_concurrency

    def describe(self) -> AgentDescription:
        """The agent card and how many tasks run now."""
        return AgentDescription(self.card, self.agent_id, self._in_flight)

    async def start(self) -> None:
        """Run the agent's setup (``async with`` does)."""
        await self.agent.setup()

    async def close(self) -> None:
        """Cancel handlers that outlived their stream and run the agent's teardown."""
        if self._closed:
            return
        self._closed = True
        for task in list(self._stragglers):
            task.cancel()
        if self._stragglers:
            await asyncio.wait(self._stragglers, timeout=self._cancel_grace)
        await self.agent.teardown()

    def execute(self, info: TaskInfo, task_input: Payload) -> Execution:
        """Reserve a slot and prepare one attempt; run it with ``async with``.

        Args:
            info: The validated assignment.
            task_input: The task's input.

        Returns:
            The execution (not started yet).

        Raises:
            InvalidArgument: The agent has no such capability.
            ResourceExhausted: ``max_concurrency`` tasks run already (``AGENT_OVERLOADED``).
        """
        handler = self.agent.handler(info.capability)
        if handler is None:
            raise InvalidArgument(
                f"agent {self.card.name!r} has no capability {info.capability!r}",
                [
                    FieldViolation(
                        "assign.capability",
                        f"not one of {', '.join(self.card.capability_names) or 'none'}",
                    )
                ],
                reason="UNKNOWN_CAPABILITY",
            )
        if self._closed:
            raise ResourceExhausted("agent is shutting down", reason="AGENT_SHUTTING_DOWN")
        if self._in_flight >= self.card.max_concurrency:
            agent_metrics.REJECTED.inc()
            raise ResourceExhausted(
                f"agent {self.card.name!r} runs {self._in_flight} tasks, its maximum",
                [(f"agent/{self.agent_id}", f"max_concurrency {self.card.max_concurrency}")],
                retry_after=1.0,
                reason="AGENT_OVERLOADED",
            )
        self._in_flight += 1
        agent_metrics.IN_FLIGHT.inc()
        return Execution(self, info, task_input, handler)

    # Called by Execution.

    def _release(self) -> None:
        self._in_flight -= 1
        agent_metrics.IN_FLIGHT.dec()

    def _adopt(self, task: asyncio.Task[object]) -> None:
        """Keep a handler that ignored its cancellation until it ends."""
        self._stragglers.add(task)
        task.add_done_callback(self._stragglers.discard)


class Execution(StartClose):
    """One attempt of one task: an async context manager streaming :class:`Outgoing` events.

    ``async with runtime.execute(info, input) as execution:`` starts the handler;
    iterate :meth:`events` to stream; call :meth:`cancel` / :meth:`answer` for the
    coordinator's messages. Leaving the block early (the stream broke) cancels the
    handler.
    """

    def __init__(
        self,
        runtime: AgentRuntime,
        info: TaskInfo,
        task_input: Payload,
        handler: Handler,
    ) -> None:
        self._runtime = runtime
        self.info = info
        self._input = task_input
        self._handler = handler
        self._outbox: asyncio.Queue[_Queued] = asyncio.Queue(runtime._outbox_size)
        self._sequence = 0
        self._pending: dict[str, asyncio.Future[InputAnswer]] = {}
        self._interrupt: asyncio.Future[str] | None = None
        self._cancel_reason: str | None = None
        self._supervisor: asyncio.Task[None] | None = None
        self._handler_task: asyncio.Task[object] | None = None
        self._released = False
        self._finished = False
        self._started_at = time.monotonic()
        self.context = TaskContext(
            info,
            self,
            logger=logging.LoggerAdapter(
                runtime._logger, {"attempt": info.attempt, "capability": info.capability}
            ),
        )
        if runtime._bind_clients is not None:
            runtime._bind_clients(self.context)

    # --- lifecycle ----------------------------------------------------------------

    async def start(self) -> None:
        """Start the attempt's supervisor (``async with`` does)."""
        loop = asyncio.get_running_loop()
        self._interrupt = loop.create_future()
        self._supervisor = asyncio.create_task(
            self._supervise(), name=f"agent-execution-{self.info.task_id}"
        )

    async def close(self) -> None:
        """Stop the attempt (if it still runs) and free its slot once the handler ends."""
        supervisor = self._supervisor
        if supervisor is not None and not supervisor.done():
            if not self._finished:
                logger.info(
                    "task %s: stream ended before the attempt did; cancelling", self.info.task_id
                )
            await cancel_and_wait([supervisor])
        elif self._handler_task is None:
            self._release_once()

    def discard(self) -> None:
        """Free the slot of an execution that was never started (a no-op once it was)."""
        if self._supervisor is None:
            self._release_once()

    def _release_once(self) -> None:
        if not self._released:
            self._released = True
            self._runtime._release()

    # --- coordinator's messages ---------------------------------------------------

    def cancel(self, reason: str = "") -> None:
        """Stop the handler; the attempt ends with a ``CANCELLED`` error.

        Args:
            reason: Why, for the error message and logs.
        """
        if self._cancel_reason is not None or self._finished:
            return
        self._cancel_reason = reason or "cancelled by the coordinator"
        logger.info("task %s: cancel requested (%s)", self.info.task_id, self._cancel_reason)
        if self._interrupt is not None and not self._interrupt.done():
            self._interrupt.set_result("cancel")

    def answer(self, answer: InputAnswer) -> bool:
        """Deliver a person's answer to a pending input request.

        Args:
            answer: The answer; ``request_id`` selects the request.

        Returns:
            True when a request was waiting for it.
        """
        future = self._pending.get(answer.request_id)
        if future is None or future.done():
            logger.warning(
                "task %s: answer to unknown input request %r ignored",
                self.info.task_id,
                answer.request_id,
            )
            return False
        future.set_result(answer)
        return True

    async def events(self) -> AsyncIterator[Outgoing]:
        """Yield the attempt's events in order, ending with the terminal one.

        Partial chunks that piled up while the previous event was being sent are sent
        as one (:func:`coalesce`): only what is queued already, so a lone chunk goes out
        at once. ``sequence`` numbers what is yielded (1, 2, 3... without gaps).
        """
        held: _Queued | None = None
        while True:
            if held is None:
                stamp, event = await self._outbox.get()
            else:
                (stamp, event), held = held, None
            if (
                isinstance(event, PartialChunk)
                and self._runtime._coalesce
                and not self._outbox.empty()
            ):
                event, held = self._coalesce_queued(event)
            self._sequence += 1
            out = Outgoing(self._sequence, stamp, event)
            yield out
            if out.terminal:
                return

    def _coalesce_queued(self, first: PartialChunk) -> tuple[PartialChunk, _Queued | None]:
        """``first`` with the queued chunks that continue it; the next event, if taken."""
        run = [first]
        size = _content_size(first.content)
        while not self._outbox.empty():
            queued = self._outbox.get_nowait()
            then = queued[1]
            if not isinstance(then, PartialChunk) or not continues(run[0], run[-1], then):
                return self._joined(run), queued
            size += _content_size(then.content)
            if size > partials.COALESCE_MAX:
                return self._joined(run), queued
            run.append(then)
        return self._joined(run), None

    @staticmethod
    def _joined(run: list[PartialChunk]) -> PartialChunk:
        if len(run) > 1:
            agent_metrics.PARTIALS_JOINED.inc(len(run) - 1)
        return coalesce(run)

    # --- ExecutionSink (called from the handler's TaskContext) ----------------------

    async def _emit(self, event: Event) -> None:
        await self._outbox.put((datetime.now(UTC), event))

    async def send_progress(self, fraction: float, step: str, message: str) -> None:
        """Queue a progress event."""
        await self._emit(ProgressUpdate(fraction, step, message))

    async def send_partial(
        self, content: Payload, *, artifact_id: str, append: bool, last_chunk: bool, name: str
    ) -> None:
        """Queue a partial result."""
        await self._emit(PartialChunk(content, artifact_id, append, last_chunk, name))

    async def send_activity(self, activity: Activity) -> None:
        """Queue an activity report."""
        await self._emit(ActivityReport(activity))

    async def ask(self, request: InputRequestSpec) -> InputAnswer:
        """Queue an input request and wait for its answer."""
        future: asyncio.Future[InputAnswer] = asyncio.get_running_loop().create_future()
        self._pending[request.request_id] = future
        try:
            await self._emit(InputNeeded(request))
            logger.info("task %s: waiting for input %s", self.info.task_id, request.request_id)
            return await future
        finally:
            self._pending.pop(request.request_id, None)

    # --- supervision --------------------------------------------------------------

    async def _call_handler(self) -> Output:
        # The handler's own span (its model and tool calls are its children), made only
        # while spans go somewhere; without, they are children of the attempt's context.
        info = self.info
        with tracing.kept_span(
            f"handle {info.capability}",
            attributes={"hivewire.task_id": info.task_id, "hivewire.attempt": info.attempt},
        ):
            return await self._handler(self._input, self.context)

    def _remaining(self) -> float | None:
        deadline = self.info.deadline
        if deadline is None:
            return None
        return max(0.0, (deadline - datetime.now(UTC)).total_seconds())

    async def _supervise(self) -> None:
        info = self.info
        with bind_task(info.task_id), bind_correlation_id(info.correlation_id or None):
            try:
                await self._emit(Started(self._runtime.agent_id, self._runtime.card.name))
                logger.info(
                    "task %s attempt %d: %s started", info.task_id, info.attempt, info.capability
                )
                # The handler task copies this context, so its log lines and its
                # downstream calls carry the task and correlation ids.
                handler_task = asyncio.create_task(
                    self._call_handler(), name=f"agent-handler-{info.task_id}"
                )
                self._handler_task = handler_task
                handler_task.add_done_callback(lambda _t: self._release_once())
                outcome = await self._await_outcome(handler_task)
            except asyncio.CancelledError:
                # The stream broke (or the server stops): nobody can receive an outcome.
                await self._stop_handler()
                if self._handler_task is None:
                    self._release_once()
                agent_metrics.EXECUTIONS.labels(info.capability, "abandoned").inc()
                raise
            self._finished = True
            self._record(outcome)
            await self._emit(outcome)

    async def _await_outcome(self, handler_task: asyncio.Task[Output]) -> Finished | Failed:
        assert self._interrupt is not None
        waiters: set[asyncio.Future[Any]] = {handler_task, self._interrupt}
        await asyncio.wait(
            waiters,
            timeout=self._remaining(),
            return_when=asyncio.FIRST_COMPLETED,
        )
        if handler_task.done() and self._cancel_reason is None:
            return self._outcome_of(handler_task)
        if self._cancel_reason is not None:
            error = _cancelled(self._cancel_reason)
        else:
            logger.info("task %s: deadline passed; cancelling the handler", self.info.task_id)
            error = _deadline_exceeded()
        await self._stop_handler()
        return Failed(error, self._usage())

    async def _stop_handler(self) -> None:
        task = self._handler_task
        if task is None or task.done():
            return
        task.cancel()
        if not await ended_within(task, self._runtime._cancel_grace):
            logger.warning(
                "task %s: handler ignored cancellation for %.1fs; reporting the attempt ended",
                self.info.task_id,
                self._runtime._cancel_grace,
            )
            self._runtime._adopt(task)
        elif not task.cancelled() and task.exception() is not None:
            logger.debug("task %s: handler ended with %r", self.info.task_id, task.exception())

    def _outcome_of(self, task: asyncio.Task[Output]) -> Finished | Failed:
        if task.cancelled():
            # The handler cancelled itself (nobody else did): report it as cancelled.
            return Failed(_cancelled("the handler was cancelled"), self._usage())
        exc = task.exception()
        if exc is None:
            try:
                output = Payload.of(task.result())
            except TypeError as bad:
                return Failed(classify(bad), self._usage())
            return Finished(output, self._usage())
        error = classify(exc)
        if isinstance(exc, AgentError | HivewireError):
            logger.info(
                "task %s failed: %s %s: %s",
                self.info.task_id,
                error.code,
                error.reason,
                error.message,
            )
        else:
            logger.error("task %s: handler raised", self.info.task_id, exc_info=exc)
        return Failed(error, self._usage())

    def _usage(self) -> Usage:
        usage = self.context.usage.copy()
        usage.total_time = time.monotonic() - self._started_at
        return usage

    def _record(self, outcome: Finished | Failed) -> None:
        if isinstance(outcome, Finished):
            label = "succeeded"
        elif outcome.error.reason == "CANCELLED":
            label = "cancelled"
        elif outcome.error.reason == "DEADLINE_EXCEEDED":
            label = "deadline_exceeded"
        else:
            label = "retryable_error" if outcome.error.retryable else "permanent_error"
        agent_metrics.EXECUTIONS.labels(self.info.capability, label).inc()
        logger.info(
            "task %s attempt %d: %s in %.3fs",
            self.info.task_id,
            self.info.attempt,
            label,
            time.monotonic() - self._started_at,
        )
