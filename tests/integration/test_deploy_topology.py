"""deploy/: the docker-compose file and the Kubernetes manifests, checked offline.

- Kubernetes: every manifest passes ``kubernetes-validate --strict`` (the Kubernetes
  OpenAPI schemas shipped in that PyPI package; an unknown field fails).
- Compose: the file passes the Compose Specification's JSON schema (vendored in the
  check-jsonschema package, ``vendor.compose-spec``).
- Both: every ``HIVEWIRE_*`` variable a container gets is a real setting with a valid
  value (the settings model of the services loads them), every module a container runs
  exists, each container mounts the certificates of the identity it claims, and the
  NATS configurations (with the ``hivewire certs nats-auth`` output they include) are
  accepted by the real nats-server (``-t``).
"""

from __future__ import annotations

import copy
import importlib
import importlib.util
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from hivewire.services.runtime.config import load_settings
from hivewire.services.runtime.pki import DEFAULT_IDENTITIES, TRUST_DOMAIN, init_pki
from tests.support.e2e_mesh import REPO_ROOT

pytestmark = pytest.mark.timeout(120)

DEPLOY = REPO_ROOT / "deploy"
COMPOSE = DEPLOY / "compose" / "docker-compose.yml"
KUBERNETES = sorted((DEPLOY / "kubernetes").rglob("*.yaml"))
BIN = Path(sys.executable).parent
IDENTITIES = {identity.stem: identity for identity in DEFAULT_IDENTITIES}
POD_IP = "10.0.0.7"  # what the downward API gives status.podIP, for the settings check


def tool(name: str) -> str:
    path = BIN / name
    assert path.exists(), f"{name} is missing: `make venv` installs it (the dev extra)"
    return str(path)


def run(*argv: str, **kwargs: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=90, **kwargs)


def k8s_documents() -> Iterator[tuple[Path, dict[str, Any]]]:
    for path in KUBERNETES:
        for document in yaml.safe_load_all(path.read_text()):
            if document:
                yield path, document


def pod_specs() -> Iterator[tuple[str, dict[str, Any]]]:
    for _, doc in k8s_documents():
        if doc["kind"] in ("Deployment", "StatefulSet"):
            yield doc["metadata"]["name"], doc["spec"]["template"]["spec"]


def config_map(name: str) -> dict[str, Any]:
    [data] = [
        d["data"]
        for _, d in k8s_documents()
        if d["kind"] == "ConfigMap" and d["metadata"]["name"] == name
    ]
    return dict(data)


def shared_env() -> dict[str, str]:
    return {str(k): str(v) for k, v in config_map("hivewire-env").items()}


def container_env(container: dict[str, Any]) -> dict[str, str]:
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        assert source["configMapRef"]["name"] == "hivewire-env"
        env.update(shared_env())
    for item in container.get("env", []):
        if "value" in item:
            env[item["name"]] = str(item["value"])
        else:
            assert item["valueFrom"]["fieldRef"]["fieldPath"] == "status.podIP", item
            env[item["name"]] = POD_IP
    return env


def hivewire_containers() -> Iterator[tuple[str, dict[str, Any], dict[str, Any]]]:
    for name, spec in pod_specs():
        for container in spec["containers"]:
            if container["image"].startswith("hivewire:"):
                yield name, spec, container


def compose() -> dict[str, Any]:
    document: dict[str, Any] = yaml.safe_load(COMPOSE.read_text())
    return document


def compose_hivewire_services() -> Iterator[tuple[str, dict[str, Any]]]:
    for name, service in compose()["services"].items():
        if service.get("image", "").startswith("hivewire:") and "command" in service:
            yield name, service


def assert_settings_load(env: dict[str, str], monkeypatch: pytest.MonkeyPatch, where: str) -> None:
    """The services' settings model accepts every HIVEWIRE_* variable and its value."""
    with monkeypatch.context() as patch:
        for key in [k for k in os.environ if k.startswith("HIVEWIRE_")]:
            patch.delenv(key)
        for key, value in env.items():
            patch.setenv(key, value)
        try:
            load_settings()
        except Exception as exc:
            pytest.fail(f"{where}: {type(exc).__name__}: {exc}")


def assert_runs_a_module(argv: list[str], where: str) -> None:
    """``python -m <module> [module:Class]``: both exist."""
    module, *rest = argv
    assert importlib.util.find_spec(module) is not None, f"{where}: no module {module}"
    for target in rest:
        mod, _, cls = target.partition(":")
        assert hasattr(importlib.import_module(mod), cls), f"{where}: no {target}"


# -- Kubernetes ----------------------------------------------------------------------------


def test_kubernetes_manifests_pass_strict_schema_validation() -> None:
    result = run(tool("kubernetes-validate"), "--strict", *map(str, KUBERNETES))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "passed" in result.stdout and "failed" not in result.stdout


def test_strict_validation_rejects_an_unknown_field(tmp_path: Path) -> None:
    # Shows the check has teeth: one misspelt field in a copy of the coordinator fails.
    docs = list(yaml.safe_load_all((DEPLOY / "kubernetes" / "coordinator.yaml").read_text()))
    broken = copy.deepcopy(docs)
    broken[1]["spec"]["template"]["spec"]["containers"][0]["resource"] = {}
    path = tmp_path / "broken.yaml"
    path.write_text(yaml.safe_dump_all(broken))
    result = run(tool("kubernetes-validate"), "--strict", str(path))
    assert result.returncode != 0, result.stdout
    assert "resource" in result.stdout + result.stderr


