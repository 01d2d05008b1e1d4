"""The coordinator's conversions: a record survives its store row, and the API's views of
webhooks show what the rows hold but never a secret.
"""

from __future__ import annotations

import dataclasses

from google.protobuf.message import Message

from hivewire.common.v1 import common_pb2
from hivewire.coordinator.v1 import coordinator_pb2
from hivewire.services.coordinator import convert
from hivewire.services.coordinator.model import TaskRecord
from hivewire.services.coordinator.webhook_store import DeliveryRow, WebhookRow

SECRET = "a-secret-of-sixteen-chars"


def _record() -> TaskRecord:
    """A record with every field set to something other than its default."""
    return TaskRecord(
        task_id="t1",
        spec=coordinator_pb2.TaskSpec(capability="summarize", idempotency_key="k1"),
        owner="spiffe://hivewire.local/client/alice",
        state=common_pb2.TASK_STATE_RUNNING,
        created_ns=1_000,
        updated_ns=2_000,
        deadline_ns=3_000,
        attempt=2,
        agent_id="agent-1",
        progress=common_pb2.Progress(message="half way"),
        output=common_pb2.Payload(text="out"),
        error=common_pb2.ErrorDetail(code="INTERNAL", reason="BOOM"),
        usage=common_pb2.Usage(total_tokens=7),
        pending_input=common_pb2.InputRequest(request_id="r1"),
        last_sequence=9,
        attempts=[
            coordinator_pb2.AttemptRecord(attempt=1),
            coordinator_pb2.AttemptRecord(attempt=2),
        ],
        not_before_ns=4_000,
        parent_task_id="p1",
        step_id="s1",
        role=coordinator_pb2.TASK_ROLE_STEP,
        project_id="proj-1",
        depth=1,
        steps=[coordinator_pb2.StepStatus(step_id="a")],
        coordinator="c1",
    )


def test_a_record_survives_its_store_row() -> None:
    record = _record()
    row = convert.record_to_row(record, record.spec.SerializeToString())
    assert (row.task_id, row.capability, row.idempotency_key, row.not_before_ns) == (
        "t1",
        "summarize",
        "k1",
        4_000,
    )
    assert convert.record_from_row(row) == record


def test_the_task_message_carries_the_record() -> None:
    record = _record()
    task = convert.task_to_proto(record)
    assert (task.attempt, task.agent_id, task.depth, task.coordinator_id) == (2, "agent-1", 1, "c1")
    assert task.deadline.ToNanoseconds() == 3_000 and task.pending_input.request_id == "r1"
    assert [a.attempt for a in task.attempts] == [1, 2] and task.spec == record.spec


def test_webhook_views_show_the_rows_but_never_a_secret() -> None:
    registration = convert.webhook_registration(
        WebhookRow("w1", "spiffe://hivewire.local/client/alice", "https://x.test/", SECRET, 5, "p")
    )
    assert (registration.webhook_id, registration.url, registration.project_id) == (
        "w1",
        "https://x.test/",
        "p",
    )
    assert registration.created_at.ToNanoseconds() == 5
    row = DeliveryRow(
        "d1", "w1", "alice", "t1", 3, "task.succeeded", "https://x.test/", SECRET, b"{}",
        2, 1, "HTTP 500", 5, 6, "p",
    )  # fmt: skip
    delivery = convert.webhook_delivery(row)
    assert (delivery.delivery_id, delivery.sequence, delivery.state, delivery.attempts) == (
        "d1",
        3,
        2,
        1,
    )
    assert (delivery.last_error, delivery.project_id) == ("HTTP 500", "p")
    assert delivery.next_attempt_at.ToNanoseconds() == 6
    assert SECRET not in str(registration) + str(delivery)


def test_a_snapshot_equals_its_record_and_shares_nothing_it_could_change() -> None:
    record = _record()
    snapshot = record.snapshot()
    assert snapshot == record
    for field in dataclasses.fields(TaskRecord):
        value = getattr(snapshot, field.name)
        if isinstance(value, Message | list):
            # Any message or list field, including one added later, is a copy...
            assert value is not getattr(record, field.name), field.name
        if isinstance(value, list):
            # ... and so is every message in a list.
            assert value, f"_record() leaves {field.name} empty"
            for copied, original in zip(value, getattr(record, field.name), strict=True):
                assert copied is not original, field.name
    record.usage.total_tokens += 1
    record.attempts[0].attempt = 9
    record.spec.capability = "changed"
    assert snapshot.usage.total_tokens == 7
    assert snapshot.attempts[0].attempt == 1
    assert snapshot.spec.capability == "summarize"
