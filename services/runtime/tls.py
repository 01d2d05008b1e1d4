"""Mutual TLS: certificate files, server and channel credentials, peer identity.

Every hop in the mesh is mTLS. Identities are SPIFFE-style URI SANs
(``spiffe://hivewire.local/<role>/<name>``) in certificates signed by the mesh CA.
Server credentials reload their files when they change on disk, so a rotated
certificate is picked up by the next TLS handshake without a restart.
"""

from __future__ import annotations

import datetime as dt
import logging
import ssl
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from hivewire.services.runtime.filewatch import FileWatch

logger = logging.getLogger(__name__)

TRUST_DOMAIN = "hivewire.local"
"""The SPIFFE trust domain of every hivewire identity."""

SPIFFE_SCHEME = "spiffe://"


def spiffe_id(role: str, name: str) -> str:
    """Build the SPIFFE id of a mesh identity.

    Args:
        role: What the identity is (``coordinator``, ``agent``, ``model``, ``tool``, ``client``).
        name: The instance or principal name within that role.

    Returns:
        ``spiffe://hivewire.local/<role>/<name>``.
    """
    return f"{SPIFFE_SCHEME}{TRUST_DOMAIN}/{role}/{name}"


@dataclass(frozen=True, slots=True)
class MeshName:
    """A mesh identity's role and name: what its SPIFFE id is made of.

    Attributes:
        role: What the identity is (``coordinator``, ``agent``, ``client``...).
        name: The instance or principal name within that role.
    """

    role: str
    name: str

    @property
    def spiffe_id(self) -> str:
        """The identity's SPIFFE id, ``spiffe://hivewire.local/<role>/<name>``."""
        return spiffe_id(self.role, self.name)


def parse_spiffe_id(value: str) -> tuple[str, str] | None:
    """Split a hivewire SPIFFE id into ``(role, name)``.

    Args:
        value: A URI such as ``spiffe://hivewire.local/agent/planner``.

    Returns:
        ``(role, name)``, or None when the URI is not a hivewire identity (other
        trust domain, wrong shape).
    """
    prefix = f"{SPIFFE_SCHEME}{TRUST_DOMAIN}/"
    if not value.startswith(prefix):
        return None
    role, sep, name = value[len(prefix) :].partition("/")
    if not sep or not role or not name:
        return None
    return role, name


@dataclass(frozen=True)
class TlsFiles:
    """Paths of one identity's PEM files: the CA bundle, its certificate chain and its key."""

    ca: Path
    cert: Path
    key: Path

    @classmethod
    def for_identity(cls, certs_dir: Path, name: str) -> TlsFiles:
        """Locate an identity's files in a certificates directory.

        Args:
            certs_dir: Directory written by the PKI tooling.
            name: Identity base name (``coordinator``, ``client``...).

        Returns:
            ``ca.pem``, ``<name>.pem`` and ``<name>.key`` inside ``certs_dir``.
        """
        return cls(
            ca=certs_dir / "ca.pem", cert=certs_dir / f"{name}.pem", key=certs_dir / f"{name}.key"
        )

    def read(self) -> tuple[bytes, bytes, bytes]:
        """Read the three files.

        Returns:
            ``(ca_pem, cert_chain_pem, key_pem)``.

        Raises:
            FileNotFoundError: A file is missing (the message names the directory to fix).
        """
        try:
            return self.ca.read_bytes(), self.cert.read_bytes(), self.key.read_bytes()
        except FileNotFoundError as exc:
            missing = Path(str(exc.filename))
            if missing != self.ca and self.ca.exists():
                # The CA is there, this identity is not: say how to get one.
                hint = f"issue one with `hivewire certs issue --name {missing.stem}`"
            else:
                hint = "generate the dev PKI first (`hivewire certs init`)"
            raise FileNotFoundError(
                f"no certificate: {missing} not found; {hint}, "
                "or point HIVEWIRE_CERTS_DIR at the directory that has it"
            ) from exc


def _check_pair(cert_pem: bytes, key_pem: bytes) -> None:
    """Reject a certificate/key pair that does not belong together.

    During a rotation the cert and key are written one after the other; serving a
    half-rotated pair would fail every handshake, so keep the old one until both match.
    """
    cert = x509.load_pem_x509_certificate(cert_pem)
    key = serialization.load_pem_private_key(key_pem, password=None)
    fmt = serialization.PublicFormat.SubjectPublicKeyInfo
    enc = serialization.Encoding.DER
    if cert.public_key().public_bytes(enc, fmt) != key.public_key().public_bytes(enc, fmt):
        raise ValueError("certificate and private key do not match")


