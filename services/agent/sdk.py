"""The agent SDK: an agent is a class whose capabilities are async handler methods.

```python
from hivewire.services.agent import Agent, Payload, TaskContext, capability


class Echo(Agent):
    name = "echo"
    version = "1.0.0"
    max_concurrency = 8

    @capability("echo", description="Repeats its input.")
    async def echo(self, task: Payload, ctx: TaskContext) -> str:
        await ctx.progress(0.5, "echo", "echoing")
        return task.text
```

A handler receives the task input as a :class:`Payload` and a :class:`TaskContext`
(progress, partial results, input requests, the model and tool clients, deadline,
attempt, correlation id). What it returns becomes the task's output; what it raises
is classified: :class:`RetryableError` and :class:`PermanentError` carry a reason,
any other exception becomes a permanent failure with its message. The runtime
(:mod:`hivewire.services.agent.runtime`) runs handlers; nothing here does I/O by
itself.
"""

from __future__ import annotations

import asyncio
import enum
import inspect
import json as jsonlib
import logging
import math
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, ClassVar, Protocol, TypeAlias, Unpack, overload

from hivewire.services.model.domain import Sampling
from hivewire.services.runtime.values import ErrorInfo
from hivewire.services.tool.domain import ToolInfo, ToolOutcome

if TYPE_CHECKING:
    from hivewire.common.v1 import common_pb2

__all__ = [
    "Activity",
    "ActivityKind",
    "Agent",
    "AgentCardInfo",
    "AgentError",
    "CapabilitySpec",
    "ChatInput",
    "ChatTurn",
    "ErrorInfo",
    "ExecutionSink",
    "Generation",
    "Handler",
    "InputAnswer",
    "InputKind",
    "InputRequestSpec",
    "ModelCalls",
    "ModelStream",
    "OnToolProgress",
    "Output",
    "Payload",
    "PermanentError",
    "RetryableError",
    "Sampling",
    "SubtaskError",
    "SubtaskRequest",
    "SubtaskResult",
    "SubtaskRunner",
    "TaskContext",
    "TaskInfo",
    "ToolCalls",
    "Usage",
    "capability",
    "valid_reason",
]

_CAPABILITY_ATTR = "__hivewire_capability__"
_CAPABILITY_NAME = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")
_REASON = re.compile(r"^[A-Z][A-Z0-9_]{0,62}$")


def valid_reason(value: str) -> bool:
    """Whether ``value`` is a well-formed UPPER_SNAKE_CASE error reason."""
    return bool(_REASON.match(value))


# ---------------------------------------------------------------------------------------
# Values
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Payload:
    """Typed task data: free text, a JSON object, raw bytes with a content type, or a mix.

    Attributes:
        text: Free text, for the common case of a prompt or an answer.
        json: A JSON object (``None`` when absent).
        data: Raw bytes, interpreted according to ``content_type``.
        content_type: Media type of ``data``, e.g. ``"application/pdf"``.
    """

    text: str = ""
    json: Mapping[str, Any] | None = None
    data: bytes = b""
    content_type: str = ""

    @classmethod
    def of(cls, value: Output) -> Payload:
        """Coerce a handler's return value into a payload.

        Args:
            value: ``None`` (empty), ``str`` (text), a mapping (JSON), ``bytes``
                (``application/octet-stream``) or a :class:`Payload`.

        Returns:
            The payload.

        Raises:
            TypeError: The value has none of those types.
        """
        if value is None:
            return cls()
        if isinstance(value, Payload):
            return value
        if isinstance(value, str):
            return cls(text=value)
        if isinstance(value, bytes | bytearray | memoryview):
            return cls(data=bytes(value), content_type="application/octet-stream")
        if isinstance(value, Mapping):
            return cls(json=dict(value))
        raise TypeError(
            f"cannot turn {type(value).__name__} into a task payload: "
            "return str, dict, bytes, Payload or None"
        )

    @property
    def is_empty(self) -> bool:
        """Whether nothing at all is set."""
        return not (self.text or self.json or self.data)

    def as_text(self) -> str:
        """The payload as text: ``text``, else UTF-8 ``data`` when textual, else the JSON dump.

        Returns:
            The best text rendering ("" for an empty payload).
        """
        if self.text:
            return self.text
        if self.data and (not self.content_type or self.content_type.startswith("text/")):
            return self.data.decode("utf-8", "replace")
        if self.json is not None:
            return jsonlib.dumps(self.json, ensure_ascii=False, sort_keys=True)
        return ""


