"""Domain errors and the one table that maps them to gRPC status codes.

Domain code raises these; the server's error-mapping interceptor turns them into a
rich ``google.rpc.Status`` (see :mod:`hivewire.services.runtime.status`) and clients
rebuild the same class from it. Clients branch on :attr:`HivewireError.reason`,
never on the message text.

=====================  ======================  =========  ===============================
class                  code                    retryable  detail
=====================  ======================  =========  ===============================
InvalidArgument        INVALID_ARGUMENT        no         BadRequest field violations
NotFound               NOT_FOUND               no         ResourceInfo
AlreadyExists          ALREADY_EXISTS          no         ResourceInfo
FailedPrecondition     FAILED_PRECONDITION     no         PreconditionFailure
Aborted                ABORTED                 yes        (retry the whole operation)
OutOfRange             OUT_OF_RANGE            no
Unauthenticated        UNAUTHENTICATED         no
PermissionDenied       PERMISSION_DENIED       no
ResourceExhausted      RESOURCE_EXHAUSTED      yes        QuotaFailure, RetryInfo
Unavailable            UNAVAILABLE             yes        RetryInfo
DeadlineExceeded       DEADLINE_EXCEEDED       no
Cancelled              CANCELLED               no
Unimplemented          UNIMPLEMENTED           no
Internal               INTERNAL                no
Unknown                UNKNOWN                 no
DataLoss               DATA_LOSS               no
=====================  ======================  =========  ===============================
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import ClassVar

import grpc

ERROR_DOMAIN = "hivewire"
"""``ErrorInfo.domain`` of every hivewire error."""


@dataclass(frozen=True)
class FieldViolation:
    """One bad request field (``BadRequest.FieldViolation``).

    Attributes:
        field: Path of the field, e.g. ``task.priority`` or ``steps[2].capability``.
        description: Why it is invalid.
    """

    field: str
    description: str


@dataclass(frozen=True)
class PreconditionViolation:
    """One failed precondition (``PreconditionFailure.Violation``).

    Attributes:
        type: Kind of precondition, e.g. ``TASK_STATE``.
        subject: What it concerns, e.g. ``task/8f3c...``.
        description: How it failed.
    """

    type: str
    subject: str
    description: str


@dataclass(frozen=True)
class QuotaViolation:
    """One exceeded quota (``QuotaFailure.Violation``).

    Attributes:
        subject: Who or what hit the limit, e.g. ``principal:alice``.
        description: Which limit, e.g. ``10 task submissions per second``.
    """

    subject: str
    description: str


class HivewireError(Exception):
    """Base of every domain error: a gRPC code, a stable reason and retryability.

    Attributes:
        code: The gRPC status code the error travels as (class-level).
        reason: Stable UPPER_SNAKE identifier clients branch on; a class default that
            one instance may refine (``NotFound(..., reason="TASK_NOT_FOUND")``).
        retryable: Whether retrying the same call later may succeed (class-level).
        message: Human-readable text for logs and developers.
        metadata: Extra string key/values carried in ``ErrorInfo.metadata``.
    """

    code: ClassVar[grpc.StatusCode] = grpc.StatusCode.UNKNOWN
    reason: str = "UNKNOWN"
    retryable: ClassVar[bool] = False

    def __init__(
        self,
        message: str = "",
        *,
        reason: str | None = None,
        metadata: Mapping[str, str] | None = None,
    ) -> None:
        """Create the error.

        Args:
            message: Human-readable description; defaults to the reason.
            reason: Overrides the class's default reason for this instance.
            metadata: String key/values for ``ErrorInfo.metadata``.
        """
        if reason is not None:
            self.reason = reason
        self.message = message or self.reason
        self.metadata: dict[str, str] = dict(metadata or {})
        super().__init__(self.message)

    def __str__(self) -> str:
        return self.message

    def __repr__(self) -> str:
        return f"{type(self).__name__}(reason={self.reason!r}, message={self.message!r})"


class InvalidArgument(HivewireError):
    """A request field is missing or invalid."""

    code = grpc.StatusCode.INVALID_ARGUMENT
    reason = "INVALID_ARGUMENT"

    def __init__(
        self,
        message: str = "",
        violations: Iterable[FieldViolation] = (),
        *,
        reason: str | None = None,
        metadata: Mapping[str, str] | None = None,
    ) -> None:
        """Create the error.

        Args:
            message: Summary; defaults to the violations joined.
            violations: Each bad field and why.
            reason: Instance reason override.
            metadata: ``ErrorInfo`` metadata.
        """
        self.violations: list[FieldViolation] = list(violations)
        if not message and self.violations:
            message = "; ".join(f"{v.field}: {v.description}" for v in self.violations)
        super().__init__(message, reason=reason, metadata=metadata)


class ResourceError(HivewireError):
    """Shared shape of errors about one named resource (``ResourceInfo``)."""

    def __init__(
        self,
        resource_type: str,
        resource_name: str,
        message: str = "",
        *,
        owner: str = "",
        reason: str | None = None,
        metadata: Mapping[str, str] | None = None,
    ) -> None:
        """Create the error.

        Args:
            resource_type: Kind of resource (``task``, ``agent``, ``tool``, ``model``).
            resource_name: Its id or name.
            message: Human text; a default is built from type and name.
            owner: Owner of the resource, when relevant.
            reason: Instance reason override (``TASK_NOT_FOUND``...).
            metadata: ``ErrorInfo`` metadata.
        """
        self.resource_type = resource_type
        self.resource_name = resource_name
        self.owner = owner
        super().__init__(
            message or self._default_message(resource_type, resource_name),
            reason=reason,
            metadata=metadata,
        )

    @staticmethod
    def _default_message(resource_type: str, resource_name: str) -> str:
        return f"{resource_type} {resource_name!r}"


class NotFound(ResourceError):
    """A task, agent, tool or model does not exist."""

    code = grpc.StatusCode.NOT_FOUND
    reason = "NOT_FOUND"

    @staticmethod
    def _default_message(resource_type: str, resource_name: str) -> str:
        return f"{resource_type} {resource_name!r} not found"


class AlreadyExists(ResourceError):
    """Registering something whose id or name is taken."""

    code = grpc.StatusCode.ALREADY_EXISTS
    reason = "ALREADY_EXISTS"

    @staticmethod
    def _default_message(resource_type: str, resource_name: str) -> str:
        return f"{resource_type} {resource_name!r} already exists"


class FailedPrecondition(HivewireError):
    """The system is not in a state that allows the operation (do not retry as is)."""

    code = grpc.StatusCode.FAILED_PRECONDITION
    reason = "FAILED_PRECONDITION"

    def __init__(
        self,
        message: str = "",
        violations: Iterable[PreconditionViolation | tuple[str, str, str]] = (),
        *,
        reason: str | None = None,
        metadata: Mapping[str, str] | None = None,
    ) -> None:
        """Create the error.

        Args:
            message: Human text.
            violations: ``PreconditionViolation`` or ``(type, subject, description)``.
            reason: Instance reason override (``TASK_ALREADY_FINISHED``...).
            metadata: ``ErrorInfo`` metadata.
        """
        self.violations: list[PreconditionViolation] = [
            v if isinstance(v, PreconditionViolation) else PreconditionViolation(*v)
            for v in violations
        ]
        super().__init__(message, reason=reason, metadata=metadata)


class Aborted(HivewireError):
    """Lost a concurrent-update race; retry the whole read-modify-write."""

    code = grpc.StatusCode.ABORTED
    reason = "ABORTED"
    retryable = True


class OutOfRange(HivewireError):
    """A value is past the valid range (for example a sequence beyond the end)."""

    code = grpc.StatusCode.OUT_OF_RANGE
    reason = "OUT_OF_RANGE"


class Unauthenticated(HivewireError):
    """No or bad credentials."""

    code = grpc.StatusCode.UNAUTHENTICATED
    reason = "UNAUTHENTICATED"


class PermissionDenied(HivewireError):
    """The caller's identity is not allowed to do this."""

    code = grpc.StatusCode.PERMISSION_DENIED
    reason = "PERMISSION_DENIED"


