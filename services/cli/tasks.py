"""``hivewire submit | watch | cancel | tasks | agents``: drive the coordinator.

``submit`` sends a task and follows it live (a progress bar on a terminal, one line per
event otherwise) until it ends; the task's output goes to standard output, everything
else to standard error, so ``hivewire submit echo hi > out.txt`` keeps just the output.
Pressing Ctrl-C stops following, never the task: ``hivewire watch <id> --after <n>``
picks it up again. When the coordinator goes away mid-stream, following resumes on the
next one that connects (or the same one once it is back), after the last event shown.
When the task asks for input and standard input is a terminal, the question is asked
right there.

The coordinator comes from ``--address`` (default ``HIVEWIRE_COORDINATOR__ADDRESS``,
127.0.0.1:50051): one ``host:port``, several separated by commas (the first that
connects is used: a dead one is skipped), or ``discovery`` (the coordinators the
registry of ``HIVEWIRE_DISCOVERY`` lists, on ``HIVEWIRE_NATS_URL``). The client
certificate comes from ``--certs-dir`` and ``--identity`` (default
``HIVEWIRE_CERTS_DIR`` and the ``client`` identity). An end user acts with their own
API key or JWT: ``hivewire --api-key <key> ...`` or ``--token <jwt>`` (or
``HIVEWIRE_API_KEY`` / ``HIVEWIRE_TOKEN``), sent as ``authorization: Bearer`` on every
call; the coordinator then treats the key's or token's principal as the caller
(docs/security.md).

Exit status:

==  =============================================================================
0   the task succeeded (submit, watch), or the command did what it was asked
1   unexpected failure (a bug; ``--verbose`` shows the traceback)
2   usage error (bad flags or arguments)
3   the task failed or was dead-lettered
4   the task was cancelled
5   the coordinator refused the request (printed as ``Error: CODE REASON: message``)
6   the coordinator could not be reached, or the client certificate is missing
130 interrupted (Ctrl-C); the task keeps running
==  =============================================================================
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import inspect
import json
import sys
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Annotated, Any, Protocol, TypeVar

import grpc
import typer
from google.protobuf import json_format, struct_pb2
from google.protobuf.message import Message
from rich.console import Console
from rich.progress import BarColumn, Progress, SpinnerColumn, TaskProgressColumn, TextColumn
from rich.table import Table

from hivewire.common.v1 import common_pb2
from hivewire.coordinator.v1 import coordinator_pb2, coordinator_pb2_grpc
from hivewire.services.cli.output import echo_json, echo_result, fail, state_label
from hivewire.services.cli.plans import PlanFileError, load_plan
from hivewire.services.runtime.errors import HivewireError, InvalidArgument
from hivewire.services.runtime.status import from_rpc_error

T = TypeVar("T")
M = TypeVar("M", bound=Message)

EXIT_OK = 0
EXIT_TASK_FAILED = 3
EXIT_TASK_CANCELLED = 4
EXIT_REFUSED = 5
EXIT_UNREACHABLE = 6
EXIT_INTERRUPTED = 130

_PRIORITIES = {
    "low": common_pb2.PRIORITY_LOW,
    "medium": common_pb2.PRIORITY_MEDIUM,
    "high": common_pb2.PRIORITY_HIGH,
    "critical": common_pb2.PRIORITY_CRITICAL,
}
_UNREACHABLE_CODES = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
RESUME_WITHIN = 60.0
"""Seconds a followed task waits for a coordinator to come back before giving up."""
REGISTRY_TIMEOUT = 10.0
"""Seconds ``--address discovery`` waits for the registry to list the coordinators.