Output: TypeAlias = "Payload | str | bytes | Mapping[str, Any] | None"
"""What a handler may return (see :meth:`Payload.of`)."""


@dataclass
class Usage:
    """What an attempt consumed so far; model and tool calls add to it.

    Attributes:
        prompt_tokens: Tokens sent to models.
        completion_tokens: Tokens produced by models.
        total_tokens: Their sum, as the model service counted it.
        time_to_first_token: Seconds to the first token of the first model call.
        total_time: Wall-clock seconds of the attempt.
        model_calls: Model calls made.
        tool_calls: Tool calls made.
    """

    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    time_to_first_token: float | None = None
    total_time: float = 0.0
    model_calls: int = 0
    tool_calls: int = 0

    def add_model_call(self, call: Usage) -> None:
        """Account one finished model call.

        Args:
            call: The call's own usage (tokens and time to first token).
        """
        self.prompt_tokens += call.prompt_tokens
        self.completion_tokens += call.completion_tokens
        self.total_tokens += call.total_tokens or call.prompt_tokens + call.completion_tokens
        if self.time_to_first_token is None and call.time_to_first_token is not None:
            self.time_to_first_token = call.time_to_first_token
        self.model_calls += 1

    def copy(self) -> Usage:
        """A snapshot that later calls do not change."""
        return Usage(**vars(self))


class InputKind(enum.Enum):
    """What sort of answer :meth:`TaskContext.request_input` expects."""

    TEXT = "text"
    """A free-form answer (:attr:`InputAnswer.value`)."""
    APPROVAL = "approval"
    """A yes/no decision (:attr:`InputAnswer.approved`)."""


@dataclass(frozen=True)
class InputRequestSpec:
    """A question an agent asks a person through the coordinator.

    Attributes:
        request_id: Identifies the request; the answer quotes it.
        kind: Text or approval.
        prompt: The question.
        schema: Optional JSON Schema of the expected value (text requests).
        tool_name: For tool approvals: the tool.
        arguments_digest: For tool approvals: hex SHA-256 of the canonical arguments.
    """

    request_id: str
    kind: InputKind
    prompt: str
    schema: Mapping[str, Any] | None = None
    tool_name: str = ""
    arguments_digest: str = ""


@dataclass(frozen=True)
class InputAnswer:
    """A person's answer to an input request.

    Attributes:
        request_id: The request answered.
        value: The answer, for text requests.
        approved: The decision, for approvals.
        comment: An optional reason the person gave.
        signed_approval: For approved tool calls: the coordinator's signed grant, which
            the tool service requires (opaque to the agent).
    """

    request_id: str
    value: Payload = field(default_factory=Payload)
    approved: bool = False
    comment: str = ""
    signed_approval: common_pb2.SignedApproval | None = None

    @property
    def text(self) -> str:
        """The answer as text (see :meth:`Payload.as_text`)."""
        return self.value.as_text()

    @property
    def json(self) -> Mapping[str, Any] | None:
        """The answer's JSON object, if any."""
        return self.value.json


class ActivityKind(enum.Enum):
    """What an agent called on the way to its result."""

    MODEL_CALL = "model_call"
    TOOL_CALL = "tool_call"


@dataclass(frozen=True)
class Activity:
    """One model or tool call, reported live on the Execute stream when it starts and ends.

    Attributes:
        kind: Model or tool call.
        name: The model or tool name.
        summary: A short description for people (never the prompt itself).
        started_at: When the call started (UTC).
        done: Whether the call finished.
        usage: What the call consumed, once done.
        error: Why it failed, if it did.
    """

    kind: ActivityKind
    name: str
    summary: str
    started_at: datetime
    done: bool = False
    usage: Usage | None = None
    error: ErrorInfo | None = None


# ---------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------


