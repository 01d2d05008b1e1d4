"""End users on the coordinator: API keys and JWT bearer tokens over the mTLS channel.

A real coordinator process with an API key file made by ``hivewire keys`` and JWT checks
against a JWKS this module serves itself on 127.0.0.1. The principal of a key or token
owns its tasks as a certificate identity does; every bad credential is
``UNAUTHENTICATED`` with its reason; a revoked key stops working without a restart.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import json
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import grpc
import httpx
import jwt
import pytest
import pytest_asyncio
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from jwt.algorithms import RSAAlgorithm

from hivewire.common.v1 import common_pb2
from hivewire.coordinator.v1 import coordinator_pb2, coordinator_pb2_grpc
from hivewire.services.runtime.channels import secure_channel
from hivewire.services.runtime.status import from_rpc_error
from tests.conftest import Pki
from tests.helpers import ServiceProcess

pytestmark = [pytest.mark.asyncio(loop_scope="module"), pytest.mark.timeout(120)]

C = coordinator_pb2
ISSUER = "https://idp.hivewire.test"
AUDIENCE = "hivewire"
HIVEWIRE = Path(sys.executable).parent / "hivewire"


@dataclass
class Idp:
    """The test's identity provider: an RSA key, served as a JWKS."""

    key: rsa.RSAPrivateKey
    url: str

    def token(
        self,
        sub: str,
        *,
        key: Any = None,
        headers: dict[str, Any] | None = None,
        algorithm: str = "RS256",
        **claims: Any,
    ) -> str:
        now = int(time.time())
        body = {"iss": ISSUER, "aud": AUDIENCE, "sub": sub, "iat": now, "exp": now + 300}
        body.update(claims)
        return jwt.encode(
            body, key or self.key, algorithm=algorithm, headers=headers or {"kid": "k1"}
        )


@contextlib.contextmanager
def serve_jwks(key: rsa.RSAPrivateKey) -> Iterator[str]:
    public = RSAAlgorithm.to_jwk(key.public_key(), as_dict=True) | {"kid": "k1", "alg": "RS256"}
    body = json.dumps({"keys": [public]}).encode()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server's name)
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}/jwks.json"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def b64url(data: bytes) -> bytes:
    return base64.urlsafe_b64encode(data).rstrip(b"=")


def keys_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(HIVEWIRE), "keys", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={"PATH": "/usr/bin:/bin"},
    )


@dataclass
class Mesh:
    process: ServiceProcess
    stub: coordinator_pb2_grpc.CoordinatorServiceAsyncStub
    idp: Idp
    keys_file: Path
    alice: str
    bob: str


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def mesh(pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Mesh]:
    workdir = tmp_path_factory.mktemp("end-user-auth")
    keys_file = workdir / "api-keys.json"
    made = [keys_cli("create", name, "--file", str(keys_file)) for name in ("alice", "bob")]
    for result in made:
        assert result.returncode == 0, result
    alice, bob = (r.stdout.strip() for r in made)
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    with serve_jwks(key) as jwks_url:
        process = ServiceProcess(
            "hivewire.services.coordinator",
            workdir=workdir,
            certs_dir=pki.dir,
            identity="coordinator",
            env={
                "HIVEWIRE_DISCOVERY": "static",
                "HIVEWIRE_EVENTS__ENABLED": "false",
                "HIVEWIRE_COORDINATOR__DB_PATH": str(workdir / "c.db"),
                "HIVEWIRE_AUTH__API_KEYS_FILE": str(keys_file),
                "HIVEWIRE_AUTH__JWT_ISSUER": ISSUER,
                "HIVEWIRE_AUTH__JWT_AUDIENCE": AUDIENCE,
                "HIVEWIRE_AUTH__JWT_JWKS_URL": jwks_url,
                "HIVEWIRE_AUTH__JWT_LEEWAY": "5",
            },
        )
        async with process:
            channel = secure_channel(process.address, pki.files("client"))
            try:
                stub = coordinator_pb2_grpc.CoordinatorServiceStub(channel)
                yield Mesh(process, stub, Idp(key, jwks_url), keys_file, alice, bob)  # type: ignore[arg-type]
            finally:
                await channel.close()


def bearer(credential: str) -> tuple[tuple[str, str]]:
    return (("authorization", f"Bearer {credential}"),)


def spec() -> C.TaskSpec:
    return C.TaskSpec(capability="calculate", input=common_pb2.Payload(text="1 + 1"))


async def submit(mesh: Mesh, credential: str) -> C.Task:
    done = await mesh.stub.SubmitTask(
        C.SubmitTaskRequest(spec=spec()), metadata=bearer(credential), timeout=10
    )
    got = await mesh.stub.GetTask(
        C.GetTaskRequest(task_id=done.task.task_id), metadata=bearer(credential), timeout=10
    )
    return got.task


