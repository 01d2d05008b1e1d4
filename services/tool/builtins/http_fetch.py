"""``http_fetch``: GET or HEAD a URL on an allow-listed host.

Only hosts in ``HIVEWIRE_TOOL__HTTP_ALLOWED_HOSTS`` can be reached (an empty list, the
default, refuses every URL). Entries are host names or globs (``api.example.com``,
``*.example.org``, ``127.0.0.1``), optionally with a port (``localhost:8080``); an entry
without a port allows any port. Redirects are followed by hand, up to
``HTTP_MAX_REDIRECTS``, and every hop must be allowed too. Bodies are read up to
``HTTP_MAX_BYTES`` (or the call's smaller ``max_bytes``), the whole fetch is bounded by
``HTTP_TIMEOUT``, and the environment's proxy settings are ignored.

The check is on the URL's host name as written: a name on the list that resolves to an
internal address is reachable, so list names you control.

Result: ``{"url", "status", "content_type", "headers", "body" | "body_base64", "bytes",
"truncated"}``. HTTP error statuses are results, not errors; refused hosts, bad URLs and
network failures are classified error results (``HOST_NOT_ALLOWED``, ``INVALID_URL``,
``UPSTREAM_TIMEOUT``, ``UPSTREAM_UNAVAILABLE``).
"""

# No ``from __future__ import annotations``: the tool's signature uses the settings'
# limits from the enclosing function, which string annotations could not resolve.
import asyncio
import base64
from collections.abc import Callable, Sequence
from fnmatch import fnmatchcase
from typing import Annotated, Any, Literal

import httpx
from pydantic import Field

from hivewire.services.tool.sdk import (
    ToolContext,
    ToolDefinition,
    ToolError,
    ToolOutput,
    definition_of,
    tool,
)
from hivewire.services.tool.settings import ToolSettings

MAX_URL_CHARS = 2048
_DEFAULT_PORTS = {"http": 80, "https": 443}
_TEXT_TYPES = ("text/", "application/json", "application/xml", "application/javascript")
_TEXT_SUFFIXES = ("+json", "+xml")
# Headers a caller may not set: they belong to the transport or would bypass the check.
_FORBIDDEN_HEADERS = frozenset(
    {"host", "connection", "content-length", "transfer-encoding", "upgrade", "proxy-authorization"}
)