class AgentError(Exception):
    """A classified failure of a handler; the attempt ends with it.

    Attributes:
        reason: Stable UPPER_SNAKE reason clients and the coordinator branch on.
        message: Human-readable explanation.
        retryable: Whether another attempt (possibly on another agent) may succeed.
        code: gRPC status code name that best describes it.
        metadata: Extra string context (the failing tool, a URL...).
    """

    retryable: bool = False
    default_code: ClassVar[str] = "UNKNOWN"

    def __init__(
        self,
        reason: str,
        message: str = "",
        *,
        code: str | None = None,
        metadata: Mapping[str, str] | None = None,
    ) -> None:
        """Create the error.

        Args:
            reason: UPPER_SNAKE_CASE reason, e.g. ``"SOURCE_UNREACHABLE"``.
            message: What went wrong, for people; defaults to the reason.
            code: gRPC status code name; defaults per class.
            metadata: Extra string key/values.

        Raises:
            ValueError: The reason is not UPPER_SNAKE_CASE.
        """
        if not _REASON.match(reason):
            raise ValueError(f"reason must be UPPER_SNAKE_CASE, got {reason!r}")
        self.reason = reason
        self.message = message or reason
        self.code = code or self.default_code
        self.metadata: dict[str, str] = dict(metadata or {})
        super().__init__(self.message)

    def __str__(self) -> str:
        return f"{self.reason}: {self.message}"


class RetryableError(AgentError):
    """A transient failure: the coordinator may retry the task (on another agent)."""

    retryable = True
    default_code = "UNAVAILABLE"


class PermanentError(AgentError):
    """A failure that another attempt would repeat: the task fails at once."""

    retryable = False
    default_code = "FAILED_PRECONDITION"


# ---------------------------------------------------------------------------------------
# Sub-tasks
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SubtaskRequest:
    """One sub-task to start: a capability with its input, or a plan.

    Attributes:
        capability: The capability that runs it ("" when ``plan`` is given).
        input: Its input (anything :meth:`Payload.of` accepts).
        plan: A plan instead of a capability: a ``coordinator.v1.Plan`` or its JSON
            form (``{"steps": [{"step_id": ..., "capability": ...}], ...}``).
        priority: ``common.v1.Priority`` number; 0 inherits the service's default.
        timeout: Seconds it may take (never past the parent's deadline); None: the
            parent's remaining time.
        token_budget: Tokens it may use (never more than the parent has left); 0: what
            the parent has left.
        labels: Free-form labels.
        idempotency_key: Makes a retried handler's submission return the same sub-task.
    """

    capability: str = ""
    input: Output = None
    plan: Any = None
    priority: int = 0
    timeout: float | None = None
    token_budget: int = 0
    labels: Mapping[str, str] = field(default_factory=dict)
    idempotency_key: str = ""


@dataclass(frozen=True)
class SubtaskResult:
    """A sub-task that succeeded.

    Attributes:
        task_id: The sub-task's id.
        output: What it returned.
        usage: What it consumed.
    """

    task_id: str
    output: Payload
    usage: Usage


class SubtaskError(AgentError):
    """A sub-task did not succeed (failed, cancelled, dead-lettered or refused).

    The reason is the sub-task's own; ``metadata["subtask_id"]`` names it (when it
    was created) and ``metadata["state"]`` says how it ended.
    """

    default_code = "FAILED_PRECONDITION"


class SubtaskRunner(Protocol):
    """What a :class:`TaskContext` delegates sub-tasks to (the coordinator client)."""

    async def run(
        self, request: SubtaskRequest, *, on_event: Callable[[Any], Any] | None = ...
    ) -> SubtaskResult:
        """Submit a sub-task, follow it to its end and return its result.

        Raises:
            SubtaskError: It did not succeed.
        """
        ...


# ---------------------------------------------------------------------------------------
# Model and tool calls (``ctx.model``, ``ctx.tools``)
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Generation:
    """A finished model answer.

    Attributes:
        text: The generated text.
        finish_reason: ``stop``, ``length``, ``cancelled``, ``budget`` or ``unknown``.
        usage: What the call consumed.
        model: The model that answered, as the backend names it.
        backend: The backend that served it.
    """

    text: str
    finish_reason: str
    usage: Usage
    model: str = ""
    backend: str = ""


