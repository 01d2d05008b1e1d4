"""Run `hivewire up` as a real subprocess on free ports, the way a user runs `make run`."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hivewire.services.runtime.tls import TlsFiles
from tests.helpers import free_port

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
    for flag in (
        "--coordinator-port",
        "--model-port",
        "--tool-port",
        "--nats-port",
        "--nats-monitor-port",
        "--first-agent-port",
    ):
        argv += [flag, str(free_port())]
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
