"""The dashboard's HTTPS server: one page, a JSON API and server-sent event streams.

Login: a browser that presents a client certificate of the mesh CA is that identity
(the TLS layer verifies it; nothing else to do). Without one, the page asks for a token
(``dashboard.tokens``), which maps to an identity; a random session cookie (HttpOnly,
Secure, SameSite=Strict) then stands for it. Every API call needs one of the two.

Routes: ``GET /`` (the page), ``POST /login``, ``GET /api/me``, ``GET /api/agents``,
``GET /api/tasks?state=&capability=``, ``POST /api/tasks`` (capability, text),
``POST /api/tasks/{id}/cancel``, ``GET /api/tasks/{id}/events`` (SSE: the task's
timeline, live) and ``GET /api/events`` (SSE: recent and live mesh events).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import secrets
import ssl
from collections.abc import AsyncGenerator, Awaitable, Callable
from importlib import resources
from typing import Any

import grpc
from aiohttp import web

from hivewire.services.dashboard.backend import Backend, User
from hivewire.services.runtime.errors import HivewireError
from hivewire.services.runtime.status import from_rpc_error
from hivewire.services.runtime.tls import SPIFFE_SCHEME, TlsFiles

logger = logging.getLogger(__name__)

__all__ = ["SESSION_COOKIE", "create_app", "server_ssl_context"]

SESSION_COOKIE = "hivewire_session"
_BACKEND = web.AppKey("backend", Backend)
_TOKENS = web.AppKey("tokens", dict)
_SESSIONS = web.AppKey("sessions", dict)
# The open event streams: they never end on their own, so shutdown ends them (_end_streams)
# instead of waiting out aiohttp's 60 s shutdown timeout for them.
_STREAMS = web.AppKey("streams", set)
_STATUS = {
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.FAILED_PRECONDITION: 409,
    grpc.StatusCode.UNAVAILABLE: 503,
}

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def server_ssl_context(files: TlsFiles) -> ssl.SSLContext:
    """HTTPS with the mesh certificate; client certificates optional, checked if sent."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(files.ca))
    context.load_cert_chain(str(files.cert), str(files.key))
    context.verify_mode = ssl.CERT_OPTIONAL
    return context


def _certificate_identity(request: web.Request) -> str | None:
    transport = request.transport
    peer = transport.get_extra_info("peercert") if transport is not None else None
    for kind, value in (peer or {}).get("subjectAltName", ()):
        if kind == "URI" and value.startswith(SPIFFE_SCHEME):
            return str(value)
    return None


def _user(request: web.Request) -> User | None:
    backend = request.app[_BACKEND]
    identity = _certificate_identity(request)
    if identity is None:
        identity = request.app[_SESSIONS].get(request.cookies.get(SESSION_COOKIE, ""))
    return backend.user(identity) if identity else None


@web.middleware
async def _errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except HivewireError as exc:
        return _error(_STATUS.get(exc.code, 500), exc.reason, exc.message)
    except grpc.aio.AioRpcError as exc:
        err = from_rpc_error(exc)
        return _error(_STATUS.get(err.code, 502), err.reason, err.message)


def _error(status: int, reason: str, message: str) -> web.Response:
    return web.json_response({"reason": reason, "message": message}, status=status)


def _authenticated(
    handler: Callable[[web.Request, User], Awaitable[web.StreamResponse]],
) -> Handler:
    async def wrapped(request: web.Request) -> web.StreamResponse:
        user = _user(request)
        if user is None:
            return _error(401, "LOGIN_REQUIRED", "log in with a client certificate or a token")
        return await handler(request, user)

    return wrapped


async def _page(request: web.Request) -> web.StreamResponse:
    html = resources.files("hivewire.services.dashboard").joinpath("index.html")
    return web.Response(text=html.read_text(encoding="utf-8"), content_type="text/html")


