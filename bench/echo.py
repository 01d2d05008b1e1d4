"""The baseline: a bare grpc.aio echo server and client over mTLS.

Everything else is reported as a ratio to these numbers, measured in the same run on
the same machine. The server is its own process (as every mesh service is), so a call
crosses the loopback and two event loops exactly like a mesh hop.

Three phases:

* ``unary c=1``: one call at a time (round-trip latency of one hop);
* ``unary c=N``: N calls in flight (the hop's capacity);
* ``ping-pong``: a message and its echo on one already-open bidirectional stream.

Only the standard library, grpcio and protobuf are imported at module level, so
:mod:`bench.grpcio_versions` can run this file under other grpcio releases::

    python -m bench.echo run --certs DIR [--quick] [--json]
    python -m bench.echo serve --certs DIR [--variant bare|runtime]
    python -m bench.echo serve --certs DIR --variant relay --upstream HOST:PORT

The ``relay`` variant is the bare 2-hop chain's middle: a bare server whose ``Echo``
forwards each call to an upstream echo server over a bare mTLS channel and answers
with its reply (client -> relay -> echo, what a mesh task's two hops are compared to).

The ``runtime`` variants (hivewire's ``ServiceServer`` and ``secure_channel``) import
hivewire lazily; :mod:`bench.interceptors` uses them.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import sys
from collections.abc import AsyncIterator, Callable, Coroutine, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from google.protobuf import __version__ as protobuf_version
from google.protobuf.wrappers_pb2 import BytesValue

from bench.common import (
    DEFAULT,
    PHASE_HEADERS,
    QUICK,
    ROOT,
    Durations,
    Phase,
    closed_loop,
    median_phase,
    phase_row,
    table,
)

SERVICE = "hivewire.bench.v1.EchoService"
UNARY = f"/{SERVICE}/Echo"
PING_PONG = f"/{SERVICE}/PingPong"
PAYLOAD = BytesValue(value=b"x" * 128)
"""A small message, about the size of a task event."""

CONCURRENCY = 16
"""Calls in flight in the capacity phase."""

SERVER_STEM = "coordinator"
CLIENT_STEM = "client"


@dataclass(frozen=True)
class CertFiles:
    """CA, certificate and key of one identity (PEM files)."""

    ca: Path
    cert: Path
    key: Path

    @classmethod
    def in_dir(cls, certs: Path, stem: str) -> CertFiles:
        """``<certs>/ca.pem``, ``<certs>/<stem>.pem`` and ``<certs>/<stem>.key``."""
        return cls(certs / "ca.pem", certs / f"{stem}.pem", certs / f"{stem}.key")

    def read(self) -> tuple[bytes, bytes, bytes]:
        """(ca, cert, key) bytes."""
        return self.ca.read_bytes(), self.cert.read_bytes(), self.key.read_bytes()


# --- server -----------------------------------------------------------------------------


def echo_handler() -> grpc.GenericRpcHandler:
    """The echo service: ``Echo`` returns its request, ``PingPong`` echoes each message."""

    async def echo(request: BytesValue, context: Any) -> BytesValue:
        return request

    async def ping_pong(requests: AsyncIterator[BytesValue], context: Any) -> Any:
        async for request in requests:
            yield request

    return grpc.method_handlers_generic_handler(
        SERVICE,
        {
            "Echo": grpc.unary_unary_rpc_method_handler(
                echo,
                request_deserializer=BytesValue.FromString,
                response_serializer=BytesValue.SerializeToString,
            ),
            "PingPong": grpc.stream_stream_rpc_method_handler(
                ping_pong,
                request_deserializer=BytesValue.FromString,
                response_serializer=BytesValue.SerializeToString,
            ),
        },
    )


async def wait_for_parent() -> None:
    """Return when stdin closes (the parent ended) or SIGTERM/SIGINT arrives."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)

    async def eof() -> None:
        await reader.read()
        stop.set()

    watcher = asyncio.create_task(eof())
    await stop.wait()
    watcher.cancel()