@dataclass(frozen=True)
class ChatTurn:
    """One chat message: ``role`` is system, user, assistant or tool."""

    role: str
    content: str
    name: str = ""


ChatInput: TypeAlias = "ChatTurn | tuple[str, str] | Mapping[str, str]"
"""A chat message as a handler may give it: a :class:`ChatTurn`, a ``(role, content)``
pair or a ``{"role": ..., "content": ...}`` mapping."""


class ModelStream:
    """Tokens of one model call as they arrive; :attr:`result` once the stream ended.

    ``async for text in ctx.model.stream(prompt): ...`` -- iterate once. Leaving the
    loop early and calling :meth:`aclose` (or cancelling the task) cancels the call.
    """

    def __init__(self, start: Callable[[ModelStream], AsyncIterator[str]]) -> None:
        self._start = start
        self._iterator: AsyncIterator[str] | None = None
        self.result: Generation | None = None

    def __aiter__(self) -> AsyncIterator[str]:
        if self._iterator is not None:
            raise RuntimeError("a model stream can be iterated only once")
        self._iterator = self._start(self)
        return self._iterator

    async def aclose(self) -> None:
        """Stop a stream that is no longer needed (cancels the call at once)."""
        closer = getattr(self._iterator, "aclose", None)
        if closer is not None:
            await closer()

    async def collect(self) -> Generation:
        """Consume the whole stream and return the finished generation."""
        async for _ in self:
            pass
        assert self.result is not None
        return self.result


class ModelCalls(Protocol):
    """What a handler can ask the model service through ``ctx.model``.

    The sampling keywords are those of
    :class:`~hivewire.services.model.domain.Sampling`: ``model``, ``temperature``,
    ``top_p``, ``max_tokens``, ``stop``, ``seed``.
    """

    def stream(
        self, prompt: str, *, system: str = ..., **sampling: Unpack[Sampling]
    ) -> ModelStream:
        """Complete a prompt, yielding text as it is generated."""
        ...

    def stream_chat(
        self, messages: Sequence[ChatInput], **sampling: Unpack[Sampling]
    ) -> ModelStream:
        """Continue a conversation, yielding the reply as it is generated."""
        ...

    async def generate(
        self, prompt: str, *, system: str = ..., **sampling: Unpack[Sampling]
    ) -> Generation:
        """Complete a prompt and return the whole answer."""
        ...

    async def chat(self, messages: Sequence[ChatInput], **sampling: Unpack[Sampling]) -> Generation:
        """Continue a conversation and return the whole reply."""
        ...

    async def embed(self, inputs: Sequence[str], *, model: str = ...) -> list[list[float]]:
        """Embed texts: one vector per input, in order."""
        ...


OnToolProgress = Callable[[float, str, str], Any]
"""Called with ``(fraction, step, message)`` for each progress report of a tool; may be async."""


class ToolCalls(Protocol):
    """What a handler can ask the tool service through ``ctx.tools``.

    As in every Protocol here, a default written ``...`` is the implementation's to choose
    (``arguments`` defaults to none, ``on_progress`` to no callback).
    """

    async def invoke(
        self,
        tool_name: str,
        arguments: Mapping[str, Any] | None = ...,
        *,
        on_progress: OnToolProgress | None = ...,
    ) -> ToolOutcome:
        """Run a tool and return its result."""
        ...

    async def list(self, name_prefix: str = ...) -> list[ToolInfo]:
        """The tools this agent may call."""
        ...


# ---------------------------------------------------------------------------------------
# Capabilities and the Agent base class
# ---------------------------------------------------------------------------------------

Handler: TypeAlias = Callable[[Payload, "TaskContext"], Awaitable[Output]]
"""A bound capability handler: ``await handler(task_input, ctx)``."""


