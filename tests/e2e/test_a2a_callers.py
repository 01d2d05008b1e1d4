"""A2A callers own their tasks: client certificates, API keys and JWT through the gateway.

A real mesh (nats-server, the coordinator, the interop agent, the gateway) with end-user
authentication on: an API key file made with the keys store and a JWKS file of a key
this module makes. Callers use the official ``a2a-sdk`` client, over JSON-RPC and gRPC,
each with its own credential: a mesh client certificate, an API key or a JWT (sent by
the SDK's own ``AuthInterceptor`` from the card's ``bearer`` scheme). One caller's task
is unknown to every other caller (``TaskNotFoundError``) and its owner in the coordinator
is the caller, not the gateway.
"""

from __future__ import annotations

import contextlib
import json
import os
import ssl
import sys
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import httpx
import jwt
import pytest
import pytest_asyncio
from a2a.client import ClientCallContext, ClientConfig, ClientFactory
from a2a.client.auth.credentials import CredentialService
from a2a.client.auth.interceptor import AuthInterceptor
from a2a.client.card_resolver import A2ACardResolver, parse_agent_card
from a2a.client.client import Client
from a2a.client.errors import A2AClientError
from a2a.types import a2a_pb2 as a2a
from a2a.utils.errors import InvalidRequestError, TaskNotFoundError
from cryptography.hazmat.primitives.asymmetric import rsa
from google.protobuf import json_format
from jwt.algorithms import RSAAlgorithm

from hivewire.common.v1 import common_pb2
from hivewire.coordinator.v1 import coordinator_pb2, coordinator_pb2_grpc
from hivewire.services.a2a.handler import AFTER_SEQUENCE_HEADER
from hivewire.services.runtime.authn import ApiKeyStore
from hivewire.services.runtime.authz import ON_BEHALF_OF
from hivewire.services.runtime.channels import secure_channel
from hivewire.services.runtime.status import from_rpc_error
from hivewire.services.runtime.tls import TlsFiles, spiffe_id
from tests.conftest import Pki
from tests.support.a2a_mesh import A2aMesh, a2a_mesh, client_ssl_context, grpc_credentials
from tests.support.e2e_mesh import REPO_ROOT
from tests.support.node import install_example, run_command

pytestmark = [pytest.mark.asyncio(loop_scope="module"), pytest.mark.timeout(240)]

NODE_EXAMPLE = REPO_ROOT / "examples" / "a2a-node"
ISSUER = "https://idp.hivewire.test"
AUDIENCE = "hivewire-a2a"


@dataclass
class Callers:
    """The running mesh and one credential per caller."""

    mesh: A2aMesh
    pki: Pki
    alice: TlsFiles  # certificate client/a2a-alice
    bob: TlsFiles  # certificate client/a2a-bob
    carol_key: str  # API key of client/carol
    erin_token: str  # JWT of client/erin


@dataclass(frozen=True)
class Caller:
    """How one test caller authenticates."""

    name: str
    identity: str
    files: TlsFiles | None = None
    token: str = ""


