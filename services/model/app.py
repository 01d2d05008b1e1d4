"""Wiring: build the backends, router and :class:`ModelService` from the settings."""

from __future__ import annotations

import logging

import httpx

from hivewire.services.model.backends.base import Backend
from hivewire.services.model.backends.deterministic import DeterministicBackend
from hivewire.services.model.backends.local import LocalBackend, LocalModelOptions
from hivewire.services.model.backends.ollama import OllamaBackend
from hivewire.services.model.backends.openai import OpenAIBackend
from hivewire.services.model.router import Router
from hivewire.services.model.service import ModelEvents, ModelService
from hivewire.services.model.settings import AUTO, ModelSettings
from hivewire.services.runtime.errors import HivewireError

logger = logging.getLogger(__name__)


def build_backends(
    settings: ModelSettings, *, transport: httpx.AsyncBaseTransport | None = None
) -> dict[str, Backend]:
    """Create every enabled backend (no connection is made, no model loaded yet).

    Args:
        settings: The model section of the settings.
        transport: httpx transport for the HTTP backends (tests).
    """
    backends: dict[str, Backend] = {}
    for name in settings.enabled_backends():
        if name == "ollama":
            backends[name] = OllamaBackend(
                settings.ollama_url,
                connect_timeout=settings.connect_timeout,
                max_connections=settings.max_connections,
                retry_after=settings.retry_after,
                transport=transport,
            )
        elif name == "openai":
            key = settings.openai_api_key
            backends[name] = OpenAIBackend(
                settings.openai_url,
                api_key=key.get_secret_value() if key is not None else None,
                connect_timeout=settings.connect_timeout,
                max_connections=settings.max_connections,
                retry_after=settings.retry_after,
                transport=transport,
            )
        elif name == "local":
            options = LocalModelOptions(
                model_name=settings.local_model_name,
                model_path=settings.local_model_path,
                chat_format=settings.local_chat_format,
                context_tokens=settings.local_context_tokens,
                threads=settings.local_threads,
            )
            backends[name] = LocalBackend(options)
        else:
            backends[name] = DeterministicBackend(
                model_name=settings.deterministic_model,
                dimensions=settings.deterministic_embedding_dimensions,
            )
    return backends


def build_router(settings: ModelSettings, backends: list[str]) -> Router:
    """Create the router, resolving ``auto`` defaults.

    ``auto`` means the local model when the local backend is enabled, else the
    deterministic test backend; the choice is logged (at WARNING for the latter)
    so nobody mistakes canned replies for a model.
    """
    fixed = {settings.deterministic_model: "deterministic"}
    if "local" in backends:
        fixed[settings.local_model_name] = "local"
    if settings.default_backend == "local":
        automatic = settings.local_model_name
    elif settings.default_backend == "deterministic":
        automatic = settings.deterministic_model
    else:
        automatic = (
            settings.local_model_name if "local" in backends else settings.deterministic_model
        )
    default_model = automatic if settings.default_model == AUTO else settings.default_model
    default_embedding = (
        automatic if settings.default_embedding_model == AUTO else settings.default_embedding_model
    )
    if AUTO in (settings.default_model, settings.default_embedding_model):
        if settings.default_backend == "deterministic":
            logger.warning(
                "the default model is the DETERMINISTIC TEST BACKEND (canned replies), as "
                "configured (HIVEWIRE_MODEL__DEFAULT_BACKEND=deterministic)"
            )
        elif automatic == settings.deterministic_model:
            logger.warning(
                "no model configured and the local extra is not installed: the default "
                "model is the DETERMINISTIC TEST BACKEND (canned replies). Install "
                "'hivewire[local]' or set HIVEWIRE_MODEL__DEFAULT_MODEL"
            )
        else:
            logger.info("default model: %s (local, in-process)", automatic)
    return Router(
        settings.routes,
        backends=backends,
        default_model=default_model,
        default_embedding_model=default_embedding,
        fixed_names=fixed,
        catch_all=settings.default_backend
        if settings.default_backend in ("ollama", "openai")
        else None,
    )


async def warm_up(service: ModelService) -> None:
    """Load the local model now when it serves the default model, so the first call
    does not wait for it. A failure is logged; calls then report it themselves.
    """
    try:
        route = service.router.resolve("")
    except HivewireError:
        return
    backend = service.backends.get(route.backend)
    if not isinstance(backend, LocalBackend):
        return
    try:
        await backend.load()
    except HivewireError as exc:
        logger.error("local model not loaded: %s", exc)


def build_service(
    settings: ModelSettings,
    *,
    events: ModelEvents | None = None,
    transport: httpx.AsyncBaseTransport | None = None,
) -> ModelService:
    """Create the model service for the settings.

    Args:
        settings: The model section of the settings.
        events: Where ``model.*`` events go; None publishes nothing.
        transport: httpx transport for the HTTP backends (tests).
    """
    backends = build_backends(settings, transport=transport)
    router = build_router(settings, list(backends))
    logger.info(
        "model backends: %s; default model %r",
        ", ".join(backends) or "none",
        router.default_model,
    )
    return ModelService(
        backends,
        router,
        request_timeout=settings.request_timeout,
        list_timeout=settings.list_timeout,
        breaker=settings.breaker,
        events=events,
    )
