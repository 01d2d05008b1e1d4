"""Start hivewire processes, wait until each is serving, and stop them all cleanly.

Used by ``hivewire up`` (and the end-to-end tests). Each child is its own process
with its own port; it reports readiness by writing its ports file (the runtime's
``ServiceServer`` does that once it is SERVING). Children die with the launcher
(``PR_SET_PDEATHSIG``), so even a ``kill -9`` of ``hivewire up`` leaves no orphans.

:meth:`Launcher.stop_all` stops the children tier by tier (:class:`StopTier`): first the
clients (agents, gateways), then the core services they used while finishing their work
(coordinators, model, tool), then the server everything flushes its events and
deregisters through (nats-server). The children of one tier are stopped at once: SIGTERM
to each, then each is waited for within the grace period and killed if it outlives it.

:meth:`Launcher.supervise` watches the children: one started with a
:class:`RestartPolicy` (the coordinators) is started again when it dies, on the same
port with the same settings; a crash loop (too many restarts within the policy's
window) or the death of any other child ends the supervision with the reason.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import json
import logging
import os
import signal
import sys
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import IntEnum
from pathlib import Path
from typing import Any

from hivewire.services.base.lifecycle import StartStop

logger = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:  # pragma: no cover - runs in the child before exec
    """Own process group (a terminal's Ctrl-C reaches only the launcher, which stops the
    children in order), and SIGTERM from the kernel when the launcher dies (Linux).
    """
    os.setpgrp()
    with contextlib.suppress(Exception):
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


class LaunchError(RuntimeError):
    """A process exited or did not become ready in time."""


@dataclass(frozen=True)
class RestartPolicy:
    """When a child that died is started again instead of stopping the mesh.

    Attributes:
        max_restarts: Restarts allowed within ``window``; one more is a crash loop,
            which ends :meth:`Launcher.supervise` with the reason.
        window: Seconds over which restarts are counted.
        initial_delay: Seconds before the first restart; doubled for each restart
            still inside the window (a crashing process is not restarted in a hot loop).
        max_delay: Longest wait before a restart.
    """

    max_restarts: int = 5
    window: float = 60.0
    initial_delay: float = 0.2
    max_delay: float = 5.0


class StopTier(IntEnum):
    """When :meth:`Launcher.stop_all` stops a child: the highest tier first.

    A tier is stopped once every child of the tiers above it has ended, so a child can
    still use the ones below while it stops (an agent finishing a task within its grace
    period reports to the coordinator and calls the model; every service deregisters and
    flushes its events through NATS).
    """

    SERVER = 0
    """What every other process uses until its last moment (nats-server)."""
    CORE = 1
    """Services that clients use while they stop (coordinators, model, tool, NATS guard)."""
    CLIENT = 2
    """Processes nothing else depends on (agents, gateways, dashboard); the default."""


@dataclass(frozen=True)
class ProcessSpec:
    """How to start one mesh process.

    Attributes:
        name: Short name shown to people, e.g. "coordinator".
        argv: The command line.
        env: Extra environment on top of the launcher's own.
        ports_file: Where the process writes its ports once serving; None means the
            process is ready as soon as ``ready_check`` passes.
        log_file: Where stdout and stderr go.
        ready_timeout: Seconds to wait for readiness.
        restart: Start it again when it dies (None: its death stops the supervision).
        stop_tier: When :meth:`Launcher.stop_all` stops it (:class:`StopTier`).
    """

    name: str
    argv: Sequence[str]
    log_file: Path
    env: Mapping[str, str] = field(default_factory=dict)
    ports_file: Path | None = None
    ready_timeout: float = 60.0
    restart: RestartPolicy | None = None
    stop_tier: StopTier = StopTier.CLIENT


@dataclass
class ManagedProcess:
    """A started process and what it reported."""

    spec: ProcessSpec
    process: asyncio.subprocess.Process
    ports: dict[str, Any] = field(default_factory=dict)

    @property
    def pid(self) -> int:
        """The process id."""
        return self.process.pid

    @property
    def running(self) -> bool:
        """Whether the process is still alive."""
        return self.process.returncode is None

    def log_tail(self, lines: int = 20) -> str:
        """Return the last lines of the process's log, for error messages."""
        try:
            text = self.spec.log_file.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])


