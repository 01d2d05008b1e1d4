"""OpenAI-compatible HTTP API: ``/chat/completions`` (SSE stream), ``/embeddings``,
``/models``. Covers vLLM, llama.cpp's server, LM Studio and OpenAI itself.

Generate calls go through ``/chat/completions`` too (system + user turn): chat
models, which is what these servers host today, often have no ``/completions``.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncGenerator
from datetime import UTC, datetime
from typing import Any

import httpx

from hivewire.services.model.backends import base, http

logger = logging.getLogger(__name__)


def _vectors(items: list[Any]) -> list[Any]:
    # Each item carries its input's index; servers need not answer in order.
    ordered = sorted(
        (item for item in items if isinstance(item, dict)),
        key=lambda item: item.get("index", 0),
    )
    return [item.get("embedding", []) for item in ordered]


def _prompt_tokens(data: dict[str, Any]) -> object:
    usage = data.get("usage")
    return usage.get("prompt_tokens") if isinstance(usage, dict) else None


def _entry(name: str, item: dict[str, Any]) -> base.ModelEntry:
    created = item.get("created")
    return base.ModelEntry(
        name=name,
        modified_at=(
            datetime.fromtimestamp(created, UTC)
            if isinstance(created, int | float) and created > 0
            else None
        ),
    )


class OpenAIBackend(http.HttpBackend):
    """Talks to one OpenAI-compatible server."""

    name = "openai"
    listing_api = http.ListingApi("/models", "data", name_key="id", entry=_entry)
    embedding_api = http.EmbeddingApi(
        "/embeddings", "data", vectors=_vectors, prompt_tokens=_prompt_tokens
    )

    def __init__(
        self,
        base_url: str,
        *,
        api_key: str | None = None,
        connect_timeout: float = 5.0,
        max_connections: int = 32,
        retry_after: float = 2.0,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        """Create the backend.

        Args:
            base_url: API base including the version, e.g. ``http://127.0.0.1:8000/v1``.
            api_key: Sent as ``Authorization: Bearer``; None sends nothing.
            connect_timeout: Seconds to connect.
            max_connections: Pooled connections.
            retry_after: Suggested retry delay when the server is down.
            transport: Custom httpx transport (tests).
        """
        super().__init__(
            base_url,
            connect_timeout=connect_timeout,
            max_connections=max_connections,
            retry_after=retry_after,
            headers={"Authorization": f"Bearer {api_key}"} if api_key else {},
            transport=transport,
        )

    @staticmethod
    def _body(request: base.GenerationRequest) -> dict[str, Any]:
        messages = []
        for turn in request.messages:
            message = {"role": turn.role, "content": turn.content}
            if turn.name:
                message["name"] = turn.name
            messages.append(message)
        body: dict[str, Any] = {
            "model": request.model,
            "messages": messages,
            "stream": True,
            # Ask for a final usage chunk; servers that do not know the option ignore it.
            "stream_options": {"include_usage": True},
        }
        body.update(http.sampling_options(request.params))
        return body

    async def stream(
        self, request: base.GenerationRequest
    ) -> AsyncGenerator[base.StreamItem, None]:
        """Stream a chat completion from the server-sent events."""
        finish: base.FinishKind | None = None
        model = request.model
        prompt_tokens: int | None = None
        completion_tokens: int | None = None
        done = False
        async with self._http.stream(
            "POST",
            "/chat/completions",
            model=request.model,
            time_limit=request.timeout,
            body=self._body(request),
        ) as response:
            async for line in response.aiter_lines():
                if not line.startswith("data:"):
                    continue  # blank separators, comments (": ping"), event names
                data = line[5:].strip()
                if data == "[DONE]":
                    done = True
                    break
                try:
                    chunk = json.loads(data)
                except ValueError as exc:
                    raise self._http.broken(f"undecodable event: {data[:80]!r}") from exc
                if not isinstance(chunk, dict):
                    continue
                if "error" in chunk:
                    error = chunk["error"]
                    text = error.get("message", error) if isinstance(error, dict) else error
                    raise self._http.broken(f"stream failed: {text}")
                model = str(chunk.get("model") or model)
                usage = chunk.get("usage")
                if isinstance(usage, dict):
                    prompt_tokens = http.token_count(usage.get("prompt_tokens"))
                    completion_tokens = http.token_count(usage.get("completion_tokens"))
                for choice in chunk.get("choices") or ():
                    if not isinstance(choice, dict) or choice.get("index", 0) != 0:
                        continue
                    delta = choice.get("delta") or {}
                    text = delta.get("content") if isinstance(delta, dict) else None
                    if isinstance(text, str) and text:
                        yield base.TextDelta(text)
                    reason = choice.get("finish_reason")
                    if reason:
                        finish = "length" if reason == "length" else "stop"
        if not done and finish is None:
            raise self._http.broken("chat completion stream ended before it finished")
        yield base.StreamEnd(
            finish=finish or "stop",
            model=model,
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
        )
