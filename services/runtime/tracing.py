"""OpenTelemetry tracing: one trace per task across every gRPC hop and NATS message.

Every process installs the OTel SDK once (:func:`setup_tracing`); spans leave over
OTLP only when ``OTEL_EXPORTER_OTLP_ENDPOINT`` (or ``..._TRACES_ENDPOINT``) is set,
and the exporter reads the other standard ``OTEL_EXPORTER_OTLP_*`` variables itself.
Without an endpoint the hot paths make no span while none goes anywhere
(:func:`spans_kept`) and carry the context they were given instead, so log lines
still carry trace and span ids and the W3C context still travels on: an attempt's
spans (:func:`client_span`, :func:`server_span`, :func:`resumed` with a name,
:func:`kept_span`) and every call's CLIENT and SERVER span (:func:`client_interceptors`,
:func:`server_interceptor`).

Where the context travels:

* gRPC: the OTel grpc.aio interceptors, first in every server chain
  (:func:`server_interceptor`) and every channel (:func:`client_interceptors`),
  make a server and a client span per call and carry ``traceparent`` in metadata.
* NATS: the event publisher opens a PRODUCER span and injects its context in the
  headers (:func:`inject`); subscribers continue it in a CONSUMER span
  (:func:`extract`).
* Hops nobody's call starts (the coordinator's scheduler opening ``Execute``): the
  submitter's context is stored with the work (:func:`stamp` on a
  ``RequestMetadata``) and becomes the parent again later (:func:`resumed`).
"""

from __future__ import annotations

import functools
import importlib
import inspect
import logging
import re
from collections.abc import AsyncIterator, Iterable, Iterator, Mapping, MutableMapping
from contextlib import AbstractContextManager, aclosing, contextmanager, nullcontext
from typing import Any, Protocol

import grpc
from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.instrumentation.grpc import (
    _aio_client,
    _aio_server,
    _server,
    aio_client_interceptors,
    aio_server_interceptor,
    filters,
)
from opentelemetry.instrumentation.utils import is_instrumentation_enabled
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.sdk.trace.id_generator import RandomIdGenerator
from opentelemetry.trace import SpanKind, Status, StatusCode

from hivewire.services.runtime.status import finished_call_code

logger = logging.getLogger(__name__)

__all__ = [
    "SpanKind",
    "carried_context",
    "client_interceptors",
    "client_span",
    "current_ids",
    "end_with_call",
    "extract",
    "inject",
    "kept_span",
    "resume_context",
    "resumed",
    "server_interceptor",
    "server_span",
    "setup_tracing",
    "span_headers",
    "spans_kept",
    "stamp",
    "tracer",
]

TRACER_NAME = "hivewire"
_TRACEPARENT = re.compile(r"^[0-9a-f]{2}-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}$")
_MAX_TRACESTATE = 512

tracer = trace.get_tracer(TRACER_NAME)
"""The tracer of hivewire's own spans (a proxy: it follows the provider set later)."""

_IDS = RandomIdGenerator()

# Health checks and reflection are probes, not work: no span for them.
_PROBES = ("/grpc.health.v1.Health", "/grpc.reflection")
_UNTRACED: Any = filters.negate(
    filters.any_of(filters.health_check(), filters.service_prefix("grpc.reflection"))
)


def setup_tracing(
    service_name: str, *, otlp_endpoint: str | None, instance_id: str | None = None
) -> TracerProvider:
    """Install the SDK tracer provider of this process (once; later calls return it).

    Args:
        service_name: ``service.name`` of every span (``hivewire-coordinator``...).
        otlp_endpoint: Where the OTLP exporter sends (None: spans are made, not sent).
            The exporter itself reads the standard ``OTEL_EXPORTER_OTLP_*`` variables.
        instance_id: ``service.instance.id``, when known.

    Returns:
        The process's provider.
    """
    current = trace.get_tracer_provider()
    if isinstance(current, TracerProvider):
        return current
    attributes: dict[str, str] = {"service.name": service_name}
    if instance_id:
        attributes["service.instance.id"] = instance_id
    provider = TracerProvider(resource=Resource.create(attributes))
    if otlp_endpoint:
        # Imported here: the exporter pulls in its own gRPC client stack.
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
        logger.info("tracing: exporting spans over OTLP to %s", otlp_endpoint)
    trace.set_tracer_provider(provider)
    return provider


