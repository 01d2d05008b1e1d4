"""The A2A <-> hivewire mapping (services/a2a/convert.py), message by message."""

from __future__ import annotations

import pytest
from a2a.types import a2a_pb2 as a2a
from google.protobuf import json_format, struct_pb2

from hivewire.common.v1 import common_pb2 as S
from hivewire.coordinator.v1 import coordinator_pb2 as C
from hivewire.services.a2a import convert
from hivewire.services.a2a.remote import capability_name
from hivewire.services.runtime.errors import InvalidArgument


def value(data: object) -> struct_pb2.Value:
    return json_format.ParseDict(data, struct_pb2.Value())


def test_every_hivewire_state_has_an_a2a_state() -> None:
    for state in S.TaskState.values():
        assert state in convert.STATE_TO_A2A
    assert convert.STATE_TO_A2A[S.TASK_STATE_DEAD_LETTERED] == a2a.TASK_STATE_FAILED
    assert convert.STATE_TO_A2A[S.TASK_STATE_ASSIGNED] == a2a.TASK_STATE_SUBMITTED


def test_parts_become_a_payload() -> None:
    parts = [
        a2a.Part(text="first"),
        a2a.Part(data=value({"a": 1})),
        a2a.Part(text="second"),
        a2a.Part(data=value({"ignored": True})),
        a2a.Part(raw=b"\x00\x01", media_type="application/pdf"),
        a2a.Part(url="https://example.com/x"),
    ]
    payload = convert.payload_from_parts(parts)
    assert payload.text == "first\nsecond"
    assert json_format.MessageToDict(payload.json) == {"a": 1, "urls": ["https://example.com/x"]}
    assert payload.data == b"\x00\x01" and payload.content_type == "application/pdf"


def test_a_data_part_that_is_not_an_object_is_wrapped() -> None:
    payload = convert.payload_from_parts([a2a.Part(data=value([1, 2]))])
    assert json_format.MessageToDict(payload.json) == {"value": [1, 2]}


def test_a_payload_becomes_parts_and_back() -> None:
    payload = S.Payload(text="hi", data=b"xyz", content_type="text/csv")
    payload.json.update({"k": "v"})
    parts = convert.parts_from_payload(payload)
    assert [p.WhichOneof("content") for p in parts] == ["text", "data", "raw"]
    assert convert.payload_from_parts(parts) == payload


def test_task_options_read_the_skill_and_hivewire_metadata() -> None:
    request = a2a.SendMessageRequest(message=a2a.Message(message_id="m1"))
    request.message.metadata.update(
        {"skill": "summarize", "hivewire": {"priority": "high", "timeoutSeconds": 12.5,
                                            "tokenBudget": 100, "labels": {"team": "x"}}}
    )  # fmt: skip
    options = convert.task_options(request)
    assert options == convert.TaskOptions(
        skill="summarize", priority=S.PRIORITY_HIGH, timeout=12.5, token_budget=100,
        labels={"team": "x"},
    )  # fmt: skip
    spec = convert.task_spec(request, options, context_id="ctx")
    assert spec.capability == "summarize"
    assert spec.idempotency_key == "a2a:m1"
    assert spec.metadata.session_id == "ctx" and spec.metadata.source == "a2a"
    assert spec.timeout.ToMilliseconds() == 12500


def test_a_message_without_a_skill_is_invalid_unless_there_is_a_default() -> None:
    request = a2a.SendMessageRequest(message=a2a.Message(message_id="m1"))
    with pytest.raises(InvalidArgument) as raised:
        convert.task_options(request)
    assert raised.value.reason == "A2A_SKILL_REQUIRED"
    assert convert.task_options(request, default_skill="echo").skill == "echo"


def test_a_bad_priority_is_invalid() -> None:
    request = a2a.SendMessageRequest(message=a2a.Message(message_id="m1"))
    request.message.metadata.update({"skill": "s", "hivewire": {"priority": "urgent"}})
    with pytest.raises(InvalidArgument):
        convert.task_options(request)


@pytest.mark.parametrize(
    ("parts", "approved"),
    [
        ([a2a.Part(text="Yes")], True),
        ([a2a.Part(text="nope")], False),
        ([a2a.Part(data=value({"approved": True, "comment": "ok"}))], True),
        ([a2a.Part(data=value({"approved": False}))], False),
    ],
)
def test_approvals_read_data_or_text(parts: list[a2a.Part], approved: bool) -> None:
    pending = S.InputRequest(request_id="r1", kind=S.INPUT_KIND_APPROVAL)
    answer = convert.input_response(pending, a2a.Message(parts=parts))
    assert answer.request_id == "r1" and answer.approved is approved


def test_text_answers_carry_the_payload() -> None:
    pending = S.InputRequest(request_id="r2", kind=S.INPUT_KIND_TEXT)
    answer = convert.input_response(pending, a2a.Message(parts=[a2a.Part(text="Ada")]))
    assert answer.value.text == "Ada"


