"""Client channels: mTLS, tracing, correlation id, default deadline, aligned keepalive.

Services never build channels themselves: they take them from here, usually from a
long-lived :class:`ChannelPool` (one channel per target, so no TLS handshake per
call). The keepalive and message-size options shared by clients and servers live in
this module too, so both sides always agree.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import grpc

from hivewire.services.base.lifecycle import StartClose
from hivewire.services.runtime import tracing
from hivewire.services.runtime.config import DEFAULT_MAX_MESSAGE_BYTES, Settings
from hivewire.services.runtime.interceptors import (
    CorrelationClientInterceptor,
    split_client_interceptors,
)
from hivewire.services.runtime.tls import TlsFiles, channel_credentials

logger = logging.getLogger(__name__)

ChannelOption = tuple[str, Any]

USER_AGENT = "hivewire"

# Clients ping every 30 s (10 s to answer) even when idle, so dead peers and
# half-open connections are found quickly. Servers must accept pings at least that
# often or they answer GOAWAY too_many_pings; 20 s leaves margin for timer jitter.
CLIENT_KEEPALIVE_TIME_MS = 30_000
CLIENT_KEEPALIVE_TIMEOUT_MS = 10_000
SERVER_MIN_PING_INTERVAL_MS = 20_000
SERVER_KEEPALIVE_TIME_MS = 60_000
SERVER_KEEPALIVE_TIMEOUT_MS = 20_000


def channel_options(max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> list[ChannelOption]:
    """Options for every client channel (keepalive, message sizes, user agent)."""
    return [
        ("grpc.keepalive_time_ms", CLIENT_KEEPALIVE_TIME_MS),
        ("grpc.keepalive_timeout_ms", CLIENT_KEEPALIVE_TIMEOUT_MS),
        ("grpc.keepalive_permit_without_calls", 1),
        # 0 = keep pinging an idle connection (the default stops after 2 pings).
        ("grpc.http2.max_pings_without_data", 0),
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.primary_user_agent", USER_AGENT),
    ]


def server_options(max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> list[ChannelOption]:
    """Options for every server (ping policy matching the clients, message sizes)."""
    return [
        ("grpc.http2.min_ping_interval_without_data_ms", SERVER_MIN_PING_INTERVAL_MS),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.keepalive_time_ms", SERVER_KEEPALIVE_TIME_MS),
        ("grpc.keepalive_timeout_ms", SERVER_KEEPALIVE_TIMEOUT_MS),
        ("grpc.http2.max_ping_strikes", 2),
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
        # Without this, two servers could bind the same fixed port on Linux and split
        # the traffic silently; a taken port must be an error.
        ("grpc.so_reuseport", 0),
    ]


def merge_options(
    defaults: Sequence[ChannelOption], overrides: Sequence[ChannelOption]
) -> list[ChannelOption]:
    """Combine option lists; a key in ``overrides`` replaces the default."""
    merged = dict(defaults)
    merged.update(dict(overrides))
    return list(merged.items())


def secure_channel(
    target: str,
    files: TlsFiles,
    *,
    server_name: str | None = None,
    interceptors: Sequence[grpc.aio.ClientInterceptor] = (),
    options: Sequence[ChannelOption] = (),
    default_timeout: float | None = 30.0,
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    bearer: str | None = None,
    intercepted: bool = True,
) -> grpc.aio.Channel:
    """Open an mTLS channel with the standard client interceptor and options.

    Args:
        target: ``host:port`` (or any gRPC target string).
        files: This client's identity (CA, certificate, key).
        server_name: Name to verify in the server certificate instead of the target's
            host. Mesh certificates carry ``localhost`` and ``127.0.0.1`` SANs, so
            this is rarely needed.
        interceptors: More client interceptors, run inside the correlation one
            (e.g. one adding a bearer token).
        options: Channel options replacing the defaults of :func:`channel_options`.
        default_timeout: Deadline (s) for unary-response calls that set none.
        max_message_bytes: Largest message sent or received.
        bearer: An end user's API key or JWT, sent as ``authorization: Bearer <bearer>``
            on every call (docs/security.md); None sends none.
        intercepted: False gives a channel without any client interceptor (``interceptors``
            included), for a hot path that carries the correlation id, deadline, trace
            context (:func:`~hivewire.services.runtime.tracing.client_span`) and metrics
            (:func:`~hivewire.services.runtime.interceptors.observe_client_call`) of its
            calls itself: grpc.aio runs every intercepted stream through an extra task
            and queue per call and per message.

    Returns:
        A ``grpc.aio.Channel``; close it (``await channel.close()``) when done.
    """
    opts = channel_options(max_message_bytes)
    if server_name:
        opts.append(("grpc.ssl_target_name_override", server_name))
    credentials = channel_credentials(files)
    if bearer:
        credentials = grpc.composite_channel_credentials(
            credentials, grpc.access_token_call_credentials(bearer)
        )
    if not intercepted:
        return grpc.aio.secure_channel(target, credentials, options=merge_options(opts, options))
    # Tracing outermost: the client span covers the whole call, and its context is
    # what the metadata carries.
    chain: list[grpc.aio.ClientInterceptor] = [
        *tracing.client_interceptors(),
        CorrelationClientInterceptor(default_timeout),
    ]
    chain.extend(interceptors)
    return grpc.aio.secure_channel(
        target,
        credentials,
        options=merge_options(opts, options),
        interceptors=split_client_interceptors(chain),
    )


class ChannelPool(StartClose):
    """One long-lived channel per target, closed together.

    Use as an async context manager owned by a service's lifecycle::

        async with ChannelPool.from_settings(settings) as pool:
            stub = ModelServiceStub(pool.get("127.0.0.1:50061"))
    """

    def __init__(
        self,
        files: TlsFiles,
        *,
        interceptors: Sequence[grpc.aio.ClientInterceptor] = (),
        options: Sequence[ChannelOption] = (),
        default_timeout: float | None = 30.0,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    ) -> None:
        """Create an empty pool.

        Args:
            files: Identity used for every channel.
            interceptors: Extra client interceptors for every channel.
            options: Channel option overrides for every channel.
            default_timeout: Deadline for unary-response calls that set none.
            max_message_bytes: Largest message sent or received.
        """
        self._files = files
        self._interceptors = tuple(interceptors)
        self._options = tuple(options)
        self._default_timeout = default_timeout
        self._max_message_bytes = max_message_bytes
        self._channels: dict[tuple[str, str | None, bool], grpc.aio.Channel] = {}
        self._closed = False

    @classmethod
    def from_settings(
        cls,
        settings: Settings,
        *,
        interceptors: Sequence[grpc.aio.ClientInterceptor] = (),
        options: Sequence[ChannelOption] = (),
    ) -> ChannelPool:
        """Build a pool with the process identity, deadline and size limits of ``settings``."""
        return cls(
            settings.tls_files(),
            interceptors=interceptors,
            options=options,
            default_timeout=settings.default_deadline,
            max_message_bytes=settings.max_message_bytes,
        )

    def get(
        self, target: str, *, server_name: str | None = None, intercepted: bool = True
    ) -> grpc.aio.Channel:
        """Return the channel for ``target``, opening it on first use.

        Args:
            target: ``host:port``.
            server_name: Certificate name override (see :func:`secure_channel`).
            intercepted: False: a channel of its own without client interceptors (see
                :func:`secure_channel`).

        Raises:
            RuntimeError: The pool is closed.
        """
        if self._closed:
            raise RuntimeError("channel pool is closed")
        key = (target, server_name, intercepted)
        channel = self._channels.get(key)
        if channel is None:
            channel = secure_channel(
                target,
                self._files,
                server_name=server_name,
                interceptors=self._interceptors,
                options=self._options,
                default_timeout=self._default_timeout,
                max_message_bytes=self._max_message_bytes,
                intercepted=intercepted,
            )
            self._channels[key] = channel
            logger.debug("opened channel to %s", target)
        return channel

    def __contains__(self, target: str) -> bool:
        return any(key[0] == target for key in self._channels)

    def __len__(self) -> int:
        return len(self._channels)

    async def discard(self, target: str, *, grace: float | None = None) -> None:
        """Close and forget the channels to ``target`` (e.g. the instance left)."""
        for key in [k for k in self._channels if k[0] == target]:
            await self._channels.pop(key).close(grace)

    async def close(self, grace: float | None = None) -> None:
        """Close every channel; later ``get`` calls fail.

        Args:
            grace: Seconds to let in-flight calls finish; None cancels them at once.
        """
        self._closed = True
        channels, self._channels = list(self._channels.values()), {}
        for channel in channels:
            await channel.close(grace)

    async def start(self) -> None:
        """Nothing to start: each channel opens when first asked for (:meth:`get`)."""