async def _login(request: web.Request) -> web.StreamResponse:
    form = await request.post()
    token = str(form.get("token", ""))
    for known, identity in request.app[_TOKENS].items():
        if token and hmac.compare_digest(token.encode(), known.encode()):
            session = secrets.token_urlsafe(32)
            request.app[_SESSIONS][session] = identity
            response = web.json_response({"identity": identity})
            response.set_cookie(
                SESSION_COOKIE, session, httponly=True, secure=True, samesite="Strict"
            )
            return response
    return _error(401, "BAD_TOKEN", "unknown token")


@_authenticated
async def _me(request: web.Request, user: User) -> web.StreamResponse:
    return web.json_response({"identity": user.identity, "admin": user.admin})


@_authenticated
async def _agents(request: web.Request, user: User) -> web.StreamResponse:
    return web.json_response(await request.app[_BACKEND].agents(user))


@_authenticated
async def _tasks(request: web.Request, user: User) -> web.StreamResponse:
    query = request.query
    tasks = await request.app[_BACKEND].tasks(
        user, state=query.get("state", ""), capability=query.get("capability", "")
    )
    return web.json_response(tasks)


@_authenticated
async def _submit(request: web.Request, user: User) -> web.StreamResponse:
    body = await request.json()
    task = await request.app[_BACKEND].submit(
        user, capability=str(body.get("capability", "")), text=str(body.get("text", ""))
    )
    return web.json_response(task, status=201)


@_authenticated
async def _cancel(request: web.Request, user: User) -> web.StreamResponse:
    task = await request.app[_BACKEND].cancel(user, request.match_info["task_id"])
    return web.json_response(task)


async def _sse(
    request: web.Request, items: AsyncGenerator[dict[str, Any], None]
) -> web.StreamResponse:
    response = web.StreamResponse(
        headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
    )
    streams: set[asyncio.Task[Any]] = request.app[_STREAMS]
    this = asyncio.current_task()
    assert this is not None
    streams.add(this)
    try:
        await response.prepare(request)
        # aclosing: a browser that goes away ends the WatchTask call (or NATS reader) now.
        async with contextlib.aclosing(items) as stream:
            async for item in stream:
                await response.write(f"data: {json.dumps(item)}\n\n".encode())
        await response.write(b"event: end\ndata: {}\n\n")
    except (ConnectionResetError, asyncio.CancelledError):
        pass
    except (HivewireError, grpc.aio.AioRpcError) as exc:
        err = from_rpc_error(exc) if isinstance(exc, grpc.aio.AioRpcError) else exc
        with contextlib.suppress(ConnectionResetError):
            payload = json.dumps({"reason": err.reason, "message": err.message})
            await response.write(f"event: error\ndata: {payload}\n\n".encode())
    finally:
        streams.discard(this)
    return response


async def _end_streams(app: web.Application) -> None:
    """On shutdown (after the listener closed): end every open event stream now."""
    streams: set[asyncio.Task[Any]] = app[_STREAMS]
    for task in list(streams):
        task.cancel()


@_authenticated
async def _timeline(request: web.Request, user: User) -> web.StreamResponse:
    # Refusals are plain HTTP errors: they are raised before the stream starts.
    events = await request.app[_BACKEND].timeline(user, request.match_info["task_id"])
    return await _sse(request, events)


@_authenticated
async def _events(request: web.Request, user: User) -> web.StreamResponse:
    return await _sse(request, request.app[_BACKEND].events(user))


def create_app(backend: Backend, *, tokens: dict[str, str]) -> web.Application:
    """The dashboard's aiohttp application."""
    app = web.Application(middlewares=[_errors])
    app[_BACKEND] = backend
    app[_TOKENS] = dict(tokens)
    app[_SESSIONS] = {}
    app[_STREAMS] = set()
    app.on_shutdown.append(_end_streams)
    app.router.add_get("/", _page)
    app.router.add_post("/login", _login)
    app.router.add_get("/api/me", _me)
    app.router.add_get("/api/agents", _agents)
    app.router.add_get("/api/tasks", _tasks)
    app.router.add_post("/api/tasks", _submit)
    app.router.add_post("/api/tasks/{task_id}/cancel", _cancel)
    app.router.add_get("/api/tasks/{task_id}/events", _timeline)
    app.router.add_get("/api/events", _events)
    return app
