"""Authorization by identity per RPC: which mesh identity may call which gRPC method.

Every service's server checks each call against one policy before the servicer runs
(:class:`AuthzServerInterceptor`, installed by
:class:`~hivewire.services.runtime.server.ServiceServer`). The caller is the SPIFFE id
in its mTLS client certificate; the method is the full gRPC method name,
``/package.Service/Method``. A refused call ends ``PERMISSION_DENIED`` with reason
``CALLER_NOT_ALLOWED`` and ``caller``/``method`` in the ``ErrorInfo`` metadata. An
allowed call finds its :class:`CallerIdentity` in :data:`caller_var` (:func:`current_caller`).

The policy is a TOML file (``HIVEWIRE_AUTHZ_POLICY_FILE``) in the style of the tool
policy (docs/tools.md)::

    version = 1

    [[rules]]
    description = "clients may call the coordinator"
    callers = ["client/*"]
    allow = ["hivewire.coordinator.v1.CoordinatorService/*"]

    [[rules]]
    description = "this client may not cancel"
    callers = ["client/kiosk"]
    deny = ["hivewire.coordinator.v1.CoordinatorService/CancelTask"]

A rule may also say whom its callers may **act for** (``act_for``, globs like
``callers``): a gateway that authenticated its own caller (the A2A gateway does) sends
the metadata ``hivewire-on-behalf-of: <SPIFFE id>`` and the call then runs as that
identity (the policy is checked for it, the servicer sees it: it owns the tasks). Only
an explicit ``act_for`` grants this (``allow = ["*"]`` does not), a revoked identity is
never acted for, and a call that also carries a bearer credential may not delegate::

    [[rules]]
    callers = ["client/a2a"]
    act_for = ["client/*"]

Callers are globs over SPIFFE ids: ``spiffe://...`` as written, ``*`` for any peer the
mesh CA authenticated (even one whose certificate carries no SPIFFE id), anything else
relative to the mesh trust domain (``client/*`` is ``spiffe://hivewire.local/client/*``).
Methods are globs over ``package.Service/Method`` (a leading ``/`` is optional). Globs
are shell-style (``*``, ``?``, ``[abc]``; ``*`` also matches ``/`` and ``.``). Every rule
whose callers match applies: a method is allowed when some matching rule allows it and
no matching rule denies it (deny wins); a call no rule allows is refused.

Without a file, :data:`DEFAULT_POLICY` applies (:data:`DEFAULT_POLICY_TOML`, which
encodes DESIGN.md section 6). The file is re-read when it changes (checked at most once
a second); a file that fails to parse stops the service at startup, and at a reload is
logged while the previous policy stays in force.

Decisions are cached per (caller, method), so the per-call cost is reading the peer's
identities and one dictionary lookup.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import tomllib
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import aclosing
from contextvars import ContextVar
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeAlias

import grpc

from hivewire.services.runtime.authn import Authenticator
from hivewire.services.runtime.errors import PermissionDenied, Unauthenticated
from hivewire.services.runtime.interceptors import HandlerCachingInterceptor, handler_parts
from hivewire.services.runtime.policyfile import (
    GlobPolicy,
    GlobRule,
    PolicyKind,
    ReloadingPolicy,
    globs,
    matches,
)
from hivewire.services.runtime.revocation import RevocationList
from hivewire.services.runtime.security import record_denial
from hivewire.services.runtime.tls import (
    SPIFFE_SCHEME,
    TRUST_DOMAIN,
    parse_spiffe_id,
    peer_spiffe_id,
)

logger = logging.getLogger(__name__)

__all__ = [
    "ANY_PEER",
    "DEFAULT_POLICY",
    "DEFAULT_POLICY_TOML",
    "ON_BEHALF_OF",
    "REASON",
    "AuthzPolicy",
    "AuthzPolicyError",
    "AuthzPolicyStore",
    "AuthzRule",
    "AuthzServerInterceptor",
    "CallerIdentity",
    "caller_var",
    "current_caller",
    "load_authz_policy",
    "parse_authz_policy",
]

REASON = "CALLER_NOT_ALLOWED"
"""``ErrorInfo.reason`` of a call the policy refuses."""

ON_BEHALF_OF = "hivewire-on-behalf-of"
"""Metadata naming the SPIFFE id a delegating caller acts for (see ``act_for``)."""

DELEGATION_REASON = "DELEGATION_NOT_ALLOWED"
"""``ErrorInfo.reason`` of a refused ``hivewire-on-behalf-of``."""

ANY_PEER = "*"
"""Caller glob matching every peer the mesh CA authenticated, with or without an id."""

_MESH_PREFIX = f"{SPIFFE_SCHEME}{TRUST_DOMAIN}/"
_SPIFFE_PREFIX = SPIFFE_SCHEME.encode()
_RULE_KEYS = frozenset({"callers", "allow", "deny", "act_for", "description"})
_CACHE_LIMIT = 4096
"""Cached decisions kept before the cache starts over (ids are bounded by the CA)."""

_DRAIN_TIMEOUT = 1.0
"""Seconds a refused request-streaming call waits for the caller's first message."""