def announce(port: int) -> None:
    line = {"port": port, "pid": os.getpid(), "grpcio": grpc.__version__}
    sys.stdout.write(json.dumps(line) + "\n")
    sys.stdout.flush()


def server_credentials(certs: Path) -> grpc.ServerCredentials:
    """The benchmark servers' mTLS: the ``coordinator`` identity, client certificates required."""
    ca, cert, key = CertFiles.in_dir(certs, SERVER_STEM).read()
    return grpc.ssl_server_credentials(
        [(key, cert)], root_certificates=ca, require_client_auth=True
    )


async def serve_bare(certs: Path) -> None:
    """A plain ``grpc.aio.server()``: no interceptors, no options, static mTLS credentials."""
    creds = server_credentials(certs)
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((echo_handler(),))
    port = server.add_secure_port("127.0.0.1:0", creds)
    await server.start()
    announce(port)
    await wait_for_parent()
    await server.stop(0)


async def serve_relay(certs: Path, upstream: str) -> None:
    """A bare server whose ``Echo`` forwards each call to ``upstream`` (the chain's middle hop)."""
    channel = open_channel(upstream, certs)
    forward = channel.unary_unary(
        UNARY,
        request_serializer=BytesValue.SerializeToString,
        response_deserializer=BytesValue.FromString,
    )

    async def echo(request: BytesValue, context: Any) -> BytesValue:
        reply: BytesValue = await forward(request)
        return reply

    handler = grpc.method_handlers_generic_handler(
        SERVICE,
        {
            "Echo": grpc.unary_unary_rpc_method_handler(
                echo,
                request_deserializer=BytesValue.FromString,
                response_serializer=BytesValue.SerializeToString,
            )
        },
    )
    creds = server_credentials(certs)
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((handler,))
    port = server.add_secure_port("127.0.0.1:0", creds)
    await server.start()
    await forward(PAYLOAD, timeout=30, wait_for_ready=True)
    announce(port)
    await wait_for_parent()
    await server.stop(0)
    await channel.close()


async def serve_runtime(certs: Path) -> None:
    """The same service hosted by hivewire's ``ServiceServer`` (interceptors, health...)."""
    import logging

    from hivewire.services.runtime.authz import (
        DEFAULT_POLICY,
        AuthzPolicy,
        AuthzPolicyStore,
        AuthzRule,
    )
    from hivewire.services.runtime.config import load_settings
    from hivewire.services.runtime.server import ServiceBinding, ServiceServer

    logging.basicConfig(level=logging.WARNING)
    settings = load_settings(
        host="127.0.0.1",
        port=0,
        certs_dir=certs,
        identity=SERVER_STEM,
        grace_period=0.0,
        log_level="WARNING",
    )
    binding = ServiceBinding(SERVICE, lambda s: s.add_generic_rpc_handlers((echo_handler(),)))
    # The mesh's policy plus one rule for the echo service, so calls pay the real check.
    echo_rule = AuthzRule(callers=("spiffe://hivewire.local/client/*",), allow=(f"{SERVICE}/*",))
    policy = AuthzPolicy((*DEFAULT_POLICY.rules, echo_rule), source="bench")
    authz = AuthzPolicyStore(policy=policy)
    async with ServiceServer(settings, [binding], authz=authz) as server:
        announce(server.port)
        await wait_for_parent()


# --- client -----------------------------------------------------------------------------


def open_channel(target: str, certs: Path, *, variant: str = "bare") -> grpc.aio.Channel:
    """A client channel: ``bare`` grpc.aio, or ``runtime`` (hivewire's ``secure_channel``)."""
    if variant == "runtime":
        from hivewire.services.runtime.channels import secure_channel
        from hivewire.services.runtime.tls import TlsFiles

        return secure_channel(target, TlsFiles.for_identity(certs, CLIENT_STEM))
    ca, cert, key = CertFiles.in_dir(certs, CLIENT_STEM).read()
    return grpc.aio.secure_channel(target, grpc.ssl_channel_credentials(ca, key, cert))