class _ReloadingServerConfig:
    """Fetcher for ``grpc.dynamic_ssl_server_credentials``.

    gRPC calls it before each new TLS handshake (from a core thread); it returns a new
    configuration only when the files changed, so the common case is three ``stat`` calls.
    """

    def __init__(self, files: TlsFiles) -> None:
        self._files = files
        self._watch = FileWatch(files.ca, files.cert, files.key)
        self._lock = threading.Lock()
        ca, cert, key = files.read()
        _check_pair(cert, key)
        self._watch.mark()
        self.initial = grpc.ssl_server_certificate_configuration(
            [(key, cert)], root_certificates=ca
        )

    def __call__(self) -> grpc.ServerCertificateConfiguration | None:
        with self._lock:
            try:
                stamp = self._watch.changed()
                if stamp is None:
                    return None
                ca, cert, key = self._files.read()
                _check_pair(cert, key)
            except Exception as exc:
                # Keep serving the current certificate: a bad or half-written file must
                # not take the service down.
                logger.warning("TLS reload from %s skipped: %s", self._files.cert.parent, exc)
                return None
            self._watch.mark(stamp)
            logger.info("TLS certificate reloaded from %s", self._files.cert)
            return grpc.ssl_server_certificate_configuration([(key, cert)], root_certificates=ca)


def server_credentials(files: TlsFiles) -> grpc.ServerCredentials:
    """Build mTLS server credentials that require a client certificate and reload on change.

    Args:
        files: The server identity's CA, certificate and key.

    Returns:
        Credentials for ``server.add_secure_port``. Clients without a certificate
        signed by the CA are refused at the handshake.

    Raises:
        FileNotFoundError: A file is missing.
        ValueError: The certificate and key do not match.
    """
    fetcher = _ReloadingServerConfig(files)
    # The stubs omit that the fetcher may return None ("keep the current config").
    return grpc.dynamic_ssl_server_credentials(
        fetcher.initial,
        cast(Callable[[], grpc.ServerCertificateConfiguration], fetcher),
        require_client_authentication=True,
    )


def channel_credentials(files: TlsFiles) -> grpc.ChannelCredentials:
    """Build mTLS channel credentials presenting this identity's certificate.

    The files are read once: a channel keeps its certificate for its lifetime, so
    rotate client certificates by creating new channels.

    Args:
        files: The client identity's CA, certificate and key.

    Returns:
        Credentials for ``grpc.aio.secure_channel``.
    """
    ca, cert, key = files.read()
    return grpc.ssl_channel_credentials(
        root_certificates=ca, private_key=key, certificate_chain=cert
    )


def _first_text(values: Iterable[bytes] | None) -> list[str]:
    return [v.decode("utf-8", "replace") for v in values or ()]


def spiffe_id_from_auth_context(auth: Mapping[str, Iterable[bytes]]) -> str | None:
    """Extract the peer's SPIFFE id from a gRPC auth context.

    Args:
        auth: ``context.auth_context()``.

    Returns:
        The ``spiffe://`` URI SAN, or None for a peer without one.
    """
    for value in _first_text(auth.get("peer_spiffe_id")):
        if value.startswith(SPIFFE_SCHEME):
            return value
    for value in _first_text(auth.get("x509_subject_alternative_name")):
        if value.startswith(SPIFFE_SCHEME):
            return value
    return None


def peer_spiffe_id(context: grpc.aio.ServicerContext[Any, Any]) -> str | None:
    """Return the SPIFFE id of the peer of a server call.

    Args:
        context: The servicer context of the current call.

    Returns:
        The peer certificate's ``spiffe://`` URI SAN, or None when it has none.
    """
    return spiffe_id_from_auth_context(context.auth_context())


NATS_INBOX_ROOT = "_INBOX"
"""The first token of every reply subject on the mesh's NATS."""


def nats_inbox_prefix(spiffe: str) -> str:
    """The reply-subject prefix of one mesh identity: ``_INBOX.<role>.<name>``.

    The mesh's nats-server lets each identity subscribe only below its own prefix
    (services/mesh/nats_security.py), so nobody reads another identity's replies.
    """
    parsed = parse_spiffe_id(spiffe)
    if parsed is None:
        return NATS_INBOX_ROOT
    role, name = parsed
    return f"{NATS_INBOX_ROOT}.{role}.{name}"


