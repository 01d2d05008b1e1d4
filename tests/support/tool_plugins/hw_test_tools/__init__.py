"""Tools used by the tool service tests: well-behaved, crashing, hanging, gated."""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Annotated, Literal

from pydantic import BaseModel, Field

from hivewire.services.tool.sdk import ToolContext, ToolError, tool

NOT_A_TOOL = 42
"""Referenced by an entry point that provides no tool: logged and skipped."""

# Set by sync_spin when it noticed its cancellation (read by in-process tests).
SPIN_STOPPED = threading.Event()
# Set by slow when its asyncio task was cancelled (read by in-process tests).
SLOW_CANCELLED = threading.Event()


class Point(BaseModel):
    """A point in the plane."""

    x: float
    y: float


@tool
async def echo(
    message: str, ctx: ToolContext, repeat: Annotated[int, Field(ge=1, le=5)] = 1
) -> str:
    """Repeat a message, reporting progress after each repetition.

    Args:
        message: What to repeat.
        repeat: How many times.
    """
    parts = []
    for index in range(repeat):
        parts.append(message)
        ctx.progress((index + 1) / repeat, "echo", f"{index + 1}/{repeat}")
    return " ".join(parts)


@tool(name="add_numbers", version="9.9")
def add_numbers(a: int, b: int, mode: Literal["sum", "product"] = "sum") -> dict[str, int]:
    """Add or multiply two integers (a synchronous tool).

    Args:
        a: First number.
        b: Second number.
        mode: sum or product.
    """
    return {"value": a + b if mode == "sum" else a * b}


@tool
def centroid(points: list[Point]) -> Point:
    """Centre of a list of points (nested schema).

    Args:
        points: At least one point.
    """
    if not points:
        raise ToolError("no points given", reason="NO_POINTS", code="INVALID_ARGUMENT")
    return Point(x=sum(p.x for p in points) / len(points), y=sum(p.y for p in points) / len(points))


@tool
def explode(note: str = "") -> str:
    """Always crash (an unexpected exception).

    Args:
        note: Anything.
    """
    raise RuntimeError(f"boom {note}".strip())


@tool
async def refuse(what: str) -> str:
    """Fail in a classified way.

    Args:
        what: Echoed in the error.
    """
    raise ToolError(f"refusing {what}", reason="REFUSED_ON_PURPOSE", code="FAILED_PRECONDITION")


@tool(timeout=0.5)
async def hang(seconds: float = 3600.0) -> str:
    """Sleep (an async tool that hangs), capped at 0.5 s by its own timeout.

    Args:
        seconds: How long to sleep.
    """
    await asyncio.sleep(seconds)
    return "woke up"


@tool
async def slow(seconds: float, ctx: ToolContext) -> str:
    """Sleep, reporting progress first (cancellation and caller-deadline tests).

    Args:
        seconds: How long to sleep.
    """
    ctx.progress(0.0, "sleep", f"sleeping {seconds}s")
    try:
        await asyncio.sleep(seconds)
    except asyncio.CancelledError:
        SLOW_CANCELLED.set()
        raise
    return "done"


@tool(timeout=0.5)
def sync_spin(ctx: ToolContext) -> str:
    """Spin on a thread until cancelled, checking cooperatively."""
    SPIN_STOPPED.clear()
    try:
        while True:
            ctx.check_cancelled()
            time.sleep(0.01)
    finally:
        SPIN_STOPPED.set()


@tool(timeout=0.5)
def sync_hang(seconds: float = 600.0) -> str:
    """Block a thread without ever checking for cancellation (the worst plugin).

    Only for service processes: the abandoned thread sleeps on after the call ends.

    Args:
        seconds: How long to block.
    """
    time.sleep(seconds)
    return "woke up"


@tool(requires_approval=True, approval_prompt="Delete {path}?")
def delete_file(path: str) -> dict[str, str]:
    """Pretend to delete a file (needs a person's approval).

    Args:
        path: The file.
    """
    return {"deleted": path}


@tool
def big_output(size: Annotated[int, Field(ge=1, le=10_000_000)]) -> dict[str, object]:
    """Return a large result (size caps).

    Args:
        size: Characters of text.
    """
    return {"blob": "x" * size, "items": list(range(min(size, 100_000)))}
