"""The NATS guard: nats-server's view of the mesh PKI kept current, and its refusals reported.

``hivewire up`` runs it next to nats-server (``python -m hivewire.services.mesh.nats_guard``,
as the server's own identity ``nats``). It does two things:

* **Keeps the admitted certificates current.** nats-server reads its users and the
  public-key pins of the certificates it admits (services/mesh/nats_security.py) from a
  security file its configuration includes. The guard re-renders that file when the
  certificates directory or the deny list (``HIVEWIRE_REVOKED_CERTS_FILE``, written by
  ``hivewire certs revoke``) changes, and signals the server to reload (``SIGHUP``):
  a revoked certificate is then refused in the TLS handshake and its open connections
  are closed; a newly issued identity may connect.
* **Reports what nats-server refuses.** nats-server publishes no advisory for a
  permission violation, and its connection advisories say only "TLS Handshake
  Failure"; its log names all of them with their cause. The guard follows the log and
  turns each refusal into a ``hivewire_security_denials_total{kind, reason}`` count, a
  log line and a ``security.authn_failed`` / ``security.authz_denied`` event
  (runtime/security.py), with the identity (or, before the handshake, the remote
  address) and the subject, never a message payload.

=================================  =====================================================
nats-server log line               kind, reason
=================================  =====================================================
TLS: no client certificate         ``authn``, ``NATS_NO_CERTIFICATE``
TLS: unknown authority             ``authn``, ``NATS_UNKNOWN_AUTHORITY``
TLS: expired certificate           ``authn``, ``NATS_CERT_EXPIRED``
TLS: certificate not pinned        ``authn``, ``NATS_CERT_NOT_ADMITTED`` (revoked, unknown)
TLS: anything else (plaintext...)  ``authn``, ``NATS_TLS_HANDSHAKE_FAILED``
authentication error               ``authn``, ``NATS_IDENTITY_NOT_LISTED``
Publish Violation                  ``authz``, ``NATS_PUBLISH_DENIED``
Subscription Violation             ``authz``, ``NATS_SUBSCRIBE_DENIED``
=================================  =====================================================
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import re
import signal
from collections.abc import Callable, Sequence
from contextlib import AsyncExitStack
from dataclasses import dataclass
from pathlib import Path

from hivewire.services.base.lifecycle import cancel_and_wait
from hivewire.services.mesh.nats_security import render_mesh_security
from hivewire.services.runtime.bootstrap import ServiceEntry, serving
from hivewire.services.runtime.config import Settings
from hivewire.services.runtime.events import EventPublisher
from hivewire.services.runtime.security import record_denial
from hivewire.services.runtime.server import serve_until_signal

logger = logging.getLogger(__name__)

ENTRY = ServiceEntry("nats", title="hivewire NATS guard", port=0, settings_model=Settings)
"""Identity ``nats`` (the server's own certificate); any free port."""

_ERROR_LINE = re.compile(r"\[ERR\] (?P<address>\S+) - cid:\d+ - (?P<text>.*)$")
_USER = re.compile(r'(?:/user:|User ")(?P<user>[^"\s,]+)')
_SUBJECT = re.compile(r'Subject "(?P<subject>[^"]*)"')
_TLS_REASONS = (
    ("didn't provide a certificate", "NATS_NO_CERTIFICATE"),
    ("unknown authority", "NATS_UNKNOWN_AUTHORITY"),
    ("expired", "NATS_CERT_EXPIRED"),
    ("not pinned", "NATS_CERT_NOT_ADMITTED"),
)


@dataclass(frozen=True)
class Refusal:
    """One connection or operation nats-server refused."""

    kind: str
    """``authn`` (a connection) or ``authz`` (a publish or subscribe)."""
    reason: str
    caller: str
    """The SPIFFE id, or the remote address when refused before the identity was known."""
    method: str
    """``nats connect``, ``nats publish <subject>`` or ``nats subscribe <subject>``."""


def parse_refusal(line: str) -> Refusal | None:
    """The refusal one nats-server log line reports, or None for any other line."""
    match = _ERROR_LINE.search(line)
    if match is None:
        return None
    address, text = match["address"], match["text"]
    for operation, marker in (("publish", "Publish Violation"), ("subscribe", "Subscription")):
        if marker in text and "Violation" in text:
            user = _USER.search(text)
            subject = _SUBJECT.search(text)
            return Refusal(
                "authz",
                f"NATS_{operation.upper()}_DENIED",
                user["user"] if user else address,
                f"nats {operation} {subject['subject'] if subject else ''}".rstrip(),
            )
    if "TLS handshake error" in text:
        reason = next(
            (r for marker, r in _TLS_REASONS if marker in text), "NATS_TLS_HANDSHAKE_FAILED"
        )
        return Refusal("authn", reason, address, "nats connect")
    if "authentication error" in text.lower() or "authorization violation" in text.lower():
        return Refusal("authn", "NATS_IDENTITY_NOT_LISTED", address, "nats connect")
    return None


class LogFollower:
    """The lines appended to a log file since the last read (from its end at creation)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            self._offset = path.stat().st_size
        except FileNotFoundError:
            self._offset = 0
        self._partial = b""

    def new_lines(self) -> list[str]:
        """Complete lines written since the last call; a truncated file is read anew."""
        try:
            size = self.path.stat().st_size
        except FileNotFoundError:
            return []
        if size < self._offset:
            self._offset, self._partial = 0, b""
        if size == self._offset:
            return []
        with self.path.open("rb") as log:
            log.seek(self._offset)
            data = log.read(size - self._offset)
        self._offset += len(data)
        *lines, self._partial = (self._partial + data).split(b"\n")
        return [line.decode("utf-8", "replace") for line in lines]


class SecurityReloader:
    """Rewrites nats-server's security file when the PKI or the deny list changes."""

    def __init__(
        self,
        security_file: Path,
        certs_dir: Path,
        revoked_file: Path | None,
        server_pid: Callable[[], int | None],
    ) -> None:
        self.security_file = security_file
        self.certs_dir = certs_dir
        self.revoked_file = revoked_file
        self._server_pid = server_pid
        self._stamp: tuple[tuple[str, int], ...] | None = None

    def _current_stamp(self) -> tuple[tuple[str, int], ...]:
        paths = sorted(self.certs_dir.glob("*.pem"))
        if self.revoked_file is not None:
            paths.append(self.revoked_file)
        stamp = []
        for path in paths:
            with contextlib.suppress(FileNotFoundError):
                stamp.append((str(path), path.stat().st_mtime_ns))
        return tuple(stamp)

    def check(self) -> bool:
        """Rewrite the file and reload the server if what it admits changed.

        Returns:
            Whether the server was told to reload.
        """
        stamp = self._current_stamp()
        if stamp == self._stamp:
            return False
        self._stamp = stamp
        text = render_mesh_security(self.certs_dir, revoked_file=self.revoked_file)
        try:
            if self.security_file.read_text() == text:
                return False
        except FileNotFoundError:
            pass
        tmp = self.security_file.with_suffix(".tmp")
        tmp.write_text(text)
        os.replace(tmp, self.security_file)
        pid = self._server_pid()
        if pid is None:
            return False
        os.kill(pid, signal.SIGHUP)
        logger.info("nats-server told to reload its admitted certificates (pid %d)", pid)
        return True


class NatsGuard:
    """Runs the reloader and the log follower until cancelled.

    Args:
        reloader: Keeps the security file current (None: no reloads).
        server_log: nats-server's log file (None: refusals are not followed).
        interval: Seconds between two looks at the files.
    """

    def __init__(
        self,
        reloader: SecurityReloader | None,
        server_log: Path | None,
        *,
        interval: float = 0.25,
    ) -> None:
        self._reloader = reloader
        self._log = LogFollower(server_log) if server_log is not None else None
        self._interval = interval

    def poll(self) -> list[Refusal]:
        """One look (blocking file work): reload if needed; the refusals logged since."""
        if self._reloader is not None:
            try:
                self._reloader.check()
            except (OSError, ValueError) as exc:
                logger.error("NATS guard: cannot render the security file: %s", exc)
        lines = self._log.new_lines() if self._log is not None else []
        return [r for r in map(parse_refusal, lines) if r is not None]

    async def run(self) -> None:
        """Poll until cancelled; count, log and publish every refusal (in the loop)."""
        while True:
            for refusal in await asyncio.to_thread(self.poll):
                record_denial(refusal.kind, refusal.reason, refusal.caller, refusal.method)
            await asyncio.sleep(self._interval)


async def serve(settings: Settings, args: argparse.Namespace) -> None:
    """Serve health and metrics, publish refusals, and guard until SIGTERM or SIGINT."""
    server_pid: int | None = args.server_pid
    reloader = (
        SecurityReloader(
            args.security_file,
            settings.certs_dir,
            settings.revoked_certs_file,
            lambda: server_pid,
        )
        if args.security_file is not None
        else None
    )
    guard = NatsGuard(reloader, args.server_log)
    async with AsyncExitStack() as stack:
        events = EventPublisher.from_settings(settings, source=f"nats/{settings.identity}")
        await stack.enter_async_context(events)
        running = await stack.enter_async_context(serving(settings, [], events=events))
        task = asyncio.create_task(guard.run(), name="nats-guard")
        stack.push_async_callback(cancel_and_wait, [task])
        await serve_until_signal(running.server)


def main(argv: Sequence[str] | None = None) -> None:
    """Parse flags, build the settings once and guard."""
    parser = ENTRY.parser()
    parser.prog = "python -m hivewire.services.mesh.nats_guard"
    parser.description = "hivewire NATS guard (settings: HIVEWIRE_*; docs/security.md)"
    parser.add_argument("--security-file", type=Path, help="the security file to keep current")
    parser.add_argument("--server-pid", type=int, help="nats-server's pid (to signal reloads)")
    parser.add_argument("--server-log", type=Path, help="nats-server's log file (to follow)")
    args = parser.parse_args(argv)
    settings = ENTRY.settings(args)
    ENTRY.run(lambda s: serve(s, args), settings)


if __name__ == "__main__":
    main()
