"""``hivewire a2a``: run the A2A gateway (docs/interop.md).

``hivewire a2a --coordinator 127.0.0.1:50051`` serves the mesh to Agent2Agent clients:
JSON-RPC with SSE over HTTPS (the agent card at ``/.well-known/agent-card.json``) and
the A2A gRPC binding, both with the mesh's TLS (callers: a client certificate or a bearer
credential). Every flag overrides the matching
``HIVEWIRE_*`` variable. ``hivewire up`` starts it with the rest of the mesh.
"""

from __future__ import annotations

from typing import Annotated

import typer

from hivewire.services.agent.command import CertsDirOpt, HostOpt, LogLevelOpt

app = typer.Typer()


@app.command("a2a")
def a2a(
    coordinator: Annotated[
        str | None, typer.Option(help="host:port of the coordinator (default 127.0.0.1:50051).")
    ] = None,
    port: Annotated[
        int | None, typer.Option("--port", "-p", help="A2A gRPC port (default 50054; 0: any).")
    ] = None,
    http_port: Annotated[
        int | None, typer.Option(help="A2A JSON-RPC HTTPS port (default 50055; 0: any).")
    ] = None,
    host: HostOpt = None,
    identity: Annotated[
        str | None, typer.Option(help="Certificate stem in the certs dir (default a2a).")
    ] = None,
    certs_dir: CertsDirOpt = None,
    default_skill: Annotated[
        str | None, typer.Option(help="Skill of messages that name none.")
    ] = None,
    log_level: LogLevelOpt = None,
) -> None:
    """Serve the mesh to A2A clients (JSON-RPC/SSE and gRPC, mTLS) until SIGTERM."""
    from hivewire.services.a2a.__main__ import ENTRY, serve
    from hivewire.services.a2a.settings import A2aProcessSettings
    from hivewire.services.agent.command import command_settings, run_service

    section = {
        "coordinator_address": coordinator,
        "http_port": http_port,
        "default_skill": default_skill,
    }
    settings = command_settings(
        A2aProcessSettings,
        host=host,
        port=port,
        identity=identity,
        certs_dir=certs_dir,
        log_level=log_level,
        a2a=section,
    )
    run_service(lambda: ENTRY.run(serve, ENTRY.defaults(settings)))
