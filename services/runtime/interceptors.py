"""gRPC interceptors: correlation id and call logging, Prometheus metrics, error mapping.

Server chain, outermost first (``server_interceptors()``)::

    OTel tracing (runtime/tracing.py) -> StandardServerInterceptor (correlation id
        and logging -> metrics -> error mapping, nested in one wrapper)
        -> AuthzServerInterceptor (runtime/authz.py) -> extra interceptors (limits)
        -> servicer

The OTel interceptor is outermost so that every other layer, and the log lines
they write, run inside the call's trace (W3C ``traceparent`` from the caller): in its
server span while spans are exported, in the context the call carried otherwise.

A ``grpc.aio`` server interceptor only sees the method name and metadata, so each of
these wraps the ``RpcMethodHandler`` it gets back: the wrapper runs around the real
handler for all four call kinds (coroutine handlers, async-generator streaming
handlers and reader/writer-style handlers alike). Wrapped handlers are cached per
method, so the per-call cost is one extra coroutine frame per interceptor.

Client side, :class:`CorrelationClientInterceptor` forwards the correlation id, sets
a default deadline on unary-response calls and records ``grpc_client_*`` metrics; the
OTel client interceptors in front of it (``runtime/channels.py``) carry the trace.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import logging
import re
import time
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Iterable
from contextlib import aclosing
from typing import TYPE_CHECKING, Any, Protocol, TypeAlias, cast

import grpc
from grpc.aio import ClientCallDetails, Metadata

from hivewire.services.runtime import metadata as metadata_keys
from hivewire.services.runtime import metrics, tracing
from hivewire.services.runtime.errors import (
    Aborted,
    DeadlineExceeded,
    HivewireError,
    Internal,
    ResourceExhausted,
    Unavailable,
)
from hivewire.services.runtime.logging import correlation_id_var, new_correlation_id
from hivewire.services.runtime.status import finished_call_code, from_rpc_error, to_grpc_status

logger = logging.getLogger(__name__)

CORRELATION_ID_KEY = metadata_keys.CORRELATION_ID
"""Metadata key of the correlation id, on every hop (lower case, as gRPC requires)."""

_VALID_CORRELATION_ID = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")

# Errors a downstream call may raise through a servicer that keep their meaning for
# our own caller (retry later, shed load, out of time). Anything else from a
# downstream call is our bug or misconfiguration and becomes INTERNAL.
_TRANSPARENT_DOWNSTREAM = (Unavailable, ResourceExhausted, DeadlineExceeded, Aborted)

if TYPE_CHECKING:
    Context: TypeAlias = grpc.aio.ServicerContext[Any, Any]
    Handler: TypeAlias = grpc.RpcMethodHandler[Any, Any]


def incoming_correlation_id(metadata: Iterable[tuple[str, str | bytes]] | None) -> str | None:
    """Return a well-formed correlation id from request metadata, if one is there.

    Ids that are too long or carry odd characters are ignored (a new one is minted)
    so a client cannot inject text into every log line.
    """
    for key, value in metadata or ():
        if (
            key == CORRELATION_ID_KEY
            and isinstance(value, str)
            and _VALID_CORRELATION_ID.match(value)
        ):
            return value
    return None


def _grpc_type(handler: Handler) -> str:
    if handler.request_streaming:
        return "bidi_stream" if handler.response_streaming else "client_stream"
    return "server_stream" if handler.response_streaming else "unary"


def final_code(context: Context, exc: BaseException | None) -> grpc.StatusCode:
    """Best knowledge of the status a server call ends with.

    Args:
        context: The call's servicer context.
        exc: What the handler raised (None when it returned).

    Returns:
        The code set by ``abort``/``set_code``, CANCELLED or DEADLINE_EXCEEDED when the
        handler was cancelled, UNKNOWN for an exception nobody mapped, else OK.
    """
    # A streaming handler whose client went away is closed (GeneratorExit) rather
    # than cancelled when it was parked at a yield.
    if isinstance(exc, asyncio.CancelledError) or (
        isinstance(exc, GeneratorExit) and context.cancelled()
    ):
        remaining = context.time_remaining()
        if remaining is not None and remaining <= 0:
            return grpc.StatusCode.DEADLINE_EXCEEDED
        return grpc.StatusCode.CANCELLED
    code = context.code()
    if code is not None:
        return code
    if exc is None or isinstance(exc, GeneratorExit):
        return grpc.StatusCode.OK
    return grpc.StatusCode.UNKNOWN


class CallScope(Protocol):
    """What an interceptor runs around one server call.

    ``enter`` runs before the handler, ``exit`` after it with what the handler raised
    (None when it returned); ``exit`` may raise another exception in its place (an
    abort, for example), as an ``__aexit__`` may.
    """

    async def enter(self) -> None:
        """Start of the call."""

    async def exit(self, exc: BaseException | None) -> None:
        """End of the call: ``exc`` is what the handler raised, None when it returned."""


class _Counters(Protocol):
    def received(self) -> None: ...

    def sent(self) -> None: ...


class _CountingContext:
    """Context proxy that counts messages of reader/writer-style handlers."""

    def __init__(self, context: Context, counters: _Counters) -> None:
        self._context = context
        self._counters = counters

    def __getattr__(self, name: str) -> Any:
        return getattr(self._context, name)

    async def read(self) -> Any:
        message = await self._context.read()
        if message is not grpc.aio.EOF:
            self._counters.received()
        return message

    async def write(self, message: Any) -> None:
        await self._context.write(message)
        self._counters.sent()


async def _counted(requests: AsyncIterable[Any], counters: _Counters) -> AsyncIterator[Any]:
    async for message in requests:
        counters.received()
        yield message


if TYPE_CHECKING:
    ScopeFactory: TypeAlias = Callable[[Context], CallScope]


def handler_parts(handler: Handler) -> tuple[Any, Callable[..., Handler]]:
    """The behavior of ``handler`` and the grpc factory that builds a handler of its kind.

    Returns:
        ``(behavior, factory)``: e.g. ``(handler.unary_stream,
        grpc.unary_stream_rpc_method_handler)``; wrap the behavior and pass it, with the
        handler's serializers, to the factory to get an equivalent handler.
    """
    if handler.request_streaming and handler.response_streaming:
        return handler.stream_stream, grpc.stream_stream_rpc_method_handler
    if handler.request_streaming:
        return handler.stream_unary, grpc.stream_unary_rpc_method_handler
    if handler.response_streaming:
        return handler.unary_stream, grpc.unary_stream_rpc_method_handler
    return handler.unary_unary, grpc.unary_unary_rpc_method_handler


def wrap_handler(handler: Handler, scope_for: ScopeFactory, *, counting: bool = False) -> Handler:
    """Return a copy of ``handler`` whose behavior runs inside ``scope_for(context)``.

    Args:
        handler: The handler the continuation returned.
        scope_for: Builds the per-call scope; its ``exit`` sees the handler's
            exception and may replace it (for example with an abort).
        counting: Also report each message to the scope (it must then implement
            ``received()`` and ``sent()``).

    Returns:
        An equivalent handler. Synchronous behaviors (not used by hivewire's aio
        servicers) are returned unwrapped.
    """
    behavior, factory = handler_parts(handler)
    if behavior is None:
        return handler

    req_stream = handler.request_streaming
    # Only reader/writer-style streaming handlers use context.read()/write(); the
    # others get the real context (no proxy on the unary hot path).
    proxy = inspect.iscoroutinefunction(behavior) and (
        handler.request_streaming or handler.response_streaming
    )

    def prepare(request: Any, context: Context, scope: Any) -> tuple[Any, Any]:
        if not counting:
            return request, context
        if req_stream:
            request = _counted(request, scope)
        else:
            scope.received()
        return request, (_CountingContext(context, scope) if proxy else context)

    wrapped: Any
    if handler.response_streaming and inspect.isasyncgenfunction(behavior):

        async def wrapped(request: Any, context: Context) -> AsyncIterator[Any]:
            scope = scope_for(context)
            await scope.enter()
            try:
                request, ctx = prepare(request, context, scope)
                # aclosing: when grpc closes this wrapper, the handler's own finally
                # blocks run now, not whenever the garbage collector gets to them.
                async with aclosing(behavior(request, ctx)) as responses:
                    async for response in responses:
                        yield response
                        if counting:
                            cast(_Counters, scope).sent()
            except BaseException as exc:
                await scope.exit(exc)
                raise
            await scope.exit(None)

    elif inspect.iscoroutinefunction(behavior):
        streaming_out = handler.response_streaming

        async def wrapped(request: Any, context: Context) -> Any:
            scope = scope_for(context)
            await scope.enter()
            try:
                request, ctx = prepare(request, context, scope)
                response = await behavior(request, ctx)
                if counting and not streaming_out and response is not None:
                    cast(_Counters, scope).sent()
            except BaseException as exc:
                await scope.exit(exc)
                raise
            await scope.exit(None)
            return response

    else:
        return handler
    return factory(
        wrapped,
        request_deserializer=handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )


class HandlerCachingInterceptor(grpc.aio.ServerInterceptor):
    """Base of the server interceptors: wrap each method's handler once, reuse the wrapper.

    Subclasses say how to wrap in :meth:`wrap`; the wrapper is rebuilt only if the
    server hands over another handler for the method.
    """

    def __init__(self) -> None:
        self._cache: dict[str, tuple[Handler, Handler]] = {}

    def wrap(self, method: str, handler: Handler) -> Handler:
        """The wrapper of ``handler``, the handler of ``method`` (subclasses implement it)."""
        raise NotImplementedError

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Handler | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Handler | None:
        """Wrap the handler of the called method (see the module docstring)."""
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method
        cached = self._cache.get(method)
        if cached is not None and cached[0] is handler:
            return cached[1]
        wrapped = self.wrap(method, handler)
        self._cache[method] = (handler, wrapped)
        return wrapped


class _WrappingInterceptor(HandlerCachingInterceptor):
    """Base: wrap each method's handler in a per-call scope."""

    counting = False

    def _scope_factory(self, method: str, handler: Handler) -> ScopeFactory:
        raise NotImplementedError

    def wrap(self, method: str, handler: Handler) -> Handler:
        """Wrap ``handler`` in this interceptor's per-call scope."""
        return wrap_handler(handler, self._scope_factory(method, handler), counting=self.counting)