def nats_tls_options(nats_url: str, files: TlsFiles) -> dict[str, Any]:
    """``nats.connect`` options for the mesh's NATS: TLS with this process's certificate.

    The mesh's nats-server (services/mesh/nats_security.py) requires a client certificate
    from the mesh CA and maps its SPIFFE id to that identity's permissions, among them
    its own reply subjects (:func:`nats_inbox_prefix`). A ``tls://`` URL turns this on; a
    ``nats://`` URL (a plaintext server, as in library tests) gets no options.

    Args:
        nats_url: Server URL(s), comma separated.
        files: This process's certificate files.

    Returns:
        ``{"tls": ssl_context, "inbox_prefix": ...}`` for ``tls://`` URLs, else ``{}``.
    """
    if not any(part.strip().lower().startswith("tls://") for part in nats_url.split(",")):
        return {}
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(files.ca))
    context.load_cert_chain(str(files.cert), str(files.key))
    identity = nats_identity(files)
    return {"tls": context, "inbox_prefix": nats_inbox_prefix(identity or "")}


@dataclass(frozen=True, slots=True)
class CertInfo:
    """What a certificate file says about itself (see ``describe_cert``).

    Attributes:
        path: The certificate file.
        subject: Subject distinguished name (RFC 4514).
        issuer: Issuer distinguished name (RFC 4514).
        spiffe_id: The first ``spiffe://`` URI SAN, or None.
        dns_names: DNS SANs.
        ip_addresses: IP SANs, as text.
        not_before: Start of validity (UTC).
        not_after: End of validity (UTC).
        serial_number: Serial number.
        is_ca: Whether basic constraints mark it as a CA.
    """

    path: Path
    subject: str
    issuer: str
    spiffe_id: str | None
    dns_names: tuple[str, ...]
    ip_addresses: tuple[str, ...]
    not_before: dt.datetime
    not_after: dt.datetime
    serial_number: int
    is_ca: bool

    def is_expired(self, now: dt.datetime | None = None) -> bool:
        """Whether the certificate's validity ended before ``now`` (default: the current time)."""
        return (now or dt.datetime.now(dt.UTC)) > self.not_after


def describe_cert(path: Path) -> CertInfo:
    """Read a PEM certificate and say who it is, who issued it and until when it is valid.

    Raises:
        OSError: The file cannot be read.
        ValueError: The file is not a PEM certificate.
    """
    path = Path(path)
    cert = x509.load_pem_x509_certificate(path.read_bytes())
    uris: list[str] = []
    dns: list[str] = []
    ips: list[str] = []
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        pass
    else:
        uris = san.get_values_for_type(x509.UniformResourceIdentifier)
        dns = san.get_values_for_type(x509.DNSName)
        ips = [str(ip) for ip in san.get_values_for_type(x509.IPAddress)]
    try:
        is_ca = cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        is_ca = False
    return CertInfo(
        path=path,
        subject=cert.subject.rfc4514_string(),
        issuer=cert.issuer.rfc4514_string(),
        spiffe_id=next((uri for uri in uris if uri.startswith("spiffe://")), None),
        dns_names=tuple(dns),
        ip_addresses=tuple(ips),
        not_before=cert.not_valid_before_utc,
        not_after=cert.not_valid_after_utc,
        serial_number=cert.serial_number,
        is_ca=is_ca,
    )


def cert_spiffe_id(cert: x509.Certificate) -> str | None:
    """The ``spiffe://`` URI SAN of a certificate, None without one."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return None
    return next(
        (
            u
            for u in san.get_values_for_type(x509.UniformResourceIdentifier)
            if u.startswith("spiffe://")
        ),
        None,
    )


def registry_owner(spiffe: str | None) -> str | None:
    """The registry key token of a mesh identity's entries: its name (None: none)."""
    parsed = parse_spiffe_id(spiffe or "")
    return parsed[1] if parsed else None


def nats_identity(files: TlsFiles) -> str | None:
    """The SPIFFE id NATS knows this process by (its certificate's), or None."""
    try:
        return describe_cert(files.cert).spiffe_id
    except (OSError, ValueError):
        return None