@dataclass(frozen=True)
class CapabilitySpec:
    """A capability as declared with :func:`capability`.

    Attributes:
        name: The name tasks ask for (lower case, digits, dashes).
        description: What it does.
        input_description: What input it expects.
        output_description: What it produces.
        input_schema: Optional JSON Schema of the input's JSON object.
        output_schema: Optional JSON Schema of the output's JSON object.
        method_name: The handler method's attribute name on the agent class.
    """

    name: str
    description: str = ""
    input_description: str = ""
    output_description: str = ""
    input_schema: Mapping[str, Any] | None = None
    output_schema: Mapping[str, Any] | None = None
    method_name: str = ""


_F = Callable[..., Awaitable[Output]]


@overload
def capability(name: _F, /) -> _F: ...


@overload
def capability(
    name: str | None = None,
    /,
    *,
    description: str | None = None,
    input: str = "",
    output: str = "",
    input_schema: Mapping[str, Any] | None = None,
    output_schema: Mapping[str, Any] | None = None,
) -> Callable[[_F], _F]: ...


def capability(
    name: str | _F | None = None,
    /,
    *,
    description: str | None = None,
    input: str = "",
    output: str = "",
    input_schema: Mapping[str, Any] | None = None,
    output_schema: Mapping[str, Any] | None = None,
) -> _F | Callable[[_F], _F]:
    """Mark an ``async def handler(self, task, ctx)`` method of an :class:`Agent` as a capability.

    Usable bare (``@capability``: the name is the method name with ``_`` as ``-``) or
    with arguments (``@capability("summarize", description=...)``).

    Args:
        name: The capability name tasks ask for; lower case, digits and dashes.
        description: What it does; defaults to the first line of the docstring.
        input: What input it expects, for people.
        output: What it produces, for people.
        input_schema: Optional JSON Schema of the input's JSON object.
        output_schema: Optional JSON Schema of the output's JSON object.

    Returns:
        The method, unchanged but for a marker the :class:`Agent` class collects.

    Raises:
        ValueError: The name is not a valid capability name.
        TypeError: The method is not ``async def``.
    """

    def mark(func: _F, cap_name: str | None) -> _F:
        if not inspect.iscoroutinefunction(func):
            raise TypeError(f"capability handler {func.__qualname__} must be async def")
        final = cap_name or func.__name__.replace("_", "-")
        if not _CAPABILITY_NAME.match(final):
            raise ValueError(f"invalid capability name {final!r}: use lower case, digits, dashes")
        doc = inspect.getdoc(func) or ""
        spec = CapabilitySpec(
            name=final,
            description=description if description is not None else doc.split("\n", 1)[0],
            input_description=input,
            output_description=output,
            input_schema=input_schema,
            output_schema=output_schema,
            method_name=func.__name__,
        )
        setattr(func, _CAPABILITY_ATTR, spec)
        return func

    if callable(name):
        return mark(name, None)

    def decorator(func: _F) -> _F:
        return mark(func, name)

    return decorator


@dataclass(frozen=True)
class AgentCardInfo:
    """Who an agent is and what it can do (the agent card).

    Attributes:
        name: The agent's name.
        version: Its semantic version.
        description: What it is for.
        capabilities: Its capabilities, in declaration order.
        max_concurrency: Tasks it runs at once.
        labels: Free-form labels.
    """

    name: str
    version: str
    description: str
    capabilities: tuple[CapabilitySpec, ...]
    max_concurrency: int
    labels: Mapping[str, str]

    @property
    def capability_names(self) -> list[str]:
        """The capability names, in declaration order."""
        return [c.name for c in self.capabilities]


