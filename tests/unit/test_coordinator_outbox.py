"""The outbox entry format and the deterministic event ids (coordinator/outbox.py)."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from collections.abc import Sequence
from pathlib import Path

import pytest

from hivewire.common.v1 import common_pb2
from hivewire.coordinator.v1 import coordinator_pb2
from hivewire.events.v1 import events_pb2
from hivewire.services.coordinator.journal import EVENT_COPY_MAX, copy_event
from hivewire.services.coordinator.outbox import OutboxRelay, RelayOptions, event_id, pack, unpack
from hivewire.services.coordinator.sqlite_store import SqliteTaskStore
from hivewire.services.coordinator.store import EventRow, OutboxItem, StoreError
from tests.helpers import eventually


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


class HeldSink:
    """Acknowledges what it is sent only when told to."""

    enabled = True
    source = "coordinator/test"

    def __init__(self) -> None:
        self.sent: list[events_pb2.Event] = []
        self.pending: list[asyncio.Future[None]] = []
        self.got = asyncio.Event()

    def send(self, events: Sequence[events_pb2.Event]) -> asyncio.Future[None]:
        self.sent.extend(events)
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.pending.append(future)
        self.got.set()
        return future


async def test_stop_records_what_is_acknowledged_while_it_waits(tmp_path: Path) -> None:
    entry = pack([events_pb2.Event(id="t:1", type="task.created", subject="t")])
    async with SqliteTaskStore(tmp_path / "c.db") as store:
        await store.put(events=[EventRow("t", 1, b"e", outbox=entry)])
        sink = HeldSink()
        relay = OutboxRelay(store, sink, options=RelayOptions(stop_timeout=30))
        await relay.start()
        await sink.got.wait()
        reader = relay._reader
        stopping = asyncio.ensure_future(relay.stop())
        # Acknowledged once the relay stopped reading and waits for what is in flight.
        await eventually(reader.done)
        assert not stopping.done()
        sink.pending[0].set_result(None)
        await stopping
        assert relay.published == 1
    async with SqliteTaskStore(tmp_path / "c.db") as store:
        # Recorded: a restarted relay would not send it again.
        waiting = asyncio.ensure_future(store.outbox_next(0, limit=10))
        await store.put(events=[EventRow("t", 2, b"e", outbox=b"")])
        await store.put(events=[EventRow("u", 1, b"e", outbox=entry)])
        assert [i.entry for i in await asyncio.wait_for(waiting, 30)] == [entry]
        assert len(await store.outbox_next(0, limit=10)) == 1


async def test_stop_leaves_what_is_never_acknowledged_for_a_restart(tmp_path: Path) -> None:
    entry = pack([events_pb2.Event(id="t:1", type="task.created", subject="t")])
    async with SqliteTaskStore(tmp_path / "c.db") as store:
        await store.put(events=[EventRow("t", 1, b"e", outbox=entry)])
        sink = HeldSink()
        relay = OutboxRelay(store, sink, options=RelayOptions(stop_timeout=0.01))
        await relay.start()
        await sink.got.wait()
        await relay.stop()  # NATS never answered
        assert relay.published == 0
        assert [i.entry for i in await store.outbox_next(0, limit=10)] == [entry]


class AckingSink:
    """Acknowledges at once."""

    enabled = True
    source = "coordinator/test"

    def __init__(self) -> None:
        self.sent: list[events_pb2.Event] = []

    def send(self, events: Sequence[events_pb2.Event]) -> asyncio.Future[None]:
        self.sent.extend(events)
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        future.set_result(None)
        return future


async def test_reading_waits_while_the_store_cannot_record(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Published but unrecorded entries (sent again after a restart) stay bounded."""
    async with SqliteTaskStore(tmp_path / "c.db") as store:
        for n in range(1, 41):
            entry = pack([events_pb2.Event(id=f"t:{n}", type="task.created", subject="t")])
            await store.put(events=[EventRow("t", n, b"e", outbox=entry)])
        recorded = store.outbox_done
        failing = True

        async def outbox_done(position: int) -> None:
            if failing:
                raise StoreError("the store cannot write")
            await recorded(position)

        monkeypatch.setattr(store, "outbox_done", outbox_done)
        sink = AckingSink()
        options = RelayOptions(batch=2, in_flight=2, record_every=1, record_interval=0.01)
        async with OutboxRelay(store, sink, options=options) as relay:
            # Two reads of two entries acknowledged and not recorded: reading waits.
            await eventually(lambda: not relay._room.is_set())
            assert len(sink.sent) <= options.in_flight * options.batch + options.batch
            failing = False
            await eventually(lambda: len(sink.sent) == 40, timeout=30)
            await eventually(lambda: relay._unrecorded == 0, timeout=30)
        with contextlib.closing(sqlite3.connect(tmp_path / "c.db")) as conn:
            assert conn.execute("SELECT COUNT(*) FROM outbox").fetchone() == (0,)


