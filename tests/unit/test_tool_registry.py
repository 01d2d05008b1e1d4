"""The tool registry: first name wins, disabled names, MCP groups, the sync thread runner."""

from __future__ import annotations

import asyncio
import threading

import pytest

from hivewire.services.runtime.errors import ResourceExhausted
from hivewire.services.tool.domain import ToolSource
from hivewire.services.tool.registry import FunctionTool, ThreadRunner, ToolRegistry
from hivewire.services.tool.sdk import ToolContext, definition_of, tool
from tests.helpers import eventually


def make(name: str, source: ToolSource, threads: ThreadRunner) -> FunctionTool:
    @tool(name=name)
    def fn(x: int = 0) -> int:
        """A tool."""
        return x

    definition = definition_of(fn)
    assert definition is not None
    return FunctionTool(definition, source=source, threads=threads)


def test_first_registration_wins_and_disabled_names_are_skipped() -> None:
    threads = ThreadRunner(2)
    registry = ToolRegistry(disabled=["secret*"])
    first = make("demo.lookup", ToolSource.PLUGIN, threads)
    assert registry.add(first)
    assert not registry.add(make("demo.lookup", ToolSource.MCP, threads))
    assert not registry.add(make("secret_tool", ToolSource.BUILTIN, threads))
    assert registry.get("demo.lookup") is first
    assert "secret_tool" not in registry


def test_group_refresh_only_touches_its_own_tools() -> None:
    threads = ThreadRunner(2)
    registry = ToolRegistry()
    plugin = make("demo.lookup", ToolSource.PLUGIN, threads)
    registry.add(plugin)
    registry.replace_group("mcp:demo", [make("demo.add", ToolSource.MCP, threads)])
    assert [t.name for t in registry.tools()] == ["demo.add", "demo.lookup"]
    registry.replace_group("mcp:demo", [make("demo.sub", ToolSource.MCP, threads)])
    assert [t.name for t in registry.tools()] == ["demo.lookup", "demo.sub"]
    assert registry.get("demo.lookup") is plugin


async def test_thread_runner_bounds_threads_and_flags_abandoned_calls() -> None:
    runner = ThreadRunner(1)
    release = threading.Event()
    ctx = ToolContext(tool_name="blocker")
    blocked = asyncio.create_task(runner.run(lambda: release.wait(10), ctx))
    await eventually(lambda: runner.busy == 1)
    with pytest.raises(ResourceExhausted):
        await runner.run(lambda: 1, ToolContext(tool_name="other"))
    blocked.cancel()
    with pytest.raises(asyncio.CancelledError):
        await blocked
    assert ctx.cancelled  # the thread's code can see the call is over
    assert runner.busy == 1  # the thread still runs until it returns
    release.set()
    await eventually(lambda: runner.busy == 0)
    assert await runner.run(lambda: threading.current_thread().daemon, ToolContext(tool_name="t"))
