"""Run `hivewire up` as a real subprocess on free ports, the way a user runs `make run`."""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hivewire.services.runtime.ports import METRICS_OFFSET
from hivewire.services.runtime.tls import TlsFiles
from tests.helpers import held_socket, hold

HIVEWIRE = str(Path(sys.executable).parent / "hivewire")


@dataclass
class RunningMesh:
    """A `hivewire up` process and what it reported."""

    process: subprocess.Popen[bytes]
    root: Path
    state_dir: Path
    log: Path
    endpoints: dict[str, Any]

    @property
    def tls(self) -> TlsFiles:
        paths = self.endpoints["tls"]
        return TlsFiles(ca=Path(paths["ca"]), cert=Path(paths["cert"]), key=Path(paths["key"]))

    def address(self, name: str) -> str:
        return str(self.endpoints["services"][name]["address"])

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def clean_env(self) -> dict[str, str]:
        """This process's environment without HIVEWIRE_* settings of the caller."""
        return {k: v for k, v in os.environ.items() if not k.startswith("HIVEWIRE_")}


_BLOCK = 15  # coordinator, model, tool, three agents, NATS, NATS monitoring, A2A gRPC, HTTPS,
# dashboard, four more coordinators (--coordinators up to 5)
_WITH_METRICS = (0, 1, 2, 3, 4, 5, 8, 11, 12, 13, 14)  # offsets of services with metrics


def _draw_base() -> int:
    """A random base for a block, from this pytest-xdist worker's own share of 20000-30000.

    Two processes can both hold a port with ``SO_REUSEADDR`` as long as neither listens,
    so a held port is kept only from port-0 binds and binds without the option, not from
    another worker drawing the same number. The range is cut into chunks of
    2 * METRICS_OFFSET ports: a base in the first half of a chunk keeps its block and its
    metrics ports inside that chunk, and worker ``gwN`` draws only from the chunks whose
    index is N modulo the number of workers.
    """
    chunk = 2 * METRICS_OFFSET
    chunks = range(20000 // chunk, 30000 // chunk)
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")
    count = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if worker.startswith("gw") and count > 1:
        chunks = chunks[int(worker[2:]) % count :: count]
    return random.choice(chunks) * chunk + random.randrange(METRICS_OFFSET - _BLOCK)


def reserved_port_block() -> int:
    """A base port whose block of 15, and the metrics ports 1000 above, this process holds.

    `hivewire up` is told its ports before it starts (a consecutive block: the agents
    take three in a row, each service's metrics sit on its gRPC port + 1000), so they
    cannot come from port 0. Each one is held instead, like :func:`reserved_port`'s,
    until the test process exits: its services listen on them, nobody else can take
    them. The block is drawn below Linux's ephemeral range (32768+), from this pytest-xdist
    worker's own share of the range (:func:`_draw_base`).
    """
    for _ in range(500):
        base = _draw_base()
        ports = [base + i for i in range(_BLOCK)] + [
            base + i + METRICS_OFFSET for i in _WITH_METRICS
        ]
        held: list[socket.socket] = []
        try:
            for port in ports:
                held.append(held_socket(port))
        except OSError:  # one is taken: try another block
            for sock in held:
                sock.close()
            continue
        for sock in held:
            hold(sock)
        return base
    raise RuntimeError("no free block of ports below 32768")


def _wait_for(predicate: Any, *, within: float, what: str, log: Path) -> None:
    """Poll against a deadline (sync: module-scoped fixtures have no event loop)."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    raise AssertionError(f"{what} not seen within {within}s; output:\n{log.read_text()}")


@contextlib.contextmanager
def hivewire_up(
    root: Path, *, args: Sequence[str] = (), state_dir: Path | None = None
) -> Iterator[RunningMesh]:
    """Start `hivewire up` in ``root`` on free ports; SIGINT it (Ctrl-C) on exit."""
    state = state_dir or root / ".hivewire"
    log = root / "up.log"
    argv = [HIVEWIRE, "up", "--model-backend", "deterministic", *args]
    base = reserved_port_block()
    for offset, flag in enumerate(
        (
            "--coordinator-port",
            "--model-port",
            "--tool-port",
            "--first-agent-port",  # three agents: base+3, base+4, base+5
            "--nats-port",
            "--nats-monitor-port",
            "--a2a-port",
            "--a2a-http-port",
            "--dashboard-port",
            "--extra-coordinator-port",  # base+11, base+12...
        )
    ):
        argv += [flag, str(base + (offset if offset < 4 else offset + 2))]  # agents take 3
    argv += ["--state-dir", str(state), "--certs-dir", str(root / "certs")]
    env = {k: v for k, v in os.environ.items() if not k.startswith("HIVEWIRE_")}
    with log.open("wb") as out:
        process = subprocess.Popen(
            argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, cwd=root
        )
    try:
        _wait_for(
            lambda: "mesh is running" in log.read_text() or process.poll() is not None,
            within=180,
            what="`mesh is running`",
            log=log,
        )
        assert process.poll() is None, log.read_text()
        endpoints = json.loads((state / "endpoints.json").read_text())
        yield RunningMesh(process=process, root=root, state_dir=state, log=log, endpoints=endpoints)
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGINT)
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
