"""End-user authentication on top of mTLS: API keys and JWT bearer tokens.

The transport is always mutual TLS with a mesh certificate; a call may in addition carry
``authorization: Bearer <credential>`` for the person (or program) on whose behalf it is
made. The credential then decides the caller: the authz interceptor
(:mod:`hivewire.services.runtime.authz`) checks the policy for, and the servicer reads,
a :class:`~hivewire.services.runtime.authz.CallerIdentity` of the principal
``spiffe://hivewire.local/<role>/<name>`` — the same shape as a certificate identity, so
the principal owns tasks exactly as a certificate does, policy rules (``client/*``,
``admin/*``) apply to it unchanged, and a key named ``alice`` with role ``client`` is the
same principal as the certificate ``client/alice``.

- **API keys** (``hwk_<id>_<secret>``) are made by ``hivewire keys create``, shown once,
  and stored as a SHA-256 of the secret (256 random bits: a slow hash adds nothing) in
  a JSON file (``HIVEWIRE_AUTH__API_KEYS_FILE``), with the principal's name and role.
  ``hivewire keys revoke`` marks one revoked; services re-read the file when it changes.
- **JWT** from an external identity provider: signature (keys from a JWKS URL, cached and
  refreshed, or a JWKS file, re-read when it changes), ``iss``, ``aud``, ``exp`` (with a
  leeway for clock skew), algorithms pinned to asymmetric ones (``alg: none`` and HMAC are
  refused). The name is the ``sub`` claim, the role the ``hivewire_role`` claim (default
  ``client``), limited to ``HIVEWIRE_AUTH__ROLES``.

A bad credential ends the call ``UNAUTHENTICATED`` with a reason saying why
(``TOKEN_EXPIRED``, ``TOKEN_WRONG_AUDIENCE``, ``TOKEN_ALGORITHM_NOT_ALLOWED``,
``API_KEY_REVOKED``...). A service without end-user authentication configured ignores
bearer credentials (its callers are mesh identities).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import hmac
import json
import logging
import os
import secrets
import urllib.parse
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import jwt
from pydantic import BaseModel, ConfigDict, Field, model_validator

from hivewire.services.runtime.errors import Unauthenticated
from hivewire.services.runtime.filewatch import FileWatch
from hivewire.services.runtime.tls import MeshName

logger = logging.getLogger(__name__)

API_KEY_PREFIX = "hwk_"
_ASYMMETRIC = frozenset(
    {"RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA"}
)


class AuthSettings(BaseModel):
    """End-user authentication (the ``auth`` section, ``HIVEWIRE_AUTH__*``)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    api_keys_file: Path | None = Field(
        None, description="API keys (hashed), written by `hivewire keys`; unset = no API keys."
    )
    jwt_issuer: str | None = Field(None, description="Required `iss` of bearer JWTs.")
    jwt_audience: str | None = Field(None, description="Required `aud` of bearer JWTs.")
    jwt_jwks_url: str | None = Field(None, description="JWKS URL of the identity provider.")
    jwt_jwks_file: Path | None = Field(None, description="JWKS file (instead of a URL).")
    jwt_algorithms: list[str] = Field(
        default_factory=lambda: ["RS256", "ES256"],
        description="Accepted JWT algorithms (asymmetric only).",
    )
    jwt_leeway: float = Field(30.0, ge=0, description="Clock skew (s) allowed on exp and nbf.")
    jwt_jwks_ttl: float = Field(300.0, gt=0, description="Seconds fetched JWKS keys are cached.")
    jwt_role_claim: str = Field("hivewire_role", description="Claim naming the role.")
    roles: list[str] = Field(
        default_factory=lambda: ["client", "admin"],
        description="Roles an API key or token may name.",
    )

    @model_validator(mode="after")
    def _check(self) -> AuthSettings:
        if self.jwt_enabled:
            if not (self.jwt_issuer and self.jwt_audience):
                raise ValueError("JWT needs both jwt_issuer and jwt_audience")
            if self.jwt_jwks_url and self.jwt_jwks_file:
                raise ValueError("give jwt_jwks_url or jwt_jwks_file, not both")
            bad = [a for a in self.jwt_algorithms if a not in _ASYMMETRIC]
            if bad or not self.jwt_algorithms:
                raise ValueError(f"jwt_algorithms must be asymmetric algorithms, not {bad}")
        return self

    @property
    def jwt_enabled(self) -> bool:
        """Whether bearer JWTs are accepted."""
        return bool(self.jwt_jwks_url or self.jwt_jwks_file)

    @property
    def enabled(self) -> bool:
        """Whether any end-user credential is accepted."""
        return self.jwt_enabled or self.api_keys_file is not None


