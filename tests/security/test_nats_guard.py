"""The NATS guard: nats-server's refusals become metrics and events; revoked certificates
are cut off from NATS too.

A real nats-server configured as ``hivewire up`` configures it, and the real guard
process (``python -m hivewire.services.mesh.nats_guard``) following its log and keeping
its security file in step with a deny list this module writes.
"""

from __future__ import annotations

import contextlib
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import nats
import nats.errors
import pytest
import pytest_asyncio
from nats.aio.client import Client as NatsClient

from hivewire.services.mesh.nats_guard import parse_refusal
from hivewire.services.runtime.events import replay
from hivewire.services.runtime.pki import describe_cert
from hivewire.services.runtime.tls import TlsFiles, nats_tls_options
from tests.conftest import Pki
from tests.helpers import NatsServer, ServiceProcess, assert_nats_refused, eventually

pytestmark = [pytest.mark.asyncio(loop_scope="module"), pytest.mark.timeout(120)]


@dataclass
class Guarded:
    nats: NatsServer
    guard: ServiceProcess
    revoked: Path

    async def metrics(self) -> str:
        async with httpx.AsyncClient(timeout=5) as http:
            url = f"http://127.0.0.1:{self.guard.metrics_port}/metrics"
            return (await http.get(url)).text


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def guarded(pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Guarded]:
    workdir = tmp_path_factory.mktemp("nats-guard")
    revoked = workdir / "revoked.txt"
    async with NatsServer(workdir / "nats", certs_dir=pki.dir, revoked_file=revoked) as server:
        assert server.pid is not None
        guard = ServiceProcess(
            "hivewire.services.mesh.nats_guard",
            "--security-file", str(server.security_file),
            "--server-pid", str(server.pid),
            "--server-log", str(server.log_path),
            workdir=workdir,
            certs_dir=pki.dir,
            identity="nats",
            nats_url=server.url,
            env={"HIVEWIRE_REVOKED_CERTS_FILE": str(revoked)},
        )  # fmt: skip
        async with guard:
            yield Guarded(server, guard, revoked)


async def connect(server: NatsServer, files: TlsFiles, **options: object) -> NatsClient:
    """A connection the server accepted (AssertionError when it refused it)."""
    try:
        client = await nats.connect(
            servers=[server.url],
            allow_reconnect=False,
            max_reconnect_attempts=1,
            connect_timeout=2,
            **nats_tls_options(server.url, files),
            **options,  # type: ignore[arg-type]
        )
    except (nats.errors.Error, OSError, ssl.SSLError) as exc:
        raise AssertionError(f"refused: {exc!r}") from exc
    if not client.is_connected:  # closed right after the handshake (see assert_nats_refused)
        await client.close()
        raise AssertionError("refused after the handshake")
    return client


def counted(text: str, kind: str, reason: str) -> float:
    for line in text.splitlines():
        if (
            line.startswith("hivewire_security_denials_total{")
            and f'kind="{kind}"' in line
            and f'reason="{reason}"' in line
        ):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


# -- refusals become metrics and events ------------------------------------------------------


