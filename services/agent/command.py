"""``hivewire agent``: serve an agent class as a mesh service.

``hivewire agent serve my_module:MyAgent --port 50061`` runs the agent with mTLS,
health, reflection and metrics, registers it in discovery and deregisters it on
SIGTERM. Every flag overrides the matching ``HIVEWIRE_*`` variable (docs/agents.md).
The command lives with the agent package: ``hivewire`` mounts it as ``agent`` and
``python -m hivewire.services.agent`` runs it alone.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, TypeVar

import typer
from pydantic import ValidationError

if TYPE_CHECKING:
    from hivewire.services.runtime.config import Settings

logger = logging.getLogger(__name__)

app = typer.Typer(
    help="Run agents.",
    no_args_is_help=True,
    context_settings={"help_option_names": ["-h", "--help"]},
)


HostOpt = Annotated[str | None, typer.Option(help="Interface to bind.")]
CertsDirOpt = Annotated[Path | None, typer.Option(help="Directory of ca.pem and certificates.")]
LogLevelOpt = Annotated[str | None, typer.Option(help="Log level (INFO, DEBUG...).")]
"""The flags a service command shares (``hivewire agent serve``, ``hivewire a2a``)."""


@app.callback()
def _group() -> None:
    """Run agents."""


@app.command("serve")
def serve(
    target: Annotated[
        str, typer.Argument(help="The agent to serve, as module:Class (or an instance/factory).")
    ],
    port: Annotated[
        int | None, typer.Option("--port", "-p", help="gRPC port (0: any free port).")
    ] = None,
    host: HostOpt = None,
    name: Annotated[str | None, typer.Option(help="Override the agent card's name.")] = None,
    identity: Annotated[
        str | None,
        typer.Option(help="Certificate stem in the certs dir (default: agent-<name>, else agent)."),
    ] = None,
    certs_dir: CertsDirOpt = None,
    max_concurrency: Annotated[
        int | None, typer.Option(min=1, help="Override the agent's max_concurrency.")
    ] = None,
    model_address: Annotated[
        str | None, typer.Option(help="host:port of the model service (default: discovery).")
    ] = None,
    tool_address: Annotated[
        str | None, typer.Option(help="host:port of the tool service (default: discovery).")
    ] = None,
    discovery: Annotated[
        str | None, typer.Option(help="Registry: nats, consul://host:port or static.")
    ] = None,
    nats_url: Annotated[str | None, typer.Option(help="NATS server URL.")] = None,
    metrics_port: Annotated[
        int | None, typer.Option(help="Prometheus port (default: none, 0: any).")
    ] = None,
    register: Annotated[
        bool | None, typer.Option("--register/--no-register", help="Register in discovery.")
    ] = None,
    log_level: LogLevelOpt = None,
) -> None:
    """Serve an agent over mTLS and register it in discovery until SIGTERM."""
    from hivewire.services.agent.serve import (
        AgentLoadError,
        load_agent,
        serve_agent,
        settings_for_agent,
    )
    from hivewire.services.agent.settings import AgentProcessSettings
    from hivewire.services.runtime.bootstrap import run_loop
    from hivewire.services.runtime.logging import setup_logging
    from hivewire.services.runtime.tracing import setup_tracing

    try:
        agent = load_agent(target)
    except AgentLoadError as exc:
        raise typer.BadParameter(str(exc), param_hint="TARGET") from exc
    section: dict[str, Any] = {
        "name": name,
        "max_concurrency": max_concurrency,
        "model_address": model_address,
        "tool_address": tool_address,
        "registration": register,
    }
    loaded = command_settings(
        AgentProcessSettings,
        host=host,
        port=port,
        identity=identity,
        certs_dir=certs_dir,
        discovery=discovery,
        nats_url=nats_url,
        metrics_port=metrics_port,
        log_level=log_level,
        agent=section,
    )
    settings = settings_for_agent(loaded, agent)
    _drop_basic_config_handlers()
    setup_logging(settings.log_level, settings.log_format)
    setup_tracing("hivewire-agent", otlp_endpoint=settings.otlp_endpoint)
    run_service(lambda: run_loop(serve_agent(agent, settings), settings.event_loop))


SettingsT = TypeVar("SettingsT", bound="Settings")


def command_settings(model: type[SettingsT], **overrides: Any) -> SettingsT:
    """A service command's settings: the environment, then its flags (``overrides``).

    Raises:
        typer.BadParameter: A value is invalid (its setting and why, on one line).
    """
    from hivewire.services.runtime.config import load_settings

    try:
        return load_settings(model, **overrides)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err.get("loc", ()))
        raise typer.BadParameter(f"{where}: {err.get('msg', 'invalid value')}") from exc


def run_service(run: Callable[[], None]) -> None:
    """Run a service command's process until it stops.

    A missing certificate (or other file) is one ``Error:`` line and exit status 1;
    Ctrl-C exits with 130.
    """
    try:
        run()
    except FileNotFoundError as exc:
        typer.echo(f"Error: {exc}", err=True)
        raise typer.Exit(1) from exc
    except KeyboardInterrupt:
        raise typer.Exit(130) from None


def _drop_basic_config_handlers() -> None:
    # `hivewire -v` installs a basicConfig handler; the service's own handler replaces
    # it so every line is printed once, in the service's format.
    root = logging.getLogger()
    for handler in list(root.handlers):
        if type(handler) is logging.StreamHandler and not hasattr(handler, "_hivewire_handler"):
            root.removeHandler(handler)
