"""Task-bound model and tool clients: ``ctx.model`` and ``ctx.tools``.

Every call a handler makes through these automatically:

* uses the task's remaining time as its deadline (so nothing outlives the task);
* carries the correlation id, task id, attempt and remaining token budget as call
  metadata (``x-correlation-id``, ``x-hivewire-task-id``, ``x-hivewire-attempt``,
  ``x-hivewire-token-budget``) and the task id in the request;
* reports an :class:`~hivewire.services.agent.sdk.Activity` on the Execute stream when
  it starts and when it ends;
* adds what it consumed to the attempt's :class:`~hivewire.services.agent.sdk.Usage`.

The transport is the services' own clients (:class:`ModelClient`, :class:`ToolClient`)
on long-lived channels. Errors come back as domain errors: a gRPC failure as the
:class:`~hivewire.services.runtime.errors.HivewireError` the service raised (so an
unavailable model is a retryable failure of the task), a tool that ran but failed as
:class:`ToolCallError`. Tool calls that need a person's approval ask for it with
``ctx.request_input(kind=APPROVAL)`` and run again with the approval; a denial raises
the permanent ``TOOL_APPROVAL_DENIED``.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any, Protocol, Unpack

import grpc

from hivewire.model.v1 import model_pb2
from hivewire.services.agent import convert
from hivewire.services.agent.runtime import classify
from hivewire.services.agent.sdk import (
    Activity,
    ActivityKind,
    AgentError,
    ChatInput,
    ChatTurn,
    ErrorInfo,
    Generation,
    InputKind,
    ModelStream,
    OnToolProgress,
    PermanentError,
    TaskContext,
    Usage,
    valid_reason,
)
from hivewire.services.base.keywords import check_keywords
from hivewire.services.model.client import CallScope, CompletionStream, ModelClient
from hivewire.services.model.convert import chat_message, finish_reason_name
from hivewire.services.model.domain import Sampling
from hivewire.services.runtime import metadata as md
from hivewire.services.runtime.errors import HivewireError, Unavailable
from hivewire.services.runtime.status import from_rpc_error
from hivewire.services.runtime.values import ProgressUpdate
from hivewire.services.tool.client import ToolClient
from hivewire.services.tool.domain import (
    ApprovalGrant,
    ApprovalRequest,
    ToolInfo,
    ToolOutcome,
)

logger = logging.getLogger(__name__)

__all__ = [
    "ChatTurn",
    "Endpoint",
    "Generation",
    "ModelStream",
    "TaskModel",
    "TaskTools",
    "ToolCallError",
    "ToolError",
    "ToolInfo",
    "ToolOutput",
    "bind_clients",
]


class Endpoint(Protocol):
    """Where a downstream service is: yields a long-lived channel to one instance."""

    async def channel(self) -> grpc.aio.Channel:
        """A channel to a healthy instance.

        Raises:
            Unavailable: No instance is known.
        """
        ...

    def failed(self, err: HivewireError) -> None:
        """Tell the endpoint a call failed, so it may pick another instance next time."""
        ...


# --- values -------------------------------------------------------------------------


ToolOutput = ToolOutcome
"""A tool's result: ``result`` (JSON object), ``text`` (for models), ``truncated``."""


class ToolCallError(AgentError):
    """A tool an agent called ran but could not do the job (its ``ErrorDetail``).

    Unhandled, it fails the task with the tool's reason; ``retryable`` follows the tool.
    """

    def __init__(self, tool_name: str, detail: ErrorInfo) -> None:
        """Create the error from the tool's classified error."""
        super().__init__(
            detail.reason if valid_reason(detail.reason) else "TOOL_FAILED",
            detail.message or f"tool {tool_name} failed",
            code=detail.code or "UNKNOWN",
            metadata={**detail.metadata, "tool_name": tool_name},
        )
        self.retryable = detail.retryable
        self.tool_name = tool_name
        self.detail = detail


ToolError = ToolCallError
"""The former name of :class:`ToolCallError`, kept so agents that catch it keep working.

``hivewire.services.tool.sdk.ToolError`` is another thing: what a tool raises."""


# --- shared call plumbing -------------------------------------------------------------


