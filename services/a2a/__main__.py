"""``python -m hivewire.services.a2a`` (``hivewire a2a``): run the A2A gateway.

It serves the mesh to Agent2Agent clients: JSON-RPC with SSE streaming over HTTPS
(default port 50055, the agent card at ``/.well-known/agent-card.json``) and the A2A
gRPC binding (default port 50054), both with the mesh certificates (identity ``a2a``);
callers present a client certificate or a bearer credential and own their tasks. It is
a client of the coordinator
(``HIVEWIRE_A2A__COORDINATOR_ADDRESS``, default 127.0.0.1:50051). SIGTERM stops it.
See docs/interop.md.
"""

from __future__ import annotations

from collections.abc import Sequence

from hivewire.services.a2a.app import running_gateway
from hivewire.services.runtime.bootstrap import ServiceEntry
from hivewire.services.runtime.config import Settings
from hivewire.services.runtime.ports import A2A_GRPC_PORT
from hivewire.services.runtime.server import serve_until_signal

ENTRY = ServiceEntry("a2a", title="hivewire A2A gateway", port=A2A_GRPC_PORT)


async def serve(settings: Settings) -> None:
    """Run the gateway until SIGTERM or SIGINT."""
    async with running_gateway(settings) as running:
        await serve_until_signal(running.server)


def main(argv: Sequence[str] | None = None) -> None:
    """Parse flags, build the settings once and serve."""
    parser = ENTRY.parser()
    parser.add_argument(
        "--coordinator", help="coordinator host:port (HIVEWIRE_A2A__COORDINATOR_ADDRESS)"
    )
    parser.add_argument("--http-port", type=int, help="HTTPS port (HIVEWIRE_A2A__HTTP_PORT)")
    args = parser.parse_args(argv)
    section = {"coordinator_address": args.coordinator, "http_port": args.http_port}
    ENTRY.run(serve, ENTRY.settings(args, a2a=section))


if __name__ == "__main__":
    main()