class BearerCredentials(CredentialService):
    """The caller's token for the card's ``bearer`` scheme (the SDK's AuthInterceptor asks)."""

    def __init__(self, token: str) -> None:
        self.token = token

    async def get_credentials(
        self, security_scheme_name: str, context: ClientCallContext | None
    ) -> str | None:
        return self.token if security_scheme_name == "bearer" else None


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def callers(pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Callers]:
    workdir = tmp_path_factory.mktemp("e2e-a2a-callers")
    keys = ApiKeyStore(workdir / "api-keys.json")
    carol_key, _ = keys.create("carol")
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    public = RSAAlgorithm.to_jwk(key.public_key(), as_dict=True) | {"kid": "k1", "alg": "RS256"}
    (workdir / "jwks.json").write_text(json.dumps({"keys": [public]}))
    now = int(time.time())
    erin_token = jwt.encode(
        {"iss": ISSUER, "aud": AUDIENCE, "sub": "erin", "iat": now, "exp": now + 3600},
        key,
        algorithm="RS256",
        headers={"kid": "k1"},
    )
    env = {
        "HIVEWIRE_AUTH__API_KEYS_FILE": str(workdir / "api-keys.json"),
        "HIVEWIRE_AUTH__JWT_JWKS_FILE": str(workdir / "jwks.json"),
        "HIVEWIRE_AUTH__JWT_ISSUER": ISSUER,
        "HIVEWIRE_AUTH__JWT_AUDIENCE": AUDIENCE,
    }
    alice = pki.issue(role="client", name="a2a-alice", stem="a2a-alice")
    bob = pki.issue(role="client", name="a2a-bob", stem="a2a-bob")
    pki.issue(role="client", name="a2a-mallory", stem="a2a-mallory")
    (workdir / "revoked.txt").write_text(pki.spiffe_id("a2a-mallory") + "\n")
    env["HIVEWIRE_REVOKED_CERTS_FILE"] = str(workdir / "revoked.txt")
    async with a2a_mesh(pki, workdir, env=env) as mesh:
        yield Callers(mesh, pki, alice, bob, carol_key, erin_token)


def anonymous_tls(mesh: A2aMesh) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(mesh.client_files.ca))


@contextlib.asynccontextmanager
async def sdk_client(mesh: A2aMesh, caller: Caller, binding: str) -> AsyncIterator[Client]:
    """The official client, authenticated as ``caller`` (a certificate and/or a token)."""
    verify = client_ssl_context(caller.files) if caller.files else anonymous_tls(mesh)
    async with httpx.AsyncClient(verify=verify, timeout=60) as http:
        card = await A2ACardResolver(http, mesh.base_url).get_agent_card()
        grpc_files = caller.files or mesh.client_files
        credentials = grpc_credentials(grpc_files)
        config = ClientConfig(
            streaming=True,
            httpx_client=http,
            supported_protocol_bindings=[binding],
            grpc_channel_factory=lambda url: grpc.aio.secure_channel(url, credentials),
        )
        interceptors = [AuthInterceptor(BearerCredentials(caller.token))] if caller.token else []
        yield ClientFactory(config).create(card, interceptors=interceptors)


def message(skill: str, text: str = "") -> a2a.Message:
    msg = a2a.Message(message_id=uuid.uuid4().hex, role=a2a.ROLE_USER)
    if text:
        msg.parts.append(a2a.Part(text=text))
    msg.metadata.update({"skill": skill})
    return msg


async def start_waiting_task(client: Client) -> str:
    """Start a ``wait`` task and leave it running; its id."""
    stream = client.send_message(a2a.SendMessageRequest(message=message("wait")))
    try:
        async for event in stream:
            if event.HasField("status_update") and (
                event.status_update.status.state == a2a.TASK_STATE_WORKING
            ):
                return event.status_update.task_id
    finally:
        await stream.aclose()  # type: ignore[attr-defined]
    raise AssertionError("the task never started working")


def from_start() -> ClientCallContext:
    # A context of its own per call: the SDK's AuthInterceptor writes the token into it.
    return ClientCallContext(service_parameters={AFTER_SEQUENCE_HEADER: "0"})


def by_name(c: Callers, name: str) -> Caller:
    pki = c.pki
    known = {
        "alice": Caller("alice", pki.spiffe_id("a2a-alice"), files=c.alice),
        "bob": Caller("bob", pki.spiffe_id("a2a-bob"), files=c.bob),
        "carol": Caller("carol", spiffe_id("client", "carol"), token=c.carol_key),
        "erin": Caller("erin", spiffe_id("client", "erin"), token=c.erin_token),
        # gRPC always needs a mesh certificate; the token then names the caller.
        "carol+cert": Caller(
            "carol+cert",
            spiffe_id("client", "carol"),
            files=c.mesh.client_files,
            token=c.carol_key,
        ),  # fmt: skip
    }
    return known[name]


# --- the card and unauthenticated requests ---------------------------------------------


