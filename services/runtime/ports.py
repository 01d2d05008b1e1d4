"""The mesh's fixed default ports (``make run``, the docs' grpcurl commands).

Coordinator 50051, model 50052, tool 50053, the A2A gateway 50054 (gRPC) and 50055
(HTTPS), more coordinators from 50056 (``hivewire up --coordinators N``), agents from
50061; each service's Prometheus endpoint is its gRPC port + 1000.
Import-light on purpose: the CLI reads these without loading the service runtime.
"""

from __future__ import annotations

__all__ = [
    "A2A_GRPC_PORT",
    "A2A_HTTP_PORT",
    "COORDINATOR_PORT",
    "EXTRA_COORDINATOR_PORT",
    "FIRST_AGENT_PORT",
    "METRICS_OFFSET",
    "MODEL_PORT",
    "TOOL_PORT",
    "metrics_port_for",
]

COORDINATOR_PORT = 50051
MODEL_PORT = 50052
TOOL_PORT = 50053
A2A_GRPC_PORT = 50054
"""The A2A gateway's gRPC binding."""
A2A_HTTP_PORT = 50055
"""The A2A gateway's JSON-RPC (HTTPS) binding and agent card."""
EXTRA_COORDINATOR_PORT = 50056
"""The second coordinator of ``hivewire up --coordinators N``; the next ones follow."""
FIRST_AGENT_PORT = 50061
METRICS_OFFSET = 1000
"""A service's Prometheus port is its gRPC port plus this."""


def metrics_port_for(port: int) -> int:
    """The default Prometheus port of a service on gRPC ``port``."""
    return port + METRICS_OFFSET