A NATS that refuses the connection (nothing listening) ends the wait at once."""

app = typer.Typer()

AddressOpt = Annotated[
    str | None,
    typer.Option(
        "--address",
        "-a",
        help="Coordinator host:port, several comma-separated (the first that connects),"
        " or 'discovery' (the registry's coordinators). Default: HIVEWIRE_COORDINATOR__ADDRESS.",
    ),
]
CertsOpt = Annotated[
    Path | None, typer.Option("--certs-dir", help="Directory of ca.pem and the client cert.")
]
IdentityOpt = Annotated[
    str, typer.Option("--identity", help="Client certificate stem in the certs dir.")
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print protobuf JSON, one object per line.")]
OutcomeOnlyOpt = Annotated[
    bool,
    typer.Option(
        "--outcome-only",
        help="Show only the task's start, input requests and end (no progress or partials).",
    ),
]


# -- connection and errors ---------------------------------------------------------------


@dataclass(frozen=True)
class _Target:
    address: str
    """As given: ``host:port``, a comma-separated list, or ``discovery``."""
    certs_dir: Path
    identity: str
    bearer: str | None = None


_bearer: str | None = None


def use_credential(credential: str | None) -> None:
    """Send this API key or JWT with every call of this CLI run (None: only mTLS)."""
    global _bearer
    _bearer = credential or None


def _target(address: str | None, certs_dir: Path | None, identity: str) -> _Target:
    from hivewire.services.coordinator.settings import CoordinatorProcessSettings
    from hivewire.services.runtime.config import load_settings
    from hivewire.services.runtime.failover import DISCOVERY, parse_addresses

    settings = load_settings(CoordinatorProcessSettings, certs_dir=certs_dir)
    given = address or settings.coordinator.address
    if given.strip() != DISCOVERY:
        try:
            parse_addresses(given)
        except ValueError as exc:
            raise typer.BadParameter(str(exc), param_hint="--address") from None
    return _Target(given, settings.certs_dir, identity, _bearer)


async def _addresses(target: _Target) -> list[str]:
    """The coordinators to try, in order: the list given, or the registry's."""
    from hivewire.discovery import RegistryError
    from hivewire.services.runtime.bootstrap import registry_from_settings
    from hivewire.services.runtime.config import load_settings
    from hivewire.services.runtime.failover import (
        COORDINATOR_SERVICE,
        DISCOVERY,
        parse_addresses,
    )

    if target.address.strip() != DISCOVERY:
        return parse_addresses(target.address)
    settings = load_settings(certs_dir=target.certs_dir, identity=target.identity)
    try:
        async with asyncio.timeout(REGISTRY_TIMEOUT):
            async with registry_from_settings(settings, fail_fast=True) as registry:
                found = await registry.resolve(COORDINATOR_SERVICE)
    except (RegistryError, TimeoutError) as exc:
        why = str(exc) or f"no answer within {REGISTRY_TIMEOUT:.0f}s"
        raise _FailureError(
            f"cannot read the registry ({settings.discovery}): {why}", EXIT_UNREACHABLE
        ) from exc
    if not found:
        raise _FailureError(
            f"the registry ({settings.discovery}) lists no healthy coordinator", EXIT_UNREACHABLE
        )
    return [instance.endpoint for instance in found]


@contextlib.asynccontextmanager
async def _connect(
    target: _Target,
) -> AsyncIterator[coordinator_pb2_grpc.CoordinatorServiceAsyncStub]:
    from hivewire.services.runtime.failover import connect_first
    from hivewire.services.runtime.tls import TlsFiles

    files = TlsFiles.for_identity(target.certs_dir, target.identity)
    files.read()  # a missing certificate is reported before any registry or network call
    connected = await connect_first(await _addresses(target), files, bearer=target.bearer)
    for skipped in connected.skipped:
        typer.echo(f"coordinator {skipped} unreachable; trying the next one", err=True)
    channel = connected.channel
    try:
        stub: coordinator_pb2_grpc.CoordinatorServiceAsyncStub = (
            coordinator_pb2_grpc.CoordinatorServiceStub(channel)
        )
        yield stub
    finally:
        await channel.close()


class _FailureError(Exception):
    """A one-line error and the exit status that goes with it."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


def describe_error(err: HivewireError) -> str:
    """``CODE REASON: message (field: why; ...)`` for one line on stderr."""
    text = f"{err.code.name} {err.reason}: {err.message}"
    if isinstance(err, InvalidArgument) and err.violations:
        details = "; ".join(f"{v.field}: {v.description}" for v in err.violations)
        if details not in err.message:
            text += f" ({details})"
    return text


@dataclass(frozen=True)
class Coordinator:
    """The coordinator a command's work runs against.

    Attributes:
        stub: The connected stub to call.
        target: How it was reached (what following a task reconnects through).
    """

    stub: coordinator_pb2_grpc.CoordinatorServiceAsyncStub
    target: _Target


Work = Callable[[Coordinator], Awaitable[int]]
"""A command's calls on the connected coordinator; returns the exit status."""


def coordinator_command(
    typer_app: typer.Typer, name: str | None = None, *, identity: str = "client"
) -> Callable[[Callable[..., Work]], Callable[..., None]]:
    """Register a command that calls the coordinator.

    The decorated function takes the command's own arguments, checks them and returns
    its :data:`Work`. The command adds the options every such command takes
    (``--address``, ``--certs-dir`` and ``--identity``, by default ``identity``); once
    the function returned, it connects and runs the work, which turns RPC errors into
    one line on stderr and the exit statuses of the module docstring.

    Args:
        typer_app: The Typer app the command belongs to.
        name: The command's name (default: the function's).
        identity: The default client certificate stem.
    """
    default_identity = identity

    def register(build: Callable[..., Work]) -> Callable[..., None]:
        @functools.wraps(build)
        def command(
            *args: Any, address: str | None, certs_dir: Path | None, identity: str, **kwargs: Any
        ) -> None:
            work = build(*args, **kwargs)
            _run(_target(address, certs_dir, identity), work)

        # Typer reads a command's options from its signature: the function's own
        # parameters, then the connection options.
        own = inspect.signature(build, eval_str=True)
        connection = [
            inspect.Parameter(param, inspect.Parameter.KEYWORD_ONLY, default=value, annotation=hint)
            for param, hint, value in (
                ("address", AddressOpt, None),
                ("certs_dir", CertsOpt, None),
                ("identity", IdentityOpt, default_identity),
            )
        ]
        signature = own.replace(
            parameters=[*own.parameters.values(), *connection], return_annotation=None
        )
        command.__signature__ = signature  # type: ignore[attr-defined]  # functions declare none; inspect reads it
        command.__annotations__ = {p.name: p.annotation for p in signature.parameters.values()}
        typer_app.command(name)(command)
        return command

    return register


