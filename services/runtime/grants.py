"""Signed approvals: the coordinator vouches for one tool call, the tool service checks.

An agent must not be able to approve its own tool call. So the approval the tool service
accepts is not the agent's word but a ``common.v1.SignedApproval``: claims (task, tool,
argument digest, input request, approver, expiry, a unique grant id) signed by the
coordinator with the private key of its mesh certificate when a permitted client (the
task's owner or an admin) answers the approval request. The agent only carries the
grant from the coordinator's ``InputResponse`` to the tool service; it holds no key that
could make or alter one.

The tool service verifies, in order: a grant is present, its certificate chains to the
mesh CA and names an allowed issuer (a coordinator), is valid now, the signature covers
the claims, the grant is unexpired, it is for this task, tool, argument digest and input
request, and it was not used before. Single use holds across every tool service process
of the mesh with a :class:`NatsGrantLedger` (a JetStream KV bucket where the first use of
a grant id creates its key, atomically, and any later use finds it), and within one
process without one. Each failure is ``PERMISSION_DENIED`` with its own reason.

Both sides read their files (key, certificate, CA bundle) at each use: approvals are
rare (one per person's answer), and so a rotated certificate or CA applies at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import fnmatch
import time
import uuid
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypedDict, Unpack

import nats
import nats.errors
import nats.js.errors
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from google.protobuf import message as protobuf_message
from nats.aio.client import Client as NatsClient
from nats.js.kv import KeyValue

from hivewire.common.v1 import common_pb2
from hivewire.services.runtime.errors import PermissionDenied, Unavailable
from hivewire.services.runtime.tls import TlsFiles

SIGNING_CONTEXT = b"hivewire.approval.v1\x00"
"""Prefix of the signed bytes, so an approval signature means nothing anywhere else."""

DEFAULT_ISSUERS = ("spiffe://hivewire.local/coordinator/*",)
"""SPIFFE id globs whose certificates may sign approvals."""

_URI_SAN = x509.UniformResourceIdentifier


def _signed_bytes(claims: bytes) -> bytes:
    return SIGNING_CONTEXT + claims


def _sign(key: object, data: bytes) -> bytes:
    if isinstance(key, ec.EllipticCurvePrivateKey):
        return key.sign(data, ec.ECDSA(hashes.SHA256()))
    if isinstance(key, rsa.RSAPrivateKey):
        return key.sign(data, padding.PKCS1v15(), hashes.SHA256())
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return key.sign(data)
    raise ValueError(f"cannot sign approvals with a {type(key).__name__}")


def _verify(public_key: object, signature: bytes, data: bytes) -> None:
    """Check a signature; raises InvalidSignature (or ValueError for unusable keys)."""
    if isinstance(public_key, ec.EllipticCurvePublicKey):
        public_key.verify(signature, data, ec.ECDSA(hashes.SHA256()))
    elif isinstance(public_key, rsa.RSAPublicKey):
        public_key.verify(signature, data, padding.PKCS1v15(), hashes.SHA256())
    elif isinstance(public_key, ed25519.Ed25519PublicKey):
        public_key.verify(signature, data)
    else:
        raise ValueError(f"unsupported key type {type(public_key).__name__}")


def _spiffe_ids(cert: x509.Certificate) -> list[str]:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except x509.ExtensionNotFound:
        return []
    return [str(uri) for uri in san.value.get_values_for_type(_URI_SAN)]


class GrantedCall(TypedDict):
    """The call an approval is for (keyword arguments of the signer and the verifier's checks).

    Attributes:
        task_id: The task the call claims to be for.
        tool_name: The tool being called.
        arguments_digest: The digest of the call's arguments.
        request_id: The input request the caller says was answered.
    """

    task_id: str
    tool_name: str
    arguments_digest: str
    request_id: str


@dataclass(frozen=True)
class ApprovalSigner:
    """Signs approvals with a coordinator's mesh certificate key.

    Attributes:
        files: The coordinator's certificate files (the key and certificate are read at
            each signing).
        ttl: Seconds a grant stays valid after it is issued.
    """

    files: TlsFiles
    ttl: float = 300.0

    def sign(
        self, *, approved_by: str, now: float | None = None, **call: Unpack[GrantedCall]
    ) -> common_pb2.SignedApproval:
        """Issue a grant for one tool call.

        Args:
            approved_by: The identity of the client that approved.
            now: The issue time (seconds since the epoch); defaults to now.
            **call: The call approved (:class:`GrantedCall`): ``task_id``, ``tool_name``,
                ``arguments_digest`` and ``request_id``.

        Returns:
            The signed grant.
        """
        issued = time.time() if now is None else now
        claims = common_pb2.ApprovalClaims(
            grant_id=uuid.uuid4().hex, approved_by=approved_by, **call
        )
        claims.issued_at.FromNanoseconds(int(issued * 1e9))
        claims.expires_at.FromNanoseconds(int((issued + self.ttl) * 1e9))
        body = claims.SerializeToString(deterministic=True)
        cert = x509.load_pem_x509_certificate(self.files.cert.read_bytes())
        key = serialization.load_pem_private_key(self.files.key.read_bytes(), password=None)
        return common_pb2.SignedApproval(
            claims=body,
            signature=_sign(key, _signed_bytes(body)),
            certificate=cert.public_bytes(serialization.Encoding.DER),
        )


def _refused(reason: str, message: str, tool_name: str) -> PermissionDenied:
    return PermissionDenied(message, reason=reason, metadata={"tool": tool_name})


def _replayed(tool_name: str) -> PermissionDenied:
    return _refused(
        "APPROVAL_REPLAYED", f"the approval for {tool_name} was already used", tool_name
    )


class GrantLedger(Protocol):
    """Remembers used grant ids for a while, for every process sharing it."""

    async def horizon(self) -> float:
        """Seconds a used grant id is remembered.

        Raises:
            Unavailable: The ledger cannot be reached.
        """
        ...

    async def claim(self, grant_id: str) -> bool:
        """Use up a grant: True the first time anywhere, False ever after.

        Raises:
            Unavailable: The ledger cannot be reached.
        """
        ...


GRANTS_BUCKET = "HIVEWIRE_GRANTS"
"""The JetStream KV bucket of used grant ids (key: grant id, value: empty)."""


class NatsGrantLedger:
    """Used grants in a JetStream KV bucket on the mesh's NATS.

    The first use of a grant creates its key (``create`` succeeds only if the key does
    not exist, atomically in the server), so of two tool services presented the same
    grant at once exactly one runs the call. Keys expire after ``horizon`` seconds (the
    bucket's ``max_age``); grants valid longer are refused. Connects at the first claim.

    Args:
        nats_url: NATS server URL(s), comma separated.
        horizon: Seconds a used grant id is remembered.
        bucket: The KV bucket.
        timeout: Bound of one claim.
        nats_options: Extra ``nats.connect`` options (TLS: ``nats_tls_options``).
    """

    def __init__(
        self,
        nats_url: str,
        *,
        horizon: float = 86400.0,
        bucket: str = GRANTS_BUCKET,
        timeout: float = 5.0,
        nats_options: Mapping[str, Any] | None = None,
    ) -> None:
        self._horizon = horizon
        self._servers = [u.strip() for u in nats_url.split(",") if u.strip()]
        self._bucket = bucket
        self._timeout = timeout
        self._options = dict(nats_options or {})
        self._nc: NatsClient | None = None
        self._kv: KeyValue | None = None
        self._lock = asyncio.Lock()

    async def _open(self) -> KeyValue:
        async with self._lock:
            if self._kv is None:
                self._nc = await nats.connect(
                    servers=self._servers,
                    name="hivewire-grant-ledger",
                    connect_timeout=max(1, int(self._timeout)),
                    max_reconnect_attempts=-1,
                    **self._options,
                )
                js = self._nc.jetstream(timeout=self._timeout)
                try:
                    kv = await js.create_key_value(
                        bucket=self._bucket, history=1, ttl=self._horizon
                    )
                except nats.js.errors.BadRequestError:
                    # It exists with another TTL (another process chose it): that one holds.
                    kv = await js.key_value(self._bucket)
                    self._horizon = (await kv.status()).ttl or self._horizon
                self._kv = kv
            return self._kv

    async def horizon(self) -> float:
        """Seconds a used grant id is remembered (the bucket's ``max_age``)."""
        async with self._reachable():
            await self._open()
        return self._horizon

    async def claim(self, grant_id: str) -> bool:
        """Use up a grant id: True the first time anywhere in the mesh, False after."""
        try:
            async with self._reachable():
                kv = await self._open()
                await kv.create(grant_id, b"")
        except nats.js.errors.KeyWrongLastSequenceError:
            return False
        return True

    @contextlib.asynccontextmanager
    async def _reachable(self) -> AsyncIterator[None]:
        """Bound a ledger operation; NATS failures become ``Unavailable``."""
        try:
            async with asyncio.timeout(self._timeout):
                yield
        except nats.js.errors.KeyWrongLastSequenceError:
            raise
        except (nats.errors.Error, nats.js.errors.Error, TimeoutError, OSError) as exc:
            raise Unavailable(
                f"the ledger of used approvals is unreachable: {exc!r}",
                retry_after=1.0,
                reason="APPROVAL_LEDGER_UNAVAILABLE",
            ) from exc

    async def close(self) -> None:
        """Disconnect."""
        if self._nc is not None and not self._nc.is_closed:
            await self._nc.close()


@dataclass
class ApprovalVerifier:
    """Checks signed approvals against the mesh CA, the call and the used grants.

    Attributes:
        ca: The mesh CA bundle (PEM, one or more CAs; read at each check).
        issuers: SPIFFE id globs whose certificates may sign approvals.
    """

    ca: Path
    issuers: Sequence[str] = DEFAULT_ISSUERS
    ledger: GrantLedger | None = None
    """Where grants are used up, for every tool service of the mesh (None: this process)."""
    _used: dict[str, float] = field(default_factory=dict, repr=False)

    async def verify_once(
        self,
        signed: common_pb2.SignedApproval | None,
        *,
        now: float | None = None,
        **call: Unpack[GrantedCall],
    ) -> common_pb2.ApprovalClaims:
        """Accept a grant for this call, used up in the ledger (or this process), or refuse it.

        Raises:
            PermissionDenied: As :meth:`verify`; ``APPROVAL_REPLAYED`` when any tool
                service of the mesh used the grant before, ``APPROVAL_OUTLIVES_LEDGER``
                when it would stay valid longer than the ledger remembers grants.
            Unavailable: The ledger cannot be reached (the grant stays unused).
        """
        if self.ledger is None:
            return self.verify(signed, now=now, **call)
        moment = time.time() if now is None else now
        claims = self._check(signed, call, moment)
        tool_name = call["tool_name"]
        expires = claims.expires_at.ToNanoseconds() / 1e9
        horizon = await self.ledger.horizon()
        if expires - moment > horizon:
            raise _refused(
                "APPROVAL_OUTLIVES_LEDGER",
                f"the approval for {tool_name} stays valid longer than used grants are"
                f" remembered ({horizon:.0f} s)",
                tool_name,
            )
        if not await self.ledger.claim(claims.grant_id):
            raise _replayed(tool_name)
        return claims

    def verify(
        self,
        signed: common_pb2.SignedApproval | None,
        *,
        now: float | None = None,
        **call: Unpack[GrantedCall],
    ) -> common_pb2.ApprovalClaims:
        """Accept a grant for this call (once), or refuse it.

        Args:
            signed: The grant the caller sent (None or empty: none).
            now: The time (seconds since the epoch); defaults to now.
            **call: The call (:class:`GrantedCall`): ``task_id``, ``tool_name``,
                ``arguments_digest`` and ``request_id``.

        Returns:
            The verified claims (``approved_by`` says who approved).

        Raises:
            PermissionDenied: With reason ``APPROVAL_UNSIGNED``, ``APPROVAL_UNTRUSTED``
                (certificate not from the mesh CA, not an allowed issuer, or not valid
                now), ``APPROVAL_SIGNATURE_INVALID``, ``APPROVAL_EXPIRED``,
                ``APPROVAL_TASK_MISMATCH``, ``APPROVAL_TOOL_MISMATCH``,
                ``APPROVAL_DIGEST_MISMATCH``, ``APPROVAL_REQUEST_MISMATCH`` or
                ``APPROVAL_REPLAYED`` (used before in this process).
        """
        moment = time.time() if now is None else now
        claims = self._check(signed, call, moment)
        self._forget_expired(moment)
        if claims.grant_id in self._used:
            raise _replayed(call["tool_name"])
        self._used[claims.grant_id] = claims.expires_at.ToNanoseconds() / 1e9
        return claims

    def _check(
        self, signed: common_pb2.SignedApproval | None, call: GrantedCall, moment: float
    ) -> common_pb2.ApprovalClaims:
        """Every check but single use."""
        tool_name = call["tool_name"]
        if signed is None or not signed.claims:
            raise _refused(
                "APPROVAL_UNSIGNED",
                f"the approval for {tool_name} carries no grant signed by a coordinator",
                tool_name,
            )
        cert = self._trusted_issuer(signed.certificate, moment, tool_name)
        try:
            _verify(cert.public_key(), signed.signature, _signed_bytes(signed.claims))
            claims = common_pb2.ApprovalClaims.FromString(signed.claims)
        except (InvalidSignature, ValueError, protobuf_message.DecodeError):
            raise _refused(
                "APPROVAL_SIGNATURE_INVALID",
                f"the approval for {tool_name} is not validly signed",
                tool_name,
            ) from None
        if claims.expires_at.ToNanoseconds() <= int(moment * 1e9):
            raise _refused(
                "APPROVAL_EXPIRED", f"the approval for {tool_name} has expired", tool_name
            )
        for reason, granted, asked, what in (
            ("APPROVAL_TASK_MISMATCH", claims.task_id, call["task_id"], "another task"),
            ("APPROVAL_TOOL_MISMATCH", claims.tool_name, tool_name, "another tool"),
            (
                "APPROVAL_DIGEST_MISMATCH",
                claims.arguments_digest,
                call["arguments_digest"],
                "other arguments",
            ),
            (
                "APPROVAL_REQUEST_MISMATCH",
                claims.request_id,
                call["request_id"],
                "another input request",
            ),
        ):
            if granted != asked:
                raise _refused(reason, f"the approval for {tool_name} is for {what}", tool_name)
        return claims

    def _trusted_issuer(self, der: bytes, moment: float, tool_name: str) -> x509.Certificate:
        untrusted = _refused(
            "APPROVAL_UNTRUSTED",
            f"the approval for {tool_name} is not signed by a coordinator of this mesh",
            tool_name,
        )
        try:
            cert = x509.load_der_x509_certificate(der)
            cas = x509.load_pem_x509_certificates(self.ca.read_bytes())
        except ValueError:
            raise untrusted from None
        when = dt.datetime.fromtimestamp(moment, dt.UTC)
        if not cert.not_valid_before_utc <= when <= cert.not_valid_after_utc:
            raise untrusted
        if not any(_issued_by(cert, ca) for ca in cas):
            raise untrusted
        if not any(
            fnmatch.fnmatchcase(uri, glob) for uri in _spiffe_ids(cert) for glob in self.issuers
        ):
            raise untrusted
        return cert

    def _forget_expired(self, moment: float) -> None:
        for grant_id in [g for g, until in self._used.items() if until <= moment]:
            del self._used[grant_id]


def _issued_by(cert: x509.Certificate, ca: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(ca)
    except (InvalidSignature, ValueError, TypeError):
        return False
    return True
