"""The TOML rule files behind the mesh authorization policy and the tool policy.

:class:`ReloadingPolicy` is the hot reload both stores share: the file is re-read when
its mtime changes, and a broken edit keeps the policy in force.

Both are ``version = 1`` documents of ``[[rules]]`` tables whose keys are lists of globs
(a single string is accepted for one glob), with ``callers`` required and an optional
``description``. This module reads that shape once; each policy builds its own rules.
"""

from __future__ import annotations

import logging
import tomllib
from collections.abc import Callable, Iterator, Mapping, Sized
from pathlib import Path
from typing import Any, Generic, Protocol, TypeVar

from hivewire.services.runtime.filewatch import FileWatch

logger = logging.getLogger(__name__)


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


class RuleSet(Protocol):
    """A policy: what :class:`ReloadingPolicy` reads of one (its rules, for the log)."""

    @property
    def rules(self) -> Sized:
        """The policy's rules."""


PolicyT = TypeVar("PolicyT", bound=RuleSet)


class ReloadingPolicy(Generic[PolicyT]):
    """A policy file, re-read when it changes (its mtime checked at most once per interval).

    A file that cannot be read or does not parse keeps the policy in force, with one
    error in the log per edit: a half-written or broken file must not open or close
    everything by accident.

    Args:
        path: The policy file.
        load: Reads and parses it (raising one of ``errors`` or ``OSError``).
        errors: What ``load`` raises for an invalid file.
        name: What the log calls it, e.g. ``"tool policy"``.
        check_interval: Minimum seconds between two checks of the file's mtime.

    Raises:
        OSError: The file cannot be read at construction.
        Exception: ``load``'s error for an invalid file at construction (a bad policy
            must stop the service from starting).
    """

    def __init__(
        self,
        path: Path,
        load: Callable[[Path], PolicyT],
        *,
        errors: tuple[type[Exception], ...],
        name: str,
        check_interval: float,
    ) -> None:
        self.path = path
        self._load = load
        self._errors = errors
        self._name = name
        self._watch = FileWatch(path, check_interval=check_interval)
        self._watch.mark()
        self.policy: PolicyT = load(path)
        """The policy in force."""

    def refresh(self) -> bool:
        """Re-read the file if it is time to check and it changed.

        Returns:
            True when a new policy was loaded (``policy`` changed).
        """
        try:
            stamp = self._watch.changed()
        except OSError as exc:
            logger.error("%s file unreadable, keeping the previous policy: %s", self._name, exc)
            return False
        if stamp is None:
            return False
        # Remember the change even if it fails to parse: one error per edit, not per second.
        self._watch.mark(stamp)
        invalid: tuple[type[BaseException], ...] = (OSError, *self._errors)
        try:
            policy = self._load(self.path)
        except invalid as exc:
            logger.error("%s not reloaded, keeping the previous one: %s", self._name, exc)
            return False
        self.policy = policy
        logger.info("%s reloaded: %d rule(s) from %s", self._name, len(policy.rules), self.path)
        return True
