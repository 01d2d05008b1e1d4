"""A real mesh with the A2A gateway, for the A2A end-to-end tests.

nats-server, the coordinator, the interop test agent and ``python -m
hivewire.services.a2a`` (identity ``a2a``), all real processes over mTLS, found through
the embedded NATS registry on ephemeral ports.
"""

from __future__ import annotations

import contextlib
import ssl
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import httpx

from hivewire.coordinator.v1 import coordinator_pb2_grpc
from hivewire.services.runtime.channels import secure_channel
from hivewire.services.runtime.tls import TlsFiles
from tests.conftest import Pki
from tests.helpers import NatsServer, ServiceProcess, eventually
from tests.support.e2e_mesh import agent_process, coordinator_process, mesh_process, wait_for_agents

INTEROP_AGENT = "tests.support.interop_agents:InteropAgent"
SKILLS = ("greet", "guarded", "spell", "wait")


@dataclass
class A2aMesh:
    """The running mesh: where the gateway listens and how to reach the coordinator."""

    nats: NatsServer
    coordinator: ServiceProcess
    gateway: ServiceProcess
    client_files: TlsFiles
    coordinator_stub: coordinator_pb2_grpc.CoordinatorServiceAsyncStub

    @property
    def base_url(self) -> str:
        """``https://127.0.0.1:<http port>/``: the JSON-RPC endpoint and the card's base."""
        return f"https://127.0.0.1:{self.gateway.ports['http']}/"

    @property
    def card_url(self) -> str:
        return self.base_url + ".well-known/agent-card.json"

    @property
    def grpc_address(self) -> str:
        return f"127.0.0.1:{self.gateway.ports['grpc']}"


def client_ssl_context(files: TlsFiles) -> ssl.SSLContext:
    """An SSL context trusting the mesh CA and presenting ``files``' certificate."""
    context = ssl.create_default_context(cafile=str(files.ca))
    context.load_cert_chain(str(files.cert), str(files.key))
    return context


def grpc_credentials(files: TlsFiles) -> grpc.ChannelCredentials:
    ca, cert, key = files.read()
    return grpc.ssl_channel_credentials(
        root_certificates=ca, private_key=key, certificate_chain=cert
    )


@contextlib.asynccontextmanager
async def a2a_mesh(
    pki: Pki, workdir: Path, *, env: Mapping[str, str] | None = None
) -> AsyncIterator[A2aMesh]:
    """Start the mesh and wait until the gateway's card lists every test skill.

    ``env`` goes to the coordinator and the gateway (end-user authentication, say).
    """
    async with contextlib.AsyncExitStack() as stack:
        nats = await stack.enter_async_context(NatsServer(workdir / "nats"))
        coordinator = await stack.enter_async_context(
            coordinator_process(
                workdir,
                certs_dir=pki.dir,
                nats_url=nats.url,
                db_path=workdir / "c.db",
                env=env,
            )
        )
        await stack.enter_async_context(
            agent_process(
                workdir, INTEROP_AGENT, name="interop", certs_dir=pki.dir, nats_url=nats.url
            )
        )
        gateway = await stack.enter_async_context(
            mesh_process(
                "hivewire.services.a2a",
                workdir=workdir,
                name="a2a",
                certs_dir=pki.dir,
                identity="a2a",
                nats_url=nats.url,
                env={
                    "HIVEWIRE_A2A__COORDINATOR_ADDRESS": coordinator.address,
                    "HIVEWIRE_A2A__HTTP_PORT": "0",
                    "HIVEWIRE_A2A__CARD_REFRESH": "0.5",
                    **(env or {}),
                },
            )
        )
        # The admin sees every task, the gateway's included.
        channel = secure_channel(coordinator.address, pki.files("admin"))
        stack.push_async_callback(channel.close)
        stub: coordinator_pb2_grpc.CoordinatorServiceAsyncStub = (
            coordinator_pb2_grpc.CoordinatorServiceStub(channel)  # type: ignore[assignment]
        )
        await wait_for_agents(stub, 1)
        mesh = A2aMesh(nats, coordinator, gateway, pki.files("client"), stub)
        await wait_for_card(mesh, SKILLS)
        yield mesh


async def wait_for_card(mesh: A2aMesh, skills: tuple[str, ...]) -> dict[str, object]:
    """The card once it lists ``skills`` with their descriptions (the gateway refreshes it
    from ListAgents; the coordinator learns descriptions from each agent's Describe)."""

    async def listed() -> dict[str, object]:
        async with httpx.AsyncClient(verify=client_ssl_context(mesh.client_files)) as http:
            response = await http.get(mesh.card_url)
        response.raise_for_status()
        card: dict[str, Any] = response.json()
        described = {s["id"] for s in card.get("skills", []) if s["description"] != s["id"]}
        assert set(skills) <= described, card.get("skills")
        return card

    result: dict[str, object] = await eventually(
        listed, timeout=30, interval=0.2, retry_on=(AssertionError, Exception)
    )
    return result