async def refusal(call: Any) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await call
    return err.value.code(), from_rpc_error(err.value).reason


# -- API keys -----------------------------------------------------------------------------


async def test_an_api_key_principal_owns_its_tasks(mesh: Mesh) -> None:
    task = await submit(mesh, mesh.alice)
    assert task.owner == "spiffe://hivewire.local/client/alice"
    # Bob (another key) and the bare client certificate do not see it.
    for metadata in (bearer(mesh.bob), ()):
        code, reason = await refusal(
            mesh.stub.GetTask(C.GetTaskRequest(task_id=task.task_id), metadata=metadata)
        )
        assert code == grpc.StatusCode.NOT_FOUND, reason


async def test_a_wrong_or_revoked_key_is_unauthenticated(mesh: Mesh) -> None:
    forged = mesh.alice[:-4] + "AAAA"
    assert await refusal(
        mesh.stub.SubmitTask(C.SubmitTaskRequest(spec=spec()), metadata=bearer(forged))
    ) == (grpc.StatusCode.UNAUTHENTICATED, "API_KEY_INVALID")
    bob_id = mesh.bob.split("_")[1]
    assert keys_cli("revoke", bob_id, "--file", str(mesh.keys_file)).returncode == 0
    listed = keys_cli("list", "--file", str(mesh.keys_file))
    assert f"{bob_id}" in listed.stdout and "revoked" in listed.stdout
    assert mesh.bob.split("_", 2)[2] not in listed.stdout + mesh.keys_file.read_text()
    # The running coordinator re-reads the file: no restart.
    assert await refusal(
        mesh.stub.SubmitTask(C.SubmitTaskRequest(spec=spec()), metadata=bearer(mesh.bob))
    ) == (grpc.StatusCode.UNAUTHENTICATED, "API_KEY_REVOKED")
    assert (await submit(mesh, mesh.alice)).owner.endswith("/client/alice")


# -- JWT ----------------------------------------------------------------------------------


async def test_a_jwt_principal_owns_its_tasks_and_an_admin_token_sees_them(mesh: Mesh) -> None:
    task = await submit(mesh, mesh.idp.token("carol"))
    assert task.owner == "spiffe://hivewire.local/client/carol"
    code, _ = await refusal(
        mesh.stub.GetTask(
            C.GetTaskRequest(task_id=task.task_id), metadata=bearer(mesh.idp.token("dave"))
        )
    )
    assert code == grpc.StatusCode.NOT_FOUND
    admin = mesh.idp.token("ops", hivewire_role="admin")
    seen = await mesh.stub.GetTask(C.GetTaskRequest(task_id=task.task_id), metadata=bearer(admin))
    assert seen.task.owner == task.owner


@pytest.mark.parametrize(
    ("case", "reason"),
    [
        ("expired", "TOKEN_EXPIRED"),
        ("wrong-audience", "TOKEN_WRONG_AUDIENCE"),
        ("wrong-issuer", "TOKEN_WRONG_ISSUER"),
        ("alg-none", "TOKEN_ALGORITHM_NOT_ALLOWED"),
        ("hmac-with-the-public-key", "TOKEN_ALGORITHM_NOT_ALLOWED"),
        ("other-key", "TOKEN_BAD_SIGNATURE"),
        ("unknown-kid", "TOKEN_UNKNOWN_KEY"),
        ("no-exp", "TOKEN_MISSING_CLAIM"),
        ("garbage", "TOKEN_MALFORMED"),
        ("role-not-allowed", "TOKEN_ROLE_NOT_ALLOWED"),
    ],
)
async def test_bad_tokens_are_unauthenticated_with_a_reason(
    mesh: Mesh, case: str, reason: str
) -> None:
    idp = mesh.idp
    if case == "expired":
        token = idp.token("eve", exp=int(time.time()) - 60)
    elif case == "wrong-audience":
        token = idp.token("eve", aud="another-service")
    elif case == "wrong-issuer":
        token = idp.token("eve", iss="https://evil.test")
    elif case == "alg-none":
        token = jwt.encode(
            {"iss": ISSUER, "aud": AUDIENCE, "sub": "eve", "exp": int(time.time()) + 60},
            None,
            algorithm="none",
        )
    elif case == "hmac-with-the-public-key":
        # The classic confusion attack, built by hand (PyJWT refuses to make it).
        public = idp.key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        claims = {"iss": ISSUER, "aud": AUDIENCE, "sub": "eve", "exp": int(time.time()) + 60}
        signing_input = b".".join(
            b64url(json.dumps(part).encode())
            for part in ({"alg": "HS256", "typ": "JWT", "kid": "k1"}, claims)
        )
        mac = hmac.new(public, signing_input, hashlib.sha256).digest()
        token = (signing_input + b"." + b64url(mac)).decode()
    elif case == "other-key":
        token = idp.token("eve", key=rsa.generate_private_key(public_exponent=65537, key_size=2048))
    elif case == "unknown-kid":
        token = idp.token("eve", headers={"kid": "k9"})
    elif case == "no-exp":
        token = jwt.encode(
            {"iss": ISSUER, "aud": AUDIENCE, "sub": "eve"},
            idp.key,
            algorithm="RS256",
            headers={"kid": "k1"},
        )
    elif case == "garbage":
        token = "not.a.token"
    else:
        token = idp.token("eve", hivewire_role="coordinator")
    assert await refusal(
        mesh.stub.SubmitTask(C.SubmitTaskRequest(spec=spec()), metadata=bearer(token))
    ) == (grpc.StatusCode.UNAUTHENTICATED, reason)


