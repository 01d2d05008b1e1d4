"""The tools the service offers: function tools (built-ins and plugins) and their registry.

Synchronous tool functions run on a daemon thread of their own (not a shared executor),
bounded by ``max_sync_threads``. Python cannot kill a thread: on cancel or timeout the
service stops waiting at once, marks the call's :class:`ToolContext` cancelled so a tool
that calls ``ctx.check_cancelled()`` stops at its next check, and counts the thread
against the bound until it really returns. A sync tool that never checks and never
returns keeps its thread; the bound turns that into ``RESOURCE_EXHAUSTED`` for sync
tools instead of an unbounded pile of threads. Coroutine tools are plain asyncio tasks
and are cancelled for real.
"""

from __future__ import annotations

import abc
import asyncio
import contextvars
import functools
import logging
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from fnmatch import fnmatchcase
from importlib import metadata
from typing import Any, TypeVar

from jsonschema.protocols import Validator
from pydantic import ValidationError

from hivewire.services.runtime.errors import FieldViolation, InvalidArgument, ResourceExhausted
from hivewire.services.tool.domain import ToolInfo, ToolSource
from hivewire.services.tool.schema import ROOT, compile_schema
from hivewire.services.tool.sdk import (
    ENTRY_POINT_GROUP,
    ToolContext,
    ToolDefinition,
    collect_tools,
    default_approval_prompt,
    validation_violations,
)

logger = logging.getLogger(__name__)

T = TypeVar("T")


class Tool(abc.ABC):
    """A tool the service can run.

    Attributes:
        info: How it is listed.
        timeout: Its own cap (s) on one call, or None for the service default.
    """

    def __init__(self, info: ToolInfo, *, timeout: float | None = None) -> None:
        """Create the tool.

        Raises:
            jsonschema.exceptions.SchemaError: The input schema is not a valid schema.
        """
        self.info = info
        self.timeout = timeout
        self.validator: Validator = compile_schema(info.input_schema)

    @property
    def name(self) -> str:
        """The tool's name."""
        return self.info.name

    def approval_prompt(self, arguments: Mapping[str, Any]) -> str:
        """The question to ask a person before a call with these arguments runs."""
        return default_approval_prompt(self.name, arguments)

    @abc.abstractmethod
    async def call(
        self, arguments: Mapping[str, Any], ctx: ToolContext
    ) -> tuple[dict[str, Any], str]:
        """Run the tool on schema-valid arguments.

        Args:
            arguments: The arguments (already checked against the input schema).
            ctx: The call's context (progress, cancellation, deadline).

        Returns:
            ``(result object, text)``, not yet size-capped.

        Raises:
            hivewire.services.tool.sdk.ToolError: The tool failed in a classified way.
            hivewire.services.runtime.errors.HivewireError: The call cannot run (the
                error travels as the call's gRPC status).
        """


class ThreadRunner:
    """Runs synchronous tool functions on daemon threads, at most ``limit`` at a time."""

    def __init__(self, limit: int) -> None:
        """Create the runner.

        Args:
            limit: Threads alive at once, counting abandoned ones still running.
        """
        self._limit = limit
        self._busy = 0
        self._lock = threading.Lock()

    @property
    def busy(self) -> int:
        """Threads running tool code now (including abandoned ones)."""
        with self._lock:
            return self._busy

    def _release(self) -> None:
        with self._lock:
            self._busy -= 1

    async def run(self, func: Callable[[], T], ctx: ToolContext) -> T:
        """Run ``func`` on a new daemon thread and wait for it.

        Args:
            func: The call, arguments bound.
            ctx: The call's context; cancelled when the wait is cancelled.

        Returns:
            What ``func`` returned.

        Raises:
            ResourceExhausted: Every thread is busy (reason ``TOOL_THREADS_EXHAUSTED``).
        """
        with self._lock:
            if self._busy >= self._limit:
                raise ResourceExhausted(
                    f"all {self._limit} threads for synchronous tools are busy",
                    retry_after=1.0,
                    reason="TOOL_THREADS_EXHAUSTED",
                )
            self._busy += 1
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        context = contextvars.copy_context()

        def deliver(outcome: Callable[[], None]) -> None:
            if not future.done():
                outcome()

        def target() -> None:
            outcome: Callable[[], None]
            try:
                outcome = functools.partial(future.set_result, context.run(func))
            except BaseException as exc:  # handed to the waiting coroutine
                outcome = functools.partial(future.set_exception, exc)
            finally:
                self._release()
            try:
                loop.call_soon_threadsafe(deliver, outcome)
            except RuntimeError:
                # The loop is gone (shutdown); nobody is waiting for this result.
                pass

        thread = threading.Thread(target=target, name=f"tool-{ctx.tool_name}", daemon=True)
        try:
            thread.start()
        except BaseException:
            self._release()
            raise
        try:
            return await future
        except asyncio.CancelledError:
            ctx.cancel()
            raise


