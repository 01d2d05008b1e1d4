"""Development PKI: a local CA and SPIFFE-style leaf certificates for every mesh identity.

Every hop in the mesh is mutual TLS. This module creates the CA and the per-identity
certificates the services and clients present, in one directory:

```
ca.pem  ca.key                       the development CA (EC P-256)
<stem>.pem  <stem>.key               one leaf per identity, e.g. coordinator, agent-summarizer
.gitignore                           "*": keys never end up in a commit
```

An identity is the URI SAN ``spiffe://hivewire.local/<role>/<name>``; authorization reads
that, never the common name. Every leaf also carries the DNS SANs ``localhost`` and
``<name>.<role>.hivewire.local`` and the IP SAN ``127.0.0.1`` so that a client can verify a
server by any of them, and the extended key usages serverAuth and clientAuth so that one
certificate serves both directions (an agent is a server to the coordinator and a client
of the model service).

The functions here are synchronous: they run once from the CLI or a test fixture, before
any event loop matters; async callers use ``asyncio.to_thread``.

It lives with the launcher (``hivewire up`` and ``hivewire certs`` are its only users in
the product), not in the runtime every process loads. What a running process needs of
a certificate (the trust domain, SPIFFE ids, :func:`describe_cert`) is in
:mod:`hivewire.services.runtime.tls`; this module uses those, and re-exports
:func:`describe_cert` and :class:`CertInfo` for the scripts that already import them here.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import logging
import os
import re
import secrets
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from hivewire.services.runtime.tls import TRUST_DOMAIN, MeshName, cert_spiffe_id, parse_spiffe_id
from hivewire.services.runtime.tls import CertInfo as CertInfo  # re-exported (docstring)
from hivewire.services.runtime.tls import describe_cert as describe_cert  # re-exported

logger = logging.getLogger(__name__)

CA_STEM = "ca"
"""File stem of the CA: ``ca.pem`` and ``ca.key``."""

DEFAULT_VALID_DAYS = 365
"""Lifetime of a leaf certificate unless the caller says otherwise."""

CA_VALID_DAYS = 3650
"""Lifetime of the development CA."""

# Certificates minted "now" start a little in the past so that a peer whose clock is a few
# minutes behind does not reject a certificate that was issued a second ago.
_CLOCK_SKEW = dt.timedelta(minutes=5)

_LABEL = re.compile(r"[a-z0-9][a-z0-9-]{0,62}")

_GITIGNORE = """\
# Written by `hivewire certs init`: private keys and certificates are never committed.
*
!README.md
"""

_CERT_MODE = 0o644
_KEY_MODE = 0o600
_DIR_MODE = 0o700


class PkiError(Exception):
    """The PKI directory cannot be used as it is (for example a CA certificate without its key)."""


class CertExistsError(PkiError, FileExistsError):
    """A certificate with that stem exists already and replacing it was not asked for.

    Attributes:
        path: The existing certificate.
        existing: What it holds (identity and expiry), for the message.
    """

    def __init__(self, path: Path, existing: str) -> None:
        super().__init__(f"{path} already exists ({existing})")
        self.path = path
        self.existing = existing


@dataclass(frozen=True, slots=True)
class Identity(MeshName):
    """One mesh identity (its role and name make the URI SAN, :attr:`spiffe_id`) and
    the file stem its certificate and key are stored under.

    Attributes:
        stem: File stem in the PKI directory (``<stem>.pem`` / ``<stem>.key``).
    """

    stem: str


DEFAULT_IDENTITIES: tuple[Identity, ...] = (
    Identity("coordinator", "coordinator", "coordinator"),
    Identity("model", "model", "model"),
    Identity("tool", "tool", "tool"),
    Identity("agent", "default", "agent"),
    Identity("agent", "summarizer", "agent-summarizer"),
    Identity("agent", "researcher", "agent-researcher"),
    Identity("agent", "calculator", "agent-calculator"),
    Identity("agent", "planner", "agent-planner"),
    Identity("client", "client", "client"),
    Identity("admin", "admin", "admin"),
    Identity("client", "a2a", "a2a"),
    Identity("client", "mcp", "mcp"),
    Identity("nats", "nats", "nats"),
)
"""The identities ``init_pki`` creates: one per service, the example agents, a client, an admin,
the A2A gateway (a client of the coordinator) and the MCP client of the tool service."""


@dataclass(frozen=True, slots=True)
class IssuedCert:
    """A certificate and key written by ``issue_cert``.

    Attributes:
        stem: File stem in the PKI directory.
        role: Role part of the identity.
        name: Name part of the identity.
        spiffe_id: The URI SAN carried by the certificate.
        cert_path: Path of the PEM certificate.
        key_path: Path of the PEM (PKCS#8) private key, mode 0600.
        ca_path: Path of the issuing CA's certificate.
        not_before: Start of validity (UTC).
        not_after: End of validity (UTC).
    """

    stem: str
    role: str
    name: str
    spiffe_id: str
    cert_path: Path
    key_path: Path
    ca_path: Path
    not_before: dt.datetime
    not_after: dt.datetime


@dataclass(frozen=True, slots=True)
class PkiReport:
    """What ``init_pki`` did, by file stem (``ca`` for the CA).

    Attributes:
        directory: The PKI directory.
        created: Stems that did not exist and were written.
        renewed: Stems that existed but were invalid (or ``force`` was given) and were rewritten.
        kept: Stems that existed, were valid and were left untouched.
    """

    directory: Path
    created: tuple[str, ...] = ()
    renewed: tuple[str, ...] = ()
    kept: tuple[str, ...] = ()

    @property
    def changed(self) -> bool:
        """Whether any file was written."""
        return bool(self.created or self.renewed)


@dataclass(slots=True)
class _Ca:
    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey
    path: Path


@dataclass(slots=True)
class _Outcome:
    created: list[str] = field(default_factory=list)
    renewed: list[str] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)


def validate_label(value: str, *, what: str) -> str:
    """Check that a role, name or stem is a lowercase DNS-style label.

    Args:
        value: The text to check.
        what: What it is, for the error message (``"role"``, ``"name"``, ``"stem"``).

    Returns:
        The value unchanged.

    Raises:
        ValueError: If it does not match ``[a-z0-9][a-z0-9-]{0,62}``.
    """
    if not _LABEL.fullmatch(value):
        raise ValueError(
            f"invalid {what} {value!r}: use 1-63 characters from a-z, 0-9 and '-', "
            "starting with a letter or digit"
        )
    return value


def validate_stem(stem: str) -> str:
    """Check a file stem: a label that is not the CA's.

    Raises:
        ValueError: If it is not a valid label or is ``ca``.
    """
    validate_label(stem, what="stem")
    if stem == CA_STEM:
        raise ValueError(f"invalid stem {stem!r}: it is reserved for the CA")
    return stem


def default_stem(role: str, name: str) -> str:
    """The file stem an identity is stored under unless the caller picks one.

    Agents are ``agent-<name>`` (``agent`` for the generic ``default`` agent) so that
    several agents live side by side; every other role uses the name itself.
    """
    if role == "agent":
        return "agent" if name == "default" else f"agent-{name}"
    return name


def init_pki(directory: Path, *, force: bool = False) -> PkiReport:
    """Create the development PKI in ``directory``, or complete it.

    Creates the directory (mode 0700) if needed, the CA if it is missing, and every
    identity of ``DEFAULT_IDENTITIES`` that is missing or invalid (expired, not issued by
    the CA, key not matching, wrong identity). Anything that exists and is valid is left
    byte for byte as it is, so running it again is safe. When the CA is (re)created, the
    other leaves found in the directory are re-issued under the new CA with their identity.

    Args:
        directory: The PKI directory.
        force: Re-create the CA and re-issue every leaf, valid or not.

    Returns:
        What was created, renewed and kept.

    Raises:
        PkiError: The CA exists but cannot be used (key missing or not matching, expired)
            and ``force`` was not given.
    """
    directory = Path(directory)
    _ensure_dir(directory)
    outcome = _Outcome()
    ca, ca_replaced = _load_or_create_ca(directory, force=force, outcome=outcome)
    now = _utcnow()
    default_stems = {identity.stem for identity in DEFAULT_IDENTITIES}
    for identity in DEFAULT_IDENTITIES:
        exists = _cert_path(directory, identity.stem).exists()
        problem = None if force else _leaf_problem(directory, identity, ca, now=now)
        if exists and problem is None and not force:
            outcome.kept.append(identity.stem)
            continue
        if exists:
            logger.info("re-issuing %s: %s", identity.stem, problem or "forced")
        _write_leaf(directory, identity, ca, not_before=None, not_after=None)
        (outcome.renewed if exists else outcome.created).append(identity.stem)
    for identity in _extra_identities(directory, exclude=default_stems):
        if ca_replaced:
            _write_leaf(directory, identity, ca, not_before=None, not_after=None)
            outcome.renewed.append(identity.stem)
        else:
            outcome.kept.append(identity.stem)
    return PkiReport(
        directory=directory,
        created=tuple(outcome.created),
        renewed=tuple(outcome.renewed),
        kept=tuple(outcome.kept),
    )


def issue_cert(
    directory: Path,
    *,
    role: str,
    name: str,
    stem: str | None = None,
    valid_days: int = DEFAULT_VALID_DAYS,
    not_before: dt.datetime | None = None,
    not_after: dt.datetime | None = None,
    force: bool = False,
) -> IssuedCert:
    """Issue a leaf certificate for ``spiffe://hivewire.local/<role>/<name>``.

    Creates the directory and the CA first if they do not exist. ``not_before`` and
    ``not_after`` override the validity window, so tests can mint certificates that are
    already expired or not yet valid.

    Args:
        directory: The PKI directory.
        role: Role of the identity (``client``, ``agent``...).
        name: Name of the identity.
        stem: File stem; default ``agent-<name>`` for agents, else ``<name>``.
        valid_days: Lifetime from now when ``not_after`` is not given.
        not_before: Start of validity (timezone-aware; default a few minutes ago).
        not_after: End of validity (timezone-aware; default ``not_before + valid_days``).
        force: Replace an existing certificate with the same stem.

    Returns:
        Where the certificate and key were written, and the identity they carry.

    Raises:
        ValueError: Invalid role, name or stem, non-positive ``valid_days``, naive datetimes
            or an empty validity window.
        CertExistsError: ``<stem>.pem`` exists and ``force`` was not given.
        PkiError: The CA exists but cannot be used.
    """
    validate_label(role, what="role")
    validate_label(name, what="name")
    stem = validate_stem(stem if stem is not None else default_stem(role, name))
    if valid_days <= 0:
        raise ValueError(f"invalid validity {valid_days} days: must be at least 1 day")
    for label, value in (("not_before", not_before), ("not_after", not_after)):
        if value is not None and value.utcoffset() is None:
            raise ValueError(f"{label} must be timezone-aware")
    directory = Path(directory)
    cert_path = _cert_path(directory, stem)
    if cert_path.exists() and not force:
        raise CertExistsError(cert_path, _describe_existing(cert_path))
    start = not_before if not_before is not None else _utcnow() - _CLOCK_SKEW
    end = not_after if not_after is not None else start + dt.timedelta(days=valid_days)
    if end <= start:
        raise ValueError(f"empty validity window: not_after {end} is not after {start}")
    _ensure_dir(directory)
    ca, _ = _load_or_create_ca(directory, force=False, outcome=_Outcome())
    identity = Identity(role, name, stem)
    cert = _write_leaf(directory, identity, ca, not_before=start, not_after=end)
    return IssuedCert(
        stem=stem,
        role=role,
        name=name,
        spiffe_id=identity.spiffe_id,
        cert_path=cert_path,
        key_path=_key_path(directory, stem),
        ca_path=ca.path,
        not_before=cert.not_valid_before_utc,
        not_after=cert.not_valid_after_utc,
    )


def check_cert(directory: Path, stem: str, *, now: dt.datetime | None = None) -> str | None:
    """Check one leaf of the PKI directory against its CA.

    Returns:
        None when ``<stem>.pem`` is a currently valid certificate issued by ``ca.pem``
        whose key ``<stem>.key`` matches; otherwise a short description of the problem
        (``"expired 2024-01-01 00:00 UTC"``, ``"not issued by this CA"``...).
    """
    directory = Path(directory)
    try:
        ca_cert = x509.load_pem_x509_certificate(_cert_path(directory, CA_STEM).read_bytes())
    except (OSError, ValueError):
        return "no readable ca.pem"
    try:
        cert = x509.load_pem_x509_certificate(_cert_path(directory, stem).read_bytes())
    except (OSError, ValueError):
        return "certificate missing or unreadable"
    return _cert_problem(cert, ca_cert, _key_path(directory, stem), now=now or _utcnow())


def list_stems(directory: Path) -> list[str]:
    """Stems of every certificate in the directory, the CA first, the rest sorted."""
    stems = sorted(p.stem for p in Path(directory).glob("*.pem") if p.is_file())
    if CA_STEM in stems:
        stems.remove(CA_STEM)
        stems.insert(0, CA_STEM)
    return stems


# -- internals ---------------------------------------------------------------------------


def _utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _cert_path(directory: Path, stem: str) -> Path:
    return directory / f"{stem}.pem"


def _key_path(directory: Path, stem: str) -> Path:
    return directory / f"{stem}.key"


def _ensure_dir(directory: Path) -> None:
    if not directory.exists():
        directory.parent.mkdir(parents=True, exist_ok=True)
        # mkdir applies the umask, which can only narrow 0700: no window where keys'
        # directory is world-readable.
        directory.mkdir(mode=_DIR_MODE, exist_ok=True)
    elif not directory.is_dir():
        raise PkiError(f"{directory} exists and is not a directory")
    gitignore = directory / ".gitignore"
    if not gitignore.exists():
        _write_file(gitignore, _GITIGNORE.encode(), mode=_CERT_MODE)


def _write_file(path: Path, data: bytes, *, mode: int) -> None:
    """Write ``data`` atomically, the file created with ``mode`` from the start.

    A key must never exist, even for a moment, with wider permissions than 0600, so the
    temporary file is created with its final mode by ``os.open`` (never chmod afterwards)
    and then renamed over the target.
    """
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        encoding=serialization.Encoding.PEM,
        format=serialization.PrivateFormat.PKCS8,
        encryption_algorithm=serialization.NoEncryption(),
    )


def _load_key(path: Path) -> ec.EllipticCurvePrivateKey:
    key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ValueError(f"{path} is not an EC private key")
    return key


def _same_key(cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> bool:
    fmt = serialization.PublicFormat.SubjectPublicKeyInfo
    enc = serialization.Encoding.DER
    return cert.public_key().public_bytes(enc, fmt) == key.public_key().public_bytes(enc, fmt)


def _load_or_create_ca(directory: Path, *, force: bool, outcome: _Outcome) -> tuple[_Ca, bool]:
    """Return the directory's CA and whether it was written in this call."""
    cert_path = _cert_path(directory, CA_STEM)
    key_path = _key_path(directory, CA_STEM)
    existed = cert_path.exists() or key_path.exists()
    if existed and not force:
        ca = _load_ca(cert_path, key_path)
        outcome.kept.append(CA_STEM)
        return ca, False
    ca = _create_ca(cert_path, key_path)
    (outcome.renewed if existed else outcome.created).append(CA_STEM)
    return ca, True


def _load_ca(cert_path: Path, key_path: Path) -> _Ca:
    hint = "run `hivewire certs init --force` to re-create the CA and every certificate"
    try:
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    except FileNotFoundError:
        raise PkiError(f"{key_path} exists but {cert_path} is missing; {hint}") from None
    except (OSError, ValueError) as exc:
        raise PkiError(f"cannot read the CA certificate {cert_path}: {exc}; {hint}") from None
    try:
        key = _load_key(key_path)
    except FileNotFoundError:
        raise PkiError(f"{cert_path} exists but its key {key_path} is missing; {hint}") from None
    except (OSError, ValueError, TypeError) as exc:
        raise PkiError(f"cannot read the CA key {key_path}: {exc}; {hint}") from None
    if not _same_key(cert, key):
        raise PkiError(f"{key_path} does not belong to {cert_path}; {hint}")
    if _utcnow() > cert.not_valid_after_utc:
        raise PkiError(f"the CA {cert_path} expired on {_when(cert.not_valid_after_utc)}; {hint}")
    return _Ca(cert=cert, key=key, path=cert_path)


def _builder(
    subject: x509.Name,
    issuer: x509.Name,
    key: ec.EllipticCurvePrivateKey,
    not_before: dt.datetime,
    not_after: dt.datetime,
    *,
    ca: bool,
) -> x509.CertificateBuilder:
    """What the CA's and a leaf's certificates share: names, key, validity, constraints
    and key usage (only the CA signs certificates and CRLs).
    """
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=ca, path_length=0 if ca else None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=ca,
                crl_sign=ca,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
    )


