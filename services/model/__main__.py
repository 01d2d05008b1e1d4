"""``python -m hivewire.services.model``: run the model service.

Startup: settings, logging, events, backends, gRPC server (SERVING), registration as
``hivewire-model``. SIGTERM reverses it: NOT_SERVING, deregister, in-flight streams
get the grace period, backends close (HTTP pools, the local model thread), events
flush. Defaults when the environment sets nothing: identity ``model``, port 50052,
metrics on port 51052.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from contextlib import AsyncExitStack

from hivewire.discovery import new_instance_id
from hivewire.services.model.app import build_service, warm_up
from hivewire.services.model.servicer import SERVICE_NAME, ModelServicer, add_to_server
from hivewire.services.model.settings import ModelProcessSettings
from hivewire.services.runtime.bootstrap import (
    MODEL_PORT,
    Registration,
    ServiceEntry,
    registry_from_settings,
    serving,
)
from hivewire.services.runtime.events import EventPublisher
from hivewire.services.runtime.server import ServiceBinding, serve_until_signal

logger = logging.getLogger(__name__)

ENTRY = ServiceEntry(
    "model", title="hivewire model service", port=MODEL_PORT, settings_model=ModelProcessSettings
)
SERVICE = "hivewire-model"
"""Registry name of the model service."""


async def serve(settings: ModelProcessSettings) -> None:
    """Run the service until SIGTERM or SIGINT."""
    instance_id = new_instance_id("model")
    async with AsyncExitStack() as stack:
        events = EventPublisher.from_settings(settings, source=f"model/{instance_id}")
        await stack.enter_async_context(events)
        service = build_service(settings.model, events=events)
        stack.push_async_callback(service.aclose)
        await warm_up(service)
        registry = await stack.enter_async_context(registry_from_settings(settings))
        servicer = ModelServicer(service, max_output_tokens=settings.model.max_output_tokens)
        registration = Registration(
            SERVICE,
            instance_id,
            tags=tuple(service.backends),
            meta={
                "name": "model",
                "identity": settings.identity,
                "default_model": service.router.default_model,
            },
        )
        running = await stack.enter_async_context(
            serving(
                settings,
                [ServiceBinding(SERVICE_NAME, lambda s: add_to_server(servicer, s))],
                registry=registry,
                registration=registration,
                events=events,
            )
        )
        await serve_until_signal(running.server)


def main(argv: Sequence[str] | None = None) -> None:
    """Parse flags, build the settings once and serve."""
    args = ENTRY.parser().parse_args(argv)
    ENTRY.run(serve, ENTRY.settings(args))


if __name__ == "__main__":
    main()