async def test_card_declares_mtls_and_bearer_and_validates_against_the_sdk_types(
    callers: Callers,
) -> None:
    # Public: a client reads it before it has authenticated, to learn how to.
    async with httpx.AsyncClient(verify=anonymous_tls(callers.mesh)) as http:
        response = await http.get(callers.mesh.card_url)
    assert response.status_code == 200
    document = response.json()
    strict = json_format.ParseDict(document, a2a.AgentCard())
    assert parse_agent_card(document) == strict
    assert strict.security_schemes["mtls"].HasField("mtls_security_scheme")
    bearer = strict.security_schemes["bearer"]
    assert bearer.HasField("http_auth_security_scheme")
    assert bearer.http_auth_security_scheme.scheme.lower() == "bearer"
    # Either scheme suffices: one requirement each.
    assert [set(r.schemes) for r in strict.security_requirements] == [{"mtls"}, {"bearer"}]


async def test_a_request_without_credentials_is_refused(callers: Callers) -> None:
    mesh = callers.mesh
    request = {"jsonrpc": "2.0", "id": 1, "method": "GetTask", "params": {"id": "x"}}
    headers = {"A2A-Version": "1.0"}
    async with httpx.AsyncClient(verify=anonymous_tls(mesh)) as http:
        response = await http.post(mesh.base_url, json=request, headers=headers)
        assert response.status_code == 401
        assert response.headers["www-authenticate"] == 'Bearer realm="hivewire"'
        assert response.json()["error"]["reason"] == "NO_CREDENTIALS"
        bad = await http.post(
            mesh.base_url, json=request, headers={**headers, "Authorization": "Bearer hwk_x_y"}
        )
        assert bad.status_code == 401
        assert 'error="invalid_token"' in bad.headers["www-authenticate"]
        assert bad.json()["error"]["reason"] == "API_KEY_INVALID"
    anonymous = Caller("nobody", "")
    async with sdk_client(mesh, anonymous, "JSONRPC") as client:
        with pytest.raises(A2AClientError, match="401"):
            await client.get_task(a2a.GetTaskRequest(id="x"))


async def test_a_revoked_certificate_is_refused(callers: Callers) -> None:
    files = callers.pki.files("a2a-mallory")
    async with httpx.AsyncClient(verify=client_ssl_context(files)) as http:
        response = await http.post(callers.mesh.base_url, json={})
    assert response.status_code == 401
    assert response.json()["error"]["reason"] == "CERT_REVOKED"
    mallory = Caller("mallory", callers.pki.spiffe_id("a2a-mallory"), files=files)
    async with sdk_client(callers.mesh, mallory, "GRPC") as client:
        with pytest.raises(Exception, match="revoked"):
            await client.get_task(a2a.GetTaskRequest(id="x"))


async def test_an_admin_certificate_is_not_acted_for(callers: Callers) -> None:
    admin = Caller("admin", callers.pki.spiffe_id("admin"), files=callers.pki.files("admin"))
    async with sdk_client(callers.mesh, admin, "JSONRPC") as client:
        with pytest.raises(InvalidRequestError) as raised:
            await client.list_tasks(a2a.ListTasksRequest())
    assert "DELEGATION_NOT_ALLOWED" in str(raised.value.data), raised.value.data


async def test_a_certificate_of_another_ca_is_refused(callers: Callers, foreign_pki: Pki) -> None:
    async with httpx.AsyncClient(verify=client_ssl_context_foreign(callers, foreign_pki)) as http:
        with pytest.raises(httpx.HTTPError):
            await http.post(callers.mesh.base_url, json={})


def client_ssl_context_foreign(callers: Callers, foreign_pki: Pki) -> ssl.SSLContext:
    context = anonymous_tls(callers.mesh)
    files = foreign_pki.files("client")
    context.load_cert_chain(str(files.cert), str(files.key))
    return context