class FunctionTool(Tool):
    """A tool made with the ``@tool`` decorator (built-ins and plugins)."""

    def __init__(
        self,
        definition: ToolDefinition,
        *,
        source: ToolSource,
        threads: ThreadRunner,
        version: str = "",
    ) -> None:
        """Wrap a definition.

        Args:
            definition: From :func:`hivewire.services.tool.sdk.tool`.
            source: Built-in or plugin.
            threads: Where synchronous functions run.
            version: Version to list when the definition names none.
        """
        super().__init__(
            ToolInfo(
                name=definition.name,
                description=definition.description,
                input_schema=definition.input_schema,
                output_schema=definition.output_schema,
                requires_approval=definition.requires_approval,
                source=source,
                version=definition.version or version,
            ),
            timeout=definition.timeout,
        )
        self.definition = definition
        self._threads = threads

    def approval_prompt(self, arguments: Mapping[str, Any]) -> str:
        """The definition's prompt template, filled with the arguments."""
        return self.definition.prompt_for(arguments)

    async def call(
        self, arguments: Mapping[str, Any], ctx: ToolContext
    ) -> tuple[dict[str, Any], str]:
        """Bind the arguments to the function, run it and render its result."""
        definition = self.definition
        try:
            kwargs = definition.bind(arguments)
        except ValidationError as exc:
            raise InvalidArgument(
                violations=[
                    FieldViolation(f"{ROOT}.{path}" if path else ROOT, message)
                    for path, message in validation_violations(exc)
                ],
                reason="INVALID_TOOL_ARGUMENTS",
            ) from None
        if definition.context_parameter is not None:
            kwargs[definition.context_parameter] = ctx
        if definition.is_async:
            value = await definition.func(**kwargs)
        else:
            value = await self._threads.run(functools.partial(definition.func, **kwargs), ctx)
        return definition.render(value)


class ToolRegistry:
    """Tools by name; the first tool registered under a name wins."""

    def __init__(self, *, disabled: Sequence[str] = ()) -> None:
        """Create an empty registry.

        Args:
            disabled: Tool name globs that are never registered.
        """
        self._disabled = tuple(disabled)
        self._tools: dict[str, Tool] = {}
        self._groups: dict[str, set[str]] = {}

    def is_disabled(self, name: str) -> bool:
        """Whether settings disable the tool ``name``."""
        return any(fnmatchcase(name, glob) for glob in self._disabled)

    def add(self, tool: Tool) -> bool:
        """Register a tool.

        Returns:
            False when its name is disabled or taken (logged), else True.
        """
        if self.is_disabled(tool.name):
            logger.info("tool %s is disabled by the settings", tool.name)
            return False
        existing = self._tools.get(tool.name)
        if existing is not None and existing is not tool:
            logger.warning(
                "tool %s from %s ignored: the name is taken by a %s tool",
                tool.name,
                tool.info.source.value,
                existing.info.source.value,
            )
            return False
        self._tools[tool.name] = tool
        return True

    def replace_group(self, group: str, tools: Iterable[Tool]) -> None:
        """Swap the tools registered earlier under ``group`` for ``tools`` (MCP refresh).

        Only tools added through this method under the same group are removed, so a
        refreshed MCP server never drops a built-in or plugin tool of a similar name.
        """
        for name in self._groups.pop(group, set()):
            self._tools.pop(name, None)
        accepted = {tool.name for tool in tools if self.add(tool)}
        self._groups[group] = accepted

    def get(self, name: str) -> Tool | None:
        """The tool called ``name``, if any."""
        return self._tools.get(name)

    def __contains__(self, name: object) -> bool:
        return name in self._tools

    def __len__(self) -> int:
        return len(self._tools)

    def tools(self) -> list[Tool]:
        """Every tool, sorted by name."""
        return [self._tools[name] for name in sorted(self._tools)]


def load_plugins(patterns: Sequence[str], threads: ThreadRunner) -> list[FunctionTool]:
    """Load the tools of every ``hivewire.tools`` entry point whose name matches.

    A plugin that fails to import, provides no tool or has an invalid schema is logged
    and skipped; it never stops the service.

    Args:
        patterns: Entry point name globs to load (``["*"]`` = all, ``[]`` = none).
        threads: Where the plugins' synchronous functions run.

    Returns:
        The loaded tools.
    """
    loaded: list[FunctionTool] = []
    if not patterns:
        return loaded
    for entry_point in sorted(metadata.entry_points(group=ENTRY_POINT_GROUP), key=lambda e: e.name):
        if not any(fnmatchcase(entry_point.name, glob) for glob in patterns):
            logger.info("plugin %s not enabled by the settings; skipped", entry_point.name)
            continue
        dist = entry_point.dist
        version = dist.version if dist is not None else ""
        try:
            definitions = collect_tools(entry_point.load())
            tools = [
                FunctionTool(d, source=ToolSource.PLUGIN, threads=threads, version=version)
                for d in definitions
            ]
        except Exception:
            logger.exception(
                "plugin %s (%s) failed to load; skipped", entry_point.name, entry_point.value
            )
            continue
        logger.info("plugin %s %s: %s", entry_point.name, version, ", ".join(t.name for t in tools))
        loaded.extend(tools)
    return loaded
