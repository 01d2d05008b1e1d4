"""A real MCP server for tests: ``python demo_server.py`` (stdio) or ``--http PORT_FILE``.

Over HTTP it binds 127.0.0.1 on a free port and writes ``{"url": ...}`` to PORT_FILE once
it listens, so tests never guess ports.
"""

from __future__ import annotations

import asyncio
import json
import socket
import sys
from pathlib import Path

from mcp.server.mcpserver import Context, MCPServer

server = MCPServer("demo", version="0.4.2")


@server.tool()
def add(a: int, b: int) -> int:
    """Add two integers."""
    return a + b


@server.tool()
def shout(text: str) -> str:
    """Upper-case a text."""
    return text.upper()


@server.tool()
def fail(reason: str) -> str:
    """Always fail."""
    raise ValueError(f"failing because {reason}")


@server.tool()
async def countdown(steps: int, ctx: Context) -> str:
    """Count down, reporting progress."""
    for step in range(steps):
        await ctx.report_progress(step + 1, steps, f"step {step + 1}")
    return "liftoff"


@server.tool()
async def sleep(seconds: float) -> str:
    """Sleep."""
    await asyncio.sleep(seconds)
    return "rested"


async def serve_http(port_file: Path) -> None:
    import uvicorn

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    app = server.streamable_http_app(host="127.0.0.1")
    config = uvicorn.Config(app, log_level="warning")
    uv = uvicorn.Server(config)
    task = asyncio.create_task(uv.serve(sockets=[sock]))
    while not uv.started:
        if task.done():
            task.result()
        await asyncio.sleep(0.01)
    tmp = port_file.with_suffix(".tmp")
    tmp.write_text(json.dumps({"url": f"http://127.0.0.1:{port}/mcp"}))
    tmp.replace(port_file)
    await task


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--http":
        asyncio.run(serve_http(Path(sys.argv[2])))
    else:
        server.run()
