"""Settings: defaults, HIVEWIRE_* environment, overrides on top, nested sections."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from hivewire.services.runtime.config import Settings, load_settings
from hivewire.services.runtime.tls import TlsFiles


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """The developer's shell must not leak into these tests."""
    for key in list(os.environ):
        if key.upper().startswith("HIVEWIRE_"):
            monkeypatch.delenv(key)


def test_defaults() -> None:
    s = load_settings()
    assert s.host == "127.0.0.1"
    assert s.port == 0
    assert s.metrics_port is None
    assert s.certs_dir == Path("certs")
    assert s.log_level == "INFO"
    assert s.log_format == "text"
    assert s.grace_period == 10.0
    assert s.nats_url == "tls://127.0.0.1:4222"
    assert s.discovery == "nats"
    assert s.consul_token is None
    assert s.max_message_bytes == 4 * 1024 * 1024
    assert s.default_deadline == 30.0
    assert s.ports_file is None
    assert s.advertised_host == "127.0.0.1"


def test_environment_is_read(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HIVEWIRE_PORT", "50051")
    monkeypatch.setenv("HIVEWIRE_METRICS_PORT", "0")
    monkeypatch.setenv("HIVEWIRE_CERTS_DIR", str(tmp_path))
    monkeypatch.setenv("HIVEWIRE_IDENTITY", "model")
    monkeypatch.setenv("HIVEWIRE_LOG_LEVEL", "debug")
    monkeypatch.setenv("HIVEWIRE_LOG_FORMAT", "JSON")
    monkeypatch.setenv("HIVEWIRE_DISCOVERY", "consul://127.0.0.1:8500")
    monkeypatch.setenv("HIVEWIRE_CONSUL_TOKEN", "s3cret")
    monkeypatch.setenv("HIVEWIRE_PORTS_FILE", str(tmp_path / "ports.json"))
    monkeypatch.setenv("HIVEWIRE_ADVERTISE_HOST", "10.0.0.5")
    s = load_settings()
    assert s.port == 50051
    assert s.metrics_port == 0
    assert s.identity == "model"
    assert s.log_level == "DEBUG"
    assert s.log_format == "json"
    assert s.discovery == "consul://127.0.0.1:8500"
    assert s.consul_token == "s3cret"
    assert s.ports_file == tmp_path / "ports.json"
    assert s.advertised_host == "10.0.0.5"
    assert s.tls_files() == TlsFiles(
        ca=tmp_path / "ca.pem", cert=tmp_path / "model.pem", key=tmp_path / "model.key"
    )
    # A token never shows up in a repr (logs, tracebacks).
    assert "s3cret" not in repr(s)


def test_overrides_win_and_none_means_not_given(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HIVEWIRE_PORT", "50051")
    monkeypatch.setenv("HIVEWIRE_GRACE_PERIOD", "3")
    s = load_settings(port=6000, grace_period=None, identity="tool")
    assert s.port == 6000
    assert s.grace_period == 3.0
    assert s.identity == "tool"


def test_invalid_values_are_rejected(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValidationError):
        load_settings(port=70000)
    with pytest.raises(ValidationError):
        load_settings(log_level="LOUD")
    monkeypatch.setenv("HIVEWIRE_LOG_FORMAT", "xml")
    with pytest.raises(ValidationError):
        load_settings()


def test_event_loop_is_asyncio_unless_uvloop_is_asked_for(monkeypatch: pytest.MonkeyPatch) -> None:
    assert load_settings().event_loop == "asyncio"
    monkeypatch.setenv("HIVEWIRE_EVENT_LOOP", "uvloop")
    assert load_settings().event_loop == "uvloop"
    monkeypatch.setenv("HIVEWIRE_EVENT_LOOP", "trio")
    with pytest.raises(ValidationError):
        load_settings()


def test_settings_are_frozen() -> None:
    s = load_settings()
    with pytest.raises(ValidationError):
        s.port = 1  # type: ignore[misc]


class _Section(BaseModel):
    model_config = ConfigDict(frozen=True)

    queue_limit: int = Field(default=100)
    name: str = Field(default="x")


class _WithSection(Settings):
    section: _Section = Field(default_factory=_Section)


def test_nested_sections_read_double_underscore_and_merge_overrides(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("HIVEWIRE_SECTION__QUEUE_LIMIT", "7")
    monkeypatch.setenv("HIVEWIRE_SECTION__NAME", "from-env")
    s = _WithSection(**{"section": {"name": "from-flag"}})
    assert s.section.queue_limit == 7
    assert s.section.name == "from-flag"
