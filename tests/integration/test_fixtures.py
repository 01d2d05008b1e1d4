"""The shared test machinery works: eventually, nats-server, grpcurl, ServiceProcess, pki."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import textwrap
from pathlib import Path

import httpx
import nats
import pytest
from nats.js.api import StreamConfig

from tests.conftest import Pki
from tests.helpers import NatsServer, ServiceProcess, eventually, grpcurl_path, reserved_port

# -- eventually ------------------------------------------------------------------------


async def test_eventually_returns_once_a_sync_predicate_holds() -> None:
    calls = 0

    def third_time() -> int | bool:
        nonlocal calls
        calls += 1
        return calls if calls >= 3 else False

    assert await eventually(third_time, timeout=5) == 3


async def test_eventually_awaits_async_assertions() -> None:
    box: list[int] = []

    async def check() -> None:
        box.append(1)
        assert len(box) >= 2

    assert await eventually(check, timeout=5) is None
    assert len(box) == 2


async def test_eventually_reraises_the_last_assertion_after_the_deadline() -> None:
    state = {"value": 1}

    def never() -> None:
        assert state["value"] == 2, "still wrong"

    with pytest.raises(AssertionError, match="still wrong") as info:
        await eventually(never, timeout=0.1)
    assert any("still failing" in note for note in info.value.__notes__)


async def test_eventually_names_a_predicate_that_stayed_false() -> None:
    def never_true() -> bool:
        return False

    with pytest.raises(AssertionError, match="never_true still False"):
        await eventually(never_true, timeout=0.1)


async def test_eventually_propagates_unexpected_errors_at_once() -> None:
    calls = 0

    def broken() -> None:
        nonlocal calls
        calls += 1
        raise KeyError("boom")

    with pytest.raises(KeyError):
        await eventually(broken, timeout=5)
    assert calls == 1


async def test_eventually_bounds_a_check_that_hangs() -> None:
    never = asyncio.Event()

    async def hangs() -> None:
        await never.wait()

    with pytest.raises(AssertionError, match="TimeoutError"):
        await eventually(hangs, timeout=0.2)


# -- nats-server -----------------------------------------------------------------------


async def test_nats_server_pub_sub_and_jetstream(nats_server: NatsServer) -> None:
    assert nats_server.url == f"nats://127.0.0.1:{nats_server.port}"
    nc = await nats.connect(nats_server.url)
    try:
        sub = await nc.subscribe("hivewire.test.ping")
        await nc.publish("hivewire.test.ping", b"hello", headers={"X-Correlation-Id": "c1"})
        msg = await sub.next_msg(timeout=5)
        assert msg.data == b"hello"
        assert msg.headers == {"X-Correlation-Id": "c1"}

        js = nc.jetstream()
        info = await js.account_info()
        assert info.streams == 0
        await js.add_stream(StreamConfig(name="EV", subjects=["hivewire.events.>"]))
        ack = await js.publish("hivewire.events.task.created", b"e1")
        assert (ack.stream, ack.seq) == ("EV", 1)
        stored = await js.get_msg("EV", 1)
        assert stored.data == b"e1"
    finally:
        await nc.close()


async def test_nats_server_restart_keeps_port_and_store(tmp_path: Path) -> None:
    async with NatsServer(tmp_path / "nats") as server:
        port, url, first_pid = server.port, server.url, server.pid
        nc = await nats.connect(url)
        js = nc.jetstream()
        await js.add_stream(StreamConfig(name="EV", subjects=["ev.>"]))
        await js.publish("ev.a", b"kept")
        await nc.close()

        await server.restart()
        assert (server.port, server.url) == (port, url)
        assert server.pid not in (None, first_pid)

        await server.restart(kill=True)
        assert server.port == port
        nc = await nats.connect(server.url)
        try:
            js = nc.jetstream()
            assert (await js.stream_info("EV")).state.messages == 1
            assert (await js.get_msg("EV", 1)).data == b"kept"
        finally:
            await nc.close()
    assert not server.running


async def test_nats_server_on_a_chosen_port_with_sync_always(tmp_path: Path) -> None:
    port = reserved_port()
    async with NatsServer(tmp_path / "nats", port=port, sync_interval="always") as server:
        assert server.port == port
        async with httpx.AsyncClient() as client:
            varz = (await client.get(f"{server.monitor_url}/varz")).json()
        assert varz["jetstream"]["config"]["sync_always"] is True


async def test_nats_server_start_failure_shows_the_log(tmp_path: Path) -> None:
    server = NatsServer(tmp_path / "nats", extra_args=["--no-such-flag"])
    with pytest.raises((RuntimeError, AssertionError), match="nats-server exited"):
        await server.start(timeout=10)
    assert not server.running


async def test_nats_client_sees_the_outage_and_reconnects(nats_server: NatsServer) -> None:
    reconnected = asyncio.Event()

    async def on_reconnect() -> None:
        reconnected.set()

    nc = await nats.connect(nats_server.url, reconnected_cb=on_reconnect, reconnect_time_wait=0.05)
    try:
        await nats_server.kill()
        await nats_server.start()
        async with asyncio.timeout(20):
            await reconnected.wait()
        sub = await nc.subscribe("after")
        await nc.publish("after", b"x")
        assert (await sub.next_msg(timeout=5)).data == b"x"
    finally:
        await nc.close()


# -- grpcurl ---------------------------------------------------------------------------


async def test_grpcurl_binary_runs() -> None:
    proc = await asyncio.create_subprocess_exec(
        grpcurl_path(),
        "-version",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await proc.communicate()
    assert proc.returncode == 0
    assert out.decode().startswith("grpcurl v1.")


# -- ServiceProcess --------------------------------------------------------------------

FAKE_SERVICE = textwrap.dedent(
    """
    import json, os, signal, socket, sys
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})  # sigwait below receives it
    sock = socket.socket()
    sock.bind(("127.0.0.1", int(os.environ["HIVEWIRE_PORT"])))
    sock.listen()
    port = sock.getsockname()[1]
    print("env", json.dumps({k: v for k, v in os.environ.items() if k.startswith("HIVEWIRE_")}))
    print("stderr line", file=sys.stderr, flush=True)
    path = os.environ["HIVEWIRE_PORTS_FILE"]
    with open(path + ".tmp", "w") as f:
        json.dump({"grpc": port, "metrics": None, "address": f"127.0.0.1:{port}",
                   "pid": os.getpid()}, f)
    os.replace(path + ".tmp", path)
    signal.sigwait({signal.SIGTERM})
    print("graceful stop", flush=True)
    sys.exit(int(os.environ.get("EXIT_CODE", "0")))
    """
)


async def test_service_process_waits_for_its_ports_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HIVEWIRE_LEAKED_FROM_SHELL", "x")
    service = ServiceProcess.script(
        FAKE_SERVICE,
        workdir=tmp_path,
        name="fake",
        certs_dir=tmp_path / "certs",
        identity="coordinator",
        nats_url="nats://127.0.0.1:1",
        env={"EXIT_CODE": "3"},
    )
    async with service:
        assert service.running
        host, port = service.address.rsplit(":", 1)
        assert host == "127.0.0.1" and int(port) == service.port > 0
        assert service.metrics_port is None
        assert service.ports["pid"] == service.pid
        reader, writer = await asyncio.open_connection("127.0.0.1", service.port)
        writer.close()
        await writer.wait_closed()
        assert await service.terminate() == 3
    stdout = service.stdout_path.read_text()
    env = json.loads(stdout.splitlines()[0].removeprefix("env "))
    assert env == {
        "HIVEWIRE_PORT": "0",
        "HIVEWIRE_METRICS_PORT": "0",
        "HIVEWIRE_PORTS_FILE": str(service.ports_file),
        "HIVEWIRE_CERTS_DIR": str(tmp_path / "certs"),
        "HIVEWIRE_IDENTITY": "coordinator",
        "HIVEWIRE_NATS_URL": "nats://127.0.0.1:1",
    }
    assert "graceful stop" in stdout
    assert "stderr line" in service.log_tail()


async def test_service_process_restart_and_kill(tmp_path: Path) -> None:
    service = ServiceProcess.script(FAKE_SERVICE, workdir=tmp_path, name="fake")
    await service.start()
    first_pid = service.pid
    assert await service.kill() == -signal.SIGKILL
    assert service.ports_file.exists(), "a killed process leaves its ports file behind"
    await service.start()
    assert service.pid != first_pid
    assert service.ports["pid"] == service.pid, "the stale ports file was not taken as ready"
    assert await service.terminate() == 0


async def test_service_process_reports_an_early_exit_with_stderr(tmp_path: Path) -> None:
    service = ServiceProcess.script(
        "import sys; print('cannot load certs/ca.pem', file=sys.stderr); sys.exit(4)",
        workdir=tmp_path,
        name="broken",
    )
    with pytest.raises(AssertionError, match=r"(?s)exited with 4 before serving.*ca\.pem"):
        await service.start(timeout=20)


async def test_service_process_runs_a_module(tmp_path: Path) -> None:
    package = tmp_path / "src"
    package.mkdir()
    (package / "fake_service.py").write_text(FAKE_SERVICE)
    service = ServiceProcess(
        "fake_service", "--flag", workdir=tmp_path, env={"PYTHONPATH": str(package)}
    )
    assert service.argv == [sys.executable, "-m", "fake_service", "--flag"]
    async with service:
        assert service.port > 0
    assert service.returncode == 0


async def test_service_process_terminate_kills_a_process_that_ignores_sigterm(
    tmp_path: Path,
) -> None:
    code = textwrap.dedent(
        """
        import json, os, signal, threading
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        path = os.environ["HIVEWIRE_PORTS_FILE"]
        with open(path + ".tmp", "w") as f:
            json.dump({"grpc": 1, "metrics": 2, "address": "127.0.0.1:1"}, f)
        os.replace(path + ".tmp", path)
        threading.Event().wait()
        """
    )
    service = ServiceProcess.script(code, workdir=tmp_path, name="stubborn")
    await service.start()
    assert service.metrics_port == 2
    with pytest.raises(AssertionError, match="ignored SIGTERM"):
        await service.terminate(timeout=0.5)
    assert service.returncode == -signal.SIGKILL


# -- pki fixtures ----------------------------------------------------------------------


def test_pki_fixtures_are_distinct_cas(pki: Pki, foreign_pki: Pki) -> None:
    files = pki.files("coordinator")
    assert files.ca == pki.dir / "ca.pem"
    assert files.cert.is_file() and files.key.is_file()
    assert pki.spiffe_id("agent-summarizer") == "spiffe://hivewire.local/agent/summarizer"
    assert (pki.dir / "ca.pem").read_bytes() != (foreign_pki.dir / "ca.pem").read_bytes()
    with pytest.raises(LookupError):
        pki.files("nobody")
    assert os.stat(files.key).st_mode & 0o777 == 0o600