def _create_ca(cert_path: Path, key_path: Path) -> _Ca:
    key = _new_key()
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "hivewire"),
            x509.NameAttribute(NameOID.COMMON_NAME, "hivewire development CA"),
        ]
    )
    start = _utcnow() - _CLOCK_SKEW
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        _builder(name, name, key, start, start + dt.timedelta(days=CA_VALID_DAYS), ca=True)
        .add_extension(ski, critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False
        )
        .sign(key, hashes.SHA256())
    )
    # Key first: a crash between the two writes leaves a key without a certificate, which
    # the next run reports instead of silently pairing a new certificate with an old key.
    _write_file(key_path, _key_pem(key), mode=_KEY_MODE)
    _write_file(cert_path, cert.public_bytes(serialization.Encoding.PEM), mode=_CERT_MODE)
    logger.info("created the development CA in %s", cert_path.parent)
    return _Ca(cert=cert, key=key, path=cert_path)


def _leaf_cert(
    identity: Identity,
    key: ec.EllipticCurvePrivateKey,
    ca: _Ca,
    *,
    not_before: dt.datetime,
    not_after: dt.datetime,
) -> x509.Certificate:
    host = f"{identity.name}.{identity.role}.{TRUST_DOMAIN}"
    subject = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "hivewire"),
            x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, identity.role),
            x509.NameAttribute(NameOID.COMMON_NAME, host),
        ]
    )
    san = x509.SubjectAlternativeName(
        [
            x509.UniformResourceIdentifier(identity.spiffe_id),
            x509.DNSName("localhost"),
            x509.DNSName(host),
            x509.IPAddress(ipaddress.IPv4Address("127.0.0.1")),
        ]
    )
    ca_ski = ca.cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    return (
        _builder(subject, ca.cert.subject, key, not_before, not_after, ca=False)
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
        .add_extension(san, critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False
        )
        .sign(ca.key, hashes.SHA256())
    )


