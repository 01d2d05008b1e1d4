"""The plugin's own tests: decorated tools stay plain functions."""

from __future__ import annotations

import pytest
from hivewire_unit_tools import convert_many, convert_units

from hivewire.services.tool.sdk import ToolContext, ToolError, definition_of


def test_convert_units() -> None:
    assert convert_units(1, "mi", "km").value == pytest.approx(1.609344)
    assert convert_units(212, "f", "c").value == pytest.approx(100)
    with pytest.raises(ToolError) as caught:
        convert_units(1, "kg", "m")
    assert caught.value.reason == "INCOMPATIBLE_UNITS"


def test_convert_many_reports_progress() -> None:
    seen = []
    ctx = ToolContext(tool_name="convert_many", on_progress=lambda f, s, m: seen.append(f))
    assert convert_many([1, 2], "kg", "g", ctx) == [1000, 2000]
    assert seen == [0.0]


def test_schema() -> None:
    definition = definition_of(convert_units)
    assert definition is not None
    assert definition.input_schema["properties"]["from_unit"]["enum"][:2] == ["m", "km"]
