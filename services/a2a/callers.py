"""Who an A2A call comes from, and how the gateway acts for it toward the coordinator.

Every A2A caller owns its own tasks: the gateway calls the coordinator *as the caller*,
never as itself, so the coordinator's ownership rules (a task is seen, followed,
answered and cancelled by its owner or an admin) apply to A2A callers one by one.

- A caller with a **bearer credential** (an API key or a JWT; accepted when end-user
  authentication is configured, ``HIVEWIRE_AUTH__*``): the gateway checks it (the
  shared :class:`~hivewire.services.runtime.authn.Authenticator`, so a bad one is
  refused before anything starts) and passes the same ``authorization`` header on to
  the coordinator, which checks it again and makes its principal the caller. The
  gateway can do nothing with a token it was not given.
- A caller known by its **client certificate** (gRPC, or HTTPS with a certificate):
  the gateway sends ``hivewire-on-behalf-of: <the certificate's SPIFFE id>``. The
  coordinator honours it only for an identity its authz policy lets act for others
  (``act_for``; by default ``client/a2a``, the gateway, for ``client/*`` identities
  only: no agent, coordinator or admin can be acted for) and never for a revoked one.

The SDK's context builders (:class:`HttpContextBuilder`, :class:`GrpcContextBuilder`)
put the caller's :class:`Acting` in the ``ServerCallContext``; the handler sends its
metadata on every coordinator call of that A2A call.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import grpc
from a2a.server.context import ServerCallContext
from a2a.server.request_handlers.grpc_handler import DefaultGrpcServerCallContextBuilder
from a2a.server.routes.common import DefaultServerCallContextBuilder
from a2a.utils.errors import InternalError
from starlette.requests import Request

from hivewire.services.runtime.authz import ON_BEHALF_OF, current_caller
from hivewire.services.runtime.httpauth import HttpCaller

ACTING_KEY = "hivewire_acting"
"""``ServerCallContext.state`` key of the call's :class:`Acting`."""


@dataclass(frozen=True)
class Acting:
    """The A2A caller and the metadata that makes the coordinator see it as the caller.

    Attributes:
        identity: The caller's SPIFFE id (its certificate's, or its credential's principal).
        metadata: What the gateway sends on each coordinator call for it.
    """

    identity: str
    metadata: tuple[tuple[str, str], ...]

    @classmethod
    def of(cls, identity: str, authorization: str = "") -> Acting:
        """Pass a bearer credential on, or else act for the certificate's identity."""
        if authorization:
            return cls(identity, (("authorization", authorization),))
        return cls(identity, ((ON_BEHALF_OF, identity),))


def acting(context: ServerCallContext) -> Acting:
    """The caller of an A2A call (the context builders put it there)."""
    value = context.state.get(ACTING_KEY)
    if not isinstance(value, Acting):
        raise InternalError("the call carries no authenticated caller")
    return value


class HttpContextBuilder(DefaultServerCallContextBuilder):
    """The SDK's context of a JSON-RPC request, with the caller :class:`RequireCaller`
    authenticated (:mod:`~hivewire.services.runtime.httpauth`).
    """

    def build(self, request: Request) -> ServerCallContext:
        """The SDK's context, plus the caller."""
        context = super().build(request)
        user = request.scope.get("user")
        if isinstance(user, HttpCaller):
            context.state[ACTING_KEY] = Acting.of(user.caller.spiffe_id, user.authorization)
        return context


class GrpcContextBuilder(DefaultGrpcServerCallContextBuilder):
    """The SDK's context of a gRPC call, with the caller the authz gate let in."""

    def __init__(self, *, bearer: bool) -> None:
        """Create the builder.

        Args:
            bearer: Whether the gateway accepts bearer credentials (then the gate has
                checked the call's ``authorization`` and its principal is the caller).
        """
        self._bearer = bearer

    def build(self, context: grpc.aio.ServicerContext[Any, Any]) -> ServerCallContext:
        """The SDK's context, plus the caller."""
        built = super().build(context)
        caller = current_caller()
        if caller is not None and caller.spiffe_id:
            authorization = ""
            if self._bearer:
                metadata = context.invocation_metadata() or ()
                authorization = next((str(v) for k, v in metadata if k == "authorization"), "")
            built.state[ACTING_KEY] = Acting.of(caller.spiffe_id, authorization)
        return built
