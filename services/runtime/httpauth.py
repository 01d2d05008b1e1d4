"""Who calls an HTTPS endpoint of the mesh: a client certificate or a bearer credential.

The HTTP counterpart of the gRPC authz gate (:mod:`~hivewire.services.runtime.authz`),
for the A2A gateway's JSON-RPC endpoint and the tool service's MCP endpoint. Those
servers verify a client certificate of the mesh CA when one is presented
(:class:`~hivewire.services.runtime.https.HttpsServer` with ``require_client_cert=False``)
and :class:`RequireCaller` then decides who the request comes from:

- ``Authorization: Bearer <API key or JWT>``: the credential's principal, checked by the
  same :class:`~hivewire.services.runtime.authn.Authenticator` as gRPC calls (only when
  end-user authentication is configured, ``HIVEWIRE_AUTH__*``; a service without it
  ignores bearer credentials from certificate holders and refuses them from others);
- otherwise the SPIFFE id of the client certificate (from the ASGI TLS extension), unless
  revoked (``HIVEWIRE_REVOKED_CERTS_FILE``);
- neither: ``401 Unauthorized`` with ``WWW-Authenticate: Bearer`` (when bearer
  credentials are accepted) and a JSON body ``{"error": {"code", "reason", "message"}}``;
  a refused credential is a 401 too, with its reason (``TOKEN_EXPIRED``,
  ``API_KEY_REVOKED``, ``CERT_REVOKED``...).

The request's scope then carries an :class:`HttpCaller` as ``scope["user"]`` (Starlette's
``request.user``) and ``scope["auth"]``. Paths listed as public (the A2A agent card) skip
all of this.
"""

from __future__ import annotations

import json
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from starlette.authentication import AuthCredentials, BaseUser
from starlette.types import ASGIApp, Receive, Scope, Send

from hivewire.services.runtime.authn import Authenticator, AuthSettings
from hivewire.services.runtime.authz import CallerIdentity
from hivewire.services.runtime.config import Settings
from hivewire.services.runtime.errors import Unauthenticated
from hivewire.services.runtime.revocation import RevocationList
from hivewire.services.runtime.security import record_denial
from hivewire.services.runtime.tls import cert_spiffe_id

CERTIFICATE = "certificate"
"""``HttpCaller.via`` of a caller known by its client certificate."""

_CACHE_LIMIT = 4096


@dataclass(frozen=True)
class HttpCaller(BaseUser):
    """The authenticated caller of one HTTP request.

    Attributes:
        caller: Its identity, as the gRPC side would see it.
        via: ``certificate``, ``api_key`` or ``jwt``.
        authorization: The ``Authorization`` header that authenticated it ("" for a
            certificate), for a gateway to pass on to the service it calls.
    """

    caller: CallerIdentity
    via: str
    authorization: str = ""

    @property
    def is_authenticated(self) -> bool:
        """Always: unauthenticated requests never get this far."""
        return True

    @property
    def display_name(self) -> str:
        """The SPIFFE id (Starlette's ``identity`` too)."""
        return self.caller.spiffe_id

    identity = display_name