# --- 1. correlation id + call logging ---------------------------------------------


class _CorrelationScope:
    __slots__ = ("_context", "_early", "_method", "_start", "_token")

    def __init__(self, context: Context, method: str, early: bool) -> None:
        self._context = context
        self._method = method
        self._early = early

    async def enter(self) -> None:
        invocation = self._context.invocation_metadata()
        incoming = incoming_correlation_id(invocation)
        cid = incoming or new_correlation_id()
        self._token = correlation_id_var.set(cid)
        self._start = time.perf_counter()
        echo = ((CORRELATION_ID_KEY, cid),)
        # Trailers ride along with the status for free. Sending initial metadata
        # early costs a batch of its own (measured ~25 % of unary throughput, 11 % of
        # an agent's CPU per Execute call, ~250 µs before StreamTask's handler ran at
        # c=1), so it is only done for streaming responses to callers that sent no id
        # (they want the minted one up front; a caller that sent one knows it), and not
        # for methods whose first message carries the id (``early`` False).
        self._context.set_trailing_metadata(echo)
        if self._early and incoming is None:
            await self._context.send_initial_metadata(echo)

    async def exit(self, exc: BaseException | None) -> None:
        if logger.isEnabledFor(logging.DEBUG):
            logger.debug(
                "%s %s %.2f ms",
                self._method,
                final_code(self._context, exc).name,
                (time.perf_counter() - self._start) * 1000,
            )
        try:
            correlation_id_var.reset(self._token)
        except ValueError:
            # An async generator may be finalized from another context; the call's
            # own context dies with its task anyway.
            pass


