"""The development PKI: identities, SANs, key usage, file modes, idempotence, validation."""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID

from hivewire.services.mesh import pki
from hivewire.services.runtime.tls import parse_spiffe_id, spiffe_id

EXPECTED_IDS = {
    "coordinator": "spiffe://hivewire.local/coordinator/coordinator",
    "model": "spiffe://hivewire.local/model/model",
    "tool": "spiffe://hivewire.local/tool/tool",
    "agent": "spiffe://hivewire.local/agent/default",
    "agent-summarizer": "spiffe://hivewire.local/agent/summarizer",
    "agent-researcher": "spiffe://hivewire.local/agent/researcher",
    "agent-calculator": "spiffe://hivewire.local/agent/calculator",
    "agent-planner": "spiffe://hivewire.local/agent/planner",
    "client": "spiffe://hivewire.local/client/client",
    "admin": "spiffe://hivewire.local/admin/admin",
    "a2a": "spiffe://hivewire.local/client/a2a",
    "mcp": "spiffe://hivewire.local/client/mcp",
    "nats": "spiffe://hivewire.local/nats/nats",
}


def load(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def snapshot(directory: Path) -> dict[str, tuple[bytes, int]]:
    return {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(directory.iterdir())}


@pytest.fixture(scope="module")
def made(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, pki.PkiReport]:
    directory = tmp_path_factory.mktemp("pki") / "certs"
    return directory, pki.init_pki(directory)


@pytest.fixture
def umask_zero() -> Iterator[None]:
    # With umask 0 a mode comes only from the code: a key created world-readable and
    # chmod-ed afterwards would show up here.
    old = os.umask(0)
    try:
        yield
    finally:
        os.umask(old)


def test_init_creates_ca_and_every_default_identity(made: tuple[Path, pki.PkiReport]) -> None:
    directory, report = made
    assert set(report.created) == {"ca", *EXPECTED_IDS}
    assert report.renewed == () and report.kept == ()
    for stem, expected in EXPECTED_IDS.items():
        assert pki.describe_cert(directory / f"{stem}.pem").spiffe_id == expected
        assert (directory / f"{stem}.key").is_file()
    assert {i.stem: i.spiffe_id for i in pki.DEFAULT_IDENTITIES} == EXPECTED_IDS


@pytest.mark.parametrize("stem", sorted(EXPECTED_IDS))
def test_leaf_has_sans_eku_and_p256_key(made: tuple[Path, pki.PkiReport], stem: str) -> None:
    directory, _ = made
    cert = load(directory / f"{stem}.pem")
    ca = load(directory / "ca.pem")
    cert.verify_directly_issued_by(ca)

    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    role, name = EXPECTED_IDS[stem].removeprefix("spiffe://hivewire.local/").split("/")
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == [EXPECTED_IDS[stem]]
    assert set(san.get_values_for_type(x509.DNSName)) == {
        "localhost",
        f"{name}.{role}.hivewire.local",
    }
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.IPv4Address("127.0.0.1")]

    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert set(eku) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
    key_usage = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    assert key_usage.digital_signature and not key_usage.key_cert_sign

    public = cert.public_key()
    assert isinstance(public, ec.EllipticCurvePublicKey)
    assert public.curve.name == "secp256r1"
    key = serialization.load_pem_private_key((directory / f"{stem}.key").read_bytes(), None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    fmt = serialization.PublicFormat.SubjectPublicKeyInfo
    der = serialization.Encoding.DER
    assert key.public_key().public_bytes(der, fmt) == public.public_bytes(der, fmt)
    assert pki.check_cert(directory, stem) is None


def test_ca_is_a_p256_ca(made: tuple[Path, pki.PkiReport]) -> None:
    directory, _ = made
    info = pki.describe_cert(directory / "ca.pem")
    assert info.is_ca and info.subject == info.issuer and info.spiffe_id is None
    ca = load(directory / "ca.pem")
    ca.verify_directly_issued_by(ca)
    assert ca.extensions.get_extension_for_class(x509.KeyUsage).value.key_cert_sign
    public = ca.public_key()
    assert isinstance(public, ec.EllipticCurvePublicKey) and public.curve.name == "secp256r1"


def test_file_modes_and_gitignore(tmp_path: Path, umask_zero: None) -> None:
    directory = tmp_path / "nested" / "certs"
    pki.init_pki(directory)
    pki.issue_cert(directory, role="client", name="alice")
    assert mode(directory) == 0o700
    keys = sorted(directory.glob("*.key"))
    assert len(keys) == len(pki.DEFAULT_IDENTITIES) + 2  # + CA and alice
    for key in keys:
        assert mode(key) == 0o600, key
    for cert in directory.glob("*.pem"):
        assert mode(cert) == 0o644, cert
    lines = (directory / ".gitignore").read_text().splitlines()
    assert "*" in lines
    # No temporary files left behind by the atomic writes.
    assert not list(directory.glob(".*.tmp"))


def test_rerun_changes_nothing(tmp_path: Path) -> None:
    directory = tmp_path / "certs"
    pki.init_pki(directory)
    before = snapshot(directory)
    report = pki.init_pki(directory)
    assert report.created == () and report.renewed == ()
    assert set(report.kept) == {"ca", *EXPECTED_IDS}
    assert not report.changed
    assert snapshot(directory) == before


def test_rerun_repairs_only_what_is_broken(tmp_path: Path) -> None:
    directory = tmp_path / "certs"
    pki.init_pki(directory)
    (directory / "tool.key").unlink()
    (directory / "model.pem").unlink()
    (directory / "model.key").unlink()
    past = dt.datetime.now(dt.UTC) - dt.timedelta(days=2)
    pki.issue_cert(
        directory,
        role="agent",
        name="summarizer",
        not_before=past,
        not_after=past + dt.timedelta(days=1),
        force=True,
    )
    ca_before = (directory / "ca.pem").read_bytes()
    coordinator_before = (directory / "coordinator.pem").read_bytes()

    report = pki.init_pki(directory)

    assert report.created == ("model",)
    assert set(report.renewed) == {"tool", "agent-summarizer"}
    assert "ca" in report.kept and "coordinator" in report.kept
    assert (directory / "ca.pem").read_bytes() == ca_before
    assert (directory / "coordinator.pem").read_bytes() == coordinator_before
    for stem in ("tool", "model", "agent-summarizer"):
        assert pki.check_cert(directory, stem) is None


def test_force_recreates_ca_and_reissues_extra_leaves(tmp_path: Path) -> None:
    directory = tmp_path / "certs"
    pki.init_pki(directory)
    pki.issue_cert(directory, role="client", name="alice")
    old_ca = (directory / "ca.pem").read_bytes()

    report = pki.init_pki(directory, force=True)

    assert set(report.renewed) == {"ca", "alice", *EXPECTED_IDS}
    assert (directory / "ca.pem").read_bytes() != old_ca
    assert pki.check_cert(directory, "alice") is None
    assert pki.describe_cert(directory / "alice.pem").spiffe_id == (
        "spiffe://hivewire.local/client/alice"
    )


def test_ca_without_key_is_reported_not_replaced(tmp_path: Path) -> None:
    directory = tmp_path / "certs"
    pki.init_pki(directory)
    (directory / "ca.key").unlink()
    ca_before = (directory / "ca.pem").read_bytes()
    with pytest.raises(pki.PkiError, match=r"ca\.key is missing.*--force"):
        pki.init_pki(directory)
    with pytest.raises(pki.PkiError):
        pki.issue_cert(directory, role="client", name="bob")
    assert (directory / "ca.pem").read_bytes() == ca_before
    pki.init_pki(directory, force=True)
    assert pki.check_cert(directory, "coordinator") is None


def test_issue_cert_paths_stems_and_identity(tmp_path: Path) -> None:
    directory = tmp_path / "certs"
    alice = pki.issue_cert(directory, role="client", name="alice", valid_days=30)
    assert (directory / "ca.pem").is_file(), "issue_cert creates the CA when missing"
    assert alice.stem == "alice"
    assert alice.cert_path == directory / "alice.pem"
    assert alice.key_path == directory / "alice.key"
    assert alice.ca_path == directory / "ca.pem"
    assert alice.spiffe_id == "spiffe://hivewire.local/client/alice"
    assert alice.not_after - alice.not_before == dt.timedelta(days=30)

    planner = pki.issue_cert(directory, role="agent", name="planner")
    assert planner.stem == "agent-planner"
    assert planner.spiffe_id == "spiffe://hivewire.local/agent/planner"
    custom = pki.issue_cert(directory, role="admin", name="root", stem="ops")
    assert custom.cert_path.name == "ops.pem"
    assert pki.describe_cert(custom.cert_path).spiffe_id == "spiffe://hivewire.local/admin/root"


def test_issue_cert_refuses_to_overwrite_without_force(tmp_path: Path) -> None:
    directory = tmp_path / "certs"
    first = pki.issue_cert(directory, role="client", name="alice")
    before = first.cert_path.read_bytes()
    with pytest.raises(pki.CertExistsError, match="alice.pem already exists"):
        pki.issue_cert(directory, role="client", name="alice")
    assert first.cert_path.read_bytes() == before
    second = pki.issue_cert(directory, role="client", name="alice", force=True)
    assert second.cert_path.read_bytes() != before


def test_expired_and_future_certificates_can_be_minted(tmp_path: Path) -> None:
    directory = tmp_path / "certs"
    pki.init_pki(directory)
    now = dt.datetime.now(dt.UTC)
    expired = pki.issue_cert(
        directory,
        role="client",
        name="late",
        not_before=now - dt.timedelta(days=10),
        not_after=now - dt.timedelta(days=1),
    )
    info = pki.describe_cert(expired.cert_path)
    assert info.is_expired()
    assert info.not_after < now
    problem = pki.check_cert(directory, "late")
    assert problem is not None and problem.startswith("expired")

    future = pki.issue_cert(
        directory,
        role="client",
        name="early",
        not_before=now + dt.timedelta(days=1),
        not_after=now + dt.timedelta(days=2),
    )
    assert not pki.describe_cert(future.cert_path).is_expired()
    problem = pki.check_cert(directory, "early")
    assert problem is not None and problem.startswith("not valid before")


def test_check_cert_detects_foreign_ca_and_key_mismatch(tmp_path: Path) -> None:
    mine, theirs = tmp_path / "mine", tmp_path / "theirs"
    pki.init_pki(mine)
    pki.init_pki(theirs)
    (mine / "stranger.pem").write_bytes((theirs / "client.pem").read_bytes())
    (mine / "stranger.key").write_bytes((theirs / "client.key").read_bytes())
    assert pki.check_cert(mine, "stranger") == "not issued by this CA"
    (mine / "client.key").write_bytes((mine / "admin.key").read_bytes())
    assert pki.check_cert(mine, "client") == "key does not match the certificate"


@pytest.mark.parametrize(
    "bad", ["", "Alice", "-alice", "a_b", "a.b", "a/b", "a b", "ä", "a" * 64, "alice\n"]
)
def test_names_and_roles_are_validated(tmp_path: Path, bad: str) -> None:
    with pytest.raises(ValueError, match=r"invalid name .*a-z, 0-9 and '-'"):
        pki.validate_label(bad, what="name")
    with pytest.raises(ValueError, match=r"invalid role"):
        pki.issue_cert(tmp_path, role=bad, name="alice")
    with pytest.raises(ValueError, match=r"invalid name"):
        pki.issue_cert(tmp_path, role="client", name=bad)
    with pytest.raises(ValueError, match=r"invalid stem"):
        pki.issue_cert(tmp_path, role="client", name="alice", stem=bad)
    assert not list(tmp_path.iterdir()), "nothing is written for invalid input"


def test_valid_labels_and_spiffe_ids() -> None:
    for label in ("alice", "a" * 63, "x1", "0-a"):
        assert pki.validate_label(label, what="name") == label
    assert spiffe_id("client", "alice") == "spiffe://hivewire.local/client/alice"
    assert spiffe_id("x1", "0-a") == "spiffe://hivewire.local/x1/0-a"
    assert parse_spiffe_id("spiffe://hivewire.local/agent/planner") == ("agent", "planner")
    assert parse_spiffe_id("spiffe://other.domain/agent/planner") is None


def test_issue_cert_rejects_bad_validity(tmp_path: Path) -> None:
    now = dt.datetime.now(dt.UTC)
    with pytest.raises(ValueError, match="reserved for the CA"):
        pki.issue_cert(tmp_path, role="client", name="x", stem="ca")
    with pytest.raises(ValueError, match="at least 1 day"):
        pki.issue_cert(tmp_path, role="client", name="x", valid_days=0)
    with pytest.raises(ValueError, match="timezone-aware"):
        pki.issue_cert(tmp_path, role="client", name="x", not_after=dt.datetime(2020, 1, 1))
    with pytest.raises(ValueError, match="empty validity window"):
        pki.issue_cert(tmp_path, role="client", name="x", not_before=now, not_after=now)
