"""Go-flavoured decoding for the Consul stand-in.

Consul decodes request bodies with Go's ``encoding/json`` plus ``DisallowUnknownFields``:
object keys match struct fields case-insensitively, a few snake_case aliases are
translated first, an unknown key is a 400, and durations are Go duration strings or
integer nanoseconds. This module reproduces that for the structs the stand-in accepts,
together with ``time.ParseDuration`` and ``strconv.ParseBool``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "CHECK_TYPE",
    "CHECK_UPDATE",
    "DecodeError",
    "SERVICE_DEFINITION",
    "Struct",
    "decode",
    "format_go_duration",
    "parse_bool",
    "parse_go_duration",
]


class DecodeError(ValueError):
    """A body that Consul would answer with 400 ``Request decode failed: <message>``."""


# -- time.ParseDuration ----------------------------------------------------------------

_UNIT_NS = {
    "ns": 1,
    "us": 1_000,
    "\u00b5s": 1_000,  # micro sign
    "\u03bcs": 1_000,  # Greek mu
    "ms": 1_000_000,
    "s": 1_000_000_000,
    "m": 60 * 1_000_000_000,
    "h": 3600 * 1_000_000_000,
}
_PART = re.compile(r"(\d*)(?:\.(\d*))?([^\d.]*)")


def parse_go_duration(text: str) -> int:
    """Parse a Go duration string into nanoseconds, like ``time.ParseDuration``.

    Raises:
        ValueError: With Go's message (``time: invalid duration "x"`` ...).
    """
    original = text
    if not text:
        raise ValueError(f'time: invalid duration "{original}"')
    sign = 1
    if text[0] in "+-":
        sign = -1 if text[0] == "-" else 1
        text = text[1:]
    if text == "0":
        return 0
    if not text:
        raise ValueError(f'time: invalid duration "{original}"')
    total = 0.0
    while text:
        match = _PART.match(text)
        if match is None or match.end() == 0:
            raise ValueError(f'time: invalid duration "{original}"')
        whole, frac, unit = match.group(1), match.group(2), match.group(3)
        if not whole and not frac:
            raise ValueError(f'time: invalid duration "{original}"')
        if not unit:
            raise ValueError(f'time: missing unit in duration "{original}"')
        # The unit runs until the next digit or dot.
        if unit not in _UNIT_NS:
            raise ValueError(f'time: unknown unit "{unit}" in duration "{original}"')
        value = float(f"{whole or '0'}.{frac or '0'}")
        total += value * _UNIT_NS[unit]
        text = text[match.end() :]
    if total > 2**63 - 1:
        raise ValueError(f'time: invalid duration "{original}"')
    return sign * int(total)


def format_go_duration(nanoseconds: int) -> str:
    """Format nanoseconds like Go's ``Duration.String`` (``"1m30s"``, ``"250ms"``)."""
    if nanoseconds == 0:
        return "0s"
    sign = "-" if nanoseconds < 0 else ""
    ns = abs(nanoseconds)
    if ns < 1_000:
        return f"{sign}{ns}ns"
    if ns < 1_000_000:
        return f"{sign}{_trim(ns / 1_000)}\u00b5s"
    if ns < 1_000_000_000:
        return f"{sign}{_trim(ns / 1_000_000)}ms"
    hours, rest = divmod(ns, 3600 * 1_000_000_000)
    minutes, rest = divmod(rest, 60 * 1_000_000_000)
    seconds = _trim(rest / 1_000_000_000)
    out = sign
    if hours:
        out += f"{hours}h"
    if hours or minutes:
        out += f"{minutes}m"
    return f"{out}{seconds}s"


def _trim(value: float) -> str:
    text = f"{value:.9f}".rstrip("0").rstrip(".")
    return text or "0"


# -- strconv.ParseBool -----------------------------------------------------------------

_TRUE = {"1", "t", "T", "TRUE", "true", "True"}
_FALSE = {"0", "f", "F", "FALSE", "false", "False"}


def parse_bool(text: str) -> bool:
    """``strconv.ParseBool``.

    Raises:
        ValueError: Not one of Go's accepted spellings.
    """
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise ValueError(f'strconv.ParseBool: parsing "{text}": invalid syntax')


# -- struct decoding -------------------------------------------------------------------


@dataclass(frozen=True)
class Struct:
    """A Go struct as the decoder sees it.

    Attributes:
        name: Go type name, for error messages.
        fields: Canonical field name -> kind (``str``, ``int``, ``bool``, ``duration``,
            ``list[str]``, ``map[str]str``, ``map[str]list[str]``, ``any``, a
            :class:`Struct`, or ``("list", Struct)``).
        aliases: Extra spellings (snake_case) -> canonical name.
        ignored: Canonical fields that are accepted but dropped.
    """

    name: str
    fields: dict[str, Any]
    aliases: dict[str, str] = field(default_factory=dict)
    ignored: frozenset[str] = frozenset()

    def lookup(self) -> dict[str, str]:
        table = {name.lower(): name for name in self.fields}
        table.update({alias.lower(): name for alias, name in self.aliases.items()})
        return table