def _run(target: _Target, work: Work) -> None:
    async def main() -> int:
        try:
            async with _connect(target) as stub:
                return await work(Coordinator(stub, target))
        except grpc.aio.AioRpcError as exc:
            err = from_rpc_error(exc)
            status = EXIT_UNREACHABLE if exc.code() in _UNREACHABLE_CODES else EXIT_REFUSED
            if status == EXIT_UNREACHABLE and exc.code() is grpc.StatusCode.UNAVAILABLE:
                where = ", ".join(target.address.split(","))
                raise _FailureError(
                    f"{describe_error(err)} (is a coordinator running at {where}?)", status
                ) from exc
            raise _FailureError(describe_error(err), status) from exc
        except FileNotFoundError as exc:
            raise _FailureError(str(exc), EXIT_UNREACHABLE) from exc

    try:
        status = asyncio.run(main())
    except _FailureError as exc:
        fail(str(exc), exc.status)
    except KeyboardInterrupt:
        raise typer.Exit(EXIT_INTERRUPTED) from None
    raise typer.Exit(status)


# -- rendering ---------------------------------------------------------------------------


def output_text(payload: common_pb2.Payload) -> str:
    """What to print for a task's output."""
    if payload.text:
        return payload.text
    if payload.HasField("json"):
        return json.dumps(json_format.MessageToDict(payload.json), indent=2)
    if payload.data:
        return f"<{len(payload.data)} bytes of {payload.content_type or 'data'}>"
    return ""


def _clip(text: str, width: int = 80) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1] + "…"