def test_the_topology_has_the_documented_shape() -> None:
    kinds = {(d["kind"], d["metadata"]["name"]): d for _, d in k8s_documents()}
    nats = kinds[("StatefulSet", "hivewire-nats")]
    assert nats["spec"]["replicas"] == 3
    config = kinds[("ConfigMap", "hivewire-nats")]["data"]["nats.conf"]
    assert "jetstream" in config and config.count("nats-route://hivewire-nats-") == 3
    assert kinds[("Deployment", "hivewire-coordinator")]["spec"]["replicas"] == 3
    for name in ("model", "tool", "agent-summarizer", "agent-researcher", "agent-calculator"):
        assert ("Deployment", f"hivewire-{name}") in kinds, name
    assert ("StatefulSet", "hivewire-consul") in kinds  # optional/consul.yaml
    coordinator = container_env(
        kinds[("Deployment", "hivewire-coordinator")]["spec"]["template"]["spec"]["containers"][0]
    )
    assert coordinator["HIVEWIRE_COORDINATOR__STORE"] == "jetstream"
    assert coordinator["HIVEWIRE_COORDINATOR__JETSTREAM_REPLICAS"] == "3"
    assert shared_env()["HIVEWIRE_EVENTS__STREAM__REPLICAS"] == "3"


def test_kubernetes_containers_have_valid_settings_modules_and_certificates(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    seen = []
    for name, spec, container in hivewire_containers():
        env = container_env(container)
        assert_settings_load(env, monkeypatch, name)
        assert_runs_a_module(container["args"], name)
        identity = env["HIVEWIRE_IDENTITY"]
        assert identity in IDENTITIES, f"{name}: unknown identity {identity}"
        volumes = {v["name"]: v for v in spec["volumes"]}
        mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
        certs = volumes[mounts[env["HIVEWIRE_CERTS_DIR"]]]
        assert certs["secret"]["secretName"] == f"hivewire-tls-{identity}", name
        seen.append(name)
    assert len(seen) == 6, seen


# -- Compose -------------------------------------------------------------------------------


def test_compose_file_passes_the_compose_spec_schema() -> None:
    result = run(tool("check-jsonschema"), "--builtin-schema", "vendor.compose-spec", str(COMPOSE))
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_compose_schema_rejects_an_unknown_service_key(tmp_path: Path) -> None:
    broken = compose()
    broken["services"]["coordinator"]["enviroment"] = {"HIVEWIRE_PORT": "1"}
    path = tmp_path / "docker-compose.yml"
    path.write_text(yaml.safe_dump(broken))
    result = run(tool("check-jsonschema"), "--builtin-schema", "vendor.compose-spec", str(path))
    assert result.returncode != 0, result.stdout


def test_compose_services_have_valid_settings_and_reach_each_other_by_certificate_name(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    services = compose()["services"]
    aliases = {
        alias
        for service in services.values()
        if isinstance(service.get("networks"), dict)
        for net in service["networks"].values()
        for alias in (net or {}).get("aliases", [])
    }
    seen = []
    for name, service in compose_hivewire_services():
        env = {str(k): str(v) for k, v in service["environment"].items()}
        assert_settings_load(env, monkeypatch, name)
        assert_runs_a_module(service["command"], name)
        identity = IDENTITIES[env["HIVEWIRE_IDENTITY"]]
        # The name other containers dial is the one in this identity's certificate.
        cert_host = f"{identity.name}.{identity.role}.{TRUST_DOMAIN}"
        assert env["HIVEWIRE_ADVERTISE_HOST"] == cert_host, name
        assert service["networks"]["mesh"]["aliases"] == [cert_host], name
        for key, value in env.items():
            if key.endswith("_ADDRESS") or key == "HIVEWIRE_NATS_URL":
                host = re.sub(r"^\w+://", "", value).rsplit(":", 1)[0]
                assert host in aliases, f"{name}: {key} names {host}, which nothing answers"
        seen.append(name)
    assert set(seen) == {
        "coordinator",
        "model",
        "tool",
        "agent-summarizer",
        "agent-researcher",
        "agent-calculator",
    }
    assert "consul" in services["consul"]["profiles"]


# -- NATS configurations -------------------------------------------------------------------


def _nats_config_accepted(text: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    """Run ``nats-server -t`` on ``text`` with its paths moved under ``tmp_path``."""
    certs = tmp_path / "certs"
    init_pki(certs)
    auth = tmp_path / "auth"
    out = str(auth / "auth.conf")
    made = run(tool("hivewire"), "certs", "nats-auth", "--dir", str(certs), "--out", out)
    assert made.returncode == 0, made.stderr
    assert "wrote the authorization of 13 identities" in made.stdout
    text = (
        text.replace("/etc/nats/certs", str(certs))
        .replace("/data/jetstream", str(tmp_path / "js"))
        .replace("/var/run/nats", str(tmp_path))
    )
    conf = tmp_path / "nats.conf"
    conf.write_text(text)
    return run(tool("nats-server"), "-t", "-c", str(conf), env={"POD_NAME": "hivewire-nats-0"})


@pytest.mark.parametrize("which", ["compose", "kubernetes"])
def test_nats_configurations_are_accepted_by_nats_server(which: str, tmp_path: Path) -> None:
    if which == "compose":
        text = (DEPLOY / "compose" / "nats.conf").read_text()
    else:
        text = config_map("hivewire-nats")["nats.conf"]
    result = _nats_config_accepted(text, tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "is valid" in result.stdout + result.stderr
    broken = _nats_config_accepted(text + "\nno_such_option: 1\n", tmp_path / "broken")
    assert broken.returncode != 0
