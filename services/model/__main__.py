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

from hivewire.services.model.app import build_service, warm_up
from hivewire.services.model.servicer import SERVICE_NAME, ModelServicer, add_to_server
from hivewire.services.model.settings import ModelProcessSettings
from hivewire.services.runtime.bootstrap import (
    MODEL_PORT,
    Registration,
    ServiceEntry,
    service_process,
)
from hivewire.services.runtime.server import ServiceBinding

logger = logging.getLogger(__name__)

ENTRY = ServiceEntry(
    "model", title="hivewire model service", port=MODEL_PORT, settings_model=ModelProcessSettings
)
SERVICE = "hivewire-model"
"""Registry name of the model service."""


async def serve(settings: ModelProcessSettings) -> None:
    """Run the service until SIGTERM or SIGINT."""
    async with service_process(settings, "model") as process:
        service = build_service(settings.model, events=process.events)
        process.stack.push_async_callback(service.aclose)
        await warm_up(service)
        servicer = ModelServicer(service, max_output_tokens=settings.model.max_output_tokens)
        registration = Registration(
            SERVICE,
            process.instance_id,
            tags=tuple(service.backends),
            meta={
                "name": "model",
                "identity": settings.identity,
                "default_model": service.router.default_model,
            },
        )
        await process.serve(
            [ServiceBinding(SERVICE_NAME, lambda s: add_to_server(servicer, s))], registration
        )


def main(argv: Sequence[str] | None = None) -> None:
    """Parse flags, build the settings once and serve."""
    args = ENTRY.parser().parse_args(argv)
    ENTRY.run(serve, ENTRY.settings(args))


if __name__ == "__main__":
    main()
