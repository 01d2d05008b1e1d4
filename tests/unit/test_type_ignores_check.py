"""scripts/check_type_ignores.py, run by `make lint`: every `type: ignore` has a code and a why."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "check_type_ignores.py"


def _check(*paths: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(SCRIPT), *map(str, paths)],
        capture_output=True,
        text=True,
        check=False,
        cwd=ROOT,
    )


def test_an_ignore_without_a_code_or_a_reason_fails_with_its_file_and_line(
    tmp_path: Path,
) -> None:
    module = tmp_path / "module.py"
    module.write_text(
        "a = f()  # type: ignore\n"
        "b = g()  # type: ignore[arg-type]\n"
        "c = h()  # type:ignore[misc]  #\n"
        "d = i()  # type: ignore[]  # empty codes\n"
        "e = j()  # type: ignore[no-untyped-call]  # the library is unannotated\n"
        'f = "# type: ignore in a string is no comment"\n',
        encoding="utf-8",
    )
    result = _check(module)
    assert result.returncode == 1
    lines = result.stdout.splitlines()
    assert [line.split(": ", 1)[0] for line in lines] == [
        f"{module}:1",
        f"{module}:2",
        f"{module}:3",
        f"{module}:4",
    ]
    assert "without an error code" in lines[0]
    assert "type: ignore[arg-type] without a reason" in lines[1]
    assert "type: ignore[misc] without a reason" in lines[2]
    assert "without an error code" in lines[3]
    assert "4 unjustified" in result.stderr


def test_justified_ignores_pass_and_generated_code_is_not_read(tmp_path: Path) -> None:
    (tmp_path / "ok.py").write_text(
        "x = f()  # type: ignore[no-untyped-call]  # nats-py: unannotated\n", encoding="utf-8"
    )
    (tmp_path / "gen").mkdir()
    (tmp_path / "gen" / "stub.py").write_text("y = g()  # type: ignore\n", encoding="utf-8")
    result = _check(tmp_path)
    assert (result.returncode, result.stdout) == (0, "")


def test_the_checked_packages_hold_no_unjustified_ignore() -> None:
    result = _check()
    assert result.returncode == 0, result.stdout
