"""Coordinator settings: process defaults, environment, validation."""

from __future__ import annotations

import os
from pathlib import Path

import pydantic
import pytest

from hivewire.services.coordinator.__main__ import service_settings
from hivewire.services.coordinator.settings import CoordinatorSettings
from hivewire.services.runtime.config import load_settings


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in list(os.environ):
        if key.startswith("HIVEWIRE_"):
            monkeypatch.delenv(key)


def test_defaults_of_the_process() -> None:
    settings = service_settings(load_settings())
    assert (settings.identity, settings.port, settings.metrics_port) == (
        "coordinator",
        50051,
        51051,
    )
    assert settings.coordinator.db_path == Path(".hivewire/coordinator.db")


def test_environment_wins(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HIVEWIRE_PORT", "0")
    monkeypatch.setenv("HIVEWIRE_IDENTITY", "coord-2")
    monkeypatch.setenv("HIVEWIRE_COORDINATOR__DB_PATH", "/tmp/x.db")
    monkeypatch.setenv("HIVEWIRE_COORDINATOR__AGING_INTERVAL", "2.5")
    settings = service_settings(load_settings())
    assert (settings.identity, settings.port, settings.metrics_port) == ("coord-2", 0, None)
    assert settings.coordinator.db_path == Path("/tmp/x.db")
    assert settings.coordinator.aging_interval == 2.5


def test_inconsistent_values_are_refused() -> None:
    with pytest.raises(pydantic.ValidationError):
        CoordinatorSettings(default_max_attempts=20, max_attempts_limit=10)
    with pytest.raises(pydantic.ValidationError):
        CoordinatorSettings(aging_interval=0)
    with pytest.raises(pydantic.ValidationError, match="lease_heartbeat"):
        CoordinatorSettings(lease_ttl=2.0, lease_heartbeat=2.0)


def test_database_is_an_alias_of_db_path(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HIVEWIRE_COORDINATOR__DATABASE", "/tmp/y.db")
    assert load_settings().coordinator.db_path == Path("/tmp/y.db")
    assert load_settings(coordinator={"db_path": "/tmp/z.db"}).coordinator.db_path == Path(
        "/tmp/z.db"
    )
