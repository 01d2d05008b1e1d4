"""``python -m hivewire.services.tool``: run the tool service.

Startup: settings, logging, events, tools (built-ins, plugins, MCP servers), the MCP
server of its own tools when ``HIVEWIRE_TOOL__MCP_SERVE_PORT`` is set (HTTPS, mTLS;
docs/interop.md), gRPC server (SERVING), registration as ``hivewire-tool`` with the
tool names as tags. SIGTERM
reverses it: NOT_SERVING, deregister, in-flight calls get the grace period, MCP sessions
and HTTP pools close, events flush. Defaults when the environment sets nothing:
identity ``tool``, port 50053, metrics on port 51053.
"""

from __future__ import annotations

from collections.abc import Sequence

from hivewire.services.runtime.bootstrap import TOOL_PORT, Hosting, ServiceEntry, ServiceProcess
from hivewire.services.runtime.grants import NatsGrantLedger
from hivewire.services.runtime.server import ServiceBinding
from hivewire.services.runtime.tls import nats_tls_options
from hivewire.services.tool.mcp_server import serve_mcp
from hivewire.services.tool.service import open_tool_service
from hivewire.services.tool.servicer import SERVICE_NAME, ToolServicer
from hivewire.services.tool.settings import ToolProcessSettings
from hivewire.tool.v1 import tool_pb2_grpc

ENTRY = ServiceEntry(
    "tool", title="hivewire tool service", port=TOOL_PORT, settings_model=ToolProcessSettings
)


async def open_tool(process: ServiceProcess, settings: ToolProcessSettings) -> Hosting:
    """Open the grant ledger, the tools and the MCP server (closed when the process
    ends) and the servicer over them; the tool names are the registry tags.
    """
    ledger = None
    if settings.tool.grant_ledger == "nats":
        # Approvals are single use across every tool service of the mesh.
        ledger = NatsGrantLedger(
            settings.nats_url,
            horizon=settings.tool.grant_ledger_ttl,
            nats_options=nats_tls_options(settings.nats_url, settings.tls_files()),
        )
        process.stack.push_async_callback(ledger.close)
    service = await process.stack.enter_async_context(
        open_tool_service(
            settings.tool,
            publisher=process.events,
            mesh_ca=settings.tls_files().ca,
            grant_ledger=ledger,
        )
    )
    extra_ports: dict[str, int] = {}
    if settings.tool.mcp_serve_port is not None:
        mcp = await process.stack.enter_async_context(serve_mcp(service, settings))
        extra_ports["mcp"] = mcp.port
    servicer = ToolServicer(service)
    binding = ServiceBinding(
        SERVICE_NAME, lambda s: tool_pb2_grpc.add_ToolServiceServicer_to_server(servicer, s)
    )
    return Hosting(
        [binding],
        tags=tuple(tool.name for tool in service.registry.tools()),
        extra_ports=extra_ports,
    )


serve = ENTRY.hosting(open_tool)
"""Run the service until SIGTERM or SIGINT (registered as ``hivewire-tool``)."""


def main(argv: Sequence[str] | None = None) -> None:
    """Parse flags, build the settings once and serve."""
    parser = ENTRY.parser()
    parser.add_argument("--policy-file", help="tool policy TOML (HIVEWIRE_TOOL__POLICY_FILE)")
    args = parser.parse_args(argv)
    sections = {"tool": {"policy_file": args.policy_file}} if args.policy_file is not None else {}
    ENTRY.run(serve, ENTRY.settings(args, **sections))


if __name__ == "__main__":
    main()
