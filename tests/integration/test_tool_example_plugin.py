"""The example plugin in examples/plugins/unit-tools works as its docs say.

Its entry points are read from its own pyproject.toml and installed as a dist-info (what
``pip install`` writes), so a broken example or a wrong entry point fails here.
"""

from __future__ import annotations

import importlib
import sys
import tomllib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from hivewire.services.runtime.values import ErrorInfo
from hivewire.services.tool.domain import ToolCall, ToolOutcome, ToolSource
from hivewire.services.tool.service import ToolService, open_tool_service
from hivewire.services.tool.settings import ToolSettings

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "plugins" / "unit-tools"
AGENT = "spiffe://hivewire.local/agent/test"


@pytest.fixture
async def service(tmp_path: Path) -> AsyncIterator[ToolService]:
    project = tomllib.loads((EXAMPLE / "pyproject.toml").read_text())["project"]
    dist_info = tmp_path / f"hivewire_unit_tools-{project['version']}.dist-info"
    dist_info.mkdir()
    (dist_info / "METADATA").write_text(
        f"Metadata-Version: 2.1\nName: {project['name']}\nVersion: {project['version']}\n"
    )
    group = project["entry-points"]["hivewire.tools"]
    (dist_info / "entry_points.txt").write_text(
        "[hivewire.tools]\n" + "".join(f"{k} = {v}\n" for k, v in group.items())
    )
    entries = [str(tmp_path), str(EXAMPLE / "src")]
    sys.path[:0] = entries
    importlib.invalidate_caches()
    try:
        async with open_tool_service(ToolSettings(plugins=list(group))) as svc:
            yield svc
    finally:
        for entry in entries:
            sys.path.remove(entry)


async def last_event(service: ToolService, name: str, arguments: dict[str, Any]) -> Any:
    events = [
        e async for e in service.invoke(ToolCall(tool_name=name, arguments=arguments, caller=AGENT))
    ]
    return events[-1]


async def test_example_plugin_tools(service: ToolService) -> None:
    listed = {t.name: t for t in service.list_tools(AGENT)}
    assert listed["convert_units"].source is ToolSource.PLUGIN
    assert listed["convert_units"].version == "0.1.0"
    assert "to_unit" in listed["convert_units"].input_schema["required"]

    miles = await last_event(
        service, "convert_units", {"value": 10, "from_unit": "km", "to_unit": "mi"}
    )
    assert isinstance(miles, ToolOutcome)
    assert miles.result == {"value": pytest.approx(6.213712), "unit": "mi"}

    many = await last_event(
        service, "convert_many", {"values": [0, 100], "from_unit": "c", "to_unit": "f"}
    )
    assert isinstance(many, ToolOutcome) and many.result == {"result": [32, 212]}

    wrong = await last_event(
        service, "convert_units", {"value": 1, "from_unit": "kg", "to_unit": "ft"}
    )
    assert isinstance(wrong, ErrorInfo) and wrong.reason == "INCOMPATIBLE_UNITS"
