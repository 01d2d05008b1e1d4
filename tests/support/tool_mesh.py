"""Real model and tool service processes, and a loopback web site, for end-to-end tests.

Complements :mod:`tests.support.e2e_mesh` (nats-server, coordinator, agent processes,
started the same way with :func:`~tests.support.e2e_mesh.mesh_process`):
the model service on its deterministic backend and the tool service with a policy file,
both registered in the embedded NATS registry so agent processes find them the way they
do in ``make run``.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from hivewire.discovery import open_registry
from tests.helpers import ServiceProcess, eventually
from tests.support.e2e_mesh import mesh_process

RESEARCHER = "hivewire.services.agent.examples.researcher:ResearcherAgent"

MODEL_SERVICE = "hivewire-model"
TOOL_SERVICE = "hivewire-tool"


def model_process(
    workdir: Path,
    *,
    certs_dir: Path,
    nats_url: str,
    env: Mapping[str, str] | None = None,
) -> ServiceProcess:
    """``python -m hivewire.services.model`` on the deterministic backend, embedded discovery."""
    return mesh_process(
        "hivewire.services.model",
        workdir=workdir,
        certs_dir=certs_dir,
        identity="model",
        nats_url=nats_url,
        env={"HIVEWIRE_MODEL__DEFAULT_BACKEND": "deterministic", **(env or {})},
    )


def tool_process(
    workdir: Path,
    *,
    certs_dir: Path,
    nats_url: str,
    policy_file: Path | None = None,
    allowed_hosts: Sequence[str] = (),
    env: Mapping[str, str] | None = None,
) -> ServiceProcess:
    """``python -m hivewire.services.tool`` with a policy file, embedded discovery.

    Args:
        workdir: Directory for the ports file and the logs.
        certs_dir: The PKI directory.
        nats_url: NATS for discovery and ``tool.*`` events.
        policy_file: ``HIVEWIRE_TOOL__POLICY_FILE``; None keeps the default policy.
        allowed_hosts: ``HIVEWIRE_TOOL__HTTP_ALLOWED_HOSTS`` (``host:port`` entries).
        env: More environment variables.
    """
    extra = {"HIVEWIRE_TOOL__HTTP_ALLOWED_HOSTS": ",".join(allowed_hosts)}
    if policy_file is not None:
        extra["HIVEWIRE_TOOL__POLICY_FILE"] = str(policy_file)
    return mesh_process(
        "hivewire.services.tool",
        workdir=workdir,
        certs_dir=certs_dir,
        identity="tool",
        nats_url=nats_url,
        env={**extra, **(env or {})},
    )


async def wait_until_registered(
    nats_url: str,
    services: Sequence[str],
    *,
    timeout: float = 30.0,
    nats_options: Mapping[str, Any] | None = None,
) -> None:
    """Wait until each service has a healthy instance in the embedded registry.

    A service writes its ports file when it serves and registers right after, so an
    agent started in between could look it up too early.
    """
    options = {"nats_options": dict(nats_options)} if nats_options else {}
    async with open_registry("nats", nats_url=nats_url, **options) as registry:

        async def registered() -> None:
            for service in services:
                assert await registry.resolve(service), f"{service} not registered yet"

        await eventually(registered, timeout=timeout, interval=0.05)


class CountingSite:
    """A tiny HTTP/1.1 server on 127.0.0.1 that serves one page and counts requests by path.

    ``async with CountingSite(page) as site``: ``site.host`` is ``127.0.0.1:<port>``,
    ``site.url(path)`` a URL on it, ``site.hits[path]`` how many requests that path got.
    """

    def __init__(self, page: str, *, content_type: str = "text/plain; charset=utf-8") -> None:
        """Create the site (not listening until entered).

        Args:
            page: The body served for every path.
            content_type: Its Content-Type.
        """
        self.page = page
        self.content_type = content_type
        self.hits: Counter[str] = Counter()
        self._server: asyncio.Server | None = None

    @property
    def host(self) -> str:
        """``127.0.0.1:<port>``, the entry for an allow-list."""
        if self._server is None:
            raise RuntimeError("the site is not listening")
        port = self._server.sockets[0].getsockname()[1]
        return f"127.0.0.1:{port}"

    def url(self, path: str) -> str:
        """``http://127.0.0.1:<port><path>``."""
        return f"http://{self.host}{path}"

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request_line = (await reader.readline()).decode("latin-1").split()
            while (await reader.readline()) not in (b"\r\n", b"\n", b""):
                pass
            if len(request_line) >= 2:
                self.hits[request_line[1]] += 1
            body = self.page.encode()
            writer.write(
                f"HTTP/1.1 200 OK\r\nContent-Type: {self.content_type}\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
                + body
            )
            await writer.drain()
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    async def __aenter__(self) -> Self:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