@dataclass
class ServerProcess:
    """A running benchmark server process (it printed its port and pid as JSON)."""

    process: asyncio.subprocess.Process
    port: int
    grpcio: str

    @property
    def pid(self) -> int:
        """The server's process id."""
        return self.process.pid

    @property
    def target(self) -> str:
        """``127.0.0.1:<port>``."""
        return f"127.0.0.1:{self.port}"


@contextlib.asynccontextmanager
async def serve_process(
    module: str, args: Sequence[str], *, python: str = sys.executable
) -> AsyncIterator[ServerProcess]:
    """Start ``python -m <module> <args>`` and stop it when the block ends.

    The process announces itself (:func:`announce`) and lives until its stdin closes
    (:func:`wait_for_parent`).
    """
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    process = await asyncio.create_subprocess_exec(
        python,
        "-m",
        module,
        *args,
        cwd=ROOT,
        env=env,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
    )
    try:
        assert process.stdout is not None
        async with asyncio.timeout(60):
            line = await process.stdout.readline()
        if not line:
            raise RuntimeError(f"{module} {' '.join(args)} exited with {await process.wait()}")
        info = json.loads(line)
        yield ServerProcess(process, int(info["port"]), str(info["grpcio"]))
    finally:
        if process.stdin is not None:
            process.stdin.close()
        try:
            async with asyncio.timeout(10):
                await process.wait()
        except TimeoutError:
            process.kill()
            await process.wait()


@contextlib.asynccontextmanager
async def echo_server(
    certs: Path, *, variant: str = "bare", python: str = sys.executable, upstream: str = ""
) -> AsyncIterator[ServerProcess]:
    """Start ``python -m bench.echo serve`` and stop it when the block ends.

    Args:
        certs: The PKI directory.
        variant: ``bare``, ``runtime`` or ``relay`` (which needs ``upstream``).
        python: The interpreter.
        upstream: ``host:port`` of the echo server a relay forwards to.
    """
    args = ["serve", "--certs", str(certs), "--variant", variant]
    if upstream:
        args += ["--upstream", upstream]
    async with serve_process("bench.echo", args, python=python) as server:
        yield server


async def unary_phases(
    channel: grpc.aio.Channel,
    *,
    durations: Durations,
    pids: dict[str, int],
    concurrency: int = CONCURRENCY,
    label: str = "unary",
) -> list[Phase]:
    """``<label> c=1`` and ``<label> c=<concurrency>`` on an open channel."""
    call = channel.unary_unary(
        UNARY,
        request_serializer=BytesValue.SerializeToString,
        response_deserializer=BytesValue.FromString,
    )
    await call(PAYLOAD, timeout=30, wait_for_ready=True)

    async def op() -> None:
        await call(PAYLOAD)

    return [
        await closed_loop(f"{label} c=1", op, concurrency=1, durations=durations, pids=pids),
        await closed_loop(
            f"{label} c={concurrency}", op, concurrency=concurrency, durations=durations, pids=pids
        ),
    ]


async def ping_pong_phase(
    channel: grpc.aio.Channel, *, durations: Durations, pids: dict[str, int]
) -> Phase:
    """Round trips of one message on one open bidirectional stream."""
    stream = channel.stream_stream(
        PING_PONG,
        request_serializer=BytesValue.SerializeToString,
        response_deserializer=BytesValue.FromString,
    )
    call = stream()

    async def op() -> None:
        await call.write(PAYLOAD)
        await call.read()

    try:
        await op()
        return await closed_loop("ping-pong", op, concurrency=1, durations=durations, pids=pids)
    finally:
        await call.done_writing()
        with contextlib.suppress(grpc.aio.AioRpcError):
            while await call.read() is not grpc.aio.EOF:
                pass