class _ServerInterceptor(_aio_server.OpenTelemetryAioServerInterceptor):
    """The stock server interceptor: no span while none is kept; reader/writer handlers traced.

    While no span goes anywhere (:func:`spans_kept` is false) no SERVER span is made:
    the handler runs in the context the call carried (:func:`carried_context`: a
    non-recording span of the caller's ids, a new trace when it carried none), without
    the stock span, its attributes and its proxy around the servicer context.

    The stock one iterates every response-streaming handler, so a handler that answers
    with ``await context.write(...)`` fails with a TypeError (open upstream issue); such
    a handler is awaited inside its span instead.
    """

    async def intercept_service(  # type: ignore[override]  # the stock class is both the sync and the aio interceptor
        self, continuation: Any, handler_call_details: Any
    ) -> Any:
        if spans_kept():
            return await super().intercept_service(continuation, handler_call_details)  # type: ignore[no-untyped-call]  # opentelemetry-instrumentation-grpc is unannotated
        handler = await continuation(handler_call_details)
        if not is_instrumentation_enabled() or (
            self._filter is not None and not self._filter(handler_call_details)
        ):
            return handler
        carried = _call_context(handler_call_details.invocation_metadata or ())
        return _server._wrap_rpc_behavior(handler, functools.partial(_carrying, carried))  # type: ignore[no-untyped-call]  # opentelemetry-instrumentation-grpc is unannotated

    def _intercept_aio_server_stream(self, behavior: Any, handler_call_details: Any) -> Any:
        if not inspect.isasyncgenfunction(behavior):
            return self._intercept_aio_server_unary(behavior, handler_call_details)  # type: ignore[no-untyped-call]  # opentelemetry-instrumentation-grpc is unannotated
        return super()._intercept_aio_server_stream(behavior, handler_call_details)  # type: ignore[no-untyped-call]  # opentelemetry-instrumentation-grpc is unannotated


def _call_context(metadata: Iterable[tuple[str, str | bytes]]) -> otel_context.Context:
    """The context a call carried in its metadata (what the stock interceptor extracts).

    A call with only ``traceparent``/``tracestate`` (what hivewire and most clients
    send) is parsed directly (:func:`carried_context`); one that also carries another
    configured propagator's field (``baggage``, or B3's when ``OTEL_PROPAGATORS`` says
    so) goes through every propagator, so that all of it travels on.
    """
    carrier: dict[str, str] = {}
    others = _other_fields(propagate.get_global_textmap())
    other = False
    for name, value in metadata:
        if isinstance(value, str):
            carrier[name] = value
            other = other or name in others
    if not other:
        return carried_context(carrier.get("traceparent", ""), carrier.get("tracestate", ""))
    extracted = propagate.extract(carrier, context=otel_context.Context())
    if trace.get_current_span(extracted).get_span_context().is_valid:
        return extracted
    return trace.set_span_in_context(trace.NonRecordingSpan(_new_trace()), extracted)


@functools.lru_cache(maxsize=4)
def _other_fields(textmap: Any) -> frozenset[str]:
    """The fields ``textmap`` reads besides W3C's ``traceparent`` and ``tracestate``."""
    return frozenset(textmap.fields) - {"traceparent", "tracestate"}


def _carrying(
    carried: otel_context.Context, behavior: Any, request_streaming: bool, response_streaming: bool
) -> Any:
    """``behavior`` run with ``carried`` as the current context (what a span-less call gets)."""
    del request_streaming  # the same either way
    if response_streaming and inspect.isasyncgenfunction(behavior):
        # A coroutine that writes each response (grpc.aio's reader/writer style), not a
        # generator: a generator grpc leaves at a yield (the caller cancelled) would be
        # finished later in another task, where the context can no longer be detached.
        # Here a cancellation ends the handler (aclosing) and the context in this task.

        async def streamed(request: Any, context: Any) -> None:
            token = otel_context.attach(carried)
            try:
                async with aclosing(behavior(request, context)) as responses:
                    async for response in responses:
                        await context.write(response)
            finally:
                otel_context.detach(token)

        return streamed

    async def awaited(request: Any, context: Any) -> Any:
        token = otel_context.attach(carried)
        try:
            return await behavior(request, context)
        finally:
            otel_context.detach(token)

    return awaited


