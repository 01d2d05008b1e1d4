"""Domain values of the coordinator: callers, task records, agent views.

Task content (inputs, outputs, progress, errors) stays in its protobuf message types:
they are plain data the coordinator stores and forwards without interpreting. The
fields the coordinator's rules branch on (state, attempts, owner, times) are typed
attributes of :class:`TaskRecord`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from typing import TypeVar

from google.protobuf.message import Message

from hivewire.agent.v1 import agent_pb2
from hivewire.common.v1 import common_pb2
from hivewire.coordinator.v1 import coordinator_pb2

__all__ = [
    "ACTIVE_DISPATCH_STATES",
    "AgentView",
    "Caller",
    "TERMINAL_STATES",
    "TaskRecord",
    "now_ns",
    "state_name",
]

QUEUED = common_pb2.TASK_STATE_QUEUED
ASSIGNED = common_pb2.TASK_STATE_ASSIGNED
RUNNING = common_pb2.TASK_STATE_RUNNING
INPUT_REQUIRED = common_pb2.TASK_STATE_INPUT_REQUIRED
SUCCEEDED = common_pb2.TASK_STATE_SUCCEEDED
FAILED = common_pb2.TASK_STATE_FAILED
CANCELLED = common_pb2.TASK_STATE_CANCELLED
DEAD_LETTERED = common_pb2.TASK_STATE_DEAD_LETTERED

#: States a task never leaves.
TERMINAL_STATES = frozenset({SUCCEEDED, FAILED, CANCELLED, DEAD_LETTERED})
#: States in which an attempt is (or was, before a restart) running on an agent.
ACTIVE_DISPATCH_STATES = frozenset({ASSIGNED, RUNNING, INPUT_REQUIRED})


_M = TypeVar("_M", bound=Message)


def _copied(message: _M) -> _M:
    copied = type(message)()
    copied.CopyFrom(message)
    return copied


def now_ns() -> int:
    """Wall-clock time in nanoseconds since the epoch."""
    return time.time_ns()


def state_name(state: int) -> str:
    """Short lower-case name of a ``TaskState`` (``queued``, ``running``...).

    Any ``int`` is accepted (a stored row's state, say): an unknown one is named by its number.
    """
    try:
        name = common_pb2.TaskState.Name(common_pb2.TaskState.ValueType(state))
    except ValueError:
        return str(state)
    return name.removeprefix("TASK_STATE_").lower()


@dataclass(frozen=True)
class Caller:
    """Who is calling, from the peer certificate.

    Attributes:
        identity: The caller's SPIFFE id.
        admin: Whether the caller may see and cancel every task.
    """

    identity: str
    admin: bool = False

    def may_access(self, owner: str) -> bool:
        """Whether the caller may see or change a task owned by ``owner``."""
        return self.admin or self.identity == owner


@dataclass(slots=True)
class TaskRecord:
    """The coordinator's state of one task.

    Attributes:
        task_id: The task's id.
        spec: What was asked for, normalized (priority and timeout always set).
        owner: SPIFFE id of the submitter.
        state: ``TaskState`` value.
        created_ns: Acceptance time (ns since the epoch).
        updated_ns: Last change.
        deadline_ns: When the task must be finished.
        attempt: Current or last attempt number (0 before the first dispatch).
        agent_id: Agent instance of the current attempt, "" when none.
        progress: Latest progress.
        output: Output once succeeded.
        error: Error once failed, cancelled or dead-lettered.
        usage: Consumption so far (all attempts).
        pending_input: The open input request while input is required.
        last_sequence: Sequence of the latest event.
        attempts: Every attempt so far.
        not_before_ns: Earliest start of the next attempt (retry backoff), 0 for none.
        parent_task_id: The plan or task this one is a step or sub-task of, "" for none.
        step_id: For a plan step (or its compensation): the step's id.
        role: ``TaskRole`` value: what the task is to its parent.
        project_id: The project the task belongs to, "" for none.
        depth: 0 for a client's task, parent's depth + 1 for steps and sub-tasks.
        steps: For a plan: each step's status, in plan order.
        coordinator: The coordinator instance that owns the task (its lease), "" on a
            single coordinator.
    """

    task_id: str
    spec: coordinator_pb2.TaskSpec
    owner: str
    state: common_pb2.TaskState.ValueType
    created_ns: int
    updated_ns: int
    deadline_ns: int
    attempt: int = 0
    agent_id: str = ""
    progress: common_pb2.Progress | None = None
    output: common_pb2.Payload | None = None
    error: common_pb2.ErrorDetail | None = None
    usage: common_pb2.Usage = field(default_factory=common_pb2.Usage)
    pending_input: common_pb2.InputRequest | None = None
    last_sequence: int = 0
    attempts: list[coordinator_pb2.AttemptRecord] = field(default_factory=list)
    not_before_ns: int = 0
    parent_task_id: str = ""
    step_id: str = ""
    role: coordinator_pb2.TaskRole.ValueType = coordinator_pb2.TASK_ROLE_UNSPECIFIED
    project_id: str = ""
    depth: int = 0
    steps: list[coordinator_pb2.StepStatus] = field(default_factory=list)
    coordinator: str = ""

    @property
    def is_plan(self) -> bool:
        """Whether the task carries a plan (its steps run as tasks of their own)."""
        return self.spec.HasField("plan")

    def snapshot(self) -> TaskRecord:
        """A copy that later changes to this record leave as it is.

        Its messages are copied too (the coordinator changes some in place, such as
        ``usage``): the answer a caller gets is the task at that moment.
        """
        return replace(
            self,
            spec=_copied(self.spec),
            progress=None if self.progress is None else _copied(self.progress),
            output=None if self.output is None else _copied(self.output),
            error=None if self.error is None else _copied(self.error),
            usage=_copied(self.usage),
            pending_input=None if self.pending_input is None else _copied(self.pending_input),
            attempts=[_copied(attempt) for attempt in self.attempts],
            steps=[_copied(step) for step in self.steps],
        )

    @property
    def terminal(self) -> bool:
        """Whether the task is finished for good."""
        return self.state in TERMINAL_STATES

    @property
    def capability(self) -> str:
        """The capability the task needs."""
        return self.spec.capability

    @property
    def priority(self) -> common_pb2.Priority.ValueType:
        """The task's ``Priority`` value."""
        return self.spec.priority

    @property
    def correlation_id(self) -> str:
        """The correlation id the task carries on every hop."""
        return self.spec.metadata.correlation_id


@dataclass(frozen=True)
class AgentView:
    """One agent as the coordinator sees it (for ``ListAgents``).

    Attributes:
        agent_id: Instance id from discovery.
        name: The agent's name.
        version: Its version.
        address: ``host:port``.
        capabilities: Capability names it advertises.
        max_concurrency: Tasks it takes at once.
        in_flight: Tasks it runs for this coordinator now.
        healthy: Whether discovery lists it as serving.
        draining: Whether it left discovery but still finishes tasks.
        circuit_open: Whether its circuit breaker rejects new tasks.
        last_seen_ns: When discovery last listed it.
        card: Its card from ``Describe``, when fetched.
    """

    agent_id: str
    name: str
    version: str
    address: str
    capabilities: tuple[str, ...]
    max_concurrency: int
    in_flight: int
    healthy: bool
    draining: bool
    circuit_open: bool
    last_seen_ns: int
    card: agent_pb2.AgentCard | None = None
