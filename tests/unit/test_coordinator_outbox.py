"""The outbox entry format and the deterministic event ids (coordinator/outbox.py)."""

from __future__ import annotations

import pytest

from hivewire.events.v1 import events_pb2
from hivewire.services.coordinator.outbox import event_id, pack, unpack


def test_an_entry_holds_its_envelopes_in_order() -> None:
    events = [
        events_pb2.Event(id=event_id("t", 7), type="task.step", subject="t", task_sequence=7),
        events_pb2.Event(
            id=event_id("t", 7, "workflow.step_completed"),
            type="workflow.step_completed",
            subject="t",
            task_sequence=7,
        ),
    ]
    assert unpack(pack(events)) == events
    assert [e.id for e in events] == ["t:7", "t:7:workflow.step_completed"]
    assert unpack(b"") == []


@pytest.mark.parametrize("cut", [1, 3, 5])
def test_a_truncated_entry_is_refused(cut: int) -> None:
    entry = pack([events_pb2.Event(id="t:1", type="task.created")])
    with pytest.raises(ValueError, match="truncated"):
        unpack(entry[:-cut] if cut < len(entry) - 4 else entry[:3])
