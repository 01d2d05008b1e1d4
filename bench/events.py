"""Events/s into JetStream: hivewire's ``EventPublisher`` against raw ``js.publish``.

One real nats-server (the mesh's configuration, ``sync_interval: always`` unless told
otherwise) and the ``HIVEWIRE_EVENTS`` stream. Three ways to put the same events
(a ``task.started`` envelope, same size, a unique ``Nats-Msg-Id`` each) into it:

* ``raw js.publish``: ``await js.publish(...)`` one after another (an ack per event
  before the next: what naive code on the request path would do);
* ``raw publish_async``: nats-py's pipelined publish, ``WINDOW`` in flight, then their
  acks (the floor: what ``EventPublisher`` does underneath);
* ``raw atomic batch``: ``WINDOW`` events as one JetStream atomic batch (one ack);
* ``EventPublisher``: ``publish()`` (builds the envelope, stamps id, time and
  correlation id, buffers, returns at once) for a chunk of events, then ``flush()``
  until JetStream acked them all; once event by event (``batch_min=0``), once with
  its default (a full window as one atomic batch).

Rates are events acknowledged by JetStream per second; CPU is per event, this process
and nats-server. ``publish() call`` is what the caller's request path pays per event.
"""

from __future__ import annotations

import contextlib
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import nats
from nats.js import JetStreamContext

from bench.common import (
    Durations,
    Phase,
    cpu_snapshot,
    fmt_rate,
    fmt_spread,
    free_port,
    median_phase,
    paired_ratios,
    table,
)
from hivewire.common.v1 import common_pb2
from hivewire.events.v1 import events_pb2
from hivewire.services.mesh.launcher import Launcher, ManagedProcess
from hivewire.services.mesh.nats_server import NatsServerConfig, start_nats_server
from hivewire.services.runtime.events import (
    HEADER_CORRELATION_ID,
    HEADER_MSG_ID,
    EventPublisher,
    StreamSettings,
    build_event,
    ensure_stream,
    event_subject,
)
from hivewire.services.runtime.events.batch import BatchMessage, publish_atomic

EVENT_TYPE = "task.started"
WINDOW = 128
"""Events in flight for the pipelined variants (``EventPublisher``'s default window)."""
CHUNK = 1000
"""Events published before waiting for their acks (pipelined variants)."""
MESH_WINDOWS = (
    *[1] * 1, *[2] * 3, *[5] * 2, *[6] * 2, 7, 8, *[9] * 3, *[10] * 2, 11, *[12] * 2, 13,
    *[14] * 2, *[15] * 2, *[16] * 6, *[17] * 4, *[18] * 4, *[20] * 6, 22, *[23] * 2,
    *[24] * 6, *[25] * 2, *[26] * 2, *[27] * 2, 28, 29, *[30] * 2, *[33] * 3, *[35] * 2,
    37, 39, 40, 46, 57, 62, *[69] * 2, 71, 75, 80, 88, 91, 119, 122, 128,
)  # fmt: skip
"""The send windows of the coordinator's publisher at c=16 in ``bench/ab.py`` (83 windows
counted at 12:52 UTC on 2026-12-02: median 20 events, 57 % of the events in windows of
32 or more); at c=1 they are 1-3 events. The ``mesh windows`` variants publish bursts
of these sizes, each flushed before the next, as the outbox relay hands them over."""


def event_data(i: int) -> events_pb2.TaskEventData:
    """A realistic ``task.started`` payload."""
    return events_pb2.TaskEventData(
        task_id=f"t-{i:012d}",
        state=common_pb2.TASK_STATE_RUNNING,
        capability="noop",
        priority=common_pb2.PRIORITY_MEDIUM,
        agent_id="bench-0123abcd",
        attempt=1,
        owner="spiffe://hivewire.local/client/client",
    )


@contextlib.asynccontextmanager
async def nats_server(sync_interval: str) -> AsyncIterator[tuple[str, ManagedProcess]]:
    """A throwaway nats-server with JetStream; yields (url, process)."""
    with tempfile.TemporaryDirectory(prefix="hivewire-bench-nats-") as tmp:
        state = Path(tmp)
        config = NatsServerConfig(
            port=free_port(),
            monitor_port=free_port(),
            store_dir=state / "js",
            sync_interval=sync_interval,
        )
        async with Launcher(grace_period=5.0) as launcher:
            process = await start_nats_server(launcher, config, state_dir=state)
            yield config.url, process


async def _timed(name: str, pids: dict[str, int], run: Callable[[], Awaitable[int]]) -> Phase:
    before = cpu_snapshot(pids)
    started = time.perf_counter()
    events = await run()
    seconds = time.perf_counter() - started
    after = cpu_snapshot(pids)
    cpu = {k: (after[k] - before[k]) / events * 1e6 for k in after}
    return Phase(name, WINDOW, events, seconds, None, cpu)