# --- 2. metrics ---------------------------------------------------------------------


class _CallMetrics:
    """A method's call metrics of one side, label children resolved once: the hot path
    only increments.
    """

    def __init__(
        self, grpc_type: str, method: str, started: Any, seconds: Any, handled: Any
    ) -> None:
        service, name = metrics.split_method(method)
        self.labels = (grpc_type, service, name)
        self.started = started.labels(*self.labels)
        self.seconds = seconds.labels(*self.labels)
        self._handled_family = handled
        self._handled: dict[grpc.StatusCode, Any] = {}

    def handled(self, code: grpc.StatusCode) -> Any:
        child = self._handled.get(code)
        if child is None:
            child = self._handled[code] = self._handled_family.labels(*self.labels, code.name)
        return child


class _MethodMetrics(_CallMetrics):
    """The server side's, with its message counters."""

    def __init__(self, grpc_type: str, method: str) -> None:
        super().__init__(
            grpc_type,
            method,
            metrics.SERVER_STARTED,
            metrics.SERVER_HANDLING_SECONDS,
            metrics.SERVER_HANDLED,
        )
        self.received = metrics.SERVER_MSG_RECEIVED.labels(*self.labels)
        self.sent = metrics.SERVER_MSG_SENT.labels(*self.labels)


class _MetricsScope:
    __slots__ = ("_context", "_m", "_start")

    def __init__(self, context: Context, m: _MethodMetrics) -> None:
        self._context = context
        self._m = m

    def received(self) -> None:
        self._m.received.inc()

    def sent(self) -> None:
        self._m.sent.inc()

    async def enter(self) -> None:
        self._m.started.inc()
        self._start = time.perf_counter()

    async def exit(self, exc: BaseException | None) -> None:
        self._m.seconds.observe(time.perf_counter() - self._start)
        self._m.handled(final_code(self._context, exc)).inc()


