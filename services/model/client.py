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
from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from typing import Any

import grpc

from hivewire.model.v1 import model_pb2, model_pb2_grpc
from hivewire.services.model.convert import chat_message
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

    def __aiter__(self) -> AsyncIterator[StreamItem]:
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

    @staticmethod
    def _metadata(
        task_id: str, token_budget: int | None, correlation_id: str | None, attempt: int | None
    ) -> list[tuple[str, str]]:
        metadata: list[tuple[str, str]] = []
        cid = correlation_id or correlation_id_var.get()
        if cid:
            metadata.append((md.CORRELATION_ID, cid))
        if task_id:
            metadata.append((md.TASK_ID, task_id))
        if attempt is not None:
            metadata.append((md.ATTEMPT, str(attempt)))
        if token_budget is not None:
            metadata.append((md.TOKEN_BUDGET, str(max(token_budget, 0))))
        return metadata

    @staticmethod
    def _params(
        temperature: float | None,
        top_p: float | None,
        max_tokens: int,
        stop: Sequence[str],
        seed: int | None,
    ) -> model_pb2.GenerationParams:
        params = model_pb2.GenerationParams(max_tokens=max_tokens, stop=list(stop))
        if temperature is not None:
            params.temperature = temperature
        if top_p is not None:
            params.top_p = top_p
        if seed is not None:
            params.seed = seed
        return params

    def chat(
        self,
        messages: Sequence[Message],
        *,
        model: str = "",
        temperature: float | None = None,
        top_p: float | None = None,
        max_tokens: int = 0,
        stop: Sequence[str] = (),
        seed: int | None = None,
        task_id: str = "",
        token_budget: int | None = None,
        correlation_id: str | None = None,
        attempt: int | None = None,
        timeout: float | None = None,
    ) -> CompletionStream:
        """Start a Chat call.

        Args:
            messages: The conversation.
            model: Model name; "" for the service's default.
            temperature: Sampling temperature in [0, 2].
            top_p: Nucleus sampling in (0, 1].
            max_tokens: Most tokens to produce; 0 for the backend's default.
            stop: Stop sequences.
            seed: Sampling seed.
            task_id: The task the call is for.
            token_budget: Tokens the task may still spend (None: no limit).
            correlation_id: Defaults to the current correlation id.
            attempt: The task attempt, if known.
            timeout: Seconds the call may take (pass the task's remaining time).

        Returns:
            The stream; iterate it for text chunks and the final Completion.
        """
        converted = [
            m if isinstance(m, model_pb2.ChatMessage) else chat_message(*m) for m in messages
        ]
        request = model_pb2.ChatRequest(
            model=model,
            messages=converted,
            params=self._params(temperature, top_p, max_tokens, stop, seed),
            task_id=task_id,
        )
        call = self._stub.Chat(
            request,
            timeout=timeout if timeout is not None else self._default_timeout,
            metadata=self._metadata(task_id, token_budget, correlation_id, attempt),
        )
        return CompletionStream(call)

    def generate(
        self,
        prompt: str,
        *,
        system: str = "",
        model: str = "",
        temperature: float | None = None,
        top_p: float | None = None,
        max_tokens: int = 0,
        stop: Sequence[str] = (),
        seed: int | None = None,
        task_id: str = "",
        token_budget: int | None = None,
        correlation_id: str | None = None,
        attempt: int | None = None,
        timeout: float | None = None,
    ) -> CompletionStream:
        """Start a Generate call (arguments as for :meth:`chat`, plus the prompt and
        optional system text).
        """
        request = model_pb2.GenerateRequest(
            model=model,
            prompt=prompt,
            system=system,
            params=self._params(temperature, top_p, max_tokens, stop, seed),
            task_id=task_id,
        )
        call = self._stub.Generate(
            request,
            timeout=timeout if timeout is not None else self._default_timeout,
            metadata=self._metadata(task_id, token_budget, correlation_id, attempt),
        )
        return CompletionStream(call)

    async def embed(
        self,
        inputs: Sequence[str],
        *,
        model: str = "",
        task_id: str = "",
        token_budget: int | None = None,
        correlation_id: str | None = None,
        attempt: int | None = None,
        timeout: float | None = None,  # noqa: ASYNC109 - the gRPC deadline of the call
    ) -> model_pb2.EmbedResponse:
        """Embed texts; returns one vector per input (``response.embeddings[i].values``).

        Raises:
            HivewireError: What the service raised.
        """
        request = model_pb2.EmbedRequest(model=model, inputs=list(inputs), task_id=task_id)
        try:
            response: model_pb2.EmbedResponse = await self._stub.Embed(
                request,
                timeout=timeout if timeout is not None else self._default_timeout,
                metadata=self._metadata(task_id, token_budget, correlation_id, attempt),
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
                timeout=timeout if timeout is not None else self._default_timeout,
                metadata=self._metadata("", None, None, None),
            )
        except grpc.aio.AioRpcError as err:
            raise from_rpc_error(err) from None
        return response