# --- ownership ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("owner_name", "other_name", "binding"),
    [
        ("alice", "bob", "JSONRPC"),  # two client certificates
        ("carol", "erin", "JSONRPC"),  # an API key and a JWT, no client certificate
        ("alice", "carol", "JSONRPC"),  # a certificate and an API key
        ("alice", "bob", "GRPC"),
        ("carol+cert", "alice", "GRPC"),  # the token, not the certificate, is the caller
    ],
)
async def test_each_caller_sees_only_its_own_tasks(
    callers: Callers, owner_name: str, other_name: str, binding: str
) -> None:
    mesh = callers.mesh
    owner, other = by_name(callers, owner_name), by_name(callers, other_name)
    async with (
        sdk_client(mesh, owner, binding) as mine,
        sdk_client(mesh, other, binding) as theirs,
    ):
        task_id = await start_waiting_task(mine)
        stored = await mesh.coordinator_stub.GetTask(
            coordinator_pb2.GetTaskRequest(task_id=task_id)
        )
        assert stored.task.owner == owner.identity

        # The other caller cannot see, follow, answer or cancel it.
        with pytest.raises(TaskNotFoundError):
            await theirs.get_task(a2a.GetTaskRequest(id=task_id))
        with pytest.raises(TaskNotFoundError):
            await theirs.cancel_task(a2a.CancelTaskRequest(id=task_id))
        with pytest.raises(TaskNotFoundError):
            async for _ in theirs.subscribe(
                a2a.SubscribeToTaskRequest(id=task_id), context=from_start()
            ):
                pass
        answer = message("wait", "hello")
        answer.task_id = task_id
        with pytest.raises(TaskNotFoundError):
            async for _ in theirs.send_message(a2a.SendMessageRequest(message=answer)):
                pass
        listed = await theirs.list_tasks(a2a.ListTasksRequest())
        assert task_id not in {t.id for t in listed.tasks}

        # The owner sees it, follows it from the cursor, lists it and cancels it.
        got = await mine.get_task(a2a.GetTaskRequest(id=task_id))
        assert got.status.state == a2a.TASK_STATE_WORKING
        resumed = mine.subscribe(a2a.SubscribeToTaskRequest(id=task_id), context=from_start())
        first = await anext(aiter(resumed))
        await resumed.aclose()  # type: ignore[attr-defined]
        assert first.HasField("task") and first.task.id == task_id
        listed = await mine.list_tasks(a2a.ListTasksRequest())
        assert task_id in {t.id for t in listed.tasks}
        cancelled = await mine.cancel_task(a2a.CancelTaskRequest(id=task_id))
        assert cancelled.status.state == a2a.TASK_STATE_CANCELED


# --- delegation is the gateway's alone ------------------------------------------------


async def test_only_the_gateway_may_act_for_a_client(callers: Callers) -> None:
    mesh = callers.mesh
    bob = callers.pki.spiffe_id("a2a-bob")
    gateway = callers.pki.files("a2a")

    @contextlib.asynccontextmanager
    async def coordinator(files: TlsFiles) -> AsyncIterator[Any]:
        channel = secure_channel(mesh.coordinator.address, files)
        try:
            yield coordinator_pb2_grpc.CoordinatorServiceStub(channel)
        finally:
            await channel.close()

    # A client cannot pass itself off as another client, nor the gateway as an admin, an
    # agent, an identity of another trust domain or a name that is not one; nor may a
    # call with a bearer credential delegate.
    refused_cases = [
        (callers.alice, bob, ()),
        (gateway, callers.pki.spiffe_id("admin"), ()),
        (gateway, spiffe_id("agent", "interop"), ()),
        (gateway, spiffe_id("client", "x/../../admin/root"), ()),
        (gateway, "spiffe://elsewhere.example/client/bob", ()),
        (gateway, bob, (("authorization", f"Bearer {callers.carol_key}"),)),
    ]
    for files, target, extra in refused_cases:
        async with coordinator(files) as stub:
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await stub.ListTasks(
                    coordinator_pb2.ListTasksRequest(page_size=1),
                    timeout=10,
                    metadata=((ON_BEHALF_OF, target), *extra),
                )
        err = from_rpc_error(refused.value)
        assert err.code == grpc.StatusCode.PERMISSION_DENIED, (target, err)
        assert err.reason == "DELEGATION_NOT_ALLOWED", (target, err)
    # The gateway may act for a client: the task is the client's (that is how certificate
    # callers own their A2A tasks).
    as_bob = ((ON_BEHALF_OF, bob),)
    spec = coordinator_pb2.TaskSpec(capability="wait", input=common_pb2.Payload(text="x"))
    async with coordinator(gateway) as stub:
        submitted = await stub.SubmitTask(
            coordinator_pb2.SubmitTaskRequest(spec=spec), timeout=10, metadata=as_bob
        )
        assert submitted.task.owner == bob
        await stub.CancelTask(
            coordinator_pb2.CancelTaskRequest(task_id=submitted.task.task_id),
            timeout=10,
            metadata=as_bob,
        )


