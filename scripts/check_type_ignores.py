"""Fail on a ``type: ignore`` that names no error code or gives no reason.

mypy checks services/ and discovery/ strictly (``warn_unused_ignores`` on), so an ignore
there silences one real error. Each one has to say which (``[code]``) and why, in a
comment after it on the same line::

    watcher.stop()  # type: ignore[no-untyped-call]  # nats-py: unannotated

Where a real typing fix exists (an enum's ``ValueType``, a narrowed Optional), it is made
instead (docs/architecture.md, "Checks"). ``make lint`` runs this on the directories mypy
checks; each offending line is printed as ``file:line: what is missing``.

Usage: ``python scripts/check_type_ignores.py [DIR_OR_FILE ...]`` (default: services
discovery, from the repository root).
"""

from __future__ import annotations

import io
import re
import sys
import tokenize
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_PATHS = ("services", "discovery")
_SKIPPED_DIRS = frozenset({"gen", "build", ".venv", "__pycache__"})

# "type: ignore", as mypy reads it (spaces optional), then the codes, then the rest.
_IGNORE = re.compile(r"type:\s*ignore(?P<codes>\[[^\]]*\])?(?P<rest>.*)")
# The reason: a further comment with some words in it.
_REASON = re.compile(r"^\s*#\s*\S")


def problems(source: str) -> Iterator[tuple[int, str]]:
    """Each ``(line, what is missing)`` of the ``type: ignore`` comments in ``source``.

    Only real comments count (tokenized), not the words in a string or a docstring.
    """
    tokens = tokenize.generate_tokens(io.StringIO(source).readline)
    for token in tokens:
        if token.type != tokenize.COMMENT:
            continue
        match = _IGNORE.search(token.string)
        if match is None:
            continue
        line = token.start[0]
        codes = (match["codes"] or "").strip("[]").strip()
        if not codes:
            yield line, "type: ignore without an error code (# type: ignore[code]  # why)"
        elif not _REASON.match(match["rest"]):
            yield line, f"type: ignore[{codes}] without a reason (# type: ignore[code]  # why)"


def python_files(paths: list[Path]) -> Iterator[Path]:
    """The .py files of ``paths`` (files as given; directories walked, generated code not)."""
    for path in paths:
        if path.is_file():
            yield path
            continue
        for found in sorted(path.rglob("*.py")):
            if not _SKIPPED_DIRS.intersection(found.relative_to(path).parts):
                yield found


def main(argv: list[str]) -> int:
    """Check the files; print each problem; 1 when there is any, else 0."""
    paths = [Path(arg) for arg in argv] or [ROOT / name for name in DEFAULT_PATHS]
    missing = [path for path in paths if not path.exists()]
    if missing:
        print(f"check_type_ignores: no such file or directory: {missing[0]}", file=sys.stderr)
        return 2
    found = 0
    for path in python_files(paths):
        try:
            shown = path.resolve().relative_to(ROOT)
        except ValueError:
            shown = path
        for line, what in problems(path.read_text(encoding="utf-8")):
            print(f"{shown}:{line}: {what}")
            found += 1
    if found:
        print(f"check_type_ignores: {found} unjustified type: ignore", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
