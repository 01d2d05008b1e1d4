"""nats-server's security file: who is admitted, with which pins, after revocations."""

from __future__ import annotations

import json
from pathlib import Path

from hivewire.services.mesh.nats_security import mesh_certs, render_security
from hivewire.services.runtime.pki import describe_cert
from hivewire.services.runtime.tls import TlsFiles
from tests.conftest import Pki


def test_revoked_serials_and_identities_are_not_admitted(pki: Pki, tmp_path: Path) -> None:
    revoked = tmp_path / "revoked.txt"
    everyone = {c.spiffe_id: c.pin for c in mesh_certs(pki.dir)}
    agent = describe_cert(pki.dir / "agent.pem")
    assert agent.spiffe_id in everyone and len(set(everyone.values())) == len(everyone)
    revoked.write_text(f"{agent.serial_number:x}\nspiffe://hivewire.local/tool/tool\n")
    admitted = {c.spiffe_id for c in mesh_certs(pki.dir, revoked)}
    assert agent.spiffe_id not in admitted
    assert "spiffe://hivewire.local/tool/tool" not in admitted
    assert "spiffe://hivewire.local/coordinator/coordinator" in admitted


def test_nothing_admitted_pins_no_key(pki: Pki) -> None:
    text = render_security(TlsFiles.for_identity(pki.dir, "nats"), [], pins=[])
    tls = json.loads(text.split("tls: ", 1)[1].split("\nauthorization:", 1)[0])
    # An empty list would switch pinning off and admit every certificate of the CA.
    assert tls["pinned_certs"] == ["0" * 64]
