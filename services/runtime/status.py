"""Rich gRPC status both ways: domain error <-> ``google.rpc.Status``.

The server side builds a ``google.rpc.Status`` with an ``ErrorInfo`` (reason, domain,
metadata) plus the detail matching the error (``BadRequest``, ``ResourceInfo``,
``PreconditionFailure``, ``QuotaFailure``, ``RetryInfo``) and sends it in the
``grpc-status-details-bin`` trailer. The client side decodes that trailer and
rebuilds the same :class:`~hivewire.services.runtime.errors.HivewireError` subclass;
without a trailer (an error raised by gRPC itself, a foreign server) it falls back
on the status code alone.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import asdict, fields
from typing import Any, cast

import grpc
from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2
from google.rpc.error_details_pb2 import BadRequest, PreconditionFailure, QuotaFailure
from grpc_status import rpc_status

from hivewire.services.runtime.convert import duration
from hivewire.services.runtime.errors import (
    ERROR_DOMAIN,
    AlreadyExists,
    FailedPrecondition,
    FieldViolation,
    HivewireError,
    InvalidArgument,
    NotFound,
    PreconditionViolation,
    QuotaViolation,
    ResourceError,
    ResourceExhausted,
    Unavailable,
    error_class_for,
)

logger = logging.getLogger(__name__)

STATUS_DETAILS_KEY = "grpc-status-details-bin"
"""Trailer that carries the serialized ``google.rpc.Status``."""


def _pack(message: Any) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(message)
    return packed


_VIOLATION_DETAILS: tuple[tuple[type[HivewireError], str, type[Any], Any, str], ...] = (
    (InvalidArgument, "violations", FieldViolation, BadRequest, "field_violations"),
    (FailedPrecondition, "violations", PreconditionViolation, PreconditionFailure, "violations"),
    (ResourceExhausted, "quota_violations", QuotaViolation, QuotaFailure, "violations"),
)
"""The errors that list violations: (error class, its list attribute, the violation
dataclass, the detail message carrying them, its list field). A violation dataclass has
the fields of the detail's list element, by name.
"""


def to_rpc_status(err: HivewireError) -> status_pb2.Status:
    """Build the ``google.rpc.Status`` message for a domain error.

    Args:
        err: The error to encode.

    Returns:
        The status with ``ErrorInfo`` first, then the error's specific detail.
    """
    details = [
        _pack(
            error_details_pb2.ErrorInfo(
                reason=err.reason, domain=ERROR_DOMAIN, metadata=err.metadata
            )
        )
    ]
    if isinstance(err, NotFound | AlreadyExists):
        details.append(
            _pack(
                error_details_pb2.ResourceInfo(
                    resource_type=err.resource_type,
                    resource_name=err.resource_name,
                    owner=err.owner,
                    description=err.message,
                )
            )
        )
    for cls, attribute, _, detail, field in _VIOLATION_DETAILS:
        violations = getattr(err, attribute) if isinstance(err, cls) else None
        if violations:
            message = detail()
            for violation in violations:
                getattr(message, field).add(**asdict(violation))
            details.append(_pack(message))
    if isinstance(err, ResourceExhausted | Unavailable) and err.retry_after is not None:
        details.append(_pack(error_details_pb2.RetryInfo(retry_delay=duration(err.retry_after))))
    return status_pb2.Status(code=err.code.value[0], message=err.message, details=details)


def to_grpc_status(
    err: HivewireError, *, trailing_metadata: Sequence[tuple[str, str | bytes]] = ()
) -> grpc.Status:
    """Build the ``grpc.Status`` to pass to ``context.abort_with_status``.

    Args:
        err: The error to send.
        trailing_metadata: More trailers to send with it (``abort_with_status``
            replaces any set earlier with ``set_trailing_metadata``).

    Returns:
        A status whose trailing metadata carries the rich ``google.rpc.Status``.
    """
    status: Any = rpc_status.to_status(to_rpc_status(err))
    if trailing_metadata:
        # grpcio-status returns a namedtuple: extend its trailers, keep its type.
        status = status._replace(trailing_metadata=(*status.trailing_metadata, *trailing_metadata))
    return cast(grpc.Status, status)


def _unpack(packed: any_pb2.Any, message: Any) -> bool:
    if packed.Is(message.DESCRIPTOR):
        packed.Unpack(message)
        return True
    return False


_DETAIL_TYPES: tuple[type[Any], ...] = (
    error_details_pb2.ErrorInfo,
    error_details_pb2.ResourceInfo,
    error_details_pb2.RetryInfo,
    *(detail for *_, detail, _ in _VIOLATION_DETAILS),
)


def from_rpc_status(status: status_pb2.Status) -> HivewireError:
    """Rebuild the domain error from a ``google.rpc.Status``.

    Args:
        status: A non-OK status, as decoded from the trailer.

    Returns:
        The matching :class:`HivewireError` subclass with reason, metadata and details.
    """
    code = _code_from_int(status.code)
    cls = error_class_for(code)
    found: dict[type[Any], Any] = {}
    for packed in status.details:
        for detail in _DETAIL_TYPES:
            if _unpack(packed, message := detail()):
                # The first ErrorInfo counts; of the others, the last one.
                if detail is not error_details_pb2.ErrorInfo or detail not in found:
                    found[detail] = message
                break
    info = found.get(error_details_pb2.ErrorInfo)
    resource = found.get(error_details_pb2.ResourceInfo)
    retry = found.get(error_details_pb2.RetryInfo)
    retry_after = retry.retry_delay.seconds + retry.retry_delay.nanos / 1e9 if retry else None
    violations = [
        violation(**{f.name: getattr(item, f.name) for f in fields(violation)})
        for error, _, violation, detail, field in _VIOLATION_DETAILS
        if cls is error and detail in found
        for item in getattr(found[detail], field)
    ]
    # Only a refined reason becomes an instance attribute; the default stays on the class.
    reason = info.reason if info is not None and info.reason not in ("", cls.reason) else None
    metadata = dict(info.metadata) if info is not None else {}
    message = status.message
    kw: dict[str, Any] = {"reason": reason, "metadata": metadata}

    if issubclass(cls, ResourceError):
        rtype = resource.resource_type if resource is not None else ""
        rname = resource.resource_name if resource is not None else ""
        owner = resource.owner if resource is not None else ""
        return cls(rtype, rname, message, owner=owner, **kw)
    if cls is ResourceExhausted:
        return ResourceExhausted(message, violations, retry_after, **kw)
    if cls is Unavailable:
        return Unavailable(message, retry_after, **kw)
    if cls is InvalidArgument:
        return InvalidArgument(message, violations, **kw)
    if cls is FailedPrecondition:
        return FailedPrecondition(message, violations, **kw)
    return cls(message, **kw)


def _code_from_int(value: int) -> grpc.StatusCode:
    for code in grpc.StatusCode:
        if code.value[0] == value:
            return code
    return grpc.StatusCode.UNKNOWN


def _find_details(metadata: Any) -> bytes | None:
    for item in metadata or ():
        key, value = item[0], item[1]
        if key == STATUS_DETAILS_KEY and isinstance(value, bytes):
            return value
    return None


def from_rpc_error(err: grpc.RpcError) -> HivewireError:
    """Turn a failed call into the domain error the server raised.

    Works with ``grpc.aio.AioRpcError`` and with sync ``grpc.RpcError`` call objects.

    Args:
        err: The exception raised by the call.

    Returns:
        The rebuilt error: the server's class, reason, metadata and details when it
        sent a rich status; otherwise the class for the code, with the call's details
        as message and the code name as reason.
    """
    code_fn = getattr(err, "code", None)
    code: grpc.StatusCode = code_fn() if callable(code_fn) else grpc.StatusCode.UNKNOWN
    details_fn = getattr(err, "details", None)
    details = (details_fn() if callable(details_fn) else None) or ""
    trailing_fn = getattr(err, "trailing_metadata", None)
    blob = _find_details(trailing_fn() if callable(trailing_fn) else None)
    if blob is not None:
        try:
            status = status_pb2.Status.FromString(blob)
        except Exception:  # a corrupt trailer must not hide the real error
            logger.debug("undecodable %s trailer ignored", STATUS_DETAILS_KEY, exc_info=True)
        else:
            if status.code == code.value[0]:
                return from_rpc_status(status)
            logger.debug("status trailer code %s differs from call code %s", status.code, code)
    if code == grpc.StatusCode.OK:
        code = grpc.StatusCode.UNKNOWN
    return from_rpc_status(status_pb2.Status(code=code.value[0], message=details))


def finished_call_code(call: Any) -> grpc.StatusCode:
    """Status code of a finished aio call, read without awaiting (from a done callback)."""
    if call.cancelled():
        return grpc.StatusCode.CANCELLED
    try:
        # grpc.aio exposes the status only through coroutines; a done callback cannot
        # await, and the finished status object is already there.
        code_value = call._cython_call._status.code()
    except AttributeError:
        return grpc.StatusCode.UNKNOWN
    for code in grpc.StatusCode:
        if code.value[0] == code_value:
            return code
    return grpc.StatusCode.UNKNOWN
