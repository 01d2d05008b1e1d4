"""Argument validation paths and result size caps."""

from __future__ import annotations

import json

import pytest
from jsonschema.exceptions import SchemaError

from hivewire.services.tool.schema import (
    cap_result,
    cap_text,
    compile_schema,
    json_size,
    violations,
)

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "minLength": 2},
        "items": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {"id": {"type": "integer"}, "tags": {"type": "array"}},
                "required": ["id"],
                "additionalProperties": False,
            },
        },
    },
    "required": ["name", "items"],
    "additionalProperties": False,
}


def test_violations_name_the_failing_paths() -> None:
    validator = compile_schema(SCHEMA)
    found = violations(
        validator,
        {
            "name": "x",
            "items": [{"id": 1}, {"id": "two"}, {"tags": 3, "extra": True}],
            "bogus": 1,
        },
    )
    by_field = {v.field: v.description for v in found}
    assert set(by_field) == {
        "arguments.bogus",
        "arguments.name",
        "arguments.items[1].id",
        "arguments.items[2].id",
        "arguments.items[2].extra",
        "arguments.items[2].tags",
    }
    assert by_field["arguments.items[2].id"] == "is required"
    assert by_field["arguments.bogus"] == "is not an accepted field"
    assert "integer" in by_field["arguments.items[1].id"]


def test_valid_arguments_have_no_violations() -> None:
    validator = compile_schema(SCHEMA)
    assert violations(validator, {"name": "ok", "items": [{"id": 3.0}]}) == []


def test_missing_top_level_fields() -> None:
    validator = compile_schema(SCHEMA)
    assert [v.field for v in violations(validator, {})] == ["arguments.name", "arguments.items"]


def test_invalid_schema_is_rejected() -> None:
    with pytest.raises(SchemaError):
        compile_schema({"type": "no-such-type"})


def test_cap_result_keeps_shape_and_fits() -> None:
    big = {
        "text": "y" * 50_000,
        "rows": [{"n": i, "s": "z" * 100} for i in range(2000)],
        "ok": True,
    }
    capped, truncated = cap_result(big, 4096)
    assert truncated
    assert json_size(capped) <= 4096
    assert set(capped) == {"text", "rows", "ok"}
    assert capped["ok"] is True
    assert capped["text"].startswith("yyyy") and capped["text"].endswith("…")
    assert isinstance(capped["rows"], list) and capped["rows"][0]["n"] == 0
    json.dumps(capped)


def test_cap_result_leaves_small_results_alone() -> None:
    small = {"a": [1, 2, 3]}
    assert cap_result(small, 1024) == (small, False)


def test_cap_text_cuts_on_character_boundaries() -> None:
    text = "é" * 10  # two bytes each
    cut, truncated = cap_text(text, 5)
    assert truncated and cut == "éé"
    assert cap_text("abc", 10) == ("abc", False)