class AuthzPolicyError(ValueError):
    """The authorization policy is malformed (the message says where)."""


# --- the caller ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class CallerIdentity:
    """Who is calling, from the peer's mTLS certificate.

    Attributes:
        spiffe_id: The certificate's ``spiffe://`` URI SAN; "" when it carries none.
        role: The role part of a mesh identity (``client``, ``agent``...); "" for an
            identity outside the mesh trust domain or none.
        name: The name part of a mesh identity; "" likewise.
    """

    spiffe_id: str
    role: str = ""
    name: str = ""

    @classmethod
    def from_spiffe_id(cls, spiffe_id: str | None) -> CallerIdentity:
        """Build the caller of a SPIFFE id (None or "" for a peer without one)."""
        if not spiffe_id:
            return ANONYMOUS
        parsed = parse_spiffe_id(spiffe_id)
        if parsed is None:
            return cls(spiffe_id)
        return cls(spiffe_id, parsed[0], parsed[1])

    def __str__(self) -> str:
        return self.spiffe_id or "a peer without a SPIFFE id"


ANONYMOUS = CallerIdentity("")
"""A peer whose certificate (signed by the mesh CA) carries no SPIFFE id."""

caller_var: ContextVar[CallerIdentity | None] = ContextVar("hivewire_caller", default=None)
"""The authorized caller of the server call being handled (None outside one)."""


def current_caller() -> CallerIdentity | None:
    """Return the caller of the server call being handled, as the authz check saw it.

    Returns:
        The caller, or None outside a server call (or on a server without authz).
    """
    return caller_var.get()


def caller_spiffe_id(context: grpc.aio.ServicerContext[Any, Any]) -> str | None:
    """The SPIFFE id of whoever makes this server call: how every servicer reads it.

    The identity the authz check authorized (the end user's principal where end-user
    authentication applies), else the peer certificate's URI SAN; None for a peer
    without one.
    """
    authorized = current_caller()
    if authorized is not None:
        return authorized.spiffe_id or None
    return peer_spiffe_id(context)


# --- the policy ------------------------------------------------------------------------


def _caller_glob(glob: str) -> str:
    if glob == ANY_PEER or glob.startswith(SPIFFE_SCHEME):
        return glob
    return _MESH_PREFIX + glob


def _method_glob(glob: str) -> str:
    return glob.removeprefix("/")


@dataclass(frozen=True)
class AuthzRule(GlobRule):
    """One ``[[rules]]`` entry, globs already normalized.

    Attributes:
        callers: Full SPIFFE id globs, or ``*`` (any authenticated peer).
        allow: Method globs (``package.Service/Method``, no leading ``/``) it allows.
        deny: Method globs it refuses (deny wins over any allow).
        description: Free text for people reading the policy.
        act_for: Full SPIFFE id globs of the identities its callers may act for.
    """

    act_for: tuple[str, ...] = ()

    def applies_to(self, caller: str) -> bool:
        """Whether the rule covers a caller ("" for a peer without an id)."""
        if ANY_PEER in self.callers:
            return True
        return bool(caller) and super().applies_to(caller)


class AuthzPolicy(GlobPolicy[AuthzRule]):
    """A parsed authz policy: which caller may call which method, act for whom."""

    def allows(self, spiffe_id: str, method: str) -> bool:
        """Whether a caller may call a method.

        Args:
            spiffe_id: The caller's SPIFFE id ("" for a peer without one).
            method: Full gRPC method name, ``/package.Service/Method``.

        Returns:
            True when a matching rule allows the method and none denies it.
        """
        return self.permits(self.applying(spiffe_id), method.removeprefix("/"))

    def may_act_for(self, spiffe_id: str, principal: str) -> bool:
        """Whether a caller may act for ``principal`` (an explicit ``act_for`` says so)."""
        return bool(spiffe_id and principal) and any(
            rule.applies_to(spiffe_id) and matches(principal, rule.act_for)
            for rule in self.rules
            if ANY_PEER not in rule.callers
        )


