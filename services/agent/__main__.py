"""``python -m hivewire.services.agent module:Class``: same as ``hivewire agent serve``.

Only the agent command is loaded (services/agent/command.py, which ``hivewire agent``
also mounts), not the whole ``hivewire`` CLI, so an agent process depends on nothing but
what serving needs and the agent package never imports the CLI above it.
"""

from __future__ import annotations

import sys

import typer

from hivewire.services.agent.command import app

PROG = "python -m hivewire.services.agent"


def main() -> None:
    """Run ``agent serve`` with this process's arguments; errors are one line on stderr."""
    command = typer.main.get_command(app)
    try:
        command.main(args=["serve", *sys.argv[1:]], prog_name=PROG, standalone_mode=False)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except typer.Abort:
        typer.echo("Aborted.", err=True)
        sys.exit(1)
    except typer.TyperException as exc:
        # Usage errors (bad flag, bad target): one line, exit code 2.
        formatter = getattr(exc, "format_message", None)
        message = formatter() if callable(formatter) else str(exc)
        typer.echo(f"Error: {message} (see '{PROG} --help')", err=True)
        sys.exit(getattr(exc, "exit_code", 2))


if __name__ == "__main__":
    main()
