"""The Consul stand-in answers like Consul: wire shapes, error texts, checks, blocking.

These pin the behaviour the Consul backend's tests rely on (REFERENCE.md section 3), so a
green backend test means something. Requests go over real HTTP, with httpx and with
py-consul's asyncio client.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import consul
import consul.aio
import httpx
import pytest

from tests.helpers import eventually
from tests.support.consul_standin import AclToken, ConsulStandin, Timing

pytestmark = pytest.mark.timeout(60)

TIMING = Timing(min_interval=0.1, reap_interval=0.2, deregister_minimum=0.5)


@pytest.fixture
async def standin() -> AsyncIterator[ConsulStandin]:
    async with ConsulStandin(timing=TIMING) as agent:
        yield agent


@pytest.fixture
async def http(standin: ConsulStandin) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=standin.url, timeout=10.0) as client:
        yield client


async def register(
    http: httpx.AsyncClient, body: dict[str, Any], query: str = ""
) -> httpx.Response:
    return await http.put(f"/v1/agent/service/register{query}", json=body)


async def checks(http: httpx.AsyncClient) -> dict[str, Any]:
    response = await http.get("/v1/agent/checks")
    assert response.status_code == 200
    data: dict[str, Any] = response.json()
    return data


# -- decoding and validation -----------------------------------------------------------


async def test_decoding_is_case_insensitive_with_snake_case_aliases(
    http: httpx.AsyncClient,
) -> None:
    body = {
        "name": "web",
        "ID": "web-1",
        "PORT": 8080,
        "address": "127.0.0.1",
        "tags": ["a"],
        "check": {
            "ttl": "10s",
            "checkid": "c1",
            "deregister_critical_service_after": 60_000_000_000,
        },
    }
    response = await register(http, body)
    assert response.status_code == 200, response.text
    found = await checks(http)
    assert found["c1"]["Type"] == "ttl"
    assert found["c1"]["ServiceID"] == "web-1"


@pytest.mark.parametrize(
    ("body", "status", "text"),
    [
        ({"Name": "web", "Bogus": 1}, 400, 'Request decode failed: json: unknown field "Bogus"'),
        ({"ID": "x"}, 400, "Missing service name"),
        ({"Name": "web", "Address": "0.0.0.0"}, 400, "Invalid service address"),
        (
            {"Name": "web", "Port": "80"},
            400,
            "Request decode failed: json: cannot unmarshal string into Go struct field "
            "ServiceDefinition.Port of type int",
        ),
        (
            {"Name": "web", "Check": {"TTL": "abc"}},
            400,
            'Request decode failed: time: invalid duration "abc"',
        ),
        (
            {"Name": "web", "Check": {"TTL": "10s", "Interval": "10s"}},
            400,
            "Invalid check: Interval and TTL cannot both be specified",
        ),
        (
            {"Name": "web", "Check": {"TTL": "10s", "Status": "ok"}},
            400,
            "Status for checks must 'passing', 'warning', 'critical'",
        ),
        ({"Name": "web", "Check": {}}, 400, "Invalid check: TTL must be > 0 for TTL checks"),
        (
            {"Name": "web", "Meta": {"consul-x": "1"}},
            400,
            "Invalid Service Meta: Key prefix 'consul-' is reserved for internal use: consul-x",
        ),
    ],
)
async def test_register_rejects_like_consul(
    http: httpx.AsyncClient, body: dict[str, Any], status: int, text: str
) -> None:
    response = await register(http, body)
    assert (response.status_code, response.text) == (status, text)
    assert response.headers["Content-Type"].startswith("text/plain")


async def test_auto_check_ids_names_and_initial_status(http: httpx.AsyncClient) -> None:
    assert (await register(http, {"Name": "one", "Check": {"TTL": "10s"}})).status_code == 200
    two = {"Name": "two", "Checks": [{"TTL": "10s"}, {"TTL": "10s", "Status": "passing"}]}
    assert (await register(http, two)).status_code == 200
    found = await checks(http)
    assert found["service:one"]["Name"] == "Service 'one' check"
    assert found["service:one"]["Status"] == "critical"
    assert found["service:two:1"]["Status"] == "critical"
    assert found["service:two:2"]["Status"] == "passing"


async def test_reregistering_keeps_check_status_and_replace_drops_missing_checks(
    http: httpx.AsyncClient,
) -> None:
    body = {
        "Name": "web",
        "ID": "web-1",
        "Checks": [{"CheckID": "a", "TTL": "30s"}, {"CheckID": "b", "TTL": "30s"}],
    }
    assert (await register(http, body)).status_code == 200
    assert (await http.put("/v1/agent/check/pass/a?note=fine")).status_code == 200
    assert (await register(http, body)).status_code == 200
    found = await checks(http)
    assert (found["a"]["Status"], found["a"]["Output"]) == ("passing", "fine")
    only_a = {**body, "Checks": [{"CheckID": "a", "TTL": "30s"}]}
    assert (await register(http, only_a)).status_code == 200
    assert set(await checks(http)) == {"serfHealth", "a", "b"}
    assert (await register(http, only_a, "?replace-existing-checks=true")).status_code == 200
    assert set(await checks(http)) == {"serfHealth", "a"}


async def test_deregister_and_check_endpoints_error_texts(http: httpx.AsyncClient) -> None:
    response = await http.put("/v1/agent/service/deregister/nope")
    assert response.status_code == 404
    assert response.text == (
        'Unknown service ID "nope". Ensure that the service ID is passed, not the service name.'
    )
    response = await http.put("/v1/agent/check/pass/nope")
    assert response.status_code == 404
    assert response.text == (
        'Unknown check ID "nope". Ensure that the check ID is passed, not the check name.'
    )
    body = {"Name": "web", "Check": {"CheckID": "tcp", "TCP": "127.0.0.1:1", "Interval": "10s"}}
    assert (await register(http, body)).status_code == 200
    response = await http.put("/v1/agent/check/pass/tcp")
    assert (response.status_code, response.text) == (
        500,
        'CheckID "tcp" does not have associated TTL',
    )
    assert (await register(http, {"Name": "w", "Check": {"CheckID": "t", "TTL": "9s"}})).is_success
    response = await http.put("/v1/agent/check/update/t", json={"Status": "bogus"})
    assert (response.status_code, response.text) == (400, "Invalid check status: 'bogus'")
    response = await http.put("/v1/agent/check/update/t", json={"Status": "warning", "Output": "x"})
    assert response.status_code == 200
    assert (await checks(http))["t"]["Status"] == "warning"


async def test_routing_errors(http: httpx.AsyncClient) -> None:
    response = await http.get("/v1/agent/service/register")
    assert response.status_code == 405
    assert response.headers["Allow"] == "PUT"
    response = await http.get("/v1/nothing/here")
    assert (response.status_code, response.text) == (
        404,
        "Invalid URL path: not a recognized HTTP API endpoint",
    )


# -- check runners ---------------------------------------------------------------------


async def test_ttl_expiry_output_and_truncation(
    standin: ConsulStandin, http: httpx.AsyncClient
) -> None:
    body = {"Name": "web", "Check": {"CheckID": "t", "TTL": "300ms", "Status": "passing"}}
    assert (await register(http, body)).status_code == 200
    assert (await http.put("/v1/agent/check/pass/t", params={"note": "last words"})).is_success
    await standin.wait_for(lambda s: s.check_status("t") == "critical", within=10)
    assert standin.check_output("t") == (
        "TTL expired (last output before timeout follows): last words"
    )
    long_note = "x" * 5000
    assert (await http.put("/v1/agent/check/warn/t", params={"note": long_note})).is_success
    assert standin.check_output("t") == f"{'x' * 4096} ... (captured 4096 of 5000 bytes)"


async def test_tcp_check_runs_for_real(standin: ConsulStandin, http: httpx.AsyncClient) -> None:
    server = await asyncio.start_server(lambda r, w: w.close(), "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    body = {"Name": "web", "Check": {"CheckID": "c", "TCP": f"127.0.0.1:{port}", "Interval": "1s"}}
    try:
        assert (await register(http, body)).status_code == 200
        await standin.wait_for(lambda s: s.check_status("c") == "passing", within=10)
    finally:
        server.close()
        await server.wait_closed()
    await standin.wait_for(lambda s: s.check_status("c") == "critical", within=10)


async def test_reaper_honours_deregister_critical_service_after(
    standin: ConsulStandin, http: httpx.AsyncClient
) -> None:
    body = {
        "Name": "web",
        "ID": "web-1",
        "Check": {"TTL": "10s", "DeregisterCriticalServiceAfter": "100ms"},
    }
    assert (await register(http, body)).status_code == 200
    keep = {"Name": "web", "ID": "web-2", "Check": {"TTL": "10s"}}  # critical, no reaping
    assert (await register(http, keep)).status_code == 200
    # Raised to the (shrunk) one-minute minimum, then removed by the next reaper pass.
    await standin.wait_for(lambda s: s.service_ids("web") == ["web-2"], within=10)


# -- reads -----------------------------------------------------------------------------


async def test_health_service_passing_tags_filter_and_headers(
    standin: ConsulStandin, http: httpx.AsyncClient
) -> None:
    response = await http.get("/v1/health/service/nothing")
    assert response.json() == []
    assert int(response.headers["X-Consul-Index"]) >= 1
    assert response.headers["X-Consul-KnownLeader"] == "true"
    for sid, tags, status in (
        ("w1", ["a", "b"], "passing"),
        ("w2", ["a"], "warning"),
        ("w3", [], "passing"),
    ):
        body = {"Name": "web", "ID": sid, "Tags": tags, "Check": {"TTL": "30s", "Status": status}}
        assert (await register(http, body)).status_code == 200

    async def ids(query: str) -> list[str]:
        response = await http.get(f"/v1/health/service/web{query}")
        assert response.status_code == 200, response.text
        return sorted(e["Service"]["ID"] for e in response.json())

    assert await ids("") == ["w1", "w2", "w3"]
    assert await ids("?passing") == ["w1", "w3"]  # warning is not passing
    assert await ids("?passing=false") == ["w1", "w2", "w3"]
    assert await ids("?tag=a") == ["w1", "w2"]
    assert await ids("?tag=a&tag=b") == ["w1"]
    assert await ids('?filter=Service.Tags contains "b"') == ["w1"]
    assert await ids('?filter=Checks.Status == "warning"') == ["w2"]
    assert await ids('?filter=Service.ID != "w1" and Service.Tags is empty') == ["w3"]
    response = await http.get("/v1/health/service/web?passing=maybe")
    assert (response.status_code, response.text) == (400, "Invalid value for ?passing")
    response = await http.get("/v1/health/service/web", params={"filter": "Service.ID ==="})
    assert response.status_code == 400
    entry = (await http.get("/v1/health/service/web?tag=b")).json()[0]
    assert entry["Service"]["Tags"] == ["a", "b"]
    assert [c["CheckID"] for c in entry["Checks"]] == ["serfHealth", "service:w1"]
    standin.set_serf_health("critical")
    assert await ids("?passing") == []


async def test_catalog_services_and_agent_health_by_id(http: httpx.AsyncClient) -> None:
    for sid, status in (("p", "passing"), ("w", "warning"), ("c", "critical")):
        body = {
            "Name": f"svc-{sid}",
            "ID": sid,
            "Tags": [sid],
            "Check": {"TTL": "30s", "Status": status},
        }
        assert (await register(http, body)).status_code == 200
    response = await http.get("/v1/catalog/services")
    assert response.json() == {"consul": [], "svc-p": ["p"], "svc-w": ["w"], "svc-c": ["c"]}
    assert int(response.headers["X-Consul-Index"]) >= 1
    codes = {}
    for sid in ("p", "w", "c", "missing"):
        codes[sid] = (await http.get(f"/v1/agent/health/service/id/{sid}?format=text")).status_code
    assert codes == {"p": 200, "w": 429, "c": 503, "missing": 404}
    assert (await http.get("/v1/agent/health/service/id/w?format=text")).text == "warning"


# -- blocking queries ------------------------------------------------------------------


async def test_blocking_query_waits_for_a_change(
    standin: ConsulStandin, http: httpx.AsyncClient
) -> None:
    body = {"Name": "web", "ID": "w1", "Check": {"TTL": "30s", "Status": "passing"}}
    assert (await register(http, body)).status_code == 200
    first = await http.get("/v1/health/service/web")
    index = int(first.headers["X-Consul-Index"])
    pending = asyncio.create_task(http.get(f"/v1/health/service/web?index={index}&wait=30s"))
    await eventually(lambda: len(standin._long_polls) == 1)
    assert not pending.done()
    assert (await register(http, {**body, "ID": "w2"})).status_code == 200
    response = await asyncio.wait_for(pending, 10)
    assert int(response.headers["X-Consul-Index"]) > index
    assert sorted(e["Service"]["ID"] for e in response.json()) == ["w1", "w2"]
    # No change: it returns at the end of the wait with the same index.
    index = int(response.headers["X-Consul-Index"])
    quiet = await http.get(f"/v1/health/service/web?index={index}&wait=200ms")
    assert int(quiet.headers["X-Consul-Index"]) == index
    # A TTL pass that changes nothing wakes nobody: the index does not move.
    assert (await http.put("/v1/agent/check/pass/service:w1")).is_success
    again = await http.get("/v1/health/service/web")
    assert int(again.headers["X-Consul-Index"]) == index


@pytest.mark.parametrize(
    ("query", "text"),
    [("index=abc", "Invalid index"), ("index=5&wait=forever", "Invalid wait time")],
)
async def test_blocking_parameter_errors(http: httpx.AsyncClient, query: str, text: str) -> None:
    response = await http.get(f"/v1/health/service/web?{query}")
    assert (response.status_code, response.text) == (400, text)


# -- ACL -------------------------------------------------------------------------------


async def test_acl_texts_and_bearer_tokens() -> None:
    token = AclToken(
        "s3cret", service_prefix={"web": "write"}, node_prefix={"": "read"}, accessor="acc-1"
    )
    async with (
        ConsulStandin(timing=TIMING, acl_default_policy="deny", acl_tokens=[token]) as agent,
        httpx.AsyncClient(base_url=agent.url) as http,
    ):
        body = {"Name": "web", "Check": {"TTL": "30s"}}
        response = await register(http, body)
        assert response.status_code == 403
        assert response.text.startswith(
            "Permission denied: anonymous token lacks permission 'service:write' on \"web\""
        )
        response = await http.put(
            "/v1/agent/service/register", json=body, headers={"X-Consul-Token": "x"}
        )
        assert (response.status_code, response.text) == (403, "ACL not found")
        other = {"Name": "db", "Check": {"TTL": "30s"}}
        response = await http.put(
            "/v1/agent/service/register", json=other, headers={"Authorization": "Bearer s3cret"}
        )
        assert response.status_code == 403
        assert response.text == (
            "Permission denied: token with AccessorID 'acc-1' lacks permission 'service:write' "
            'on "db"'
        )
        response = await http.put(
            "/v1/agent/service/register", json=body, headers={"Authorization": "Bearer s3cret"}
        )
        assert response.status_code == 200
        read = await http.get("/v1/health/service/web", headers={"X-Consul-Token": "s3cret"})
        assert read.headers["X-Consul-Default-Acl-Policy"] == "deny"
        assert [e["Service"]["ID"] for e in read.json()] == ["web"]
        hidden = await http.get("/v1/health/service/web")
        assert hidden.json() == []
        assert hidden.headers["X-Consul-Results-Filtered-By-ACLs"] == "true"


# -- py-consul against the stand-in ----------------------------------------------------


async def test_py_consul_grpc_check_payload_is_accepted(standin: ConsulStandin) -> None:
    check = consul.Check.grpc(
        "127.0.0.1:1/svc", "5s", use_tls=True, tls_skip_verify=False, timeout="2s", deregister="1m"
    )
    check["TLSServerName"] = "agent.hivewire.local"
    check["CheckID"] = "grpc:a-1"
    client = consul.aio.Consul(host=standin.host, port=standin.port)
    try:
        assert await client.agent.service.register(
            "agent",
            service_id="a-1",
            address="127.0.0.1",
            port=1,
            check=check,
            extra_checks=[consul.Check.ttl("15s")],
        )
        definition = standin.check_definition("grpc:a-1")
        assert definition is not None
        assert definition["TLSServerName"] == "agent.hivewire.local"
        assert definition["GRPCUseTLS"] is True
        assert definition["Timeout"] == 2_000_000_000
        # extra_checks shift the automatic IDs: the TTL check is the second of two.
        assert standin.check_status("service:a-1:2") == "critical"
        index, entries = await client.health.service("agent")
        assert int(index) >= 1 and entries[0]["Service"]["ID"] == "a-1"
        assert await client.agent.service.deregister("missing") is False
    finally:
        await client.close()