async def test_refusals_are_counted_and_published(
    guarded: Guarded, pki: Pki, foreign_pki: Pki
) -> None:
    server = guarded.nats
    # No certificate; a certificate of another CA.
    await assert_nats_refused(
        server.url, tls=ssl.create_default_context(cafile=str(pki.dir / "ca.pem"))
    )
    foreign = ssl.create_default_context(cafile=str(pki.dir / "ca.pem"))
    other_ca = foreign_pki.files("agent")
    foreign.load_cert_chain(str(other_ca.cert), str(other_ca.key))
    await assert_nats_refused(server.url, tls=foreign)
    # A mesh identity publishing where it may not, writing another agent's registry
    # entry, and listening to another identity's replies.
    agent = await connect(server, pki.files("agent-summarizer"), error_cb=_ignore)
    try:
        await agent.publish("hivewire.events.task.completed", b"secret-payload")
        await agent.publish("$KV.hivewire-registry.hivewire-agent.researcher.r-1", b"{}")
        await agent.subscribe("_INBOX.client.client.>")
        await agent.flush()
    finally:
        await agent.close()
    summarizer = "spiffe://hivewire.local/agent/summarizer"

    async def all_counted() -> None:
        text = await guarded.metrics()
        for kind, reason in (
            ("authn", "NATS_NO_CERTIFICATE"),
            ("authn", "NATS_UNKNOWN_AUTHORITY"),
            ("authz", "NATS_PUBLISH_DENIED"),
            ("authz", "NATS_SUBSCRIBE_DENIED"),
        ):
            assert counted(text, kind, reason) >= 1, (kind, reason)
        assert counted(text, "authz", "NATS_PUBLISH_DENIED") >= 2

    await eventually(all_counted, timeout=20)

    reader = nats_tls_options(server.url, pki.files("client"))

    async def published() -> list[tuple[str, str, str, str]]:
        seen = [
            (r.type, r.event.security.reason, r.event.security.caller, r.event.security.method)
            async for r in replay(server.url, "security.*", nats_options=reader)
        ]
        assert (
            "security.authz_denied",
            "NATS_PUBLISH_DENIED",
            summarizer,
            "nats publish hivewire.events.task.completed",
        ) in seen
        assert (
            "security.authz_denied",
            "NATS_PUBLISH_DENIED",
            summarizer,
            "nats publish $KV.hivewire-registry.hivewire-agent.researcher.r-1",
        ) in seen
        assert (
            "security.authz_denied",
            "NATS_SUBSCRIBE_DENIED",
            summarizer,
            "nats subscribe _INBOX.client.client.>",
        ) in seen
        refused_at_connect = [s for s in seen if s[0] == "security.authn_failed"]
        assert {s[1] for s in refused_at_connect} >= {
            "NATS_NO_CERTIFICATE",
            "NATS_UNKNOWN_AUTHORITY",
        }
        # Before the handshake there is no identity: the remote address stands for it.
        assert all(s[2].startswith("127.0.0.1:") for s in refused_at_connect)
        assert all(s[3] == "nats connect" for s in refused_at_connect)
        return seen

    seen = await eventually(published, timeout=20)
    assert not any("secret-payload" in str(s) for s in seen)


async def _ignore(exc: Exception) -> None:
    pass


@pytest.mark.asyncio(loop_scope="module")
async def test_log_lines_of_older_servers_parse_too() -> None:
    # nats-server 2.10 names the user as `User "..."`; 2.11+ as `"$G/user:..."`.
    old = (
        '[1] 2024/01/01 00:00:00.000000 [ERR] 127.0.0.1:5000 - cid:9 - "v2.16.0:python3" - '
        'Publish Violation - User "spiffe://hivewire.local/agent/a", Subject "x.y"'
    )
    refusal = parse_refusal(old)
    assert refusal is not None
    assert (refusal.caller, refusal.method) == (
        "spiffe://hivewire.local/agent/a",
        "nats publish x.y",
    )
    assert parse_refusal("[1] 2024/01/01 00:00:00.000000 [INF] Server is ready") is None


# -- revocation reaches NATS -----------------------------------------------------------------


async def test_a_revoked_certificate_is_cut_off_from_nats(guarded: Guarded, pki: Pki) -> None:
    server = guarded.nats
    # Issued after the server started: the guard admits it once it sees the new file.
    doomed = pki.issue(role="agent", name="doomed", stem="agent-doomed")

    client: NatsClient = await eventually(lambda: connect(server, doomed), timeout=20)
    assert client.is_connected
    # Revoke its certificate (by serial, as `hivewire certs revoke` does).
    serial = format(describe_cert(doomed.cert).serial_number, "x")
    guarded.revoked.write_text(f"# leaked\n{serial}\n")
    # The open connection is closed and a new one is refused in the handshake.
    await eventually(lambda: client.is_closed or not client.is_connected, timeout=20)
    await assert_nats_refused(server.url, **nats_tls_options(server.url, doomed))
    with contextlib.suppress(Exception):
        await client.close()

    async def refusal_counted() -> None:
        assert counted(await guarded.metrics(), "authn", "NATS_CERT_NOT_ADMITTED") >= 1

    await eventually(refusal_counted, timeout=20)
    # Other identities keep working; a reissued certificate (new key) of it is admitted.
    other = await connect(server, pki.files("agent-researcher"))
    await other.close()
    reissued = pki.issue(role="agent", name="doomed", stem="agent-doomed", force=True)
    again: NatsClient = await eventually(lambda: connect(server, reissued), timeout=20)
    assert again.is_connected
    await again.close()
    # Revoking the identity itself refuses every certificate of it.
    guarded.revoked.write_text("spiffe://hivewire.local/agent/doomed\n")
    await eventually(
        lambda: assert_nats_refused(server.url, **nats_tls_options(server.url, reissued)),
        timeout=20,
    )