async def measure(*, durations: Durations, sync_interval: str = "always") -> dict[str, Any]:
    """Each variant for ``durations.measure`` seconds, in ``durations.rounds`` rounds.

    Returns:
        ``{"phases": {name: Phase}, "publish_call_us": µs, "event_bytes": n}``.
    """
    stream = StreamSettings()
    subject = event_subject(EVENT_TYPE)
    sample = build_event(EVENT_TYPE, source="bench/raw", subject="t", data=event_data(0))
    payload = sample.SerializeToString()
    rounds: dict[str, list[Phase]] = {}
    call_us: list[float] = []
    async with nats_server(sync_interval) as (url, process):
        pids = {"nats": process.pid}
        await ensure_stream(url, stream)
        nc = await nats.connect(url, name="hivewire-bench-raw")
        js: JetStreamContext = nc.jetstream(timeout=5.0)
        # One publisher for the whole run, connected before any clock starts, as in a
        # running service.
        each = EventPublisher(
            url, source="bench/publisher", stream=stream, window=WINDOW, batch_min=0
        )
        batched = EventPublisher(url, source="bench/publisher", stream=stream, window=WINDOW)
        await each.start()
        await batched.start()
        try:
            for events in (each, batched):
                events.publish(EVENT_TYPE, subject="warm", data=event_data(0))
                await events.flush()

            def headers() -> dict[str, str]:
                return {HEADER_MSG_ID: str(uuid.uuid4()), HEADER_CORRELATION_ID: "bench"}

            async def raw_sequential(seconds: float) -> int:
                end = time.perf_counter() + seconds
                n = 0
                while time.perf_counter() < end:
                    await js.publish(subject, payload, headers=headers())
                    n += 1
                return n

            async def raw_pipelined(seconds: float) -> int:
                end = time.perf_counter() + seconds
                n = 0
                while time.perf_counter() < end:
                    for _ in range(CHUNK // WINDOW):
                        futures = [
                            await js.publish_async(subject, payload, headers=headers())
                            for _ in range(WINDOW)
                        ]
                        for future in futures:
                            await future
                        n += WINDOW
                return n

            async def raw_batches(seconds: float) -> int:
                end = time.perf_counter() + seconds
                n = 0
                while time.perf_counter() < end:
                    for _ in range(CHUNK // WINDOW):
                        batch = [BatchMessage(subject, payload, headers()) for _ in range(WINDOW)]
                        await publish_atomic(nc, batch, ack_timeout=5.0)
                        n += WINDOW
                return n

            def publisher(
                events: EventPublisher, bursts: tuple[int, ...] = (CHUNK,)
            ) -> Callable[[float], Awaitable[int]]:
                async def run(seconds: float) -> int:
                    end = time.perf_counter() + seconds
                    n = 0
                    while time.perf_counter() < end:
                        for burst in bursts:
                            t0 = time.perf_counter()
                            for i in range(burst):
                                events.publish(EVENT_TYPE, subject=f"t-{i}", data=event_data(i))
                            call_us.append((time.perf_counter() - t0) / burst * 1e6)
                            if not await events.flush(30):
                                raise RuntimeError("EventPublisher did not drain within 30 s")
                            n += burst
                    return n

                return run

            variants: dict[str, Callable[[float], Awaitable[int]]] = {
                "raw js.publish (awaited one by one)": raw_sequential,
                f"raw js.publish_async (window {WINDOW})": raw_pipelined,
                f"raw atomic batches of {WINDOW}": raw_batches,
                "EventPublisher, event by event (batch_min 0)": publisher(each),
                "EventPublisher, atomic batches (default)": publisher(batched),
                "EventPublisher, mesh windows, event by event": publisher(each, MESH_WINDOWS),
                "EventPublisher, mesh windows, atomic batches": publisher(batched, MESH_WINDOWS),
            }
            for _ in range(durations.rounds):
                for name, fn in variants.items():
                    await fn(durations.warmup)
                    await js.purge_stream(stream.name)

                    async def run(fn: Callable[[float], Awaitable[int]] = fn) -> int:
                        return await fn(durations.measure)

                    rounds.setdefault(name, []).append(await _timed(name, pids, run))
        finally:
            await each.close()
            await batched.close()
            await nc.drain()
    call_us.sort()
    return {
        "phases": {name: median_phase(p) for name, p in rounds.items()},
        "rounds": rounds,
        "publish_call_us": call_us[len(call_us) // 2] if call_us else float("nan"),
        "event_bytes": len(payload),
        "sync_interval": sync_interval,
    }


def report(result: dict[str, Any]) -> str:
    """The events table with per-round ratios to the two raw variants."""
    phases: dict[str, Phase] = result["phases"]
    rounds: dict[str, list[Phase]] = result["rounds"]
    names = list(phases)
    raw, floor = rounds[names[0]], rounds[names[1]]

    def rate(phase: Phase) -> float:
        return phase.rate

    rows = []
    for name, phase in phases.items():
        rows.append(
            [
                name,
                fmt_rate(phase.rate),
                fmt_spread(paired_ratios(rounds[name], raw, rate)),
                fmt_spread(paired_ratios(rounds[name], floor, rate)),
                f"{phase.cpu_us.get('client', float('nan')):.1f}",
                f"{phase.cpu_us.get('nats', float('nan')):.1f}",
            ]
        )
    out = table(
        f"events into JetStream (nats-server sync_interval={result['sync_interval']}, "
        f"{result['event_bytes']}-byte envelopes); rate ratios per round: median (min-max)",
        [
            "variant",
            "events/s",
            "rate vs js.publish",
            "rate vs publish_async",
            "publisher CPU µs/ev",
            "nats CPU µs/ev",
        ],
        rows,
    )
    return (
        out
        + "\n\nEventPublisher.publish() call on the caller's path: "
        + f"{result['publish_call_us']:.1f} µs per event (median of chunks)"
    )
