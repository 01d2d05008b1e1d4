"""``hivewire certs``: the CLI, and that its certificates really make (and refuse) mTLS."""

from __future__ import annotations

import asyncio
import datetime as dt
import os
import stat
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from typer.testing import CliRunner

from hivewire.services.cli.main import app
from hivewire.services.mesh import pki
from hivewire.services.runtime.tls import TlsFiles
from tests.helpers import grpcurl

runner = CliRunner()

DEFAULT_STEMS = [identity.stem for identity in pki.DEFAULT_IDENTITIES]
ALL = len(DEFAULT_STEMS) + 1  # the CA and every default identity


def assert_one_line_error(stderr: str, *fragments: str) -> None:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith("Error: "), stderr
    assert "Traceback" not in stderr
    for fragment in fragments:
        assert fragment in lines[0], stderr


# -- CLI through CliRunner -------------------------------------------------------------


def test_init_creates_everything_and_is_idempotent(tmp_path: Path) -> None:
    directory = tmp_path / "certs"
    first = runner.invoke(app, ["certs", "init", "--dir", str(directory)])
    assert first.exit_code == 0, first.output
    for stem in DEFAULT_STEMS:
        assert (directory / f"{stem}.pem").is_file()
        assert f" {stem} " in first.stdout
    assert "spiffe://hivewire.local/agent/summarizer" in first.stdout
    assert f"{ALL} created, 0 renewed, 0 kept" in first.stdout
    before = {p.name: p.read_bytes() for p in directory.iterdir()}

    second = runner.invoke(app, ["certs", "init", "--dir", str(directory)])
    assert second.exit_code == 0, second.output
    assert f"0 created, 0 renewed, {ALL} kept" in second.stdout
    assert {p.name: p.read_bytes() for p in directory.iterdir()} == before

    forced = runner.invoke(app, ["certs", "init", "--dir", str(directory), "--force"])
    assert forced.exit_code == 0, forced.output
    assert f"0 created, {ALL} renewed, 0 kept" in forced.stdout
    assert (directory / "ca.pem").read_bytes() != before["ca.pem"]


def test_issue_a_client_certificate(tmp_path: Path) -> None:
    directory = tmp_path / "certs"
    runner.invoke(app, ["certs", "init", "--dir", str(directory)])
    result = runner.invoke(
        app, ["certs", "issue", "--name", "alice", "--dir", str(directory), "--days", "7"]
    )
    assert result.exit_code == 0, result.output
    assert "spiffe://hivewire.local/client/alice" in result.stdout
    assert str(directory / "alice.key") in result.stdout
    info = pki.describe_cert(directory / "alice.pem")
    assert info.spiffe_id == "spiffe://hivewire.local/client/alice"
    assert info.not_after - info.not_before == dt.timedelta(days=7)
    assert stat.S_IMODE((directory / "alice.key").stat().st_mode) == 0o600

    agent = runner.invoke(
        app, ["certs", "issue", "--name", "scheduler", "--role", "agent", "--dir", str(directory)]
    )
    assert agent.exit_code == 0, agent.output
    assert pki.describe_cert(directory / "agent-scheduler.pem").spiffe_id == (
        "spiffe://hivewire.local/agent/scheduler"
    )


def test_issue_refuses_to_overwrite_without_force(tmp_path: Path) -> None:
    directory = tmp_path / "certs"
    assert (
        runner.invoke(app, ["certs", "issue", "--name", "bob", "--dir", str(directory)]).exit_code
        == 0
    )
    before = (directory / "bob.pem").read_bytes()
    again = runner.invoke(app, ["certs", "issue", "--name", "bob", "--dir", str(directory)])
    assert again.exit_code == 1
    assert_one_line_error(again.stderr, "bob.pem already exists", "--force")
    assert (directory / "bob.pem").read_bytes() == before
    forced = runner.invoke(
        app, ["certs", "issue", "--name", "bob", "--dir", str(directory), "--force"]
    )
    assert forced.exit_code == 0, forced.output
    assert (directory / "bob.pem").read_bytes() != before


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["certs", "issue", "--name", "Alice"], "invalid name 'Alice'"),
        (["certs", "issue", "--name", "alice", "--role", "a_b"], "invalid role 'a_b'"),
        (["certs", "issue", "--name", "alice", "--stem", "ca"], "reserved for the CA"),
        (["certs", "issue", "--name", "alice", "--days", "0"], "--days"),
        (["certs", "issue"], "--name"),
        (["certs", "init", "--bogus"], "--bogus"),
        (["certs", "nope"], "nope"),
    ],
)
def test_usage_errors_exit_2_with_one_line(tmp_path: Path, args: list[str], fragment: str) -> None:
    result = runner.invoke(app, [*args, "--dir", str(tmp_path / "certs")])
    assert result.exit_code == 2, result.output
    assert_one_line_error(result.stderr, fragment)
    assert not (tmp_path / "certs").exists()