def _write_leaf(
    directory: Path,
    identity: Identity,
    ca: _Ca,
    *,
    not_before: dt.datetime | None,
    not_after: dt.datetime | None,
) -> x509.Certificate:
    start = not_before if not_before is not None else _utcnow() - _CLOCK_SKEW
    end = not_after if not_after is not None else start + dt.timedelta(days=DEFAULT_VALID_DAYS)
    key = _new_key()
    cert = _leaf_cert(identity, key, ca, not_before=start, not_after=end)
    _write_file(_key_path(directory, identity.stem), _key_pem(key), mode=_KEY_MODE)
    _write_file(
        _cert_path(directory, identity.stem),
        cert.public_bytes(serialization.Encoding.PEM),
        mode=_CERT_MODE,
    )
    logger.info("issued %s for %s, valid until %s", identity.stem, identity.spiffe_id, _when(end))
    return cert


def _leaf_problem(directory: Path, identity: Identity, ca: _Ca, *, now: dt.datetime) -> str | None:
    try:
        cert = x509.load_pem_x509_certificate(_cert_path(directory, identity.stem).read_bytes())
    except FileNotFoundError:
        return "missing"
    except (OSError, ValueError):
        return "unreadable certificate"
    problem = _cert_problem(cert, ca.cert, _key_path(directory, identity.stem), now=now)
    if problem is not None:
        return problem
    if cert_spiffe_id(cert) != identity.spiffe_id:
        return f"carries {cert_spiffe_id(cert)} instead of {identity.spiffe_id}"
    return None


