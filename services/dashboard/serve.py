"""Run the dashboard: HTTPS with the mesh certificate until SIGTERM or Ctrl-C.

``python -m hivewire.services.dashboard`` (what ``hivewire up`` starts) and
``hivewire dashboard`` both end up here. Once listening, the URL is logged, handed to
``on_ready`` and written with the port to ``settings.ports_file`` (``{"https": port,
"url": url, "pid": pid}``) for scripts and the mesh launcher.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
from collections.abc import Callable

from aiohttp import web

from hivewire.coordinator.v1 import coordinator_pb2_grpc
from hivewire.services.dashboard.backend import Backend
from hivewire.services.dashboard.settings import DashboardProcessSettings
from hivewire.services.dashboard.web import create_app, server_ssl_context
from hivewire.services.runtime.authz import AuthzPolicyStore
from hivewire.services.runtime.channels import secure_channel

logger = logging.getLogger(__name__)

__all__ = ["serve_dashboard"]


def _write_ports_file(settings: DashboardProcessSettings, port: int, url: str) -> None:
    path = settings.ports_file
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps({"https": port, "url": url, "pid": os.getpid()}) + "\n")
    os.replace(tmp, path)


async def serve_dashboard(
    settings: DashboardProcessSettings, *, on_ready: Callable[[str], None] | None = None
) -> None:
    """Serve until SIGTERM/SIGINT.

    Args:
        settings: ``dashboard`` (where to listen, tokens), ``coordinator.address`` (whom
            to call), ``identity``/``certs_dir`` (the dashboard's own certificate, for
            HTTPS and for calling the coordinator), ``authz_policy_file``, ``nats_url``.
        on_ready: Called with the URL once listening.
    """
    section = settings.dashboard
    files = settings.tls_files()
    channel = secure_channel(settings.coordinator.address, files)
    backend = Backend(
        coordinator_pb2_grpc.CoordinatorServiceStub(channel),
        AuthzPolicyStore(settings.authz_policy_file),
        admin_prefix=settings.coordinator.admin_prefix,
        nats_url=settings.nats_url if settings.events.enabled else None,
        events_window=section.events_window,
    )
    app = create_app(backend, tokens=dict(section.tokens))
    runner = web.AppRunner(app, handle_signals=False, access_log=None)
    await runner.setup()
    try:
        site = web.TCPSite(
            runner, section.host, section.port, ssl_context=server_ssl_context(files)
        )
        await site.start()
        port = int(runner.addresses[0][1])
        # Mesh certificates name localhost: a browser checks the name it dialled.
        loopback = section.host in ("127.0.0.1", "localhost", "::1")
        url = f"https://{'localhost' if loopback else section.host}:{port}/"
        logger.info("dashboard at %s (coordinator %s)", url, settings.coordinator.address)
        _write_ports_file(settings, port, url)
        if on_ready is not None:
            on_ready(url)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
    finally:
        if settings.ports_file is not None:
            with contextlib.suppress(FileNotFoundError):
                settings.ports_file.unlink()
        await runner.cleanup()
        await channel.close()
