"""The rule set in force, swapped atomically on reload; a failed reload keeps the old one."""

from __future__ import annotations

import logging
from pathlib import Path

from gateway.rules import RulesError, RuleSet, load_rules

log = logging.getLogger("cosigner.rules")


class Policy:
    """Holds the current immutable RuleSet."""

    def __init__(self, directory: Path, rules: RuleSet) -> None:
        self.directory = directory
        self.current = rules
        self.reloads = 0
        self.failed_reloads = 0
        self.last_error: RulesError | None = None  # why the last reload failed, until one works

    @classmethod
    def load(cls, directory: Path) -> Policy:
        """Load at startup; an invalid file raises RulesError (startup stops)."""
        return cls(directory, load_rules(directory))

    def reload(self) -> bool:
        """Validate the folder whole and swap; on any problem keep the old rules."""
        try:
            rules = load_rules(self.directory)
        except RulesError as exc:
            self.failed_reloads += 1
            self.last_error = exc
            log.error("rule reload failed, previous rules stay in force:\n%s", exc)
            return False
        self.current = rules
        self.reloads += 1
        self.last_error = None
        log.info("rules reloaded from %s (%d rules)", self.directory, len(rules.rules))
        return True
