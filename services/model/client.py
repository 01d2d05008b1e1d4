"""A small typed client of the model service, for agents and tools.

Example::

    client = ModelClient(channel)             # a long-lived channel from runtime.channels
    stream = client.chat([("user", "Summarise this...")], task_id=task_id,
                         token_budget=remaining, timeout=remaining_seconds)
    async for item in stream:
        if isinstance(item, str):
            print(item, end="")                # text as it is produced
        else:
            usage = item.usage                 # the final Completion
    # or: text = await client.chat(...).text(); stream.completion

Every call carries the task id, token budget, attempt and correlation id as call
metadata and the caller's deadline as its timeout. Failures raise the
:class:`~hivewire.services.runtime.errors.HivewireError` the service raised
(``reason`` tells ``TOKEN_BUDGET_EXCEEDED`` from ``MODEL_NOT_FOUND``...). Leaving the
iteration early (``break``, cancellation) cancels the call, which aborts the
backend's generation.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncGenerator, Sequence
from typing import Any, TypedDict, Unpack

import grpc

from hivewire.model.v1 import model_pb2, model_pb2_grpc
from hivewire.services.base.keywords import check_keywords
from hivewire.services.model.convert import chat_message, generation_params
from hivewire.services.model.domain import Sampling
from hivewire.services.runtime import metadata as md
from hivewire.services.runtime.logging import correlation_id_var
from hivewire.services.runtime.status import from_rpc_error

logger = logging.getLogger(__name__)

Message = model_pb2.ChatMessage | tuple[str, str]
"""A chat message: the proto message or ``(role, content)`` with role system, user,
assistant or tool."""

StreamItem = str | model_pb2.Completion


class CompletionStream:
    """One streaming Chat or Generate call: text chunks, then the final Completion.

    Iterate it once. After the iteration, :attr:`completion` holds the Completion.
    """

    def __init__(self, call: Any) -> None:
        """Wrap a started ``grpc.aio`` unary-stream call."""
        self._call = call
        self.completion: model_pb2.Completion | None = None
        """The final Completion, once received."""

    def __aiter__(self) -> AsyncGenerator[StreamItem, None]:
        """Iterate text chunks (``str``) and, last, the ``Completion``."""
        return self._iterate()

    async def _iterate(self) -> AsyncGenerator[StreamItem, None]:
        try:
            async for response in self._call:
                kind = response.WhichOneof("kind")
                if kind == "chunk":
                    yield response.chunk.text
                elif kind == "done":
                    self.completion = response.done
                    yield response.done
        except grpc.aio.AioRpcError as err:
            raise from_rpc_error(err) from None
        finally:
            # Stopped early (break, cancel, error): tell the service so it stops the backend.
            if not self._call.done():
                self._call.cancel()

    async def text(self) -> str:
        """Consume the stream and return the whole text (:attr:`completion` is set)."""
        parts = [item async for item in self if isinstance(item, str)]
        return "".join(parts)

    def cancel(self) -> None:
        """Cancel the call (the service aborts the generation)."""
        self._call.cancel()


class CallScope(TypedDict, total=False):
    """The task a call is made for and its limits, sent as call metadata and deadline.

    Attributes:
        task_id: The task the call is for.
        token_budget: Tokens the task may still spend (absent or None: no limit).
        correlation_id: Defaults to the current correlation id.
        attempt: The task attempt, if known.
        timeout: Seconds the call may take (pass the task's remaining time).
    """

    task_id: str
    token_budget: int | None
    correlation_id: str | None
    attempt: int | None
    timeout: float | None


class CallOptions(Sampling, CallScope, total=False):
    """The keywords of :meth:`ModelClient.chat` and :meth:`ModelClient.generate`:
    a :class:`~hivewire.services.model.domain.Sampling` and a :class:`CallScope`.
    """


class ModelClient:
    """Typed calls to ``hivewire.model.v1.ModelService`` over one channel."""

    def __init__(self, channel: grpc.aio.Channel, *, default_timeout: float | None = None) -> None:
        """Create the client.

        Args:
            channel: A long-lived mTLS channel (``runtime.channels``); not closed here.
            default_timeout: Deadline of calls that pass none (None: the channel's).
        """
        self._stub = model_pb2_grpc.ModelServiceStub(channel)
        self._default_timeout = default_timeout

    def _call_arguments(self, scope: CallScope) -> dict[str, Any]:
        """The deadline and metadata of a call made for ``scope``."""
        metadata: list[tuple[str, str]] = []
        cid = scope.get("correlation_id") or correlation_id_var.get()
        if cid:
            metadata.append((md.CORRELATION_ID, cid))
        task_id = scope.get("task_id", "")
        if task_id:
            metadata.append((md.TASK_ID, task_id))
        attempt = scope.get("attempt")
        if attempt is not None:
            metadata.append((md.ATTEMPT, str(attempt)))
        token_budget = scope.get("token_budget")
        if token_budget is not None:
            metadata.append((md.TOKEN_BUDGET, str(max(token_budget, 0))))
        timeout = scope.get("timeout")
        return {
            "timeout": timeout if timeout is not None else self._default_timeout,
            "metadata": metadata,
        }

    def chat(self, messages: Sequence[Message], **options: Unpack[CallOptions]) -> CompletionStream:
        """Start a Chat call.

        Args:
            messages: The conversation.
            **options: The model and sampling (:class:`~hivewire.services.model.domain.Sampling`:
                ``model``, ``temperature``, ``top_p``, ``max_tokens``, ``stop``, ``seed``)
                and the call's scope (:class:`CallScope`: ``task_id``, ``token_budget``,
                ``correlation_id``, ``attempt``, ``timeout``).

        Returns:
            The stream; iterate it for text chunks and the final Completion.
        """
        check_keywords("ModelClient.chat", options, CallOptions.__optional_keys__)
        converted = [
            m if isinstance(m, model_pb2.ChatMessage) else chat_message(*m) for m in messages
        ]
        request = model_pb2.ChatRequest(
            model=options.get("model", ""),
            messages=converted,
            params=generation_params(options),
            task_id=options.get("task_id", ""),
        )
        return CompletionStream(self._stub.Chat(request, **self._call_arguments(options)))

    def generate(
        self, prompt: str, *, system: str = "", **options: Unpack[CallOptions]
    ) -> CompletionStream:
        """Start a Generate call (options as for :meth:`chat`, plus the prompt and
        optional system text).
        """
        check_keywords("ModelClient.generate", options, CallOptions.__optional_keys__)
        request = model_pb2.GenerateRequest(
            model=options.get("model", ""),
            prompt=prompt,
            system=system,
            params=generation_params(options),
            task_id=options.get("task_id", ""),
        )
        return CompletionStream(self._stub.Generate(request, **self._call_arguments(options)))

    async def embed(
        self, inputs: Sequence[str], *, model: str = "", **scope: Unpack[CallScope]
    ) -> model_pb2.EmbedResponse:
        """Embed texts; returns one vector per input (``response.embeddings[i].values``).

        Args:
            inputs: The texts.
            model: Embedding model; "" for the service's default.
            **scope: The call's scope (:class:`CallScope`).

        Raises:
            HivewireError: What the service raised.
        """
        check_keywords("ModelClient.embed", scope, CallScope.__optional_keys__)
        request = model_pb2.EmbedRequest(
            model=model, inputs=list(inputs), task_id=scope.get("task_id", "")
        )
        try:
            response: model_pb2.EmbedResponse = await self._stub.Embed(
                request, **self._call_arguments(scope)
            )
        except grpc.aio.AioRpcError as err:
            raise from_rpc_error(err) from None
        return response

    async def list_models(
        self,
        backend: str = "",
        *,
        timeout: float | None = None,  # noqa: ASYNC109 - the gRPC deadline of the call
    ) -> model_pb2.ListModelsResponse:
        """List models and backend states.

        Raises:
            HivewireError: What the service raised.
        """
        try:
            response: model_pb2.ListModelsResponse = await self._stub.ListModels(
                model_pb2.ListModelsRequest(backend=backend),
                **self._call_arguments({"timeout": timeout}),
            )
        except grpc.aio.AioRpcError as err:
            raise from_rpc_error(err) from None
        return response
