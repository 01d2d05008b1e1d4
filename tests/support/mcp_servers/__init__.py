"""Model Context Protocol servers for tests (real servers built with the official SDK)."""

from __future__ import annotations

from pathlib import Path

DEMO_SERVER = Path(__file__).parent / "demo_server.py"
"""Script of the demo server: stdio by default, ``--http PORT_FILE`` for streamable HTTP."""