def read_ports_file(path: Path) -> dict[str, Any] | None:
    """The ports a process reported, or None while it has not written them yet.

    The runtime's ``ServiceServer`` writes the file atomically once it is SERVING:
    ``{"grpc": port, "metrics": port | null, "address": "host:port", "pid": pid}``.
    """
    try:
        data: dict[str, Any] = json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    return data


def python_module(module: str, *args: str) -> list[str]:
    """Return the argv running ``python -m module args`` with this interpreter."""
    return [sys.executable, "-m", module, *args]


RestartHook = Callable[[ManagedProcess, ManagedProcess], None]
"""Called with (the child that died, its replacement) once the replacement is ready."""


class Launcher(StartStop):
    """Owns a set of child processes; stops them tier by tier on exit (:class:`StopTier`)."""

    _ENTER = ""  # ready once built: start() starts one child, with its spec
    _LEAVE = "stop_all"

    def __init__(self, *, grace_period: float = 10.0) -> None:
        self._grace = grace_period
        self._children: list[ManagedProcess] = []
        self._restarts: dict[str, deque[float]] = {}

    @property
    def children(self) -> list[ManagedProcess]:
        """The processes started so far, in start order."""
        return list(self._children)

    async def start(self, spec: ProcessSpec) -> ManagedProcess:
        """Start a process and wait until it is ready.

        Raises:
            LaunchError: It exited early or was not ready within ``ready_timeout``;
                the message carries the end of its log.
        """
        return await self._spawn(spec, len(self._children))

    async def _spawn(self, spec: ProcessSpec, index: int) -> ManagedProcess:
        """Start ``spec`` at ``index`` of the start order (a restart keeps its place)."""
        if spec.ports_file is not None:
            with contextlib.suppress(FileNotFoundError):
                spec.ports_file.unlink()
        spec.log_file.parent.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, **spec.env}
        with spec.log_file.open("ab") as log:
            process = await asyncio.create_subprocess_exec(
                *spec.argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=log,
                stderr=asyncio.subprocess.STDOUT,
                env=env,
                preexec_fn=_die_with_parent,
            )
        child = ManagedProcess(spec=spec, process=process)
        self._children.insert(index, child)
        logger.debug("started %s (pid %d): %s", spec.name, process.pid, " ".join(spec.argv))
        if spec.ports_file is not None:
            child.ports = await self._wait_for_ports(child)
        return child

    async def _wait_for_ports(self, child: ManagedProcess) -> dict[str, Any]:
        assert child.spec.ports_file is not None
        deadline = time.monotonic() + child.spec.ready_timeout
        delay = 0.02
        while True:
            if not child.running:
                raise LaunchError(
                    f"{child.spec.name} exited with code {child.process.returncode} before it"
                    f" was ready; last log lines:\n{child.log_tail()}"
                )
            ports = read_ports_file(child.spec.ports_file)
            if ports is not None:
                return ports
            if time.monotonic() > deadline:
                raise LaunchError(
                    f"{child.spec.name} was not ready after {child.spec.ready_timeout:.0f}s;"
                    f" last log lines:\n{child.log_tail()}"
                )
            await asyncio.sleep(delay)
            delay = min(delay * 1.5, 0.25)

    async def supervise(self, *, on_restart: RestartHook | None = None) -> str:
        """Watch the children until one stops for good; return why, in one sentence.

        A child with a :class:`RestartPolicy` that dies is started again (same spec:
        same port, same settings) after a short delay, unless it already restarted
        ``max_restarts`` times within the policy's window: that crash loop ends the
        supervision. Any other child that dies ends it at once. Cancel the call to
        stop watching (the children keep running until :meth:`stop_all`).

        Args:
            on_restart: Called with the dead child and its ready replacement.
        """
        while True:
            children = self.children
            if not children:
                return "no process left to supervise"
            waits = {asyncio.ensure_future(c.process.wait()): c for c in children}
            try:
                done, _ = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for fut in waits:
                    fut.cancel()
            dead = [waits[fut] for fut in done]
            for child in dead:
                reason = await self._restart_or_give_up(child, on_restart)
                if reason is not None:
                    return reason

    async def _restart_or_give_up(
        self, child: ManagedProcess, on_restart: RestartHook | None
    ) -> str | None:
        """Restart a dead child; return the reason to stop instead, if any."""
        spec, code = child.spec, child.process.returncode
        policy = spec.restart
        if policy is None:
            return f"{spec.name} (exit {code}) exited unexpectedly"
        now = time.monotonic()
        recent = self._restarts.setdefault(spec.name, deque())
        while recent and now - recent[0] > policy.window:
            recent.popleft()
        if len(recent) >= policy.max_restarts:
            return (
                f"{spec.name} is crash-looping: it died {len(recent) + 1} times within"
                f" {policy.window:.0f}s (last exit {code}); last log lines:\n{child.log_tail()}"
            )
        delay = min(policy.initial_delay * 2 ** len(recent), policy.max_delay)
        recent.append(now)
        logger.warning(
            "%s (pid %d) exited with %s; restarting it in %.1fs (%d of %d within %.0fs)",
            spec.name, child.pid, code, delay, len(recent), policy.max_restarts, policy.window,
        )  # fmt: skip
        index = self._children.index(child) if child in self._children else len(self._children)
        with contextlib.suppress(ValueError):
            self._children.remove(child)
        await asyncio.sleep(delay)
        try:
            replacement = await self._spawn(spec, index)
        except LaunchError as exc:
            # Counted like any death: the next round restarts it again or gives up.
            logger.warning("restarting %s failed: %s", spec.name, exc)
            return None
        logger.warning("%s restarted (pid %d)", spec.name, replacement.pid)
        if on_restart is not None:
            on_restart(child, replacement)
        return None

    async def stop(self, child: ManagedProcess, *, grace: float | None = None) -> int | None:
        """SIGTERM a child, wait for it within the grace period, then SIGKILL it."""
        (code,) = await self._stop_together([child], grace=grace)
        return code

    async def stop_all(self) -> None:
        """Stop every child, tier by tier, the children of one tier at once (:class:`StopTier`).

        Each child's exit status is logged; one that outlives the grace period is killed.
        """
        for tier in sorted({c.spec.stop_tier for c in self._children}, reverse=True):
            await self._stop_together([c for c in self._children if c.spec.stop_tier == tier])

    async def _stop_together(
        self, children: Sequence[ManagedProcess], *, grace: float | None = None
    ) -> list[int | None]:
        """SIGTERM every child, then wait for each within the grace period (SIGKILL after)."""
        for child in children:
            if child.running:
                with contextlib.suppress(ProcessLookupError):
                    child.process.send_signal(signal.SIGTERM)
        codes = await asyncio.gather(*(self._reap(c, grace or self._grace) for c in children))
        for child in children:
            with contextlib.suppress(ValueError):
                self._children.remove(child)
        return list(codes)

    async def _reap(self, child: ManagedProcess, grace: float) -> int | None:
        """Wait for a signalled child to end, killing it after ``grace`` seconds."""
        try:
            await asyncio.wait_for(child.process.wait(), grace)
        except TimeoutError:
            logger.warning(
                "%s (pid %d) did not stop within its grace period (%.0fs); killing it",
                child.spec.name, child.pid, grace,
            )  # fmt: skip
            with contextlib.suppress(ProcessLookupError):
                child.process.kill()
            await child.process.wait()
        code = child.process.returncode
        logger.info("%s (pid %d) stopped: %s", child.spec.name, child.pid, _exit_status(code))
        return code


def _exit_status(code: int | None) -> str:
    """``exit 0``, ``exit 3``, or ``killed by SIGTERM`` for a negative return code."""
    if code is not None and code < 0:
        with contextlib.suppress(ValueError):
            return f"killed by {signal.Signals(-code).name}"
    return f"exit {code}"
