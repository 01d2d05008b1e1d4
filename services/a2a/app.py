"""The A2A gateway process: the coordinator client, the card, and both A2A bindings.

``running_gateway(settings)`` opens an mTLS channel to the coordinator (the gateway's
identity, a ``client/*`` of the mesh), starts the card refresher, the HTTPS server
(JSON-RPC with SSE streaming at ``/``, the card at ``/.well-known/agent-card.json``)
and the gRPC server hosting ``lf.a2a.v1.A2AService`` (the a2a-sdk servicer) with
health, authorization and the standard interceptors. Both use the mesh certificates.
gRPC callers need a client certificate of the mesh CA (and may add a bearer
credential); HTTPS callers need a client certificate or a bearer credential
(:class:`~hivewire.services.runtime.httpauth.RequireCaller`: 401 without), except for
the public agent card. The gateway then acts for each caller (:mod:`.callers`). The
ports file names the gRPC port (``grpc``) and the HTTPS port (``http``).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass

import grpc
from a2a.server.request_handlers.grpc_handler import GrpcHandler
from a2a.server.routes import create_agent_card_routes, create_jsonrpc_routes
from a2a.types import a2a_pb2_grpc
from a2a.utils.constants import AGENT_CARD_WELL_KNOWN_PATH
from starlette.applications import Starlette

from hivewire.coordinator.v1 import coordinator_pb2_grpc
from hivewire.services.a2a.callers import GrpcContextBuilder, HttpContextBuilder
from hivewire.services.a2a.card import CardIdentity, CardSource
from hivewire.services.a2a.handler import GatewayHandler
from hivewire.services.a2a.settings import A2aProcessSettings
from hivewire.services.runtime.channels import secure_channel
from hivewire.services.runtime.httpauth import RequireCaller, http_authenticator
from hivewire.services.runtime.https import HttpsServer
from hivewire.services.runtime.server import ServiceBinding, ServiceServer
from hivewire.services.runtime.version import hivewire_version

SERVICE_NAME = "lf.a2a.v1.A2AService"
"""The A2A gRPC binding's full service name (health, reflection, authorization)."""


@dataclass
class RunningGateway:
    """A started gateway."""

    server: ServiceServer
    http: HttpsServer
    cards: CardSource

    @property
    def card_url(self) -> str:
        """Where the agent card is served."""
        return f"{self.cards.identity.jsonrpc_url}.well-known/agent-card.json"


@contextlib.asynccontextmanager
async def running_gateway(settings: A2aProcessSettings) -> AsyncIterator[RunningGateway]:
    """Run the gateway until the block ends (stopping HTTPS, then the gRPC server)."""
    config = settings.a2a
    files = settings.tls_files()
    async with contextlib.AsyncExitStack() as stack:
        channel = secure_channel(
            config.coordinator_address, files, max_message_bytes=settings.max_message_bytes
        )
        stack.push_async_callback(channel.close)
        stub = coordinator_pb2_grpc.CoordinatorServiceStub(channel)
        host = config.public_host or settings.advertised_host
        cards = CardSource(stub, interval=config.card_refresh)
        handler = GatewayHandler(stub, cards, config)
        authenticator = http_authenticator(settings)
        app = Starlette(
            routes=create_jsonrpc_routes(handler, rpc_url="/", context_builder=HttpContextBuilder())
        )
        # Bound and listening now, serving once the card is ready: its URLs need both ports.
        http = HttpsServer(
            RequireCaller(app, authenticator, public={AGENT_CARD_WELL_KNOWN_PATH}),
            files,
            host=settings.host,
            port=config.http_port,
            require_client_cert=False,
        )
        grpc_context = GrpcContextBuilder(bearer=authenticator.bearer_enabled)
        binding = ServiceBinding(
            SERVICE_NAME,
            lambda s: a2a_pb2_grpc.add_A2AServiceServicer_to_server(  # type: ignore[no-untyped-call]  # a2a-sdk: generated code, unannotated
                GrpcHandler(handler, context_builder=grpc_context), s
            ),
        )
        server = await stack.enter_async_context(
            ServiceServer(settings, [binding], extra_ports={"http": http.port})
        )
        cards.set_identity(
            CardIdentity(
                name=config.name,
                description=config.description,
                version=hivewire_version() or "0.0.0",
                jsonrpc_url=f"https://{_hostport(host, http.port)}/",
                grpc_url=_hostport(host, server.port),
                bearer=authenticator.bearer_enabled,
            )
        )
        with contextlib.suppress(grpc.aio.AioRpcError):
            await cards.refresh()
        app.router.routes.extend(create_agent_card_routes(cards.card, card_modifier=cards.current))
        await stack.enter_async_context(http)
        refresher = asyncio.create_task(cards.run())
        stack.push_async_callback(cards.close, refresher)
        yield RunningGateway(server=server, http=http, cards=cards)


def _hostport(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
