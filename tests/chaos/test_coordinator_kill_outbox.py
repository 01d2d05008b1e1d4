"""kill -9 a coordinator between its commits and their NATS publishes: no event is lost.

A real nats-server and real coordinator processes, on both stores. The window between
a commit and its publish is forced with the test-only ``outbox_hold`` setting, no
sleeping: with ``mark`` the relay publishes but never records it, so the next process
sends those events again (JetStream must drop the copies by ``Nats-Msg-Id``); with
``publish`` it sends nothing, so the events exist only in the store's outbox when the
process is killed. A third, normal process must then bring every committed event of
every task to ``HIVEWIRE_EVENTS`` exactly once, in order, with its gRPC sequence.
"""

from __future__ import annotations

import contextlib
from collections import Counter
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from hivewire.coordinator.v1 import coordinator_pb2, coordinator_pb2_grpc
from hivewire.services.runtime.channels import secure_channel
from hivewire.services.runtime.events import ReceivedEvent, replay
from tests.conftest import Pki
from tests.helpers import NatsServer, ServiceProcess, eventually
from tests.support.e2e_mesh import coordinator_process

pytestmark = pytest.mark.timeout(180)

C = coordinator_pb2
TaskEvent = coordinator_pb2.TaskEvent


async def on_nats(nats: NatsServer) -> list[ReceivedEvent]:
    """Every task event stored in HIVEWIRE_EVENTS, in stream order."""
    return [r async for r in replay(nats.url, "task.*")]


class Phase:
    """One coordinator process of the run, with its client."""

    def __init__(self, process: ServiceProcess, pki: Pki) -> None:
        self.process = process
        self.pki = pki
        self.channel = secure_channel(process.address, pki.files("client"))
        self.client: coordinator_pb2_grpc.CoordinatorServiceAsyncStub = (
            coordinator_pb2_grpc.CoordinatorServiceStub(self.channel)
        )

    async def submit(self, count: int) -> list[str]:
        # Nobody serves the capability: the tasks wait in the queue, events committed.
        spec = C.TaskSpec(capability="nobody-serves-this")
        return [
            (await self.client.SubmitTask(C.SubmitTaskRequest(spec=spec))).task.task_id
            for _ in range(count)
        ]

    async def cancel(self, task_id: str) -> None:
        await self.client.CancelTask(C.CancelTaskRequest(task_id=task_id, reason="test"))

    async def stored(self, task_id: str) -> list[TaskEvent]:
        """The task's committed events, as WatchTask serves them."""
        call = self.client.WatchTask(C.WatchTaskRequest(task_id=task_id))
        # A task still queued never ends: read up to its last committed event.
        task = (await self.client.GetTask(C.GetTaskRequest(task_id=task_id))).task
        events = []
        async for response in call:
            events.append(response.event)
            if response.event.sequence >= task.last_sequence:
                break
        call.cancel()
        return events

    async def metric(self, name: str) -> float:
        """A counter of the process's own metrics."""
        async with httpx.AsyncClient(timeout=5) as client:
            port = self.process.metrics_port
            text = (await client.get(f"http://127.0.0.1:{port}/metrics")).text
        values = [
            s.value
            for family in text_string_to_metric_families(text)
            for s in family.samples
            if s.name == name
        ]
        return sum(values)

    async def kill(self) -> None:
        await self.channel.close()
        await self.process.kill()


