"""Protobuf <-> domain conversion and request validation for the model service."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import TYPE_CHECKING

from google.protobuf import timestamp_pb2

from hivewire.common.v1 import common_pb2
from hivewire.events.v1 import events_pb2
from hivewire.model.v1 import model_pb2
from hivewire.services.model.backends.base import ChatTurn, Role, SamplingParams
from hivewire.services.model.domain import (
    Completion,
    Embeddings,
    GenerationCall,
    ModelListing,
    Sampling,
    Usage,
)
from hivewire.services.runtime import metadata as md
from hivewire.services.runtime.convert import duration, same_named
from hivewire.services.runtime.errors import FieldViolation, HivewireError, InvalidArgument

if TYPE_CHECKING:
    from hivewire.services.model.router import Route

MAX_STOP_SEQUENCES = 8
MAX_MODEL_NAME = 256
MAX_EMBED_INPUTS = 2048

_ROLES: dict[int, Role] = {
    model_pb2.CHAT_ROLE_SYSTEM: "system",
    model_pb2.CHAT_ROLE_USER: "user",
    model_pb2.CHAT_ROLE_ASSISTANT: "assistant",
    model_pb2.CHAT_ROLE_TOOL: "tool",
}

_ROLE_VALUES: dict[str, model_pb2.ChatRole.ValueType] = {
    name: model_pb2.ChatRole.ValueType(value) for value, name in _ROLES.items()
}

_FINISH = {
    "stop": model_pb2.FINISH_REASON_STOP,
    "length": model_pb2.FINISH_REASON_LENGTH,
    "cancelled": model_pb2.FINISH_REASON_CANCELLED,
    "budget": model_pb2.FINISH_REASON_BUDGET,
}
_FINISH_NAMES: dict[int, str] = {value: name for name, value in _FINISH.items()}


# -- requests -----------------------------------------------------------------------------


def _params(
    params: model_pb2.GenerationParams,
    prefix: str,
    max_output_tokens: int,
    bad: list[FieldViolation],
) -> SamplingParams:
    temperature = params.temperature if params.HasField("temperature") else None
    top_p = params.top_p if params.HasField("top_p") else None
    seed = params.seed if params.HasField("seed") else None
    if temperature is not None and not (math.isfinite(temperature) and 0.0 <= temperature <= 2.0):
        bad.append(FieldViolation(f"{prefix}.temperature", "must be between 0 and 2"))
    if top_p is not None and not (math.isfinite(top_p) and 0.0 < top_p <= 1.0):
        bad.append(FieldViolation(f"{prefix}.top_p", "must be greater than 0 and at most 1"))
    if params.max_tokens > max_output_tokens:
        bad.append(FieldViolation(f"{prefix}.max_tokens", f"must be at most {max_output_tokens}"))
    if len(params.stop) > MAX_STOP_SEQUENCES:
        bad.append(FieldViolation(f"{prefix}.stop", f"at most {MAX_STOP_SEQUENCES} sequences"))
    for index, stop in enumerate(params.stop):
        if not stop:
            bad.append(FieldViolation(f"{prefix}.stop[{index}]", "must not be empty"))
    return SamplingParams(
        temperature=temperature,
        top_p=top_p,
        max_tokens=params.max_tokens or None,
        stop=tuple(params.stop),
        seed=seed,
    )


def _model_violations(model: str) -> list[FieldViolation]:
    """The violations list of a request, started with its model name's."""
    if len(model) > MAX_MODEL_NAME:
        return [FieldViolation("model", f"at most {MAX_MODEL_NAME} characters")]
    return []


def chat_from_proto(request: model_pb2.ChatRequest, *, max_output_tokens: int) -> GenerationCall:
    """Validate a ChatRequest and turn it into a :class:`GenerationCall`.

    Raises:
        InvalidArgument: With one field violation per problem.
    """
    bad = _model_violations(request.model)
    if not request.messages:
        bad.append(FieldViolation("messages", "at least one message is required"))
    turns: list[ChatTurn] = []
    for index, message in enumerate(request.messages):
        role = _ROLES.get(message.role)
        if role is None:
            bad.append(FieldViolation(f"messages[{index}].role", "must be set to a known role"))
            continue
        turns.append(ChatTurn(role=role, content=message.content, name=message.name))
    if request.messages and not any(m.content.strip() for m in request.messages):
        bad.append(FieldViolation("messages", "every message is empty"))
    params = _params(request.params, "params", max_output_tokens, bad)
    if bad:
        raise InvalidArgument(violations=bad)
    return GenerationCall(
        operation="chat", model=request.model, messages=tuple(turns), params=params
    )


