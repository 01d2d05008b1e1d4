"""The authorization policy: default rules, file format, deny wins, caching, reload."""

from __future__ import annotations

import logging
import os
import tomllib
from pathlib import Path

import pytest

from hivewire.services.runtime.authz import (
    DEFAULT_POLICY,
    DEFAULT_POLICY_TOML,
    AuthzPolicyError,
    AuthzPolicyStore,
    Caller,
    parse_authz_policy,
)
from hivewire.services.runtime.config import load_settings

MESH = "spiffe://hivewire.local"
COORDINATOR = "/hivewire.coordinator.v1.CoordinatorService"
AGENT = "/hivewire.agent.v1.AgentService"
MODEL = "/hivewire.model.v1.ModelService"
TOOL = "/hivewire.tool.v1.ToolService"
HEALTH = "/grpc.health.v1.Health/Check"
REFLECTION = "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo"
REFLECTION_V1 = "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo"


def allowed_services(spiffe_id: str) -> set[str]:
    methods = {
        COORDINATOR: f"{COORDINATOR}/SubmitTask",
        AGENT: f"{AGENT}/Execute",
        MODEL: f"{MODEL}/Chat",
        TOOL: f"{TOOL}/InvokeTool",
        "other": "/hivewire.other.v1.OtherService/Do",
    }
    return {name for name, method in methods.items() if DEFAULT_POLICY.allows(spiffe_id, method)}


@pytest.mark.parametrize(
    ("spiffe_id", "expected"),
    [
        (f"{MESH}/client/alice", {COORDINATOR}),
        (f"{MESH}/coordinator/coordinator", {AGENT}),
        (f"{MESH}/agent/summarizer", {MODEL, TOOL, COORDINATOR}),
        (f"{MESH}/admin/root", {COORDINATOR, AGENT, MODEL, TOOL, "other"}),
        (f"{MESH}/model/model", set()),
        (f"{MESH}/tool/tool", set()),
        ("spiffe://elsewhere.example/client/alice", set()),
        ("", set()),
    ],
)
def test_default_policy_encodes_the_design(spiffe_id: str, expected: set[str]) -> None:
    assert allowed_services(spiffe_id) == expected


@pytest.mark.parametrize(
    "spiffe_id",
    [
        f"{MESH}/client/alice",
        f"{MESH}/model/model",
        f"{MESH}/tool/tool",
        "spiffe://elsewhere.example/x/y",
        "",
    ],
)
def test_default_policy_opens_health_and_reflection_to_every_peer(spiffe_id: str) -> None:
    for method in (HEALTH, "/grpc.health.v1.Health/Watch", REFLECTION, REFLECTION_V1):
        assert DEFAULT_POLICY.allows(spiffe_id, method), method


def test_default_policy_is_the_documented_toml() -> None:
    assert parse_authz_policy(tomllib.loads(DEFAULT_POLICY_TOML), "default") == DEFAULT_POLICY
    docs = Path(__file__).resolve().parents[2] / "docs" / "runtime.md"
    assert DEFAULT_POLICY_TOML.strip() in docs.read_text(encoding="utf-8")


def test_deny_wins_and_no_rule_means_no() -> None:
    policy = parse_authz_policy(
        {
            "rules": [
                {"callers": ["client/*"], "allow": ["hivewire.coordinator.v1.*"]},
                {"callers": ["client/kiosk"], "deny": [f"{COORDINATOR}/CancelTask"]},
            ]
        }
    )
    assert policy.allows(f"{MESH}/client/kiosk", f"{COORDINATOR}/SubmitTask")
    assert not policy.allows(f"{MESH}/client/kiosk", f"{COORDINATOR}/CancelTask")
    assert policy.allows(f"{MESH}/client/alice", f"{COORDINATOR}/CancelTask")
    assert not policy.allows(f"{MESH}/agent/alice", f"{COORDINATOR}/SubmitTask")


def test_caller_globs_relative_full_and_any_peer() -> None:
    policy = parse_authz_policy(
        {
            "rules": [
                {"callers": ["agent/research*"], "allow": ["a.S/*"]},
                {"callers": ["spiffe://partner.example/*"], "allow": ["/b.S/Get"]},
                {"callers": ["*"], "allow": ["c.S/*"]},
            ]
        }
    )
    assert policy.allows(f"{MESH}/agent/researcher", "/a.S/Run")
    assert not policy.allows(f"{MESH}/agent/summarizer", "/a.S/Run")
    assert policy.allows("spiffe://partner.example/bot/1", "/b.S/Get")
    assert not policy.allows("spiffe://partner.example/bot/1", "/b.S/Put")
    assert policy.allows("", "/c.S/Anything")
    assert not policy.allows("", "/a.S/Run")


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"rules": [{"allow": ["*"]}]}, "callers is required"),
        ({"rules": [{"callers": ["*"], "allow": ["a.S"]}]}, "names no method"),
        ({"rules": [{"callers": ["*"], "permit": ["*"]}]}, "unknown key"),
        ({"rules": [{"callers": [""], "allow": ["*"]}]}, "non-empty strings"),
        ({"rules": [{"callers": ["*"], "allow": [1]}]}, "non-empty strings"),
        ({"version": 2, "rules": []}, "unsupported version"),
        ({"rule": []}, "unknown top-level"),
        ({"rules": {"callers": ["*"]}}, "array of tables"),
    ],
)
def test_malformed_policies_are_rejected_with_where(data: dict[str, object], message: str) -> None:
    with pytest.raises(AuthzPolicyError, match=message):
        parse_authz_policy(data, "p.toml")


