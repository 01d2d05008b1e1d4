"""``hivewire events``: show the mesh's events from NATS, as history or live.

Without ``--follow`` it prints the retained history (or the part selected with
``--since`` / ``--from-seq``) and exits; with ``--follow`` it keeps printing new events
until Ctrl-C (exit status 0). One human-readable line per event by default, one
protobuf-JSON object per line with ``--json``. NATS not reachable: one line on stderr,
exit status 1.

``--dlq`` reads the dead-letter stream (``HIVEWIRE_DLQ``) instead: each line also says
which durable gave up on the event and its last error. ``hivewire events redrive
--durable NAME`` republishes that durable's dead letters to their original subjects.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import sys
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Annotated, Any, Literal

import typer
from google.protobuf import json_format

from hivewire.common.v1 import common_pb2
from hivewire.events.v1 import events_pb2
from hivewire.services.cli.output import fail, state_label
from hivewire.services.runtime.errors import HivewireError

if TYPE_CHECKING:
    from hivewire.services.runtime.events import ReceivedEvent

app = typer.Typer(
    help="Show mesh events from NATS JetStream: history, or follow live ones.",
    invoke_without_command=True,
    no_args_is_help=False,
    subcommand_metavar="[redrive]",
)

_CATEGORIES = ("task", "agent", "model", "tool", "workflow", "project", "security")

NatsUrlOpt = Annotated[
    str | None,
    typer.Option("--nats-url", help="NATS server; default HIVEWIRE_NATS_URL or localhost."),
]
_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def parse_since(value: str) -> datetime | timedelta:
    """Parse ``--since``: a duration ago (``90s``, ``10m``, ``1h30m``, ``2d``) or an ISO time.

    Raises:
        typer.BadParameter: Neither form.
    """
    text = value.strip()
    if text and _DURATION.sub("", text) == "":
        total = sum(float(n) * _UNITS[unit] for n, unit in _DURATION.findall(text))
        return timedelta(seconds=total)
    try:
        moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise typer.BadParameter(
            f"{value!r} is neither a duration (90s, 10m, 1h30m, 2d) nor an ISO time"
        ) from None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def _set(message: Any, **fields: str) -> list[str]:
    """``label=value`` for each ``label=field`` of ``message`` that is set, in order."""
    values = ((label, getattr(message, name)) for label, name in fields.items())
    return [f"{label}={value}" for label, value in values if value]


def _tokens(message: Any) -> list[str]:
    """``tokens=N`` when the message reports a usage with tokens."""
    if message.HasField("usage") and message.usage.total_tokens:
        return [f"tokens={message.usage.total_tokens}"]
    return []


def _error(message: Any) -> list[str]:
    """``error=REASON: message`` when the message carries an error."""
    if not message.HasField("error"):
        return []
    detail: common_pb2.ErrorDetail = message.error
    reason = detail.reason or detail.code
    return [f"error={reason}: {detail.message}" if detail.message else f"error={reason}"]


def _kind(task: events_pb2.TaskEventData) -> list[str]:
    """What the coordinator's event adds for the kinds without fields of their own."""
    event = task.event
    kind = event.WhichOneof("kind")
    if kind == "state_changed" and event.state_changed.reason:
        return [f"reason={event.state_changed.reason!r}"]
    if kind == "partial":
        partial = event.partial
        return [f"artifact={partial.artifact_id or '-'} chunk={partial.content.ByteSize()}B"]
    if kind == "activity":
        activity = event.activity
        called = common_pb2.ActivityKind.Name(activity.kind).removeprefix("ACTIVITY_KIND_")
        done = " done" if activity.done else ""
        return [f"activity={called.lower()}:{activity.name}{done}"]
    if kind == "step":
        return [f"step={event.step.step_id}"]
    return []


