"""``hivewire dashboard``: the operators' live web dashboard, over HTTPS with mesh certs.

Prints its URL once listening. The browser logs in with a client certificate of the
mesh CA or a token (``HIVEWIRE_DASHBOARD__TOKENS``); see docs/observability.md.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer()


@app.command("dashboard")
def dashboard(
    host: Annotated[str | None, typer.Option(help="Interface to bind (default 127.0.0.1).")] = None,
    port: Annotated[
        int | None, typer.Option(help="HTTPS port (default 8443; 0 picks a free one).")
    ] = None,
    address: Annotated[
        str | None,
        typer.Option(
            "--address", "-a", help="Coordinator host:port (HIVEWIRE_COORDINATOR__ADDRESS)."
        ),
    ] = None,
    certs_dir: Annotated[
        Path | None, typer.Option("--certs-dir", help="Directory of ca.pem and the certificate.")
    ] = None,
    identity: Annotated[
        str, typer.Option("--identity", help="The dashboard's own certificate stem.")
    ] = "admin",
    nats_url: Annotated[str | None, typer.Option(help="NATS server for recent events.")] = None,
) -> None:
    """Serve the live web dashboard: agents, tasks, timelines, events, submit and cancel."""
    from hivewire.services.dashboard.serve import serve_dashboard
    from hivewire.services.dashboard.settings import DashboardProcessSettings
    from hivewire.services.runtime.config import load_settings
    from hivewire.services.runtime.logging import setup_logging
    from hivewire.services.runtime.tracing import setup_tracing

    settings = load_settings(
        DashboardProcessSettings,
        certs_dir=certs_dir,
        identity=identity,
        nats_url=nats_url,
        coordinator={"address": address},
        dashboard={"host": host, "port": port},
    )
    setup_logging(settings.log_level, settings.log_format)
    setup_tracing("hivewire-dashboard", otlp_endpoint=settings.otlp_endpoint)

    def ready(url: str) -> None:
        typer.echo(f"dashboard: {url}")

    try:
        asyncio.run(serve_dashboard(settings, on_ready=ready))
    except KeyboardInterrupt:
        raise typer.Exit(130) from None
