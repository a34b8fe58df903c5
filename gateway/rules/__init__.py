"""Rule files in, decisions out: ``load_rules(folder).decide(request, usage)``.

Pure: nothing here touches the network, the store or the clock; only the
loader reads files.
"""

from .engine import (
    ActionKind,
    Budget,
    BudgetUsage,
    CompiledRule,
    Decision,
    Explanation,
    ExplanationStep,
    RuleRequest,
    RuleSet,
)
from .loader import RuleProblem, RulesError, check_rules, load_rules, parse_duration, parse_rules

__all__ = [
    "ActionKind",
    "Budget",
    "BudgetUsage",
    "CompiledRule",
    "Decision",
    "Explanation",
    "ExplanationStep",
    "RuleProblem",
    "RuleRequest",
    "RuleSet",
    "RulesError",
    "check_rules",
    "load_rules",
    "parse_duration",
    "parse_rules",
]
