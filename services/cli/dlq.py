"""``hivewire dlq list | requeue | purge``: the coordinator's dead-lettered tasks.

Dead letters are the operators' business: the default authorization policy lets only
admin identities call these RPCs, so the commands use the ``admin`` certificate unless
``--identity`` says otherwise. Exit statuses are those of ``hivewire submit``.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated

import typer
from google.protobuf import timestamp_pb2

from hivewire.coordinator.v1 import coordinator_pb2
from hivewire.services.cli.events import parse_since
from hivewire.services.cli.output import echo_json, echo_result
from hivewire.services.cli.tasks import (
    EXIT_OK,
    Coordinator,
    JsonOpt,
    Work,
    coordinator_command,
    paged,
)

app = typer.Typer(help="Dead-lettered tasks: list them, run them again, delete them.")


def _error_of(task: coordinator_pb2.Task) -> str:
    if not task.HasField("error"):
        return ""
    return f"{task.error.reason or task.error.code}: {task.error.message}"


@coordinator_command(app, "list", identity="admin")
def list_dead_letters(
    capability: Annotated[str, typer.Option("--capability", "-c", help="Only this one.")] = "",
    include_requeued: Annotated[
        bool, typer.Option("--all", help="Also those already requeued.")
    ] = False,
    limit: Annotated[int, typer.Option("--limit", "-n", min=1, help="Most shown.")] = 50,
    json_lines: JsonOpt = False,
) -> Work:
    """List dead-lettered tasks, newest first: id, capability, attempts, last error."""

    async def work(coordinator: Coordinator) -> int:
        request = coordinator_pb2.ListDeadLettersRequest(
            capability=capability, include_requeued=include_requeued
        )
        pages = paged(coordinator.stub.ListDeadLetters, request, "dead_letters", limit)
        async for letter in pages:
            if json_lines:
                echo_json(letter)
            else:
                task = letter.task
                line = f"{task.task_id} {task.spec.capability} attempts={len(task.attempts)}"
                if letter.requeued_as_task_id:
                    line += f" requeued_as={letter.requeued_as_task_id}"
                line += f" {_error_of(task)}"
                typer.echo(line.rstrip())
        return EXIT_OK

    return work


@coordinator_command(app, "requeue", identity="admin")
def requeue(
    task_id: Annotated[str, typer.Argument(help="The dead-lettered task.")],
    reason: Annotated[str, typer.Option("--reason", "-r", help="Recorded in the audit.")] = "",
    json_lines: JsonOpt = False,
) -> Work:
    """Run a dead letter again: prints the id of the new task."""

    async def work(coordinator: Coordinator) -> int:
        response = await coordinator.stub.RequeueTask(
            coordinator_pb2.RequeueTaskRequest(task_id=task_id, reason=reason)
        )
        note = " (requeued before)" if response.already_requeued else ""
        echo_result(response, f"{response.task.task_id}{note}", json_lines=json_lines)
        return EXIT_OK

    return work


@coordinator_command(app, "purge", identity="admin")
def purge(
    task_ids: Annotated[
        list[str] | None, typer.Argument(help="The dead letters to delete.")
    ] = None,
    older_than: Annotated[
        str | None,
        typer.Option("--older-than", help="Those dead for longer than this (10m, 2h, 7d)."),
    ] = None,
    everything: Annotated[bool, typer.Option("--all", help="Every dead letter.")] = False,
    json_lines: JsonOpt = False,
) -> Work:
    """Delete dead letters (and their events) from the coordinator's store."""
    request = coordinator_pb2.PurgeDeadLettersRequest(task_ids=task_ids or [], all=everything)
    if older_than is not None:
        since = parse_since(older_than)
        moment = since if isinstance(since, datetime) else datetime.now(UTC) - since
        stamp = timestamp_pb2.Timestamp()
        stamp.FromDatetime(moment)
        request.dead_before.CopyFrom(stamp)
    if sum([bool(task_ids), older_than is not None, everything]) != 1:
        raise typer.BadParameter("give task ids, --older-than or --all (one of them)")

    async def work(coordinator: Coordinator) -> int:
        response = await coordinator.stub.PurgeDeadLetters(request)
        if json_lines:
            echo_json(response)
        else:
            for task_id in response.task_ids:
                typer.echo(task_id)
            typer.echo(f"purged {len(response.task_ids)} dead letter(s)", err=True)
        return EXIT_OK

    return work