def _details(event: events_pb2.Event) -> list[str]:
    which = event.WhichOneof("data")
    parts: list[str] = []
    if which == "task":
        task = event.task
        if task.state:
            parts.append(f"state={state_label(task.state)}")
        parts += _set(task, capability="capability", agent="agent_id", attempt="attempt")
        if task.HasField("progress"):
            progress = task.progress
            text = f"progress={progress.fraction:.0%}"
            if progress.step:
                text += f" step={progress.step!r}"
            if progress.message:
                text += f" {progress.message!r}"
            parts.append(text)
        if task.HasField("input_request"):
            parts.append(f"input={task.input_request.prompt or task.input_request.tool_name!r}")
        parts += _tokens(task) + _error(task) + _kind(task)
    elif which == "agent":
        agent = event.agent
        parts += [f"name={agent.name}", f"healthy={str(agent.healthy).lower()}"]
        parts += _set(agent, address="address")
        if agent.capabilities:
            parts.append(f"capabilities={','.join(agent.capabilities)}")
        if agent.reason:
            parts.append(f"reason={agent.reason!r}")
    elif which == "model":
        model = event.model
        parts += [f"model={model.model}", f"backend={model.backend}"]
        parts += _set(model, op="operation", task="task_id") + _tokens(model) + _error(model)
    elif which == "tool":
        tool = event.tool
        parts.append(f"tool={tool.tool_name}")
        parts += _set(tool, outcome="outcome", task="task_id")
        if tool.HasField("duration"):
            parts.append(f"took={tool.duration.ToTimedelta().total_seconds():.3f}s")
        parts += _error(tool)
    elif which == "workflow":
        workflow = event.workflow
        parts += _set(workflow, step="step_id", capability="capability")
        if workflow.state:
            parts.append(f"state={state_label(workflow.state)}")
        parts += _error(workflow)
    elif which == "project":
        parts.append(f"project={event.project.name or event.project.project_id}")
    return parts


def format_event(event: events_pb2.Event, stream_sequence: int) -> str:
    """One human-readable line: time, stream sequence, type, subject and the key data."""
    when = event.time.ToDatetime(tzinfo=UTC).isoformat(timespec="milliseconds")
    parts = [
        when.replace("+00:00", "Z"),
        f"#{stream_sequence}",
        f"{event.type:<24}",
        event.subject or "-",
    ]
    if event.task_sequence:
        parts.append(f"seq={event.task_sequence}")
    parts += _details(event)
    if event.correlation_id:
        parts.append(f"cid={event.correlation_id}")
    return " ".join(parts)


def _task_of(event: events_pb2.Event) -> str:
    which = event.WhichOneof("data")
    if which in ("task", "model", "tool", "workflow"):
        return str(getattr(event, which).task_id)
    return ""


async def _show(
    nats_url: str,
    tls: dict[str, Any],
    pattern: str,
    *,
    start: datetime | timedelta | int | Literal["new"] | None,
    follow: bool,
    dead_letters: bool,
    task_id: str | None,
    correlation_id: str | None,
    as_json: bool,
    limit: int | None,
) -> None:
    from hivewire.services.runtime.events import replay

    shown = 0
    # aclosing: stopping early (--limit) must clean up while the client still runs.
    async with contextlib.aclosing(
        replay(
            nats_url,
            pattern,
            start=start,
            follow=follow,
            missing_ok=dead_letters,
            dead_letters=dead_letters,
            nats_options=tls,
        )
    ) as received_events:
        async for received in received_events:
            if not _show_one(received, task_id, correlation_id, as_json):
                continue
            shown += 1
            if limit is not None and shown >= limit:
                return


def _dead_letter(received: ReceivedEvent) -> str:
    """`` durable=... deliveries=N error=...`` for a dead letter, "" for an event."""
    from hivewire.services.runtime.events import (
        HEADER_CONSUMER,
        HEADER_DELIVERY_COUNT,
        HEADER_LAST_ERROR,
    )

    headers = received.headers
    if HEADER_CONSUMER not in headers:
        return ""
    parts = [f"durable={headers[HEADER_CONSUMER]}"]
    if HEADER_DELIVERY_COUNT in headers:
        parts.append(f"deliveries={headers[HEADER_DELIVERY_COUNT]}")
    if HEADER_LAST_ERROR in headers:
        parts.append(f"error={headers[HEADER_LAST_ERROR]!r}")
    return " " + " ".join(parts)


def _show_one(
    received: ReceivedEvent, task_id: str | None, correlation_id: str | None, as_json: bool
) -> bool:
    """Print the event if it passes the filters; returns whether it was printed."""
    event = received.event
    if task_id and task_id not in (event.subject, _task_of(event)):
        return False
    if correlation_id and event.correlation_id != correlation_id:
        return False
    if as_json:
        line = json_format.MessageToJson(event, indent=None)
    else:
        line = format_event(event, received.stream_sequence) + _dead_letter(received)
    sys.stdout.write(line + "\n")
    sys.stdout.flush()
    return True


