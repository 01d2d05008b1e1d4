"""JSON Schema checks of tool arguments, and size caps on results.

Arguments are validated against the tool's input schema before it runs (draft 2020-12,
or whatever draft the schema's ``$schema`` names); every failure becomes a field
violation whose path starts at ``arguments`` (``arguments.items[2].name``), so callers
and models can see which value to fix.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import jsonschema
from jsonschema import exceptions as jsonschema_exceptions
from jsonschema.protocols import Validator

from hivewire.services.runtime.errors import FieldViolation

logger = logging.getLogger(__name__)

ROOT = "arguments"
"""Path prefix of argument violations: the request field that holds them."""

MAX_VIOLATIONS = 20
"""Violations reported per call; a flood of them helps nobody."""


def json_path(parts: Iterable[str | int], root: str = ROOT) -> str:
    """Render a JSON location as ``root.key[3].other``."""
    path = root
    for part in parts:
        if isinstance(part, int):
            path += f"[{part}]"
        elif path:
            path += f".{part}"
        else:
            path = str(part)
    return path


def compile_schema(schema: Mapping[str, Any]) -> Validator:
    """Build a validator for a tool's input schema.

    Args:
        schema: The JSON Schema.

    Returns:
        A validator of the schema's declared draft (2020-12 by default).

    Raises:
        jsonschema.exceptions.SchemaError: The schema itself is invalid.
    """
    cls = jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator)
    cls.check_schema(dict(schema))
    validator: Validator = cls(dict(schema))
    return validator


def _violation(error: jsonschema_exceptions.ValidationError) -> list[FieldViolation]:
    base = list(error.absolute_path)
    instance = error.instance
    if error.validator == "required" and isinstance(instance, Mapping):
        required = error.validator_value if isinstance(error.validator_value, Sequence) else []
        missing = [name for name in required if isinstance(name, str) and name not in instance]
        if missing:
            return [FieldViolation(json_path([*base, name]), "is required") for name in missing]
    if error.validator == "additionalProperties" and isinstance(instance, Mapping):
        schema = error.schema if isinstance(error.schema, Mapping) else {}
        known = set(schema.get("properties", {}) or {})
        patterns = list(schema.get("patternProperties", {}) or {})
        extras = [name for name in instance if name not in known and not patterns]
        if extras:
            return [
                FieldViolation(json_path([*base, name]), "is not an accepted field")
                for name in extras
            ]
    return [FieldViolation(json_path(base), error.message)]


def violations(validator: Validator, arguments: Mapping[str, Any]) -> list[FieldViolation]:
    """Every way ``arguments`` break the schema, as field violations (at most 20).

    Args:
        validator: From :func:`compile_schema`.
        arguments: The call's arguments object.

    Returns:
        Violations ordered by path; empty when the arguments are valid.
    """
    found: list[FieldViolation] = []
    errors = sorted(validator.iter_errors(dict(arguments)), key=lambda e: list(map(str, e.path)))
    for error in errors:
        for violation in _violation(error):
            # jsonschema reports each missing required property with the whole list.
            if violation not in found:
                found.append(violation)
        if len(found) >= MAX_VIOLATIONS:
            break
    return found[:MAX_VIOLATIONS]


# -- result size caps ----------------------------------------------------------------


def json_size(value: Any) -> int:
    """Bytes of ``value`` as compact UTF-8 JSON."""
    return len(json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode("utf-8"))


def _shrink(value: Any, max_string: int, max_items: int) -> Any:
    if isinstance(value, str):
        return value if len(value) <= max_string else value[:max_string] + "…"
    if isinstance(value, Mapping):
        items = list(value.items())[:max_items]
        return {key: _shrink(item, max_string, max_items) for key, item in items}
    if isinstance(value, list):
        return [_shrink(item, max_string, max_items) for item in value[:max_items]]
    return value


def cap_result(result: Mapping[str, Any], max_bytes: int) -> tuple[dict[str, Any], bool]:
    """Cut a result object down to ``max_bytes`` of JSON, keeping its shape.

    Long strings are shortened and long arrays and objects cut, with ever smaller
    limits, until the result fits; what is left is still valid JSON of the same shape,
    which is more useful to a model than a cut text.

    Args:
        result: The tool's result object.
        max_bytes: Size limit of its compact JSON.

    Returns:
        ``(result, truncated)``.
    """
    data = dict(result)
    if json_size(data) <= max_bytes:
        return data, False
    max_string, max_items = max_bytes, 1000
    while max_string > 16 or max_items > 1:
        shrunk = _shrink(data, max_string, max_items)
        if json_size(shrunk) <= max_bytes:
            return shrunk, True
        max_string = max(max_string // 2, 16)
        max_items = max(max_items // 2, 1)
    shrunk = _shrink(data, 16, 1)
    if json_size(shrunk) <= max_bytes:
        return shrunk, True
    return {}, True


def cap_text(text: str, max_bytes: int) -> tuple[str, bool]:
    """Cut ``text`` to at most ``max_bytes`` of UTF-8 (never inside a character)."""
    encoded = text.encode("utf-8")
    if len(encoded) <= max_bytes:
        return text, False
    return encoded[:max_bytes].decode("utf-8", "ignore"), True