def _method_globs(value: Any, where: str) -> tuple[str, ...]:
    methods = tuple(_method_glob(glob) for glob in globs(value, where, AuthzPolicyError))
    for glob in methods:
        # "pkg.Service" alone would silently match nothing: make the mistake loud.
        if "/" not in glob and "*" not in glob:
            hint = f"{glob}/*"
            raise AuthzPolicyError(f"{where}: {glob!r} names no method (did you mean {hint!r}?)")
    return methods


def _rule(where: str, raw: Mapping[str, Any], description: str) -> AuthzRule:
    return AuthzRule(
        callers=tuple(
            _caller_glob(glob)
            for glob in globs(raw["callers"], f"{where}.callers", AuthzPolicyError)
        ),
        allow=_method_globs(raw.get("allow", []), f"{where}.allow"),
        deny=_method_globs(raw.get("deny", []), f"{where}.deny"),
        description=description,
        act_for=tuple(
            _caller_glob(glob)
            for glob in globs(raw.get("act_for", []), f"{where}.act_for", AuthzPolicyError)
            if glob != ANY_PEER
        ),
    )


AUTHZ_POLICY_FILE = PolicyKind("authz policy", AuthzPolicyError, _RULE_KEYS, _rule, AuthzPolicy)
"""The authz policy file: how it is read (:class:`~.policyfile.ReloadingPolicy` reloads it).

Its errors are :class:`AuthzPolicyError`: unknown keys, wrong types, a rule without
callers or a method glob that names no method.
"""

parse_authz_policy = AUTHZ_POLICY_FILE.parse
"""Build a policy from a parsed TOML document (``{"version": 1, "rules": [...]}``)."""

load_authz_policy = AUTHZ_POLICY_FILE.load
"""Read and parse a policy file (:class:`AuthzPolicyError`, ``OSError``)."""


DEFAULT_POLICY_TOML = (
    resources.files(__package__).joinpath("default_authz_policy.toml").read_text("utf-8")
)
"""The built-in policy as a file would say it (a starting point for your own): the
package's ``default_authz_policy.toml``."""

DEFAULT_POLICY = parse_authz_policy(tomllib.loads(DEFAULT_POLICY_TOML), "default")
"""The policy in force when ``authz_policy_file`` is not set (DESIGN.md section 6)."""


class AuthzPolicyStore:
    """The policy in force and its cached decisions; re-reads the file when it changes."""

    def __init__(
        self,
        path: Path | None = None,
        *,
        policy: AuthzPolicy | None = None,
        check_interval: float = 1.0,
    ) -> None:
        """Load the policy.

        Args:
            path: The policy file; None for ``policy``.
            policy: The policy to use without a file (default :data:`DEFAULT_POLICY`).
            check_interval: Minimum seconds between checks of the file's mtime.

        Raises:
            AuthzPolicyError: The file is invalid (a bad policy must stop the service
                from starting rather than silently open or close every method).
            OSError: The file cannot be read.
        """
        self._decisions: dict[tuple[str, str], bool] = {}
        self._file = ReloadingPolicy(
            AUTHZ_POLICY_FILE, path, default=policy or DEFAULT_POLICY, check_interval=check_interval
        )
        logger.info("authz policy: %d rule(s) from %s", len(self.policy.rules), self.policy.source)

    @property
    def policy(self) -> AuthzPolicy:
        """The current policy (re-read first if the file changed)."""
        self._maybe_reload()
        return self._file.policy

    def allows(self, spiffe_id: str, method: str) -> bool:
        """Whether ``spiffe_id`` may call ``method`` under the current policy (cached).

        Args:
            spiffe_id: The caller's SPIFFE id ("" for a peer without one).
            method: Full gRPC method name, ``/package.Service/Method``.
        """
        allowed, fresh = self._decide((spiffe_id, method), AuthzPolicy.allows, spiffe_id, method)
        if fresh and not allowed:
            # Once per (caller, method) and policy: a refused caller retrying in a
            # loop must not flood the log.
            logger.warning(
                "authz: %s may not call %s (policy %s)",
                spiffe_id or "a peer without a SPIFFE id",
                method,
                self._file.policy.source,
            )
        return allowed

    def may_act_for(self, spiffe_id: str, principal: str) -> bool:
        """Whether ``spiffe_id`` may act for ``principal`` (an ``act_for`` rule; cached)."""
        key = (spiffe_id, f"\x00act_for {principal}")
        return self._decide(key, AuthzPolicy.may_act_for, spiffe_id, principal)[0]

    def _decide(
        self, key: tuple[str, str], decide: Callable[[AuthzPolicy, str, str], bool], *args: str
    ) -> tuple[bool, bool]:
        """``decide(policy, *args)``, cached under ``key``; and whether it was just made."""
        self._maybe_reload()
        allowed = self._decisions.get(key)
        if allowed is not None:
            return allowed, False
        allowed = decide(self._file.policy, *args)
        if len(self._decisions) >= _CACHE_LIMIT:
            self._decisions.clear()
        self._decisions[key] = allowed
        return allowed, True

    def _maybe_reload(self) -> None:
        if self._file.refresh():
            self._decisions = {}


