"""Output conventions every ``hivewire`` command shares: errors, JSON lines, labels.

Errors are one ``Error: ...`` line on standard error and an exit status; ``--json``
output is one protobuf-JSON object per line on standard output.
"""

from __future__ import annotations

import sys
from typing import NoReturn

import typer
from google.protobuf import json_format
from google.protobuf.message import Message
from rich.console import Console

from hivewire.common.v1 import common_pb2

__all__ = ["echo_json", "echo_result", "fail", "state_label"]


def fail(message: str, status: int = 1) -> NoReturn:
    """Print ``Error: <message>`` on standard error and exit with ``status``."""
    typer.echo(f"Error: {message}", err=True)
    raise typer.Exit(status)


def echo_json(message: Message) -> None:
    """Print a message as one protobuf-JSON object on its own line."""
    typer.echo(json_format.MessageToJson(message, indent=None))


def echo_result(message: Message, text: str, *, json_lines: bool) -> None:
    """Print a command's result: ``message`` as one JSON line with ``--json``, else ``text``."""
    if json_lines:
        echo_json(message)
    else:
        typer.echo(text)


def state_label(state: int) -> str:
    """``running``, ``input_required``... for a TaskState value."""
    name = common_pb2.TaskState.Name(common_pb2.TaskState.ValueType(state))
    return name.removeprefix("TASK_STATE_").lower()


def wide_console() -> Console:
    """A rich console for tables: terminal width on a terminal, 160 columns elsewhere."""
    # Off a terminal (pipes, CI logs, tests) rich would wrap to 80 columns and split
    # SPIFFE ids across lines; a wide fixed width keeps each row on one line.
    return Console(width=None if sys.stdout.isatty() else 160, highlight=False)
