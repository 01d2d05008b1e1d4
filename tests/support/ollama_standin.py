r"""A stand-in Ollama server for tests: a real HTTP/1.1 server on 127.0.0.1 speaking
Ollama's documented API (docs/api.md of ollama/ollama).

* ``POST /api/chat`` and ``POST /api/generate`` stream NDJSON frames with
  ``Transfer-Encoding: chunked`` and ``Content-Type: application/x-ndjson``: one
  frame per token (``{"model", "created_at", "message": {"role": "assistant",
  "content"}, "done": false}``, or ``"response"`` for generate), then a final frame
  with ``"done": true``, ``"done_reason"``, durations in nanoseconds and the
  ``prompt_eval_count`` / ``eval_count`` token counts. ``"stream": false`` returns the
  single final object. ``options.num_predict`` caps the tokens (``done_reason``
  ``"length"``).
* ``POST /api/embed`` returns ``{"model", "embeddings": [[...]], "total_duration",
  "load_duration", "prompt_eval_count"}``.
* ``GET /api/tags`` returns ``{"models": [{"name", "model", "modified_at", "size",
  "digest", "details"}]}``.
* Unknown models get ``404 {"error": "model \\"x\\" not found, try pulling it first"}``.

Test knobs (set between requests): ``honor_num_predict``, ``hang_after`` (send N
tokens, then wait until the client closes the connection and set
:attr:`client_closed`), ``die_after`` (send N
tokens, then drop the connection mid-body), ``error_frame_after`` (send N tokens,
then an ``{"error": ...}`` frame), ``fail_with`` (answer every request with this
status and body). Every request is recorded in :attr:`requests`.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import math
from dataclasses import dataclass, field
from datetime import UTC, datetime
from types import TracebackType
from typing import Any, Self

DEFAULT_REPLY = "The sky is blue because of Rayleigh scattering of sunlight"


@dataclass
class RecordedRequest:
    """One request the stand-in received."""

    method: str
    path: str
    body: Any


@dataclass
class OllamaStandin:
    """The stand-in server. ``async with OllamaStandin() as ollama: ollama.url``."""

    models: dict[str, str] = field(default_factory=lambda: {"llama3:8b": DEFAULT_REPLY})
    """Model name -> the reply it streams (one token per word)."""
    embedding_dimensions: int = 8
    honor_num_predict: bool = True
    """False: stream the whole reply whatever ``options.num_predict`` says."""
    hang_after: int | None = None
    die_after: int | None = None
    error_frame_after: int | None = None
    fail_with: tuple[int, str] | None = None
    requests: list[RecordedRequest] = field(default_factory=list)
    client_closed: asyncio.Event = field(default_factory=asyncio.Event)
    """Set when a client closed a connection the stand-in was holding (``hang_after``)."""
    streaming: asyncio.Event = field(default_factory=asyncio.Event)
    """Set when a stream has sent its first token."""
    port: int = 0
    _server: asyncio.Server | None = None
    _connections: set[asyncio.StreamWriter] = field(default_factory=set)

    @property
    def url(self) -> str:
        """Base URL, e.g. ``http://127.0.0.1:41234``."""
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> None:
        """Listen (on the previous port again after a :meth:`stop`)."""
        self._server = await asyncio.start_server(
            self._handle, "127.0.0.1", self.port, reuse_address=True
        )
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        """Stop listening and drop every open connection (the backend is down)."""
        if self._server is not None:
            self._server.close()
            for writer in list(self._connections):
                writer.transport.abort()
            await self._server.wait_closed()
            self._server = None

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    # -- HTTP ------------------------------------------------------------------------------

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._connections.add(writer)
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head.decode("latin-1").split("\r\n")
                method, path, _ = lines[0].split(" ", 2)
                headers = {
                    k.strip().lower(): v.strip()
                    for k, _, v in (line.partition(":") for line in lines[1:] if line)
                }
                length = int(headers.get("content-length", "0"))
                raw = await reader.readexactly(length) if length else b""
                body = json.loads(raw) if raw else None
                self.requests.append(RecordedRequest(method, path, body))
                keep_open = await self._route(method, path, body, reader, writer)
                if not keep_open:
                    return
        except (asyncio.IncompleteReadError, ConnectionError):
            return
        finally:
            self._connections.discard(writer)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    @staticmethod
    async def _json(writer: asyncio.StreamWriter, status: int, payload: Any) -> bool:
        data = json.dumps(payload).encode()
        reason = {200: "OK", 400: "Bad Request", 404: "Not Found"}.get(status, "Error")
        writer.write(
            f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/json; charset=utf-8\r\n"
            f"Content-Length: {len(data)}\r\n\r\n".encode()
            + data
        )
        await writer.drain()
        return True

    async def _route(
        self,
        method: str,
        path: str,
        body: Any,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
    ) -> bool:
        if self.fail_with is not None:
            status, text = self.fail_with
            data = text.encode()
            writer.write(
                f"HTTP/1.1 {status} Error\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(data)}\r\n\r\n".encode()
                + data
            )
            await writer.drain()
            return True
        if method == "GET" and path == "/api/tags":
            return await self._json(writer, 200, {"models": [self._tag(n) for n in self.models]})
        if method != "POST" or path not in ("/api/chat", "/api/generate", "/api/embed"):
            return await self._json(writer, 404, {"error": "404 page not found"})
        if not isinstance(body, dict) or not body.get("model"):
            return await self._json(writer, 400, {"error": "model is required"})
        model = body["model"]
        if model not in self.models:
            return await self._json(
                writer, 404, {"error": f'model "{model}" not found, try pulling it first'}
            )
        if path == "/api/embed":
            inputs = body.get("input")
            texts = [inputs] if isinstance(inputs, str) else list(inputs or [])
            return await self._json(
                writer,
                200,
                {
                    "model": model,
                    "embeddings": [self._vector(text) for text in texts],
                    "total_duration": 14143917,
                    "load_duration": 1019500,
                    "prompt_eval_count": sum(len(text.split()) for text in texts),
                },
            )
        return await self._generate(path, body, model, reader, writer)

    def _tag(self, name: str) -> dict[str, Any]:
        return {
            "name": name,
            "model": name,
            "modified_at": "2024-11-04T14:56:49.277302595-07:00",
            "size": 3825819519,
            "digest": hashlib.sha256(name.encode()).hexdigest(),
            "details": {
                "parent_model": "",
                "format": "gguf",
                "family": "llama",
                "families": None,
                "parameter_size": "8.0B",
                "quantization_level": "Q4_0",
            },
        }

    def _vector(self, text: str) -> list[float]:
        digest = hashlib.sha256(text.encode()).digest()
        values = [(b - 128) / 128 for b in digest[: self.embedding_dimensions]]
        norm = math.sqrt(sum(v * v for v in values)) or 1.0
        return [v / norm for v in values]

    @staticmethod
    def _now() -> str:
        return datetime.now(UTC).isoformat().replace("+00:00", "Z")

    async def _generate(
        self,
        path: str,
        body: dict[str, Any],
        model: str,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
    ) -> bool:
        chat = path == "/api/chat"
        words = self.models[model].split(" ")
        options = body.get("options") or {}
        limit = options.get("num_predict")
        done_reason = "stop"
        if self.honor_num_predict and isinstance(limit, int) and 0 <= limit < len(words):
            words, done_reason = words[:limit], "length"
        tokens = [w if i == 0 else " " + w for i, w in enumerate(words)]
        if chat:
            prompt = " ".join(m.get("content", "") for m in body.get("messages", []))
        else:
            prompt = f"{body.get('system', '')} {body.get('prompt', '')}"
        final: dict[str, Any] = {
            "model": model,
            "created_at": self._now(),
            "done": True,
            "done_reason": done_reason,
            "total_duration": 4883583458,
            "load_duration": 1334875,
            "prompt_eval_count": len(prompt.split()),
            "prompt_eval_duration": 342546000,
            "eval_count": len(tokens),
            "eval_duration": 4535599000,
        }
        if chat:
            final["message"] = {"role": "assistant", "content": ""}
        else:
            final["response"] = ""
            final["context"] = [1, 2, 3]
        if body.get("stream") is False:
            text = "".join(tokens)
            if chat:
                final["message"]["content"] = text
            else:
                final["response"] = text
            return await self._json(writer, 200, final)

        writer.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: application/x-ndjson\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n"
        )

        async def frame(payload: dict[str, Any]) -> None:
            data = json.dumps(payload).encode() + b"\n"
            writer.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
            await writer.drain()

        for index, token in enumerate(tokens):
            if self.die_after is not None and index == self.die_after:
                writer.transport.abort()  # the backend process died mid-stream
                return False
            if self.hang_after is not None and index == self.hang_after:
                # Hold the stream open; a client that goes away closes the connection.
                with contextlib.suppress(ConnectionError):
                    while await reader.read(1024):
                        pass
                self.client_closed.set()
                return False
            if self.error_frame_after is not None and index == self.error_frame_after:
                await frame({"error": "an error was encountered while running the model"})
                writer.write(b"0\r\n\r\n")
                await writer.drain()
                return True
            payload: dict[str, Any] = {"model": model, "created_at": self._now(), "done": False}
            if chat:
                payload["message"] = {"role": "assistant", "content": token}
            else:
                payload["response"] = token
            await frame(payload)
            self.streaming.set()
        await frame(final)
        writer.write(b"0\r\n\r\n")
        await writer.drain()
        return True