@pytest.mark.parametrize("store", ["sqlite", "jetstream"])
async def test_kill_dash_nine_between_commit_and_publish_loses_no_event(
    pki: Pki, tmp_path: Path, store: str
) -> None:
    async with contextlib.AsyncExitStack() as stack:
        nats = await stack.enter_async_context(NatsServer(tmp_path / "nats"))

        async def start(hold: str) -> Phase:
            process = coordinator_process(
                tmp_path,
                certs_dir=pki.dir,
                nats_url=nats.url,
                db_path=tmp_path / "c.db",
                env={
                    "HIVEWIRE_COORDINATOR__STORE": store,
                    "HIVEWIRE_COORDINATOR__OUTBOX_HOLD": hold,
                },
            )
            await process.start()
            stack.push_async_callback(process.terminate)
            return Phase(process, pki)

        # 1. Published, never recorded as published: the next processes send it again.
        first = await start("mark")
        early = await first.submit(3)
        await first.cancel(early[0])

        # task.created of each, state_changed + task.cancelled of the cancelled one.
        async def first_out() -> None:
            assert len(await on_nats(nats)) == 5

        await eventually(first_out, timeout=30)
        await first.kill()

        # 2. Committed, never published: only the outbox has these events at the kill.
        second = await start("publish")
        late = await second.submit(3)
        await second.cancel(late[0])
        # (A task of the killed process is not cancelled here: on JetStream it stays its
        # dead owner's until the lease expires, and a cancel answers UNAVAILABLE.)
        for task_id in (late[0],):
            assert (await second.stored(task_id))[-1].HasField("finished")
        assert len(await on_nats(nats)) == 5  # the relay holds: nothing new went out
        await second.kill()

        # 3. A normal process publishes what the others left, each event once.
        third = await start("")
        stack.push_async_callback(third.channel.close)
        sentinel = (await third.submit(1))[0]
        await third.cancel(sentinel)

        async def sentinel_out() -> list[ReceivedEvent]:
            found = await on_nats(nats)
            # Outbox order is commit order: the sentinel's end comes after the rest.
            assert any(r.event.subject == sentinel and r.type == "task.cancelled" for r in found)
            return found

        published: list[ReceivedEvent] = await eventually(sentinel_out, timeout=30)

        ids = Counter(r.event.id for r in published)
        assert set(ids.values()) == {1}, [i for i, n in ids.items() if n > 1]
        for task_id in [*early, *late, sentinel]:
            stored = await third.stored(task_id)
            assert stored and [e.sequence for e in stored] == list(range(1, len(stored) + 1))
            mine = [r for r in published if r.event.subject == task_id]
            # Every committed event, once, in order, with its gRPC sequence and kind.
            assert [r.event.task_sequence for r in mine] == [e.sequence for e in stored], task_id
            assert [r.event.task.event for r in mine] == stored
            assert [r.event.id for r in mine] == [f"{task_id}:{e.sequence}" for e in stored]
        # Its relay published every entry the other two left, then its own.
        everything = sum([len(await third.stored(t)) for t in [*early, *late, sentinel]])

        async def relayed() -> None:
            written = await third.metric("hivewire_coordinator_outbox_written_total")
            assert written == len(await third.stored(sentinel))
            assert await third.metric("hivewire_coordinator_outbox_relayed_total") == everything

        await eventually(relayed, timeout=30)
        for task_id in (early[0], late[0], sentinel):
            assert [r.type for r in published if r.event.subject == task_id][-1] == (
                "task.cancelled"
            )


async def test_events_committed_while_nats_is_down_survive_a_kill(pki: Pki, tmp_path: Path) -> None:
    """No test setting: NATS is down, so nothing committed can have been published."""
    async with contextlib.AsyncExitStack() as stack:
        nats = await stack.enter_async_context(NatsServer(tmp_path / "nats"))

        async def start() -> Phase:
            process = coordinator_process(
                tmp_path, certs_dir=pki.dir, nats_url=nats.url, db_path=tmp_path / "c.db"
            )
            await process.start()
            stack.push_async_callback(process.terminate)
            return Phase(process, pki)

        first = await start()
        before = await first.submit(2)

        async def published(task_ids: list[str], count: int) -> list[ReceivedEvent]:
            found = [r for r in await on_nats(nats) if r.event.subject in task_ids]
            assert len(found) == count
            return found

        await eventually(lambda: published(before, 2), timeout=30)
        await nats.stop()
        during = await first.submit(3)
        await first.cancel(during[0])
        await first.cancel(before[0])
        for task_id in (during[0], before[0]):
            assert (await first.stored(task_id))[-1].HasField("finished")
        await first.kill()

        await nats.start()
        second = await start()
        stack.push_async_callback(second.channel.close)
        everything = [*before, *during]
        stored = {t: await second.stored(t) for t in everything}
        total = sum(len(events) for events in stored.values())
        found = await eventually(lambda: published(everything, total), timeout=30)
        for task_id, events in stored.items():
            mine = [r.event for r in found if r.event.subject == task_id]
            assert [e.task.event for e in mine] == events
            assert [e.id for e in mine] == [f"{task_id}:{e.sequence}" for e in events]
