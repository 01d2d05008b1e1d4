"""What every HTTP backend shares: the pooled client with uniform error mapping, and
:class:`HttpBackend`, the base of the Ollama and OpenAI-compatible backends.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, ClassVar

import httpx

from hivewire.services.model.backends.base import (
    BackendUnavailable,
    EmbedResult,
    ModelEntry,
    SamplingParams,
    http_error,
    timeouts,
    transport_error,
)

logger = logging.getLogger(__name__)

ERROR_BODY_LIMIT = 64 * 1024
"""Bytes of an error body read (a summary of it goes into the status details)."""


class HttpClient:
    """One long-lived, pooled ``httpx.AsyncClient`` for one backend.

    Every call gets its timeouts from the caller's remaining time. HTTP error
    statuses and transport failures come out as domain errors (see
    :func:`~hivewire.services.model.backends.base.http_error`), so backends only
    parse successful bodies.
    """

    def __init__(
        self,
        backend: str,
        base_url: str,
        *,
        connect_timeout: float,
        max_connections: int,
        retry_after: float,
        headers: Mapping[str, str] | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        """Create the client (no connection is made until the first call).

        Args:
            backend: Backend name, for errors and logs.
            base_url: Base URL every path is relative to.
            connect_timeout: Upper bound of a connection attempt, in seconds.
            max_connections: Pool size.
            retry_after: RetryInfo delay suggested when the backend is down.
            headers: Headers sent on every request (authorization...).
            transport: A custom transport (tests).
        """
        self.backend = backend
        self.base_url = base_url
        self._connect_timeout = connect_timeout
        self._retry_after = retry_after
        self._client = httpx.AsyncClient(
            base_url=base_url,
            headers=dict(headers or {}),
            limits=httpx.Limits(
                max_connections=max_connections, max_keepalive_connections=max_connections
            ),
            timeout=timeouts(connect_timeout, 30.0),
            transport=transport,
        )

    async def _raise_for_status(self, response: httpx.Response, model: str) -> None:
        if response.status_code < 400:
            return
        chunks: list[bytes] = []
        size = 0
        async for chunk in response.aiter_bytes():
            chunks.append(chunk)
            size += len(chunk)
            if size >= ERROR_BODY_LIMIT:
                break
        raise http_error(
            self.backend,
            model,
            response.status_code,
            b"".join(chunks)[:ERROR_BODY_LIMIT],
            retry_after=self._retry_after,
            retry_after_header=response.headers.get("retry-after"),
        )

    @asynccontextmanager
    async def stream(
        self,
        method: str,
        path: str,
        *,
        model: str,
        time_limit: float,
        body: Any = None,
    ) -> AsyncIterator[httpx.Response]:
        """Open a streaming request; leaving the block closes it (and its connection,
        when the body was not read to the end, which is how the backend learns that
        nobody wants the rest).

        Args:
            method: HTTP method.
            path: Path relative to the base URL.
            model: Upstream model name, for error details.
            time_limit: Seconds left for the whole call.
            body: JSON body.

        Yields:
            The response, status already checked.

        Raises:
            HivewireError: The backend answered an error status.
            BackendUnavailable: It could not be reached or broke off (also while the
                block reads the body).
        """
        try:
            async with self._client.stream(
                method, path, json=body, timeout=timeouts(self._connect_timeout, time_limit)
            ) as response:
                await self._raise_for_status(response, model)
                yield response
        except httpx.TransportError as exc:
            raise transport_error(self.backend, exc, retry_after=self._retry_after) from exc

    async def read_json(self, response: httpx.Response, path: str) -> Any:
        """Read the whole body of a :meth:`stream` response (inside its block) as JSON.

        Raises:
            BackendUnavailable: The body is not JSON (or, through :meth:`stream`, the
                connection broke off while it was read).
        """
        raw = await response.aread()
        try:
            return json.loads(raw)
        except ValueError as exc:
            raise self.broken(f"invalid JSON from {path}") from exc

    def broken(self, message: str) -> BackendUnavailable:
        """The error for a response that is not what the backend's API promises."""
        return transport_error(self.backend, ValueError(message), retry_after=self._retry_after)

    async def aclose(self) -> None:
        """Close every pooled connection."""
        await self._client.aclose()


def token_count(value: object) -> int | None:
    """A token count from a backend's JSON: None when it is missing or not a count."""
    return value if isinstance(value, int) and value >= 0 else None