@dataclass
class EventView:
    """Shows a task's events: a live progress bar, plain lines, or JSON lines.

    Args:
        err: Console for progress and status (standard error).
        out: Where the output (or the JSON lines) goes.
        live: Draw a progress bar (a terminal); otherwise one line per event.
        json_lines: Print every event as protobuf JSON instead.
        outcome_only: The stream shown is an ``outcome_only`` one (so is its resume).
    """

    err: Console
    out: IO[str]
    live: bool
    json_lines: bool = False
    outcome_only: bool = False
    task_id: str = ""
    last_sequence: int = 0
    state: int = common_pb2.TASK_STATE_UNSPECIFIED
    finished: coordinator_pb2.TaskFinished | None = None
    partials: dict[str, str] = field(default_factory=dict)
    _streaming: str | None = None
    _progress: Progress | None = None
    _bar: Any = None
    _step_bars: dict[str, Any] = field(default_factory=dict)
    plan_steps: int = 0

    def __enter__(self) -> EventView:
        if self.live and not self.json_lines:
            self._progress = Progress(
                SpinnerColumn(),
                TextColumn("[bold]{task.fields[state]:<14}"),
                BarColumn(),
                TaskProgressColumn(),
                TextColumn("{task.fields[step]}"),
                TextColumn("{task.description}"),
                console=self.err,
            )
            self._progress.start()
            self._bar = self._progress.add_task("", total=1.0, state="submitted", step="")
        return self

    def __exit__(self, *exc: object) -> None:
        self.pause()

    def pause(self) -> None:
        """Stop drawing (before a prompt, at the end)."""
        self._end_stream()
        if self._progress is not None:
            self._progress.stop()

    def resume(self) -> None:
        """Draw again after :meth:`pause`."""
        if self._progress is not None:
            self._progress.start()

    def _line(self, event: coordinator_pb2.TaskEvent, text: str) -> None:
        if self._progress is not None:
            return
        self._end_stream()
        self.err.print(f"#{event.sequence} {text}", markup=False, highlight=False)

    def _stream(self, event: coordinator_pb2.TaskEvent, part: common_pb2.PartialResult) -> None:
        """Plain mode: an artifact's chunks run on one line (one line per token is noise)."""
        if self._progress is not None or self.json_lines:
            return
        if self._streaming != part.artifact_id:
            self._end_stream()
            self.err.print(
                f"#{event.sequence} partial {part.artifact_id}: ",
                end="",
                markup=False,
                highlight=False,
            )
            self._streaming = part.artifact_id
        self.err.print(part.content.text.replace("\n", " "), end="", markup=False, highlight=False)
        if part.last_chunk:
            self._end_stream()

    def _end_stream(self) -> None:
        if self._streaming is not None:
            self.err.print(markup=False, highlight=False)
            self._streaming = None

    def _update(self, **fields: Any) -> None:
        if self._progress is not None:
            self._progress.update(self._bar, **fields)

    def handle(self, event: coordinator_pb2.TaskEvent) -> None:
        """Show one event."""
        self.task_id = event.task_id or self.task_id
        if event.WhichOneof("kind") != "snapshot":
            self.last_sequence = max(self.last_sequence, event.sequence)
        if self.json_lines:
            self.out.write(json_format.MessageToJson(event, indent=None) + "\n")
            self.out.flush()
        kind = event.WhichOneof("kind")
        if kind == "snapshot":
            task = event.snapshot
            self.task_id = task.task_id
            self.plan_steps = len(task.spec.plan.steps)
            self.last_sequence = max(self.last_sequence, event.sequence)
            self.state = task.state
            self._update(state=state_label(task.state), completed=task.progress.fraction)
            self._line(event, f"task {task.task_id} {state_label(task.state)}")
        elif kind == "state_changed":
            change = event.state_changed
            self.state = change.to_state
            self._update(state=state_label(change.to_state))
            self._line(event, f"{state_label(change.to_state)}: {change.reason}")
        elif kind == "progress":
            p = event.progress
            self._update(completed=p.fraction, step=p.step, description=_clip(p.message, 50))
            self._line(event, f"progress {p.fraction:.0%} {p.step}: {p.message}".rstrip(": "))
        elif kind == "partial":
            part = event.partial
            text = part.content.text
            previous = self.partials.get(part.artifact_id, "") if part.append else ""
            self.partials[part.artifact_id] = previous + text
            self._update(description=_clip(self.partials[part.artifact_id][-50:], 50))
            self._stream(event, part)
        elif kind == "input_required":
            self._line(
                event,
                f"input required ({event.input_required.request_id}): "
                f"{event.input_required.prompt}",
            )
        elif kind == "activity":
            act = event.activity
            kind_name = (
                common_pb2.ActivityKind.Name(act.kind).removeprefix("ACTIVITY_KIND_").lower()
            )
            self._line(event, f"{kind_name} {act.name}{' done' if act.done else ''}: {act.summary}")
        elif kind == "retry":
            r = event.retry
            self._line(
                event,
                f"attempt {r.failed_attempt} failed ({r.error.reason}); retrying in "
                f"{r.backoff.ToTimedelta().total_seconds():.2f}s",
            )
        elif kind == "step":
            self._step(event, event.step)
        elif kind == "finished":
            self.finished = event.finished
            self.state = event.finished.state
            self._update(state=state_label(event.finished.state))
            if event.finished.state == common_pb2.TASK_STATE_SUCCEEDED:
                self._update(completed=1.0)
            self._line(event, f"finished: {state_label(event.finished.state)}")

    def _step(self, event: coordinator_pb2.TaskEvent, step: coordinator_pb2.StepEvent) -> None:
        """A plan step moved on: a row of the live tree, or one line."""
        kind = coordinator_pb2.StepEventKind.Name(step.kind).removeprefix("STEP_EVENT_KIND_")
        kind = kind.lower().replace("_", " ")
        state = state_label(step.state)
        label = step.step_id
        if step.role == coordinator_pb2.TASK_ROLE_COMPENSATION:
            label = f"{step.step_id} (undo)"
        if self._progress is not None:
            bar = self._step_bars.get(label)
            if bar is None:
                glyph = "└─" if step.role == coordinator_pb2.TASK_ROLE_AGGREGATOR else "├─"
                bar = self._progress.add_task(f"{glyph} {label}", total=1.0, state=state, step="")
                self._step_bars[label] = bar
            fields: dict[str, Any] = {"state": state}
            if step.HasField("progress"):
                fields["completed"] = step.progress.fraction
                fields["step"] = step.progress.step
            if step.state == common_pb2.TASK_STATE_SUCCEEDED:
                fields["completed"] = 1.0
            self._progress.update(bar, **fields)
            done = sum(
                1
                for b in self._step_bars.values()
                if self._progress.tasks[b].fields.get("state") == "succeeded"
            )
            self._update(completed=done / max(self.plan_steps, len(self._step_bars), 1))
            return
        detail = ""
        if step.HasField("progress"):
            detail = f" {step.progress.fraction:.0%} {step.progress.step}".rstrip()
        elif step.HasField("partial"):
            detail = f" {_clip(step.partial.content.text, 40)}"
        elif step.HasField("error"):
            detail = f" ({step.error.reason}: {_clip(step.error.message, 60)})"
        self._line(event, f"step {label} {kind}: {state}{detail}")

    @property
    def resume_command(self) -> str:
        """The command that follows this task on from the last event shown."""
        flag = " --outcome-only" if self.outcome_only else ""
        return f"hivewire watch {self.task_id} --after {self.last_sequence}{flag}"

    def conclude(self) -> int:
        """Print the output or the error; return the exit status for the final state."""
        self.pause()
        done = self.finished
        if done is None:
            self.err.print(
                f"stopped following task {self.task_id}; resume with `{self.resume_command}`",
                markup=False,
            )
            return EXIT_INTERRUPTED
        if done.state == common_pb2.TASK_STATE_SUCCEEDED:
            if not self.json_lines:
                text = output_text(done.output)
                if text:
                    self.out.write(text + ("" if text.endswith("\n") else "\n"))
                    self.out.flush()
            return EXIT_OK
        error = done.error
        self.err.print(
            f"task {self.task_id} {state_label(done.state)}: "
            f"{error.code} {error.reason}: {error.message}",
            markup=False,
            highlight=False,
        )
        return (
            EXIT_TASK_CANCELLED
            if done.state == common_pb2.TASK_STATE_CANCELLED
            else EXIT_TASK_FAILED
        )


