"""An HTTPS server for the mesh's HTTP protocols (A2A JSON-RPC, MCP), with the mesh's mTLS.

The gRPC services use :class:`~hivewire.services.runtime.server.ServiceServer`; the
few HTTP endpoints (the A2A gateway, the tool service's MCP endpoint) run an ASGI app
under uvicorn with the same certificates: the identity's certificate, the mesh CA,
and a client certificate required (``ssl.CERT_REQUIRED``), or verified when presented
(``ssl.CERT_OPTIONAL``) for an app that authenticates its callers itself (bearer
tokens: :mod:`~hivewire.services.runtime.httpauth`)::

    async with HttpsServer(app, files, host="127.0.0.1", port=0) as server:
        print(server.url)

Every request's scope carries the ASGI TLS extension (``scope["extensions"]["tls"]``,
``client_cert_chain``: the client's certificate as PEM), which uvicorn does not provide
itself: :class:`TlsScopeProtocol` adds it.

Signals stay with the process's own handler (``serve_until_signal``): uvicorn's are
not installed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
from collections.abc import Generator
from typing import Any

import uvicorn
from uvicorn.protocols.http.auto import AutoHTTPProtocol

from hivewire.services.base.lifecycle import StartStop
from hivewire.services.runtime.tls import TlsFiles

logger = logging.getLogger(__name__)

_STARTUP_TIMEOUT = 30.0


class _Server(uvicorn.Server):
    """uvicorn without its signal handlers: the service's own shutdown stops it."""

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield


_TLS_VERSIONS = {"TLSv1.2": 0x0303, "TLSv1.3": 0x0304}


def tls_extension(ssl_object: ssl.SSLObject | None) -> dict[str, Any]:
    """The ASGI TLS extension of a connection: its verified client certificate, if any."""
    der = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
    return {
        "server_cert": None,
        "client_cert_chain": [ssl.DER_cert_to_PEM_cert(der)] if der else [],
        "client_cert_name": None,
        "client_cert_error": None,
        "tls_version": _TLS_VERSIONS.get(ssl_object.version() or "") if ssl_object else None,
        "cipher_suite": None,
    }


class TlsScopeProtocol(AutoHTTPProtocol):  # type: ignore[misc,valid-type]  # uvicorn picks this base class at import time
    """uvicorn's HTTP protocol, adding the ASGI TLS extension to every request's scope."""

    def connection_made(self, transport: asyncio.Transport) -> None:
        """Read the connection's TLS details once, and wrap the app to hand them on."""
        super().connection_made(transport)
        tls = tls_extension(transport.get_extra_info("ssl_object"))
        protocol: Any = self  # uvicorn's protocols keep the app untyped
        app = protocol.app

        async def with_tls(scope: dict[str, Any], receive: Any, send: Any) -> None:
            scope["extensions"] = {**(scope.get("extensions") or {}), "tls": tls}
            await app(scope, receive, send)

        protocol.app = with_tls


def _hostport(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class HttpsServer(StartStop):
    """An ASGI app served over mutual TLS on one port until the block ends."""

    def __init__(
        self,
        app: Any,
        files: TlsFiles,
        *,
        host: str,
        port: int,
        require_client_cert: bool = True,
        grace: int = 2,
    ) -> None:
        """Prepare the server (nothing listens until ``async with``).

        Args:
            app: The ASGI application.
            files: The serving identity's CA, certificate and key.
            host: Interface to bind.
            port: Port to bind; 0 picks a free one (read :attr:`port` after start).
            require_client_cert: Refuse clients without a certificate of the mesh CA;
                False: verify one when presented, accept clients without one (the app
                then authenticates them).
            grace: Seconds open requests (streams) get to finish on shutdown.
        """
        files.read()  # fail early, with the hint, when a file is missing
        self._socket = socket.create_server((host, port), family=_family(host), reuse_port=False)
        self.host = host
        self.port: int = self._socket.getsockname()[1]
        self._config = uvicorn.Config(
            app,
            ssl_certfile=str(files.cert),
            ssl_keyfile=str(files.key),
            ssl_ca_certs=str(files.ca),
            ssl_cert_reqs=ssl.CERT_REQUIRED if require_client_cert else ssl.CERT_OPTIONAL,
            http=TlsScopeProtocol,
            log_config=None,
            access_log=False,
            lifespan="on",
            timeout_graceful_shutdown=grace,
        )
        self._server = _Server(self._config)
        self._task: asyncio.Task[None] | None = None

    @property
    def address(self) -> str:
        """``host:port`` the server listens on."""
        return _hostport(self.host, self.port)

    @property
    def url(self) -> str:
        """``https://host:port``."""
        return f"https://{self.address}"

    async def start(self) -> None:
        """Listen; return once the server accepts connections."""
        self._task = asyncio.create_task(self._server.serve(sockets=[self._socket]))
        async with asyncio.timeout(_STARTUP_TIMEOUT):
            while not self._server.started:
                if self._task.done():
                    self._task.result()
                    raise RuntimeError("the HTTPS server stopped during startup")
                await asyncio.sleep(0.01)
        logger.info("serving HTTPS on %s", self.address)

    async def stop(self) -> None:
        """Stop serving (open requests get the grace period) and close the socket."""
        self._server.should_exit = True
        if self._task is not None:
            try:
                await self._task
            except Exception:
                logger.exception("HTTPS server on %s failed while stopping", self.address)
        self._socket.close()


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET
