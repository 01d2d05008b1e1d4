"""The TOML rule files behind the mesh authorization policy and the tool policy.

:class:`ReloadingPolicy` is the hot reload both stores share: the file is re-read when
its mtime changes, and a broken edit keeps the policy in force.

Both are ``version = 1`` documents of ``[[rules]]`` tables whose keys are lists of globs
(a single string is accepted for one glob), with ``callers`` required and an optional
``description``. This module reads that shape once; each policy builds its own rules,
on :class:`GlobRule` (callers, allow, deny), and decides on :class:`GlobPolicy`: every
rule whose callers match applies, a name is allowed when one of them allows it and none
denies it (deny wins).
"""

from __future__ import annotations

import logging
import tomllib
from collections.abc import Callable, Iterator, Mapping, Sequence, Sized
from dataclasses import dataclass
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any, Generic, Protocol, TypeVar

from hivewire.services.runtime.filewatch import FileWatch

logger = logging.getLogger(__name__)


def matches(value: str, patterns: Sequence[str]) -> bool:
    """Whether ``value`` matches one of the shell-style globs ``patterns``."""
    return any(fnmatchcase(value, glob) for glob in patterns)


@dataclass(frozen=True)
class GlobRule:
    """What every ``[[rules]]`` entry says: whom it covers, what it allows and denies.

    Attributes:
        callers: SPIFFE id globs the rule applies to.
        allow: Globs of the names (methods, tools) it allows.
        deny: Globs of the names it refuses (deny wins over any allow).
        description: Free text for people reading the policy.
    """

    callers: tuple[str, ...]
    allow: tuple[str, ...] = ()
    deny: tuple[str, ...] = ()
    description: str = ""

    def applies_to(self, caller: str) -> bool:
        """Whether the rule covers ``caller``."""
        return matches(caller, self.callers)


RuleT = TypeVar("RuleT", bound=GlobRule)


@dataclass(frozen=True)
class GlobPolicy(Generic[RuleT]):
    """A parsed policy: rules, in file order.

    Attributes:
        rules: The rules.
        source: Where it came from (a path, or ``default``).
    """

    rules: tuple[RuleT, ...]
    source: str = "default"

    def applying(self, caller: str) -> list[RuleT]:
        """The rules that cover ``caller``."""
        return [rule for rule in self.rules if rule.applies_to(caller)]

    @staticmethod
    def permits(rules: Sequence[RuleT], name: str) -> bool:
        """Whether one of ``rules`` allows ``name`` and none denies it."""
        if any(matches(name, rule.deny) for rule in rules):
            return False
        return any(matches(name, rule.allow) for rule in rules)


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


@dataclass(frozen=True)
class PolicyKind(Generic[PolicyT]):
    """One kind of policy file: its rules' keys, how one rule and the policy are built.

    Attributes:
        name: What the log calls it, e.g. ``"tool policy"``.
        error: What an invalid file raises (a ``ValueError`` naming the place).
        rule_keys: The keys a rule may have.
        rule: Builds one rule from ``(where, rule table, description)``, raising ``error``.
        policy: Builds the policy from ``rules=`` and ``source=`` (the policy class).
    """

    name: str
    error: type[ValueError]
    rule_keys: frozenset[str]
    rule: Callable[[str, Mapping[str, Any], str], Any]
    policy: Callable[..., PolicyT]

    def parse(self, data: Mapping[str, Any], source: str = "<memory>") -> PolicyT:
        """Build a policy from a parsed TOML document.

        Raises:
            ValueError: ``error``: unknown keys, wrong types, a rule without callers or
                another rule the kind refuses.
        """
        tables = rule_tables(data, source, rule_keys=self.rule_keys, error=self.error)
        rules = tuple(self.rule(where, raw, description) for where, raw, description in tables)
        return self.policy(rules=rules, source=source)

    def load(self, path: Path) -> PolicyT:
        """Read and parse a policy file.

        Raises:
            ValueError: ``error``: the file is not valid TOML or not a valid policy.
            OSError: The file cannot be read.
        """
        return self.parse(load_toml(path, self.error), str(path))


class ReloadingPolicy(Generic[PolicyT]):
    """The policy in force: a default, or a file re-read when it changes.

    The file's mtime is checked at most once per interval. A file that cannot be read or
    does not parse keeps the policy in force, with one error in the log per edit: a
    half-written or broken file must not open or close everything by accident.

    Args:
        kind: What the file is.
        path: The policy file; None for ``default``.
        default: The policy without a file.
        check_interval: Minimum seconds between two checks of the file's mtime.

    Raises:
        OSError: The file cannot be read at construction.
        ValueError: The kind's error, for an invalid file at construction (a bad
            policy must stop the service from starting).
    """

    def __init__(
        self,
        kind: PolicyKind[PolicyT],
        path: Path | None,
        *,
        default: PolicyT,
        check_interval: float,
    ) -> None:
        self.kind = kind
        self.path = path
        self._watch: FileWatch | None = None
        self.policy: PolicyT = default
        """The policy in force."""
        if path is not None:
            self._watch = FileWatch(path, check_interval=check_interval)
            self._watch.mark()
            self.policy = kind.load(path)

    def refresh(self) -> bool:
        """Re-read the file if there is one, it is time to check and it changed.

        Returns:
            True when a new policy was loaded (``policy`` changed).
        """
        if self._watch is None or self.path is None:
            return False
        name = self.kind.name
        try:
            stamp = self._watch.changed()
        except OSError as exc:
            logger.error("%s file unreadable, keeping the previous policy: %s", name, exc)
            return False
        if stamp is None:
            return False
        # Remember the change even if it fails to parse: one error per edit, not per second.
        self._watch.mark(stamp)
        try:
            policy = self.kind.load(self.path)
        except (OSError, self.kind.error) as exc:
            logger.error("%s not reloaded, keeping the previous one: %s", name, exc)
            return False
        self.policy = policy
        logger.info("%s reloaded: %d rule(s) from %s", name, len(policy.rules), self.path)
        return True
