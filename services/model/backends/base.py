"""What every backend implements, the values it exchanges, and its errors.

A backend turns one request into an async stream of :class:`TextDelta` ending with
one :class:`StreamEnd`. It knows nothing about gRPC, budgets or metrics: the
service does that. Backends raise the shared domain errors; the helpers below turn
HTTP failures into them so every HTTP backend reports them the same way.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import AsyncGenerator, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Literal, Protocol

import httpx

from hivewire.services.runtime.errors import (
    FailedPrecondition,
    FieldViolation,
    HivewireError,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    Unavailable,
)

logger = logging.getLogger(__name__)

Role = Literal["system", "user", "assistant", "tool"]
FinishKind = Literal["stop", "length"]

BODY_SUMMARY_CHARS = 300
"""How much of a backend's error body travels in the status details."""


@dataclass(frozen=True)
class ChatTurn:
    """One message of a conversation.

    Attributes:
        role: Who said it.
        content: What was said.
        name: Optional speaker or tool name.
    """

    role: Role
    content: str
    name: str = ""


@dataclass(frozen=True)
class SamplingParams:
    """Sampling options; None leaves the backend's default.

    Attributes:
        temperature: In [0, 2].
        top_p: In (0, 1].
        max_tokens: Most tokens to produce (already capped by the service's budget rule).
        stop: Stop sequences.
        seed: Sampling seed.
    """

    temperature: float | None = None
    top_p: float | None = None
    max_tokens: int | None = None
    stop: tuple[str, ...] = ()
    seed: int | None = None


@dataclass(frozen=True)
class TextDelta:
    """Text produced since the previous delta.

    Attributes:
        text: The text.
        tokens: How many tokens produced it, as far as the backend knows (streaming
            APIs send about one token per frame).
    """

    text: str
    tokens: int = 1


@dataclass(frozen=True)
class StreamEnd:
    """The end of a generation.

    Attributes:
        finish: ``stop`` (answer complete or stop sequence) or ``length`` (max tokens).
        model: The model that answered, as the backend names it.
        prompt_tokens: Prompt tokens counted by the backend, if it reports them.
        completion_tokens: Produced tokens counted by the backend, if it reports them.
    """

    finish: FinishKind
    model: str
    prompt_tokens: int | None = None
    completion_tokens: int | None = None


StreamItem = TextDelta | StreamEnd


@dataclass(frozen=True)
class EmbedResult:
    """Vectors for a list of texts.

    Attributes:
        vectors: One vector per input, in order.
        model: The model that answered.
        prompt_tokens: Tokens read, if the backend reports them.
    """

    vectors: list[list[float]]
    model: str
    prompt_tokens: int | None = None


@dataclass(frozen=True)
class ModelEntry:
    """One model a backend offers.

    Attributes:
        name: The name to ask for.
        supports_embeddings: Whether it can embed (None: not known).
        modified_at: When the backend last changed it.
        size_bytes: Its size.
    """

    name: str
    supports_embeddings: bool | None = None
    modified_at: datetime | None = None
    size_bytes: int | None = None


@dataclass(frozen=True)
class GenerationRequest:
    """One chat or generate call as a backend sees it.

    Generate calls carry their prompt and system text and also the same as a
    conversation (optional system turn + one user turn), so a backend without a
    native completion endpoint applies the model's chat template to them, the way
    Ollama's ``/api/generate`` does.

    Attributes:
        model: The upstream model name.
        messages: The conversation.
        params: Sampling options.
        timeout: Seconds the whole call may take.
        operation: ``chat`` or ``generate``.
        prompt: For ``generate``: the prompt.
        system: For ``generate``: the system text (may be empty).
    """

    model: str
    messages: Sequence[ChatTurn]
    params: SamplingParams = field(default_factory=SamplingParams)
    timeout: float = 300.0
    operation: Literal["chat", "generate"] = "chat"
    prompt: str = ""
    system: str = ""


class Backend(Protocol):
    """A model backend."""

    name: str
    """Short name used in routes, metrics and responses (``ollama``...)."""

    def stream(self, request: GenerationRequest) -> AsyncGenerator[StreamItem, None]:
        """Generate: deltas as they are produced, then exactly one :class:`StreamEnd`.

        Closing the iterator early (``aclose``, or cancelling the consumer) must abort
        the work upstream: close the HTTP request, stop the generating thread.
        """
        ...

    async def embed(self, model: str, inputs: Sequence[str], *, time_limit: float) -> EmbedResult:
        """Embed each input."""
        ...

    async def list_models(self, *, time_limit: float) -> list[ModelEntry]:
        """The models this backend offers."""
        ...

    async def aclose(self) -> None:
        """Release connections, threads and models."""
        ...


# -- errors ------------------------------------------------------------------------


