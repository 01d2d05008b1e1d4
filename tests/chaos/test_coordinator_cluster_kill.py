"""Three coordinators on a 3-node NATS cluster under load: kill -9 one, then one NATS node.

Real processes throughout: a 3-node nats-server cluster on loopback (real routes,
JetStream replicas 3), three coordinators on the JetStream store, three agents. 300
tasks are submitted across the coordinators and are in flight when one coordinator is
killed with SIGKILL; a second batch is in flight when the NATS node leading the task
bucket is killed. Then, from the client's view: every accepted task finished exactly
once (one ``finished`` event, one successful attempt, a gap-free journal), watchers of
the dead coordinator resumed on another with no gap and no repeat, and idempotent
resubmissions to a survivor return the same tasks. The figures are printed (and
recorded in docs/coordinator.md, "Several coordinators").
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
import nats
import pytest
from google.protobuf import json_format, struct_pb2

from hivewire.common.v1 import common_pb2
from hivewire.coordinator.v1 import coordinator_pb2, coordinator_pb2_grpc
from hivewire.services.runtime.channels import secure_channel
from tests.conftest import Pki
from tests.helpers import ServiceProcess, eventually
from tests.support.e2e_mesh import PACED, agent_process, coordinator_process, wait_for_agents
from tests.support.nats_cluster import NatsCluster

if TYPE_CHECKING:
    from hivewire.coordinator.v1.coordinator_pb2_grpc import (
        CoordinatorServiceAsyncStub as Stub,
    )

# "alone": make pytest runs it after the parallel run, with no other test beside it (its
# 3 s leases are missed when another worker's tests starve its processes of CPU).
pytestmark = [pytest.mark.timeout(240), pytest.mark.alone]

S = common_pb2
C = coordinator_pb2

BATCH = 300
SECOND_BATCH = 90
LEASE_TTL = 3.0
STEPS, INTERVAL = 4, 3.0
"""Each task takes about 12 s on its agent, so the whole batch is in flight at once."""

CLUSTER_ENV = {
    "HIVEWIRE_COORDINATOR__STORE": "jetstream",
    "HIVEWIRE_COORDINATOR__JETSTREAM_REPLICAS": "3",
    "HIVEWIRE_COORDINATOR__LEASE_TTL": str(LEASE_TTL),
    "HIVEWIRE_COORDINATOR__LEASE_HEARTBEAT": "0.5",
    "HIVEWIRE_EVENTS__STREAM__REPLICAS": "3",
}


def count_spec(steps: int, interval: float, *, key: str = "") -> C.TaskSpec:
    payload = S.Payload(
        json=json_format.ParseDict({"steps": steps, "interval": interval}, struct_pb2.Struct())
    )
    return C.TaskSpec(capability="count", input=payload, idempotency_key=key)


async def replicated_registry(url: str) -> None:
    """Create the embedded registry's bucket with 3 replicas before anyone else does
    (the registry makes it with 1, which one NATS node's death would take away).
    """
    nc = await nats.connect(servers=url.split(","))
    try:
        await nc.jetstream().create_key_value(
            bucket="hivewire-registry", history=1, ttl=15, limit_marker_ttl=15, replicas=3
        )
    finally:
        await nc.drain()


class Client:
    """Round-robin gRPC clients of the coordinators; submits with retries on UNAVAILABLE."""

    def __init__(self, stubs: list[Stub]) -> None:
        self.stubs = stubs
        self._next = itertools.cycle(range(len(stubs)))

    async def submit(self, spec: C.TaskSpec, via: int) -> C.SubmitTaskResponse:
        response: C.SubmitTaskResponse = await self.stubs[via].SubmitTask(
            C.SubmitTaskRequest(spec=spec), timeout=30
        )
        return response

    async def events(self, task_id: str, via: int, after: int = 0) -> list[C.TaskEvent]:
        return [
            r.event
            async for r in self.stubs[via].WatchTask(
                C.WatchTaskRequest(task_id=task_id, after_sequence=after), timeout=90
            )
        ]


async def test_three_coordinators_lose_nothing_when_a_coordinator_or_a_nats_node_dies(
    pki: Pki, tmp_path: Path
) -> None:
    loop = asyncio.get_running_loop()
    began = loop.time()
    async with contextlib.AsyncExitStack() as stack:
        cluster = await stack.enter_async_context(NatsCluster(tmp_path / "nats", size=3))
        await replicated_registry(cluster.url)
        coordinators = [
            coordinator_process(
                tmp_path / f"c{i}",
                certs_dir=pki.dir,
                nats_url=cluster.url,
                db_path=tmp_path / f"c{i}.db",
                env=CLUSTER_ENV,
            )
            for i in range(3)
        ]
        agents = [
            agent_process(
                tmp_path / f"a{i}",
                PACED,
                name=f"paced-{i}",
                certs_dir=pki.dir,
                nats_url=cluster.url,
                max_concurrency=200,
            )
            for i in range(3)
        ]
        processes: list[ServiceProcess] = [*coordinators, *agents]
        await asyncio.gather(*(p.start(timeout=90) for p in processes))
        stack.push_async_callback(_stop_all, processes)
        channels = [secure_channel(c.address, pki.files("client")) for c in coordinators]
        for channel in channels:
            stack.push_async_callback(channel.close)
        stubs: list[Stub] = [coordinator_pb2_grpc.CoordinatorServiceStub(ch) for ch in channels]
        client = Client(stubs)
        for stub in stubs:
            await wait_for_agents(stub, 3)

        # -- 300 tasks in flight over three coordinators ---------------------------------
        accepted: dict[str, int] = {}  # task id -> coordinator it was submitted to
        keyed: dict[str, tuple[C.TaskSpec, int]] = {}
        gate = asyncio.Semaphore(48)

        async def submit(n: int) -> None:
            via = n % 3
            key = f"key-{n}" if n % 10 == 0 else ""
            spec = count_spec(STEPS, INTERVAL, key=key)
            async with gate:
                task = (await client.submit(spec, via)).task
            accepted[task.task_id] = via
            if key:
                keyed[task.task_id] = (spec, via)

        started = loop.time()
        setup_seconds = started - began
        await asyncio.gather(*(submit(n) for n in range(BATCH)))
        submitted_in = loop.time() - started
        victim = 0
        on_victim = [t for t, via in accepted.items() if via == victim]
        victim_id = (await stubs[1].GetTask(C.GetTaskRequest(task_id=on_victim[0]))).task
        dead = victim_id.coordinator_id
        assert dead

        # Clients follow ten of the victim's tasks on the victim.
        followed = on_victim[-10:]
        seen: dict[str, list[C.TaskEvent]] = {t: [] for t in followed}

        async def follow(task_id: str) -> None:
            with contextlib.suppress(grpc.aio.AioRpcError):
                async for r in stubs[victim].WatchTask(C.WatchTaskRequest(task_id=task_id)):
                    seen[task_id].append(r.event)

        followers = [asyncio.create_task(follow(t)) for t in followed]
        await eventually(
            lambda: all(any(e.HasField("progress") for e in seen[t]) for t in followed),
            timeout=60,
        )

        # -- kill -9 one coordinator -------------------------------------------------------
        killed_at = loop.time()
        await coordinators[victim].kill()
        await asyncio.gather(*followers)
        survivors = [1, 2]

        # Takeover time: from the kill until each followed task unfinished at the kill
        # has a new owner.
        unfinished = [t for t in followed if not any(e.HasField("finished") for e in seen[t])]
        assert unfinished

        async def taken_over() -> None:
            for task_id in unfinished:
                task = (await stubs[1].GetTask(C.GetTaskRequest(task_id=task_id))).task
                assert task.coordinator_id != dead or task.state >= S.TASK_STATE_SUCCEEDED, task_id

        await eventually(taken_over, timeout=30, interval=0.05)
        takeover_seconds = loop.time() - killed_at

        # Watchers resume on a survivor where they stopped (checked below, once finished).
        resumed = {
            task_id: asyncio.create_task(
                client.events(task_id, survivors[i % 2], after=seen[task_id][-1].sequence)
            )
            for i, task_id in enumerate(followed)
        }

        # Idempotent resubmission to a survivor returns the task it created.
        for task_id, (spec, via) in keyed.items():
            again = await client.submit(spec, survivors[via % 2])
            assert again.deduplicated and again.task.task_id == task_id

        # -- kill -9 the NATS node leading the task bucket, a second batch in flight --------
        live_stubs = [stubs[i] for i in survivors]
        second: list[str] = []

        async def submit_more(n: int) -> None:
            # During the NATS failover a submission may be refused (UNAVAILABLE: not
            # stored); the client submits again with the same key, as clients should.
            spec = count_spec(STEPS, INTERVAL, key=f"more-{n}")

            async def submitted() -> C.SubmitTaskResponse:
                response: C.SubmitTaskResponse = await live_stubs[n % 2].SubmitTask(
                    C.SubmitTaskRequest(spec=spec), timeout=30
                )
                return response

            async with gate:
                response = await eventually(
                    submitted, timeout=90, interval=0.2, retry_on=(grpc.aio.AioRpcError,)
                )
            second.append(response.task.task_id)

        half = SECOND_BATCH // 2
        await asyncio.gather(*(submit_more(n) for n in range(half)))
        node = await cluster.stream_leader("KV_HIVEWIRE_TASKS")
        node_killed_at = loop.time()
        more = asyncio.gather(*(submit_more(n) for n in range(half, SECOND_BATCH)))
        await cluster.kill(node)
        await more
        nats_outage_submits = loop.time() - node_killed_at

        # -- every accepted task finished exactly once, from the client's view ---------------
        everything = [*accepted, *second]
        succeeded = duplicated = lost = interrupted = 0
        check = asyncio.Semaphore(16)

        async def verify(n: int, task_id: str) -> None:
            nonlocal succeeded, duplicated, lost, interrupted
            via = live_stubs[n % 2]
            async with check:
                events = [
                    r.event
                    async for r in via.WatchTask(C.WatchTaskRequest(task_id=task_id), timeout=120)
                ]
                task = (await via.GetTask(C.GetTaskRequest(task_id=task_id))).task
            finished = [e for e in events if e.HasField("finished")]
            assert [e.sequence for e in events] == list(range(1, len(events) + 1)), task_id
            wins = [a for a in task.attempts if not a.HasField("error")]
            if not finished:
                lost += 1
            elif len(finished) > 1 or len(wins) > 1:
                duplicated += 1
            elif finished[0].finished.state == S.TASK_STATE_SUCCEEDED:
                succeeded += 1
            interrupted += any(a.error.reason == "COORDINATOR_RESTARTED" for a in task.attempts)

        verify_started = loop.time()
        await asyncio.gather(*(verify(n, t) for n, t in enumerate(everything)))
        # The watchers of the dead coordinator missed nothing and saw nothing twice.
        for task_id, rest in resumed.items():
            whole = seen[task_id] + await rest
            assert [e.sequence for e in whole] == list(range(1, len(whole) + 1)), task_id
            assert whole[-1].finished.state == S.TASK_STATE_SUCCEEDED
        figures = {
            "submitted": len(everything),
            "succeeded": succeeded,
            "duplicated": duplicated,
            "lost": lost,
            "taken_over_and_rerun": interrupted,
            "takeover_seconds": round(takeover_seconds, 2),
            "watchers_resumed": len(followed),
            "lease_ttl": LEASE_TTL,
            "first_batch_submit_seconds": round(submitted_in, 2),
            "second_batch_half_during_nats_kill_seconds": round(nats_outage_submits, 2),
            "setup_seconds": round(setup_seconds, 1),
            "verify_seconds": round(loop.time() - verify_started, 1),
            "wall_seconds": round(loop.time() - began, 1),
        }
        print(f"\ncluster chaos figures: {figures}")
        assert (succeeded, duplicated, lost) == (len(everything), 0, 0), figures
        assert interrupted >= 1, figures


async def _stop_all(processes: list[ServiceProcess]) -> None:
    """Stop the processes at once (one by one, their grace periods would add up)."""
    await asyncio.gather(*(p.terminate() for p in processes if p.running))
