"""Dead letters an operator can act on: list, requeue (audited), purge; admins only.

A real coordinator over mTLS with a scripted agent whose work fails until the test
"fixes" it; the calls go through the real authorization policy with the PKI's
``admin`` and ``client`` identities, and through the ``hivewire dlq`` CLI.
"""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

from hivewire.common.v1 import common_pb2
from hivewire.coordinator.v1 import coordinator_pb2 as C
from hivewire.coordinator.v1 import coordinator_pb2_grpc
from tests.conftest import Pki
from tests.helpers import eventually
from tests.support.coordinator_mesh import Mesh, error_of, spec, start_mesh
from tests.support.scripted_agent import ScriptedAgent

HIVEWIRE = str(Path(sys.executable).with_name("hivewire"))
DEAD = common_pb2.TASK_STATE_DEAD_LETTERED


@pytest.fixture
async def mesh(pki: Pki, tmp_path: Path) -> AsyncIterator[Mesh]:
    async with start_mesh(pki.dir, tmp_path / "c.db") as mesh:
        yield mesh


async def dead_letter(
    mesh: Mesh, agent: ScriptedAgent, *, capability: str = "echo", text: str = "hi"
) -> str:
    """Submit a task that fails every attempt and wait until it is dead-lettered."""
    client = mesh.client()
    response = await client.SubmitTask(
        C.SubmitTaskRequest(
            spec=spec(capability, text=text, script={"fail_until": "fixed"}, max_attempts=2)
        )
    )
    task_id = response.task.task_id

    async def dead() -> None:
        task = (await client.GetTask(C.GetTaskRequest(task_id=task_id))).task
        assert task.state == DEAD, task.state

    await eventually(dead, timeout=20)
    return task_id


async def test_requeue_runs_the_same_spec_again_as_a_new_task(mesh: Mesh) -> None:
    agent = await mesh.agent()
    admin = mesh.client("admin")
    client = mesh.client()
    task_id = await dead_letter(mesh, agent, text="again")

    listed = await admin.ListDeadLetters(C.ListDeadLettersRequest())
    assert [d.task.task_id for d in listed.dead_letters] == [task_id]
    letter = listed.dead_letters[0]
    assert [a.attempt for a in letter.task.attempts] == [1, 2]
    assert all(a.error.reason == "SCRIPTED_FAILURE" for a in letter.task.attempts)
    assert letter.requeued_as_task_id == ""

    agent.gate("fixed").set()  # the cause is fixed; now run it again
    requeued = await admin.RequeueTask(C.RequeueTaskRequest(task_id=task_id, reason="fixed"))
    new_id = requeued.task.task_id
    assert new_id != task_id and not requeued.already_requeued
    assert requeued.task.spec.input.text == "again"
    assert requeued.task.spec.capability == "echo"
    # Owned by the original submitter, who can follow it.
    followed = [r.event async for r in client.WatchTask(C.WatchTaskRequest(task_id=new_id))]
    finished = followed[-1].finished
    assert finished.state == common_pb2.TASK_STATE_SUCCEEDED
    done = (await client.GetTask(C.GetTaskRequest(task_id=new_id))).task
    assert [a.attempt for a in done.attempts] == [1]  # a new series of attempts
    assert done.output.text == "done:again"

    # Asking again returns the same task; the dead letter keeps its history.
    again = await admin.RequeueTask(C.RequeueTaskRequest(task_id=task_id))
    assert again.task.task_id == new_id and again.already_requeued
    old = (await admin.GetTask(C.GetTaskRequest(task_id=task_id))).task
    assert old.state == DEAD and len(old.attempts) == 2

    # The audit: one task.requeued event naming who asked and the new task.
    audits = [(t, s, d) for t, s, d, _ in mesh.events.published if t == "task.requeued"]
    assert len(audits) == 1
    _, subject, data = audits[0]
    assert subject == task_id
    assert data.actor == "spiffe://hivewire.local/admin/admin"
    assert data.requeued_as_task_id == new_id
    assert data.error.message == "fixed"

    # Requeued dead letters leave the default listing.
    assert not (await admin.ListDeadLetters(C.ListDeadLettersRequest())).dead_letters
    everything = await admin.ListDeadLetters(C.ListDeadLettersRequest(include_requeued=True))
    assert [(d.task.task_id, d.requeued_as_task_id) for d in everything.dead_letters] == [
        (task_id, new_id)
    ]