def generate_from_proto(
    request: model_pb2.GenerateRequest, *, max_output_tokens: int
) -> GenerationCall:
    """Validate a GenerateRequest and turn it into a :class:`GenerationCall`.

    Raises:
        InvalidArgument: With one field violation per problem.
    """
    bad = _model_violations(request.model)
    if not request.prompt.strip():
        bad.append(FieldViolation("prompt", "is required"))
    params = _params(request.params, "params", max_output_tokens, bad)
    if bad:
        raise InvalidArgument(violations=bad)
    turns = [ChatTurn("system", request.system)] if request.system else []
    turns.append(ChatTurn("user", request.prompt))
    return GenerationCall(
        operation="generate",
        model=request.model,
        messages=tuple(turns),
        params=params,
        prompt=request.prompt,
        system=request.system,
    )


def embed_from_proto(request: model_pb2.EmbedRequest) -> list[str]:
    """Validate an EmbedRequest and return its inputs.

    Raises:
        InvalidArgument: With one field violation per problem.
    """
    bad = _model_violations(request.model)
    if not request.inputs:
        bad.append(FieldViolation("inputs", "at least one input is required"))
    if len(request.inputs) > MAX_EMBED_INPUTS:
        bad.append(FieldViolation("inputs", f"at most {MAX_EMBED_INPUTS} inputs"))
    for index, text in enumerate(request.inputs):
        if not text.strip():
            bad.append(FieldViolation(f"inputs[{index}]", "must not be empty"))
    if bad:
        raise InvalidArgument(violations=bad)
    return list(request.inputs)


def token_budget(metadata: Iterable[tuple[str, str | bytes]] | None) -> int | None:
    """Read ``x-hivewire-token-budget`` from call metadata.

    Returns:
        The remaining tokens, or None when absent or ``0`` (no limit).

    Raises:
        InvalidArgument: The value is not a non-negative integer.
    """
    for key, value in metadata or ():
        if key != md.TOKEN_BUDGET:
            continue
        text = value.decode() if isinstance(value, bytes) else value
        try:
            budget = int(text.strip())
        except ValueError:
            budget = -1
        if budget < 0:
            raise InvalidArgument(
                violations=[FieldViolation(md.TOKEN_BUDGET, "must be a non-negative integer")]
            )
        return budget or None
    return None


def metadata_value(metadata: Iterable[tuple[str, str | bytes]] | None, key: str) -> str:
    """The first text value of ``key`` in call metadata ("" when absent)."""
    for name, value in metadata or ():
        if name == key and isinstance(value, str):
            return value
    return ""


# -- responses ----------------------------------------------------------------------------


#: The token counts a call's usage and ``common.v1.Usage`` call the same.
_TOKEN_COUNTS = ("prompt_tokens", "completion_tokens", "total_tokens")


def usage_to_proto(usage: Usage, *, model_calls: int = 1) -> common_pb2.Usage:
    """The common Usage message for one call."""
    message = common_pb2.Usage(
        **same_named(usage, _TOKEN_COUNTS),
        total_time=duration(usage.total_time),
        model_calls=model_calls,
    )
    if usage.time_to_first_token is not None:
        message.time_to_first_token.CopyFrom(duration(usage.time_to_first_token))
    return message


def completion_to_proto(completion: Completion) -> model_pb2.Completion:
    """The Completion message ending a stream."""
    return model_pb2.Completion(
        finish_reason=_FINISH[completion.finish_reason],
        usage=usage_to_proto(completion.usage),
        model=completion.model,
        backend=completion.backend,
    )


def chat_response(sequence: int, item: str | Completion) -> model_pb2.ChatResponse:
    """One ChatResponse of a stream: text or the final completion."""
    if isinstance(item, str):
        return model_pb2.ChatResponse(sequence=sequence, chunk=model_pb2.TokenChunk(text=item))
    return model_pb2.ChatResponse(sequence=sequence, done=completion_to_proto(item))


