"""Which caller may call which tool, and which calls need a person's approval.

The policy is a TOML file (``HIVEWIRE_TOOL__POLICY_FILE``)::

    # Agents may call everything but the shell tool; http_fetch needs an approval.
    [[rules]]
    callers = ["spiffe://hivewire.local/agent/*"]
    allow = ["*"]
    deny = ["shell.*"]
    require_approval = ["http_fetch"]

    # The researcher agent may also run shell tools, each call approved.
    [[rules]]
    callers = ["spiffe://hivewire.local/agent/researcher"]
    allow = ["shell.*"]
    require_approval = ["shell.*"]

Callers are SPIFFE ids, tools are tool names; both are shell-style globs (``*``, ``?``,
``[abc]``; ``*`` also matches ``/`` and ``.``). Every rule whose ``callers`` match the
caller applies: a tool is allowed when some matching rule allows it and no matching rule
denies it (deny wins), and needs approval when the tool itself says so or some matching
rule lists it in ``require_approval``. A caller no rule matches may call nothing.

Without a policy file the default applies: agents (``spiffe://hivewire.local/agent/*``)
may call every tool, and nobody else may call any.

The file is re-read when it changes (checked at most once a second); a file that fails
to parse then is logged and the previous policy stays in force.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hivewire.services.runtime import policyfile

logger = logging.getLogger(__name__)

DEFAULT_AGENT_GLOB = "spiffe://hivewire.local/agent/*"
"""Who may call every tool when no policy file is configured."""

_RULE_KEYS = frozenset({"callers", "allow", "deny", "require_approval", "description"})


class PolicyError(ValueError):
    """The policy file is malformed (the message says where)."""


@dataclass(frozen=True)
class Rule(policyfile.GlobRule):
    """One ``[[rules]]`` entry.

    Attributes:
        callers: SPIFFE id globs the rule applies to.
        allow: Tool name globs it allows.
        deny: Tool name globs it forbids (deny wins over any allow).
        description: Free text for people reading the file.
        require_approval: Tool name globs whose calls need an approval.
    """

    require_approval: tuple[str, ...] = ()


@dataclass(frozen=True)
class Decision:
    """The policy's answer for one caller and tool.

    Attributes:
        allowed: Whether the caller may call the tool.
        requires_approval: Whether the policy wants each call approved.
    """

    allowed: bool
    requires_approval: bool = False


class Policy(policyfile.GlobPolicy[Rule]):
    """A parsed tool policy: which caller may call which tool, and with whose approval."""

    def decide(self, caller: str, tool_name: str) -> Decision:
        """Whether ``caller`` may call ``tool_name``, and whether it needs approval.

        Args:
            caller: The caller's SPIFFE id ("" when it presented none).
            tool_name: The tool's name.

        Returns:
            The decision; a caller without an id or without a matching rule is denied.
        """
        if not caller:
            return Decision(False)
        rules = self.applying(caller)
        if not self.permits(rules, tool_name):
            return Decision(False)
        approval = any(policyfile.matches(tool_name, rule.require_approval) for rule in rules)
        return Decision(True, approval)


DEFAULT_POLICY = Policy(
    rules=(
        Rule(
            callers=(DEFAULT_AGENT_GLOB,),
            allow=("*",),
            description="default: agents may call every tool",
        ),
    ),
    source="default",
)
"""The policy in force when no file is configured."""


def _rule(where: str, raw: Mapping[str, Any], description: str) -> Rule:
    lists = ("callers", "allow", "deny", "require_approval")
    found = {
        key: policyfile.globs(raw.get(key, []), f"{where}.{key}", PolicyError) for key in lists
    }
    return Rule(**found, description=description)


TOOL_POLICY_FILE = policyfile.PolicyKind("tool policy", PolicyError, _RULE_KEYS, _rule, Policy)
"""The tool policy file: how it is read (:class:`PolicyStore` reloads it).

Its errors are :class:`PolicyError`: unknown keys, wrong types or a rule without callers.
"""

parse_policy = TOOL_POLICY_FILE.parse
"""Build a policy from a parsed TOML document (``{"rules": [...]}``)."""

load_policy = TOOL_POLICY_FILE.load
"""Read and parse a policy file (:class:`PolicyError`, ``OSError``)."""


class PolicyStore:
    """The policy in force: the default, or a file re-read when it changes."""

    def __init__(self, path: Path | None, *, check_interval: float = 1.0) -> None:
        """Load the policy.

        Args:
            path: The policy file, or None for :data:`DEFAULT_POLICY`.
            check_interval: Minimum seconds between checks of the file's mtime.

        Raises:
            PolicyError: The file is invalid (a bad policy must stop the service from
                starting rather than silently allow or deny everything).
            OSError: The file cannot be read.
        """
        self._file = policyfile.ReloadingPolicy(
            TOOL_POLICY_FILE, path, default=DEFAULT_POLICY, check_interval=check_interval
        )
        if path is None:
            logger.info("tool policy: default (agents may call every tool)")
        else:
            logger.info("tool policy: %d rule(s) from %s", len(self._file.policy.rules), path)

    @property
    def policy(self) -> Policy:
        """The current policy (re-read first if the file changed)."""
        self._file.refresh()
        return self._file.policy