class _RetryAfterError(HivewireError):
    """Shared ``retry_after`` handling (``RetryInfo.retry_delay``)."""

    def __init__(
        self,
        message: str = "",
        *,
        retry_after: float | None = None,
        reason: str | None = None,
        metadata: Mapping[str, str] | None = None,
    ) -> None:
        self.retry_after = retry_after
        super().__init__(message, reason=reason, metadata=metadata)


class ResourceExhausted(_RetryAfterError):
    """A rate limit, size limit or budget was hit."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED
    reason = "RESOURCE_EXHAUSTED"
    retryable = True

    def __init__(
        self,
        message: str = "",
        quota_violations: Iterable[QuotaViolation | tuple[str, str]] = (),
        retry_after: float | None = None,
        *,
        reason: str | None = None,
        metadata: Mapping[str, str] | None = None,
    ) -> None:
        """Create the error.

        Args:
            message: Human text.
            quota_violations: ``QuotaViolation`` or ``(subject, description)``.
            retry_after: Seconds the client should wait before retrying.
            reason: Instance reason override (``RATE_LIMITED``...).
            metadata: ``ErrorInfo`` metadata.
        """
        self.quota_violations: list[QuotaViolation] = [
            v if isinstance(v, QuotaViolation) else QuotaViolation(*v) for v in quota_violations
        ]
        super().__init__(message, retry_after=retry_after, reason=reason, metadata=metadata)


class Unavailable(_RetryAfterError):
    """A dependency is down or no healthy instance exists; retry later."""

    code = grpc.StatusCode.UNAVAILABLE
    reason = "UNAVAILABLE"
    retryable = True

    def __init__(
        self,
        message: str = "",
        retry_after: float | None = None,
        *,
        reason: str | None = None,
        metadata: Mapping[str, str] | None = None,
    ) -> None:
        """Create the error.

        Args:
            message: Human text.
            retry_after: Seconds the client should wait before retrying.
            reason: Instance reason override (``NO_HEALTHY_AGENT``...).
            metadata: ``ErrorInfo`` metadata.
        """
        super().__init__(message, retry_after=retry_after, reason=reason, metadata=metadata)


class DeadlineExceeded(HivewireError):
    """The deadline passed before the work finished."""

    code = grpc.StatusCode.DEADLINE_EXCEEDED
    reason = "DEADLINE_EXCEEDED"


class Cancelled(HivewireError):
    """The work was cancelled."""

    code = grpc.StatusCode.CANCELLED
    reason = "CANCELLED"


class Unimplemented(HivewireError):
    """The operation is not built (yet) or not supported by this backend."""

    code = grpc.StatusCode.UNIMPLEMENTED
    reason = "UNIMPLEMENTED"


class Internal(HivewireError):
    """A bug or broken invariant; details stay in the server log."""

    code = grpc.StatusCode.INTERNAL
    reason = "INTERNAL"


class Unknown(HivewireError):
    """An error of unknown origin (a peer answered UNKNOWN)."""

    code = grpc.StatusCode.UNKNOWN
    reason = "UNKNOWN"


class DataLoss(HivewireError):
    """Unrecoverable data loss or corruption."""

    code = grpc.StatusCode.DATA_LOSS
    reason = "DATA_LOSS"


ERROR_CLASSES: Mapping[grpc.StatusCode, type[HivewireError]] = {
    cls.code: cls
    for cls in (
        InvalidArgument,
        NotFound,
        AlreadyExists,
        FailedPrecondition,
        Aborted,
        OutOfRange,
        Unauthenticated,
        PermissionDenied,
        ResourceExhausted,
        Unavailable,
        DeadlineExceeded,
        Cancelled,
        Unimplemented,
        Internal,
        Unknown,
        DataLoss,
    )
}
"""The one table: status code -> error class (and so -> retryable, default reason)."""


def error_class_for(code: grpc.StatusCode) -> type[HivewireError]:
    """Return the error class for a non-OK status code (``Unknown`` for anything else)."""
    return ERROR_CLASSES.get(code, Unknown)


def is_retryable(code: grpc.StatusCode) -> bool:
    """Whether a call that failed with ``code`` may succeed if retried later."""
    return code in ERROR_CLASSES and ERROR_CLASSES[code].retryable


__all__ = [
    "ERROR_CLASSES",
    "ERROR_DOMAIN",
    "Aborted",
    "AlreadyExists",
    "Cancelled",
    "DataLoss",
    "DeadlineExceeded",
    "FailedPrecondition",
    "FieldViolation",
    "HivewireError",
    "Internal",
    "InvalidArgument",
    "NotFound",
    "OutOfRange",
    "PermissionDenied",
    "PreconditionViolation",
    "QuotaViolation",
    "ResourceError",
    "ResourceExhausted",
    "Unauthenticated",
    "Unavailable",
    "Unimplemented",
    "Unknown",
    "error_class_for",
    "is_retryable",
]