def server_interceptor(untraced: Iterable[str] = ()) -> grpc.aio.ServerInterceptor:
    """The OTel server interceptor (outermost in every server chain).

    A call's SERVER span is made only while spans are kept (:func:`spans_kept`);
    without, its handler runs in the context the call carried.

    Args:
        untraced: Full method names (``/package.Service/Method``) that get no server
            span: long-lived streams that only follow (``WatchTask``), where a span
            held open for the life of each stream is several KiB per stream.
    """
    methods = frozenset(untraced)

    def traced(details: Any) -> bool:
        # The stock filters' health-check and reflection probes, as one plain test.
        method = details.method
        method = method.decode() if isinstance(method, bytes) else method
        return method not in methods and not method.startswith(_PROBES)

    untraced_filter: Any = traced
    stock = aio_server_interceptor(filter_=untraced_filter)  # type: ignore[no-untyped-call]  # opentelemetry-instrumentation-grpc is unannotated
    interceptor: grpc.aio.ServerInterceptor = _ServerInterceptor(  # type: ignore[no-untyped-call]  # opentelemetry-instrumentation-grpc is unannotated
        stock._tracer, filter_=untraced_filter
    )
    return interceptor


def _end_with_call(span: Any, call: Any) -> None:
    """End a streaming call's client span when the call ends, however it ends."""
    if not span.is_recording():
        return
    code = finished_call_code(call)
    span.set_attribute("rpc.grpc.status_code", code.value[0])
    if code is not grpc.StatusCode.OK:
        span.set_status(Status(StatusCode.ERROR, code.name))
    span.end()


class _SpanWhenKept:
    """Makes the CLIENT span of a call only while spans are kept (:func:`spans_kept`).

    Without, the call carries the current context itself (its ``traceparent`` is the
    caller's span, or none outside any trace): a span made and dropped per call is
    what it saves.
    """

    def _start_interceptor_span(self, method: Any) -> Any:
        if not spans_kept():
            return nullcontext(trace.NonRecordingSpan(trace.get_current_span().get_span_context()))
        return super()._start_interceptor_span(method)  # type: ignore[misc]  # a mixin: the stock interceptor class below it defines the method


class _StreamEnding:
    """Ends a streaming call's span when the call ends, not only at the last message.

    The stock interceptors end it when the response iterator is exhausted, so a caller
    that stops reading at the result (and cancels the call) would leave the span open
    until the garbage collector closes the iterator: it would be exported late or never.
    """

    # Defined by the stock client interceptor this is mixed into (unannotated there).
    _response_hook: Any
    _call_response_hook: Any
    add_error_details_to_span: Any

    def _wrap_stream_response(self, span: Any, call: Any) -> AsyncIterator[Any]:
        target = getattr(call, "_call", call)
        if hasattr(target, "add_done_callback"):
            target.add_done_callback(lambda done: _end_with_call(span, done))
        return self._responses(span, call)

    async def _responses(self, span: Any, call: Any) -> AsyncIterator[Any]:
        try:
            async for response in call:
                if self._response_hook:
                    self._call_response_hook(span, response)
                yield response
        except Exception as exc:
            if span.is_recording():
                self.add_error_details_to_span(span, exc)
            raise
        finally:
            if span.is_recording():
                span.end()


class _UnaryUnary(_SpanWhenKept, _aio_client.UnaryUnaryAioClientInterceptor):
    pass


class _StreamUnary(_SpanWhenKept, _aio_client.StreamUnaryAioClientInterceptor):
    pass


class _UnaryStream(_SpanWhenKept, _StreamEnding, _aio_client.UnaryStreamAioClientInterceptor):
    pass


class _StreamStream(_SpanWhenKept, _StreamEnding, _aio_client.StreamStreamAioClientInterceptor):
    pass


_CLIENT_INTERCEPTORS: tuple[tuple[type[Any], type[Any]], ...] = (
    (_aio_client.UnaryUnaryAioClientInterceptor, _UnaryUnary),
    (_aio_client.UnaryStreamAioClientInterceptor, _UnaryStream),
    (_aio_client.StreamUnaryAioClientInterceptor, _StreamUnary),
    (_aio_client.StreamStreamAioClientInterceptor, _StreamStream),
)


