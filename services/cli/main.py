"""Entry point of the ``hivewire`` command.

Each subcommand group lives in its own module under ``hivewire.services.cli`` and is
mounted at the bottom of this module with one ``app.add_typer(...)`` line; keep it small.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence
from importlib import metadata
from typing import Annotated, Any

import typer
from pydantic import ValidationError
from typer.core import TyperGroup

from hivewire.services.agent import command as agent
from hivewire.services.cli import a2a, certs, dashboard, dlq, events, keys, tasks, up
from hivewire.services.runtime.config import UnknownSettingError, invalid_settings

logger = logging.getLogger(__name__)


class _Group(TyperGroup):
    """Root command group that reports every error as one line on stderr.

    Usage errors exit with 2 and failures with 1, never with a traceback: the traceback of
    an unexpected exception goes to the debug log (``--verbose``) instead.
    """

    def main(
        self,
        args: Sequence[str] | None = None,
        prog_name: str | None = None,
        complete_var: str | None = None,
        standalone_mode: bool = True,
        windows_expand_args: bool = True,
        **extra: Any,
    ) -> Any:
        if not standalone_mode:
            return super().main(
                args, prog_name, complete_var, standalone_mode, windows_expand_args, **extra
            )
        try:
            result = super().main(
                args, prog_name, complete_var, False, windows_expand_args, **extra
            )
        except typer.TyperException as exc:
            _report_usage_error(exc)
            sys.exit(exc.exit_code)
        except typer.Abort:
            typer.echo("Aborted.", err=True)
            sys.exit(1)
        except UnknownSettingError as exc:
            typer.echo(f"Error: {exc}", err=True)
            sys.exit(2)
        except ValidationError as exc:
            for line in invalid_settings(exc):
                typer.echo(f"Error: {line}", err=True)
            sys.exit(2)
        except Exception as exc:
            logger.debug("unexpected failure", exc_info=True)
            typer.echo(
                f"Error: unexpected {type(exc).__name__}: {exc} (run with --verbose for details)",
                err=True,
            )
            sys.exit(1)
        # Without standalone mode the group returns the exit code of typer.Exit, or the
        # command's own return value (None for every command here).
        sys.exit(result if isinstance(result, int) else 0)


def _report_usage_error(exc: typer.TyperException) -> None:
    if type(exc).__name__ == "NoArgsIsHelpError":
        # The "error" is the help text (rich has already printed it while rendering it).
        text = exc.format_message()
        if text:
            typer.echo(text)
        return
    ctx = getattr(exc, "ctx", None)
    hint = f" (see '{ctx.command_path} --help')" if ctx is not None else ""
    typer.echo(f"Error: {exc.format_message()}{hint}", err=True)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"hivewire {metadata.version('hivewire')}")
        raise typer.Exit()


app = typer.Typer(
    name="hivewire",
    cls=_Group,
    help="hivewire: a gRPC service mesh for multi-agent AI systems.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


@app.callback()
def _root(
    verbose: Annotated[
        bool, typer.Option("--verbose", "-v", help="Log debug details to stderr.")
    ] = False,
    version: Annotated[
        bool,
        typer.Option(
            "--version", callback=_version, is_eager=True, help="Print the version and exit."
        ),
    ] = False,
    api_key: Annotated[
        str | None,
        typer.Option(
            "--api-key",
            envvar="HIVEWIRE_API_KEY",
            help="Act as the end user of this API key (`hivewire keys create`).",
            show_envvar=True,
        ),
    ] = None,
    token: Annotated[
        str | None,
        typer.Option(
            "--token",
            envvar="HIVEWIRE_TOKEN",
            help="Act as the end user of this JWT from the identity provider.",
            show_envvar=True,
        ),
    ] = None,
) -> None:
    if api_key and token:
        raise typer.BadParameter("give --api-key or --token, not both")
    tasks.use_credential(api_key or token)
    if verbose:
        logging.basicConfig(
            level=logging.DEBUG, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s"
        )
    _tracing()


def _tracing() -> None:
    # A command's calls start the trace of the work they cause; spans are sent only
    # when OTEL_EXPORTER_OTLP_ENDPOINT says where (the services send theirs there too).
    from pydantic import ValidationError

    from hivewire.services.runtime.config import load_settings

    try:
        endpoint = load_settings().otlp_endpoint
    except ValidationError:
        return  # the command reports bad settings itself, in its own words
    if endpoint:
        from hivewire.services.runtime.tracing import setup_tracing

        setup_tracing("hivewire-cli", otlp_endpoint=endpoint)


app.add_typer(certs.app, name="certs")
app.add_typer(keys.app, name="keys")
app.add_typer(agent.app, name="agent")
app.add_typer(events.app, name="events")
app.add_typer(dlq.app, name="dlq")
app.add_typer(tasks.app)  # submit, watch, cancel, tasks, agents
app.add_typer(tasks.projects_app, name="projects")
app.add_typer(up.app)  # up
app.add_typer(a2a.app)  # a2a
app.add_typer(dashboard.app)  # dashboard


def main() -> None:
    """Run the ``hivewire`` command line (the console script)."""
    app()