class _Bound:
    """What both clients share: the task context, the endpoint, deadline and metadata."""

    def __init__(self, ctx: TaskContext, endpoint: Endpoint, *, default_timeout: float) -> None:
        self._ctx = ctx
        self._endpoint = endpoint
        self._default_timeout = default_timeout

    def _timeout(self) -> float:
        remaining = self._ctx.time_remaining()
        return self._default_timeout if remaining is None else remaining

    def _domain_error(self, exc: BaseException) -> BaseException:
        err = from_rpc_error(exc) if isinstance(exc, grpc.RpcError) else exc
        if isinstance(err, Unavailable):
            self._endpoint.failed(err)
        return err

    async def _activity(
        self,
        kind: ActivityKind,
        name: str,
        summary: str,
        started_at: datetime,
        *,
        done: bool = False,
        usage: Usage | None = None,
        error: BaseException | None = None,
    ) -> None:
        await self._ctx.report_activity(
            Activity(
                kind=kind,
                name=name,
                summary=summary,
                started_at=started_at,
                done=done,
                usage=usage,
                error=classify(error) if error is not None else None,
            )
        )

    @contextlib.asynccontextmanager
    async def _reported(
        self, kind: ActivityKind, name: str, summary: str
    ) -> AsyncIterator[datetime]:
        """Report the call's start; on failure, report it done with the domain error and
        raise that error (the caller reports success itself, with what it consumed).

        Yields:
            When the call started.
        """
        started = datetime.now(UTC)
        await self._activity(kind, name, summary, started)
        try:
            yield started
        except Exception as exc:
            err = self._domain_error(exc)
            await self._activity(kind, name, summary, started, done=True, error=err)
            if err is exc:
                raise
            raise err from exc


# --- model ----------------------------------------------------------------------------


class TaskModel(_Bound):
    """``ctx.model``: the model service (:class:`ModelClient`), bound to one task attempt."""

    def _check_budget(self) -> int | None:
        remaining = self._ctx.tokens_remaining()
        if remaining is not None and remaining <= 0:
            raise PermanentError(
                "TOKEN_BUDGET_EXHAUSTED",
                f"the task's budget of {self._ctx.info.token_budget} tokens is spent",
                code="RESOURCE_EXHAUSTED",
            )
        return remaining

    def _scope(self) -> CallScope:
        info = self._ctx.info
        return CallScope(
            task_id=info.task_id,
            token_budget=self._ctx.tokens_remaining(),
            correlation_id=info.correlation_id or None,
            attempt=info.attempt,
            timeout=self._timeout(),
        )

    def stream(self, prompt: str, *, system: str = "", **sampling: Unpack[Sampling]) -> ModelStream:
        """Complete a prompt, yielding text as it is generated.

        Args:
            prompt: The prompt.
            system: Optional system instructions.
            **sampling: The model and how to sample
                (:class:`~hivewire.services.model.domain.Sampling`): ``model`` (""
                means the service's default), ``temperature``, ``top_p``,
                ``max_tokens`` (0: backend default), ``stop``, ``seed``.

        Returns:
            A :class:`ModelStream` of text chunks.
        """
        check_keywords("TaskModel.stream", sampling, Sampling.__optional_keys__)

        def start(client: ModelClient) -> CompletionStream:
            return client.generate(prompt, system=system, **sampling, **self._scope())

        return ModelStream(lambda holder: self._run(start, "generate", sampling, holder))

    def stream_chat(
        self, messages: Sequence[ChatInput], **sampling: Unpack[Sampling]
    ) -> ModelStream:
        """Continue a conversation, yielding the reply as it is generated.

        Args:
            messages: The conversation: :class:`ChatTurn`, ``(role, content)`` pairs or
                ``{"role": ..., "content": ...}`` mappings.
            **sampling: The model and how to sample, as for :meth:`stream`.

        Returns:
            A :class:`ModelStream` of text chunks.

        Raises:
            ValueError: A message has an unknown role.
        """
        check_keywords("TaskModel.stream_chat", sampling, Sampling.__optional_keys__)
        converted = [_chat_message(m) for m in messages]

        def start(client: ModelClient) -> CompletionStream:
            return client.chat(converted, **sampling, **self._scope())

        return ModelStream(lambda holder: self._run(start, "chat", sampling, holder))

    async def generate(
        self, prompt: str, *, system: str = "", **sampling: Unpack[Sampling]
    ) -> Generation:
        """Complete a prompt and return the whole answer (see :meth:`stream`)."""
        return await self.stream(prompt, system=system, **sampling).collect()

    async def chat(self, messages: Sequence[ChatInput], **sampling: Unpack[Sampling]) -> Generation:
        """Continue a conversation and return the whole reply (see :meth:`stream_chat`)."""
        return await self.stream_chat(messages, **sampling).collect()

    async def embed(self, inputs: Sequence[str], *, model: str = "") -> list[list[float]]:
        """Embed texts.

        Args:
            inputs: The texts.
            model: Embedding model; empty means the default.

        Returns:
            One vector per input, in order.
        """
        name = model or "default"
        summary = f"embed {len(inputs)} text(s)"
        async with self._reported(ActivityKind.MODEL_CALL, name, summary) as started:
            client = ModelClient(await self._endpoint.channel())
            response = await client.embed(inputs, model=model, **self._scope())
        usage = convert.usage_from_proto(response.usage)
        self._ctx.usage.add_model_call(usage)
        await self._activity(
            ActivityKind.MODEL_CALL,
            response.model or name,
            summary,
            started,
            done=True,
            usage=usage,
        )
        return [list(e.values) for e in response.embeddings]

    async def _run(
        self,
        start: Callable[[ModelClient], CompletionStream],
        summary: str,
        sampling: Sampling,
        holder: ModelStream,
    ) -> AsyncIterator[str]:
        self._check_budget()
        t0 = time.monotonic()
        model = sampling.get("model", "")
        name = model or "default"
        parts: list[str] = []
        first_token: float | None = None
        done: model_pb2.Completion | None = None
        async with self._reported(ActivityKind.MODEL_CALL, name, summary) as started:
            stream = start(ModelClient(await self._endpoint.channel()))
            # aclosing: when our caller stops early, the call is cancelled right away
            # instead of whenever the garbage collector finalizes the generator.
            async with contextlib.aclosing(aiter(stream)) as items:
                async for item in items:
                    if isinstance(item, str):
                        if first_token is None:
                            first_token = time.monotonic() - t0
                        parts.append(item)
                        if item:
                            yield item
                    else:
                        done = item
        usage = convert.usage_from_proto(done.usage) if done is not None else Usage()
        if usage.time_to_first_token is None:
            usage.time_to_first_token = first_token
        self._ctx.usage.add_model_call(usage)
        holder.result = Generation(
            text="".join(parts),
            finish_reason=finish_reason_name(done.finish_reason) if done else "unknown",
            usage=usage,
            model=done.model if done is not None else model,
            backend=done.backend if done is not None else "",
        )
        await self._activity(
            ActivityKind.MODEL_CALL,
            holder.result.model or name,
            summary,
            started,
            done=True,
            usage=usage,
        )