def sampling_options(
    params: SamplingParams, *, max_tokens_key: str = "max_tokens"
) -> dict[str, Any]:
    """The sampling parameters that are set, as JSON fields of a request body.

    Args:
        params: The call's sampling parameters.
        max_tokens_key: The API's name for the output token limit (Ollama:
            ``num_predict``).
    """
    options: dict[str, Any] = {}
    if params.temperature is not None:
        options["temperature"] = params.temperature
    if params.top_p is not None:
        options["top_p"] = params.top_p
    if params.max_tokens is not None:
        options[max_tokens_key] = params.max_tokens
    if params.stop:
        options["stop"] = list(params.stop)
    if params.seed is not None:
        options["seed"] = params.seed
    return options


@dataclass(frozen=True)
class ListingApi:
    """Where a server lists its models (GET).

    Attributes:
        path: The API path.
        key: The body's list of models.
        name_key: Where an item of that list has its name (items without one are skipped).
        entry: ``entry(name, item)``: the listing's entry for an item.
    """

    path: str
    key: str
    name_key: str
    entry: Callable[[str, dict[str, Any]], ModelEntry]


@dataclass(frozen=True)
class EmbeddingApi:
    """Where and how a server embeds texts (POST ``{"model", "input"}``).

    Attributes:
        path: The API path.
        key: The body's list with one entry per input.
        vectors: The vectors, in input order, from that list.
        prompt_tokens: The body's count of the tokens read.
    """

    path: str
    key: str
    vectors: Callable[[list[Any]], Iterable[Iterable[Any]]]
    prompt_tokens: Callable[[dict[str, Any]], object]


class HttpBackend:
    """Base of a backend that talks to one HTTP server through one pooled client.

    Subclasses set :attr:`name`, :attr:`listing_api` and :attr:`embedding_api` and
    implement ``stream`` (the rest of the
    :class:`~hivewire.services.model.backends.base.Backend` protocol is here) on top of
    ``self._http``.
    """

    name: str
    listing_api: ClassVar[ListingApi]
    """Where the server lists its models."""
    embedding_api: ClassVar[EmbeddingApi]
    """Where and how the server embeds texts."""

    def __init__(
        self,
        base_url: str,
        *,
        connect_timeout: float = 5.0,
        max_connections: int = 32,
        retry_after: float = 2.0,
        headers: Mapping[str, str] | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        """Create the backend (no connection is made until the first call).

        Args:
            base_url: Server URL every API path is relative to.
            connect_timeout: Seconds to connect.
            max_connections: Pooled connections.
            retry_after: Suggested retry delay when the server is down.
            headers: Headers sent on every request (authorization...).
            transport: Custom httpx transport (tests).
        """
        self._http = HttpClient(
            self.name,
            base_url,
            connect_timeout=connect_timeout,
            max_connections=max_connections,
            retry_after=retry_after,
            headers=headers,
            transport=transport,
        )

    async def list_models(self, *, time_limit: float) -> list[ModelEntry]:
        """GET the server's model listing (:attr:`listing_api`).

        Raises:
            BackendUnavailable: The body has no such list.
        """
        api = self.listing_api
        async with self._http.stream("GET", api.path, model="", time_limit=time_limit) as response:
            data = await self._http.read_json(response, api.path)
        items = data.get(api.key) if isinstance(data, dict) else None
        if not isinstance(items, list):
            raise self._http.broken(f"{api.path} returned no {api.key} list")
        return [
            api.entry(str(item[api.name_key]), item)
            for item in items
            if isinstance(item, dict) and item.get(api.name_key)
        ]

    async def embed(self, model: str, inputs: Sequence[str], *, time_limit: float) -> EmbedResult:
        """POST ``{"model", "input"}`` to the server's embedding API (:attr:`embedding_api`).

        Args:
            model: Upstream model name.
            inputs: The texts.
            time_limit: Seconds left for the call.

        Raises:
            BackendUnavailable: The body has no such list, or not one entry per input.
        """
        api = self.embedding_api
        body = {"model": model, "input": list(inputs)}
        async with self._http.stream(
            "POST", api.path, model=model, time_limit=time_limit, body=body
        ) as response:
            data = await self._http.read_json(response, api.path)
        items = data.get(api.key) if isinstance(data, dict) else None
        if not isinstance(items, list) or len(items) != len(inputs):
            raise self._http.broken(f"{api.path} returned no {api.key} or the wrong number")
        return EmbedResult(
            vectors=[[float(x) for x in vector] for vector in api.vectors(items)],
            model=str(data.get("model") or model),
            prompt_tokens=token_count(api.prompt_tokens(data)),
        )

    async def aclose(self) -> None:
        """Close the connection pool."""
        await self._http.aclose()
