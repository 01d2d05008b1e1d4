"""Plans: a task made of tasks, run in parallel where dependencies allow, then aggregated.

A plan's steps are ordinary tasks with a parent (routing, retries, breakers,
deadlines and streams are theirs like any task's). The parent is a small state
machine whose every transition is an event of its own journal, so ``WatchTask`` on
the parent follows the whole plan, and a restart resumes it::

    QUEUED -> RUNNING (steps) -> [aggregator step] -> SUCCEEDED
                 |
                 +-> a step fails for good, the plan is cancelled or its deadline passes:
                     running steps cancelled, succeeded steps compensated in reverse
                     order of completion, one at a time -> FAILED | CANCELLED

Aggregation (``Plan.aggregation``):

* ``ALL`` (default): the output is every step's output keyed by step id.
* ``FIRST_SUCCESS``: the first step to succeed wins and the others are cancelled at
  once; failed steps are tolerated while another may still succeed.
* ``VOTE``: the output most succeeded steps returned; a tie fails with the counts.
  Failed steps abstain.
* ``AGGREGATOR``: an agent with ``aggregator_capability`` gets every output with its
  provenance and returns the plan's output.

Under ``ALL`` and ``AGGREGATOR`` a step that fails for good starts the saga; under
``FIRST_SUCCESS`` and ``VOTE`` the plan fails (without compensation) only when no
step succeeded. A step whose dependency did not succeed is skipped.

Durability: the parent's ``steps`` (a :class:`StepStatus` each) are written with
every parent event, the steps are tasks in the store, and a saga in progress is
marked by the parent's ``error`` while it is still running. :meth:`Plans.recover`
rebuilds each plan from those after a restart: a step that succeeded never runs
again, a step whose task was running is re-dispatched by the scheduler like any
task, and a compensation in progress goes on.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import KW_ONLY, dataclass, field
from typing import Any, Protocol, Unpack

from google.protobuf import json_format, struct_pb2

from hivewire.common.v1 import common_pb2
from hivewire.coordinator.v1 import coordinator_pb2
from hivewire.events.v1 import events_pb2
from hivewire.services.coordinator.attempts import add_usage, deadline_error
from hivewire.services.coordinator.convert import copy_present
from hivewire.services.coordinator.journal import Ending, Journal, TaskRuntime
from hivewire.services.coordinator.model import (
    CANCELLED,
    FAILED,
    QUEUED,
    RUNNING,
    SUCCEEDED,
    TERMINAL_STATES,
    TaskRecord,
    now_ns,
)

logger = logging.getLogger(__name__)

__all__ = ["PLAN_CANCELLED", "ChildSpec", "PlanHost", "Plans", "payload_value"]

C = coordinator_pb2
STEP = C.TASK_ROLE_STEP
COMPENSATION = C.TASK_ROLE_COMPENSATION
AGGREGATOR = C.TASK_ROLE_AGGREGATOR
#: The step id of a plan's aggregator task (step ids cannot start with "_").
AGGREGATOR_STEP_ID = "_aggregate"
#: The step events a plan mirrors from its steps' own journals, by event kind.
_MIRRORED = {"progress": C.STEP_EVENT_KIND_PROGRESS, "partial": C.STEP_EVENT_KIND_PARTIAL}
#: The error reason of a step the plan itself cancelled (not a failure of the plan).
PLAN_CANCELLED = "PLAN_STEP_CANCELLED"


@dataclass(frozen=True)
class ChildSpec:
    """A task a plan starts: one of its steps, a step's compensation or the aggregator.

    Attributes:
        role: ``STEP``, ``COMPENSATION`` or ``AGGREGATOR``.
        step_id: The step it is for (the aggregator's is ``AGGREGATOR_STEP_ID``).
        capability: The capability it runs.
        payload: Its input.
        deadline_ns: When it must end; None: when the plan must.
        token_budget: None gives the task what the plan has left; 0 means no limit.
    """

    role: C.TaskRole.ValueType
    step_id: str
    capability: str
    payload: common_pb2.Payload
    _: KW_ONLY
    deadline_ns: int | None = None
    token_budget: int | None = None


class PlanHost(Protocol):
    """What plans need from the coordinator: start, cancel and finish tasks."""

    def start_child(self, parent: TaskRuntime, child: ChildSpec) -> TaskRuntime:
        """Create, store and queue a step, compensation or aggregator task."""
        ...

    def cancel_child(self, task_id: str, reason: str, *, code: str = ...) -> None:
        """Cancel one of a plan's tasks (no-op when it finished)."""
        ...

    def finish(
        self,
        rt: TaskRuntime,
        state: common_pb2.TaskState.ValueType,
        *,
        reason: str,
        **ending: Unpack[Ending],
    ) -> asyncio.Future[None]:
        """End a task (the parent) in a terminal state; the future resolves on commit."""
        ...


@dataclass
class _Step:
    """One step's live state: its definition, status and result."""

    spec: C.PlanStep
    status: C.StepStatus
    output: common_pb2.Payload | None = None
    agent_id: str = ""
    attempt: int = 0
    usage: common_pb2.Usage = field(default_factory=common_pb2.Usage)
    finished_ns: int = 0
    budget: int = 0

    @property
    def started(self) -> bool:
        return bool(self.status.task_id)

    @property
    def done(self) -> bool:
        return self.status.state in TERMINAL_STATES

    @property
    def running(self) -> bool:
        return self.started and not self.done

    @property
    def succeeded(self) -> bool:
        return self.status.state == SUCCEEDED


@dataclass
class _Run:
    """One plan being run."""

    rt: TaskRuntime
    steps: dict[str, _Step]
    compensating: bool = False
    aggregator_task_id: str = ""
    # Tasks the plan itself cancelled: their ending is not a failure of the plan.
    cancelled_by_plan: set[str] = field(default_factory=set)
    won: bool = False

    @property
    def plan(self) -> C.Plan:
        return self.rt.record.spec.plan

    @property
    def record(self) -> TaskRecord:
        return self.rt.record


class Plans:
    """Runs every plan of the coordinator.

    Args:
        host: The coordinator (starts, cancels and finishes tasks).
        journal: The journal the plans' events go to.
        compensation_timeout: Seconds a compensation may take.
    """

    def __init__(self, host: PlanHost, journal: Journal, *, compensation_timeout: float) -> None:
        self._host = host
        self._journal = journal
        self._compensation_timeout = compensation_timeout
        self._runs: dict[str, _Run] = {}
        # step/aggregator/compensation task id -> (parent id, step id, role)
        self._children: dict[str, tuple[str, str, C.TaskRole.ValueType]] = {}
        journal.listen(self._on_event)

    def __len__(self) -> int:
        return len(self._runs)

    @property
    def children_count(self) -> int:
        """Steps, compensations and aggregators being followed (for memory gauges)."""
        return len(self._children)

    def forget(self, task_id: str) -> None:
        """Stop following a plan or step another coordinator took over."""
        self._runs.pop(task_id, None)
        self._children.pop(task_id, None)

    def owns(self, task_id: str) -> bool:
        """Whether a task is a plan this coordinator runs."""
        return task_id in self._runs

    # -- starting ----------------------------------------------------------------------

    def start(self, rt: TaskRuntime) -> None:
        """Start a freshly submitted plan: its first steps are queued at once."""
        record = rt.record
        record.steps = [C.StepStatus(step_id=step.step_id) for step in record.spec.plan.steps]
        run = self._run_for(rt)
        record.state = RUNNING
        self._journal.emit(
            rt,
            reports=[("workflow.started", _workflow_data(run.record, RUNNING))],
            state_changed=C.StateChange(
                from_state=QUEUED,
                to_state=RUNNING,
                reason=f"plan of {len(record.steps)} steps started",
            ),
        )
        self._advance(run)

    def _run_for(self, rt: TaskRuntime) -> _Run:
        statuses = {s.step_id: s for s in rt.record.steps}
        steps = {
            step.step_id: _Step(spec=step, status=statuses[step.step_id])
            for step in rt.record.spec.plan.steps
        }
        run = _Run(rt=rt, steps=steps)
        self._runs[rt.record.task_id] = run
        return run

    def _share(self, run: _Run) -> int | None:
        """The budget of the next step: an equal share of what is neither spent nor held.

        Steps running hold their budgets, and what is left is split among the steps not
        started yet, so the steps' budgets together never exceed the plan's.
        """
        budget = run.record.spec.token_budget
        if not budget:
            return None
        held = sum(s.budget for s in run.steps.values() if s.running)
        left = budget - run.record.usage.total_tokens - held
        waiting = sum(1 for s in run.steps.values() if not s.started and not s.done)
        return max(left // max(waiting, 1), 1)

    def _launch(self, run: _Run, step: _Step) -> None:
        payload = _step_input(step.spec, run.steps)
        share = self._share(run)
        child_spec = ChildSpec(
            STEP, step.spec.step_id, step.spec.capability, payload, token_budget=share
        )
        child = self._host.start_child(run.rt, child_spec)
        step.budget = child.record.spec.token_budget
        step.status.task_id = child.record.task_id
        step.status.state = QUEUED
        self._child_started(run, child, child_spec, C.STEP_EVENT_KIND_STARTED)

    def _child_started(
        self, run: _Run, child: TaskRuntime, spec: ChildSpec, kind: C.StepEventKind.ValueType
    ) -> None:
        """Follow a step, aggregator or compensation task just queued, and say so."""
        self._children[child.record.task_id] = (run.record.task_id, spec.step_id, spec.role)
        self._step_event(
            run,
            C.StepEvent(
                step_id=spec.step_id,
                task_id=child.record.task_id,
                kind=kind,
                role=spec.role,
                state=QUEUED,
            ),
        )

    # -- reacting to the steps ------------------------------------------------------------

    def _on_event(self, rt: TaskRuntime, event: C.TaskEvent) -> None:
        link = self._children.get(rt.record.task_id)
        if link is None:
            return
        parent_id, step_id, role = link
        run = self._runs.get(parent_id)
        if run is None or run.record.terminal:
            self._children.pop(rt.record.task_id, None)
            return
        kind = event.WhichOneof("kind")
        if kind in _MIRRORED:
            # A step's progress and partial output reach the plan's own stream.
            self._step_event(
                run,
                C.StepEvent(
                    step_id=step_id,
                    task_id=rt.record.task_id,
                    kind=_MIRRORED[kind],
                    role=role,
                    state=rt.record.state,
                    step_sequence=event.sequence,
                    agent_id=rt.record.agent_id,
                    **{kind: getattr(event, kind)},
                ),
                write_row=False,
            )
        elif kind == "state_changed" and role == STEP:
            step = run.steps.get(step_id)
            to_state = event.state_changed.to_state
            # A terminal state is applied with the step's result, on its finished event.
            if step is not None and not step.done and to_state not in TERMINAL_STATES:
                step.status.state = to_state
        elif kind == "finished":
            self._children.pop(rt.record.task_id, None)
            self._child_finished(run, rt.record, step_id, role, event.sequence)

    def _child_finished(
        self,
        run: _Run,
        child: TaskRecord,
        step_id: str,
        role: coordinator_pb2.TaskRole.ValueType,
        sequence: int = 0,
    ) -> None:
        add_usage(run.record.usage, child.usage)
        if role == STEP:
            self._step_finished(run, run.steps[step_id], child, sequence)
        elif role == AGGREGATOR:
            self._aggregator_finished(run, child, sequence)
        elif role == COMPENSATION:
            self._compensation_finished(run, run.steps[step_id], child, sequence)

    def _step_finished(self, run: _Run, step: _Step, child: TaskRecord, sequence: int) -> None:
        step.status.state = child.state
        step.agent_id = child.agent_id
        step.attempt = child.attempt
        step.usage.CopyFrom(child.usage)
        step.finished_ns = child.updated_ns or now_ns()
        if child.output is not None:
            step.output = child.output
        if child.error is not None:
            step.status.error.CopyFrom(child.error)
        event = _finished_event(
            child, step.spec.step_id, C.STEP_EVENT_KIND_FINISHED, STEP, sequence
        )
        by_plan = child.task_id in run.cancelled_by_plan or _by_plan(step)
        self._step_event(
            run,
            event,
            workflow="workflow.step_completed" if step.succeeded else "workflow.step_failed",
            step=step,
        )
        if run.compensating:
            self._compensate_next(run)
            return
        if run.won:
            return
        aggregation = run.plan.aggregation
        if step.succeeded:
            if aggregation == C.AGGREGATION_FIRST_SUCCESS:
                self._first_success(run, step)
                return
            budget = run.record.spec.token_budget
            if budget and run.record.usage.total_tokens >= budget and not _all_done(run):
                self._fail(
                    run,
                    common_pb2.ErrorDetail(
                        code="RESOURCE_EXHAUSTED",
                        reason="TOKEN_BUDGET_EXHAUSTED",
                        message=f"the plan's steps used {run.record.usage.total_tokens} "
                        f"of its {budget} tokens",
                    ),
                )
                return
        elif by_plan:
            pass
        elif aggregation in (C.AGGREGATION_FIRST_SUCCESS, C.AGGREGATION_VOTE):
            pass  # tolerated: another step may still succeed
        else:
            self._fail(run, _step_error(step, child))
            return
        self._advance(run)

    def _first_success(self, run: _Run, winner: _Step) -> None:
        run.won = True
        for step in run.steps.values():
            if step.running:
                run.cancelled_by_plan.add(step.status.task_id)
                self._host.cancel_child(
                    step.status.task_id, f"step {winner.spec.step_id} succeeded first"
                )
        output = winner.output or common_pb2.Payload()
        self._complete(run, output, f"step {winner.spec.step_id} succeeded first")

    def _advance(self, run: _Run) -> None:
        """Start every step whose dependencies succeeded; conclude when nothing is left."""
        if run.compensating or run.won or run.record.terminal:
            return
        for step in run.steps.values():
            if step.started or step.done:
                continue
            deps = [run.steps[d] for d in step.spec.depends_on]
            if any(d.done and not d.succeeded for d in deps):
                step.status.state = CANCELLED
                step.status.error.CopyFrom(
                    common_pb2.ErrorDetail(
                        code="FAILED_PRECONDITION",
                        reason="DEPENDENCY_FAILED",
                        message="skipped: "
                        + ", ".join(d.spec.step_id for d in deps if d.done and not d.succeeded)
                        + " did not succeed",
                    )
                )
                self._step_event(
                    run,
                    C.StepEvent(
                        step_id=step.spec.step_id,
                        kind=C.STEP_EVENT_KIND_FINISHED,
                        role=STEP,
                        state=CANCELLED,
                        error=step.status.error,
                    ),
                )
                # Skipping may unblock the end: look again.
                self._advance(run)
                return
            if all(d.succeeded for d in deps):
                self._launch(run, step)
        if _all_done(run) and not run.aggregator_task_id:
            self._conclude(run)

    def _conclude(self, run: _Run) -> None:
        aggregation = run.plan.aggregation
        succeeded = [s for s in run.steps.values() if s.succeeded]
        if aggregation == C.AGGREGATION_VOTE:
            self._vote(run, succeeded)
        elif aggregation == C.AGGREGATION_FIRST_SUCCESS and succeeded:
            # Only after a restart: the winner's end was stored, the plan's was not.
            self._first_success(run, min(succeeded, key=lambda s: s.finished_ns))
        elif aggregation == C.AGGREGATION_FIRST_SUCCESS:
            last = next(
                (s for s in reversed(run.steps.values()) if s.status.HasField("error")), None
            )
            self._finish_failed(
                run,
                common_pb2.ErrorDetail(
                    code="FAILED_PRECONDITION",
                    reason="NO_STEP_SUCCEEDED",
                    message="no step of the plan succeeded"
                    + (f"; the last error: {last.status.error.message}" if last else ""),
                ),
            )
        elif aggregation == C.AGGREGATION_AGGREGATOR:
            self._launch_aggregator(run)
        else:
            output = common_pb2.Payload()
            output.json.update(
                {s.spec.step_id: payload_value(s.output) for s in run.steps.values()}
            )
            self._complete(run, output, f"all {len(run.steps)} steps succeeded")

    def _vote(self, run: _Run, succeeded: Sequence[_Step]) -> None:
        if not succeeded:
            self._finish_failed(
                run,
                common_pb2.ErrorDetail(
                    code="FAILED_PRECONDITION",
                    reason="NO_STEP_SUCCEEDED",
                    message="no step of the plan succeeded, so nothing could be voted on",
                ),
            )
            return
        keys = {s.spec.step_id: _vote_key(s.output) for s in succeeded}
        counts = Counter(keys.values())
        ranked = counts.most_common()
        top = ranked[0][1]
        leaders = [key for key, n in ranked if n == top]
        summary = ", ".join(
            f"{n} for [{', '.join(sid for sid, k in keys.items() if k == key)}]"
            for key, n in ranked
        )
        if len(leaders) > 1:
            self._finish_failed(
                run,
                common_pb2.ErrorDetail(
                    code="FAILED_PRECONDITION",
                    reason="VOTE_TIE",
                    message=f"the vote is tied: {summary}",
                    metadata={"counts": summary},
                ),
            )
            return
        winner = next(s for s in succeeded if keys[s.spec.step_id] == leaders[0])
        self._complete(
            run,
            winner.output or common_pb2.Payload(),
            f"{top} of {len(succeeded)} steps agreed ({summary})",
        )

    def _launch_aggregator(self, run: _Run) -> None:
        outputs = []
        for step in run.steps.values():
            outputs.append(
                {
                    "step_id": step.spec.step_id,
                    "task_id": step.status.task_id,
                    "agent_id": step.agent_id,
                    "attempt": step.attempt,
                    "usage": json_format.MessageToDict(step.usage),
                    "output": payload_value(step.output),
                }
            )
        payload = common_pb2.Payload()
        payload.json.update({"outputs": outputs})
        child_spec = ChildSpec(
            AGGREGATOR, AGGREGATOR_STEP_ID, run.plan.aggregator_capability, payload
        )
        child = self._host.start_child(run.rt, child_spec)
        run.aggregator_task_id = child.record.task_id
        # Recorded like a step, so a restart knows whether its end was applied.
        run.record.steps.append(
            C.StepStatus(step_id=AGGREGATOR_STEP_ID, task_id=child.record.task_id, state=QUEUED)
        )
        self._child_started(run, child, child_spec, C.STEP_EVENT_KIND_STARTED)

    def _aggregator_finished(self, run: _Run, child: TaskRecord, sequence: int) -> None:
        status = _aggregator_status(run)
        if status is not None:
            status.state = child.state
            if child.error is not None:
                status.error.CopyFrom(child.error)
        event = _finished_event(
            child, AGGREGATOR_STEP_ID, C.STEP_EVENT_KIND_FINISHED, AGGREGATOR, sequence
        )
        self._step_event(run, event)
        self._aggregator_outcome(run, child)

    def _aggregator_outcome(self, run: _Run, child: TaskRecord) -> None:
        if run.compensating:
            self._compensate_next(run)
        elif child.state == SUCCEEDED:
            self._complete(
                run, child.output or common_pb2.Payload(), "the aggregator combined the outputs"
            )
        else:
            self._fail(
                run,
                child.error
                or common_pb2.ErrorDetail(
                    code="INTERNAL", reason="AGGREGATOR_FAILED", message="the aggregator failed"
                ),
            )

    # -- the saga ---------------------------------------------------------------------

    def cancel(self, rt: TaskRuntime, reason: str) -> None:
        """Cancel a plan: stop its steps, compensate what succeeded, end ``CANCELLED``."""
        run = self._runs.get(rt.record.task_id)
        if run is None or run.compensating or rt.record.terminal:
            return
        self._fail(
            run,
            common_pb2.ErrorDetail(code="CANCELLED", reason="CANCELLED", message=reason),
        )

    def deadline_passed(self, rt: TaskRuntime) -> None:
        """The plan's deadline passed: stop its steps and compensate what succeeded."""
        run = self._runs.get(rt.record.task_id)
        if run is None or run.compensating or rt.record.terminal:
            return
        self._fail(run, deadline_error())

    def _fail(self, run: _Run, error: common_pb2.ErrorDetail) -> None:
        """Start the saga: no new step, running ones cancelled, then compensations."""
        run.compensating = True
        # The parent's error while it still runs marks the saga (and survives a restart).
        run.record.error = common_pb2.ErrorDetail()
        run.record.error.CopyFrom(error)
        self._journal.emit(
            run.rt,
            state_changed=C.StateChange(
                from_state=run.record.state,
                to_state=run.record.state,
                reason=f"plan failing ({error.reason}): cancelling running steps and "
                "compensating the ones that succeeded",
            ),
        )
        for step in run.steps.values():
            if step.running:
                run.cancelled_by_plan.add(step.status.task_id)
                self._host.cancel_child(step.status.task_id, f"the plan failed: {error.reason}")
        if run.aggregator_task_id:
            run.cancelled_by_plan.add(run.aggregator_task_id)
            self._host.cancel_child(run.aggregator_task_id, f"the plan failed: {error.reason}")
        self._compensate_next(run)

    def _compensate_next(self, run: _Run) -> None:
        if run.record.terminal:
            return
        if any(s.running for s in run.steps.values()):
            return  # wait: a step cancelled now may still have succeeded first
        if any(
            s.status.compensation_task_id and s.status.compensation_state not in TERMINAL_STATES
            for s in run.steps.values()
        ):
            return  # one compensation at a time
        pending = [
            s
            for s in run.steps.values()
            if s.succeeded and s.spec.compensation_capability and not s.status.compensation_task_id
        ]
        if not pending:
            error = run.record.error or common_pb2.ErrorDetail()
            state = CANCELLED if error.reason == "CANCELLED" else FAILED
            compensated = [s for s in run.steps.values() if s.status.compensation_task_id]
            self._host.finish(
                run.rt,
                state,
                reason=f"plan {'cancelled' if state == CANCELLED else 'failed'} "
                f"({error.reason}); {len(compensated)} compensation(s) ran",
                error=error,
                reports=[("workflow.failed", _workflow_data(run.record, state, error))],
            )
            self._ended(run)
            return
        step = max(pending, key=lambda s: s.finished_ns)
        payload = common_pb2.Payload()
        payload.json.update(
            {
                "step_id": step.spec.step_id,
                "input": payload_value(step.spec.input if step.spec.HasField("input") else None),
                "output": payload_value(step.output),
            }
        )
        child_spec = ChildSpec(
            COMPENSATION,
            step.spec.step_id,
            step.spec.compensation_capability,
            payload,
            deadline_ns=now_ns() + int(self._compensation_timeout * 1e9),
            # Undoing must not fail for want of tokens the failed plan spent.
            token_budget=0,
        )
        child = self._host.start_child(run.rt, child_spec)
        step.status.compensation_task_id = child.record.task_id
        step.status.compensation_state = QUEUED
        self._child_started(run, child, child_spec, C.STEP_EVENT_KIND_COMPENSATION_STARTED)

    def _compensation_finished(
        self, run: _Run, step: _Step, child: TaskRecord, sequence: int
    ) -> None:
        step.status.compensation_state = child.state
        event = _finished_event(
            child,
            step.spec.step_id,
            C.STEP_EVENT_KIND_COMPENSATION_FINISHED,
            COMPENSATION,
            sequence,
            with_output=False,
        )
        self._step_event(run, event, workflow="workflow.compensated", step=step, error=child.error)
        self._compensate_next(run)

    # -- ending -----------------------------------------------------------------------

    def _complete(self, run: _Run, output: common_pb2.Payload, reason: str) -> None:
        self._host.finish(
            run.rt,
            SUCCEEDED,
            reason=reason,
            output=output,
            reports=[("workflow.completed", _workflow_data(run.record, SUCCEEDED))],
        )
        self._ended(run)

    def _finish_failed(self, run: _Run, error: common_pb2.ErrorDetail) -> None:
        self._host.finish(
            run.rt,
            FAILED,
            reason=error.message,
            error=error,
            reports=[("workflow.failed", _workflow_data(run.record, FAILED, error))],
        )
        self._ended(run)

    def _ended(self, run: _Run) -> None:
        self._runs.pop(run.record.task_id, None)

    # -- events -----------------------------------------------------------------------

    def _step_event(
        self,
        run: _Run,
        event: C.StepEvent,
        *,
        write_row: bool = True,
        workflow: str = "",
        step: _Step | None = None,
        error: common_pb2.ErrorDetail | None = None,
    ) -> None:
        if not workflow:
            self._journal.emit(run.rt, write_row=write_row, step=event)
            return
        data = events_pb2.WorkflowEventData(
            task_id=run.record.task_id,
            step_id=event.step_id,
            capability=step.spec.capability if step is not None else "",
            state=run.record.state,
            step_task_id=event.task_id,
            agent_id=event.agent_id,
            owner=run.record.owner,
        )
        failure = error if error is not None else (event.error if event.HasField("error") else None)
        if failure is not None:
            data.error.CopyFrom(failure)
        # Published with the step event, never before it has committed.
        self._journal.emit(run.rt, write_row=write_row, reports=[(workflow, data)], step=event)

    # -- recovery ---------------------------------------------------------------------

    def recover(
        self,
        rt: TaskRuntime,
        children: Sequence[TaskRecord],
        lookup: Callable[[str], TaskRuntime | None],
    ) -> None:
        """Resume a plan after a restart from its stored steps and their tasks.

        Args:
            rt: The plan's task (active).
            children: Every task the plan started, from the store.
            lookup: The live runtime of an active task (for steps still running).
        """
        record = rt.record
        if not record.steps:
            # Stored before its first transition: start it now.
            self.start(rt)
            return
        run = self._run_for(rt)
        run.compensating = record.error is not None
        aggregator = _aggregator_status(run)
        finished_while_down: list[TaskRecord] = []
        aggregator_done: TaskRecord | None = None
        still_active: list[TaskRecord] = []
        # First learn every task the plan started, so nothing is started twice...
        for child in children:
            live = lookup(child.task_id)
            current = live.record if live is not None else child
            step = run.steps.get(child.step_id)
            recorded = 0
            if child.role == AGGREGATOR:
                run.aggregator_task_id = child.task_id
                recorded = aggregator.state if aggregator is not None else 0
            elif step is not None and child.role == STEP:
                step.status.task_id = child.task_id
                step.budget = child.spec.token_budget
                recorded = step.status.state
            elif step is not None and child.role == COMPENSATION:
                step.status.compensation_task_id = child.task_id
                recorded = step.status.compensation_state
            if not current.terminal:
                self._children[child.task_id] = (record.task_id, child.step_id, child.role)
                still_active.append(current)
                if step is not None and child.role == STEP and step.status.state == 0:
                    step.status.state = QUEUED
                elif step is not None and child.role == COMPENSATION:
                    step.status.compensation_state = QUEUED
            elif recorded not in TERMINAL_STATES:
                finished_while_down.append(current)
            elif child.role == AGGREGATOR:
                aggregator_done = current  # its end was recorded; the plan's was not
            elif step is not None and child.role == STEP:
                _restore_result(step, current)
        if not run.compensating and run.plan.aggregation in (
            C.AGGREGATION_UNSPECIFIED,
            C.AGGREGATION_ALL,
            C.AGGREGATION_AGGREGATOR,
        ):
            failed = next(
                (s for s in run.steps.values() if s.done and not s.succeeded and not _by_plan(s)),
                None,
            )
            if failed is not None:
                record_of = next((c for c in children if c.task_id == failed.status.task_id), None)
                self._fail(
                    run,
                    _step_error(failed, record_of)
                    if record_of is not None
                    else failed.status.error,
                )
        elif run.compensating:
            # The saga started but its cancels may not have been stored: no step may go on.
            for child in still_active:
                if child.role in (STEP, AGGREGATOR):
                    run.cancelled_by_plan.add(child.task_id)
                    self._host.cancel_child(child.task_id, "the plan is compensating")
        # ...then apply what ended while the coordinator was down, in order.
        for child in sorted(finished_while_down, key=lambda c: c.updated_ns):
            if record.terminal:
                return
            self._child_finished(run, child, child.step_id, child.role)
        if record.terminal:
            return
        if aggregator_done is not None:
            self._aggregator_outcome(run, aggregator_done)
        elif run.compensating:
            self._compensate_next(run)
        elif run.plan.aggregation == C.AGGREGATION_FIRST_SUCCESS and any(
            s.succeeded for s in run.steps.values()
        ):
            # The winner's end was stored, the plan's was not.
            winners = [s for s in run.steps.values() if s.succeeded]
            self._first_success(run, min(winners, key=lambda s: s.finished_ns))
        else:
            self._advance(run)


def _by_plan(step: _Step) -> bool:
    return step.status.error.reason == PLAN_CANCELLED


def _workflow_data(
    record: TaskRecord,
    state: common_pb2.TaskState.ValueType,
    error: common_pb2.ErrorDetail | None = None,
) -> events_pb2.WorkflowEventData:
    """The data of a plan-wide ``workflow.*`` event: the plan in ``state``."""
    data = events_pb2.WorkflowEventData(
        task_id=record.task_id,
        state=state,
        owner=record.owner,
    )
    if error is not None:
        data.error.CopyFrom(error)
    return data


def _finished_event(
    child: TaskRecord,
    step_id: str,
    kind: C.StepEventKind.ValueType,
    role: C.TaskRole.ValueType,
    sequence: int,
    *,
    with_output: bool = True,
) -> C.StepEvent:
    """The step event saying a plan's task ended (its output only ``with_output``)."""
    event = C.StepEvent(
        step_id=step_id,
        task_id=child.task_id,
        kind=kind,
        role=role,
        state=child.state,
        step_sequence=sequence,
        agent_id=child.agent_id,
    )
    copy_present(event, output=child.output if with_output else None, error=child.error)
    return event


def _aggregator_status(run: _Run) -> C.StepStatus | None:
    return next((s for s in run.record.steps if s.step_id == AGGREGATOR_STEP_ID), None)


def _restore_result(step: _Step, child: TaskRecord) -> None:
    step.agent_id = child.agent_id
    step.attempt = child.attempt
    step.usage.CopyFrom(child.usage)
    step.finished_ns = child.updated_ns
    if child.output is not None:
        step.output = child.output


def _all_done(run: _Run) -> bool:
    return all(s.done for s in run.steps.values())


def _step_error(step: _Step, child: TaskRecord) -> common_pb2.ErrorDetail:
    error = common_pb2.ErrorDetail()
    if child.error is not None:
        error.CopyFrom(child.error)
    else:
        error.code = "FAILED_PRECONDITION"
        error.reason = "STEP_FAILED"
    error.metadata["step_id"] = step.spec.step_id
    error.metadata["step_task_id"] = child.task_id
    error.message = f"step {step.spec.step_id} failed: {error.message or error.reason}"
    return error


def payload_value(payload: common_pb2.Payload | None) -> Any:
    """A payload as a JSON value: its json object, its text, or every part it has.

    Returns:
        None for an empty payload, the ``json`` object when that is all it has, the
        ``text`` when that is all it has, else an object with ``json``, ``text``,
        ``content_type`` and base64 ``data``.
    """
    if payload is None:
        return None
    has_json = payload.HasField("json")
    parts = sum((has_json, bool(payload.text), bool(payload.data)))
    if parts == 0:
        return None
    if parts == 1 and has_json:
        return json_format.MessageToDict(payload.json)
    if parts == 1 and payload.text:
        return payload.text
    value: dict[str, Any] = {}
    if has_json:
        value["json"] = json_format.MessageToDict(payload.json)
    if payload.text:
        value["text"] = payload.text
    if payload.data:
        value["content_type"] = payload.content_type
        value["data"] = base64.b64encode(payload.data).decode()
    return value


def _step_input(step: C.PlanStep, steps: dict[str, _Step]) -> common_pb2.Payload:
    payload = common_pb2.Payload()
    if step.HasField("input"):
        payload.CopyFrom(step.input)
    if step.depends_on:
        deps = struct_pb2.Struct()
        deps.update({d: payload_value(steps[d].output) for d in step.depends_on})
        payload.json["dependencies"] = deps
    return payload


def _vote_key(payload: common_pb2.Payload | None) -> str:
    return json.dumps(payload_value(payload), sort_keys=True, separators=(",", ":"))
