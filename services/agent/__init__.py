"""Agents: the SDK to write one, the runtime that serves it, and example agents.

Write an agent by subclassing :class:`Agent` and decorating async handlers with
:func:`capability`; serve it with ``hivewire agent serve module:Class``. See
docs/agents.md.
"""

from hivewire.services.agent.sdk import (
    Agent,
    AgentError,
    InputAnswer,
    InputKind,
    Payload,
    PermanentError,
    RetryableError,
    SubtaskError,
    SubtaskRequest,
    SubtaskResult,
    TaskContext,
    Usage,
    capability,
)

__all__ = [
    "Agent",
    "AgentError",
    "InputAnswer",
    "InputKind",
    "Payload",
    "PermanentError",
    "RetryableError",
    "SubtaskError",
    "SubtaskRequest",
    "SubtaskResult",
    "TaskContext",
    "Usage",
    "capability",
]