# --- 3. error mapping ---------------------------------------------------------------


_PASS_THROUGH = (asyncio.CancelledError, GeneratorExit, grpc.aio.AbortError, grpc.aio.BaseError)


class _ErrorScope:
    __slots__ = ("_context", "_method")

    def __init__(self, context: Context, method: str) -> None:
        self._context = context
        self._method = method

    async def enter(self) -> None:
        return None

    async def exit(self, exc: BaseException | None) -> None:
        if exc is None or isinstance(exc, _PASS_THROUGH) or not isinstance(exc, Exception):
            return
        err = self._to_domain_error(exc)
        if isinstance(err, Internal) and err is not exc:
            logger.error("%s failed unexpectedly", self._method, exc_info=exc)
        elif err.code in (
            grpc.StatusCode.INTERNAL,
            grpc.StatusCode.UNKNOWN,
            grpc.StatusCode.DATA_LOSS,
        ):
            logger.error("%s failed: %r", self._method, err, exc_info=exc)
        else:
            logger.debug("%s -> %s %s: %s", self._method, err.code.name, err.reason, err.message)
        # abort_with_status replaces the trailers set so far: keep the correlation id.
        cid = correlation_id_var.get()
        echo = ((CORRELATION_ID_KEY, cid),) if cid else ()
        await self._context.abort_with_status(to_grpc_status(err, trailing_metadata=echo))

    def _to_domain_error(self, exc: Exception) -> HivewireError:
        if isinstance(exc, HivewireError):
            return exc
        cid = correlation_id_var.get()
        meta = {"correlation_id": cid} if cid else {}
        if isinstance(exc, grpc.RpcError):
            downstream = from_rpc_error(exc)
            if isinstance(downstream, _TRANSPARENT_DOWNSTREAM):
                return downstream
            return Internal(
                f"internal error (a dependency answered {downstream.code.name})", metadata=meta
            )
        return Internal("internal error", metadata=meta)


# --- the three in one layer ------------------------------------------------------


