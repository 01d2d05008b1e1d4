"""The tool policy file: parsing, decisions, the default, reloads."""

from __future__ import annotations

import logging
import os
import tomllib
from pathlib import Path

import pytest

from hivewire.services.tool.policy import (
    DEFAULT_POLICY,
    PolicyError,
    PolicyStore,
    load_policy,
    parse_policy,
)

AGENT = "spiffe://hivewire.local/agent/researcher"
OTHER_AGENT = "spiffe://hivewire.local/agent/summarizer"
CLIENT = "spiffe://hivewire.local/client/client"

POLICY = """
version = 1

[[rules]]
description = "agents: everything but shell tools; fetching needs approval"
callers = ["spiffe://hivewire.local/agent/*"]
allow = ["*"]
deny = ["shell.*"]
require_approval = ["http_fetch"]

[[rules]]
callers = ["spiffe://hivewire.local/agent/researcher"]
allow = ["shell.*"]
require_approval = ["demo.*"]

[[rules]]
callers = "spiffe://hivewire.local/client/*"
allow = ["calculator"]
"""


def test_decisions() -> None:
    policy = parse_policy(tomllib.loads(POLICY))
    assert policy.decide(AGENT, "calculator").allowed
    assert not policy.decide(AGENT, "calculator").requires_approval
    assert policy.decide(OTHER_AGENT, "http_fetch").requires_approval
    # deny wins over a more specific allow
    assert not policy.decide(AGENT, "shell.run").allowed
    assert policy.decide(AGENT, "demo.add").requires_approval
    assert not policy.decide(OTHER_AGENT, "demo.add").requires_approval
    assert policy.decide(CLIENT, "calculator").allowed
    assert not policy.decide(CLIENT, "text").allowed
    assert not policy.decide("spiffe://hivewire.local/admin/admin", "calculator").allowed
    assert not policy.decide("", "calculator").allowed


def test_default_policy_lets_agents_call_everything() -> None:
    assert DEFAULT_POLICY.decide(AGENT, "anything.at.all").allowed
    assert not DEFAULT_POLICY.decide(CLIENT, "calculator").allowed
    assert not DEFAULT_POLICY.decide("spiffe://other.domain/agent/x", "calculator").allowed


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[[rules]]\nallow = ['*']", "callers is required"),
        ("[[rules]]\ncallers = ['x']\nallow = [1]", "allow must be a list"),
        ("[[rules]]\ncallers = ['x']\nalow = ['*']", "unknown key"),
        ("rule = 1", "unknown top-level"),
        ("version = 2", "unsupported version"),
        ("rules = 'x'", "array of tables"),
    ],
)
def test_invalid_policies_are_rejected(text: str, message: str) -> None:
    with pytest.raises(PolicyError, match=message):
        parse_policy(tomllib.loads(text))


def test_load_reports_toml_errors(tmp_path: Path) -> None:
    path = tmp_path / "policy.toml"
    path.write_text("[[rules]\n")
    with pytest.raises(PolicyError, match=str(path)):
        load_policy(path)


def test_store_reloads_on_change_and_keeps_a_good_policy(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "policy.toml"
    path.write_text(f'[[rules]]\ncallers = ["{AGENT}"]\nallow = ["calculator"]\n')
    store = PolicyStore(path, check_interval=0)
    assert store.policy.decide(AGENT, "calculator").allowed
    assert not store.policy.decide(AGENT, "text").allowed

    path.write_text(f'[[rules]]\ncallers = ["{AGENT}"]\nallow = ["text"]\n')
    os.utime(path, ns=(1, 10**18))  # a distinct mtime whatever the clock resolution
    assert store.policy.decide(AGENT, "text").allowed

    path.write_text("not = [valid")
    os.utime(path, ns=(1, 2 * 10**18))
    with caplog.at_level(logging.ERROR):
        assert store.policy.decide(AGENT, "text").allowed
    assert "not reloaded" in caplog.text


def test_store_refuses_a_bad_file_at_startup(tmp_path: Path) -> None:
    path = tmp_path / "policy.toml"
    path.write_text("[[rules]]\n")
    with pytest.raises(PolicyError):
        PolicyStore(path)
    with pytest.raises(OSError):
        PolicyStore(tmp_path / "missing.toml")