async def measure(
    certs: Path, *, durations: Durations, python: str = sys.executable
) -> dict[str, Any]:
    """The echo baseline: every phase, ``durations.rounds`` times, medians kept.

    Each round starts a fresh server process, so one unlucky placement on a core does
    not colour every round.

    Returns:
        ``{"grpcio": ..., "protobuf": ..., "phases": {name: Phase}}``.
    """
    rounds: dict[str, list[Phase]] = {}
    version = ""
    for _ in range(durations.rounds):
        async with echo_server(certs, python=python) as server:
            version = server.grpcio
            pids = {"server": server.pid}
            channel = open_channel(server.target, certs)
            try:
                phases = await unary_phases(channel, durations=durations, pids=pids)
                phases.append(await ping_pong_phase(channel, durations=durations, pids=pids))
            finally:
                await channel.close()
        for phase in phases:
            rounds.setdefault(phase.name, []).append(phase)
    return {
        "grpcio": version,
        "protobuf": protobuf_version,
        "phases": {name: median_phase(ph) for name, ph in rounds.items()},
    }


def report(result: dict[str, Any]) -> str:
    """The baseline as a table."""
    phases: dict[str, Phase] = result["phases"]
    rows = [phase_row(p, procs=("client", "server")) for p in phases.values()]
    title = (
        f"echo baseline (bare grpc.aio over mTLS; grpcio {result['grpcio']}, "
        f"protobuf {result['protobuf']})"
    )
    headers = [*PHASE_HEADERS, "client CPU µs/op", "server CPU µs/op", "total CPU µs/op"]
    return table(title, headers, rows)


def _run_with_certs(certs: Path | None, durations: Durations) -> dict[str, Any]:
    if certs is not None:
        return asyncio.run(measure(certs, durations=durations))
    # Only reached in the main environment: hivewire makes the PKI.
    import tempfile

    from hivewire.services.mesh.pki import init_pki

    with tempfile.TemporaryDirectory(prefix="hivewire-bench-certs-") as tmp:
        init_pki(Path(tmp))
        return asyncio.run(measure(Path(tmp), durations=durations))


def main(argv: Sequence[str] | None = None) -> None:
    """``run`` (measure and print) or ``serve`` (one server process)."""
    parser = argparse.ArgumentParser(prog="python -m bench.echo", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run one echo server; prints its port as JSON")
    serve.add_argument("--certs", type=Path, required=True)
    serve.add_argument("--variant", choices=("bare", "runtime", "relay"), default="bare")
    serve.add_argument("--upstream", help="host:port of the echo server a relay forwards to")
    run = sub.add_parser("run", help="measure the baseline")
    run.add_argument("--certs", type=Path, help="PKI directory (default: a new one)")
    run.add_argument("--quick", action="store_true", help="short phases, one round")
    run.add_argument("--rounds", type=int, help="override the number of rounds")
    run.add_argument("--measure", type=float, help="override the measured seconds per phase")
    run.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args(argv)
    if args.command == "serve":
        if args.variant == "relay":
            if not args.upstream:
                parser.error("--variant relay needs --upstream")
            asyncio.run(serve_relay(args.certs, args.upstream))
            return
        runner: Callable[[Path], Coroutine[Any, Any, None]] = (
            serve_runtime if args.variant == "runtime" else serve_bare
        )
        asyncio.run(runner(args.certs))
        return
    durations = QUICK if args.quick else DEFAULT
    if args.rounds or args.measure:
        durations = Durations(
            warmup=durations.warmup,
            measure=args.measure or durations.measure,
            rounds=args.rounds or durations.rounds,
        )
    result = _run_with_certs(args.certs, durations)
    if args.json:
        phases = {k: v.to_dict() for k, v in result["phases"].items()}
        sys.stdout.write(json.dumps({**result, "phases": phases}) + "\n")
    else:
        sys.stdout.write(report(result) + "\n")


if __name__ == "__main__":
    main()