async def follow(
    stub: coordinator_pb2_grpc.CoordinatorServiceAsyncStub,
    events: AsyncIterable[Any],
    view: EventView,
    *,
    interactive: bool,
) -> int:
    """Show a task's stream until it ends; answer input requests when interactive."""
    try:
        async for response in events:
            event = response.event
            view.handle(event)
            if event.HasField("input_required") and interactive:
                await _answer(stub, view, event)
    except asyncio.CancelledError:
        return view.conclude()
    return view.conclude()


async def follow_resuming(
    coordinator: Coordinator,
    events: AsyncIterable[Any],
    view: EventView,
    *,
    interactive: bool,
) -> int:
    """:func:`follow`, resuming on another coordinator when this one goes away.

    A stream that ends with UNAVAILABLE once the task is known (its coordinator died or
    stopped) goes on with ``WatchTask`` after the last event shown, on the first
    coordinator of the target that connects: another one of the list, or the same one
    once it is back, as an ``outcome_only`` stream when ``view`` shows one. Nothing is
    shown twice and nothing is skipped.
    """
    stub, target = coordinator.stub, coordinator.target
    async with contextlib.AsyncExitStack() as channels:
        while True:
            try:
                return await follow(stub, events, view, interactive=interactive)
            except grpc.aio.AioRpcError as exc:
                if exc.code() is not grpc.StatusCode.UNAVAILABLE or not view.task_id:
                    raise
                why = exc.details() or exc.code().name
            connected = await _reconnect(target, view)
            channels.push_async_callback(connected.channel.close)
            view.err.print(
                f"lost the coordinator ({why}); following task {view.task_id} on"
                f" {connected.address} after event #{view.last_sequence}",
                markup=False,
                highlight=False,
            )
            stub = coordinator_pb2_grpc.CoordinatorServiceStub(connected.channel)
            events = stub.WatchTask(
                coordinator_pb2.WatchTaskRequest(
                    task_id=view.task_id,
                    after_sequence=view.last_sequence,
                    include_snapshot=False,
                    outcome_only=view.outcome_only,
                )
            )


async def _reconnect(target: _Target, view: EventView) -> Any:
    from hivewire.services.runtime.failover import reconnect
    from hivewire.services.runtime.tls import TlsFiles

    files = TlsFiles.for_identity(target.certs_dir, target.identity)
    try:
        return await reconnect(
            await _addresses(target), files, within=RESUME_WITHIN, bearer=target.bearer
        )
    except TimeoutError as exc:
        raise _FailureError(
            f"{exc}; resume with `{view.resume_command}`",
            EXIT_UNREACHABLE,
        ) from exc


async def _answer(
    stub: coordinator_pb2_grpc.CoordinatorServiceAsyncStub,
    view: EventView,
    event: coordinator_pb2.TaskEvent,
) -> None:
    from rich.prompt import Confirm, Prompt

    request = event.input_required
    view.pause()
    try:
        if request.kind == common_pb2.INPUT_KIND_APPROVAL:
            approved = await asyncio.to_thread(Confirm.ask, request.prompt, console=view.err)
            answer = common_pb2.InputResponse(request_id=request.request_id, approved=approved)
        else:
            text = await asyncio.to_thread(Prompt.ask, request.prompt, console=view.err)
            answer = common_pb2.InputResponse(
                request_id=request.request_id, value=common_pb2.Payload(text=text)
            )
        await stub.ProvideInput(
            coordinator_pb2.ProvideInputRequest(task_id=event.task_id, response=answer)
        )
    finally:
        view.resume()


def _view(json_lines: bool, *, outcome_only: bool = False) -> EventView:
    # soft_wrap: a line per event, never folded at the console width (logs, pipes).
    err = Console(stderr=True, soft_wrap=True)
    return EventView(
        err=err,
        out=sys.stdout,
        live=err.is_terminal,
        json_lines=json_lines,
        outcome_only=outcome_only,
    )


def _listing(
    items: Sequence[M],
    columns: Sequence[str],
    row: Callable[[M], Sequence[str]],
    *,
    json_lines: bool,
    width: int,
) -> int:
    """Print a list command's result: a table, or one JSON object per line."""
    if json_lines:
        for item in items:
            echo_json(item)
        return EXIT_OK
    table = Table(box=None, pad_edge=False)
    for column in columns:
        table.add_column(column)
    for item in items:
        table.add_row(*row(item))
    Console(width=width).print(table)
    return EXIT_OK


class _PageRequest(Protocol):
    page_size: int
    page_token: str