def _iterator_channel(self: Any) -> Any:
    call = getattr(self, "_call", None)
    channel = getattr(call, "_channel", None)
    if channel is None:
        channel = getattr(getattr(call, "_cython_call", None), "_channel", None)
    return channel


def _let_channels_close() -> None:
    """Work around a grpc.aio bug that intercepted streams would trigger at channel close.

    A stream interceptor that wraps the responses (as the OTel ones do) turns the call into
    a ``*CallResponseIterator``, which has neither ``_channel`` nor ``_cython_call``;
    ``Channel.close()`` then raises ``InternalError: Unrecognized call object`` when such a
    call is still open. Giving the wrapper its call's channel lets close cancel it like
    any call. Applied once, when the interceptors are first built.
    """
    module = importlib.import_module("grpc.aio._interceptor")
    wrapper = getattr(module, "_StreamCallResponseIterator", None)
    if wrapper is not None and not hasattr(wrapper, "_channel"):
        wrapper._channel = property(_iterator_channel)


def client_interceptors() -> list[grpc.aio.ClientInterceptor]:
    """The OTel client interceptors, one per call kind (outermost on every channel).

    Each makes its call's CLIENT span only while spans are kept (:func:`spans_kept`);
    without, the call carries the caller's context as it is.
    """
    _let_channels_close()
    stock: list[Any] = aio_client_interceptors(  # type: ignore[no-untyped-call]  # opentelemetry-instrumentation-grpc is unannotated
        filter_=_UNTRACED
    )
    interceptors: list[grpc.aio.ClientInterceptor] = []
    for interceptor in stock:
        for kind, ours in _CLIENT_INTERCEPTORS:
            if isinstance(interceptor, kind):
                interceptor = ours(interceptor._tracer, filter_=_UNTRACED)
                break
        interceptors.append(interceptor)
    return interceptors


def client_span(method: str) -> tuple[Any, dict[str, str]]:
    """Start the CLIENT span of a call made on a channel without the OTel interceptors.

    For hot paths that open a call per unit of work (the coordinator's ``Execute``): the
    span is what the stock interceptor would make (same name, kind and ``rpc.*``
    attributes, a child of the current span), at a fraction of its cost. End it with
    :func:`end_with_call`.

    While no span goes anywhere (:func:`spans_kept` is false) none is made: the span
    returned is a non-recording one of the current context's ids, and the headers carry
    that context on (the server's work stays in the trace; it has no span to hang off).

    Args:
        method: The full method, ``/package.Service/Method``.

    Returns:
        The span, and the W3C headers (``traceparent``...) that carry it to the server.
    """
    if not spans_kept():
        current = trace.NonRecordingSpan(trace.get_current_span().get_span_context())
        return current, span_headers(current)
    service, _, name = method.lstrip("/").partition("/")
    span = tracer.start_span(
        method,
        kind=SpanKind.CLIENT,
        attributes={
            "rpc.system": "grpc",
            "rpc.service": service,
            "rpc.method": name,
            "rpc.grpc.status_code": grpc.StatusCode.OK.value[0],
        },
    )
    carrier: dict[str, str] = {}
    propagate.inject(carrier, context=trace.set_span_in_context(span))
    return span, carrier


@contextmanager
def server_span(
    method: str,
    traceparent: str,
    tracestate: str = "",
    *,
    attributes: Mapping[str, str | int] | None = None,
) -> Iterator[Any]:
    """A SERVER span for work that arrives inside a long-lived stream, not as a call.

    For the attempts an agent runs on one ``Link`` stream: each is what an ``Execute``
    call would be, so it gets the server span the OTel interceptor would make, a child
    of the context the frame carried (a new trace when it carried none).

    While no span goes anywhere (:func:`spans_kept` is false: no exporter), no span is
    made: the carried context itself is current for the block (a non-recording span
    of the caller's ids, or of a new trace when it carried none), so calls made in it
    still carry the work's ``traceparent`` and log lines its trace id.

    Args:
        method: The full method the span is named after, ``/package.Service/Method``.
        traceparent: The W3C ``traceparent`` the work carried ("" for none).
        tracestate: The W3C ``tracestate`` that goes with it.
        attributes: Extra span attributes.
    """
    if not spans_kept():
        carried = carried_context(traceparent, tracestate)
        token = otel_context.attach(carried)
        try:
            yield trace.get_current_span(carried)
        finally:
            otel_context.detach(token)
        return
    headers = {"traceparent": traceparent} if traceparent else {}
    if tracestate:
        headers["tracestate"] = tracestate
    service, _, name = method.lstrip("/").partition("/")
    with tracer.start_as_current_span(
        method,
        context=propagate.extract(headers) if headers else otel_context.Context(),
        kind=SpanKind.SERVER,
        attributes={"rpc.system": "grpc", "rpc.service": service, "rpc.method": name}
        | dict(attributes or {}),
    ) as span:
        yield span


