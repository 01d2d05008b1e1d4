"""The Node.js examples under examples/, installed in a scratch directory and run.

``install_example`` copies an example and installs its locked dependencies once
(``npm ci``), skipping the test when node or npm is missing; ``run_command`` runs a
process to completion within a deadline and returns its exit code and output.
"""

# The deadline is a ``timeout`` in seconds, applied with asyncio.timeout inside.

from __future__ import annotations

import asyncio
import shutil
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path

import pytest


def install_example(
    tmp_path_factory: pytest.TempPathFactory, example: Path, files: Sequence[str], *, what: str
) -> Path:
    """A copy of ``files`` of an example with its locked dependencies installed.

    Args:
        tmp_path_factory: Where the scratch directory goes.
        example: The example's directory (with package.json and package-lock.json).
        files: The files to copy.
        what: What the example is, for the skip message.

    Returns:
        The directory to run node in.
    """
    if shutil.which("node") is None or shutil.which("npm") is None:
        pytest.skip(f"node and npm are not installed: the {what} cannot run here")
    work = tmp_path_factory.mktemp(f"{example.name}-example")
    for name in files:
        shutil.copy2(example / name, work / name)
    done = subprocess.run(
        ["npm", "ci", "--no-audit", "--no-fund", "--prefer-offline", "--ignore-scripts"],
        cwd=work,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, f"npm ci failed\n{done.stdout}\n{done.stderr}"
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