PageRequestT = TypeVar("PageRequestT", bound=_PageRequest)
PAGE_SIZE = 500
"""The most items a list command asks for in one call."""


async def paged(
    rpc: Callable[[PageRequestT], Awaitable[Any]], request: PageRequestT, items: str, limit: int
) -> AsyncIterator[Any]:
    """The first ``limit`` items of a paged list RPC (its response's ``items`` field).

    Pages hold at most :data:`PAGE_SIZE` items; the next page is asked for only while
    more items are wanted and the last response named one.
    """
    shown = 0
    while shown < limit:
        request.page_size = min(limit - shown, PAGE_SIZE)
        response = await rpc(request)
        for item in getattr(response, items):
            yield item
            shown += 1
        request.page_token = response.next_page_token
        if not request.page_token:
            break


def _task_row(task: coordinator_pb2.Task) -> Sequence[str]:
    return (
        task.task_id,
        state_label(task.state),
        task.spec.capability or f"plan ({len(task.spec.plan.steps)} steps)",
        common_pb2.Priority.Name(task.spec.priority).removeprefix("PRIORITY_").lower(),
        str(task.attempt),
        task.created_at.ToDatetime().strftime("%Y-%m-%d %H:%M:%S"),
        f"{task.progress.fraction:.0%} {task.progress.step}".strip(),
    )


def _agent_row(agent: coordinator_pb2.AgentStatus) -> Sequence[str]:
    card = agent.card
    health = coordinator_pb2.AgentHealth.Name(agent.health).removeprefix("AGENT_HEALTH_")
    return (
        agent.agent_id,
        card.name,
        card.version,
        health.lower(),
        f"{agent.in_flight}/{card.max_concurrency}",
        "open" if agent.circuit_open else "closed",
        agent.address,
        ",".join(c.name for c in card.capabilities),
    )


# -- commands ----------------------------------------------------------------------------


def build_spec(
    capability: str,
    text: str | None,
    *,
    json_input: str | None = None,
    file: Path | None = None,
    content_type: str | None = None,
    priority: str | None = None,
    timeout: float | None = None,
    key: str | None = None,
    max_attempts: int | None = None,
    token_budget: int | None = None,
    labels: list[str] | None = None,
) -> coordinator_pb2.TaskSpec:
    """The TaskSpec of ``hivewire submit``'s arguments.

    Raises:
        typer.BadParameter: A malformed ``--json``, ``--label`` or ``--priority``.
    """
    payload = common_pb2.Payload(text=text or "")
    if json_input is not None:
        try:
            data = json.loads(json_input)
        except json.JSONDecodeError as exc:
            raise typer.BadParameter(f"not JSON: {exc}", param_hint="--json") from None
        if not isinstance(data, dict):
            raise typer.BadParameter("must be a JSON object", param_hint="--json")
        payload.json.CopyFrom(json_format.ParseDict(data, struct_pb2.Struct()))
    if file is not None:
        payload.data = file.read_bytes()
        payload.content_type = content_type or "application/octet-stream"
    spec = coordinator_pb2.TaskSpec(
        capability=capability,
        input=payload,
        idempotency_key=key or "",
        max_attempts=max_attempts or 0,
        token_budget=token_budget or 0,
        metadata=common_pb2.RequestMetadata(source="cli"),
    )
    if priority is not None:
        if priority.lower() not in _PRIORITIES:
            raise typer.BadParameter(f"one of {', '.join(_PRIORITIES)}", param_hint="--priority")
        spec.priority = _PRIORITIES[priority.lower()]
    if timeout is not None:
        spec.timeout.FromNanoseconds(int(timeout * 1e9))
    for label in labels or []:
        name, sep, value = label.partition("=")
        if not sep or not name:
            raise typer.BadParameter(f"{label!r} is not key=value", param_hint="--label")
        spec.labels[name] = value
    return spec


