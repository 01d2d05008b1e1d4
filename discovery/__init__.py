"""Service discovery: the Registry protocol and its Consul and embedded (NATS KV) backends.

Services depend on :class:`Registry` only and get one from :func:`open_registry`, driven by
the ``HIVEWIRE_DISCOVERY`` setting::

    async with open_registry(settings.discovery, nats_url=settings.nats_url,
                             consul_token=settings.consul_token) as registry:
        await registry.register(Instance(service="hivewire-agent", ...))
        async for healthy in registry.watch("hivewire-agent"):
            ...
"""

from __future__ import annotations

import urllib.parse
from typing import Any

from . import registry
from .registry import *  # noqa: F403 (the protocol and its values, registry.__all__)
from .registry import META_INSTANCE_NAME, Registry

__all__ = ["META_INSTANCE_NAME", "open_registry", "parse_duration"]
__all__ += registry.__all__

_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_duration(value: str | float | int) -> float:
    """Seconds from a number or a simple duration (``"15s"``, ``"500ms"``, ``"1m"``, ``"2"``).

    Raises:
        ValueError: Not a duration.
    """
    if isinstance(value, int | float):
        return float(value)
    text = value.strip().lower()
    for unit in ("ms", "s", "m", "h"):
        if text.endswith(unit):
            number = text[: -len(unit)]
            try:
                return float(number) * _UNITS[unit]
            except ValueError:
                break
    try:
        return float(text)
    except ValueError:
        raise ValueError(f"not a duration: {value!r}") from None


# URL query keys -> (option name, parser); anything else in the query is an error.
_CONSUL_QUERY: dict[str, tuple[str, Any]] = {
    "checks": ("checks", lambda v: tuple(x.strip() for x in v.split(",") if x.strip())),
    "ttl": ("ttl", parse_duration),
    "deregister_after": ("deregister_critical_after", parse_duration),
    "grpc_interval": ("grpc_interval", parse_duration),
    "wait": ("watch_wait", parse_duration),
    "watch_interval": ("watch_interval", parse_duration),
    "ca": ("verify", str),
}
_EMBEDDED_QUERY: dict[str, tuple[str, Any]] = {
    "bucket": ("bucket", str),
    "ttl": ("ttl", parse_duration),
}


def _query_options(query: str, table: dict[str, tuple[str, Any]], url: str) -> dict[str, Any]:
    options: dict[str, Any] = {}
    for key, value in urllib.parse.parse_qsl(query, keep_blank_values=True):
        if key not in table:
            raise ValueError(f"unknown option {key!r} in discovery URL {url!r}")
        name, parse = table[key]
        options[name] = parse(value)
    return options


def open_registry(
    url: str,
    *,
    nats_url: str,
    consul_token: str | None = None,
    **options: Any,
) -> Registry:
    """Build the registry a discovery URL names (not started: use ``async with``).

    Args:
        url: ``"nats"`` (embedded, on ``nats_url``), ``"nats://host:port"`` (embedded on
            that server; both take the query options ``bucket=<name>`` and ``ttl=15s``, as
            in ``"nats?ttl=5s"``), ``"consul://host:port"`` / ``"consul+https://host:port"``
            (Consul agent; query options ``checks=ttl,grpc``, ``ttl=15s``,
            ``deregister_after=1m``, ``grpc_interval=5s``, ``wait=55s``,
            ``watch_interval=15s``, ``ca=<path>``), or ``"static"`` /
            ``"static:<json or file>"``.
        nats_url: The mesh's NATS URL (used by the embedded backend).
        consul_token: Consul ACL token.
        **options: Backend keyword options; they override URL query options.

    Raises:
        ValueError: Unknown scheme or option.
    """
    text = url.strip()
    base, _, query = text.partition("?")
    if base in ("", "nats", "embedded"):
        from .embedded import EmbeddedRegistry

        merged = {**_query_options(query, _EMBEDDED_QUERY, url), **options}
        return EmbeddedRegistry(nats_url, **merged)
    if text == "static" or text.startswith("static:"):
        from .static import StaticRegistry, load_static_instances

        return StaticRegistry(load_static_instances(text.partition(":")[2]), **options)
    parsed = urllib.parse.urlsplit(text)
    scheme = parsed.scheme.lower()
    if scheme in ("nats", "tls", "nats+tls"):
        from .embedded import EmbeddedRegistry

        server = urllib.parse.urlunsplit((parsed.scheme, parsed.netloc, parsed.path, "", ""))
        merged = {**_query_options(parsed.query, _EMBEDDED_QUERY, url), **options}
        return EmbeddedRegistry(server, **merged)
    if scheme in ("consul", "consul+http", "consul+https"):
        from .consul import ConsulRegistry

        merged = {**_query_options(parsed.query, _CONSUL_QUERY, url), **options}
        return ConsulRegistry(
            parsed.hostname or "127.0.0.1",
            parsed.port or 8500,
            scheme="https" if scheme == "consul+https" else "http",
            token=consul_token,
            **merged,
        )
    raise ValueError(f"unknown discovery URL {url!r}: use nats, consul://host:port or static")
