"""The gRPC adapter of the model service: validate, build the call info, delegate, convert.

Domain errors raised here or below travel as rich statuses through the runtime's
error-mapping interceptor; nothing here catches them.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from contextlib import aclosing
from typing import Any, Protocol, TypeVar

import grpc

from hivewire.common.v1 import common_pb2
from hivewire.model.v1 import model_pb2, model_pb2_grpc
from hivewire.services.model import convert
from hivewire.services.model.domain import CallInfo, Completion, GenerationCall
from hivewire.services.model.service import ModelService
from hivewire.services.runtime import metadata as md
from hivewire.services.runtime.logging import correlation_id_var

logger = logging.getLogger(__name__)

SERVICE_NAME: str = model_pb2.DESCRIPTOR.services_by_name["ModelService"].full_name
"""``hivewire.model.v1.ModelService``."""

Context = grpc.aio.ServicerContext[Any, Any]
RequestT = TypeVar("RequestT", model_pb2.GenerateRequest, model_pb2.ChatRequest)
ResponseT = TypeVar("ResponseT", model_pb2.GenerateResponse, model_pb2.ChatResponse)
_Request = TypeVar("_Request", model_pb2.GenerateRequest, model_pb2.ChatRequest, contravariant=True)
_Response = TypeVar("_Response", model_pb2.GenerateResponse, model_pb2.ChatResponse, covariant=True)


def call_info(
    context: Context, task_id: str, request_metadata: common_pb2.RequestMetadata
) -> CallInfo:
    """Collect task id, correlation id, token budget and deadline of a call.

    The request's own fields win over call metadata.

    Raises:
        InvalidArgument: A malformed token budget header.
    """
    metadata = context.invocation_metadata()
    return CallInfo(
        task_id=task_id or convert.metadata_value(metadata, md.TASK_ID),
        correlation_id=(
            request_metadata.correlation_id
            or convert.metadata_value(metadata, md.CORRELATION_ID)
            or correlation_id_var.get()
            or ""
        ),
        token_budget=convert.token_budget(metadata),
        timeout=context.time_remaining(),
    )


class _FromProto(Protocol[_Request]):
    """``convert.generate_from_proto`` or ``convert.chat_from_proto``."""

    def __call__(self, request: _Request, *, max_output_tokens: int) -> GenerationCall: ...


class _BoundRpc(Protocol[_Request, _Response]):
    """A streaming RPC as the servicer's method."""

    def __call__(self, request: _Request, context: Context) -> AsyncIterator[_Response]: ...


class _Rpc(Protocol[_Request, _Response]):
    """A streaming RPC as a function in the servicer's class (bound on access)."""

    def __get__(self, servicer: Any, owner: Any = None) -> _BoundRpc[_Request, _Response]: ...


def _generation_rpc(
    from_proto: _FromProto[RequestT],
    respond: Callable[[int, str | Completion], ResponseT],
    doc: str,
) -> _Rpc[RequestT, ResponseT]:
    """Generate or Chat: the two streaming RPCs differ only in their messages.

    Args:
        from_proto: Validates the request into a call.
        respond: Builds the numbered response of each streamed item.
        doc: The RPC's docstring.
    """

    async def rpc(
        servicer: ModelServicer, request: RequestT, context: Context
    ) -> AsyncIterator[ResponseT]:
        call = from_proto(request, max_output_tokens=servicer._max_output_tokens)
        # aclosing: a cancelled call closes the domain stream (and the backend) at once.
        async with aclosing(servicer._stream(call, request, context, respond)) as out:
            async for response in out:
                yield response

    rpc.__doc__ = doc
    return rpc


class ModelServicer(model_pb2_grpc.ModelServiceServicer):
    """``hivewire.model.v1.ModelService`` over a :class:`ModelService`."""

    def __init__(self, service: ModelService, *, max_output_tokens: int = 8192) -> None:
        """Create the servicer.

        Args:
            service: The domain service.
            max_output_tokens: Largest ``max_tokens`` a request may ask for.
        """
        self._service = service
        self._max_output_tokens = max_output_tokens

    Generate = _generation_rpc(
        convert.generate_from_proto, convert.generate_response, "Stream a completion of a prompt."
    )
    Chat = _generation_rpc(
        convert.chat_from_proto, convert.chat_response, "Stream the assistant's next message."
    )

    async def _stream(
        self,
        call: GenerationCall,
        request: model_pb2.GenerateRequest | model_pb2.ChatRequest,
        context: Context,
        respond: Callable[[int, str | Completion], ResponseT],
    ) -> AsyncGenerator[ResponseT, None]:
        """Run a validated Generate or Chat call, numbering its responses from 1."""
        info = call_info(context, request.task_id, request.metadata)
        sequence = 0
        # aclosing: a cancelled call closes the domain stream (and the backend) at once.
        async with aclosing(self._service.stream(call, info)) as items:
            async for item in items:
                sequence += 1
                yield respond(sequence, item)

    async def Embed(
        self, request: model_pb2.EmbedRequest, context: Context
    ) -> model_pb2.EmbedResponse:
        """Embed texts."""
        inputs = convert.embed_from_proto(request)
        info = call_info(context, request.task_id, request.metadata)
        return convert.embed_response(await self._service.embed(request.model, inputs, info))

    async def ListModels(
        self, request: model_pb2.ListModelsRequest, context: Context
    ) -> model_pb2.ListModelsResponse:
        """List every backend's models and state."""
        listing = await self._service.list_models(
            request.backend, time_limit=context.time_remaining()
        )
        return convert.listing_to_proto(listing)


def add_to_server(servicer: ModelServicer, server: grpc.aio.Server) -> None:
    """Register the servicer on a server."""
    model_pb2_grpc.add_ModelServiceServicer_to_server(servicer, server)
