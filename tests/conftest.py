"""Fixtures shared by the whole suite: PKIs, a real nats-server, grpcurl."""

from __future__ import annotations

import asyncio
import functools
import inspect
import signal
from collections.abc import AsyncIterator, Callable, Generator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc.aio
import pytest
import pytest_asyncio
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from hivewire.services.mesh import pki as pki_module
from hivewire.services.runtime.tls import TlsFiles
from tests.helpers import NatsServer, grpcurl_path
from tests.helpers import grpcurl as run_grpcurl

# grpc.aio shuts its completion-queue poller down when its last object is freed. A test
# that leaves one to the garbage collector (a channel held by a stub that outlives the
# test) has that shutdown run during interpreter finalization, where it fails and prints
# an empty "Error in sys.excepthook" as the run ends (grpcio 1.75; test_dashboard_shutdown
# showed it). Initialised here, aio holds one reference of its own for the process's life,
# so no shutdown runs at exit.
grpc.aio.init_grpc_aio()

# A suite started in the background by a non-interactive shell (`make test &`, nohup, some
# CI runners) inherits SIGINT ignored, and so does every process a test starts: a command
# that ignored SIGINT at start-up never turns Ctrl-C into KeyboardInterrupt. The tests that
# press Ctrl-C on a command need SIGINT as a terminal gives it.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

# pytest-timeout's signal raises its failure out of the event loop's select(): the test's
# coroutine is abandoned mid-``async with``, then pytest-asyncio cancels it together with
# every task its cleanup needs (NATS read loops, gRPC servers) and waits for them with no
# deadline left, so a hung test hung (or crashed) in teardown instead of failing. An
# async test therefore gets its own deadline inside the loop first, at this share of
# its pytest-timeout: the coroutine is cancelled where it waits, its cleanup runs with
# the mesh still alive, and it fails with a TimeoutError pointing at the wait.
_IN_LOOP_SHARE = 0.75


def _timeout_of(item: pytest.Item) -> float | None:
    """The item's pytest-timeout in seconds (its marker, else --timeout / the ini value)."""
    marker = item.get_closest_marker("timeout")
    if marker is not None:
        value = marker.args[0] if marker.args else marker.kwargs.get("timeout")
    else:
        value = item.config.getoption("timeout", None) or item.config.getini("timeout")
    seconds = float(value) if value not in (None, "") else 0.0
    return seconds if seconds > 0 else None


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Generator[None, None, None]:
    seconds = _timeout_of(item)
    test = getattr(item, "obj", None)
    # Plain coroutine tests only (a hypothesis test wraps its coroutine itself).
    if seconds is None or not pytest_asyncio.is_async_test(item):
        return (yield)
    if not inspect.iscoroutinefunction(test) or hasattr(test, "hypothesis"):
        return (yield)
    budget = seconds * _IN_LOOP_SHARE

    @functools.wraps(test)
    async def bounded(*args: Any, **kwargs: Any) -> Any:
        deadline = asyncio.timeout(budget)
        try:
            async with deadline:
                return await test(*args, **kwargs)
        except TimeoutError:
            if deadline.expired():
                pytest.fail(f"Timeout (>{budget:g}s in the event loop, of {seconds:g}s)")
            raise

    item.obj = bounded
    try:
        return (yield)
    finally:
        item.obj = test


@dataclass(frozen=True)
class Pki:
    """A PKI directory made by ``init_pki``: the CA and the default identities.

    Attributes:
        dir: The directory (``ca.pem``, ``<stem>.pem``, ``<stem>.key``).
    """

    dir: Path

    def files(self, stem: str) -> TlsFiles:
        """The CA, certificate and key of one identity (``coordinator``, ``client``...)."""
        files = TlsFiles.for_identity(self.dir, stem)
        if not files.cert.exists():
            raise LookupError(f"no certificate {files.cert}; issue it with pki.issue(...)")
        return files

    def issue(self, *, role: str, name: str, **kwargs: Any) -> TlsFiles:
        """Issue (or replace) an extra identity under this CA and return its files.

        Keyword arguments go to ``issue_cert`` (``stem``, ``not_before``,
        ``not_after``...). The directory is shared by the session: pick a unique stem.
        """
        kwargs.setdefault("force", True)
        issued = pki_module.issue_cert(self.dir, role=role, name=name, **kwargs)
        return TlsFiles(ca=issued.ca_path, cert=issued.cert_path, key=issued.key_path)

    def spiffe_id(self, stem: str) -> str:
        """The SPIFFE id carried by ``<stem>.pem``."""
        info = pki_module.describe_cert(self.dir / f"{stem}.pem")
        assert info.spiffe_id is not None
        return info.spiffe_id


# The tracer provider can be set once per process: in-process tests share this one
# (processes started by tests set up their own from OTEL_* variables).
class _GatedProcessor(SimpleSpanProcessor):
    """Keeps finished spans only while a test that asked for them runs."""

    recording = False

    def on_end(self, span: ReadableSpan) -> None:
        if self.recording:
            super().on_end(span)


_SPANS = InMemorySpanExporter()
_GATE = _GatedProcessor(_SPANS)
_PROVIDER = TracerProvider()
_PROVIDER.add_span_processor(_GATE)
trace.set_tracer_provider(_PROVIDER)


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    """The spans finished in this process while the test runs."""
    _SPANS.clear()
    _GATE.recording = True
    try:
        yield _SPANS
    finally:
        _GATE.recording = False
        _SPANS.clear()


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    """The mesh's development PKI, made once per session."""
    directory = tmp_path_factory.mktemp("pki") / "certs"
    pki_module.init_pki(directory)
    return Pki(dir=directory)


@pytest.fixture(scope="session")
def foreign_pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    """A second, unrelated CA with the same identities: the mesh must refuse all of them."""
    directory = tmp_path_factory.mktemp("foreign-pki") / "certs"
    pki_module.init_pki(directory)
    return Pki(dir=directory)


@pytest.fixture
async def nats_server(tmp_path: Path) -> AsyncIterator[NatsServer]:
    """A real nats-server with JetStream on 127.0.0.1, a fresh store per test."""
    server = NatsServer(tmp_path / "nats")
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


@pytest.fixture
async def mesh_nats_server(pki: Pki, tmp_path: Path) -> AsyncIterator[NatsServer]:
    """The mesh's nats-server as ``hivewire up`` runs it: mTLS with the session PKI and a
    permission set per identity (``url`` is ``tls://``; connect with ``client_options``).
    """
    async with NatsServer(tmp_path / "mesh-nats", certs_dir=pki.dir) as server:
        yield server


@pytest.fixture(scope="session")
def grpcurl() -> Callable[..., Any]:
    """The ``tests.helpers.grpcurl`` coroutine function, after checking the binary exists."""
    grpcurl_path()
    return run_grpcurl