@app.callback(invoke_without_command=True)
def events(
    ctx: typer.Context,
    follow: Annotated[
        bool, typer.Option("--follow", "-f", help="Keep printing new events until Ctrl-C.")
    ] = False,
    category: Annotated[
        str | None,
        typer.Option("--category", "-c", help=f"Only this category: {', '.join(_CATEGORIES)}."),
    ] = None,
    event_type: Annotated[
        str | None, typer.Option("--type", "-t", help="Only this event type, e.g. task.failed.")
    ] = None,
    task_id: Annotated[
        str | None, typer.Option("--task-id", help="Only events about this task.")
    ] = None,
    correlation_id: Annotated[
        str | None, typer.Option("--correlation-id", help="Only events of this correlation id.")
    ] = None,
    since: Annotated[
        str | None,
        typer.Option("--since", help="Start this long ago (90s, 10m, 2h, 1d) or at an ISO time."),
    ] = None,
    from_seq: Annotated[
        int | None, typer.Option("--from-seq", min=1, help="Start at this stream sequence.")
    ] = None,
    limit: Annotated[
        int | None, typer.Option("--limit", "-n", min=1, help="Stop after this many events.")
    ] = None,
    as_json: Annotated[
        bool, typer.Option("--json", help="One protobuf-JSON Event object per line.")
    ] = False,
    dlq: Annotated[
        bool,
        typer.Option("--dlq", help="Read the dead letters (HIVEWIRE_DLQ) instead."),
    ] = False,
    nats_url: NatsUrlOpt = None,
) -> None:
    """Print events from the HIVEWIRE_EVENTS stream.

    History by default (all retained events, or from --since / --from-seq); with
    --follow, new events as they happen (after that history when --since or --from-seq
    is given). With --dlq, the dead letters: events a durable subscriber gave up on.
    """
    if ctx.invoked_subcommand is not None:
        return
    if since is not None and from_seq is not None:
        raise typer.BadParameter("give --since or --from-seq, not both")
    if category is not None and category not in _CATEGORIES:
        raise typer.BadParameter(
            f"unknown category {category!r} (one of {', '.join(_CATEGORIES)})",
            param_hint="--category",
        )
    if event_type is not None:
        if category is not None and not event_type.startswith(category + "."):
            raise typer.BadParameter(f"--type {event_type} is not in --category {category}")
        pattern = event_type
    else:
        pattern = f"{category}.>" if category else ">"
    start: datetime | timedelta | int | Literal["new"] | None
    if from_seq is not None:
        start = from_seq
    elif since is not None:
        start = parse_since(since)
    else:
        start = "new" if follow else None
    from hivewire.services.runtime.config import load_settings
    from hivewire.services.runtime.tls import TlsFiles, nats_tls_options

    settings = load_settings()
    nats_url = nats_url or settings.nats_url
    # The mesh's NATS (tls://) reads the client certificate, as the other commands do.
    tls = nats_tls_options(nats_url, TlsFiles.for_identity(settings.certs_dir, "client"))
    try:
        asyncio.run(
            _show(
                nats_url,
                tls,
                pattern,
                start=start,
                follow=follow,
                dead_letters=dlq,
                task_id=task_id,
                correlation_id=correlation_id,
                as_json=as_json,
                limit=limit,
            )
        )
    except KeyboardInterrupt:
        # Ctrl-C is how one stops following: a normal end.
        raise typer.Exit(0) from None
    except HivewireError as exc:
        fail(str(exc))
    except ValueError as exc:
        fail(str(exc))
    except BrokenPipeError:
        # `hivewire events | head`: the reader has gone.
        sys.stderr.close()
        raise typer.Exit(0) from None


@app.command("redrive")
def redrive(
    durable: Annotated[
        str, typer.Option("--durable", "-d", help="The subscriber whose dead letters go back.")
    ],
    event_type: Annotated[
        str | None, typer.Option("--type", "-t", help="Only dead letters of this event type.")
    ] = None,
    nats_url: NatsUrlOpt = None,
) -> None:
    """Republish a durable's dead letters to their original subjects, then drop them."""
    from hivewire.services.runtime.events import redrive as redrive_dead_letters

    if nats_url is None:
        from hivewire.services.runtime.config import load_settings

        nats_url = load_settings().nats_url
    try:
        ids = asyncio.run(redrive_dead_letters(nats_url, durable, pattern=event_type or ">"))
    except (HivewireError, ValueError) as exc:
        fail(str(exc))
    for event_id in ids:
        sys.stdout.write(event_id + "\n")
    sys.stderr.write(f"redrove {len(ids)} dead letter(s) of {durable}\n")
