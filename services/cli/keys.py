"""``hivewire keys``: end-user API keys of the coordinator (docs/security.md).

A key is shown once, at creation; the file keeps only its hash. The coordinator re-reads
the file when it changes, so a revoked key stops working at its next call.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from hivewire.services.cli.output import fail, wide_console
from hivewire.services.runtime.authn import ApiKeyStore

DEFAULT_FILE = Path(".hivewire/api-keys.json")
"""Where ``hivewire up`` points the coordinator (``HIVEWIRE_AUTH__API_KEYS_FILE``)."""

app = typer.Typer(
    help="End-user API keys: create (shown once), list, revoke.", no_args_is_help=True
)

FileOption = Annotated[
    Path | None,
    typer.Option(
        "--file",
        help=f"Key file (default HIVEWIRE_AUTH__API_KEYS_FILE, else {DEFAULT_FILE}).",
        dir_okay=False,
    ),
]


def _store(path: Path | None) -> ApiKeyStore:
    if path is None:
        from hivewire.services.runtime.config import load_settings

        settings = load_settings()
        path = settings.auth.api_keys_file or DEFAULT_FILE
        return ApiKeyStore(path, roles=settings.auth.roles)
    return ApiKeyStore(path)


@app.command("create")
def create(
    name: Annotated[str, typer.Argument(help="The principal's name (owner of its tasks).")],
    role: Annotated[str, typer.Option(help="Policy role: client or admin.")] = "client",
    file: FileOption = None,
) -> None:
    """Create a key and print it (the only time it is shown)."""
    store = _store(file)
    try:
        text, key = store.create(name, role)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None
    typer.echo(text)
    typer.echo(
        f"key {key.key_id} for {role}/{name} in {store.path}; "
        "send it as 'authorization: Bearer <key>'. It is not shown again.",
        err=True,
    )


@app.command("list")
def list_keys(file: FileOption = None) -> None:
    """List keys (ids, principals, states; never secrets)."""
    store = _store(file)
    table = Table("id", "principal", "created", "state")
    for key in store.keys():
        state = f"revoked {key.revoked}" if key.revoked else "valid"
        table.add_row(key.key_id, f"{key.role}/{key.name}", key.created, state)
    wide_console().print(table)


@app.command("revoke")
def revoke(
    key_id: Annotated[str, typer.Argument(help="The key's id (from `hivewire keys list`).")],
    file: FileOption = None,
) -> None:
    """Revoke a key; the coordinator refuses it from its next call."""
    store = _store(file)
    try:
        key = store.revoke(key_id)
    except KeyError:
        fail(f"no key {key_id} in {store.path}")
    typer.echo(f"revoked {key.key_id} ({key.role}/{key.name})")
