"""Values the model service's domain takes and returns (no gRPC, no protobuf)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal, TypedDict

from hivewire.services.model.backends.base import ChatTurn, ModelEntry, SamplingParams
from hivewire.services.runtime.errors import HivewireError

FinishReason = Literal["stop", "length", "budget", "cancelled"]
Operation = Literal["chat", "generate"]


class Sampling(TypedDict, total=False):
    """What a caller asks a Chat or Generate call for: the model and how to sample.

    Every key is optional; an absent one leaves the service's or the backend's default.
    The callers' signatures take these as keywords (``client.chat(messages,
    temperature=0.2)``, ``ctx.model.stream(prompt, max_tokens=200)``) or, gathered,
    as one value (``ctx.model.stream(prompt, **sampling)``). The service validates
    them into :class:`GenerationCall` (model) and ``SamplingParams`` (the rest).

    Attributes:
        model: Model name; "" for the service's default.
        temperature: Sampling temperature in [0, 2].
        top_p: Nucleus sampling in (0, 1].
        max_tokens: Most tokens to produce; 0 for the backend's default.
        stop: Stop sequences.
        seed: Sampling seed, for reproducible answers.
    """

    model: str
    temperature: float | None
    top_p: float | None
    max_tokens: int
    stop: Sequence[str]
    seed: int | None


@dataclass(frozen=True)
class CallInfo:
    """Who is calling and within what limits.

    Attributes:
        task_id: The task the call is made for ("" when none).
        correlation_id: The correlation id ("" when none).
        token_budget: Tokens the task may still spend; None means no limit.
        timeout: Seconds the caller still waits; None means no deadline.
    """

    task_id: str = ""
    correlation_id: str = ""
    token_budget: int | None = None
    timeout: float | None = None


@dataclass(frozen=True)
class GenerationCall:
    """A validated Chat or Generate request.

    Attributes:
        operation: ``chat`` or ``generate``.
        model: Requested model ("" for the default).
        messages: The conversation (for generate: optional system + the prompt).
        params: Sampling options; ``max_tokens`` None means the backend's default.
        prompt: For generate: the prompt.
        system: For generate: the system text.
    """

    operation: Operation
    model: str
    messages: tuple[ChatTurn, ...]
    params: SamplingParams = field(default_factory=SamplingParams)
    prompt: str = ""
    system: str = ""


@dataclass(frozen=True)
class Usage:
    """What one call consumed.

    Attributes:
        prompt_tokens: Tokens read.
        completion_tokens: Tokens produced.
        time_to_first_token: Seconds to the first text, when there was any.
        total_time: Seconds of the whole call.
    """

    prompt_tokens: int
    completion_tokens: int
    time_to_first_token: float | None
    total_time: float

    @property
    def total_tokens(self) -> int:
        """Prompt plus completion tokens."""
        return self.prompt_tokens + self.completion_tokens


@dataclass(frozen=True)
class Completion:
    """The end of a generation.

    Attributes:
        finish_reason: Why it stopped.
        usage: What it consumed.
        model: The model that answered, as the backend names it.
        backend: The backend that served it.
    """

    finish_reason: FinishReason
    usage: Usage
    model: str
    backend: str


@dataclass(frozen=True)
class Embeddings:
    """Result of an Embed call.

    Attributes:
        vectors: One per input.
        model: The model that answered.
        usage: What it consumed.
    """

    vectors: list[list[float]]
    model: str
    usage: Usage


@dataclass(frozen=True)
class ListedModel:
    """One model in a ListModels answer.

    Attributes:
        backend: Who serves it.
        entry: What the backend said about it.
        is_default: Whether unnamed requests get it.
    """

    backend: str
    entry: ModelEntry
    is_default: bool


@dataclass(frozen=True)
class BackendState:
    """How one backend answered ListModels.

    Attributes:
        backend: Its name.
        available: Whether it answered.
        error: Why not.
        circuit_open: Whether its breaker rejects calls.
    """

    backend: str
    available: bool
    error: HivewireError | None
    circuit_open: bool


@dataclass(frozen=True)
class ModelListing:
    """The ListModels answer."""

    models: list[ListedModel]
    backends: list[BackendState]