# --- the official JavaScript client with a bearer token -------------------------------


@pytest.fixture(scope="module")
def node_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    files = ("package.json", "package-lock.json", "a2a.mjs")
    return install_example(tmp_path_factory, NODE_EXAMPLE, files, what="A2A Node.js client")


async def run_node(callers: Callers, node_dir: Path, *args: str) -> tuple[int, list[Any], str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HIVEWIRE_")}
    code, out, err = await run_command(
        "node", str(node_dir / "a2a.mjs"), *args,
        "--url", callers.mesh.base_url, "--ca", str(callers.mesh.client_files.ca),
        cwd=node_dir, env=env, timeout=90,
    )  # fmt: skip
    events = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    return code, events, f"exit {code}\n{out}\n{err}"


async def test_the_javascript_sdk_client_authenticates_with_a_token(
    callers: Callers, node_dir: Path
) -> None:
    code, events, output = await run_node(
        callers, node_dir, "stream", "spell", "by token", "--token", callers.carol_key
    )
    assert code == 0, output
    assert events[-1]["state"] == "TASK_STATE_COMPLETED", output
    stored = await callers.mesh.coordinator_stub.GetTask(
        coordinator_pb2.GetTaskRequest(task_id=events[0]["id"])
    )
    assert stored.task.owner == spiffe_id("client", "carol")
    # Someone else's token does not reach it; a bad token is refused outright.
    code, _, output = await run_node(
        callers, node_dir, "get", events[0]["id"], "--token", callers.erin_token
    )
    assert code != 0 and "not found" in output, output
    code, _, output = await run_node(
        callers, node_dir, "stream", "spell", "x", "--token", "hwk_bad_token"
    )
    assert code != 0 and "the API key is not valid" in output, output


async def test_the_python_example_streams_with_a_token(callers: Callers, tmp_path: Path) -> None:
    # The documented command, from a directory laid out like the repository's root.
    (tmp_path / "certs").mkdir()
    (tmp_path / "certs" / "ca.pem").symlink_to(callers.mesh.client_files.ca)
    (tmp_path / ".hivewire").mkdir()
    endpoints = {"a2a": {"url": callers.mesh.base_url}}
    (tmp_path / ".hivewire" / "endpoints.json").write_text(json.dumps(endpoints))
    env = {k: v for k, v in os.environ.items() if not k.startswith("HIVEWIRE_")}
    code, out, err = await run_command(
        sys.executable, str(REPO_ROOT / "examples" / "a2a-python" / "stream.py"), "spell", "a b",
        cwd=tmp_path, env={**env, "HIVEWIRE_TOKEN": callers.erin_token}, timeout=90,
    )  # fmt: skip
    assert code == 0, f"{out}\n{err}"
    assert "final state: TASK_STATE_COMPLETED" in out
    task_id = json.loads(out.splitlines()[0].split(" ", 1)[1])["id"]
    stored = await callers.mesh.coordinator_stub.GetTask(
        coordinator_pb2.GetTaskRequest(task_id=task_id)
    )
    assert stored.task.owner == spiffe_id("client", "erin")