class FailingOnceSink:
    """Fails its first send (raising, or with a future that fails), then stores at once."""

    enabled = True
    source = "coordinator/test"

    def __init__(self, how: str) -> None:
        self.how = how
        self.sent: list[str] = []
        self.stored: list[str] = []

    def send(self, events: Sequence[events_pb2.Event]) -> asyncio.Future[None]:
        first = not self.sent
        self.sent.extend(e.id for e in events)
        if first and self.how == "raises":
            raise RuntimeError("a bug in the publisher")
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if first:
            future.set_exception(ConnectionError("not stored"))
        else:
            self.stored.extend(e.id for e in events)
            future.set_result(None)
        return future


@pytest.mark.parametrize("how", ["raises", "fails"])
async def test_what_the_publisher_did_not_store_is_sent_again(tmp_path: Path, how: str) -> None:
    """A send that raises, or whose future fails: those entries go out again, none skipped."""
    ids = [f"t:{n}" for n in range(1, 7)]
    async with SqliteTaskStore(tmp_path / "c.db") as store:
        for n, id_ in enumerate(ids, 1):
            entry = pack([events_pb2.Event(id=id_, type="task.created", subject="t")])
            await store.put(events=[EventRow("t", n, b"e", outbox=entry)])
        sink = FailingOnceSink(how)
        options = RelayOptions(batch=2, in_flight=3, record_interval=0.01)
        async with OutboxRelay(store, sink, options=options):
            await eventually(lambda: set(sink.stored) == set(ids), timeout=30)
        assert sink.sent[:2] == ["t:1", "t:2"]
        assert sink.sent.count("t:1") == sink.sent.count("t:2") == 2  # sent again
        with contextlib.closing(sqlite3.connect(tmp_path / "c.db")) as conn:
            assert conn.execute("SELECT COUNT(*) FROM outbox").fetchone() == (0,)


def entry(n: int) -> bytes:
    """The outbox entry of event ``t:<n>``."""
    return pack([events_pb2.Event(id=f"t:{n}", type="task.created", subject="t")])


def lose_cancellations(
    store: SqliteTaskStore, monkeypatch: pytest.MonkeyPatch
) -> list[asyncio.Task[None]]:
    """The tasks put in the list returned read on when cancelled in ``outbox_next``.

    As on Python 3.11, where a cancellation that lands together with a result is lost.
    """
    real = store.outbox_next
    deaf: list[asyncio.Task[None]] = []

    async def outbox_next(after: int, *, limit: int) -> list[OutboxItem]:
        while True:
            try:
                return await real(after, limit=limit)
            except asyncio.CancelledError:
                task = asyncio.current_task()
                if task is None or task not in deaf:
                    raise
                task.uncancel()

    monkeypatch.setattr(store, "outbox_next", outbox_next)
    return deaf


