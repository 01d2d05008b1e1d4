"""``python -m hivewire.services.model``: run the model service.

Startup: settings, logging, events, backends, gRPC server (SERVING), registration as
``hivewire-model``. SIGTERM reverses it: NOT_SERVING, deregister, in-flight streams
get the grace period, backends close (HTTP pools, the local model thread), events
flush. Defaults when the environment sets nothing: identity ``model``, port 50052,
metrics on port 51052.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
from collections.abc import Sequence
from contextlib import AsyncExitStack
from typing import Any

from hivewire.discovery import Instance, new_instance_id, open_registry
from hivewire.services.model.app import build_service, warm_up
from hivewire.services.model.servicer import SERVICE_NAME, ModelServicer, add_to_server
from hivewire.services.runtime.config import Settings, load_settings
from hivewire.services.runtime.events import EventPublisher
from hivewire.services.runtime.logging import setup_logging
from hivewire.services.runtime.server import ServiceBinding, ServiceServer, serve_until_signal

logger = logging.getLogger(__name__)

DEFAULT_PORT = 50052
METRICS_OFFSET = 1000
SERVICE = "hivewire-model"
"""Registry name of the model service."""


def service_settings(settings: Settings) -> Settings:
    """Fill in the model service's defaults for what the environment left unset."""
    update: dict[str, Any] = {}
    if "identity" not in settings.model_fields_set:
        update["identity"] = "model"
    port = settings.port if "port" in settings.model_fields_set else DEFAULT_PORT
    update["port"] = port
    if "metrics_port" not in settings.model_fields_set and port:
        update["metrics_port"] = port + METRICS_OFFSET
    return settings.model_copy(update=update)


async def serve(settings: Settings) -> None:
    """Run the service until SIGTERM or SIGINT."""
    instance_id = new_instance_id("model")
    async with AsyncExitStack() as stack:
        events = EventPublisher.from_settings(settings, source=f"model/{instance_id}")
        await stack.enter_async_context(events)
        service = build_service(settings.model, events=events)
        stack.push_async_callback(service.aclose)
        await warm_up(service)
        registry = open_registry(
            settings.discovery, nats_url=settings.nats_url, consul_token=settings.consul_token
        )
        await stack.enter_async_context(registry)
        servicer = ModelServicer(service, max_output_tokens=settings.model.max_output_tokens)
        server = ServiceServer(
            settings, [ServiceBinding(SERVICE_NAME, lambda s: add_to_server(servicer, s))]
        )
        await stack.enter_async_context(server)
        instance = Instance(
            service=SERVICE,
            instance_id=instance_id,
            address=settings.advertised_host,
            port=server.port,
            tags=tuple(service.backends),
            meta={
                "name": "model",
                "identity": settings.identity,
                "default_model": service.router.default_model,
            },
        )
        await registry.register(instance)
        logger.info("registered %s %s at %s", SERVICE, instance_id, instance.endpoint)

        async def deregister() -> None:
            await registry.deregister(instance_id)
            logger.info("deregistered %s %s", SERVICE, instance_id)

        server.add_shutdown_hook(deregister)
        await serve_until_signal(server)


def main(argv: Sequence[str] | None = None) -> None:
    """Parse flags, build the settings once and serve."""
    parser = argparse.ArgumentParser(
        prog="python -m hivewire.services.model",
        description="hivewire model service (settings: HIVEWIRE_* and HIVEWIRE_MODEL__*)",
    )
    parser.add_argument("--host", help="interface to bind (HIVEWIRE_HOST)")
    parser.add_argument(
        "--port", type=int, help=f"gRPC port (HIVEWIRE_PORT; default {DEFAULT_PORT})"
    )
    parser.add_argument("--metrics-port", type=int, help="Prometheus port (HIVEWIRE_METRICS_PORT)")
    parser.add_argument("--log-level", help="log level (HIVEWIRE_LOG_LEVEL)")
    args = parser.parse_args(argv)
    settings = service_settings(
        load_settings(
            host=args.host, port=args.port, metrics_port=args.metrics_port, log_level=args.log_level
        )
    )
    setup_logging(settings.log_level, settings.log_format)
    asyncio.run(serve(settings))


if __name__ == "__main__":
    main()
