"""A real 3-node nats-server cluster with JetStream on loopback, for HA tests.

Route ports cannot be bound to port 0 and announced in advance, so the nodes start one
after the other on random ports (``-1``) and each new node routes to the ones before
it, whose cluster ports are read back from their ports files; routes gossip, so the
nodes end fully meshed. JetStream clustering refuses to start without a configured
route, so the first node routes to a closed port until the others arrive (a restarted
node routes to the live ones). Ready once every node answers a plain ``/healthz``,
which waits for a JetStream meta leader.

Usage::

    async with NatsCluster(tmp_path / "nats", size=3) as cluster:
        url = cluster.url            # every client URL, comma separated
        await cluster.kill(1)        # kill -9 one node
"""

from __future__ import annotations

import json
from pathlib import Path
from types import TracebackType
from typing import Self

import httpx

from tests.helpers import NatsServer, eventually

CLUSTER_NAME = "hivewire-test"

_NOWHERE = "nats://127.0.0.1:1"
"""A route to a closed port: lets the first node start JetStream before its peers."""


class NatsCluster:
    """``size`` nats-server nodes clustered over real routes on 127.0.0.1.

    Args:
        workdir: One sub-directory per node (store, ports file, log).
        size: How many nodes (3 for JetStream replicas 3).
    """

    def __init__(self, workdir: Path, *, size: int = 3) -> None:
        self.workdir = Path(workdir)
        self.nodes: list[NatsServer] = []
        self._size = size
        self._cluster_urls: list[str] = []

    @property
    def url(self) -> str:
        """Every node's client URL, comma separated (what ``HIVEWIRE_NATS_URL`` takes)."""
        return ",".join(node.url for node in self._ports_known())

    def _ports_known(self) -> list[NatsServer]:
        return [node for node in self.nodes if node._port is not None]

    def _node(self, index: int, port: int | None, routes: list[str]) -> NatsServer:
        name = f"n{index + 1}"
        return NatsServer(
            self.workdir / name,
            port=port,
            extra_args=(
                "--name", name,
                "--cluster_name", CLUSTER_NAME,
                "--cluster", "nats://127.0.0.1:-1",
                "--routes", ",".join(routes or [_NOWHERE]),
            ),
        )  # fmt: skip

    def _cluster_url(self, node: NatsServer) -> str:
        assert node.pid is not None
        ports = json.loads((node.workdir / f"nats-server_{node.pid}.ports").read_text())
        return str(ports["cluster"][0])

    async def start(self) -> None:
        """Start every node, each routed to those before it; wait for a meta leader."""
        for index in range(self._size):
            node = self._node(index, None, list(self._cluster_urls))
            self.nodes.append(node)
            await node.start()
            self._cluster_urls.append(self._cluster_url(node))
        await self.wait_healthy()

    async def wait_healthy(self, *, timeout: float = 30.0) -> None:
        """Wait until every running node reports JetStream healthy with a meta leader."""

        async def healthy() -> None:
            async with httpx.AsyncClient(timeout=2.0) as client:
                for node in self.nodes:
                    if node.running:
                        response = await client.get(f"{node.monitor_url}/healthz")
                        assert response.status_code == 200, (node.workdir.name, response.text)

        await eventually(
            healthy, timeout=timeout, interval=0.1, retry_on=(AssertionError, httpx.HTTPError)
        )

    async def stream_leader(self, stream: str) -> int:
        """The index of the node leading a stream's raft group."""

        async def find() -> int:
            async with httpx.AsyncClient(timeout=2.0) as client:
                for node in self.nodes:
                    if not node.running:
                        continue
                    response = await client.get(
                        f"{node.monitor_url}/jsz", params={"accounts": "true", "streams": "true"}
                    )
                    for account in response.json().get("account_details", []):
                        for info in account.get("stream_detail", []):
                            leader = (info.get("cluster") or {}).get("leader", "")
                            if info.get("name") == stream and leader:
                                return int(leader.removeprefix("n")) - 1
            raise AssertionError(f"no leader of {stream} yet")

        result: int = await eventually(find, timeout=20, interval=0.1)
        return result

    async def kill(self, index: int) -> None:
        """Kill -9 one node."""
        await self.nodes[index].kill()

    async def restart(self, index: int, *, wait: bool = True) -> None:
        """Start a killed node again: same client port and store, routed to the others.

        Args:
            index: The node.
            wait: Wait until every running node is healthy (False: the caller waits
                once several are back, e.g. two nodes that only form a quorum together).
        """
        old = self.nodes[index]
        routes = [url for i, url in enumerate(self._cluster_urls) if i != index]
        node = self._node(index, old.port, routes)
        self.nodes[index] = node
        await node.start()
        self._cluster_urls[index] = self._cluster_url(node)
        if wait:
            await self.wait_healthy()

    async def stop(self) -> None:
        """Stop every node."""
        for node in self.nodes:
            await node.stop()

    async def __aenter__(self) -> Self:
        try:
            await self.start()
        except BaseException:
            await self.stop()
            raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()
