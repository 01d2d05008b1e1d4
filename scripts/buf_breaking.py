"""Fail when the contracts under proto/ changed incompatibly since a base commit.

``buf breaking`` compares the working tree's proto/ (uncommitted edits included) with the
one of a base commit, under the FILE rules of buf.yaml: fields, messages and RPCs may be
added, never removed, renumbered or retyped.

The base, unless ``BUF_BREAKING_BASE`` names a git revision:

- on a branch that has left ``main``: the merge base with ``main``, so the branch is held
  to what main has published;
- on ``main`` itself (CI checks a clean clone of main, where the merge base is HEAD): the
  previous commit, ``HEAD~1``, so every commit that lands on main is checked against the
  one before it.

The base's buf.yaml and proto/ are taken with ``git archive`` into a temporary directory,
so this works in a worktree and needs no network. Where git cannot give a base (a shallow
clone without it, or a copy of the tree without ``.git``), the contracts are compared with
the image committed in ``scripts/proto_baseline.binpb`` (``make buf-baseline`` refreshes it
at a release), so the check never passes unchecked.
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BUF = Path(sys.executable).parent / "buf"


def _git(*args: str) -> str:
    result = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise SystemExit(f"buf breaking: git {' '.join(args)} failed: {result.stderr.strip()}")
    return result.stdout.strip()


def base_revision() -> str:
    """The commit the contracts are compared with (see the module docstring)."""
    explicit = os.environ.get("BUF_BREAKING_BASE")
    if explicit:
        return _git("rev-parse", "--verify", f"{explicit}^{{commit}}")
    head = _git("rev-parse", "HEAD")
    has_main = (
        subprocess.run(
            ["git", "rev-parse", "--verify", "--quiet", "main^{commit}"],
            cwd=ROOT,
            capture_output=True,
            check=False,
        ).returncode
        == 0
    )
    if has_main:
        merge_base = _git("merge-base", "HEAD", "main")
        if merge_base != head:
            return merge_base
    return _git("rev-parse", "--verify", "HEAD~1^{commit}")


BASELINE = ROOT / "scripts" / "proto_baseline.binpb"


def _against_baseline(why: str) -> int:
    if not BASELINE.exists():
        raise SystemExit(f"buf breaking: {why}, and {BASELINE} is missing")
    print(f"buf breaking against {BASELINE.name} ({why})", flush=True)
    return subprocess.run([str(BUF), "breaking", "--against", str(BASELINE)], cwd=ROOT).returncode


def main() -> int:
    """Run ``buf breaking`` against the base's contracts; return its exit code."""
    try:
        base = base_revision()
    except SystemExit as exc:
        return _against_baseline(f"no git base ({exc})")
    archive = subprocess.run(
        ["git", "archive", "--format=tar", base, "buf.yaml", "proto"],
        cwd=ROOT,
        capture_output=True,
        check=False,
    )
    if archive.returncode != 0:
        raise SystemExit(f"buf breaking: cannot read proto/ at {base}: {archive.stderr!r}")
    with tempfile.TemporaryDirectory(prefix="buf-base-") as tmp:
        with tarfile.open(fileobj=io.BytesIO(archive.stdout)) as tar:
            tar.extractall(tmp, filter="data")
        print(f"buf breaking against {base[:12]}", flush=True)
        return subprocess.run([str(BUF), "breaking", "--against", tmp], cwd=ROOT).returncode


if __name__ == "__main__":
    sys.exit(main())