def test_failures_exit_1_with_one_line(tmp_path: Path) -> None:
    directory = tmp_path / "certs"
    missing = runner.invoke(app, ["certs", "show", "--dir", str(directory)])
    assert missing.exit_code == 1
    assert_one_line_error(missing.stderr, "no certificates", "hivewire certs init")

    pki.init_pki(directory)
    (directory / "ca.key").unlink()
    broken = runner.invoke(app, ["certs", "issue", "--name", "carol", "--dir", str(directory)])
    assert broken.exit_code == 1
    assert_one_line_error(broken.stderr, "ca.key is missing", "--force")

    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("")
    blocked = runner.invoke(app, ["certs", "init", "--dir", str(not_a_dir / "certs")])
    assert blocked.exit_code == 1
    assert_one_line_error(blocked.stderr)


def test_show_lists_identity_expiry_and_status(tmp_path: Path) -> None:
    directory = tmp_path / "certs"
    pki.init_pki(directory)
    now = dt.datetime.now(dt.UTC)
    pki.issue_cert(
        directory,
        role="client",
        name="old",
        not_before=now - dt.timedelta(days=3),
        not_after=now - dt.timedelta(days=1),
    )
    other = tmp_path / "other"
    pki.init_pki(other)
    (directory / "stranger.pem").write_bytes((other / "client.pem").read_bytes())

    result = runner.invoke(app, ["certs", "show", "--dir", str(directory)])
    assert result.exit_code == 0, result.output
    rows = {line.split("│")[1].strip(): line for line in result.stdout.splitlines() if "│" in line}
    assert set(rows) == {"ca", "old", "stranger", *DEFAULT_STEMS}
    coordinator = pki.describe_cert(directory / "coordinator.pem")
    assert "spiffe://hivewire.local/coordinator/coordinator" in rows["coordinator"]
    assert f"{coordinator.not_after:%Y-%m-%d %H:%M} UTC" in rows["coordinator"]
    assert "ok" in rows["coordinator"]
    assert "expired" in rows["old"]
    assert "not issued by this CA" in rows["stranger"]


def test_help_and_version() -> None:
    result = runner.invoke(app, ["certs", "--help"])
    assert result.exit_code == 0
    for command in ("init", "issue", "show"):
        assert command in result.stdout
    version = runner.invoke(app, ["--version"])
    assert version.exit_code == 0 and version.stdout.startswith("hivewire ")


# -- the real console script -----------------------------------------------------------