def carried_context(traceparent: str, tracestate: str = "") -> otel_context.Context:
    """A context whose current span is the (non-recording) span ``traceparent`` names.

    What ``propagate.extract`` gives for W3C headers, without running every configured
    propagator for the well-formed ``traceparent`` a hivewire peer writes. Without a
    valid one, the context of a new trace (random ids, sampled): what a root span
    would have started, so the work still has a trace id to carry and log.
    """
    parent = _remote_span_context(traceparent, tracestate)
    if parent is None and traceparent:
        # Not what a hivewire peer writes (another version, spaces...): the standard way.
        headers = {"traceparent": traceparent}
        if tracestate:
            headers["tracestate"] = tracestate
        extracted = propagate.extract(headers, context=otel_context.Context())
        if trace.get_current_span(extracted).get_span_context().is_valid:
            return extracted
    if parent is None:
        parent = _new_trace()
    return trace.set_span_in_context(trace.NonRecordingSpan(parent), otel_context.Context())


def _new_trace() -> trace.SpanContext:
    """The ids a root span would start: a new trace, sampled."""
    return trace.SpanContext(
        trace_id=_IDS.generate_trace_id(),
        span_id=_IDS.generate_span_id(),
        is_remote=False,
        trace_flags=trace.TraceFlags(trace.TraceFlags.SAMPLED),
    )


def _remote_span_context(traceparent: str, tracestate: str) -> trace.SpanContext | None:
    """The span context of a well-formed version-00 ``traceparent``; None otherwise."""
    if not _TRACEPARENT.match(traceparent) or not traceparent.startswith("00-"):
        return None
    _, trace_id, span_id, flags = traceparent.split("-")
    span_context = trace.SpanContext(
        trace_id=int(trace_id, 16),
        span_id=int(span_id, 16),
        is_remote=True,
        trace_flags=trace.TraceFlags(int(flags, 16)),
        trace_state=trace.TraceState.from_header([tracestate]) if tracestate else None,
    )
    return span_context if span_context.is_valid else None


def kept_span(
    name: str, *, attributes: Mapping[str, str | int] | None = None
) -> AbstractContextManager[Any]:
    """A span of ``name``, current for the block, while spans are kept (an exporter).

    Otherwise nothing is made and the block runs in the current context (its span is
    still the parent of what the block calls): a span nobody sees costs the same as
    one somebody does.
    """
    if not spans_kept():
        return nullcontext()
    return tracer.start_as_current_span(name, attributes=attributes)


def end_with_call(span: Any, call: Any) -> None:
    """End ``span`` (from :func:`client_span`) with the call's status when the call ends."""
    call.add_done_callback(lambda done: _end_with_call(span, done))


def current_ids() -> tuple[str, str] | None:
    """``(trace id, span id)`` in hex of the current span, or None outside any."""
    span_context = trace.get_current_span().get_span_context()
    if not span_context.is_valid:
        return None
    return f"{span_context.trace_id:032x}", f"{span_context.span_id:016x}"


def inject(carrier: MutableMapping[str, str]) -> None:
    """Write the current context (``traceparent``, ``tracestate``) into ``carrier``."""
    propagate.inject(carrier)


def extract(carrier: Mapping[str, str]) -> otel_context.Context:
    """The context carried by ``carrier`` (headers), ready to be a span's parent."""
    return propagate.extract(carrier)


class TraceCarrier(Protocol):
    """Something that keeps a W3C context: ``common.v1.RequestMetadata``."""

    traceparent: str
    tracestate: str