@dataclass(frozen=True, slots=True)
class Principal(MeshName):
    """Who a credential names: a policy role (``client``, ``admin``...) and a name
    within it, whose SPIFFE id is :attr:`spiffe_id`.

    Attributes:
        via: ``api_key`` or ``jwt``.
    """

    via: str


def _refuse(reason: str, message: str) -> Unauthenticated:
    return Unauthenticated(message, reason=reason)


# -- API keys -----------------------------------------------------------------------------


@dataclass(frozen=True)
class ApiKey:
    """One stored API key (its secret only as a hash).

    Attributes:
        key_id: Public id (the key's second part).
        name: The principal's name.
        role: The principal's role.
        sha256: Hex SHA-256 of the secret part.
        created: ISO time of creation.
        revoked: ISO time of revocation, "" while valid.
    """

    key_id: str
    name: str
    role: str
    sha256: str
    created: str
    revoked: str = ""


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


def _digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


class ApiKeyStore:
    """The API key file: create, list, revoke and verify keys."""

    def __init__(self, path: Path, *, roles: Sequence[str] = ("client", "admin")) -> None:
        """Open (not read yet) the key file.

        Args:
            path: The JSON file.
            roles: Roles a key may have.
        """
        self.path = path
        self.roles = tuple(roles)
        self._keys: dict[str, ApiKey] = {}
        self._watch = FileWatch(path, missing_ok=True)

    def _load(self) -> dict[str, ApiKey]:
        stamp = self._watch.changed()
        if stamp is not None:
            keys: dict[str, ApiKey] = {}
            if stamp[0] is not None:
                data = json.loads(self.path.read_text())
                keys = {k["key_id"]: ApiKey(**k) for k in data.get("keys", [])}
            self._keys = keys
            self._watch.mark(stamp)
        return self._keys

    def _save(self, keys: Iterable[ApiKey]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(self.path.suffix + ".tmp")
        text = json.dumps({"version": 1, "keys": [asdict(k) for k in keys]}, indent=2)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(text + "\n")
        os.replace(tmp, self.path)
        self._watch.forget()

    def keys(self) -> list[ApiKey]:
        """Every key, revoked ones included, oldest first."""
        return sorted(self._load().values(), key=lambda k: k.created)

    def create(self, name: str, role: str = "client") -> tuple[str, ApiKey]:
        """Make a key; the returned text is the only time the secret is shown.

        Raises:
            ValueError: Unknown role or an empty name.
        """
        if role not in self.roles:
            raise ValueError(f"role must be one of {', '.join(self.roles)}, not {role!r}")
        if not name or "/" in name:
            raise ValueError("a key needs a name without '/'")
        key_id = secrets.token_hex(6)
        secret = secrets.token_urlsafe(32)
        key = ApiKey(key_id, name, role, _digest(secret), _now())
        self._save([*self.keys(), key])
        return f"{API_KEY_PREFIX}{key_id}_{secret}", key

    def revoke(self, key_id: str) -> ApiKey:
        """Revoke a key (revoking a revoked key changes nothing).

        Raises:
            KeyError: No such key.
        """
        keys = self._load()
        key = keys[key_id]
        if not key.revoked:
            key = ApiKey(**{**asdict(key), "revoked": _now()})
            self._save([key if k.key_id == key_id else k for k in self.keys()])
        return key

    def verify(self, text: str) -> Principal:
        """The principal of a presented key.

        Raises:
            Unauthenticated: ``API_KEY_INVALID`` or ``API_KEY_REVOKED``.
        """
        key_id, _, secret = text.removeprefix(API_KEY_PREFIX).partition("_")
        key = self._load().get(key_id)
        if key is None or not hmac.compare_digest(key.sha256, _digest(secret)):
            raise _refuse("API_KEY_INVALID", "the API key is not valid")
        if key.revoked:
            raise _refuse("API_KEY_REVOKED", f"the API key {key_id} was revoked")
        return Principal(key.role, key.name, "api_key")


# -- JWT ----------------------------------------------------------------------------------

_JWT_REASONS: tuple[tuple[type[Exception], str], ...] = (
    (jwt.ExpiredSignatureError, "TOKEN_EXPIRED"),
    (jwt.InvalidAudienceError, "TOKEN_WRONG_AUDIENCE"),
    (jwt.InvalidIssuerError, "TOKEN_WRONG_ISSUER"),
    (jwt.ImmatureSignatureError, "TOKEN_NOT_YET_VALID"),
    (jwt.InvalidSignatureError, "TOKEN_BAD_SIGNATURE"),
    (jwt.InvalidAlgorithmError, "TOKEN_ALGORITHM_NOT_ALLOWED"),
    (jwt.MissingRequiredClaimError, "TOKEN_MISSING_CLAIM"),
    (jwt.PyJWKClientError, "TOKEN_UNKNOWN_KEY"),
)


class JwtVerifier:
    """Verifies bearer JWTs against the identity provider's keys and the pinned claims."""

    def __init__(self, settings: AuthSettings) -> None:
        """Set up the key source (nothing is fetched yet)."""
        self.settings = settings
        self._client: jwt.PyJWKClient | None = None
        if settings.jwt_jwks_url:
            self._client = jwt.PyJWKClient(
                settings.jwt_jwks_url, cache_keys=True, lifespan=int(settings.jwt_jwks_ttl)
            )
        self._file_keys: jwt.PyJWKSet | None = None
        self._file_watch = FileWatch(settings.jwt_jwks_file) if settings.jwt_jwks_file else None

    def _file_key(self, kid: str | None) -> Any:
        path = self.settings.jwt_jwks_file
        assert path is not None and self._file_watch is not None
        stamp = self._file_watch.changed()
        if stamp is not None or self._file_keys is None:
            self._file_keys = jwt.PyJWKSet.from_json(path.read_text())
            self._file_watch.mark(stamp)
        for key in self._file_keys.keys:
            if kid is None or key.key_id == kid:
                return key.key
        raise jwt.PyJWKClientError(f"no key {kid!r} in {path}")

    def _verify(self, token: str) -> dict[str, Any]:
        s = self.settings
        header = jwt.get_unverified_header(token)
        if header.get("alg") not in s.jwt_algorithms:
            raise jwt.InvalidAlgorithmError(f"algorithm {header.get('alg')!r} is not allowed")
        if self._client is not None:
            key: Any = self._client.get_signing_key_from_jwt(token).key
        else:
            key = self._file_key(header.get("kid"))
        claims: dict[str, Any] = jwt.decode(
            token,
            key,
            algorithms=list(s.jwt_algorithms),
            audience=s.jwt_audience,
            issuer=s.jwt_issuer,
            leeway=s.jwt_leeway,
            options={"require": ["exp", "iss", "aud", "sub"]},
        )
        return claims

    async def verify(self, token: str) -> Principal:
        """The principal of a token (JWKS fetches run in a thread).

        Raises:
            Unauthenticated: With the reason the token was refused.
        """
        try:
            claims = await asyncio.to_thread(self._verify, token)
        except jwt.PyJWTError as exc:
            reason = next((r for cls, r in _JWT_REASONS if isinstance(exc, cls)), "TOKEN_MALFORMED")
            raise _refuse(reason, f"the bearer token was refused: {exc}") from None
        except OSError as exc:
            raise _refuse("TOKEN_KEYS_UNAVAILABLE", f"cannot read the token keys: {exc}") from None
        role = str(claims.get(self.settings.jwt_role_claim) or "client")
        if role not in self.settings.roles:
            raise _refuse("TOKEN_ROLE_NOT_ALLOWED", f"role {role!r} is not allowed")
        name = urllib.parse.quote(str(claims["sub"]), safe="@.-_~:|")
        return Principal(role, name, "jwt")


# -- the authenticator --------------------------------------------------------------------


class Authenticator:
    """Turns a call's bearer credential into a principal (or refuses it)."""

    def __init__(self, settings: AuthSettings) -> None:
        """Build the configured credential checkers."""
        self.settings = settings
        self.keys = (
            ApiKeyStore(settings.api_keys_file, roles=settings.roles)
            if settings.api_keys_file is not None
            else None
        )
        self.jwt = JwtVerifier(settings) if settings.jwt_enabled else None

    async def authenticate(self, metadata: Iterable[tuple[str, Any]] | None) -> Principal | None:
        """The principal of the call's ``authorization`` metadata, or None without one.

        Raises:
            Unauthenticated: A credential was given and is not valid (or of a kind
                this service does not accept).
        """
        value = next((v for k, v in metadata or () if k == "authorization"), None)
        if value is None:
            return None
        text = value.decode() if isinstance(value, bytes) else str(value)
        scheme, _, credential = text.strip().partition(" ")
        credential = credential.strip()
        if scheme.lower() != "bearer" or not credential:
            raise _refuse("CREDENTIAL_MALFORMED", "authorization must be 'Bearer <credential>'")
        if credential.startswith(API_KEY_PREFIX):
            if self.keys is None:
                raise _refuse("API_KEYS_NOT_ACCEPTED", "this service accepts no API keys")
            return self.keys.verify(credential)
        if self.jwt is None:
            raise _refuse("TOKENS_NOT_ACCEPTED", "this service accepts no bearer tokens")
        return await self.jwt.verify(credential)