class HttpAuthenticator:
    """Turns a request's client certificate or bearer credential into an :class:`HttpCaller`."""

    def __init__(self, auth: AuthSettings, *, revoked_certs_file: Path | None = None) -> None:
        """Build the checks.

        Args:
            auth: End-user authentication (API keys, JWT); disabled: certificates only.
            revoked_certs_file: The revocation list, if any.
        """
        self.authn = Authenticator(auth) if auth.enabled else None
        self._revoked = RevocationList(revoked_certs_file) if revoked_certs_file else None
        self._identities: dict[str, str | None] = {}

    @property
    def bearer_enabled(self) -> bool:
        """Whether bearer credentials (API keys or JWT) are accepted."""
        return self.authn is not None

    def _certificate(self, scope: Scope) -> tuple[str, str | None] | None:
        """The client certificate (PEM) and its SPIFFE id, None without one."""
        tls = (scope.get("extensions") or {}).get("tls") or {}
        chain = tls.get("client_cert_chain") or ()
        if not chain:
            return None
        pem: str = chain[0]
        if pem not in self._identities:
            if len(self._identities) >= _CACHE_LIMIT:
                self._identities.clear()
            cert = x509.load_pem_x509_certificate(pem.encode())
            self._identities[pem] = cert_spiffe_id(cert)
        return pem, self._identities[pem]

    async def authenticate(self, scope: Scope) -> HttpCaller:
        """The caller of a request.

        Raises:
            Unauthenticated: No usable credential, or a refused one (the reason says).
        """
        certificate = self._certificate(scope)
        if certificate is not None and self._revoked is not None:
            pem, spiffe = certificate
            if self._revoked.revoked(spiffe or "", lambda: pem.encode()):
                raise Unauthenticated("the client certificate is revoked", reason="CERT_REVOKED")
        authorization = next(
            (v.decode("latin-1") for k, v in scope.get("headers") or () if k == b"authorization"),
            None,
        )
        if authorization is not None and (self.authn is not None or certificate is None):
            if self.authn is None:
                raise Unauthenticated(
                    "this service accepts no bearer credentials: present a client certificate "
                    "of the mesh CA",
                    reason="TOKENS_NOT_ACCEPTED",
                )
            principal = await self.authn.authenticate([("authorization", authorization)])
            assert principal is not None
            return HttpCaller(
                CallerIdentity(principal.spiffe_id, principal.role, principal.name),
                via=principal.via,
                authorization=authorization,
            )
        if certificate is None:
            how = "a client certificate of the mesh CA"
            if self.authn is not None:
                how += " or an 'Authorization: Bearer <API key or token>' header"
            raise Unauthenticated(f"credentials required: present {how}", reason="NO_CREDENTIALS")
        if not certificate[1]:
            raise Unauthenticated(
                "the client certificate carries no SPIFFE identity", reason="NO_IDENTITY"
            )
        return HttpCaller(CallerIdentity.from_spiffe_id(certificate[1]), via=CERTIFICATE)


class RequireCaller:
    """ASGI middleware: every HTTP request but the public paths needs a caller."""

    def __init__(
        self, app: ASGIApp, authenticator: HttpAuthenticator, *, public: Collection[str] = ()
    ) -> None:
        """Wrap ``app``.

        Args:
            app: The application.
            authenticator: Who may call.
            public: Paths served to anyone (exact matches).
        """
        self.app = app
        self.authenticator = authenticator
        self.public = frozenset(public)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Authenticate, then call the app; or answer 401."""
        if scope["type"] != "http" or scope["path"] in self.public:
            await self.app(scope, receive, send)
            return
        try:
            user = await self.authenticator.authenticate(scope)
        except Unauthenticated as err:
            record_denial("authn", err.reason, "", f"{scope['method']} {scope['path']}")
            await self._refuse(send, err, had_bearer=_has_authorization(scope))
            return
        scope["user"] = user
        scope["auth"] = AuthCredentials(["authenticated", user.via])
        await self.app(scope, receive, send)

    async def _refuse(self, send: Send, err: Unauthenticated, *, had_bearer: bool) -> None:
        body = json.dumps(
            {"error": {"code": "UNAUTHENTICATED", "reason": err.reason, "message": err.message}}
        ).encode()
        headers: list[tuple[bytes, bytes]] = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
        ]
        if self.authenticator.bearer_enabled:
            challenge = 'Bearer realm="hivewire"'
            if had_bearer:
                challenge += ', error="invalid_token"'
            headers.append((b"www-authenticate", challenge.encode()))
        await send({"type": "http.response.start", "status": 401, "headers": headers})
        await send({"type": "http.response.body", "body": body})


def _has_authorization(scope: Scope) -> bool:
    return any(k == b"authorization" for k, _ in scope.get("headers") or ())


def http_authenticator(settings: Settings) -> HttpAuthenticator:
    """The authenticator of a service's settings (``auth``, ``revoked_certs_file``)."""
    return HttpAuthenticator(settings.auth, revoked_certs_file=settings.revoked_certs_file)