def test_caller_parses_mesh_identities() -> None:
    assert Caller.from_spiffe_id(f"{MESH}/agent/researcher") == Caller(
        f"{MESH}/agent/researcher", "agent", "researcher"
    )
    assert Caller.from_spiffe_id("spiffe://elsewhere.example/agent/x") == Caller(
        "spiffe://elsewhere.example/agent/x"
    )
    assert Caller.from_spiffe_id(None) == Caller("")


def test_settings_read_the_policy_file_from_the_environment(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    path = tmp_path / "authz.toml"
    monkeypatch.setenv("HIVEWIRE_AUTHZ_POLICY_FILE", str(path))
    assert load_settings().authz_policy_file == path
    monkeypatch.delenv("HIVEWIRE_AUTHZ_POLICY_FILE")
    assert load_settings().authz_policy_file is None


def _write(path: Path, text: str, *, mtime_ns: int) -> None:
    path.write_text(text, encoding="utf-8")
    # Distinct mtimes even on filesystems with coarse timestamps.
    os.utime(path, ns=(mtime_ns, mtime_ns))


ALLOW_CHAT = """
[[rules]]
callers = ["client/*"]
allow = ["hivewire.model.v1.ModelService/Chat"]
"""


def test_store_reloads_a_changed_file_and_keeps_the_old_policy_on_errors(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "authz.toml"
    _write(path, ALLOW_CHAT, mtime_ns=1_000_000_000)
    store = AuthzPolicyStore(path, check_interval=0)
    alice = f"{MESH}/client/alice"
    assert store.allows(alice, f"{MODEL}/Chat")
    assert not store.allows(alice, f"{MODEL}/Embed")

    # A cached decision must not survive a reload.
    _write(path, ALLOW_CHAT.replace("/Chat", "/Embed"), mtime_ns=2_000_000_000)
    assert store.allows(alice, f"{MODEL}/Embed")
    assert not store.allows(alice, f"{MODEL}/Chat")

    with caplog.at_level(logging.ERROR, logger="hivewire.services.runtime.authz"):
        _write(path, "[[rules]\nbroken", mtime_ns=3_000_000_000)
        assert store.allows(alice, f"{MODEL}/Embed")
    assert "not reloaded" in caplog.text
    assert store.policy.source == str(path)


def test_store_without_a_file_uses_the_default(tmp_path: Path) -> None:
    store = AuthzPolicyStore()
    assert store.policy is DEFAULT_POLICY
    assert store.allows(f"{MESH}/client/a", f"{COORDINATOR}/GetTask")
    assert not store.allows(f"{MESH}/client/a", f"{AGENT}/Execute")


def test_store_refuses_to_start_on_a_broken_file(tmp_path: Path) -> None:
    path = tmp_path / "authz.toml"
    path.write_text('[[rules]]\ncallers = ["*"]\nallow = ["nomethod"]\n', encoding="utf-8")
    with pytest.raises(AuthzPolicyError, match="names no method"):
        AuthzPolicyStore(path)


def test_only_an_explicit_act_for_lets_a_caller_act_for_another_identity() -> None:
    mesh = "spiffe://hivewire.local/"
    policy = parse_authz_policy(
        {
            "rules": [
                {"callers": ["client/a2a"], "act_for": ["client/*"]},
                {"callers": ["admin/*"], "allow": ["*"]},
                {"callers": ["*"], "act_for": ["client/*"]},
                {"callers": ["client/wild"], "act_for": "*"},
            ]
        }
    )
    gateway = mesh + "client/a2a"
    assert policy.may_act_for(gateway, mesh + "client/alice")
    assert not policy.may_act_for(gateway, mesh + "admin/root")
    assert not policy.may_act_for(gateway, mesh + "agent/researcher")
    assert not policy.may_act_for(gateway, "")
    # allow = ["*"] is not a delegation, a rule for every peer grants none, nor does "*".
    assert not policy.may_act_for(mesh + "admin/root", mesh + "client/alice")
    assert not policy.may_act_for(mesh + "client/alice", mesh + "client/bob")
    assert not policy.may_act_for(mesh + "client/wild", mesh + "client/bob")
    assert DEFAULT_POLICY.may_act_for(gateway, mesh + "client/bob")
    assert not DEFAULT_POLICY.may_act_for(mesh + "client/bob", mesh + "client/alice")
