"""The TOML rule files behind the mesh authorization policy and the tool policy.

Both are ``version = 1`` documents of ``[[rules]]`` tables whose keys are lists of globs
(a single string is accepted for one glob), with ``callers`` required and an optional
``description``. This module reads that shape once; each policy builds its own rules.
"""

from __future__ import annotations

import tomllib
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any


def globs(value: Any, where: str, error: type[ValueError]) -> tuple[str, ...]:
    """Return ``value`` as a tuple of non-empty glob strings, or raise ``error``."""
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(item, str) and item for item in value):
        raise error(f"{where} must be a list of non-empty strings")
    return tuple(value)


def rule_tables(
    data: Mapping[str, Any], source: str, *, rule_keys: frozenset[str], error: type[ValueError]
) -> Iterator[tuple[str, Mapping[str, Any], str]]:
    """Check the document's shape and yield ``(where, rule table, description)`` per rule.

    Raises:
        error: Unknown keys, an unsupported version, wrong types or a rule without
            callers; the message names ``source`` and the rule.
    """
    unknown = set(data) - {"rules", "version"}
    if unknown:
        raise error(f"{source}: unknown top-level key(s) {sorted(unknown)}")
    version = data.get("version", 1)
    if version != 1:
        raise error(f"{source}: unsupported version {version!r} (expected 1)")
    raw_rules = data.get("rules", [])
    if not isinstance(raw_rules, list):
        raise error(f"{source}: rules must be an array of tables ([[rules]])")
    for index, raw in enumerate(raw_rules):
        where = f"{source}: rules[{index}]"
        if not isinstance(raw, Mapping):
            raise error(f"{where} must be a table")
        extra = set(raw) - rule_keys
        if extra:
            raise error(f"{where}: unknown key(s) {sorted(extra)}")
        if "callers" not in raw:
            raise error(f"{where}: callers is required")
        description = raw.get("description", "")
        if not isinstance(description, str):
            raise error(f"{where}.description must be a string")
        yield where, raw, description


def load_toml(path: Path, error: type[ValueError]) -> dict[str, Any]:
    """Read a TOML file; a syntax error becomes ``error`` naming the file.

    Raises:
        error: The file is not valid TOML.
        OSError: The file cannot be read.
    """
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise error(f"{path}: {exc}") from exc
