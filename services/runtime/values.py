"""Plain values that mirror ``common.v1`` messages and more than one service uses.

Defined once here so that the agent SDK and runtime, the tool service and the clients
of both speak of the same thing by the same name.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

__all__ = ["ErrorInfo", "ProgressUpdate"]


@dataclass(frozen=True)
class ErrorInfo:
    """A classified error as data, as it travels in ``common.v1.ErrorDetail``.

    What an agent's failed task and a tool's failed call carry (the agent SDK exports
    it as ``hivewire.services.agent.sdk.ErrorInfo``; the tool service streams it as a
    call's ``error``). Not ``google.rpc.ErrorInfo``, the gRPC status detail.

    Attributes:
        code: gRPC status code name, e.g. ``"DEADLINE_EXCEEDED"``.
        reason: Stable UPPER_SNAKE reason.
        message: Human-readable explanation.
        retryable: Whether another attempt may succeed.
        metadata: Extra string context.
    """

    code: str
    reason: str
    message: str
    retryable: bool = False
    metadata: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class ProgressUpdate:
    """Progress of a running task or tool call (``common.v1.Progress``).

    Attributes:
        fraction: Completed fraction in [0, 1].
        step: Short machine-friendly step name.
        message: Human-readable note.
    """

    fraction: float
    step: str = ""
    message: str = ""
