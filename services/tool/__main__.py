"""``python -m hivewire.services.tool``: run the tool service.

Startup: settings, logging, events, tools (built-ins, plugins, MCP servers), gRPC server
(SERVING), registration as ``hivewire-tool`` with the tool names as tags. SIGTERM
reverses it: NOT_SERVING, deregister, in-flight calls get the grace period, MCP sessions
and HTTP pools close, events flush. Defaults when the environment sets nothing:
identity ``tool``, port 50053, metrics on port 51053.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
from collections.abc import Sequence
from contextlib import AsyncExitStack
from typing import Any

from hivewire.discovery import Instance, new_instance_id, open_registry
from hivewire.services.runtime.config import Settings, load_settings
from hivewire.services.runtime.events import EventPublisher
from hivewire.services.runtime.logging import setup_logging
from hivewire.services.runtime.server import ServiceBinding, ServiceServer, serve_until_signal
from hivewire.services.tool.service import open_tool_service
from hivewire.services.tool.servicer import SERVICE_NAME, ToolServicer
from hivewire.tool.v1 import tool_pb2_grpc

logger = logging.getLogger(__name__)

DEFAULT_PORT = 50053
METRICS_OFFSET = 1000
SERVICE = "hivewire-tool"
"""Registry name of the tool service."""


def service_settings(settings: Settings) -> Settings:
    """Fill in the tool service's defaults for what the environment left unset."""
    update: dict[str, Any] = {}
    if "identity" not in settings.model_fields_set:
        update["identity"] = "tool"
    port = settings.port if "port" in settings.model_fields_set else DEFAULT_PORT
    update["port"] = port
    if "metrics_port" not in settings.model_fields_set and port:
        update["metrics_port"] = port + METRICS_OFFSET
    return settings.model_copy(update=update)


async def serve(settings: Settings) -> None:
    """Run the service until SIGTERM or SIGINT."""
    instance_id = new_instance_id("tool")
    async with AsyncExitStack() as stack:
        events = EventPublisher.from_settings(settings, source=f"tool/{instance_id}")
        await stack.enter_async_context(events)
        service = await stack.enter_async_context(
            open_tool_service(settings.tool, publisher=events)
        )
        registry = open_registry(
            settings.discovery, nats_url=settings.nats_url, consul_token=settings.consul_token
        )
        await stack.enter_async_context(registry)
        servicer = ToolServicer(service)
        server = ServiceServer(
            settings,
            [
                ServiceBinding(
                    SERVICE_NAME,
                    lambda s: tool_pb2_grpc.add_ToolServiceServicer_to_server(servicer, s),
                )
            ],
        )
        await stack.enter_async_context(server)
        instance = Instance(
            service=SERVICE,
            instance_id=instance_id,
            address=settings.advertised_host,
            port=server.port,
            tags=tuple(tool.name for tool in service.registry.tools()),
            meta={"name": "tool", "identity": settings.identity},
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
        prog="python -m hivewire.services.tool",
        description="hivewire tool service (settings: HIVEWIRE_* and HIVEWIRE_TOOL__*)",
    )
    parser.add_argument("--host", help="interface to bind (HIVEWIRE_HOST)")
    parser.add_argument(
        "--port", type=int, help=f"gRPC port (HIVEWIRE_PORT; default {DEFAULT_PORT})"
    )
    parser.add_argument("--metrics-port", type=int, help="Prometheus port (HIVEWIRE_METRICS_PORT)")
    parser.add_argument("--log-level", help="log level (HIVEWIRE_LOG_LEVEL)")
    parser.add_argument("--policy-file", help="tool policy TOML (HIVEWIRE_TOOL__POLICY_FILE)")
    args = parser.parse_args(argv)
    overrides: dict[str, Any] = {
        "host": args.host,
        "port": args.port,
        "metrics_port": args.metrics_port,
        "log_level": args.log_level,
    }
    if args.policy_file is not None:
        overrides["tool"] = {"policy_file": args.policy_file}
    settings = service_settings(load_settings(**overrides))
    setup_logging(settings.log_level, settings.log_format)
    asyncio.run(serve(settings))


if __name__ == "__main__":
    main()
