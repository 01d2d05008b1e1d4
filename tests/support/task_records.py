"""A coordinator's in-memory task, built without a coordinator (journal and store tests)."""

from __future__ import annotations

from hivewire.common.v1 import common_pb2
from hivewire.coordinator.v1 import coordinator_pb2
from hivewire.services.coordinator.journal import TaskRuntime
from hivewire.services.coordinator.model import TaskRecord, now_ns


def queued_runtime(spec: coordinator_pb2.TaskSpec, task_id: str = "t-1") -> TaskRuntime:
    """A ``QUEUED`` task of ``spec``, owned by the test client, due in a minute."""
    now = now_ns()
    record = TaskRecord(
        task_id=task_id,
        spec=spec,
        owner="spiffe://hivewire.local/client/test",
        state=common_pb2.TASK_STATE_QUEUED,
        created_ns=now,
        updated_ns=now,
        deadline_ns=now + 60 * 10**9,
    )
    return TaskRuntime(record, spec.SerializeToString())
