"""Revoked certificates: a deny list every server re-reads when it changes.

gRPC Python has no CRL hook for its TLS handshake, so revocation is checked per call by
the authz interceptor: a certificate whose serial number (or whose SPIFFE id) is in the
file ``HIVEWIRE_REVOKED_CERTS_FILE`` is refused with ``UNAUTHENTICATED``, reason
``CERT_REVOKED``, before any service code runs. One entry a line, ``#`` comments::

    # a leaked agent key: its certificate only (a reissued one works)
    5f:3a:91:0c:...              serial number, hex, colons optional
    # an identity removed from the mesh: every certificate it has
    spiffe://hivewire.local/agent/old-planner

``hivewire certs revoke <stem>`` appends a certificate's serial. The file is re-read
when its modification time changes (checked at most once a second); an unreadable file
keeps the previous list.
Reading a peer's serial costs a parse of its certificate, so it happens only while the
list names serials, and is cached per certificate.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

from cryptography import x509

from hivewire.services.runtime.filewatch import FileWatch

logger = logging.getLogger(__name__)

_CACHE_LIMIT = 4096


def _serial_text(value: str) -> str:
    return value.replace(":", "").strip().lower().lstrip("0") or "0"


class RevocationList:
    """Serials and SPIFFE ids refused, from a file re-read when it changes."""

    def __init__(self, path: Path, *, check_interval: float = 1.0) -> None:
        """Read the file (a missing file is an empty list)."""
        self.path = path
        self._watch = FileWatch(path, check_interval=check_interval, missing_ok=True)
        self.serials: frozenset[str] = frozenset()
        self.identities: frozenset[str] = frozenset()
        self._serial_of: dict[bytes, str] = {}
        self._refresh()

    def _refresh(self) -> None:
        try:
            stamp = self._watch.changed()
        except OSError as exc:
            logger.error("revocation list unreadable, keeping the previous one: %s", exc)
            return
        if stamp is None:
            return
        self._watch.mark(stamp)
        serials, identities = set(), set()
        if stamp[0] is not None:
            for raw in self.path.read_text().splitlines():
                entry = raw.split("#", 1)[0].strip()
                if entry.startswith("spiffe://"):
                    identities.add(entry)
                elif entry:
                    serials.add(_serial_text(entry))
        self.serials, self.identities = frozenset(serials), frozenset(identities)
        logger.info(
            "revocation list %s: %d serial(s), %d identit(y/ies)",
            self.path,
            len(self.serials),
            len(self.identities),
        )

    def revoked(self, spiffe_id: str, peer_pem: Callable[[], bytes | None]) -> bool:
        """Whether a peer is revoked.

        Args:
            spiffe_id: Its certificate's SPIFFE id.
            peer_pem: Returns its certificate (PEM); called only while serials are listed.
        """
        self._refresh()
        if spiffe_id and spiffe_id in self.identities:
            return True
        if not self.serials:
            return False
        pem = peer_pem()
        if not pem:
            return False
        serial = self._serial_of.get(pem)
        if serial is None:
            serial = format(x509.load_pem_x509_certificate(pem).serial_number, "x")
            if len(self._serial_of) >= _CACHE_LIMIT:
                self._serial_of.clear()
            self._serial_of[pem] = serial
        return serial in self.serials