async def test_a_malformed_authorization_header_is_unauthenticated(mesh: Mesh) -> None:
    assert await refusal(
        mesh.stub.ListTasks(C.ListTasksRequest(), metadata=(("authorization", "Basic YTpi"),))
    ) == (grpc.StatusCode.UNAUTHENTICATED, "CREDENTIAL_MALFORMED")


async def test_streams_are_authenticated_too(mesh: Mesh) -> None:
    call = mesh.stub.WatchTask(
        C.WatchTaskRequest(task_id="x"), metadata=bearer(mesh.idp.token("eve", aud="nope"))
    )
    with pytest.raises(grpc.aio.AioRpcError) as err:
        async for _ in call:
            pass
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert from_rpc_error(err.value).reason == "TOKEN_WRONG_AUDIENCE"


async def test_refusals_are_counted_without_secrets(mesh: Mesh) -> None:
    expired = mesh.idp.token("eve", exp=int(time.time()) - 60)
    await refusal(mesh.stub.ListTasks(C.ListTasksRequest(), metadata=bearer(expired)))
    async with httpx.AsyncClient(timeout=5) as http:
        text = (await http.get(f"http://127.0.0.1:{mesh.process.metrics_port}/metrics")).text
    counted = [
        line
        for line in text.splitlines()
        if line.startswith("hivewire_security_denials_total{")
        and 'kind="authn"' in line
        and 'reason="TOKEN_EXPIRED"' in line
    ]
    assert counted and float(counted[0].rsplit(" ", 1)[1]) >= 1
    log = mesh.process.stdout_path.read_text() + mesh.process.stderr_path.read_text()
    assert "TOKEN_EXPIRED" in log and expired not in log and mesh.alice not in log


# -- the CLI acts for an end user -------------------------------------------------------------


def tasks_cli(
    mesh: Mesh, pki: Pki, *flags: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            str(HIVEWIRE),
            *flags,
            "tasks",
            "--json",
            "--address",
            mesh.process.address,
            "--certs-dir",
            str(pki.dir),
        ],  # fmt: skip
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={"PATH": "/usr/bin:/bin", **(env or {})},
    )


async def test_the_cli_acts_with_an_api_key_or_a_token(mesh: Mesh, pki: Pki) -> None:
    alices = (await submit(mesh, mesh.alice)).task_id
    carols = (await submit(mesh, mesh.idp.token("cli-carol"))).task_id

    def listed(result: subprocess.CompletedProcess[str]) -> list[str]:
        assert result.returncode == 0, result.stderr
        return [json.loads(line)["taskId"] for line in result.stdout.splitlines()]

    # The same client certificate, three end users: each sees only its own tasks.
    as_alice = await asyncio.to_thread(tasks_cli, mesh, pki, "--api-key", mesh.alice)
    assert alices in listed(as_alice) and carols not in listed(as_alice)
    dave = {"HIVEWIRE_TOKEN": mesh.idp.token("dave")}
    as_dave = await asyncio.to_thread(tasks_cli, mesh, pki, env=dave)
    assert alices not in listed(as_dave) and carols not in listed(as_dave)
    as_alice = await asyncio.to_thread(tasks_cli, mesh, pki, env={"HIVEWIRE_API_KEY": mesh.alice})
    assert alices in listed(as_alice)
    as_carol = await asyncio.to_thread(tasks_cli, mesh, pki, "--token", mesh.idp.token("cli-carol"))
    assert listed(as_carol) == [carols]
    forged = await asyncio.to_thread(tasks_cli, mesh, pki, "--api-key", mesh.alice[:-4] + "AAAA")
    assert forged.returncode == 5 and "UNAUTHENTICATED API_KEY_INVALID" in forged.stderr
    assert mesh.alice[:-4] not in forged.stderr + forged.stdout
