"""Tool plugins for tests, installed for real through an entry-point dist-info.

The plugin packages in this directory (``hw_test_tools``, ``hw_broken_plugin``) are
plain top-level modules. :func:`install_plugins` writes a ``.dist-info`` with an
``entry_points.txt`` naming them into a directory; putting that directory and this one
on ``sys.path`` (or ``PYTHONPATH`` for a service process) makes ``importlib.metadata``
find them exactly as it finds a pip-installed plugin.
"""

from __future__ import annotations

import os
from pathlib import Path

PLUGIN_DIR = Path(__file__).parent
"""Where the plugin modules live (goes on the import path)."""

DIST_NAME = "hw-test-tools"
DIST_VERSION = "1.2.3"

ENTRY_POINTS = {
    "hw_test_tools": "hw_test_tools",
    "hw_broken": "hw_broken_plugin",
    "hw_not_a_tool": "hw_test_tools:NOT_A_TOOL",
}
"""Entry point name -> object reference, as a plugin's pyproject would declare them."""


def install_plugins(directory: Path) -> Path:
    """Write the distribution metadata of the test plugins into ``directory``.

    Returns:
        ``directory``, to put on ``sys.path`` together with :data:`PLUGIN_DIR`.
    """
    dist_info = directory / f"{DIST_NAME.replace('-', '_')}-{DIST_VERSION}.dist-info"
    dist_info.mkdir(parents=True, exist_ok=True)
    (dist_info / "METADATA").write_text(
        f"Metadata-Version: 2.1\nName: {DIST_NAME}\nVersion: {DIST_VERSION}\n"
    )
    lines = ["[hivewire.tools]"] + [f"{name} = {ref}" for name, ref in ENTRY_POINTS.items()]
    (dist_info / "entry_points.txt").write_text("\n".join(lines) + "\n")
    return directory


def pythonpath(directory: Path) -> str:
    """``PYTHONPATH`` value for a process that should see the installed plugins."""
    parts = [str(directory), str(PLUGIN_DIR)]
    existing = os.environ.get("PYTHONPATH")
    if existing:
        parts.append(existing)
    return os.pathsep.join(parts)
