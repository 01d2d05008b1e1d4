"""kill -9 of a subscriber process mid-stream: its replacement resumes where it left off.

The subscriber is a real process: this module run with ``python -m`` (see the bottom).
It prints one line per event it starts handling and, when told to, hangs in the
handler of its N-th event, so the kill lands at a known point of the stream.
"""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

from hivewire.events.v1 import events_pb2
from hivewire.services.runtime.events import EventPublisher, ReceivedEvent, subscribe
from tests.helpers import NatsServer, ServiceProcess, eventually

ROOT = Path(__file__).resolve().parents[2]
TOTAL = 100
HANG_AT = 40
ACK_WAIT = 2.0


def _lines(path: Path) -> list[tuple[int, str, int]]:
    """(stream sequence, event id, delivery count) of every event a process started."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return []
    found = []
    for line in text.splitlines():
        if line.startswith("EVENT "):
            _, seq, event_id, delivered = line.split()
            found.append((int(seq), event_id, int(delivered)))
    return found


async def test_a_replacement_subscriber_resumes_after_kill_9(tmp_path: Path) -> None:
    server = NatsServer(tmp_path / "nats", sync_interval="always")
    await server.start()
    try:
        async with EventPublisher(server.url, source="coordinator/kill-test") as publisher:
            for i in range(1, TOTAL + 1):
                publisher.publish(
                    "task.created",
                    subject=f"task-{i:03d}",
                    data=events_pb2.TaskEventData(task_id=f"task-{i:03d}"),
                    task_sequence=1,
                )
            assert await publisher.flush(10)

        def subscriber(name: str, hang_at: int) -> ServiceProcess:
            module = "tests.chaos.test_events_subscriber_kill"
            return ServiceProcess(
                module,
                server.url,
                "billing",
                str(hang_at),
                workdir=tmp_path,
                name=name,
                env={"PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])},
            )

        first = subscriber("first", HANG_AT)
        await first.start(wait_ready=False)
        await eventually(lambda: len(_lines(first.stdout_path)) >= HANG_AT, timeout=30)
        assert first.running, first.log_tail()
        await first.kill()
        before = _lines(first.stdout_path)
        # It handled 1..HANG_AT-1 (each acknowledged before the next began) and died
        # inside the handler of HANG_AT.
        assert [seq for seq, _, _ in before] == list(range(1, HANG_AT + 1))

        second = subscriber("second", 0)
        await second.start(wait_ready=False)
        try:
            expected = set(range(HANG_AT, TOTAL + 1))
            await eventually(
                lambda: {seq for seq, _, _ in _lines(second.stdout_path)} >= expected,
                timeout=30,
            )
        finally:
            await second.terminate()
        after = _lines(second.stdout_path)
        sequences = [seq for seq, _, _ in after]
        # Nothing already acknowledged comes back; everything else arrives exactly once.
        assert sorted(sequences) == sorted(expected), sequences
        redelivered = {seq: delivered for seq, _, delivered in after if delivered > 1}
        assert HANG_AT in redelivered  # the event the first one died on
        assert all(seq >= HANG_AT for seq in redelivered)
    finally:
        await server.stop()


async def _run_subscriber(nats_url: str, durable: str, hang_at: int) -> None:
    started = 0

    async def handler(received: ReceivedEvent) -> None:
        nonlocal started
        started += 1
        print(
            f"EVENT {received.stream_sequence} {received.id} {received.delivery_count}",
            flush=True,
        )
        if started == hang_at:
            # Stuck mid-event until killed: the event is never acknowledged.
            await asyncio.Event().wait()

    async with subscribe(nats_url, "task.*", handler, durable=durable, ack_wait=ACK_WAIT, batch=8):
        await asyncio.Event().wait()


if __name__ == "__main__":
    url, durable_name, hang = sys.argv[1], sys.argv[2], int(sys.argv[3])
    try:
        asyncio.run(_run_subscriber(url, durable_name, hang))
    except KeyboardInterrupt:
        pass