def _parse_entry(entry: str) -> tuple[str, int | None]:
    entry = entry.strip().lower()
    if entry.startswith("["):
        host, _, rest = entry[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else ""
        return host, int(port) if port else None
    if entry.count(":") == 1:
        host, _, port = entry.partition(":")
        return host, int(port) if port else None
    return entry, None


class HostAllowList:
    """The hosts ``http_fetch`` may reach."""

    def __init__(self, entries: Sequence[str]) -> None:
        """Parse the entries (``host``, ``*.domain``, ``host:port``, ``[v6]:port``).

        Raises:
            ValueError: A port is not a number.
        """
        self.entries = [_parse_entry(entry) for entry in entries if entry.strip()]

    def allows(self, url: httpx.URL) -> bool:
        """Whether ``url``'s host and port are on the list."""
        host = url.host.lower()
        port = url.port or _DEFAULT_PORTS.get(url.scheme)
        return any(
            fnmatchcase(host, pattern) and (allowed is None or allowed == port)
            for pattern, allowed in self.entries
        )


def _check_url(raw: str | httpx.URL, allow: HostAllowList) -> httpx.URL:
    try:
        url = raw if isinstance(raw, httpx.URL) else httpx.URL(raw)
    except (httpx.InvalidURL, ValueError) as exc:
        raise ToolError(
            f"invalid URL: {exc}", reason="INVALID_URL", code="INVALID_ARGUMENT"
        ) from None
    if url.scheme not in _DEFAULT_PORTS or not url.host:
        raise ToolError(
            f"only absolute http:// and https:// URLs can be fetched, not {str(url)[:200]!r}",
            reason="INVALID_URL",
            code="INVALID_ARGUMENT",
        )
    if not allow.allows(url):
        raise ToolError(
            f"host {url.host}:{url.port or _DEFAULT_PORTS[url.scheme]} is not on the allow-list",
            reason="HOST_NOT_ALLOWED",
            code="PERMISSION_DENIED",
            metadata={"host": url.host},
        )
    return url


def _is_text(content_type: str) -> bool:
    media = content_type.split(";", 1)[0].strip().lower()
    return media.startswith(_TEXT_TYPES) or media.endswith(_TEXT_SUFFIXES) or not media


async def _read_capped(response: httpx.Response, limit: int) -> tuple[bytes, bool]:
    chunks: list[bytes] = []
    size = 0
    async for chunk in response.aiter_bytes():
        chunks.append(chunk)
        size += len(chunk)
        if size > limit:
            return b"".join(chunks)[:limit], True
    return b"".join(chunks), False


def _unreachable(url: str, exc: Exception, timeout: float) -> ToolError:
    """The retryable error of a fetch that timed out or could not reach the server."""
    if isinstance(exc, TimeoutError):
        message = f"{url} did not answer within {timeout:g}s"
    elif isinstance(exc, httpx.TimeoutException):
        message = f"{url}: {type(exc).__name__}"
    else:
        message = f"{url}: {type(exc).__name__}: {exc}"
    timed_out = isinstance(exc, TimeoutError | httpx.TimeoutException)
    return ToolError(
        message,
        reason="UPSTREAM_TIMEOUT" if timed_out else "UPSTREAM_UNAVAILABLE",
        code="DEADLINE_EXCEEDED" if timed_out else "UNAVAILABLE",
        retryable=True,
    )


def make_http_fetch_tool(
    settings: ToolSettings, client: Callable[[], httpx.AsyncClient]
) -> ToolDefinition:
    """Build the ``http_fetch`` tool.

    Args:
        settings: Allow-list and limits.
        client: Returns the shared HTTP client (pooled, owned by the service).
    """
    allow = HostAllowList(settings.http_allowed_hosts)
    max_bytes_cap = settings.http_max_bytes

    @tool(name="http_fetch", approval_prompt="Allow http_fetch of {url}?")
    async def http_fetch(
        url: Annotated[str, Field(min_length=1, max_length=MAX_URL_CHARS)],
        ctx: ToolContext,
        method: Literal["GET", "HEAD"] = "GET",
        headers: dict[str, str] | None = None,
        max_bytes: Annotated[int | None, Field(ge=1, le=max_bytes_cap)] = None,
    ) -> ToolOutput:
        """Fetch a web resource over HTTP(S) from an allow-listed host and return its body.

        Text bodies (HTML, JSON, XML, plain text) come back as text, others as base64.

        Args:
            url: Absolute http:// or https:// URL.
            method: GET (default) or HEAD.
            headers: Extra request headers, e.g. {"Accept": "application/json"}.
            max_bytes: Read at most this many bytes of the body.
        """
        limit = max_bytes or max_bytes_cap
        request_headers = {
            k: v for k, v in (headers or {}).items() if k.lower() not in _FORBIDDEN_HEADERS
        }
        current = _check_url(url, allow)
        http = client()
        try:
            async with asyncio.timeout(settings.http_timeout):
                for _hop in range(settings.http_max_redirects + 1):
                    ctx.progress(0.1, "request", f"{method} {current}")
                    request = http.build_request(method, current, headers=request_headers)
                    response = await http.send(request, stream=True)
                    try:
                        if response.is_redirect and response.next_request is not None:
                            current = _check_url(response.next_request.url, allow)
                            continue
                        ctx.progress(0.5, "download", f"HTTP {response.status_code}")
                        body, truncated = await _read_capped(response, limit)
                    finally:
                        await response.aclose()
                    return _render(response, current, body, truncated)
        except (TimeoutError, httpx.TransportError) as exc:
            raise _unreachable(url, exc, settings.http_timeout) from None
        raise ToolError(
            f"more than {settings.http_max_redirects} redirects",
            reason="TOO_MANY_REDIRECTS",
            code="FAILED_PRECONDITION",
        )

    definition = definition_of(http_fetch)
    assert definition is not None
    return definition


def _render(response: httpx.Response, url: httpx.URL, body: bytes, truncated: bool) -> ToolOutput:
    content_type = response.headers.get("content-type", "")
    result: dict[str, Any] = {
        "url": str(url),
        "status": response.status_code,
        "content_type": content_type,
        "headers": dict(list(response.headers.items())[:50]),
        "bytes": len(body),
        "truncated": truncated,
    }
    if _is_text(content_type):
        text = body.decode(response.encoding or "utf-8", errors="replace")
        result["body"] = text
    else:
        result["body_base64"] = base64.b64encode(body).decode("ascii")
        text = f"[{content_type}, {len(body)} bytes]"
    return ToolOutput(result=result, text=text)