# --- the interceptor -------------------------------------------------------------------

if TYPE_CHECKING:
    Context: TypeAlias = grpc.aio.ServicerContext[Any, Any]
    Handler: TypeAlias = grpc.RpcMethodHandler[Any, Any]


class _Gate:
    """The per-call check, shared by every wrapped handler of one server."""

    __slots__ = ("_authn", "_callers", "_revoked", "_store")

    def __init__(
        self,
        store: AuthzPolicyStore,
        authn: Authenticator | None = None,
        revoked: RevocationList | None = None,
    ) -> None:
        self._store = store
        self._authn = authn
        self._revoked = revoked
        self._callers: dict[bytes, CallerIdentity] = {}

    def caller(self, context: Context) -> CallerIdentity:
        # peer_identities() is the SAN list for our certificates and costs a tenth of
        # auth_context(), which copies every property including the PEM.
        for identity in context.peer_identities() or ():
            if identity.startswith(_SPIFFE_PREFIX):
                caller = self._callers.get(identity)
                if caller is None:
                    if len(self._callers) >= _CACHE_LIMIT:
                        self._callers.clear()
                    caller = CallerIdentity.from_spiffe_id(identity.decode("utf-8", "replace"))
                    self._callers[identity] = caller
                return caller
        return ANONYMOUS

    async def check(
        self, request: Any, context: Context, method: str, streaming: bool
    ) -> CallerIdentity:
        """The caller, once authenticated and allowed (also set in :data:`caller_var`).

        Raises:
            Unauthenticated: The call's bearer credential is not valid.
            PermissionDenied: The policy does not allow the caller this method.
        """
        caller = self.caller(context)
        if self._revoked is not None and self._revoked.revoked(
            caller.spiffe_id, lambda: _peer_pem(context)
        ):
            await _drain(request, streaming)
            record_denial("authn", "CERT_REVOKED", caller.spiffe_id, method)
            raise Unauthenticated(f"the certificate of {caller} is revoked", reason="CERT_REVOKED")
        if self._authn is not None:
            try:
                principal = await self._authn.authenticate(context.invocation_metadata())
            except Unauthenticated as err:
                await _drain(request, streaming)
                record_denial("authn", err.reason, caller.spiffe_id, method)
                raise
            if principal is not None:
                caller = CallerIdentity(principal.spiffe_id, principal.role, principal.name)
        delegated = _metadata_value(context, ON_BEHALF_OF)
        if delegated is not None:
            caller = await self._delegate(request, context, method, streaming, caller, delegated)
        if not self._store.allows(caller.spiffe_id, method):
            await self.refuse(request, context, method, streaming, caller)
        caller_var.set(caller)
        return caller

    async def _delegate(
        self,
        request: Any,
        context: Context,
        method: str,
        streaming: bool,
        caller: CallerIdentity,
        principal: str,
    ) -> CallerIdentity:
        """The identity ``caller`` acts for, once its ``act_for`` rule allows it."""
        certificate = self.caller(context)
        parsed = parse_spiffe_id(principal)
        refusal = ""
        if caller != certificate:
            refusal = "a call with a bearer credential may not act for another identity"
        elif parsed is None or "/" in parsed[1]:
            refusal = f"{principal!r} is not a mesh identity (spiffe://{TRUST_DOMAIN}/role/name)"
        elif not self._store.may_act_for(caller.spiffe_id, principal):
            refusal = f"{caller} may not act for {principal}"
        elif self._revoked is not None and self._revoked.revoked(principal, lambda: None):
            refusal = f"{principal} is revoked"
        if refusal:
            await _drain(request, streaming)
            record_denial("authz", DELEGATION_REASON, caller.spiffe_id, method)
            raise PermissionDenied(
                refusal,
                reason=DELEGATION_REASON,
                metadata={"caller": caller.spiffe_id, "onBehalfOf": principal, "method": method},
            )
        return CallerIdentity.from_spiffe_id(principal)

    async def refuse(
        self,
        request: Any,
        context: Context,
        method: str,
        streaming: bool,
        caller: CallerIdentity | None = None,
    ) -> None:
        await _drain(request, streaming)
        caller = caller or self.caller(context)
        record_denial("authz", REASON, caller.spiffe_id, method)
        raise PermissionDenied(
            f"{caller} may not call {method}",
            reason=REASON,
            metadata={"caller": caller.spiffe_id, "method": method},
        )


