"""The README's quick start, run as written: every command block between its markers.

The first block is `make run`; the test starts what it runs (`hivewire up`, checked
against the Makefile) on free ports instead of the documented defaults. Every other
block runs in bash, from a directory laid out like the repository root (`.venv`,
`examples`, `proto` linked in; `certs/` and `.hivewire/` made by `hivewire up`), with the
default ports in the text replaced by the test's.
"""

from __future__ import annotations

import re
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.up_mesh import RunningMesh, hivewire_up

pytestmark = pytest.mark.timeout(600)

REPO = Path(__file__).resolve().parents[2]
README = REPO / "README.md"
BLOCK = re.compile(r"```sh\n(.*?)```", re.DOTALL)


def quickstart_blocks() -> list[str]:
    text = README.read_text()
    begin, end = text.index("<!-- quickstart:begin -->"), text.index("<!-- quickstart:end -->")
    return BLOCK.findall(text[begin:end])


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningMesh]:
    root = tmp_path_factory.mktemp("readme")
    for name in (".venv", "examples", "proto"):
        (root / name).symlink_to(REPO / name)
    with hivewire_up(root, args=["--no-demo"]) as running:
        yield running


def test_quickstart_starts_with_make_run_which_is_hivewire_up() -> None:
    blocks = quickstart_blocks()
    assert blocks[0].strip() == "make run"
    recipe = re.search(r"^run:.*\n((?:\t.*\n)+)", (REPO / "Makefile").read_text(), re.MULTILINE)
    assert recipe is not None
    assert "$(BIN)/hivewire up" in recipe.group(1)


@pytest.mark.parametrize("index", range(1, len(quickstart_blocks())))
def test_quickstart_block_runs(mesh: RunningMesh, index: int) -> None:
    block = quickstart_blocks()[index]
    coordinator = mesh.address("coordinator")
    nats = mesh.endpoints["nats"]["url"].split("://", 1)[1]
    script = block.replace("127.0.0.1:50051", coordinator).replace("127.0.0.1:4222", nats)
    script = script.replace("https://127.0.0.1:50055/", mesh.endpoints["a2a"]["url"])
    env = mesh.clean_env()
    env["HIVEWIRE_COORDINATOR__ADDRESS"] = coordinator
    env["HIVEWIRE_NATS_URL"] = mesh.endpoints["nats"]["url"]
    result = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", script],
        cwd=mesh.root,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    report = f"block {index}:\n{block}\n--- stdout\n{result.stdout}\n--- stderr\n{result.stderr}"
    assert result.returncode == 0, report
    assert result.stdout.strip(), report
    if "submit calculate" in block and "alice" not in block:
        assert "1024" in result.stdout, report
    if "a2a" in block:
        assert "final state: TASK_STATE_COMPLETED" in result.stdout, report
        assert '"state":"TASK_STATE_COMPLETED"' in result.stdout, report
        assert '"mtlsSecurityScheme"' in result.stdout, report
    if "StreamTask" in block:
        # Each stream's last event is its task's end: every one must have succeeded.
        ends = re.findall(r'"finished": \{\s*"state": "(TASK_STATE_\w+)"', result.stdout)
        assert ends and set(ends) == {"TASK_STATE_SUCCEEDED"}, report
    if "--since" in block or "subscribe.js" in block:
        assert "task.created" in result.stdout, report
