"""The shared process bootstrap and conversions: defaults, flags, well-known types."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from hivewire.services.runtime.bootstrap import ServiceEntry, with_service_defaults
from hivewire.services.runtime.config import load_settings
from hivewire.services.runtime.convert import (
    duration,
    duration_seconds,
    error_detail,
    struct_to_dict,
    to_struct,
)
from hivewire.services.runtime.ports import TOOL_PORT, metrics_port_for
from hivewire.services.runtime.values import ErrorInfo
from hivewire.services.tool.settings import ToolProcessSettings

ENTRY = ServiceEntry(
    "tool", title="hivewire tool service", port=TOOL_PORT, settings_model=ToolProcessSettings
)


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in list(os.environ):
        if key.startswith("HIVEWIRE_"):
            monkeypatch.delenv(key)


def test_service_defaults_fill_only_what_is_unset(monkeypatch: pytest.MonkeyPatch) -> None:
    settings = with_service_defaults(load_settings(), identity="model", port=50052)
    assert (settings.identity, settings.port, settings.metrics_port) == ("model", 50052, 51052)

    monkeypatch.setenv("HIVEWIRE_IDENTITY", "model-2")
    monkeypatch.setenv("HIVEWIRE_PORT", "0")
    settings = with_service_defaults(load_settings(), identity="model", port=50052)
    # An explicit port 0 (tests) keeps metrics off unless asked for.
    assert (settings.identity, settings.port, settings.metrics_port) == ("model-2", 0, None)

    monkeypatch.setenv("HIVEWIRE_PORT", "6000")
    monkeypatch.setenv("HIVEWIRE_METRICS_PORT", "7000")
    settings = with_service_defaults(load_settings(), identity="model", port=50052)
    assert (settings.port, settings.metrics_port) == (6000, 7000)


def test_entry_point_flags_win_over_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HIVEWIRE_PORT", "6000")
    monkeypatch.setenv("HIVEWIRE_LOG_LEVEL", "WARNING")
    parser = ENTRY.parser()
    parser.add_argument("--policy-file")
    args = parser.parse_args(
        ["--port", "6100", "--host", "127.0.0.2", "--log-level", "debug", "--policy-file", "p.toml"]
    )
    settings = ENTRY.settings(args, tool={"policy_file": args.policy_file})
    assert (settings.host, settings.port, settings.log_level) == ("127.0.0.2", 6100, "DEBUG")
    assert settings.metrics_port == metrics_port_for(6100)
    assert settings.identity == "tool"
    assert settings.tool.policy_file == Path("p.toml")
    assert parser.prog == "python -m hivewire.services.tool"


def test_flags_not_given_leave_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HIVEWIRE_HOST", "127.0.0.3")
    settings = ENTRY.settings(ENTRY.parser().parse_args([]))
    assert (settings.host, settings.port, settings.metrics_port) == ("127.0.0.3", 50053, 51053)


def test_durations_are_exact_to_the_nanosecond_and_never_negative() -> None:
    assert (duration(1.5).seconds, duration(1.5).nanos) == (1, 500_000_000)
    # 0.9999999999 s must not round to an invalid 1_000_000_000 nanos.
    almost = duration(0.9999999999)
    assert (almost.seconds, almost.nanos) == (1, 0)
    assert (duration(-3.0).seconds, duration(-3.0).nanos) == (0, 0)
    assert duration_seconds(duration(2.25)) == 2.25


def test_structs_carry_json_objects_and_huge_integers() -> None:
    huge = 10**400
    struct = to_struct({"a": 1, "nested": {"list": [True, "x", huge]}})
    assert struct_to_dict(struct) == {"a": 1.0, "nested": {"list": [True, "x", str(huge)]}}
    assert struct_to_dict(to_struct(None)) == {}


def test_classified_errors_become_error_details() -> None:
    failure = ErrorInfo(
        code="INVALID_ARGUMENT", reason="DIVISION_BY_ZERO", message="nope", metadata={"k": "v"}
    )
    detail = error_detail(failure)
    assert (detail.code, detail.reason, detail.message, detail.retryable) == (
        "INVALID_ARGUMENT",
        "DIVISION_BY_ZERO",
        "nope",
        False,
    )
    assert dict(detail.metadata) == {"k": "v"}