def stamp(carrier: TraceCarrier) -> None:
    """Store the current context in ``carrier`` so later work can continue the trace.

    Outside any span the carrier keeps what the client put there if it is a well-formed
    ``traceparent`` (and loses it otherwise).
    """
    headers = span_headers(trace.get_current_span())
    if headers:
        carrier.traceparent = headers["traceparent"]
        carrier.tracestate = headers.get("tracestate", "")[:_MAX_TRACESTATE]
    elif not _TRACEPARENT.match(carrier.traceparent):
        carrier.traceparent = ""
        carrier.tracestate = ""


def stored_context(carrier: TraceCarrier) -> otel_context.Context | None:
    """The context :func:`stamp` stored, or None when there is none."""
    if not carrier.traceparent:
        return None
    return _extracted(carrier.traceparent, carrier.tracestate)


@functools.lru_cache(maxsize=1024)
def _extracted(traceparent: str, tracestate: str) -> otel_context.Context | None:
    # Cached: a task's events and hops resume its one stored context again and again,
    # and a Context is immutable. Extracted into an empty context, not the current one:
    # a cached value must not carry what the first caller's context held.
    parent = _remote_span_context(traceparent, tracestate)
    if parent is not None:
        return trace.set_span_in_context(trace.NonRecordingSpan(parent), otel_context.Context())
    headers = {"traceparent": traceparent}
    if tracestate:
        headers["tracestate"] = tracestate
    ctx = propagate.extract(headers, context=otel_context.Context())
    return ctx if trace.get_current_span(ctx).get_span_context().is_valid else None


def resume_context(carrier: TraceCarrier) -> otel_context.Context | None:
    """The parent :func:`resumed` gives work on ``carrier``'s trace; None: the current one.

    A current span of the stored trace is kept (it is the closer parent); otherwise the
    stored context is the parent. For ``tracer.start_span(..., context=...)`` where
    attaching the context for a block would cost more than the span itself.
    """
    stored = stored_context(carrier)
    if stored is None:
        return None
    current = trace.get_current_span().get_span_context()
    if (
        current.is_valid
        and current.trace_id == trace.get_current_span(stored).get_span_context().trace_id
    ):
        return None
    return stored


def spans_kept() -> bool:
    """Whether a finished span goes anywhere: an exporter or a collector is installed.

    With the SDK provider of :func:`setup_tracing` and no OTLP endpoint, a span is made
    and dropped, unseen by anyone. A hot path that makes a span only to put its context
    on a message (the coordinator's event envelopes) may then carry its parent's
    context instead. Any other provider (the API's default, a vendor's) counts as kept.
    """
    provider = trace.get_tracer_provider()
    if not isinstance(provider, TracerProvider):
        return True
    processor = getattr(provider, "_active_span_processor", None)
    return bool(getattr(processor, "_span_processors", True))


def span_headers(span: Any) -> dict[str, str]:
    """The W3C headers (``traceparent``, ``tracestate``) naming ``span`` as the parent.

    What ``propagate.inject`` writes for a current ``span``, without making it current
    and without running every configured propagator.
    """
    span_context = span.get_span_context()
    if not span_context.is_valid:
        return {}
    headers = {
        "traceparent": (
            f"00-{span_context.trace_id:032x}-{span_context.span_id:016x}"
            f"-{span_context.trace_flags:02x}"
        )
    }
    if span_context.trace_state:
        headers["tracestate"] = span_context.trace_state.to_header()
    return headers


@contextmanager
def resumed(
    carrier: TraceCarrier,
    name: str | None = None,
    *,
    attributes: Mapping[str, str | int] | None = None,
) -> Iterator[None]:
    """Continue the trace stored in ``carrier`` for the block.

    A current span of the same trace is kept (it is the closer parent); otherwise the
    stored context becomes current. With ``name``, a span of that name is opened while
    spans are kept (:func:`spans_kept`); without, the block runs in the resumed context.

    Args:
        carrier: Where :func:`stamp` stored the context.
        name: Open a span with this name inside the resumed context.
        attributes: Attributes of that span.
    """
    stored = resume_context(carrier)
    token = otel_context.attach(stored) if stored is not None else None
    try:
        if name is None or not spans_kept():
            yield
        else:
            with tracer.start_as_current_span(name, attributes=attributes):
                yield
    finally:
        if token is not None:
            otel_context.detach(token)