CHECK_TYPE = Struct(
    "CheckType",
    {
        "CheckID": "str",
        "Name": "str",
        "Status": "str",
        "Notes": "str",
        "ScriptArgs": "list[str]",
        "HTTP": "str",
        "Header": "map[str]list[str]",
        "Method": "str",
        "Body": "str",
        "DisableRedirects": "bool",
        "TCP": "str",
        "TCPUseTLS": "bool",
        "UDP": "str",
        "Interval": "duration",
        "AliasNode": "str",
        "AliasService": "str",
        "DockerContainerID": "str",
        "Shell": "str",
        "GRPC": "str",
        "GRPCUseTLS": "bool",
        "H2PING": "str",
        "H2PingUseTLS": "bool",
        "TLSServerName": "str",
        "TLSSkipVerify": "bool",
        "Timeout": "duration",
        "TTL": "duration",
        "SuccessBeforePassing": "int",
        "FailuresBeforeWarning": "int",
        "FailuresBeforeCritical": "int",
        "ProxyHTTP": "str",
        "ProxyGRPC": "str",
        "DeregisterCriticalServiceAfter": "duration",
        "OutputMaxSize": "int",
        "OSService": "str",
        "ServiceID": "str",
    },
    aliases={
        "args": "ScriptArgs",
        "script_args": "ScriptArgs",
        "deregister_critical_service_after": "DeregisterCriticalServiceAfter",
        "docker_container_id": "DockerContainerID",
        "tls_server_name": "TLSServerName",
        "tls_skip_verify": "TLSSkipVerify",
        "grpc_use_tls": "GRPCUseTLS",
        "h2ping_use_tls": "H2PingUseTLS",
        "service_id": "ServiceID",
    },
    # A service's checks always belong to that service.
    ignored=frozenset({"ServiceID"}),
)

WEIGHTS = Struct("Weights", {"Passing": "int", "Warning": "int"})

SERVICE_DEFINITION = Struct(
    "ServiceDefinition",
    {
        "Kind": "str",
        "ID": "str",
        "Name": "str",
        "Tags": "list[str]",
        "Address": "str",
        "TaggedAddresses": "any",
        "Meta": "map[str]str",
        "Port": "int",
        "SocketPath": "str",
        "Check": CHECK_TYPE,
        "Checks": ("list", CHECK_TYPE),
        "Weights": WEIGHTS,
        "Token": "str",
        "EnableTagOverride": "bool",
        "Proxy": "any",
        "Connect": "any",
        "Locality": "any",
        "Namespace": "str",
        "Partition": "str",
    },
    aliases={
        "enable_tag_override": "EnableTagOverride",
        "tagged_addresses": "TaggedAddresses",
        "socket_path": "SocketPath",
    },
    ignored=frozenset({"TaggedAddresses", "Proxy", "Connect", "Locality"}),
)

CHECK_UPDATE = Struct("checkUpdate", {"Status": "str", "Output": "str"})

_GO_TYPES = {
    "str": "string",
    "int": "int",
    "bool": "bool",
    "duration": "time.Duration",
    "list[str]": "[]string",
    "map[str]str": "map[string]string",
    "map[str]list[str]": "map[string][]string",
}


def _json_kind(value: Any) -> str:
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    if isinstance(value, dict):
        return "object"
    return "null"


def _mismatch(value: Any, struct: Struct, name: str, kind: Any) -> DecodeError:
    go = _GO_TYPES.get(kind, kind.name if isinstance(kind, Struct) else "[]structs.CheckType")
    return DecodeError(
        f"json: cannot unmarshal {_json_kind(value)} into Go struct field "
        f"{struct.name}.{name} of type {go}"
    )


def _decode_value(value: Any, kind: Any, struct: Struct, name: str) -> Any:
    if value is None:
        return None  # JSON null leaves the Go zero value
    if isinstance(kind, Struct):
        if not isinstance(value, dict):
            raise _mismatch(value, struct, name, kind)
        return decode(value, kind)
    if isinstance(kind, tuple):
        if not isinstance(value, list):
            raise _mismatch(value, struct, name, kind)
        return [_decode_value(item, kind[1], struct, name) for item in value]
    if kind == "any":
        return value
    if kind == "str":
        if not isinstance(value, str):
            raise _mismatch(value, struct, name, kind)
        return value
    if kind == "bool":
        if not isinstance(value, bool):
            raise _mismatch(value, struct, name, kind)
        return value
    if kind == "int":
        if isinstance(value, bool) or not isinstance(value, int | float) or value != int(value):
            raise _mismatch(value, struct, name, kind)
        return int(value)
    if kind == "duration":
        if isinstance(value, str):
            try:
                return parse_go_duration(value)
            except ValueError as exc:
                raise DecodeError(str(exc)) from None
        if isinstance(value, int | float) and not isinstance(value, bool):
            return int(value)
        raise _mismatch(value, struct, name, kind)
    if kind == "list[str]":
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise _mismatch(value, struct, name, kind)
        return list(value)
    if kind == "map[str]str":
        if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
            raise _mismatch(value, struct, name, kind)
        return dict(value)
    if kind == "map[str]list[str]":
        if not isinstance(value, dict):
            raise _mismatch(value, struct, name, kind)
        return {k: list(v) for k, v in value.items()}
    raise AssertionError(f"unknown kind {kind!r}")


def decode(body: dict[str, Any], struct: Struct) -> dict[str, Any]:
    """Decode a JSON object into ``{canonical field: value}`` like Consul does.

    Raises:
        DecodeError: Unknown key or type mismatch, with Go's message.
    """
    table = struct.lookup()
    out: dict[str, Any] = {}
    for key, value in body.items():
        name = table.get(key.lower())
        if name is None:
            raise DecodeError(f'json: unknown field "{key}"')
        decoded = _decode_value(value, struct.fields[name], struct, name)
        if name in struct.ignored or decoded is None:
            continue
        out[name] = decoded
    return out