async def test_a_replaced_reader_whose_cancellation_is_lost_hands_nothing_over(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """After a failed publish the reader is replaced; the old one may go on, but sends nothing.

    What it read after the failure must not be acknowledged ahead of what is read again.
    """
    async with SqliteTaskStore(tmp_path / "c.db") as store:
        for n in (1, 2):
            await store.put(events=[EventRow("t", n, b"e", outbox=entry(n))])
        deaf = lose_cancellations(store, monkeypatch)
        sink = HeldSink()
        relay = OutboxRelay(store, sink, options=RelayOptions(batch=2, record_interval=0.01))
        async with relay:
            await sink.got.wait()
            deaf.append(relay._reader)
            sink.pending[0].set_exception(ConnectionError("not stored"))
            await eventually(lambda: relay._reader is not deaf[0])
            for n in (3, 4):  # the old reader wakes with these
                await store.put(events=[EventRow("t", n, b"e", outbox=entry(n))])
            await eventually(lambda: deaf[0].done(), timeout=30)
            assert [e.id for e in sink.sent] == ["t:1", "t:2"]  # nothing from the old one
            await eventually(lambda: len(sink.sent) == 6, timeout=30)  # read again: all four
            for future in sink.pending[1:]:
                future.set_result(None)
            await eventually(lambda: relay._unrecorded == 0 and relay.published == 4, timeout=30)
        assert [e.id for e in sink.sent] == ["t:1", "t:2", "t:1", "t:2", "t:3", "t:4"]
        with contextlib.closing(sqlite3.connect(tmp_path / "c.db")) as conn:
            assert conn.execute("SELECT COUNT(*) FROM outbox").fetchone() == (0,)


async def test_stop_ends_a_reader_whose_cancellation_is_lost(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """NATS not answering and the reader's cancellation lost: stop() still ends in time."""
    async with SqliteTaskStore(tmp_path / "c.db") as store:
        await store.put(events=[EventRow("t", 1, b"e", outbox=entry(1))])
        deaf = lose_cancellations(store, monkeypatch)
        sink = HeldSink()
        options = RelayOptions(batch=1, in_flight=1, stop_timeout=0.5)
        relay = OutboxRelay(store, sink, options=options)
        await relay.start()
        await sink.got.wait()  # in flight: one read, never acknowledged
        deaf.append(relay._reader)
        stopping = asyncio.ensure_future(relay.stop())
        await eventually(lambda: relay._reader is None)
        # The reader reads on, with no room to hand it over.
        await store.put(events=[EventRow("t", 2, b"e", outbox=entry(2))])
        ended, _ = await asyncio.wait({stopping}, timeout=30)
        sink.pending[0].set_result(None)  # NATS back: what follows ends anyway
        await stopping
        assert ended, "stop() waited for NATS, past its stop_timeout"
        assert deaf[0].done()
        assert [e.id for e in sink.sent] == ["t:1"]


def test_a_large_event_reaches_nats_without_its_payloads() -> None:
    big = common_pb2.Payload(text="x" * (EVENT_COPY_MAX + 1))
    finished = coordinator_pb2.TaskEvent(
        task_id="t",
        sequence=9,
        finished=coordinator_pb2.TaskFinished(state=common_pb2.TASK_STATE_SUCCEEDED, output=big),
    )
    data = events_pb2.TaskEventData()
    copy_event(data, finished)
    assert data.event_payloads_omitted
    assert data.event.finished.state == common_pb2.TASK_STATE_SUCCEEDED
    assert not data.event.finished.HasField("output")
    assert finished.finished.HasField("output")  # the stored event keeps it
    chunk = common_pb2.PartialResult(content=common_pb2.Payload(text="hi"))
    small = coordinator_pb2.TaskEvent(task_id="t", sequence=3, partial=chunk)
    data = events_pb2.TaskEventData()
    copy_event(data, small)
    assert data.event == small and not data.event_payloads_omitted
    # Large for another reason: only the event's place is kept.
    huge_error = coordinator_pb2.TaskEvent(
        task_id="t",
        sequence=4,
        retry=coordinator_pb2.TaskRetry(
            error=common_pb2.ErrorDetail(message="e" * (EVENT_COPY_MAX + 1))
        ),
    )
    data = events_pb2.TaskEventData()
    copy_event(data, huge_error)
    assert data.event == coordinator_pb2.TaskEvent(task_id="t", sequence=4)
    assert data.event_payloads_omitted
