"""Opening the embedded registry: a refused NATS fails a one-shot reader at once.

``hivewire --address discovery`` reads the registry with ``fail_fast``: when nothing
listens at the NATS URL it ends with a one-line error instead of waiting out its registry
timeout. A server that is up but slow to answer is still waited for, and a service (no
``fail_fast``) keeps waiting for NATS to come up, as it always did.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from hivewire.discovery.embedded import EmbeddedRegistry
from hivewire.services.base.lifecycle import cancel_and_wait
from tests.conftest import Pki
from tests.helpers import NatsServer, dead_address, eventually, reserved_port

pytestmark = pytest.mark.timeout(60)

HIVEWIRE = str(Path(sys.executable).parent / "hivewire")


async def _cli_discovery(pki: Pki, nats_url: str) -> tuple[int, str]:
    """``hivewire tasks --address discovery`` on ``nats_url``: exit status and stderr."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("HIVEWIRE_")}
    env |= {
        "HIVEWIRE_CERTS_DIR": str(pki.dir),
        "HIVEWIRE_NATS_URL": nats_url,
        "HIVEWIRE_DISCOVERY": "nats",
    }
    proc = await asyncio.create_subprocess_exec(
        HIVEWIRE,
        "tasks",
        "--address",
        "discovery",
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env,
    )
    _, err = await proc.communicate()
    assert proc.returncode is not None
    return proc.returncode, err.decode()


async def test_the_cli_says_at_once_that_nats_refused_the_connection(pki: Pki) -> None:
    with dead_address() as dead:
        code, err = await _cli_discovery(pki, f"nats://{dead}")
    assert code == 6, err
    assert err == (
        f"Error: cannot read the registry (nats): connection refused to nats://{dead}"
        " (is NATS running there?)\n"
    )
    # Several servers: it fails once every one of them has refused.
    with dead_address() as first, dead_address() as second:
        code, err = await _cli_discovery(pki, f"nats://{first},nats://{second}")
    assert code == 6, err
    assert err == (
        f"Error: cannot read the registry (nats): connection refused to nats://{first},"
        f" nats://{second} (is NATS running there?)\n"
    )


async def test_the_cli_shows_no_password_of_the_nats_url(pki: Pki) -> None:
    with dead_address() as dead:
        code, err = await _cli_discovery(pki, f"nats://someone:s3cret@{dead}")
    assert code == 6, err
    assert f"connection refused to nats://{dead} " in err, err
    assert "s3cret" not in err and "someone" not in err, err


class _SlowFront:
    """A TCP front for a server: it accepts at once but says nothing until opened.

    A client connecting meanwhile waits for the server's greeting and gives up after its
    connect timeout; once :meth:`open` is called, every held and new connection is
    relayed to the server behind.
    """

    def __init__(self, upstream_port: int) -> None:
        self._upstream_port = upstream_port
        self._opened = asyncio.Event()
        self._accepted = 0
        self._changed = asyncio.Condition()
        self._handlers: set[asyncio.Task[None]] = set()
        self._server: asyncio.Server | None = None

    @property
    def url(self) -> str:
        assert self._server is not None
        return f"nats://127.0.0.1:{self._server.sockets[0].getsockname()[1]}"

    async def __aenter__(self) -> _SlowFront:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        await cancel_and_wait(list(self._handlers))
        await self._server.wait_closed()

    def open(self) -> None:
        """From now on, relay to the server."""
        self._opened.set()

    async def accepted(self, count: int) -> None:
        """Wait until ``count`` connections have been accepted."""
        async with self._changed:
            await self._changed.wait_for(lambda: self._accepted >= count)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        async with self._changed:
            self._accepted += 1
            self._changed.notify_all()
        try:
            client_gone = asyncio.ensure_future(reader.read(1))  # a NATS client waits first
            opened = asyncio.ensure_future(self._opened.wait())
            await asyncio.wait([client_gone, opened], return_when=asyncio.FIRST_COMPLETED)
            if client_gone.done():
                opened.cancel()
                return  # it gave up waiting for the greeting
            await cancel_and_wait([client_gone])
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self._upstream_port)
            try:
                with contextlib.suppress(ConnectionError):  # either side hung up
                    await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer))
            finally:
                up_writer.close()
        finally:
            writer.close()
            self._handlers.discard(task)


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while data := await reader.read(65536):
        writer.write(data)
        await writer.drain()
    with contextlib.suppress(OSError):
        writer.write_eof()


@pytest.fixture
async def slow_front(nats_server: NatsServer) -> AsyncIterator[_SlowFront]:
    async with _SlowFront(nats_server.port) as front:
        yield front


async def test_a_server_that_is_up_but_slow_is_still_waited_for(slow_front: _SlowFront) -> None:
    registry = EmbeddedRegistry(
        slow_front.url, fail_fast=True, request_timeout=3.0, reconnect_wait=0.05
    )
    starting = asyncio.create_task(registry.start())
    second = asyncio.ensure_future(slow_front.accepted(2))
    try:
        # The first attempt timed out waiting for the greeting and the client tried again:
        # a timeout is no refusal, so the registry has not given up.
        await asyncio.wait([second, starting], timeout=30, return_when=asyncio.FIRST_COMPLETED)
        assert not starting.done(), f"gave up on a slow server: {starting.exception()!r}"
        assert second.done()
        slow_front.open()
        await asyncio.wait_for(starting, 30)
        assert await registry.resolve("hivewire-coordinator") == []
    finally:
        await cancel_and_wait([starting, second], suppress=(Exception,))
        await registry.close()


async def test_a_service_registry_waits_for_nats_to_come_up(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    port = reserved_port()
    registry = EmbeddedRegistry(f"nats://127.0.0.1:{port}", reconnect_wait=0.05)
    caplog.set_level(logging.DEBUG, logger="hivewire.discovery.embedded")
    starting = asyncio.create_task(registry.start())
    try:

        def refused() -> None:
            assert any("Connect call failed" in r.getMessage() for r in caplog.records)

        await eventually(refused, timeout=30)
        assert not starting.done()
        async with NatsServer(tmp_path / "nats", port=port):
            await asyncio.wait_for(starting, 30)
            assert await registry.resolve("hivewire-coordinator") == []
            await registry.close()
    finally:
        await cancel_and_wait([starting], suppress=(Exception,))
        await registry.close()