async def test_console_script_creates_the_pki(tmp_path: Path) -> None:
    hivewire = Path(sys.executable).parent / "hivewire"
    directory = tmp_path / "certs"
    proc = await asyncio.create_subprocess_exec(
        str(hivewire),
        "certs",
        "init",
        "--dir",
        str(directory),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await proc.communicate()
    assert proc.returncode == 0, err.decode()
    assert f"{ALL} created" in out.decode()
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700
    assert stat.S_IMODE((directory / "coordinator.key").stat().st_mode) == 0o600
    assert pki.check_cert(directory, "coordinator") is None

    proc = await asyncio.create_subprocess_exec(
        str(hivewire),
        "certs",
        "issue",
        "--name",
        "BAD",
        "--dir",
        str(directory),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await proc.communicate()
    assert proc.returncode == 2
    assert_one_line_error(err.decode(), "invalid name 'BAD'")


# -- the certificates in real mTLS handshakes ------------------------------------------


def channel_credentials(files: TlsFiles) -> grpc.ChannelCredentials:
    ca, cert, key = files.read()
    return grpc.ssl_channel_credentials(ca, key, cert)


@pytest.fixture
async def health_server(tmp_path: Path) -> AsyncIterator[tuple[str, Path]]:
    """A grpc.aio server requiring client certificates, using certificates made by the CLI."""
    directory = tmp_path / "certs"
    result = runner.invoke(app, ["certs", "init", "--dir", str(directory)])
    assert result.exit_code == 0, result.output
    ca, cert, key = TlsFiles.for_identity(directory, "coordinator").read()
    creds = grpc.ssl_server_credentials(
        [(key, cert)], root_certificates=ca, require_client_auth=True
    )
    server = grpc.aio.server()
    servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    reflection.enable_server_reflection((health.SERVICE_NAME, reflection.SERVICE_NAME), server)
    port = server.add_secure_port("127.0.0.1:0", creds)
    await server.start()
    try:
        yield f"127.0.0.1:{port}", directory
    finally:
        await server.stop(None)


async def check_health(address: str, creds: grpc.ChannelCredentials, target: str) -> int:
    options = [] if target == address else [("grpc.ssl_target_name_override", target)]
    async with grpc.aio.secure_channel(address, creds, options=options) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        response = await stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=10)
        return int(response.status)


@pytest.mark.parametrize(
    "target", ["ADDRESS", "localhost", "coordinator.coordinator.hivewire.local"]
)
async def test_cli_certificates_complete_an_mtls_call(
    health_server: tuple[str, Path], target: str
) -> None:
    address, directory = health_server
    creds = channel_credentials(TlsFiles.for_identity(directory, "client"))
    status = await check_health(address, creds, address if target == "ADDRESS" else target)
    assert status == health_pb2.HealthCheckResponse.SERVING


async def test_agent_certificate_works_as_a_client_too(health_server: tuple[str, Path]) -> None:
    address, directory = health_server
    creds = channel_credentials(TlsFiles.for_identity(directory, "agent-researcher"))
    assert await check_health(address, creds, address) == health_pb2.HealthCheckResponse.SERVING


async def test_refused_without_client_cert_with_foreign_ca_or_expired_cert(
    health_server: tuple[str, Path], tmp_path: Path
) -> None:
    address, directory = health_server
    ca = (directory / "ca.pem").read_bytes()

    no_cert = grpc.ssl_channel_credentials(ca)
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await check_health(address, no_cert, address)
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE

    foreign = tmp_path / "foreign"
    pki.init_pki(foreign)
    foreign_client = TlsFiles(
        ca=directory / "ca.pem", cert=foreign / "client.pem", key=foreign / "client.key"
    )
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await check_health(address, channel_credentials(foreign_client), address)
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE

    now = dt.datetime.now(dt.UTC)
    expired = pki.issue_cert(
        directory,
        role="client",
        name="expired",
        not_before=now - dt.timedelta(days=2),
        not_after=now - dt.timedelta(days=1),
    )
    expired_files = TlsFiles(ca=expired.ca_path, cert=expired.cert_path, key=expired.key_path)
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await check_health(address, channel_credentials(expired_files), address)
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_grpcurl_with_cli_certificates(health_server: tuple[str, Path]) -> None:
    address, directory = health_server
    client = TlsFiles.for_identity(directory, "client")
    ok = await grpcurl("grpc.health.v1.Health/Check", tls=client, address=address, input="{}")
    assert ok.returncode == 0, ok
    assert ok.json() == {"status": "SERVING"}

    named = await grpcurl(
        "grpc.health.v1.Health/Check",
        tls=client,
        address=address,
        authority="coordinator.coordinator.hivewire.local",
        flags=["-d", '{"service": ""}'],
    )
    assert named.returncode == 0, named

    plain = await grpcurl("grpc.health.v1.Health/Check", tls=None, address=address, input="{}")
    assert plain.returncode != 0, plain

    no_client_cert = await grpcurl(
        "grpc.health.v1.Health/Check",
        tls=None,
        address=address,
        flags=["-cacert", str(directory / "ca.pem")],
        input="{}",
    )
    assert no_client_cert.returncode != 0, no_client_cert
    assert "Failed to dial" in no_client_cert.stderr or "handshake" in no_client_cert.stderr


def test_keys_are_never_group_or_world_readable(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        result = runner.invoke(app, ["certs", "init", "--dir", str(tmp_path / "certs")])
    finally:
        os.umask(old)
    assert result.exit_code == 0, result.output
    for key in (tmp_path / "certs").glob("*.key"):
        assert stat.S_IMODE(key.stat().st_mode) == 0o600, key
