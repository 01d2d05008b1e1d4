"""``hivewire certs``: create and inspect the development PKI (see certs/README.md)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Annotated, TypeVar

import typer
from rich.table import Table

from hivewire.services.cli.output import fail, wide_console
from hivewire.services.runtime import pki

T = TypeVar("T")

app = typer.Typer(
    help="Development PKI: a local CA and one mTLS certificate per mesh identity.",
    no_args_is_help=True,
)


def _label(what: str) -> Callable[[str], str]:
    def check(value: str) -> str:
        try:
            return pki.validate_label(value, what=what)
        except ValueError as exc:
            raise typer.BadParameter(str(exc)) from None

    return check


def _stem(value: str | None) -> str | None:
    if value is None:
        return None
    try:
        return pki.validate_stem(value)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None


DirOption = Annotated[
    Path,
    typer.Option(
        "--dir",
        help="PKI directory (created with mode 0700 if missing).",
        file_okay=False,
        dir_okay=True,
    ),
]


def _attempt(operation: Callable[[], T]) -> T:
    """Run a PKI operation, turning its expected failures into one line on stderr."""
    try:
        return operation()
    except pki.CertExistsError as exc:
        fail(f"{exc.path} already exists ({exc.existing}); use --force to replace it")
    except pki.PkiError as exc:
        fail(str(exc))
    except ValueError as exc:
        fail(str(exc))
    except OSError as exc:
        target = f" {exc.filename}" if exc.filename else ""
        fail(f"cannot write the PKI{target}: {exc.strerror or exc}")


@app.command("init")
def init(
    directory: DirOption = Path("certs"),
    force: Annotated[
        bool,
        typer.Option("--force", help="Re-create the CA and re-issue every certificate."),
    ] = False,
) -> None:
    """Create the CA and the default certificates; keeps everything that is still valid."""
    report = _attempt(lambda: pki.init_pki(directory, force=force))
    identities = {identity.stem: identity.spiffe_id for identity in pki.DEFAULT_IDENTITIES}
    table = Table("", "stem", "identity", box=None, show_header=False, pad_edge=False)
    for action, stems in (
        ("created", report.created),
        ("renewed", report.renewed),
        ("kept", report.kept),
    ):
        for stem in stems:
            identity = "development CA" if stem == pki.CA_STEM else identities.get(stem, "")
            if not identity:
                identity = _identity_of(directory / f"{stem}.pem")
            table.add_row(action, stem, identity)
    console = wide_console()
    console.print(table)
    console.print(
        f"PKI in {directory}: {len(report.created)} created, {len(report.renewed)} renewed, "
        f"{len(report.kept)} kept. Private keys stay out of git (.gitignore)."
    )


@app.command("issue")
def issue(
    name: Annotated[
        str,
        typer.Option("--name", help="Identity name, e.g. alice.", callback=_label("name")),
    ],
    role: Annotated[
        str,
        typer.Option(
            "--role", help="Identity role: client, admin, agent...", callback=_label("role")
        ),
    ] = "client",
    directory: DirOption = Path("certs"),
    days: Annotated[int, typer.Option("--days", min=1, help="Validity in days.")] = (
        pki.DEFAULT_VALID_DAYS
    ),
    stem: Annotated[
        str | None,
        typer.Option(
            "--stem",
            help="File stem (default: the name; agent-<name> for agents).",
            callback=_stem,
        ),
    ] = None,
    force: Annotated[
        bool, typer.Option("--force", help="Replace an existing certificate of that stem.")
    ] = False,
) -> None:
    """Issue a certificate for spiffe://hivewire.local/<role>/<name> (default role: client)."""
    issued = _attempt(
        lambda: pki.issue_cert(
            directory, role=role, name=name, stem=stem, valid_days=days, force=force
        )
    )
    console = wide_console()
    console.print(f"identity     {issued.spiffe_id}")
    console.print(f"certificate  {issued.cert_path}")
    console.print(f"key          {issued.key_path}")
    console.print(f"ca           {issued.ca_path}")
    console.print(f"valid until  {issued.not_after:%Y-%m-%d %H:%M} UTC")


REVOKED_FILE = "revoked.txt"
"""The deny list in the PKI directory (``HIVEWIRE_REVOKED_CERTS_FILE`` under ``hivewire up``)."""


@app.command("revoke")
def revoke(
    stem: Annotated[str, typer.Argument(help="The certificate's file stem, e.g. agent-planner.")],
    directory: DirOption = Path("certs"),
) -> None:
    """Add a certificate's serial to <dir>/revoked.txt: servers refuse it from their next call."""
    path = directory / f"{stem}.pem"
    try:
        info = pki.describe_cert(path)
    except (OSError, ValueError) as exc:
        fail(f"cannot read {path}: {exc}")
    serial = format(info.serial_number, "x")
    with (directory / REVOKED_FILE).open("a") as deny_list:
        deny_list.write(f"{serial}  # {stem} {info.spiffe_id or info.subject}\n")
    typer.echo(f"revoked {stem} (serial {serial}) in {directory / REVOKED_FILE}")


@app.command("show")
def show(directory: DirOption = Path("certs")) -> None:
    """List the certificates in the PKI directory with their identity, expiry and status."""
    stems = pki.list_stems(directory) if directory.is_dir() else []
    if not stems:
        fail(f"no certificates in {directory}; run 'hivewire certs init --dir {directory}'")
    table = Table("stem", "identity", "expires", "status")
    for stem in stems:
        path = directory / f"{stem}.pem"
        try:
            info = pki.describe_cert(path)
        except (OSError, ValueError) as exc:
            table.add_row(stem, "", "", f"[red]unreadable: {exc}[/red]")
            continue
        if stem == pki.CA_STEM:
            identity = info.subject
            problem = f"expired {info.not_after:%Y-%m-%d}" if info.is_expired() else None
        else:
            identity = info.spiffe_id or info.subject
            problem = pki.check_cert(directory, stem)
        status = "[green]ok[/green]" if problem is None else f"[red]{problem}[/red]"
        table.add_row(stem, identity, f"{info.not_after:%Y-%m-%d %H:%M} UTC", status)
    wide_console().print(table)


def _identity_of(path: Path) -> str:
    try:
        info = pki.describe_cert(path)
    except (OSError, ValueError):
        return ""
    return info.spiffe_id or info.subject


@app.command("nats-auth")
def nats_auth(
    directory: DirOption = Path("certs"),
    out: Annotated[
        Path | None, typer.Option("--out", help="Write it to this file instead of stdout.")
    ] = None,
) -> None:
    """Print nats-server's authorization block: one user per certificate, with permissions.

    For a NATS server set up outside `hivewire up` (deploy/): its configuration includes
    the output next to its own tls block (docs/deployment.md). Only the public
    certificates (*.pem) are read.
    """
    from hivewire.services.mesh.nats_security import mesh_identities, render_authorization

    if not directory.is_dir() or not pki.list_stems(directory):
        fail(f"no certificates in {directory}; run 'hivewire certs init --dir {directory}'")
    text = render_authorization(mesh_identities(directory))
    if out is None:
        typer.echo(text, nl=False)
        return
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    typer.echo(f"wrote the authorization of {len(mesh_identities(directory))} identities to {out}")
