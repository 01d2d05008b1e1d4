"""The A2A gateway used by the official ``a2a-sdk`` Python client, against a real mesh.

Real processes over mTLS: nats-server, the coordinator, the interop test agent and the
gateway (``python -m hivewire.services.a2a``). The client is the SDK's own
(``ClientFactory``, JSON-RPC with SSE, and the gRPC binding); nothing here speaks the
protocol by hand except the card fetch, whose JSON is checked against the SDK's types.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
import pytest_asyncio
from a2a.client import ClientCallContext, ClientConfig, ClientFactory
from a2a.client.card_resolver import A2ACardResolver, parse_agent_card
from a2a.client.client import Client
from a2a.types import a2a_pb2 as a2a
from a2a.utils.constants import TransportProtocol
from a2a.utils.errors import InvalidParamsError, TaskNotFoundError, UnsupportedOperationError
from google.protobuf import json_format, struct_pb2

from hivewire.common.v1 import common_pb2
from hivewire.coordinator.v1 import coordinator_pb2
from hivewire.services.a2a.handler import AFTER_SEQUENCE_HEADER
from tests.conftest import Pki
from tests.support.a2a_mesh import (
    SKILLS,
    A2aMesh,
    a2a_mesh,
    client_ssl_context,
    grpc_credentials,
    wait_for_card,
)

pytestmark = [pytest.mark.asyncio(loop_scope="module"), pytest.mark.timeout(180)]


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def mesh(pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[A2aMesh]:
    async with a2a_mesh(pki, tmp_path_factory.mktemp("e2e-a2a")) as running:
        yield running


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def http(mesh: A2aMesh) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(verify=client_ssl_context(mesh.client_files), timeout=60) as c:
        yield c


async def sdk_client(
    mesh: A2aMesh, http: httpx.AsyncClient, *, streaming: bool = True, binding: str = "JSONRPC"
) -> Client:
    card = await A2ACardResolver(http, mesh.base_url).get_agent_card()
    credentials = grpc_credentials(mesh.client_files)
    config = ClientConfig(
        streaming=streaming,
        httpx_client=http,
        supported_protocol_bindings=[binding],
        grpc_channel_factory=lambda url: grpc.aio.secure_channel(url, credentials),
    )
    return ClientFactory(config).create(card)


def message(
    skill: str | None, text: str = "", *, task_id: str = "", data: Any = None
) -> a2a.Message:
    msg = a2a.Message(message_id=uuid.uuid4().hex, role=a2a.ROLE_USER, task_id=task_id)
    if text:
        msg.parts.append(a2a.Part(text=text))
    if data is not None:
        msg.parts.append(a2a.Part(data=json_format.ParseDict(data, struct_pb2.Value())))
    if skill:
        msg.metadata.update({"skill": skill})
    return msg


def kind(event: a2a.StreamResponse) -> str:
    return str(event.WhichOneof("payload"))


def state_of(event: a2a.StreamResponse) -> int:
    if event.HasField("task"):
        return event.task.status.state
    if event.HasField("status_update"):
        return event.status_update.status.state
    return -1


def sequence_of(event: a2a.StreamResponse) -> int:
    for field in ("status_update", "artifact_update"):
        if event.HasField(field):  # type: ignore[arg-type]
            meta = json_format.MessageToDict(getattr(event, field).metadata)
            return int(meta["hivewire"]["sequence"])
    return 0


async def collect(stream: AsyncIterator[a2a.StreamResponse]) -> list[a2a.StreamResponse]:
    return [event async for event in stream]


def text_parts(artifact: a2a.Artifact) -> str:
    return "".join(p.text for p in artifact.parts if p.WhichOneof("content") == "text")


def data_part(artifact: a2a.Artifact) -> dict[str, Any]:
    for part in artifact.parts:
        if part.WhichOneof("content") == "data":
            value: dict[str, Any] = json_format.MessageToDict(part.data)
            return value
    raise AssertionError(f"no data part in {artifact}")


# --- the card -------------------------------------------------------------------------


async def test_card_lists_every_capability_and_validates_against_the_sdk_types(
    mesh: A2aMesh, http: httpx.AsyncClient
) -> None:
    response = await http.get(mesh.card_url)
    assert response.status_code == 200
    document = response.json()
    # Strict: every field of the served JSON is a field of the SDK's AgentCard.
    strict = json_format.ParseDict(document, a2a.AgentCard())
    assert parse_agent_card(document) == strict
    assert {s.id for s in strict.skills} >= set(SKILLS)
    spell = next(s for s in strict.skills if s.id == "spell")
    assert spell.description.startswith("Stream the words")
    assert "interop" in spell.tags
    bindings = {i.protocol_binding: i.url for i in strict.supported_interfaces}
    assert bindings[TransportProtocol.JSONRPC.value] == mesh.base_url
    assert bindings[TransportProtocol.GRPC.value] == mesh.grpc_address
    assert strict.capabilities.streaming
    assert strict.security_schemes["mtls"].HasField("mtls_security_scheme")
    assert "mtls" in strict.security_requirements[0].schemes


async def test_the_gateway_refuses_a_client_without_a_mesh_certificate(mesh: A2aMesh) -> None:
    import ssl

    anonymous = ssl.create_default_context(cafile=str(mesh.client_files.ca))
    async with httpx.AsyncClient(verify=anonymous) as http:
        # The card is public (it says how to authenticate); nothing else is.
        assert (await http.get(mesh.card_url)).status_code == 200
        request = {"jsonrpc": "2.0", "id": 1, "method": "GetTask", "params": {"id": "x"}}
        refused = await http.post(mesh.base_url, json=request)
        assert refused.status_code == 401
        assert refused.json()["error"]["reason"] == "NO_CREDENTIALS"
        # Without end-user authentication configured, bearer credentials are no way in.
        token = await http.post(mesh.base_url, json=request, headers={"Authorization": "Bearer x"})
        assert token.status_code == 401
        assert token.json()["error"]["reason"] == "TOKENS_NOT_ACCEPTED"


async def test_skills_follow_agents_joining_and_leaving(mesh: A2aMesh, pki: Pki, tmp_path) -> None:
    from tests.support.e2e_mesh import CALCULATOR, agent_process

    async with agent_process(
        tmp_path, CALCULATOR, name="calc", certs_dir=pki.dir, nats_url=mesh.nats.url
    ):
        await wait_for_card(mesh, ("calculate",))
    async with httpx.AsyncClient(verify=client_ssl_context(mesh.client_files)) as http:
        from tests.helpers import eventually

        async def gone() -> None:
            card = (await http.get(mesh.card_url)).json()
            assert "calculate" not in {s["id"] for s in card["skills"]}

        await eventually(gone, timeout=60, interval=0.2)


# --- messages and tasks ---------------------------------------------------------------


async def test_streams_a_skill_to_completion_with_artifacts(
    mesh: A2aMesh, http: httpx.AsyncClient
) -> None:
    client = await sdk_client(mesh, http)
    events = await collect(
        client.send_message(a2a.SendMessageRequest(message=message("spell", "one two three")))
    )
    assert kind(events[0]) == "task"
    assert events[0].task.status.state == a2a.TASK_STATE_SUBMITTED
    task_id = events[0].task.id
    words = [e.artifact_update for e in events if e.HasField("artifact_update")
             and e.artifact_update.artifact.artifact_id == "words"]  # fmt: skip
    assert "".join(text_parts(w.artifact) for w in words) == "one two three "
    assert [w.append for w in words] == [True, True, True]
    assert words[-1].last_chunk
    result = [e.artifact_update for e in events if e.HasField("artifact_update")
              and e.artifact_update.artifact.artifact_id == "result"]  # fmt: skip
    assert data_part(result[0].artifact) == {"words": 3.0, "text": "one two three"}
    assert any(state_of(e) == a2a.TASK_STATE_WORKING for e in events)
    assert state_of(events[-1]) == a2a.TASK_STATE_COMPLETED
    sequences = [sequence_of(e) for e in events[1:]]
    # Every event carries hivewire's sequence; the finish is two events of one sequence.
    assert sequences == sorted(sequences) and all(s > 0 for s in sequences)

    got = await client.get_task(a2a.GetTaskRequest(id=task_id))
    assert got.status.state == a2a.TASK_STATE_COMPLETED
    by_id = {a.artifact_id: a for a in got.artifacts}
    assert text_parts(by_id["words"]) == "one two three "
    assert data_part(by_id["result"]) == {"words": 3.0, "text": "one two three"}
    assert got.history[0].parts[0].text == "one two three"
    # The same task in hivewire's own API.
    hive = await mesh.coordinator_stub.GetTask(coordinator_pb2.GetTaskRequest(task_id=task_id))
    assert hive.task.state == common_pb2.TASK_STATE_SUCCEEDED
    assert hive.task.spec.capability == "spell"
    assert hive.task.spec.metadata.session_id == got.context_id


async def test_blocking_send_returns_the_finished_task(
    mesh: A2aMesh, http: httpx.AsyncClient
) -> None:
    client = await sdk_client(mesh, http, streaming=False)
    events = await collect(
        client.send_message(a2a.SendMessageRequest(message=message("spell", "a b")))
    )
    assert len(events) == 1 and events[0].HasField("task")
    task = events[0].task
    assert task.status.state == a2a.TASK_STATE_COMPLETED
    assert data_part({a.artifact_id: a for a in task.artifacts}["result"])["words"] == 2.0


async def test_cancel_mid_way(mesh: A2aMesh, http: httpx.AsyncClient) -> None:
    client = await sdk_client(mesh, http)
    stream = client.send_message(a2a.SendMessageRequest(message=message("wait")))
    seen: list[a2a.StreamResponse] = []
    task_id = ""
    cancelled: a2a.Task | None = None
    async for event in stream:
        seen.append(event)
        if event.HasField("task"):
            task_id = event.task.id
        if state_of(event) == a2a.TASK_STATE_WORKING and cancelled is None:
            cancelled = await client.cancel_task(a2a.CancelTaskRequest(id=task_id))
    assert cancelled is not None and cancelled.status.state == a2a.TASK_STATE_CANCELED
    assert state_of(seen[-1]) == a2a.TASK_STATE_CANCELED
    got = await client.get_task(a2a.GetTaskRequest(id=task_id))
    assert got.status.state == a2a.TASK_STATE_CANCELED
    # Cancelling again changes nothing; a finished task is not cancelable.
    again = await client.cancel_task(a2a.CancelTaskRequest(id=task_id))
    assert again.status.state == a2a.TASK_STATE_CANCELED


async def test_answers_an_input_request(mesh: A2aMesh, http: httpx.AsyncClient) -> None:
    client = await sdk_client(mesh, http)
    first = await collect(client.send_message(a2a.SendMessageRequest(message=message("greet"))))
    last = first[-1]
    assert state_of(last) == a2a.TASK_STATE_INPUT_REQUIRED
    assert last.status_update.status.message.parts[0].text == "What is your name?"
    task_id = last.status_update.task_id
    got = await client.get_task(a2a.GetTaskRequest(id=task_id))
    assert got.status.state == a2a.TASK_STATE_INPUT_REQUIRED

    answer = message(None, "Ada", task_id=task_id)
    answer.context_id = last.status_update.context_id
    second = await collect(client.send_message(a2a.SendMessageRequest(message=answer)))
    assert state_of(second[0]) == a2a.TASK_STATE_WORKING
    assert state_of(second[-1]) == a2a.TASK_STATE_COMPLETED
    result = [e for e in second if e.HasField("artifact_update")][-1].artifact_update.artifact
    assert text_parts(result) == "hello, Ada"
    # A finished task takes no more messages.
    with pytest.raises(UnsupportedOperationError):
        await collect(
            client.send_message(a2a.SendMessageRequest(message=message(None, "x", task_id=task_id)))
        )


async def test_answers_an_approval_with_a_data_part(mesh: A2aMesh, http: httpx.AsyncClient) -> None:
    client = await sdk_client(mesh, http)
    first = await collect(
        client.send_message(a2a.SendMessageRequest(message=message("guarded", "launch")))
    )
    asked = first[-1].status_update.status.message
    details = json_format.MessageToDict(asked.parts[1].data)["hivewire"]
    assert details["kind"] == "approval"
    second = await collect(
        client.send_message(
            a2a.SendMessageRequest(
                message=message(
                    None,
                    task_id=first[-1].status_update.task_id,
                    data={"approved": True, "comment": "go"},
                )  # fmt: skip
            )
        )
    )
    result = [e for e in second if e.HasField("artifact_update")][-1].artifact_update.artifact
    assert text_parts(result) == "approved"


async def test_resubscribe_resumes_from_the_sequence_cursor(
    mesh: A2aMesh, http: httpx.AsyncClient
) -> None:
    client = await sdk_client(mesh, http)
    events = await collect(
        client.send_message(
            a2a.SendMessageRequest(message=message("spell", "alpha beta gamma delta"))
        )
    )
    task_id = events[0].task.id
    sequences = [sequence_of(e) for e in events[1:]]
    cursor = sequences[len(sequences) // 2]
    expected = [s for s in sequences if s > cursor]
    context = ClientCallContext(service_parameters={AFTER_SEQUENCE_HEADER: str(cursor)})
    resumed = await collect(
        client.subscribe(a2a.SubscribeToTaskRequest(id=task_id), context=context)
    )
    assert resumed[0].HasField("task") and resumed[0].task.id == task_id
    assert [sequence_of(e) for e in resumed[1:]] == expected
    assert state_of(resumed[-1]) == a2a.TASK_STATE_COMPLETED


async def test_resubscribe_to_a_paused_task_gets_what_happens_next(
    mesh: A2aMesh, http: httpx.AsyncClient
) -> None:
    client = await sdk_client(mesh, http)
    first = await collect(client.send_message(a2a.SendMessageRequest(message=message("greet"))))
    task_id = first[0].task.id
    cursor = sequence_of(first[-1])
    answer = message(None, "Grace", task_id=task_id)
    await collect(client.send_message(a2a.SendMessageRequest(message=answer)))
    context = ClientCallContext(service_parameters={AFTER_SEQUENCE_HEADER: str(cursor)})
    resumed = await collect(
        client.subscribe(a2a.SubscribeToTaskRequest(id=task_id), context=context)
    )
    assert all(sequence_of(e) > cursor for e in resumed[1:])
    assert state_of(resumed[-1]) == a2a.TASK_STATE_COMPLETED


async def test_grpc_binding_streams_and_gets(mesh: A2aMesh, http: httpx.AsyncClient) -> None:
    client = await sdk_client(mesh, http, binding="GRPC")
    events = await collect(
        client.send_message(a2a.SendMessageRequest(message=message("spell", "over grpc")))
    )
    assert state_of(events[-1]) == a2a.TASK_STATE_COMPLETED
    got = await client.get_task(a2a.GetTaskRequest(id=events[0].task.id))
    assert got.status.state == a2a.TASK_STATE_COMPLETED


async def test_errors_are_a2a_errors(mesh: A2aMesh, http: httpx.AsyncClient) -> None:
    client = await sdk_client(mesh, http)
    with pytest.raises(InvalidParamsError, match="no-such-skill"):
        await collect(
            client.send_message(a2a.SendMessageRequest(message=message("no-such-skill", "x")))
        )
    with pytest.raises(InvalidParamsError, match="skill"):
        await collect(client.send_message(a2a.SendMessageRequest(message=message(None, "x"))))
    with pytest.raises(TaskNotFoundError):
        await client.get_task(a2a.GetTaskRequest(id="0" * 32))


async def test_lists_the_tasks_of_a_context(mesh: A2aMesh, http: httpx.AsyncClient) -> None:
    client = await sdk_client(mesh, http)
    context_id = uuid.uuid4().hex
    started = []
    for text in ("x y", "z"):
        msg = message("spell", text)
        msg.context_id = context_id
        events = await collect(client.send_message(a2a.SendMessageRequest(message=msg)))
        started.append(events[0].task.id)
    listed = await client.list_tasks(a2a.ListTasksRequest(context_id=context_id))
    assert sorted(t.id for t in listed.tasks) == sorted(started)
    assert all(t.status.state == a2a.TASK_STATE_COMPLETED for t in listed.tasks)
    completed = await client.list_tasks(
        a2a.ListTasksRequest(context_id=context_id, status=a2a.TASK_STATE_WORKING)
    )
    assert list(completed.tasks) == []


async def test_a_gateway_whose_tokens_the_coordinator_ignores_starts_nothing(
    mesh: A2aMesh, pki: Pki, tmp_path: Path
) -> None:
    # A misconfiguration: API keys on the gateway, none on this mesh's coordinator, which
    # then ignores the passed-on token and would make the gateway the owner of every
    # bearer caller's task. The gateway cancels such a task and says why.
    from a2a.client.auth.credentials import CredentialService
    from a2a.client.auth.interceptor import AuthInterceptor
    from a2a.utils.errors import InternalError

    from hivewire.services.runtime.authn import ApiKeyStore
    from tests.support.e2e_mesh import mesh_process

    key, _ = ApiKeyStore(tmp_path / "keys.json").create("mallory")

    class Token(CredentialService):
        async def get_credentials(self, scheme: str, context: ClientCallContext | None) -> str:
            return key

    async with mesh_process(
        "hivewire.services.a2a",
        workdir=tmp_path,
        name="a2a-keys",
        certs_dir=pki.dir,
        identity="a2a",
        nats_url=mesh.nats.url,
        env={
            "HIVEWIRE_A2A__COORDINATOR_ADDRESS": mesh.coordinator.address,
            "HIVEWIRE_A2A__HTTP_PORT": "0",
            "HIVEWIRE_AUTH__API_KEYS_FILE": str(tmp_path / "keys.json"),
        },
    ) as gateway:
        url = f"https://127.0.0.1:{gateway.ports['http']}/"
        async with httpx.AsyncClient(verify=client_ssl_context(mesh.client_files)) as http:
            card = await A2ACardResolver(http, url).get_agent_card()
            client = ClientFactory(ClientConfig(httpx_client=http)).create(
                card, interceptors=[AuthInterceptor(Token())]
            )
            with pytest.raises(InternalError) as raised:
                await collect(client.send_message(a2a.SendMessageRequest(message=message("wait"))))
    assert "A2A_OWNER_MISMATCH" in str(raised.value.data), raised.value.data
    listed = await mesh.coordinator_stub.ListTasks(
        coordinator_pb2.ListTasksRequest(states=[common_pb2.TASK_STATE_CANCELLED])
    )
    reasons = {t.task_id: t.error.message for t in listed.tasks}
    assert "not owned by its A2A caller" in " ".join(reasons.values()), reasons
