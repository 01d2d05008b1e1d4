"""``python -m hivewire.services.coordinator``: run the coordinator.

Startup: settings, logging, events, the SQLite store (recovering unfinished tasks),
discovery, the gRPC server (SERVING), registration as ``hivewire-coordinator``.
SIGTERM reverses it: NOT_SERVING, deregister, open task streams end with
UNAVAILABLE (clients resume with WatchTask), in-flight calls get the grace period,
running attempts are cancelled and stay recorded as running, so the next start
dispatches them again. Defaults when the environment sets nothing: identity
``coordinator``, port 50051, metrics on port 51051, database
``.hivewire/coordinator.db``.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hivewire.services.coordinator.app import running_coordinator
from hivewire.services.runtime.config import Settings, load_settings
from hivewire.services.runtime.logging import setup_logging
from hivewire.services.runtime.server import serve_until_signal

logger = logging.getLogger(__name__)

DEFAULT_PORT = 50051
METRICS_OFFSET = 1000


def service_settings(settings: Settings) -> Settings:
    """Fill in the coordinator's defaults for what the environment left unset."""
    update: dict[str, Any] = {}
    if "identity" not in settings.model_fields_set:
        update["identity"] = "coordinator"
    port = settings.port if "port" in settings.model_fields_set else DEFAULT_PORT
    update["port"] = port
    if "metrics_port" not in settings.model_fields_set and port:
        update["metrics_port"] = port + METRICS_OFFSET
    return settings.model_copy(update=update)


async def serve(settings: Settings) -> None:
    """Run the coordinator until SIGTERM or SIGINT."""
    async with running_coordinator(settings) as running:
        await serve_until_signal(running.server)


def main(argv: Sequence[str] | None = None) -> None:
    """Parse flags, build the settings once and serve."""
    parser = argparse.ArgumentParser(
        prog="python -m hivewire.services.coordinator",
        description="hivewire coordinator (settings: HIVEWIRE_* and HIVEWIRE_COORDINATOR__*)",
    )
    parser.add_argument("--host", help="interface to bind (HIVEWIRE_HOST)")
    parser.add_argument(
        "--port", type=int, help=f"gRPC port (HIVEWIRE_PORT; default {DEFAULT_PORT})"
    )
    parser.add_argument("--metrics-port", type=int, help="Prometheus port (HIVEWIRE_METRICS_PORT)")
    parser.add_argument("--db", type=Path, help="SQLite database (HIVEWIRE_COORDINATOR__DB_PATH)")
    parser.add_argument("--log-level", help="log level (HIVEWIRE_LOG_LEVEL)")
    args = parser.parse_args(argv)
    overrides: dict[str, Any] = {
        "host": args.host,
        "port": args.port,
        "metrics_port": args.metrics_port,
        "log_level": args.log_level,
    }
    if args.db is not None:
        overrides["coordinator"] = {"db_path": args.db}
    settings = service_settings(load_settings(**overrides))
    setup_logging(settings.log_level, settings.log_format)
    asyncio.run(serve(settings))


if __name__ == "__main__":
    main()