class Agent:
    """Base class of every agent: subclass it and decorate handlers with :func:`capability`.

    Class attributes configure the agent card; ``setup``/``teardown`` run once around
    serving, for resources a handler shares across tasks.

    Attributes:
        name: Agent name (lower case, digits, dashes); defaults to the class name.
        version: Semantic version of the agent.
        description: What the agent is for; defaults to the class docstring's first line.
        max_concurrency: Tasks run at once; the coordinator never assigns more.
        labels: Free-form labels for the card (for example the backing model).
    """

    name: ClassVar[str] = ""
    version: ClassVar[str] = "0.1.0"
    description: ClassVar[str] = ""
    max_concurrency: ClassVar[int] = 4
    labels: ClassVar[Mapping[str, str]] = {}

    _capabilities: ClassVar[dict[str, CapabilitySpec]] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        found: dict[str, CapabilitySpec] = {}
        # Walk the MRO base-first so an override in a subclass wins.
        for klass in reversed(cls.__mro__):
            for attr, value in vars(klass).items():
                spec = getattr(value, _CAPABILITY_ATTR, None)
                if isinstance(spec, CapabilitySpec):
                    found = {k: v for k, v in found.items() if v.method_name != attr}
                    if spec.name in found and found[spec.name].method_name != attr:
                        raise ValueError(
                            f"{cls.__qualname__}: capability {spec.name!r} is declared twice"
                        )
                    found[spec.name] = spec
        cls._capabilities = found

    @classmethod
    def agent_name(cls) -> str:
        """The card name: ``name``, else the class name in lower case."""
        return cls.name or cls.__name__.lower()

    @classmethod
    def capabilities(cls) -> Mapping[str, CapabilitySpec]:
        """The declared capabilities by name, in declaration order."""
        return dict(cls._capabilities)

    def card(self, *, max_concurrency: int | None = None) -> AgentCardInfo:
        """Build the agent card.

        Args:
            max_concurrency: Overrides the class's ``max_concurrency`` (a setting).

        Returns:
            The card.
        """
        doc = inspect.getdoc(type(self)) or ""
        return AgentCardInfo(
            name=self.agent_name(),
            version=self.version,
            description=self.description or doc.split("\n", 1)[0],
            capabilities=tuple(self._capabilities.values()),
            max_concurrency=max_concurrency or self.max_concurrency,
            labels=dict(self.labels),
        )

    def handler(self, capability_name: str) -> Handler | None:
        """The bound handler of a capability, or None when the agent lacks it."""
        spec = self._capabilities.get(capability_name)
        if spec is None:
            return None
        bound: Handler = getattr(self, spec.method_name)
        return bound

    async def setup(self) -> None:
        """Prepare shared resources before the first task (override when needed)."""

    async def teardown(self) -> None:
        """Release shared resources after the last task (override when needed)."""


# ---------------------------------------------------------------------------------------
# Task context
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TaskInfo:
    """What the coordinator said about the task being run.

    Attributes:
        task_id: The task.
        attempt: The attempt number, from 1.
        capability: The capability asked for.
        correlation_id: The correlation id of the work.
        deadline: When the task must be done (UTC), or None for no deadline.
        priority: The task's priority (the ``common.v1.Priority`` number).
        token_budget: Tokens the whole task may use (0: no limit).
        tokens_used: Tokens earlier attempts used.
        labels: The task's labels.
        source: The submitting client application.
        user_id: The end user, if known.
        session_id: The client's session, if any.
    """

    task_id: str
    attempt: int
    capability: str
    correlation_id: str = ""
    deadline: datetime | None = None
    priority: int = 0
    token_budget: int = 0
    tokens_used: int = 0
    labels: Mapping[str, str] = field(default_factory=dict)
    source: str = ""
    user_id: str = ""
    session_id: str = ""


class ExecutionSink(Protocol):
    """What a :class:`TaskContext` reports to; the runtime's execution implements it."""

    async def send_progress(self, fraction: float, step: str, message: str) -> None:
        """Stream a progress update."""
        ...

    async def send_partial(
        self, content: Payload, *, artifact_id: str, append: bool, last_chunk: bool, name: str
    ) -> None:
        """Stream a partial result."""
        ...

    async def ask(self, request: InputRequestSpec) -> InputAnswer:
        """Send an input request and wait for its answer."""
        ...

    async def send_activity(self, activity: Activity) -> None:
        """Stream a model or tool call activity."""
        ...