@coordinator_command(app)
def submit(
    capability: Annotated[
        str | None, typer.Argument(help="The capability to run, e.g. summarize.")
    ] = None,
    text: Annotated[str | None, typer.Argument(help="Text input.")] = None,
    plan: Annotated[
        Path | None,
        typer.Option(
            "--plan",
            exists=True,
            dir_okay=False,
            help="Run a plan from a YAML or JSON file instead of one capability.",
        ),
    ] = None,
    project: Annotated[
        str | None, typer.Option("--project", help="The project the task belongs to.")
    ] = None,
    json_input: Annotated[
        str | None, typer.Option("--input-json", help="JSON object input.")
    ] = None,
    file: Annotated[
        Path | None, typer.Option("--file", exists=True, dir_okay=False, help="File as input.")
    ] = None,
    content_type: Annotated[str | None, typer.Option(help="Media type of --file.")] = None,
    priority: Annotated[
        str | None, typer.Option("--priority", "-p", help="low, medium, high or critical.")
    ] = None,
    timeout: Annotated[
        float | None, typer.Option("--timeout", "-t", help="Task timeout in seconds.")
    ] = None,
    key: Annotated[
        str | None, typer.Option("--idempotency-key", "-k", help="Makes resubmission safe.")
    ] = None,
    max_attempts: Annotated[
        int | None, typer.Option(min=1, help="Attempts before dead-letter.")
    ] = None,
    token_budget: Annotated[int | None, typer.Option(min=0, help="Model token budget.")] = None,
    label: Annotated[
        list[str] | None, typer.Option("--label", help="key=value, repeatable.")
    ] = None,
    detach: Annotated[
        bool, typer.Option("--detach", "-d", help="Print the task id and return at once.")
    ] = False,
    no_input: Annotated[
        bool, typer.Option("--no-input", help="Never prompt when the task asks for input.")
    ] = False,
    outcome_only: OutcomeOnlyOpt = False,
    json_lines: JsonOpt = False,
) -> Work:
    """Submit a task (or a plan) and follow it live until it ends (output on stdout)."""
    if (capability is None) == (plan is None):
        raise typer.BadParameter(
            "give a capability, or --plan FILE (not both)", param_hint="CAPABILITY"
        )
    spec = build_spec(
        capability or "",
        text,
        json_input=json_input,
        file=file,
        content_type=content_type,
        priority=priority,
        timeout=timeout,
        key=key,
        max_attempts=max_attempts,
        token_budget=token_budget,
        labels=label,
    )
    if plan is not None:
        try:
            spec.plan.CopyFrom(load_plan(plan))
        except PlanFileError as exc:
            raise typer.BadParameter(str(exc), param_hint="--plan") from None
        if not text and json_input is None and file is None:
            spec.ClearField("input")
    if project:
        spec.project_id = project

    async def work(coordinator: Coordinator) -> int:
        if detach:
            response = await coordinator.stub.SubmitTask(
                coordinator_pb2.SubmitTaskRequest(spec=spec)
            )
            echo_result(response, response.task.task_id, json_lines=json_lines)
            return EXIT_OK
        with _view(json_lines, outcome_only=outcome_only) as view:
            call = coordinator.stub.StreamTask(
                coordinator_pb2.StreamTaskRequest(spec=spec, outcome_only=outcome_only)
            )
            return await follow_resuming(
                coordinator, call, view, interactive=_interactive(no_input)
            )

    return work


def _interactive(no_input: bool) -> bool:
    return not no_input and sys.stdin.isatty()


@coordinator_command(app)
def watch(
    task_id: Annotated[str, typer.Argument(help="The task to follow.")],
    after: Annotated[
        int, typer.Option("--after", min=0, help="Replay only events after this sequence.")
    ] = 0,
    no_input: Annotated[
        bool, typer.Option("--no-input", help="Never prompt when the task asks for input.")
    ] = False,
    outcome_only: OutcomeOnlyOpt = False,
    json_lines: JsonOpt = False,
) -> Work:
    """Follow a task: replay its events (after --after), then live until it ends."""

    async def work(coordinator: Coordinator) -> int:
        with _view(json_lines, outcome_only=outcome_only) as view:
            view.last_sequence = after
            call = coordinator.stub.WatchTask(
                coordinator_pb2.WatchTaskRequest(
                    task_id=task_id,
                    after_sequence=after,
                    include_snapshot=True,
                    outcome_only=outcome_only,
                )
            )
            return await follow_resuming(
                coordinator, call, view, interactive=_interactive(no_input)
            )

    return work


@coordinator_command(app)
def cancel(
    task_id: Annotated[str, typer.Argument(help="The task to cancel.")],
    reason: Annotated[str, typer.Option("--reason", "-r", help="Recorded with the task.")] = "",
    json_lines: JsonOpt = False,
) -> Work:
    """Cancel a task (cancelling a cancelled task is fine)."""

    async def work(coordinator: Coordinator) -> int:
        response = await coordinator.stub.CancelTask(
            coordinator_pb2.CancelTaskRequest(task_id=task_id, reason=reason)
        )
        echo_result(
            response, f"{task_id} {state_label(response.task.state)}", json_lines=json_lines
        )
        return EXIT_OK

    return work