class BackendUnavailable(Unavailable):
    """A backend could not be reached, failed (5xx) or broke off a stream.

    These, and only these, count as failures for the backend's circuit breaker.
    """

    reason = "MODEL_BACKEND_UNAVAILABLE"


def is_backend_failure(exc: BaseException) -> bool:
    """Whether an exception means the backend itself is failing (breaker verdict)."""
    return isinstance(exc, BackendUnavailable)


def summarize_body(body: bytes | str, limit: int = BODY_SUMMARY_CHARS) -> str:
    """A short, single-line summary of an error body: the ``error`` text of JSON
    bodies (``{"error": "..."}`` or ``{"error": {"message": "..."}}``), else the text.
    """
    text = body.decode("utf-8", "replace") if isinstance(body, bytes) else body
    try:
        parsed = json.loads(text)
    except ValueError:
        parsed = None
    if isinstance(parsed, dict):
        error = parsed.get("error", parsed.get("detail", parsed.get("message")))
        if isinstance(error, dict):
            error = error.get("message", error)
        if error is not None:
            text = error if isinstance(error, str) else json.dumps(error)
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _parse_retry_after(value: str | None) -> float | None:
    if value is None:
        return None
    try:
        seconds = float(value)
    except ValueError:
        return None
    return seconds if math.isfinite(seconds) and seconds >= 0 else None


def http_error(
    backend: str,
    model: str,
    status: int,
    body: bytes | str,
    *,
    retry_after: float,
    retry_after_header: str | None = None,
) -> HivewireError:
    """Turn a backend's HTTP error response into the domain error to send back.

    404 -> NOT_FOUND (the model); 400/422 -> INVALID_ARGUMENT; 401/403 ->
    FAILED_PRECONDITION (our credentials are wrong, not the caller's request); 429 ->
    RESOURCE_EXHAUSTED; 5xx, 408 and anything else -> UNAVAILABLE. The body summary
    and status travel in ``ErrorInfo.metadata`` so nothing the backend said is lost.
    """
    summary = summarize_body(body)
    meta = {"backend": backend, "model": model, "http_status": str(status), "body": summary}
    message = f"{backend} answered HTTP {status}: {summary}"
    if status == 404:
        return NotFound("model", model, message, reason="MODEL_NOT_FOUND", metadata=meta)
    if status in (400, 413, 422):
        return InvalidArgument(
            message,
            [FieldViolation("request", f"{backend} rejected it: {summary}")],
            reason="MODEL_BACKEND_REJECTED",
            metadata=meta,
        )
    if status in (401, 403):
        return FailedPrecondition(message, reason="MODEL_BACKEND_AUTH", metadata=meta)
    header_delay = _parse_retry_after(retry_after_header)
    if status == 429:
        return ResourceExhausted(
            message,
            [(f"backend:{backend}", summary or "rate limited")],
            header_delay if header_delay is not None else retry_after,
            reason="MODEL_BACKEND_RATE_LIMITED",
            metadata=meta,
        )
    return BackendUnavailable(
        message, header_delay if header_delay is not None else retry_after, metadata=meta
    )


def transport_error(backend: str, exc: Exception, *, retry_after: float) -> BackendUnavailable:
    """Turn a connection failure, timeout or broken stream into ``UNAVAILABLE``."""
    kind = type(exc).__name__
    detail = str(exc) or kind
    return BackendUnavailable(
        f"{backend} backend unreachable or broke off: {kind}: {detail}",
        retry_after,
        metadata={"backend": backend, "error": kind},
    )


def timeouts(connect: float, total: float) -> httpx.Timeout:
    """Httpx timeouts for one call: connect within ``connect`` and the caller's time,
    and no read, write or pool wait longer than the caller's remaining time.
    """
    total = max(total, 0.001)
    return httpx.Timeout(total, connect=min(connect, total))


TOKENS_PER_MESSAGE = 4
"""Estimated template overhead of one chat message, in tokens."""


def estimate_tokens(text: str) -> int:
    """Hivewire's token estimate where no tokenizer is at hand: one token per four
    characters, rounded up (the usual rule of thumb for English BPE vocabularies).
    """
    return math.ceil(len(text) / 4) if text else 0


def estimate_prompt_tokens(messages: Sequence[ChatTurn]) -> int:
    """Estimated prompt tokens of a conversation: its text plus
    :data:`TOKENS_PER_MESSAGE` per message for the chat template.
    """
    return sum(estimate_tokens(turn.content) + TOKENS_PER_MESSAGE for turn in messages)


def last_user_text(messages: Sequence[ChatTurn]) -> str:
    """The content of the last user turn (empty when there is none)."""
    for turn in reversed(messages):
        if turn.role == "user":
            return turn.content
    return ""