def generate_response(sequence: int, item: str | Completion) -> model_pb2.GenerateResponse:
    """One GenerateResponse of a stream: text or the final completion."""
    if isinstance(item, str):
        return model_pb2.GenerateResponse(sequence=sequence, chunk=model_pb2.TokenChunk(text=item))
    return model_pb2.GenerateResponse(sequence=sequence, done=completion_to_proto(item))


def embed_response(result: Embeddings) -> model_pb2.EmbedResponse:
    """The EmbedResponse for an embedding result."""
    return model_pb2.EmbedResponse(
        embeddings=[model_pb2.Embedding(values=vector) for vector in result.vectors],
        model=result.model,
        usage=usage_to_proto(result.usage),
    )


def error_detail(err: HivewireError) -> common_pb2.ErrorDetail:
    """The ErrorDetail message for a domain error."""
    return common_pb2.ErrorDetail(
        code=err.code.name,
        reason=err.reason,
        message=err.message,
        retryable=err.retryable,
        metadata=err.metadata,
    )


def listing_to_proto(listing: ModelListing) -> model_pb2.ListModelsResponse:
    """The ListModelsResponse for a listing."""
    response = model_pb2.ListModelsResponse()
    for model in listing.models:
        info = response.models.add(
            name=model.entry.name,
            backend=model.backend,
            is_default=model.is_default,
            supports_embeddings=bool(model.entry.supports_embeddings),
            size_bytes=model.entry.size_bytes or 0,
        )
        if model.entry.modified_at is not None:
            stamp = timestamp_pb2.Timestamp()
            stamp.FromDatetime(model.entry.modified_at)
            info.modified_at.CopyFrom(stamp)
    for state in listing.backends:
        status = response.backends.add(
            backend=state.backend, available=state.available, circuit_open=state.circuit_open
        )
        if state.error is not None:
            status.error.CopyFrom(error_detail(state.error))
    return response


def model_event(
    request_id: str,
    route: Route,
    task_id: str,
    operation: str,
    *,
    usage: Usage | None = None,
    error: HivewireError | None = None,
    cancelled: bool = False,
) -> events_pb2.ModelEventData:
    """The data of a ``model.*`` event."""
    data = events_pb2.ModelEventData(
        request_id=request_id,
        model=route.requested,
        backend=route.backend,
        task_id=task_id,
        operation=operation,
    )
    if usage is not None:
        data.usage.CopyFrom(usage_to_proto(usage))
    if error is not None:
        data.error.CopyFrom(error_detail(error))
    elif cancelled:
        data.error.CopyFrom(
            common_pb2.ErrorDetail(
                code="CANCELLED", reason="CANCELLED", message="the caller cancelled the call"
            )
        )
    return data


def generation_params(sampling: Sampling) -> model_pb2.GenerationParams:
    """The GenerationParams of a request (the ``model`` key goes on the request itself)."""
    params = model_pb2.GenerationParams(
        max_tokens=sampling.get("max_tokens", 0), stop=list(sampling.get("stop", ()))
    )
    temperature = sampling.get("temperature")
    if temperature is not None:
        params.temperature = temperature
    top_p = sampling.get("top_p")
    if top_p is not None:
        params.top_p = top_p
    seed = sampling.get("seed")
    if seed is not None:
        params.seed = seed
    return params


def chat_message(role: str, content: str, name: str = "") -> model_pb2.ChatMessage:
    """A ChatMessage from a role name (``system``, ``user``, ``assistant`` or ``tool``).

    Raises:
        ValueError: An unknown role.
    """
    value = _ROLE_VALUES.get(role)
    if value is None:
        raise ValueError(f"unknown chat role {role!r}: use one of {', '.join(_ROLE_VALUES)}")
    return model_pb2.ChatMessage(role=value, content=content, name=name)


def finish_reason_name(value: int) -> str:
    """``stop``, ``length``, ``cancelled`` or ``budget`` for a FinishReason (else ``unknown``)."""
    return _FINISH_NAMES.get(value, "unknown")
