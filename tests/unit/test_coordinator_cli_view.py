"""The CLI's task view: live progress on a terminal, lines otherwise, exit statuses."""

from __future__ import annotations

import io

from rich.console import Console

from hivewire.common.v1 import common_pb2
from hivewire.coordinator.v1 import coordinator_pb2
from hivewire.services.cli.tasks import (
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_TASK_CANCELLED,
    EXIT_TASK_FAILED,
    EventView,
    build_spec,
)

S = common_pb2
C = coordinator_pb2


def history(final_state: int) -> list[C.TaskEvent]:
    finished = C.TaskFinished(state=final_state)  # type: ignore[arg-type]
    if final_state == S.TASK_STATE_SUCCEEDED:
        finished.output.text = "the answer"
    else:
        finished.error.CopyFrom(S.ErrorDetail(code="CANCELLED", reason="CANCELLED", message="x"))
    return [
        C.TaskEvent(
            task_id="t1", sequence=1, snapshot=C.Task(task_id="t1", state=S.TASK_STATE_QUEUED)
        ),
        C.TaskEvent(
            task_id="t1",
            sequence=2,
            state_changed=C.StateChange(to_state=S.TASK_STATE_RUNNING, reason="started"),
        ),
        C.TaskEvent(
            task_id="t1", sequence=3, progress=S.Progress(fraction=0.5, step="half", message="m")
        ),
        C.TaskEvent(
            task_id="t1",
            sequence=4,
            partial=S.PartialResult(artifact_id="a", content=S.Payload(text="tok"), append=True),
        ),
        C.TaskEvent(task_id="t1", sequence=5, finished=finished),
    ]


def render(live: bool, final_state: int) -> tuple[int, str, str, EventView]:
    err, out = io.StringIO(), io.StringIO()
    console = Console(file=err, force_terminal=live, width=120, soft_wrap=True)
    with EventView(err=console, out=out, live=live) as view:
        for event in history(final_state):
            view.handle(event)
        code = view.conclude()
    return code, out.getvalue(), err.getvalue(), view


def test_live_view_on_a_terminal() -> None:
    code, out, err, view = render(True, S.TASK_STATE_SUCCEEDED)
    assert code == EXIT_OK
    assert out == "the answer\n"
    assert "succeeded" in err and "━" in err  # the bar was drawn
    assert view.partials == {"a": "tok"}
    assert view.last_sequence == 5


def test_plain_lines_when_not_a_terminal() -> None:
    code, out, err, _ = render(False, S.TASK_STATE_SUCCEEDED)
    assert code == EXIT_OK and out == "the answer\n"
    assert err.splitlines() == [
        "#1 task t1 queued",
        "#2 running: started",
        "#3 progress 50% half: m",
        "#4 partial a: tok",
        "#5 finished: succeeded",
    ]


def test_exit_status_follows_the_final_state() -> None:
    assert render(False, S.TASK_STATE_CANCELLED)[0] == EXIT_TASK_CANCELLED
    assert render(False, S.TASK_STATE_FAILED)[0] == EXIT_TASK_FAILED
    assert render(False, S.TASK_STATE_DEAD_LETTERED)[0] == EXIT_TASK_FAILED
    err = io.StringIO()
    view = EventView(err=Console(file=err, soft_wrap=True), out=io.StringIO(), live=False)
    view.handle(history(S.TASK_STATE_SUCCEEDED)[2])
    assert view.conclude() == EXIT_INTERRUPTED
    assert "resume with `hivewire watch t1 --after 3`" in err.getvalue()


def test_an_outcome_only_view_resumes_as_one() -> None:
    err = io.StringIO()
    view = EventView(
        err=Console(file=err, soft_wrap=True), out=io.StringIO(), live=False, outcome_only=True
    )
    view.handle(history(S.TASK_STATE_SUCCEEDED)[0])
    assert view.conclude() == EXIT_INTERRUPTED
    assert "resume with `hivewire watch t1 --after 1 --outcome-only`" in err.getvalue()


def test_build_spec() -> None:
    spec = build_spec(
        "summarize",
        "text",
        json_input='{"n": 1}',
        priority="high",
        timeout=2.5,
        key="k",
        labels=["team=ml"],
    )
    assert spec.priority == S.PRIORITY_HIGH
    assert spec.timeout.ToNanoseconds() == 2_500_000_000
    assert spec.input.json["n"] == 1 and spec.input.text == "text"
    assert dict(spec.labels) == {"team": "ml"} and spec.idempotency_key == "k"
    assert spec.metadata.source == "cli"


def test_plain_mode_streams_an_artifacts_chunks_on_one_line() -> None:
    err = io.StringIO()
    view = EventView(err=Console(file=err, soft_wrap=True), out=io.StringIO(), live=False)
    chunks = ["Hello", " mesh", ",\nworld"]
    for sequence, text in enumerate(chunks, start=1):
        view.handle(
            C.TaskEvent(
                task_id="t1",
                sequence=sequence,
                partial=S.PartialResult(
                    artifact_id="answer",
                    content=S.Payload(text=text),
                    append=True,
                    last_chunk=sequence == len(chunks),
                ),
            )
        )
    view.handle(
        C.TaskEvent(
            task_id="t1", sequence=4, progress=S.Progress(fraction=1.0, step="done", message="ok")
        )
    )
    assert err.getvalue().splitlines() == [
        "#1 partial answer: Hello mesh, world",
        "#4 progress 100% done: ok",
    ]
    assert view.partials == {"answer": "Hello mesh,\nworld"}
