"""The registry contract's value types, URL parsing, pacing helpers and static backend."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from hivewire.discovery import (
    META_INSTANCE_NAME,
    Instance,
    Registry,
    instance_name,
    new_instance_id,
    open_registry,
    parse_duration,
)
from hivewire.discovery.consul import ConsulRegistry, go_duration
from hivewire.discovery.embedded import EmbeddedRegistry
from hivewire.discovery.registry import is_replaced_by
from hivewire.discovery.static import StaticRegistry
from hivewire.services.base.backoff import Backoff, TokenBucket


def make(**overrides: object) -> Instance:
    fields: dict[str, object] = {
        "service": "hivewire-agent",
        "instance_id": "planner-0a1b2c3d",
        "address": "127.0.0.1",
        "port": 50051,
        "tags": ("plan",),
        "meta": {"version": "1.0.0"},
    }
    fields.update(overrides)
    return Instance(**fields)  # type: ignore[arg-type]


# -- Instance --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides",
    [
        {"service": "has.dot"},
        {"service": ""},
        {"instance_id": "a/b"},
        {"instance_id": "a.b"},
        {"address": ""},
        {"address": "0.0.0.0"},
        {"port": 0},
        {"port": 70000},
        {"tags": ("",)},
        {"meta": {"bad key": "x"}},
        {"meta": {"consul-owned": "x"}},
        {"meta": {"k": "x" * 513}},
        {"meta": {f"k{i}": "v" for i in range(65)}},
    ],
)
def test_invalid_instances_are_rejected(overrides: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        make(**overrides)


def test_instances_are_frozen_hashable_and_compare_by_value() -> None:
    a = make(tags=["plan"], meta={"version": "1.0.0"})
    b = make()
    assert a == b and hash(a) == hash(b)
    assert a.tags == ("plan",)
    assert len({a, b, make(port=1)}) == 2
    with pytest.raises(TypeError):
        a.meta["version"] = "2"  # type: ignore[index]
    assert a != make(healthy=False)


def test_json_round_trip_and_malformed_input() -> None:
    a = make()
    assert Instance.from_json(json.loads(json.dumps(a.to_json()))) == a
    with pytest.raises(ValueError):
        Instance.from_json({"service": "x"})
    with pytest.raises(ValueError):
        Instance.from_json({**a.to_json(), "port": "80"})


def test_endpoint_brackets_ipv6() -> None:
    assert make().endpoint == "127.0.0.1:50051"
    assert make(address="::1").endpoint == "[::1]:50051"


def test_instance_names_and_replacement_rule() -> None:
    iid = new_instance_id("planner")
    assert iid.startswith("planner-") and len(iid) == len("planner-") + 8
    assert new_instance_id("planner") != iid
    old = make(instance_id=new_instance_id("planner"))
    new = make(instance_id=new_instance_id("planner"))
    assert instance_name(old) == "planner"
    assert instance_name(make(instance_id="fixed")) == "fixed"
    assert instance_name(make(meta={META_INSTANCE_NAME: "named"})) == "named"
    assert is_replaced_by(old, new)
    assert not is_replaced_by(old, old)
    assert not is_replaced_by(old, make(instance_id=new_instance_id("other")))
    assert not is_replaced_by(old, make(instance_id=new.instance_id, address="10.0.0.2"))
    assert not is_replaced_by(old, make(instance_id=new.instance_id, service="hivewire-tool"))
    # A replica on another port is not a restart; an explicit stable name follows the port.
    assert not is_replaced_by(old, make(instance_id=new.instance_id, port=50052))
    named = {META_INSTANCE_NAME: "planner"}
    assert is_replaced_by(
        make(meta=named), make(instance_id=new.instance_id, port=50052, meta=named)
    )
    assert not is_replaced_by(old, make(instance_id=new.instance_id, port=50052, meta=named))


# -- open_registry ---------------------------------------------------------------------


def test_open_registry_chooses_the_backend_from_the_url(tmp_path: Path) -> None:
    embedded = open_registry("nats", nats_url="nats://127.0.0.1:4222")
    assert isinstance(embedded, EmbeddedRegistry) and isinstance(embedded, Registry)
    other = open_registry("nats://10.0.0.1:4222?bucket=reg&ttl=5s", nats_url="unused")
    assert isinstance(other, EmbeddedRegistry) and other.ttl == 5.0
    shared = open_registry("nats?ttl=3s", nats_url="nats://127.0.0.1:4222")
    assert isinstance(shared, EmbeddedRegistry) and shared.ttl == 3.0
    consul = open_registry(
        "consul://consul.local:8501?checks=ttl,grpc&ttl=20s&deregister_after=2m",
        nats_url="",
        consul_token="t",
    )
    assert isinstance(consul, ConsulRegistry) and consul.address == "http://consul.local:8501"
    https = open_registry("consul+https://c:8501", nats_url="")
    assert isinstance(https, ConsulRegistry) and https.address == "https://c:8501"
    assert isinstance(open_registry("static", nats_url=""), StaticRegistry)
    listing = tmp_path / "instances.json"
    listing.write_text(json.dumps([make().to_json()]))
    assert isinstance(open_registry(f"static:{listing}", nats_url=""), StaticRegistry)


@pytest.mark.parametrize(
    "url",
    [
        "etcd://x",
        "consul://h:1?colour=blue",
        "consul://h:1?checks=http",
        "nats://h:1?wait=1s",
        "nats?checks=ttl",
    ],
)
def test_open_registry_rejects_unknown_schemes_and_options(url: str) -> None:
    with pytest.raises(ValueError):
        open_registry(url, nats_url="")


def test_consul_wait_must_stay_under_the_http_client_timeout() -> None:
    with pytest.raises(ValueError, match="300"):
        ConsulRegistry(watch_wait=290.0)


@pytest.mark.parametrize(
    ("text", "seconds"), [("15s", 15.0), ("500ms", 0.5), ("1m", 60.0), ("2", 2.0), (3, 3.0)]
)
def test_parse_duration(text: str | int, seconds: float) -> None:
    assert parse_duration(text) == seconds


def test_go_duration() -> None:
    assert go_duration(15) == "15s"
    assert go_duration(0.25) == "250ms"
    assert go_duration(60.0) == "60s"
    with pytest.raises(ValueError):
        go_duration(0)


# -- pacing ----------------------------------------------------------------------------


def test_backoff_grows_to_its_cap_and_resets() -> None:
    backoff = Backoff(initial=1.0, maximum=8.0)
    delays = [backoff.next_delay() for _ in range(8)]
    assert 0.5 <= delays[0] <= 1.0
    assert all(d <= 8.0 for d in delays) and delays[-1] >= 4.0
    backoff.reset()
    assert backoff.next_delay() <= 1.0


async def test_token_bucket_allows_a_burst_then_paces() -> None:
    bucket = TokenBucket(burst=2, interval=3600.0)
    await bucket.acquire()
    await bucket.acquire()
    # The third call has to wait for a token earned back over the interval.
    assert bucket.delay() > 3000.0
    unlimited = TokenBucket(burst=1, interval=0.0)
    for _ in range(5):
        await unlimited.acquire()
    with pytest.raises(ValueError):
        TokenBucket(burst=0)


# -- static backend --------------------------------------------------------------------


async def test_static_registry_resolves_watches_and_ends_on_close() -> None:
    fixed = make(instance_id="fixed-1", tags=("plan",))
    async with StaticRegistry([fixed]) as registry:
        extra = make(instance_id="extra-1", tags=("summarize",))
        assert await registry.resolve("hivewire-agent") == [fixed]
        watch = registry.watch("hivewire-agent")
        assert await anext(watch) == [fixed]
        await registry.register(extra)
        assert await anext(watch) == [extra, fixed]
        assert await registry.resolve("hivewire-agent", tag="summarize") == [extra]
        await registry.set_healthy("extra-1", False)
        assert await anext(watch) == [fixed]
        with pytest.raises(KeyError):
            await registry.set_healthy("fixed-1", False)  # not registered by this process
        pending = asyncio.ensure_future(anext(watch))
        await registry.close()
        with pytest.raises(StopAsyncIteration):
            await asyncio.wait_for(pending, 5)
