"""``python -m hivewire.services.model``: run the model service.

Startup: settings, logging, events, backends, gRPC server (SERVING), registration as
``hivewire-model``. SIGTERM reverses it: NOT_SERVING, deregister, in-flight streams
get the grace period, backends close (HTTP pools, the local model thread), events
flush. Defaults when the environment sets nothing: identity ``model``, port 50052,
metrics on port 51052.
"""

from __future__ import annotations

from collections.abc import Sequence

from hivewire.services.model.app import build_service, warm_up
from hivewire.services.model.servicer import SERVICE_NAME, ModelServicer, add_to_server
from hivewire.services.model.settings import ModelProcessSettings
from hivewire.services.runtime.bootstrap import MODEL_PORT, Hosting, ServiceEntry, ServiceProcess
from hivewire.services.runtime.server import ServiceBinding

ENTRY = ServiceEntry(
    "model", title="hivewire model service", port=MODEL_PORT, settings_model=ModelProcessSettings
)


async def open_model(process: ServiceProcess, settings: ModelProcessSettings) -> Hosting:
    """Open the backends (closed when the process ends) and the servicer over them."""
    service = build_service(settings.model, events=process.events)
    process.stack.push_async_callback(service.aclose)
    await warm_up(service)
    servicer = ModelServicer(service, max_output_tokens=settings.model.max_output_tokens)
    return Hosting(
        [ServiceBinding(SERVICE_NAME, lambda s: add_to_server(servicer, s))],
        tags=tuple(service.backends),
        meta={"default_model": service.router.default_model},
    )


serve = ENTRY.hosting(open_model)
"""Run the service until SIGTERM or SIGINT (registered as ``hivewire-model``)."""


def main(argv: Sequence[str] | None = None) -> None:
    """Parse flags, build the settings once and serve."""
    args = ENTRY.parser().parse_args(argv)
    ENTRY.run(serve, ENTRY.settings(args))


if __name__ == "__main__":
    main()
