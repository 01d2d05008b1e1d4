"""Misspelt settings stop the start, and every setting the docs name exists."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from hivewire.services.coordinator.settings import CoordinatorProcessSettings
from hivewire.services.runtime.config import (
    ENV_PREFIX,
    UnknownSettingError,
    check_environment,
    load_settings,
)

ROOT = Path(__file__).resolve().parents[2]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

# Names of JetStream streams the docs mention, spelt like variables but not settings.
STREAM_NAMES = {"HIVEWIRE_DLQ", "HIVEWIRE_GRANTS"}
"""NATS streams and buckets the docs name (not settings)."""


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in list(os.environ):
        if key.upper().startswith(ENV_PREFIX):
            monkeypatch.delenv(key)


@pytest.mark.parametrize(
    ("variable", "closest"),
    [
        ("HIVEWIRE_PORTT", "HIVEWIRE_PORT"),
        ("HIVEWIRE_TOOL__POLICY_FILEE", "HIVEWIRE_TOOL__POLICY_FILE"),
        ("hivewire_coordinator__db_pth", "HIVEWIRE_COORDINATOR__DB_PATH"),
        ("HIVEWIRE_EVENTS__STREAM__MAXAGE", "HIVEWIRE_EVENTS__STREAM__MAX_AGE"),
        ("HIVEWIRE_AGENT__ALLOWED_CALLER", "HIVEWIRE_AGENT__ALLOWED_CALLERS"),
    ],
)
def test_an_unknown_variable_is_named_with_the_closest_setting(
    monkeypatch: pytest.MonkeyPatch, variable: str, closest: str
) -> None:
    monkeypatch.setenv(variable, "1")
    with pytest.raises(UnknownSettingError) as err:
        load_settings()
    assert err.value.name.upper() == variable.upper()
    assert err.value.suggestion == closest
    assert f"unknown setting {variable}" in str(err.value) and closest in str(err.value)


def test_the_documented_queue_limit_never_existed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HIVEWIRE_COORDINATOR__QUEUE_LIMIT", "100")
    with pytest.raises(UnknownSettingError):
        load_settings()


def test_unknown_keys_of_sections_and_overrides(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HIVEWIRE_COORDINATOR", '{"max_timout": 5}')
    with pytest.raises(UnknownSettingError) as err:
        load_settings(CoordinatorProcessSettings)
    assert err.value.name == "HIVEWIRE_COORDINATOR__MAX_TIMOUT"
    assert err.value.suggestion == "HIVEWIRE_COORDINATOR__MAX_TIMEOUT"
    monkeypatch.delenv("HIVEWIRE_COORDINATOR")
    with pytest.raises(UnknownSettingError) as top:
        load_settings(grace_perod=3)
    assert top.value.suggestion == "HIVEWIRE_GRACE_PERIOD"


def test_valid_variables_aliases_and_mapping_keys_pass(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HIVEWIRE_COORDINATOR__DATABASE", "tasks.db")  # alias of db_path
    monkeypatch.setenv("HIVEWIRE_MODEL__ROUTES__FAST", "ollama")  # a key of a mapping
    monkeypatch.setenv("HIVEWIRE_ENDPOINTS", "/tmp/endpoints.json")  # read by the clients
    monkeypatch.setenv("HIVEWIRE_EVENTS__STREAM__MAX_AGE", "60")
    settings = load_settings(CoordinatorProcessSettings)
    assert settings.coordinator.db_path == Path("tasks.db")
    assert settings.events.stream.max_age == 60


def run_with(argv: list[str], **env: str) -> subprocess.CompletedProcess[str]:
    """``argv`` with only ``env`` (and a plain PATH) in its environment."""
    return subprocess.run(
        argv,
        env={**env, "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


SERVICE = [sys.executable, "-m"]
CLI = str(Path(sys.executable).parent / "hivewire")


def test_a_service_with_a_misspelt_variable_does_not_start(tmp_path: Path) -> None:
    ran = run_with(
        [*SERVICE, "hivewire.services.tool", "--port", "0"],
        HIVEWIRE_TOOL__POLICY_FILEE=str(tmp_path / "p.toml"),
    )
    assert ran.returncode != 0
    assert ran.stderr.strip().splitlines()[-1] == (
        "hivewire tool: unknown setting HIVEWIRE_TOOL__POLICY_FILEE; did you mean "
        "HIVEWIRE_TOOL__POLICY_FILE? (valid settings: docs/runtime.md)"
    )


def test_a_service_with_a_value_out_of_range_does_not_start() -> None:
    ran = run_with(
        [*SERVICE, "hivewire.services.coordinator", "--port", "0"],
        HIVEWIRE_COORDINATOR__GC_PAUSE_BUDGET="-1",
    )
    assert ran.returncode != 0
    assert "Traceback" not in ran.stderr
    assert ran.stderr.strip().splitlines()[-1] == (
        "hivewire coordinator: invalid setting HIVEWIRE_COORDINATOR__GC_PAUSE_BUDGET: "
        "Input should be greater than or equal to 0"
    )


def test_the_cli_refuses_a_misspelt_variable(tmp_path: Path) -> None:
    ran = run_with([CLI, "tasks"], HIVEWIRE_CERTS_DIRR=str(tmp_path))
    assert ran.returncode == 2, ran
    assert "unknown setting HIVEWIRE_CERTS_DIRR; did you mean HIVEWIRE_CERTS_DIR?" in ran.stderr


def test_the_cli_refuses_a_value_out_of_range() -> None:
    ran = run_with([CLI, "tasks", "list"], HIVEWIRE_COORDINATOR__GC_PAUSE_BUDGET="-1")
    assert ran.returncode == 2, ran
    assert ran.stderr.strip() == (
        "Error: invalid setting HIVEWIRE_COORDINATOR__GC_PAUSE_BUDGET: "
        "Input should be greater than or equal to 0"
    )


# -- the docs ---------------------------------------------------------------------------

_FULL_NAME = re.compile(r"\bHIVEWIRE_[A-Z0-9_]*[A-Z0-9]\b(?!__\*|\*)")
_SECTION_INTRO = re.compile(r"`HIVEWIRE_([A-Z0-9_]+?)__\*`")
_PREFIX = re.compile(r"\bHIVEWIRE_([A-Z0-9_]+?)__\*")
_CODE = re.compile(r"`([A-Z][A-Z0-9_]*[A-Z0-9])`")


def documented_settings() -> list[tuple[str, int, str]]:
    """``(file, line, variable)`` for every setting the README and docs name.

    Full names (``HIVEWIRE_TOOL__POLICY_FILE``) anywhere; and bare field names
    (``POLICY_FILE``) in code spans below a line that introduces a section with
    ``HIVEWIRE_<SECTION>__*``, until the next heading.
    """
    found = []
    for path in DOCS:
        section: str | None = None
        transcript = False
        for number, line in enumerate(path.read_text().splitlines(), 1):
            # ```text blocks are transcripts (misspelt on purpose in docs/runtime.md).
            if line.startswith("```"):
                transcript = line.strip() == "```text"
                continue
            if transcript:
                continue
            if line.startswith("#"):
                section = None
            intro = _SECTION_INTRO.search(line)
            if intro is not None:
                section = intro.group(1)
            for prefix in _PREFIX.findall(line):
                found.append((path.name, number, f"HIVEWIRE_{prefix}"))
            for name in _FULL_NAME.findall(line):
                found.append((path.name, number, name))
            if section is not None and (line.startswith("|") or line.startswith("`")):
                cell = line.split("|")[1] if line.startswith("|") else line
                for name in _CODE.findall(cell):
                    if not name.startswith("HIVEWIRE_"):
                        found.append((path.name, number, f"HIVEWIRE_{section}__{name}"))
    return found


def is_setting(name: str) -> bool:
    if name in STREAM_NAMES:
        return True
    try:
        check_environment({name: ""})
    except UnknownSettingError:
        return False
    return True


def test_every_documented_setting_exists() -> None:
    documented = documented_settings()
    # The check reads every settings table (it is not vacuous).
    names = {name for _, _, name in documented}
    assert {"HIVEWIRE_COORDINATOR__DB_PATH", "HIVEWIRE_TOOL__POLICY_FILE"} <= names
    assert "HIVEWIRE_MODEL__RETRY_AFTER" in names and "HIVEWIRE_HOST" in names
    missing = [f"{f}:{n}: {name}" for f, n, name in documented if not is_setting(name)]
    assert not missing, "documented settings that do not exist:\n" + "\n".join(missing)
