"""Attempts: one try of a task on one agent, and the rules around them.

An attempt is an ``Execute`` stream with the task's deadline, or the same carried on
the agent's ``Link`` (link.py). Its bookkeeping (the attempt records in the task,
usage summed over attempts, which failures count against ``max_attempts``, the retry
backoff) is here as plain functions; the scheduler in :mod:`.service` runs attempts
and applies what they report.
"""

from __future__ import annotations

import asyncio
import random
from dataclasses import dataclass, field

from hivewire.agent.v1 import agent_pb2
from hivewire.common.v1 import common_pb2
from hivewire.services.coordinator import convert
from hivewire.services.coordinator.dispatch import AgentLease
from hivewire.services.coordinator.link import AttemptStream
from hivewire.services.coordinator.model import TaskRecord, now_ns
from hivewire.services.runtime import metadata as md

__all__ = [
    "NOT_COUNTED",
    "OVERLOADED",
    "RESTARTED",
    "UNREACHABLE",
    "Attempt",
    "add_usage",
    "assignment",
    "backoff_seconds",
    "call_metadata",
    "close_attempt",
    "counted_failures",
    "deadline_error",
]

RESTARTED = "COORDINATOR_RESTARTED"
UNREACHABLE = "AGENT_UNREACHABLE"
OVERLOADED = "AGENT_OVERLOADED"
#: Attempt errors that are not the task's fault and do not count against max_attempts.
#: (An agent full of other coordinators' work refuses before it starts: with several
#: coordinators sharing agents, each only knows the slots it uses itself.)
NOT_COUNTED = frozenset({RESTARTED, UNREACHABLE, OVERLOADED})


@dataclass
class Attempt:
    """The live part of one attempt: its agent slot, stream and task."""

    number: int
    lease: AgentLease
    stream: AttemptStream | None = None
    task: asyncio.Task[None] | None = None
    pending: list[agent_pb2.ExecuteRequest] = field(default_factory=list)
    cancelling: bool = False
    answered: bool = False

    async def send(self, request: agent_pb2.ExecuteRequest) -> None:
        """Send to the agent, or hold until the stream is open."""
        if self.stream is None:
            self.pending.append(request)
        else:
            await self.stream.send(request)


def assignment(record: TaskRecord, attempt: int) -> agent_pb2.TaskAssignment:
    """The first message of an attempt's ``Execute`` stream."""
    spec = record.spec
    return agent_pb2.TaskAssignment(
        task_id=record.task_id,
        attempt=attempt,
        capability=spec.capability,
        input=spec.input,
        deadline=convert.timestamp_ns(record.deadline_ns),
        metadata=spec.metadata,
        priority=spec.priority,
        token_budget=spec.token_budget,
        tokens_used=record.usage.total_tokens,
        labels=spec.labels,
    )


def call_metadata(record: TaskRecord, attempt: int) -> list[tuple[str, str]]:
    """GRPC metadata of an attempt's call: task id, attempt, correlation id, budget."""
    metadata = [
        (md.TASK_ID, record.task_id),
        (md.ATTEMPT, str(attempt)),
        (md.CORRELATION_ID, record.correlation_id),
    ]
    budget = record.spec.token_budget
    if budget:
        metadata.append((md.TOKEN_BUDGET, str(max(budget - record.usage.total_tokens, 1))))
    return metadata


def add_usage(total: common_pb2.Usage, usage: common_pb2.Usage) -> None:
    """Add one attempt's (or step's) usage to a running total."""
    total.prompt_tokens += usage.prompt_tokens
    total.completion_tokens += usage.completion_tokens
    total.total_tokens += usage.total_tokens or (usage.prompt_tokens + usage.completion_tokens)
    total.model_calls += usage.model_calls
    total.tool_calls += usage.tool_calls
    if usage.HasField("total_time"):
        seconds = convert.duration_seconds(total.total_time) + convert.duration_seconds(
            usage.total_time
        )
        total.total_time.CopyFrom(convert.duration(seconds))
    if usage.HasField("time_to_first_token") and not total.HasField("time_to_first_token"):
        total.time_to_first_token.CopyFrom(usage.time_to_first_token)


def close_attempt(record: TaskRecord, number: int, error: common_pb2.ErrorDetail | None) -> None:
    """Mark attempt ``number`` ended (with its error) unless it already is."""
    for item in reversed(record.attempts):
        if item.attempt == number:
            if not item.HasField("ended_at"):
                item.ended_at.CopyFrom(convert.timestamp_ns(now_ns()))
                if error is not None:
                    item.error.CopyFrom(error)
            return


def counted_failures(record: TaskRecord) -> int:
    """Failed attempts that count against ``max_attempts``."""
    return sum(
        1 for a in record.attempts if a.HasField("error") and a.error.reason not in NOT_COUNTED
    )


def backoff_seconds(failures: int, *, initial: float, maximum: float) -> float:
    """The wait before the next attempt: exponential, capped, with full jitter."""
    bound = min(maximum, initial * (2 ** max(failures - 1, 0)))
    # Full jitter: retries of many tasks that failed together spread out.
    return random.uniform(bound / 2, bound) if bound > 0 else 0.0


def deadline_error() -> common_pb2.ErrorDetail:
    """The error of a task that did not finish before its deadline."""
    return common_pb2.ErrorDetail(
        code="DEADLINE_EXCEEDED",
        reason="DEADLINE_EXCEEDED",
        message="the task did not finish before its deadline",
    )
