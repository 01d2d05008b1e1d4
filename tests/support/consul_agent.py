"""A real ``consul agent -dev`` on random loopback ports, when a ``consul`` binary exists.

The contract suite runs against it automatically when ``shutil.which("consul")`` finds
one; otherwise those cases are skipped with a reason.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import signal
from pathlib import Path

import httpx

from tests.helpers import eventually, reserved_port

__all__ = ["RealConsul", "consul_binary"]


def consul_binary() -> str | None:
    """Path of ``consul`` on PATH, or None."""
    return shutil.which("consul")


class RealConsul:
    """``consul agent -dev`` bound to 127.0.0.1 with every port chosen at random.

    Args:
        workdir: Directory for the log and extra config.
        hcl: Extra HCL configuration lines (``-hcl``), e.g. TLS for checks.
    """

    def __init__(self, workdir: Path, *, hcl: tuple[str, ...] = ()) -> None:
        self.workdir = workdir
        self.hcl = hcl
        self.http_port = reserved_port()
        self.log_path = workdir / "consul.log"
        self._proc: asyncio.subprocess.Process | None = None

    @property
    def address(self) -> str:
        """``127.0.0.1:<http port>``."""
        return f"127.0.0.1:{self.http_port}"

    async def start(self, *, timeout: float = 30.0) -> None:
        """Start the agent and wait for a leader."""
        binary = consul_binary()
        if binary is None:
            raise RuntimeError("consul is not on PATH")
        self.workdir.mkdir(parents=True, exist_ok=True)
        command = [
            binary, "agent", "-dev",
            "-bind", "127.0.0.1", "-client", "127.0.0.1",
            "-node", "hivewire-test",
            "-http-port", str(self.http_port),
            "-dns-port", "-1",
            "-grpc-port", "-1",
            "-serf-lan-port", str(reserved_port()),
            "-serf-wan-port", str(reserved_port()),
            "-server-port", str(reserved_port()),
            "-hcl", "ports { grpc_tls = -1 }",
        ]  # fmt: skip
        for line in self.hcl:
            command += ["-hcl", line]
        with self.log_path.open("ab") as log:
            self._proc = await asyncio.create_subprocess_exec(
                *command, stdin=asyncio.subprocess.DEVNULL, stdout=log, stderr=log
            )
        proc = self._proc

        async def has_leader() -> bool:
            if proc.returncode is not None:
                raise RuntimeError(
                    f"consul exited with {proc.returncode}:\n{self.log_path.read_text()[-3000:]}"
                )
            async with httpx.AsyncClient(timeout=2.0) as client:
                try:
                    response = await client.get(f"http://{self.address}/v1/status/leader")
                except httpx.TransportError:
                    return False
            return response.status_code == 200 and response.json() not in ("", None)

        await eventually(has_leader, timeout=timeout, interval=0.1)

    async def stop(self) -> None:
        """Stop the agent (SIGTERM, then SIGKILL)."""
        proc = self._proc
        if proc is None or proc.returncode is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            async with asyncio.timeout(10):
                await proc.wait()
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