def _metadata_value(context: Context, key: str) -> str | None:
    for name, value in context.invocation_metadata() or ():
        if name == key:
            return value.decode() if isinstance(value, bytes) else str(value)
    return None


def _peer_pem(context: Context) -> bytes | None:
    pems = context.auth_context().get("x509_pem_cert") or ()
    return next(iter(pems), None)


async def _drain(request: Any, streaming: bool) -> None:
    if streaming:
        # Take the caller's first message before answering: a status sent while
        # its first write is in flight reaches it as a failed write (INTERNAL)
        # instead of the refusal.
        with contextlib.suppress(Exception):
            async with asyncio.timeout(_DRAIN_TIMEOUT):
                await anext(aiter(request), None)


def _authorizing(handler: Handler, method: str, gate: _Gate) -> Handler:
    """Return ``handler`` guarded by ``gate`` (same kind, same serializers)."""
    behavior, factory = handler_parts(handler)
    streaming_in = handler.request_streaming
    check = gate.check
    wrapped: Any
    if handler.response_streaming and inspect.isasyncgenfunction(behavior):

        async def wrapped(request: Any, context: Context) -> AsyncIterator[Any]:
            await check(request, context, method, streaming_in)
            async with aclosing(behavior(request, context)) as responses:
                async for response in responses:
                    yield response

    elif inspect.iscoroutinefunction(behavior):

        async def wrapped(request: Any, context: Context) -> Any:
            await check(request, context, method, streaming_in)
            return await behavior(request, context)

    else:
        # Synchronous behaviors cannot be guarded without a thread hop, and hivewire
        # servers host none: refuse them all rather than let them through unchecked.
        async def wrapped(request: Any, context: Context) -> Any:
            await gate.refuse(request, context, method, streaming_in)

        factory = (
            grpc.stream_unary_rpc_method_handler
            if streaming_in
            else grpc.unary_unary_rpc_method_handler
        )
    return factory(
        wrapped,
        request_deserializer=handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )


class AuthzServerInterceptor(HandlerCachingInterceptor):
    """Refuse calls the policy does not allow, before the servicer runs.

    It sits inside the error-mapping interceptor (see
    :func:`~hivewire.services.runtime.interceptors.server_interceptors`), which turns
    the :class:`PermissionDenied` it raises into ``PERMISSION_DENIED`` with reason
    ``CALLER_NOT_ALLOWED``. Allowed calls find their :class:`CallerIdentity` in
    :data:`caller_var`.
    """

    def __init__(
        self,
        store: AuthzPolicyStore | None = None,
        *,
        authn: Authenticator | None = None,
        revoked: RevocationList | None = None,
    ) -> None:
        """Create the interceptor.

        Args:
            store: The policy; default :data:`DEFAULT_POLICY`.
            authn: End-user authentication (API keys, JWT); None: callers are their
                certificates only.
            revoked: Revoked certificates and identities, refused first.
        """
        super().__init__()
        self.store = store or AuthzPolicyStore()
        self._gate = _Gate(self.store, authn, revoked)

    def wrap(self, method: str, handler: Handler) -> Handler:
        """Guard ``handler``, the handler of ``method``, with the policy check."""
        return _authorizing(handler, method, self._gate)