def event(sequence: int, **kind: object) -> C.TaskEvent:
    return C.TaskEvent(task_id="t1", sequence=sequence, **kind)  # type: ignore[arg-type]


def test_events_map_to_status_and_artifact_updates() -> None:
    progress = convert.event_to_a2a(
        event(3, progress=S.Progress(fraction=0.5, message="half")), "c"
    )
    [update] = progress
    assert isinstance(update, a2a.TaskStatusUpdateEvent)
    assert update.status.state == a2a.TASK_STATE_WORKING
    assert update.status.message.parts[0].text == "half"
    meta = json_format.MessageToDict(update.metadata)["hivewire"]
    assert meta == {"sequence": 3, "event": "progress", "progress": {"fraction": 0.5, "step": ""}}

    chunk = S.PartialResult(artifact_id="out", content=S.Payload(text="ab"), append=True)
    [artifact] = convert.event_to_a2a(event(4, partial=chunk), "c")
    assert isinstance(artifact, a2a.TaskArtifactUpdateEvent)
    assert artifact.artifact.artifact_id == "out" and artifact.append

    asked = S.InputRequest(request_id="r", prompt="name?", kind=S.INPUT_KIND_APPROVAL)
    [paused] = convert.event_to_a2a(event(5, input_required=asked), "c")
    assert convert.is_final(paused)
    assert isinstance(paused, a2a.TaskStatusUpdateEvent)
    details = json_format.MessageToDict(paused.status.message.parts[1].data)
    assert details == {"hivewire": {"requestId": "r", "kind": "approval"}}

    into_input = C.StateChange(to_state=S.TASK_STATE_INPUT_REQUIRED)
    assert convert.event_to_a2a(event(6, state_changed=into_input), "c") == []


def test_the_finish_is_the_result_artifact_then_the_terminal_status() -> None:
    finished = C.TaskFinished(state=S.TASK_STATE_SUCCEEDED, output=S.Payload(text="done"))
    result, status = convert.event_to_a2a(event(9, finished=finished), "c")
    assert isinstance(result, a2a.TaskArtifactUpdateEvent)
    assert result.artifact.artifact_id == convert.RESULT_ARTIFACT
    assert isinstance(status, a2a.TaskStatusUpdateEvent)
    assert status.status.state == a2a.TASK_STATE_COMPLETED and convert.is_final(status)

    failed = C.TaskFinished(
        state=S.TASK_STATE_DEAD_LETTERED, error=S.ErrorDetail(reason="BOOM", message="no")
    )
    [status] = convert.event_to_a2a(event(9, finished=failed), "c")
    assert isinstance(status, a2a.TaskStatusUpdateEvent)
    assert status.status.state == a2a.TASK_STATE_FAILED
    assert status.status.message.parts[0].text == "BOOM: no"


def test_the_fold_joins_streamed_text_and_replaces_on_a_fresh_chunk() -> None:
    fold = convert.ArtifactFold()
    for text, append in (("a", False), ("b", True), ("c", True)):
        fold.add(a2a.TaskArtifactUpdateEvent(
            artifact=a2a.Artifact(artifact_id="x", parts=[a2a.Part(text=text)]), append=append
        ))  # fmt: skip
    [artifact] = fold.artifacts
    assert [p.text for p in artifact.parts] == ["abc"]
    fresh = a2a.Artifact(artifact_id="x", parts=[a2a.Part(text="z")])
    fold.add(a2a.TaskArtifactUpdateEvent(artifact=fresh))
    assert [p.text for p in fold.artifacts[0].parts] == ["z"]


def test_a_task_view_carries_state_history_and_the_result() -> None:
    task = C.Task(task_id="t1", state=S.TASK_STATE_SUCCEEDED, last_sequence=7)
    task.spec.capability = "spell"
    task.spec.input.text = "hello"
    task.spec.metadata.session_id = "ctx"
    task.output.text = "done"
    view = convert.task_to_a2a(task)
    assert view.id == "t1" and view.context_id == "ctx"
    assert view.status.state == a2a.TASK_STATE_COMPLETED
    assert [a.artifact_id for a in view.artifacts] == ["result"]
    assert view.history[0].parts[0].text == "hello"
    meta = json_format.MessageToDict(view.metadata)["hivewire"]
    assert meta["skill"] == "spell" and meta["sequence"] == 7


@pytest.mark.parametrize(
    ("skill", "prefix", "name"),
    [("shout", "", "shout"), ("Confirm Order", "", "confirm-order"),
     ("a.b/c", "ext-", "ext-a-b-c"), ("???", "", "skill")],
)  # fmt: skip
def test_remote_skill_ids_become_capability_names(skill: str, prefix: str, name: str) -> None:
    assert capability_name(skill, prefix) == name