class _StandardScope:
    """Correlation (outermost), metrics, then error mapping, as one scope.

    Nested exactly like three stacked interceptors would be, but one wrapper frame per
    call instead of three: a streaming call's every message passes one ``async for``
    layer instead of three, and each open stream holds one frame instead of three.
    """

    __slots__ = ("_correlation", "_errors", "_metrics")

    def __init__(self, context: Context, method: str, early: bool, m: _MethodMetrics) -> None:
        self._correlation = _CorrelationScope(context, method, early)
        self._metrics = _MetricsScope(context, m)
        self._errors = _ErrorScope(context, method)

    def received(self) -> None:
        self._metrics.received()

    def sent(self) -> None:
        self._metrics.sent()

    async def enter(self) -> None:
        await self._correlation.enter()
        await self._metrics.enter()

    async def exit(self, exc: BaseException | None) -> None:
        # Innermost first; an exception one raises in place of ``exc`` (the abort of
        # error mapping) is what the outer ones see, and what the call ends with.
        raised: BaseException | None = None
        for scope in (self._errors, self._metrics, self._correlation):
            try:
                await scope.exit(exc)
            except BaseException as replaced:
                exc = raised = replaced
        if raised is not None:
            raise raised


class StandardServerInterceptor(_WrappingInterceptor):
    """Correlation id and call logging, ``grpc_server_*`` metrics and error mapping.

    * **Correlation**: take ``x-correlation-id`` from the caller or mint one; set it in
      :data:`~hivewire.services.runtime.logging.correlation_id_var` for the handler (so
      log lines and outgoing calls carry it); send it back in the trailing metadata of
      every call, and in the initial metadata of calls with a streaming response when
      it was minted here (a caller that sent one knows it), except the methods named
      in ``id_in_response`` (their first message carries the id). Each call is logged
      at DEBUG with method, code and duration.
    * **Metrics**: ``grpc_server_*`` Prometheus metrics for every call.
    * **Error mapping**: exceptions escaping a servicer become gRPC statuses.
      :class:`HivewireError` -> its code with a rich status (reason, details);
      ``grpc.RpcError`` from a downstream call -> passed on when it means the same to
      our caller (UNAVAILABLE, RESOURCE_EXHAUSTED, DEADLINE_EXCEEDED, ABORTED),
      otherwise INTERNAL; any other exception -> INTERNAL with a generic message (and
      the correlation id in ``ErrorInfo.metadata``), the traceback to the log only;
      ``CancelledError`` and gRPC's own abort pass through untouched.

    The three run nested in that order (correlation outermost) inside one wrapper.

    Args:
        id_in_response: Full method names (``/package.Service/Method``) with a streaming
            response whose first message carries the correlation id the work runs
            under (``StreamTask``: the submitted task, once stored): a minted id is not
            sent ahead of it in initial metadata of its own (it is in the trailers).
    """

    counting = True

    def __init__(self, id_in_response: Iterable[str] = ()) -> None:
        super().__init__()
        self._id_in_response = frozenset(id_in_response)

    def _scope_factory(self, method: str, handler: Handler) -> ScopeFactory:
        early = handler.response_streaming and method not in self._id_in_response
        m = _MethodMetrics(_grpc_type(handler), method)
        return lambda context: _StandardScope(context, method, early, m)


def server_interceptors(
    extra: Iterable[grpc.aio.ServerInterceptor] = (),
    *,
    authz: grpc.aio.ServerInterceptor | None = None,
    untraced: Iterable[str] = (),
    id_in_response: Iterable[str] = (),
) -> list[grpc.aio.ServerInterceptor]:
    """The standard server chain, outermost first, followed by ``extra``.

    Args:
        extra: Interceptors run innermost (limits...).
        authz: The authorization interceptor
            (:class:`~hivewire.services.runtime.authz.AuthzServerInterceptor`), placed
            inside error mapping so its refusals become rich statuses, and before
            ``extra`` so a refused caller costs no limit.
        untraced: Full method names that get no OTel server span
            (:func:`~hivewire.services.runtime.tracing.server_interceptor`).
        id_in_response: Full method names whose first response message carries the
            correlation id (:class:`StandardServerInterceptor`).
    """
    return [
        tracing.server_interceptor(untraced),
        StandardServerInterceptor(id_in_response),
        *((authz,) if authz is not None else ()),
        *extra,
    ]


# --- client side --------------------------------------------------------------------


