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
from typing import Any, ClassVar, Generic, TypeVar

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
        reason: Stable UPPER_SNAKE identifier clients branch on; a class default (the
            code's name unless a subclass says otherwise) that one instance may refine
            (``NotFound(..., reason="TASK_NOT_FOUND")``).
        retryable: Whether retrying the same call later may succeed (class-level).
        message: Human-readable text for logs and developers.
        metadata: Extra string key/values carried in ``ErrorInfo.metadata``.
    """

    code: ClassVar[grpc.StatusCode] = grpc.StatusCode.UNKNOWN
    reason: str = "UNKNOWN"
    retryable: ClassVar[bool] = False

    def __init_subclass__(
        cls, *, code: grpc.StatusCode | None = None, retryable: bool | None = None, **kwargs: Any
    ) -> None:
        """Set a subclass's code and retryability: ``class Aborted(HivewireError, code=...)``.

        A subclass with a code of its own gets the code's name as its default reason
        unless it sets ``reason`` itself.
        """
        super().__init_subclass__(**kwargs)
        if code is not None:
            cls.code = code
        if retryable is not None:
            cls.retryable = retryable
        if "code" in cls.__dict__ and "reason" not in cls.__dict__:
            cls.reason = cls.code.name

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


ViolationT = TypeVar("ViolationT", FieldViolation, PreconditionViolation, QuotaViolation)


def _violations(kind: type[Any], items: Iterable[Any]) -> list[Any]:
    """``items`` as a list of ``kind``, each given as one or as the tuple of its fields."""
    return [item if isinstance(item, kind) else kind(*item) for item in items]


class _ViolationsError(HivewireError, Generic[ViolationT]):
    """Shared shape of the errors that list what was violated, next after the message.

    A violation is given as its dataclass or as the tuple of its fields.
    """

    violation_type: ClassVar[type[Any]]
    """The dataclass of one violation."""

    def __init__(
        self,
        message: str = "",
        violations: Iterable[ViolationT | tuple[str, ...]] = (),
        *,
        reason: str | None = None,
        metadata: Mapping[str, str] | None = None,
    ) -> None:
        """Create the error.

        Args:
            message: Human text; :meth:`_summary` of the violations when empty.
            violations: What was violated: the dataclasses, or tuples of their fields.
            reason: Instance reason override (``TASK_ALREADY_FINISHED``...).
            metadata: ``ErrorInfo`` metadata.
        """
        self.violations: list[ViolationT] = _violations(self.violation_type, violations)
        super().__init__(message or self._summary(), reason=reason, metadata=metadata)

    def _summary(self) -> str:
        return ""


class InvalidArgument(_ViolationsError[FieldViolation], code=grpc.StatusCode.INVALID_ARGUMENT):
    """A request field is missing or invalid (``violations``: each bad field and why)."""

    violation_type = FieldViolation

    def _summary(self) -> str:
        return "; ".join(f"{v.field}: {v.description}" for v in self.violations)


class ResourceError(HivewireError):
    """Shared shape of errors about one named resource (``ResourceInfo``)."""

    _what: ClassVar[str] = ""
    """What happened to the resource, in the default message (``not found``)."""

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
        default = f"{resource_type} {resource_name!r} {self._what}".rstrip()
        super().__init__(message or default, reason=reason, metadata=metadata)


class NotFound(ResourceError, code=grpc.StatusCode.NOT_FOUND):
    """A task, agent, tool or model does not exist."""

    _what = "not found"


class AlreadyExists(ResourceError, code=grpc.StatusCode.ALREADY_EXISTS):
    """Registering something whose id or name is taken."""

    _what = "already exists"


class FailedPrecondition(
    _ViolationsError[PreconditionViolation], code=grpc.StatusCode.FAILED_PRECONDITION
):
    """The system is not in a state that allows the operation (do not retry as is).

    ``violations``: ``PreconditionViolation`` or ``(type, subject, description)``.
    """

    violation_type = PreconditionViolation


class Aborted(HivewireError, code=grpc.StatusCode.ABORTED, retryable=True):
    """Lost a concurrent-update race; retry the whole read-modify-write."""


class OutOfRange(HivewireError, code=grpc.StatusCode.OUT_OF_RANGE):
    """A value is past the valid range (for example a sequence beyond the end)."""


class Unauthenticated(HivewireError, code=grpc.StatusCode.UNAUTHENTICATED):
    """No or bad credentials."""


class PermissionDenied(HivewireError, code=grpc.StatusCode.PERMISSION_DENIED):
    """The caller's identity is not allowed to do this."""


class _RetryLater(HivewireError):
    """Shared ``retry_after`` handling (``RetryInfo.retry_delay``)."""

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
        self.retry_after = retry_after
        super().__init__(message, reason=reason, metadata=metadata)


class ResourceExhausted(_RetryLater, code=grpc.StatusCode.RESOURCE_EXHAUSTED, retryable=True):
    """A rate limit, size limit or budget was hit."""

    def __init__(
        self,
        message: str = "",
        quota_violations: Iterable[QuotaViolation | tuple[str, str]] = (),
        retry_after: float | None = None,
        *,
        reason: str | None = None,
        metadata: Mapping[str, str] | None = None,
    ) -> None:
        """Create the error: the arguments of :class:`Unavailable`, and the quotas.

        Args:
            quota_violations: ``QuotaViolation`` or ``(subject, description)``.
            reason: Instance reason override (``RATE_LIMITED``...).
        """
        self.quota_violations: list[QuotaViolation] = _violations(QuotaViolation, quota_violations)
        super().__init__(message, retry_after, reason=reason, metadata=metadata)


class Unavailable(_RetryLater, code=grpc.StatusCode.UNAVAILABLE, retryable=True):
    """A dependency is down or no healthy instance exists; retry later."""


class DeadlineExceeded(HivewireError, code=grpc.StatusCode.DEADLINE_EXCEEDED):
    """The deadline passed before the work finished."""


class Cancelled(HivewireError, code=grpc.StatusCode.CANCELLED):
    """The work was cancelled."""


class Unimplemented(HivewireError, code=grpc.StatusCode.UNIMPLEMENTED):
    """The operation is not built (yet) or not supported by this backend."""


class Internal(HivewireError, code=grpc.StatusCode.INTERNAL):
    """A bug or broken invariant; details stay in the server log."""


class Unknown(HivewireError, code=grpc.StatusCode.UNKNOWN):
    """An error of unknown origin (a peer answered UNKNOWN)."""


class DataLoss(HivewireError, code=grpc.StatusCode.DATA_LOSS):
    """Unrecoverable data loss or corruption."""


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