class TaskContext:
    """Everything a handler can use while it runs one attempt of one task.

    Attributes:
        task_id: The task.
        attempt: The attempt number, from 1; above 1 an earlier attempt may have done
            part of the work.
        capability: The capability asked for.
        correlation_id: The correlation id, carried on every downstream call.
        deadline: When the task must be done (UTC), or None.
        info: Everything else the coordinator said (priority, labels, budget, user).
        usage: What this attempt has consumed so far.
        logger: A logger whose records carry the task and correlation ids.
        model: The model service client, bound to this task.
        tools: The tool service client, bound to this task.
    """

    def __init__(
        self,
        info: TaskInfo,
        sink: ExecutionSink,
        *,
        logger: logging.Logger | logging.LoggerAdapter[logging.Logger],
        model: ModelCalls | None = None,
        tools: ToolCalls | None = None,
    ) -> None:
        """Create the context (the runtime does this for each attempt).

        Args:
            info: The task's assignment.
            sink: Where progress, partials and input requests go.
            logger: The logger handlers should use.
            model: The bound model client (None when the agent has no model service).
            tools: The bound tool client (None when the agent has no tool service).
        """
        self.info = info
        self.task_id = info.task_id
        self.attempt = info.attempt
        self.capability = info.capability
        self.correlation_id = info.correlation_id
        self.deadline = info.deadline
        self.usage = Usage()
        self.logger = logger
        self._sink = sink
        self._model = model
        self._tools = tools
        self._subtasks: SubtaskRunner | None = None
        self._started = time.monotonic()
        self._request_seq = 0

    @property
    def model(self) -> ModelCalls:
        """The model service client; every call carries this task's deadline and budget.

        Raises:
            RuntimeError: The agent runs without a model service.
        """
        if self._model is None:
            raise RuntimeError("this agent runs without a model service (no model client)")
        return self._model

    @property
    def tools(self) -> ToolCalls:
        """The tool service client; every call carries this task's deadline and ids.

        Raises:
            RuntimeError: The agent runs without a tool service.
        """
        if self._tools is None:
            raise RuntimeError("this agent runs without a tool service (no tool client)")
        return self._tools

    def bind_clients(self, *, model: ModelCalls | None, tools: ToolCalls | None) -> None:
        """Attach the task-bound clients (the runtime does this once).

        Args:
            model: The model client (``clients.TaskModel``) or None.
            tools: The tool client (``clients.TaskTools``) or None.
        """
        self._model = model
        self._tools = tools

    def bind_subtasks(self, runner: SubtaskRunner | None) -> None:
        """Attach the coordinator client that runs sub-tasks (the runtime does this)."""
        self._subtasks = runner

    async def subtask(
        self,
        capability: str = "",
        input: Output = None,
        *,
        plan: Any = None,
        priority: int = 0,
        timeout: float | None = None,  # noqa: ASYNC109 - the sub-task's own deadline
        token_budget: int = 0,
        labels: Mapping[str, str] | None = None,
        idempotency_key: str = "",
        on_event: Callable[[Any], Any] | None = None,
    ) -> SubtaskResult:
        """Delegate part of the work: run a sub-task on another agent and await it.

        The sub-task is submitted on this agent's identity with this task as its
        parent: it carries this task's correlation id, ends no later than this task's
        deadline, spends at most what is left of its token budget, and is cancelled
        when this task ends. Cancelling this handler cancels it too.

        Args:
            capability: The capability that runs it (or give ``plan``).
            input: Its input.
            plan: A plan instead of a capability (see :class:`SubtaskRequest`).
            priority: ``Priority`` number (0: default).
            timeout: Seconds it may take (None: the rest of this task's time).
            token_budget: Tokens it may use (0: what this task has left).
            labels: Free-form labels.
            idempotency_key: Makes a retried handler find its earlier sub-task.
            on_event: Called with every ``coordinator.v1.TaskEvent`` of the sub-task as
                it arrives (may be async): stream its progress and partials.

        Returns:
            The sub-task's output and usage.

        Raises:
            SubtaskError: It failed, was cancelled or was refused (for example
                ``SUBTASK_DEPTH_EXCEEDED``, or ``INVALID_ARGUMENT`` for a bad plan).
            RuntimeError: The agent runs without a coordinator client.
        """
        request = SubtaskRequest(
            capability=capability,
            input=input,
            plan=plan,
            priority=priority,
            timeout=timeout,
            token_budget=token_budget,
            labels=dict(labels or {}),
            idempotency_key=idempotency_key,
        )
        return await self._delegate(request, on_event)

    async def fan_out(self, requests: list[SubtaskRequest]) -> list[SubtaskResult]:
        """Run several sub-tasks in parallel and return their results in order.

        If one fails, the others are cancelled and its :class:`SubtaskError` is raised.
        """
        try:
            async with asyncio.TaskGroup() as group:
                running = [group.create_task(self._delegate(r, None)) for r in requests]
        except BaseExceptionGroup as failed:
            raise failed.exceptions[0] from None
        return [task.result() for task in running]

    async def _delegate(
        self, request: SubtaskRequest, on_event: Callable[[Any], Any] | None
    ) -> SubtaskResult:
        if self._subtasks is None:
            raise RuntimeError("this agent runs without a coordinator client (no sub-tasks)")
        return await self._subtasks.run(request, on_event=on_event)

    def time_remaining(self) -> float | None:
        """Seconds until the deadline (never negative), or None without a deadline."""
        if self.deadline is None:
            return None
        return max(0.0, (self.deadline - datetime.now(UTC)).total_seconds())

    def tokens_remaining(self) -> int | None:
        """Tokens this task may still use, or None when it has no budget."""
        if self.info.token_budget <= 0:
            return None
        spent = self.info.tokens_used + self.usage.total_tokens
        return max(0, self.info.token_budget - spent)

    def elapsed(self) -> float:
        """Seconds since this attempt started."""
        return time.monotonic() - self._started

    async def progress(self, fraction: float, step: str = "", message: str = "") -> None:
        """Report how far the task has got.

        Args:
            fraction: Completed fraction in [0, 1].
            step: Short machine-friendly step name, e.g. ``"search"``.
            message: Human-readable detail.

        Raises:
            ValueError: ``fraction`` is outside [0, 1].
        """
        if not (math.isfinite(fraction) and 0.0 <= fraction <= 1.0):
            raise ValueError(f"progress fraction must be within [0, 1], got {fraction!r}")
        await self._sink.send_progress(float(fraction), step, message)

    async def partial(
        self,
        content: Output,
        *,
        artifact_id: str = "output",
        append: bool = True,
        last_chunk: bool = False,
        name: str = "",
    ) -> None:
        """Stream a chunk of output before the task finishes.

        Chunks with the same ``artifact_id`` form one artifact, in order. Awaiting this
        applies back-pressure when the coordinator reads slower than the handler writes.

        Args:
            content: The chunk (anything :meth:`Payload.of` accepts).
            artifact_id: Which artifact the chunk belongs to.
            append: Append to the artifact (True) or replace it (False).
            last_chunk: Whether this is the artifact's last chunk.
            name: Optional human-readable artifact name.
        """
        await self._sink.send_partial(
            Payload.of(content),
            artifact_id=artifact_id,
            append=append,
            last_chunk=last_chunk,
            name=name,
        )

    async def request_input(
        self,
        prompt: str,
        *,
        kind: InputKind | str = InputKind.TEXT,
        schema: Mapping[str, Any] | None = None,
        tool_name: str = "",
        arguments_digest: str = "",
    ) -> InputAnswer:
        """Pause until a person answers a question (the task shows input-required).

        The request goes to the coordinator on the Execute stream; the answer comes
        back on it. The wait ends early only by cancellation or the deadline.

        Args:
            prompt: The question.
            kind: ``InputKind.TEXT`` (or ``"text"``) for a free answer,
                ``InputKind.APPROVAL`` (``"approval"``) for a yes/no decision.
            schema: Optional JSON Schema of the expected value (text requests).
            tool_name: For tool approvals: the tool's name.
            arguments_digest: For tool approvals: the arguments' digest.

        Returns:
            The answer.
        """
        self._request_seq += 1
        spec = InputRequestSpec(
            request_id=f"{self.task_id}-{self.attempt}-input-{self._request_seq}",
            kind=InputKind(kind),
            prompt=prompt,
            schema=schema,
            tool_name=tool_name,
            arguments_digest=arguments_digest,
        )
        return await self._sink.ask(spec)

    async def report_activity(self, activity: Activity) -> None:
        """Stream an activity record (used by the model and tool clients)."""
        await self._sink.send_activity(activity)