def _chat_message(message: ChatInput) -> model_pb2.ChatMessage:
    if isinstance(message, ChatTurn):
        role, content, name = message.role, message.content, message.name
    elif isinstance(message, tuple):
        role, content = message
        name = ""
    else:
        role, content, name = message["role"], message["content"], message.get("name", "")
    return chat_message(role, content, name)


# --- tools ----------------------------------------------------------------------------


class TaskTools(_Bound):
    """``ctx.tools``: the tool service (:class:`ToolClient`), bound to one task attempt."""

    def __init__(self, ctx: TaskContext, endpoint: Endpoint, *, default_timeout: float) -> None:
        """Create the client (the runtime does this for every attempt)."""
        super().__init__(ctx, endpoint, default_timeout=default_timeout)
        self._calls = 0

    def _metadata(self) -> list[tuple[str, str]]:
        # The tool client adds the task id itself.
        info = self._ctx.info
        pairs = [(md.ATTEMPT, str(info.attempt))]
        if info.correlation_id:
            pairs.append((md.CORRELATION_ID, info.correlation_id))
        return pairs

    async def list(self, name_prefix: str = "") -> list[ToolInfo]:
        """The tools this agent may call.

        Args:
            name_prefix: Only tools whose name starts with it.

        Returns:
            The tools, with their JSON Schemas.
        """
        try:
            client = ToolClient(await self._endpoint.channel())
            return await client.list_tools(name_prefix=name_prefix, timeout=self._timeout())
        except Exception as exc:
            err = self._domain_error(exc)
            raise err from exc

    async def invoke(
        self,
        tool_name: str,
        arguments: Mapping[str, Any] | None = None,
        *,
        on_progress: OnToolProgress | None = None,
    ) -> ToolOutcome:
        """Run a tool and return its result.

        A tool that needs approval pauses the task for a person's decision (an
        ``APPROVAL`` input request) and then runs with the approval.

        Args:
            tool_name: The tool.
            arguments: Its arguments (checked by the service against its schema).
            on_progress: Called with ``(fraction, step, message)`` for each progress
                report of the tool; may be async.

        Returns:
            The tool's result (``result``, ``text``, ``truncated``).

        Raises:
            ToolCallError: The tool ran but failed.
            PermanentError: ``TOOL_APPROVAL_DENIED`` when the person said no.
            HivewireError: The service refused the call (unknown tool, bad arguments,
                forbidden, unavailable).
        """
        self._calls += 1
        call_id = f"{self._ctx.task_id}-{self._ctx.attempt}-tool-{self._calls}"
        summary = f"invoke {tool_name}"
        approval: ApprovalGrant | None = None
        asked_for: set[str] = set()
        async with self._reported(ActivityKind.TOOL_CALL, tool_name, summary) as started:
            self._ctx.usage.tool_calls += 1
            while True:
                outcome = await self._invoke_once(
                    tool_name, arguments or {}, call_id, approval, on_progress
                )
                if isinstance(outcome, ToolOutcome):
                    break
                if outcome.arguments_digest in asked_for:
                    raise PermanentError(
                        "TOOL_APPROVAL_REJECTED",
                        f"tool {tool_name} refused the approval it asked for",
                        metadata={"tool_name": tool_name},
                    )
                asked_for.add(outcome.arguments_digest)
                approval = await self._approve(tool_name, outcome)
        await self._activity(ActivityKind.TOOL_CALL, tool_name, summary, started, done=True)
        return outcome

    async def _approve(self, tool_name: str, required: ApprovalRequest) -> ApprovalGrant:
        answer = await self._ctx.request_input(
            required.prompt or f"Allow the tool {tool_name} to run?",
            kind=InputKind.APPROVAL,
            tool_name=required.tool_name or tool_name,
            arguments_digest=required.arguments_digest,
        )
        if not answer.approved:
            why = f": {answer.comment}" if answer.comment else ""
            raise PermanentError(
                "TOOL_APPROVAL_DENIED",
                f"the call of tool {tool_name} was not approved{why}",
                code="PERMISSION_DENIED",
                metadata={"tool_name": tool_name},
            )
        return ApprovalGrant(
            request_id=answer.request_id,
            approved_by=self._ctx.info.user_id or "client",
            arguments_digest=required.arguments_digest,
            signed=answer.signed_approval,
        )

    async def _invoke_once(
        self,
        tool_name: str,
        arguments: Mapping[str, Any],
        call_id: str,
        approval: ApprovalGrant | None,
        on_progress: OnToolProgress | None,
    ) -> ToolOutcome | ApprovalRequest:
        client = ToolClient(await self._endpoint.channel())
        events = client.stream(
            tool_name,
            arguments,
            task_id=self._ctx.task_id,
            call_id=call_id,
            approval=approval,
            timeout=self._timeout(),
            metadata=self._metadata(),
        )
        try:
            async for event in events:
                if isinstance(event, ProgressUpdate):
                    if on_progress is not None:
                        maybe = on_progress(event.fraction, event.step, event.message)
                        if inspect.isawaitable(maybe):
                            await maybe
                elif isinstance(event, ErrorInfo):
                    raise ToolCallError(tool_name, event)
                else:
                    return event
        finally:
            # Ends the call now, not when the generator is garbage collected.
            closer = getattr(events, "aclose", None)
            if closer is not None:
                await closer()
        raise Unavailable(
            f"tool {tool_name} ended its stream without a result",
            reason="TOOL_STREAM_INCOMPLETE",
        )


def bind_clients(
    *,
    model: Endpoint | None,
    tools: Endpoint | None,
    default_timeout: float = 30.0,
) -> Callable[[TaskContext], None]:
    """Build the runtime's hook that gives every task context its model and tool clients.

    Args:
        model: Where the model service is (None: ``ctx.model`` is unavailable).
        tools: Where the tool service is (None: ``ctx.tools`` is unavailable).
        default_timeout: Deadline of calls made by a task that has no deadline.

    Returns:
        A :data:`~hivewire.services.agent.runtime.ClientBinder`.
    """

    def bind(ctx: TaskContext) -> None:
        ctx.bind_clients(
            model=TaskModel(ctx, model, default_timeout=default_timeout) if model else None,
            tools=TaskTools(ctx, tools, default_timeout=default_timeout) if tools else None,
        )

    return bind