async def test_only_admins_may_touch_dead_letters(mesh: Mesh) -> None:
    agent = await mesh.agent()
    task_id = await dead_letter(mesh, agent)
    client = mesh.client()
    for call in (
        client.ListDeadLetters(C.ListDeadLettersRequest()),
        client.RequeueTask(C.RequeueTaskRequest(task_id=task_id)),
        client.PurgeDeadLetters(C.PurgeDeadLettersRequest(all=True)),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await call
        assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert error_of(caught.value).reason == "CALLER_NOT_ALLOWED"


async def test_bad_requests_get_the_right_status(mesh: Mesh) -> None:
    agent = await mesh.agent()
    admin = mesh.client("admin")
    live = await admin.SubmitTask(C.SubmitTaskRequest(spec=spec(script={"gate": "hold"})))
    cases = [
        (admin.RequeueTask(C.RequeueTaskRequest()), grpc.StatusCode.INVALID_ARGUMENT),
        (
            admin.RequeueTask(C.RequeueTaskRequest(task_id="0" * 32)),
            grpc.StatusCode.NOT_FOUND,
        ),
        (
            admin.RequeueTask(C.RequeueTaskRequest(task_id=live.task.task_id)),
            grpc.StatusCode.FAILED_PRECONDITION,
        ),
        (admin.PurgeDeadLetters(C.PurgeDeadLettersRequest()), grpc.StatusCode.INVALID_ARGUMENT),
        (
            admin.PurgeDeadLetters(C.PurgeDeadLettersRequest(task_ids=[live.task.task_id])),
            grpc.StatusCode.FAILED_PRECONDITION,
        ),
    ]
    for call, code in cases:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await call
        assert caught.value.code() == code, caught.value
    reasons = {
        error_of(e).reason
        for e in [
            await _error(admin.RequeueTask(C.RequeueTaskRequest(task_id=live.task.task_id))),
            await _error(admin.PurgeDeadLetters(C.PurgeDeadLettersRequest())),
        ]
    }
    assert reasons == {"TASK_NOT_DEAD_LETTERED", "PURGE_SELECTION_REQUIRED"}
    agent.gate("hold").set()


async def _error(call: object) -> grpc.aio.AioRpcError:
    try:
        await call  # type: ignore[misc]
    except grpc.aio.AioRpcError as exc:
        return exc
    raise AssertionError("the call succeeded")


async def test_purge_deletes_dead_letters_and_their_events(mesh: Mesh) -> None:
    agent = await mesh.agent()
    admin: coordinator_pb2_grpc.CoordinatorServiceAsyncStub = mesh.client("admin")
    first = await dead_letter(mesh, agent, text="one")
    second = await dead_letter(mesh, agent, text="two")

    purged = await admin.PurgeDeadLetters(C.PurgeDeadLettersRequest(task_ids=[first]))
    assert list(purged.task_ids) == [first]
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await admin.GetTask(C.GetTaskRequest(task_id=first))
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    assert await mesh.running.store.events_after(first, 0) == []

    purged = await admin.PurgeDeadLetters(C.PurgeDeadLettersRequest(all=True))
    assert list(purged.task_ids) == [second]
    assert not (await admin.ListDeadLetters(C.ListDeadLettersRequest())).dead_letters


async def cli(mesh: Mesh, *args: str) -> tuple[int, str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HIVEWIRE_")}
    env["HIVEWIRE_CERTS_DIR"] = str(mesh.pki_dir)
    proc = await asyncio.create_subprocess_exec(
        HIVEWIRE,
        "dlq",
        *args,
        "--address",
        mesh.address,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env,
    )
    out, err = await proc.communicate()
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_the_dlq_commands(mesh: Mesh) -> None:
    agent = await mesh.agent()
    task_id = await dead_letter(mesh, agent, text="cli")

    code, out, err = await cli(mesh, "list")
    assert code == 0, err
    assert out.startswith(f"{task_id} echo attempts=2 SCRIPTED_FAILURE")

    code, out, err = await cli(mesh, "list", "--identity", "client")
    assert code == 5 and "PERMISSION_DENIED CALLER_NOT_ALLOWED" in err

    agent.gate("fixed").set()
    code, out, err = await cli(mesh, "requeue", task_id, "--reason", "cli test")
    assert code == 0, err
    new_id = out.strip()
    admin = mesh.client("admin")

    async def succeeded() -> None:
        task = (await admin.GetTask(C.GetTaskRequest(task_id=new_id))).task
        assert task.state == common_pb2.TASK_STATE_SUCCEEDED

    await eventually(succeeded, timeout=20)

    code, out, err = await cli(mesh, "list", "--all")
    assert code == 0 and f"requeued_as={new_id}" in out

    code, out, err = await cli(mesh, "purge")
    assert code == 2  # which dead letters is not optional

    code, out, err = await cli(mesh, "purge", "--older-than", "0s")
    assert code == 0, err
    assert out.split() == [task_id] and "purged 1 dead letter(s)" in err