def _method_name(method: str | bytes) -> str:
    return method.decode() if isinstance(method, bytes) else method


@functools.lru_cache(maxsize=512)
def _client_metrics(grpc_type: str, method: str) -> _CallMetrics:
    """A method's ``grpc_client_*`` children (resolved once per method and call type)."""
    return _CallMetrics(
        grpc_type,
        method,
        metrics.CLIENT_STARTED,
        metrics.CLIENT_HANDLING_SECONDS,
        metrics.CLIENT_HANDLED,
    )


class _ClientCallMetrics:
    __slots__ = ("_m", "_start")

    def __init__(self, grpc_type: str, method: str) -> None:
        self._m = _client_metrics(grpc_type, method)
        self._m.started.inc()
        self._start = time.perf_counter()

    def done(self, code: grpc.StatusCode) -> None:
        self._m.seconds.observe(time.perf_counter() - self._start)
        self._m.handled(code).inc()


def observe_client_call(call: Any, grpc_type: str, method: str) -> None:
    """Record the ``grpc_client_*`` metrics of a call made on a channel without interceptors.

    Args:
        call: The ``grpc.aio`` call, just started.
        grpc_type: ``unary``, ``server_stream``, ``client_stream`` or ``bidi_stream``.
        method: The full method name.
    """
    m = _ClientCallMetrics(grpc_type, method)
    call.add_done_callback(lambda c: m.done(finished_call_code(c)))


if TYPE_CHECKING:
    _Continuation: TypeAlias = Callable[[ClientCallDetails, Any], Awaitable[Any]]


def _intercepting(grpc_type: str) -> Any:
    """The ``intercept_*`` method of one call kind: ``_intercept`` with the kind's name.

    Typed ``Any``: each kind's stub signature differs in its generic call types only.
    """

    async def intercept(
        self: CorrelationClientInterceptor,
        continuation: _Continuation,
        client_call_details: ClientCallDetails,
        request: Any,
    ) -> Any:
        return await self._intercept(grpc_type, continuation, client_call_details, request)

    intercept.__doc__ = f"Intercept a {grpc_type} call."
    return intercept


class CorrelationClientInterceptor(
    grpc.aio.UnaryUnaryClientInterceptor,
    grpc.aio.UnaryStreamClientInterceptor,
    grpc.aio.StreamUnaryClientInterceptor,
    grpc.aio.StreamStreamClientInterceptor,
):
    """Carry the correlation id, default the deadline and count calls, for all four kinds.

    * ``x-correlation-id``: the caller's explicit metadata wins; else the current
      :data:`correlation_id_var` (set while handling a request); else a new id.
    * Deadline: a call without a timeout gets ``default_timeout`` if its response is
      unary, ``stream_timeout`` (default: none) if it is a stream, because watches
      and sessions legitimately stay open for a long time.
    * ``grpc_client_started_total``, ``grpc_client_handled_total`` and
      ``grpc_client_handling_seconds`` when ``record_metrics`` is on.
    """

    def __init__(
        self,
        default_timeout: float | None = 30.0,
        *,
        stream_timeout: float | None = None,
        record_metrics: bool = True,
    ) -> None:
        """Create the interceptor.

        Args:
            default_timeout: Seconds given to unary-response calls that set no timeout.
            stream_timeout: Seconds given to streaming-response calls that set none.
            record_metrics: Record ``grpc_client_*`` metrics.
        """
        self._default_timeout = default_timeout
        self._stream_timeout = stream_timeout
        self._record_metrics = record_metrics

    def _details(self, details: ClientCallDetails, *, unary_response: bool) -> ClientCallDetails:
        metadata = Metadata(*tuple(details.metadata or ()))
        if metadata.get(CORRELATION_ID_KEY) is None:
            metadata.add(CORRELATION_ID_KEY, correlation_id_var.get() or new_correlation_id())
        timeout = details.timeout
        if timeout is None:
            timeout = self._default_timeout if unary_response else self._stream_timeout
        return ClientCallDetails(
            details.method, timeout, metadata, details.credentials, details.wait_for_ready
        )

    async def _finish_unary(self, call: Any, m: _ClientCallMetrics | None) -> Any:
        if m is None:
            return call
        code = grpc.StatusCode.OK
        try:
            await call
        except grpc.aio.AioRpcError as exc:
            code = exc.code()
        except asyncio.CancelledError:
            m.done(grpc.StatusCode.CANCELLED)
            raise
        m.done(code)
        # The call is finished; awaiting it again yields the response or re-raises.
        return call

    def _watch_stream(self, call: Any, m: _ClientCallMetrics | None) -> Any:
        if m is not None and hasattr(call, "add_done_callback"):
            call.add_done_callback(lambda c: m.done(finished_call_code(c)))
        return call

    async def _intercept(
        self,
        grpc_type: str,
        continuation: _Continuation,
        client_call_details: ClientCallDetails,
        request: Any,
    ) -> Any:
        unary_response = grpc_type in ("unary", "client_stream")
        details = self._details(client_call_details, unary_response=unary_response)
        m = (
            _ClientCallMetrics(grpc_type, _method_name(details.method))
            if self._record_metrics
            else None
        )
        call = await continuation(details, request)
        if grpc_type == "unary":
            return await self._finish_unary(call, m)
        # Waiting for the response of a client-streaming call here would hold back the
        # caller's own writes (call.write()), so it is observed like the streams.
        return self._watch_stream(call, m)

    intercept_unary_unary = _intercepting("unary")
    intercept_unary_stream = _intercepting("server_stream")
    intercept_stream_unary = _intercepting("client_stream")
    intercept_stream_stream = _intercepting("bidi_stream")


