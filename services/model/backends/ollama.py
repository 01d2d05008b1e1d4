"""Ollama's native HTTP API: ``/api/chat``, ``/api/generate`` (NDJSON streams),
``/api/embed`` and ``/api/tags``.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import AsyncGenerator
from datetime import datetime
from typing import Any

from hivewire.services.model.backends import base, http

logger = logging.getLogger(__name__)

_FRACTION = re.compile(r"(\.\d{6})\d+")


def _parse_time(value: object) -> datetime | None:
    # Ollama sends nanosecond fractions ("...49.277302595-07:00"); Python takes microseconds.
    if not isinstance(value, str):
        return None
    try:
        return datetime.fromisoformat(_FRACTION.sub(r"\1", value.replace("Z", "+00:00")))
    except ValueError:
        return None


def _entry(name: str, item: dict[str, Any]) -> base.ModelEntry:
    size = item.get("size")
    return base.ModelEntry(
        name=name,
        supports_embeddings=True,
        modified_at=_parse_time(item.get("modified_at")),
        size_bytes=size if isinstance(size, int) and size >= 0 else None,
    )


class OllamaBackend(http.HttpBackend):
    """Talks to one Ollama server (``base_url`` e.g. ``http://127.0.0.1:11434``)."""

    name = "ollama"
    listing_api = http.ListingApi("/api/tags", "models", name_key="name", entry=_entry)
    embedding_api = http.EmbeddingApi(
        "/api/embed",
        "embeddings",
        vectors=lambda items: items,
        prompt_tokens=lambda data: data.get("prompt_eval_count"),
    )

    def _body(self, request: base.GenerationRequest) -> tuple[str, dict[str, Any], str]:
        options = http.sampling_options(request.params, max_tokens_key="num_predict")
        body: dict[str, Any]
        if request.operation == "generate":
            body = {"model": request.model, "prompt": request.prompt, "stream": True}
            if request.system:
                body["system"] = request.system
            path, text_key = "/api/generate", "response"
        else:
            messages = []
            for turn in request.messages:
                message = {"role": turn.role, "content": turn.content}
                if turn.name and turn.role == "tool":
                    message["tool_name"] = turn.name
                messages.append(message)
            body = {"model": request.model, "messages": messages, "stream": True}
            path, text_key = "/api/chat", "message"
        if options:
            body["options"] = options
        return path, body, text_key

    async def stream(
        self, request: base.GenerationRequest
    ) -> AsyncGenerator[base.StreamItem, None]:
        """Stream a chat or generate call from the NDJSON frames Ollama sends."""
        path, body, text_key = self._body(request)
        async with self._http.stream(
            "POST", path, model=request.model, time_limit=request.timeout, body=body
        ) as response:
            async for line in response.aiter_lines():
                if not line.strip():
                    continue
                try:
                    frame = json.loads(line)
                except ValueError as exc:
                    raise self._http.broken(
                        f"undecodable frame from {path}: {line[:80]!r}"
                    ) from exc
                if not isinstance(frame, dict):
                    raise self._http.broken(f"unexpected frame from {path}: {line[:80]!r}")
                if "error" in frame:
                    # Ollama reports failures after the 200 status as an error frame.
                    raise self._http.broken(f"{path} failed mid-stream: {frame['error']}")
                if text_key == "message":
                    message = frame.get("message") or {}
                    text = message.get("content", "") if isinstance(message, dict) else ""
                else:
                    text = frame.get("response", "")
                if isinstance(text, str) and text:
                    yield base.TextDelta(text)
                if frame.get("done"):
                    yield base.StreamEnd(
                        finish="length" if frame.get("done_reason") == "length" else "stop",
                        model=str(frame.get("model") or request.model),
                        prompt_tokens=http.token_count(frame.get("prompt_eval_count")),
                        completion_tokens=http.token_count(frame.get("eval_count")),
                    )
                    return
        raise self._http.broken(f"{path} stream ended without its final frame")
