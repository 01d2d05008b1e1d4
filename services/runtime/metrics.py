"""Prometheus metrics: the shared gRPC metric objects and the HTTP exposition server.

Every metric lives in prometheus_client's default registry (:data:`REGISTRY`), so a
service's own ``hivewire_*`` metrics defined with prometheus_client's defaults show
up on the same endpoint. Never label by an id (task, agent instance, correlation).
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
import threading
from wsgiref.simple_server import WSGIRequestHandler, make_server

from prometheus_client import (
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    make_wsgi_app,
)
from prometheus_client.exposition import ThreadingWSGIServer

from hivewire.services.runtime.heaptrim import c_heap
from hivewire.services.runtime.tls import TlsFiles

logger = logging.getLogger(__name__)

__all__ = [
    "CLIENT_HANDLED",
    "CLIENT_HANDLING_SECONDS",
    "CLIENT_STARTED",
    "REGISTRY",
    "SERVER_HANDLED",
    "SERVER_HANDLING_SECONDS",
    "SERVER_MSG_RECEIVED",
    "SERVER_MSG_SENT",
    "SERVER_STARTED",
    "ASYNCIO_TASKS",
    "C_HEAP",
    "BoundedLabel",
    "MetricsServer",
    "start_metrics_server",
    "watch_c_heap",
    "watch_event_loop",
]

_CALL_LABELS = ("grpc_type", "grpc_service", "grpc_method")

# Latency buckets for RPCs on loopback and in a LAN: sub-millisecond hops up to
# long-running streams.
_BUCKETS = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    300.0,
)


def _call_metrics(side: str, started_help: str) -> tuple[Counter, Counter, Histogram]:
    """The started, handled and handling-time metrics of one side (``server``, ``client``)."""
    return (
        Counter(f"grpc_{side}_started_total", started_help, _CALL_LABELS, registry=REGISTRY),
        Counter(
            f"grpc_{side}_handled_total",
            f"RPCs completed on the {side}, by status code.",
            (*_CALL_LABELS, "grpc_code"),
            registry=REGISTRY,
        ),
        Histogram(
            f"grpc_{side}_handling_seconds",
            f"Time from the start of an RPC to its status on the {side}.",
            _CALL_LABELS,
            buckets=_BUCKETS,
            registry=REGISTRY,
        ),
    )


SERVER_STARTED, SERVER_HANDLED, SERVER_HANDLING_SECONDS = _call_metrics(
    "server", "RPCs started on the server."
)
SERVER_MSG_RECEIVED = Counter(
    "grpc_server_msg_received_total",
    "Request messages received by the server.",
    _CALL_LABELS,
    registry=REGISTRY,
)
SERVER_MSG_SENT = Counter(
    "grpc_server_msg_sent_total",
    "Response messages sent by the server.",
    _CALL_LABELS,
    registry=REGISTRY,
)
CLIENT_STARTED, CLIENT_HANDLED, CLIENT_HANDLING_SECONDS = _call_metrics(
    "client", "RPCs started by clients."
)


ASYNCIO_TASKS = Gauge(
    "hivewire_asyncio_tasks",
    "Unfinished asyncio tasks of the service's event loop (a leak shows as steady growth).",
    registry=REGISTRY,
)


C_HEAP = Gauge(
    "hivewire_c_heap_bytes",
    "The C heap (glibc malloc, all arenas): in_use = allocated, free = freed but kept "
    "by malloc. Native memory kept per request shows in in_use; RSS minus both is "
    "mostly Python's own allocator and mapped files.",
    ("kind",),
    registry=REGISTRY,
)


def watch_c_heap() -> None:
    """Report the C heap (:func:`~hivewire.services.runtime.heaptrim.c_heap`) when scraped.

    Nothing is reported on a C library without ``mallinfo2``.
    """
    if c_heap() is None:
        return
    C_HEAP.labels("in_use").set_function(lambda: getattr(c_heap(), "in_use", 0))
    C_HEAP.labels("free").set_function(lambda: getattr(c_heap(), "free", 0))


def watch_event_loop(loop: asyncio.AbstractEventLoop) -> None:
    """Report ``loop``'s unfinished asyncio tasks as :data:`ASYNCIO_TASKS`.

    Counted only when the endpoint is scraped (from the metrics thread;
    :func:`asyncio.all_tasks` copes with the set changing meanwhile), so the
    event loop pays nothing.
    """
    ASYNCIO_TASKS.set_function(lambda: len(asyncio.all_tasks(loop)))


class BoundedLabel:
    """Label values from callers, capped: the first ``limit`` distinct values, then one.

    Every label value is a time series kept for the life of the process, so a value a
    caller chooses (a model name, say) must not grow them without end: values beyond
    the first ``limit`` distinct ones are all reported as ``other``.

    Args:
        limit: Distinct values kept.
        other: The value reported for every value beyond the limit.
    """

    def __init__(self, limit: int = 64, other: str = "_other") -> None:
        self._limit = limit
        self._other = other
        self._seen: set[str] = set()
        self._lock = threading.Lock()

    def __call__(self, value: str) -> str:
        """The label to use for ``value``."""
        if value in self._seen:
            return value
        with self._lock:
            if len(self._seen) < self._limit:
                self._seen.add(value)
                return value
        return self._other


def split_method(full_method: str) -> tuple[str, str]:
    """Split ``/pkg.Service/Method`` into ``("pkg.Service", "Method")``."""
    service, _, method = full_method.lstrip("/").rpartition("/")
    return (service or "unknown"), (method or "unknown")


class _IPv6Server(ThreadingWSGIServer):
    address_family = socket.AF_INET6


class _QuietHandler(WSGIRequestHandler):
    """Scrapes arrive every few seconds: keep them out of the logs."""

    def log_message(self, format: str, *args: object) -> None:
        pass


class MetricsServer:
    """A running Prometheus exposition endpoint (``GET /metrics``) on its own thread."""

    def __init__(
        self,
        host: str,
        port: int,
        registry: CollectorRegistry = REGISTRY,
        *,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        """Bind and start serving.

        Args:
            host: Interface to bind.
            port: Port to bind; 0 picks a free one.
            registry: Registry to expose.
            tls: Serve HTTPS with this server context (None: plain HTTP).
        """
        server_class = _IPv6Server if ":" in host else ThreadingWSGIServer
        self._httpd = make_server(
            host, port, make_wsgi_app(registry), server_class, handler_class=_QuietHandler
        )
        if tls is not None:
            self._httpd.socket = tls.wrap_socket(self._httpd.socket, server_side=True)
        self.host = host
        self.port: int = self._httpd.server_port
        # A short poll interval keeps close() quick; the cost is a wakeup every 100 ms.
        self._thread = threading.Thread(
            target=self._httpd.serve_forever,
            kwargs={"poll_interval": 0.1},
            name=f"metrics-{self.port}",
            daemon=True,
        )
        self._thread.start()
        self._closed = False

    def close(self) -> None:
        """Stop serving and release the port (blocks up to ~0.1 s)."""
        if self._closed:
            return
        self._closed = True
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join()


def metrics_tls_context(files: TlsFiles) -> ssl.SSLContext:
    """HTTPS for the metrics endpoint: this identity's certificate, mesh clients only."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(str(files.cert), str(files.key))
    context.load_verify_locations(cafile=str(files.ca))
    context.verify_mode = ssl.CERT_REQUIRED
    return context


def start_metrics_server(
    host: str, port: int, *, tls: ssl.SSLContext | None = None
) -> MetricsServer:
    """Serve the default registry over HTTP (or HTTPS).

    Args:
        host: Interface to bind (``127.0.0.1`` by default; ``0.0.0.0`` in a container).
        port: Port; 0 picks a free one (read it back from ``.port``).
        tls: Serve HTTPS with this context (see :func:`metrics_tls_context`).

    Returns:
        The running server; call ``.close()`` to stop it.
    """
    server = MetricsServer(host, port, tls=tls)
    scheme = "https" if tls is not None else "http"
    logger.info("metrics on %s://%s:%d/metrics", scheme, host, server.port)
    return server
