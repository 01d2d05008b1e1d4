"""Domain errors <-> google.rpc.Status, both ways, and the one code table."""

from __future__ import annotations

from typing import Any

import grpc
import pytest
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from hivewire.services.runtime import errors
from hivewire.services.runtime.status import (
    STATUS_DETAILS_KEY,
    from_rpc_error,
    from_rpc_status,
    to_grpc_status,
    to_rpc_status,
)


class FakeRpcError(grpc.RpcError):
    """A finished sync call, as grpc raises it (edge cases only)."""

    def __init__(
        self, code: grpc.StatusCode, details: str, trailing: tuple[tuple[str, Any], ...] = ()
    ) -> None:
        self._code, self._details, self._trailing = code, details, trailing

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details

    def trailing_metadata(self) -> tuple[tuple[str, Any], ...]:
        return self._trailing


def test_table_covers_every_error_code_once() -> None:
    non_ok = {c for c in grpc.StatusCode if c is not grpc.StatusCode.OK}
    assert set(errors.ERROR_CLASSES) == non_ok
    for code, cls in errors.ERROR_CLASSES.items():
        assert cls.code is code
        assert cls.reason == code.name
    retryable = {c for c, cls in errors.ERROR_CLASSES.items() if cls.retryable}
    assert retryable == {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.ABORTED,
    }
    assert errors.is_retryable(grpc.StatusCode.UNAVAILABLE)
    assert not errors.is_retryable(grpc.StatusCode.OK)


def test_reason_can_be_refined_per_instance() -> None:
    err = errors.NotFound("task", "t-1", reason="TASK_NOT_FOUND")
    assert err.reason == "TASK_NOT_FOUND"
    assert errors.NotFound.reason == "NOT_FOUND"
    assert str(err) == "task 't-1' not found"


def test_status_carries_error_info_and_the_matching_detail() -> None:
    err = errors.InvalidArgument(
        violations=[errors.FieldViolation("priority", "must be set")], metadata={"k": "v"}
    )
    status = to_rpc_status(err)
    assert status.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert status.message == "priority: must be set"
    info, bad = error_details_pb2.ErrorInfo(), error_details_pb2.BadRequest()
    assert status.details[0].Unpack(info) and status.details[1].Unpack(bad)
    assert (info.reason, info.domain, dict(info.metadata)) == (
        "INVALID_ARGUMENT",
        "hivewire",
        {"k": "v"},
    )
    assert [(v.field, v.description) for v in bad.field_violations] == [("priority", "must be set")]
    grpc_status = to_grpc_status(err)
    assert grpc_status.code == grpc.StatusCode.INVALID_ARGUMENT
    assert grpc_status.trailing_metadata[0][0] == STATUS_DETAILS_KEY


@pytest.mark.parametrize(
    "err",
    [
        errors.InvalidArgument("bad", [errors.FieldViolation("a.b", "x")]),
        errors.NotFound("agent", "planner", owner="team-a"),
        errors.AlreadyExists("tool", "calc", reason="TOOL_EXISTS"),
        errors.FailedPrecondition("done", [("STATE", "task/1", "finished")]),
        errors.ResourceExhausted("slow", [("p:a", "q")], retry_after=2.25),
        errors.Unavailable("down", retry_after=0.5, metadata={"backend": "ollama"}),
        errors.Aborted("race"),
        errors.Internal("oops"),
        errors.OutOfRange("beyond"),
        errors.DataLoss("gone"),
    ],
    ids=lambda e: type(e).__name__,
)
def test_round_trip_rebuilds_the_same_error(err: errors.HivewireError) -> None:
    status = to_grpc_status(err)
    back = from_rpc_error(FakeRpcError(status.code, status.details, status.trailing_metadata))
    assert type(back) is type(err)
    assert vars(back) == vars(err)


def test_without_details_the_code_alone_decides() -> None:
    err = from_rpc_error(FakeRpcError(grpc.StatusCode.UNAVAILABLE, "connection refused"))
    assert isinstance(err, errors.Unavailable)
    assert err.reason == "UNAVAILABLE" and err.message == "connection refused"
    assert err.retryable
    assert isinstance(from_rpc_error(FakeRpcError(grpc.StatusCode.UNKNOWN, "")), errors.Unknown)


def test_mismatched_or_corrupt_trailer_falls_back_on_the_code() -> None:
    other = rpc_status.to_status(status_pb2.Status(code=5, message="nf")).trailing_metadata
    err = from_rpc_error(FakeRpcError(grpc.StatusCode.INTERNAL, "boom", other))
    assert isinstance(err, errors.Internal)
    err = from_rpc_error(
        FakeRpcError(grpc.StatusCode.ABORTED, "x", ((STATUS_DETAILS_KEY, b"\xff\x00"),))
    )
    assert isinstance(err, errors.Aborted)


def test_foreign_details_are_ignored() -> None:
    status = status_pb2.Status(code=grpc.StatusCode.NOT_FOUND.value[0], message="nope")
    status.details.add().Pack(error_details_pb2.DebugInfo(detail="stack"))
    err = from_rpc_status(status)
    assert isinstance(err, errors.NotFound)
    assert err.reason == "NOT_FOUND" and err.resource_type == ""
