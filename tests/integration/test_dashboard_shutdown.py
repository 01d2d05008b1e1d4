"""The dashboard's HTTPS server stops at once while browsers hold event streams open.

An event stream (``/api/events``, a task's timeline) never ends on its own: shutdown ends
each open one instead of waiting out aiohttp's shutdown timeout for them.
"""

from __future__ import annotations

import ssl

import httpx
from aiohttp import web

from hivewire.coordinator.v1 import coordinator_pb2_grpc
from hivewire.services.dashboard.backend import Backend
from hivewire.services.dashboard.web import create_app, server_ssl_context
from hivewire.services.runtime.authz import AuthzPolicyStore
from hivewire.services.runtime.channels import secure_channel
from tests.conftest import Pki
from tests.helpers import NatsServer, dead_address


async def test_shutdown_ends_the_open_event_streams(pki: Pki, nats_server: NatsServer) -> None:
    admin = pki.files("admin")
    with dead_address() as nowhere:
        # The events stream reads NATS only; the coordinator is never called.
        channel = secure_channel(nowhere, pki.files("client"))
        backend = Backend(
            coordinator_pb2_grpc.CoordinatorServiceStub(channel),
            AuthzPolicyStore(),
            admin_prefix="spiffe://hivewire.local/admin/",
            nats_url=nats_server.url,
        )
        # An hour to wait for open handlers: were the stream left open, cleanup would
        # hang and the test fail on its timeout.
        runner = web.AppRunner(create_app(backend, tokens={}), shutdown_timeout=3600)
        await runner.setup()
        site = web.TCPSite(
            runner, "127.0.0.1", 0, ssl_context=server_ssl_context(pki.files("client"))
        )
        await site.start()
        port = runner.addresses[0][1]
        context = ssl.create_default_context(cafile=str(admin.ca))
        context.load_cert_chain(str(admin.cert), str(admin.key))
        try:
            async with (
                httpx.AsyncClient(verify=context, timeout=None) as client,
                client.stream("GET", f"https://localhost:{port}/api/events") as response,
            ):
                assert response.status_code == 200
                assert response.headers["content-type"] == "text/event-stream"
                await runner.cleanup()
                # Ended by the server: the body is complete, no live event ever came.
                assert b"".join([chunk async for chunk in response.aiter_bytes()]) == b""
        finally:
            await runner.cleanup()
            await channel.close()