def _cert_problem(
    cert: x509.Certificate, ca_cert: x509.Certificate, key_path: Path, *, now: dt.datetime
) -> str | None:
    try:
        cert.verify_directly_issued_by(ca_cert)
    except (ValueError, TypeError, InvalidSignature):
        return "not issued by this CA"
    if now > cert.not_valid_after_utc:
        return f"expired {_when(cert.not_valid_after_utc)}"
    if now < cert.not_valid_before_utc:
        return f"not valid before {_when(cert.not_valid_before_utc)}"
    try:
        key = _load_key(key_path)
    except FileNotFoundError:
        return "key missing"
    except (OSError, ValueError, TypeError):
        return "key unreadable"
    if not _same_key(cert, key):
        return "key does not match the certificate"
    return None


def _extra_identities(directory: Path, *, exclude: Iterable[str]) -> Iterator[Identity]:
    """Leaves in the directory beyond the default set that carry one of our identities."""
    skip = {CA_STEM, *exclude}
    for stem in list_stems(directory):
        if stem in skip or not _LABEL.fullmatch(stem):
            continue
        try:
            cert = x509.load_pem_x509_certificate(_cert_path(directory, stem).read_bytes())
        except (OSError, ValueError):
            continue
        parsed = parse_spiffe_id(cert_spiffe_id(cert) or "")
        if parsed is not None and all(_LABEL.fullmatch(label) for label in parsed):
            yield Identity(*parsed, stem)


def _describe_existing(cert_path: Path) -> str:
    try:
        info = describe_cert(cert_path)
    except (OSError, ValueError):
        return "unreadable"
    return f"{info.spiffe_id or info.subject}, valid until {_when(info.not_after)}"


def _when(moment: dt.datetime) -> str:
    return moment.astimezone(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
