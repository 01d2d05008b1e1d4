"""The deterministic backend: a TEST and OFFLINE-DEMO backend, not a model.

It answers every conversation with a reproducible reply built from the input (the
same request always streams the same words), and embeds texts as hashed
bag-of-words vectors (the same text always gets the same vector; texts sharing
words get similar ones). It is only ever used when a route, a default or an explicit
``deterministic/...`` model name asks for it: the service never falls back to it
when a real backend is misconfigured or down.
"""

from __future__ import annotations

import asyncio
import hashlib
import math
import re
from collections.abc import AsyncGenerator, Sequence

from hivewire.services.model.backends import base

_WORD = re.compile(r"\w+", re.UNICODE)
ECHO_CHARS = 200
"""How much of the last user message the reply quotes."""


def reply_for(model: str, messages: Sequence[base.ChatTurn], seed: int | None) -> str:
    """The reply the deterministic backend gives, without streaming it.

    Args:
        model: The model name asked for (part of the fingerprint).
        messages: The conversation.
        seed: The sampling seed, if any (part of the fingerprint).

    Returns:
        ``Deterministic reply <fingerprint> to: <start of the last user message>``.
    """
    digest = hashlib.sha256()
    digest.update(model.encode())
    for turn in messages:
        digest.update(b"\x00" + turn.role.encode() + b"\x00" + turn.content.encode())
    digest.update(b"\x00" + str(seed).encode())
    quoted = " ".join(base.last_user_text(messages).split())[:ECHO_CHARS] or "(no user message)"
    return f"Deterministic reply {digest.hexdigest()[:8]} to: {quoted}"


class DeterministicBackend:
    """Reproducible replies and embeddings for tests and offline demos."""

    name = "deterministic"

    def __init__(self, *, model_name: str = "deterministic", dimensions: int = 64) -> None:
        """Create the backend.

        Args:
            model_name: The name it lists in ListModels.
            dimensions: Length of its embedding vectors.
        """
        self.model_name = model_name
        self.dimensions = dimensions

    async def stream(
        self, request: base.GenerationRequest
    ) -> AsyncGenerator[base.StreamItem, None]:
        """Stream the reply one word (one token) at a time."""
        text = reply_for(request.model, request.messages, request.params.seed)
        finish: base.FinishKind = "stop"
        for stop in request.params.stop:
            if stop and stop in text:
                text = text[: text.index(stop)]
        words = text.split(" ")
        limit = request.params.max_tokens
        if limit is not None and len(words) > limit:
            words, finish = words[:limit], "length"
        for index, word in enumerate(words):
            # Yield control between words so a cancel lands mid-stream like a real backend.
            await asyncio.sleep(0)
            yield base.TextDelta(word if index == 0 else " " + word)
        yield base.StreamEnd(
            finish=finish,
            model=request.model,
            prompt_tokens=base.estimate_prompt_tokens(request.messages),
            completion_tokens=len(words),
        )

    def vector(self, text: str) -> list[float]:
        """The embedding of one text: hashed bag of words, L2-normalised."""
        values = [0.0] * self.dimensions
        for word in _WORD.findall(text.lower()):
            h = int.from_bytes(hashlib.sha256(word.encode()).digest()[:8], "big")
            values[h % self.dimensions] += 1.0 if (h >> 63) & 1 else -1.0
        norm = math.sqrt(sum(v * v for v in values))
        return [v / norm for v in values] if norm else values

    async def embed(
        self, model: str, inputs: Sequence[str], *, time_limit: float
    ) -> base.EmbedResult:
        """Embed each input."""
        return base.EmbedResult(
            vectors=[self.vector(text) for text in inputs],
            model=model,
            prompt_tokens=sum(base.estimate_tokens(text) for text in inputs),
        )

    async def list_models(self, *, time_limit: float) -> list[base.ModelEntry]:
        """The one model name it answers to (it answers to any name routed to it)."""
        return [base.ModelEntry(name=self.model_name, supports_embeddings=True)]

    async def aclose(self) -> None:
        """Nothing to release."""