@coordinator_command(app, "tasks")
def list_tasks(
    task_ids: Annotated[
        list[str] | None,
        typer.Argument(
            help="Show these tasks (an id the coordinator purged after its retention says "
            "TASK_PURGED).",
            show_default=False,
        ),
    ] = None,
    state: Annotated[
        list[str] | None,
        typer.Option("--state", "-s", help="queued, running, succeeded... (repeatable)."),
    ] = None,
    capability: Annotated[str, typer.Option("--capability", "-c", help="Only this one.")] = "",
    owner: Annotated[str, typer.Option("--owner", help="Only this owner (admins).")] = "",
    parent: Annotated[
        str, typer.Option("--parent", help="Only the steps and sub-tasks of this task.")
    ] = "",
    project: Annotated[str, typer.Option("--project", help="Only tasks of this project.")] = "",
    limit: Annotated[int, typer.Option("--limit", "-n", min=1, help="Most tasks shown.")] = 20,
    json_lines: JsonOpt = False,
) -> Work:
    """List tasks, newest first, or show the tasks given by id."""
    states = []
    for name in state or []:
        key = f"TASK_STATE_{name.upper()}"
        if key not in common_pb2.TaskState.keys() or key == "TASK_STATE_UNSPECIFIED":
            raise typer.BadParameter(f"unknown state {name!r}", param_hint="--state")
        states.append(common_pb2.TaskState.Value(key))

    async def work(coordinator: Coordinator) -> int:
        found: list[coordinator_pb2.Task] = []
        for task_id in task_ids or ():
            shown = await coordinator.stub.GetTask(coordinator_pb2.GetTaskRequest(task_id=task_id))
            found.append(shown.task)
        if not task_ids:
            request = coordinator_pb2.ListTasksRequest(
                states=states,
                capability=capability,
                owner=owner,
                parent_task_id=parent,
                project_id=project,
            )
            pages = paged(coordinator.stub.ListTasks, request, "tasks", limit)
            found = [task async for task in pages]
        return _listing(
            found,
            ("TASK", "STATE", "CAPABILITY", "PRIORITY", "ATTEMPT", "CREATED", "PROGRESS"),
            _task_row,
            json_lines=json_lines,
            width=160,
        )

    return work


@coordinator_command(app)
def agents(
    capability: Annotated[str, typer.Option("--capability", "-c", help="Only this one.")] = "",
    json_lines: JsonOpt = False,
) -> Work:
    """List the agents the coordinator routes to: capabilities, health, load."""

    async def work(coordinator: Coordinator) -> int:
        response = await coordinator.stub.ListAgents(
            coordinator_pb2.ListAgentsRequest(capability=capability)
        )
        return _listing(
            response.agents,
            ("AGENT", "NAME", "VERSION", "HEALTH", "LOAD", "CIRCUIT", "ADDRESS", "CAPABILITIES"),
            _agent_row,
            json_lines=json_lines,
            width=200,
        )

    return work


# -- projects ----------------------------------------------------------------------------

projects_app = typer.Typer(help="Projects: a goal that groups tasks and plans.")


def _project_row(project: coordinator_pb2.Project) -> Sequence[str]:
    return (
        project.project_id,
        project.name,
        project.created_at.ToDatetime().strftime("%Y-%m-%d %H:%M:%S"),
        _clip(project.goal, 60),
    )


@coordinator_command(projects_app, "create")
def create_project(
    name: Annotated[str, typer.Argument(help="A short name.")],
    goal: Annotated[str, typer.Option("--goal", "-g", help="What the project is for.")] = "",
    attribute: Annotated[
        list[str] | None, typer.Option("--attribute", help="key=value, repeatable.")
    ] = None,
    json_lines: JsonOpt = False,
) -> Work:
    """Create a project and print its id."""
    attributes: dict[str, str] = {}
    for item in attribute or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise typer.BadParameter(f"{item!r} is not key=value", param_hint="--attribute")
        attributes[key] = value

    async def work(coordinator: Coordinator) -> int:
        response = await coordinator.stub.CreateProject(
            coordinator_pb2.CreateProjectRequest(name=name, goal=goal, attributes=attributes)
        )
        echo_result(response.project, response.project.project_id, json_lines=json_lines)
        return EXIT_OK

    return work


@coordinator_command(projects_app, "list")
def list_projects(
    limit: Annotated[int, typer.Option("--limit", "-n", min=1, help="Most shown.")] = 20,
    json_lines: JsonOpt = False,
) -> Work:
    """List your projects, newest first."""

    async def work(coordinator: Coordinator) -> int:
        request = coordinator_pb2.ListProjectsRequest()
        pages = paged(coordinator.stub.ListProjects, request, "projects", limit)
        return _listing(
            [project async for project in pages],
            ("PROJECT", "NAME", "CREATED", "GOAL"),
            _project_row,
            json_lines=json_lines,
            width=160,
        )

    return work


@coordinator_command(projects_app, "show")
def show_project(
    project_id: Annotated[str, typer.Argument(help="The project's id.")],
    json_lines: JsonOpt = False,
) -> Work:
    """A project and the progress of its tasks."""

    async def work(coordinator: Coordinator) -> int:
        project = (
            await coordinator.stub.GetProject(
                coordinator_pb2.GetProjectRequest(project_id=project_id)
            )
        ).project
        if json_lines:
            echo_json(project)
            return EXIT_OK
        progress = project.progress
        states = ", ".join(f"{state_label(c.state)} {c.count}" for c in progress.tasks_by_state)
        typer.echo(f"{project.name} ({project.project_id})")
        if project.goal:
            typer.echo(f"goal: {project.goal}")
        typer.echo(
            f"tasks: {progress.total_tasks} ({progress.active_tasks} active)"
            + (f": {states}" if states else "")
        )
        typer.echo(
            f"usage: {progress.usage.total_tokens} tokens, {progress.usage.model_calls} model "
            f"calls, {progress.usage.tool_calls} tool calls"
        )
        return EXIT_OK

    return work
