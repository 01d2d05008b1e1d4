"""The Node.js examples under examples/, installed in a scratch directory and run.

``install_example`` copies an example into a scratch directory next to its locked
dependencies, which ``make node`` installs (Debian's ``nodejs`` and ``npm``, then
``npm ci`` in each example; ``make pytest`` does it first). A missing node, npm or
installation fails the test loudly: it never skips. ``run_command`` runs a process to
completion within a deadline and returns its exit code and output.
"""

# The deadline is a ``timeout`` in seconds, applied with asyncio.timeout inside.
# ruff: noqa: ASYNC109

from __future__ import annotations

import asyncio
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path

import pytest


def install_example(
    tmp_path_factory: pytest.TempPathFactory, example: Path, files: Sequence[str], *, what: str
) -> Path:
    """A copy of ``files`` of an example, with the dependencies ``make node`` installed.

    Args:
        tmp_path_factory: Where the scratch directory goes.
        example: The example's directory (with package.json and package-lock.json).
        files: The files to copy.
        what: What the example is, for the failure message.

    Returns:
        The directory to run node in.
    """
    if shutil.which("node") is None or shutil.which("npm") is None:
        pytest.fail(f"node and npm are not installed, so the {what} cannot run: run `make node`")
    installed = example / "node_modules" / ".package-lock.json"
    lock = example / "package-lock.json"
    if not installed.exists() or installed.stat().st_mtime < lock.stat().st_mtime:
        pytest.fail(f"the {what}'s npm packages are missing or stale: run `make node`")
    work = tmp_path_factory.mktemp(f"{example.name}-example")
    for name in files:
        shutil.copy2(example / name, work / name)
    (work / "node_modules").symlink_to(example / "node_modules", target_is_directory=True)
    return work


async def run_command(
    *command: str, cwd: Path, timeout: float, env: Mapping[str, str] | None = None
) -> tuple[int, str, str]:
    """Run a command to completion; returns (exit code, stdout, stderr).

    Raises:
        TimeoutError: It did not finish within ``timeout`` seconds (it is then killed).
    """
    proc = await asyncio.create_subprocess_exec(
        *command,
        cwd=cwd,
        env=dict(env) if env is not None else None,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        async with asyncio.timeout(timeout):
            stdout, stderr = await proc.communicate()
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    assert proc.returncode is not None
    return proc.returncode, stdout.decode(), stderr.decode()
