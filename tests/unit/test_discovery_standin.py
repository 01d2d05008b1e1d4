"""The Consul stand-in's Go-flavoured decoding and its go-bexpr subset."""

from __future__ import annotations

from typing import Any

import pytest

from tests.support.consul_standin.bexpr import FilterError, compile_filter
from tests.support.consul_standin.godecode import (
    CHECK_TYPE,
    SERVICE_DEFINITION,
    DecodeError,
    decode,
    format_go_duration,
    parse_bool,
    parse_go_duration,
)

S = 1_000_000_000


@pytest.mark.parametrize(
    ("text", "ns"),
    [
        ("0", 0),
        ("10s", 10 * S),
        ("1m30s", 90 * S),
        ("1.5h", 5400 * S),
        ("250ms", S // 4),
        ("3us", 3_000),
        ("3\u00b5s", 3_000),
        ("-2s", -2 * S),
        (".5s", S // 2),
    ],
)
def test_parse_go_duration(text: str, ns: int) -> None:
    assert parse_go_duration(text) == ns


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", 'time: invalid duration ""'),
        ("10", 'time: missing unit in duration "10"'),
        ("10x", 'time: unknown unit "x" in duration "10x"'),
        ("abc", 'time: invalid duration "abc"'),
        (".s", 'time: invalid duration ".s"'),
    ],
)
def test_parse_go_duration_errors(text: str, message: str) -> None:
    with pytest.raises(ValueError) as info:
        parse_go_duration(text)
    assert str(info.value) == message


def test_format_go_duration() -> None:
    assert format_go_duration(90 * S) == "1m30s"
    assert format_go_duration(S // 4) == "250ms"
    assert format_go_duration(2 * S) == "2s"
    assert format_go_duration(3600 * S) == "1h0m0s"


def test_parse_bool_accepts_go_spellings_only() -> None:
    assert parse_bool("T") and parse_bool("true") and parse_bool("1")
    assert not parse_bool("F") and not parse_bool("False") and not parse_bool("0")
    with pytest.raises(ValueError):
        parse_bool("yes")


def test_decode_matches_keys_case_insensitively_and_translates_aliases() -> None:
    body: dict[str, Any] = {
        "name": "web",
        "PORT": 80,
        "enable_tag_override": True,
        "checks": [{"grpc": "h:1", "interval": "5s", "grpc_use_tls": True, "tls_server_name": "x"}],
    }
    out = decode(body, SERVICE_DEFINITION)
    assert out["Name"] == "web" and out["Port"] == 80 and out["EnableTagOverride"] is True
    (check,) = out["Checks"]
    assert check == {"GRPC": "h:1", "Interval": 5 * S, "GRPCUseTLS": True, "TLSServerName": "x"}


def test_decode_rejects_unknown_keys_and_wrong_types() -> None:
    with pytest.raises(DecodeError, match='json: unknown field "Nmae"'):
        decode({"Nmae": "web"}, SERVICE_DEFINITION)
    with pytest.raises(DecodeError, match='unknown field "id"'):
        decode({"id": "c1", "ttl": "1s"}, CHECK_TYPE)
    with pytest.raises(DecodeError, match="cannot unmarshal string into Go struct field"):
        decode({"TTL": "1s", "SuccessBeforePassing": "2"}, CHECK_TYPE)
    assert decode({"TTL": 1500}, CHECK_TYPE) == {"TTL": 1500}
    assert decode({"ServiceID": "ignored", "TTL": "1s"}, CHECK_TYPE) == {"TTL": S}


ENTRY = {
    "Node": {"Node": "n1", "Meta": {"zone": "a"}},
    "Service": {"ID": "w1", "Tags": ["plan", "sum"], "Port": 8080, "Meta": {"version": "1.2.0"}},
    "Checks": [{"Status": "passing"}, {"Status": "warning"}],
}


@pytest.mark.parametrize(
    ("expression", "expected"),
    [
        ('Service.ID == "w1"', True),
        ('Service.ID != "w1"', False),
        ('Service.Tags contains "plan"', True),
        ('Service.Tags not contains "plan"', False),
        ('"sum" in Service.Tags', True),
        ('"x" not in Service.Tags', True),
        ('Service.Meta.version == "1.2.0"', True),
        ('Service.Meta["version"] == `1.2.0`', True),
        ('Service.Port == "8080"', True),
        ('Checks.Status == "warning"', True),
        ('Service.ID matches "^w[0-9]$"', True),
        ('Service.ID not matches "^x"', True),
        ("Service.Meta is empty", False),
        ("Service.Missing is empty", True),
        ("Service.Tags is not empty", True),
        ('Service.ID == "w2" or (Node.Meta.zone == "a" and not Service.Port == "1")', True),
        ('"ser" in Service.ID', False),
    ],
)
def test_filter_subset(expression: str, expected: bool) -> None:
    assert compile_filter(expression)(ENTRY) is expected


@pytest.mark.parametrize(
    "expression",
    ["", "Service.ID ===", 'Service.ID ~= "x"', "(Service.ID", 'Service.ID matches "("', "and"],
)
def test_filter_rejects_what_it_does_not_support(expression: str) -> None:
    with pytest.raises(FilterError):
        compile_filter(expression)