# grpc.aio files each client interceptor under the FIRST of the four kinds it
# implements (an if/elif chain in grpc/aio/_channel.py), so an interceptor written
# for all kinds would silently only see unary-unary calls. Channels get one adapter
# per kind instead.


class _KindAdapter:
    """Base of the single-kind adapters: hands each call to the interceptor it wraps."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner


_Adapter: TypeAlias = Callable[[grpc.aio.ClientInterceptor], grpc.aio.ClientInterceptor]
"""A single-kind adapter class: built with the interceptor it wraps."""


def _single_kind_adapter(kind: type[grpc.aio.ClientInterceptor], method: str) -> _Adapter:
    """An interceptor class of ``kind`` alone whose ``method`` calls the wrapped one's."""

    async def forward(
        self: _KindAdapter, continuation: Any, client_call_details: ClientCallDetails, request: Any
    ) -> Any:
        return await getattr(self._inner, method)(continuation, client_call_details, request)

    name = f"_{kind.__name__.removesuffix('ClientInterceptor')}Adapter"
    # A class made at run time: mypy sees only ``type``.
    return cast(_Adapter, type(name, (_KindAdapter, kind), {method: forward}))


_ADAPTERS: tuple[tuple[type[grpc.aio.ClientInterceptor], _Adapter], ...] = tuple(
    (kind, _single_kind_adapter(kind, method))
    for kind, method in (
        (grpc.aio.UnaryUnaryClientInterceptor, "intercept_unary_unary"),
        (grpc.aio.UnaryStreamClientInterceptor, "intercept_unary_stream"),
        (grpc.aio.StreamUnaryClientInterceptor, "intercept_stream_unary"),
        (grpc.aio.StreamStreamClientInterceptor, "intercept_stream_stream"),
    )
)


def split_client_interceptors(
    interceptors: Iterable[grpc.aio.ClientInterceptor],
) -> list[grpc.aio.ClientInterceptor]:
    """Make each interceptor apply to every call kind it implements.

    Pass the result as ``interceptors=`` to ``grpc.aio.secure_channel``: an interceptor
    implementing several kinds is replaced by one single-kind adapter per kind, in the
    same order (see the note above).
    """
    split: list[grpc.aio.ClientInterceptor] = []
    for interceptor in interceptors:
        kinds = [adapter for base, adapter in _ADAPTERS if isinstance(interceptor, base)]
        if len(kinds) <= 1:
            split.append(interceptor)
        else:
            split.extend(adapter(interceptor) for adapter in kinds)
    return split
