"""Budgets: decide with live usage, and take the deciding rule's budget atomically.

The rules engine is pure: it decides from a usage snapshot it is handed. This
module feeds it. A budget only ever shrinks a rule's reach (more usage never
makes a rule match), so the decision with *no* usage is the right one unless
its rule has a budget — requests whose deciding rule has none pay nothing here.
When it has one, the store recounts that rule's window and records this
request in the same transaction, only if it still fits ("every request the
rule matched counts", whatever its action). If it no longer fits (the budget
is spent, or another request raced us to the last unit), the real tally goes
into the snapshot and the rules decide again: the next rule decides.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gateway.rules import Budget, BudgetUsage, CompiledRule, Decision, RuleRequest, RuleSet
from gateway.rules.engine import format_duration
from gateway.store.base import BudgetTally, Store


def scope_key(budget: Budget, agent: str) -> str:
    """Whose usage a budget counts: one agent's (``agent:<name>``) or everyone's."""
    return "global" if budget.scope == "global" else f"agent:{agent}"


@dataclass(frozen=True, slots=True)
class Reservation:
    """This request's entry in a rule's budget."""

    rule: str
    budget: Budget
    scope_key: str
    before: BudgetUsage  # the window's usage before this request
    amount: int  # what this request added to the sum (0 without a sum budget)
    ref: str  # the request id the entry is recorded under

    def as_context(self) -> dict[str, Any]:
        """The budget line of an action's context: what this request used, and what is left."""
        b = self.budget
        out: dict[str, Any] = {
            "rule": self.rule,
            "scope": self.scope_key,
            "per": format_duration(b.per),
            "request_id": self.ref,
        }
        if b.count is not None:
            out["count"] = {"used": self.before.count + 1, "max": b.count}
        if b.sum_max is not None:
            out["sum"] = {
                "field": b.sum_field,
                "used": self.before.total + self.amount,
                "max": b.sum_max,
            }
        return out


class Budgets:
    """Decides requests against the rules with real budget usage from the store."""

    def __init__(self, store: Store, *, clock: Callable[[], float] = time.time) -> None:
        self._store = store
        self._clock = clock

    async def decide(
        self, rules: RuleSet, req: RuleRequest, ref: str, first: Decision | None = None
    ) -> tuple[Decision, Reservation | None]:
        """The decision, and the budget entry taken for it if its rule has a budget.

        ``first``: ``rules.decide(req)`` when the caller already has it (the proxy asks
        only when a budgeted rule matched).
        """
        decision = rules.decide(req) if first is None else first
        # The hot path: no budget in play, no store access.
        if not rules.has_budgets or decision.budget is None:
            return decision, None
        now = self._clock()
        usage: dict[str, BudgetUsage] = {}
        while decision.budget is not None:
            if decision.rule in usage:
                # The engine and the store apply the same test to the same tally.
                raise RuntimeError(f"budget of rule {decision.rule!r}: engine and store disagree")
            budget = decision.budget
            key = scope_key(budget, req.agent)
            amount = decision.budget_amount or 0
            taken, tally = await self._store.reserve_budget(
                decision.rule,
                key,
                now - budget.per,
                count_max=budget.count,
                sum_max=budget.sum_max,
                amount=amount,
                ts=now,
                ref=ref,
            )
            before = BudgetUsage(tally.count, tally.total)
            if taken:
                return decision, Reservation(decision.rule, budget, key, before, amount, ref)
            usage[decision.rule] = before
            decision = rules.decide(req, usage)
        return decision, None


async def usage_for(store: Store, rules: RuleSet, agent: str, now: float) -> dict[str, BudgetUsage]:
    """Every budgeted rule's usage as ``agent`` would be counted (for ``rules explain``)."""
    usage: dict[str, BudgetUsage] = {}
    for rule in rules.budgeted_rules():
        assert rule.budget is not None
        key = scope_key(rule.budget, agent)
        tally = (await store.budget_usage(rule.name, now - rule.budget.per, key)).get(key)
        if tally is not None:
            usage[rule.name] = BudgetUsage(tally.count, tally.total)
    return usage


async def usage_from_database(
    database: str, rules: RuleSet, agent: str, now: float
) -> tuple[dict[str, BudgetUsage], str]:
    """Usage read from the configured database, and a note saying where it came from.

    A missing SQLite file is not created: budgets are then shown unused.
    """
    from gateway.settings import display_url
    from gateway.store import store_from_url

    if not rules.budgeted_rules():
        return {}, ""
    shown = display_url(database)  # never the password
    if database.startswith("sqlite:///"):
        path = Path(database.removeprefix("sqlite:///") or "cosigner.db").expanduser()
        if not path.exists():
            return {}, f"no database at {path}: budgets shown unused"
        shown = str(path)
    store = store_from_url(database)
    await store.open()
    try:
        usage = await usage_for(store, rules, agent, now)
    finally:
        await store.close()
    if agent:
        return usage, f"budget usage read from {shown} (agent {agent})"
    return usage, f"budget usage read from {shown}; without --agent, agent budgets show none used"


@dataclass(frozen=True, slots=True)
class BudgetState:
    """How full one budget is, for one scope: what the dashboard shows."""

    rule: str
    source: str
    scope: str  # "agent" or "global"
    agent: str | None  # the agent, for agent-scoped budgets; None when no agent used it
    per: int  # window, seconds
    count_used: int
    count_max: int | None
    sum_field: str | None
    sum_used: int
    sum_max: int | None

    @property
    def count_left(self) -> int | None:
        """Matches left in the window, or None without a count."""
        return None if self.count_max is None else max(self.count_max - self.count_used, 0)

    @property
    def sum_left(self) -> int | None:
        """Sum left in the window, or None without a sum."""
        return None if self.sum_max is None else max(self.sum_max - self.sum_used, 0)

    def describe(self) -> str:
        """``3/10 used, 7 left; amount 4500/20000 used, 15500 left (per 24h)``."""
        parts: list[str] = []
        if self.count_max is not None:
            parts.append(f"{self.count_used}/{self.count_max} used, {self.count_left} left")
        if self.sum_max is not None:
            parts.append(
                f"{self.sum_field} {self.sum_used}/{self.sum_max} used, {self.sum_left} left"
            )
        return f"{'; '.join(parts)} (per {format_duration(self.per)})"


async def budget_state(store: Store, rules: RuleSet, now: float) -> list[BudgetState]:
    """Every budget of the rule set, one entry per scope that used it in its window.

    A global budget always has one entry. An agent-scoped budget has one per
    agent that used it; when none did, one entry with ``agent=None`` and zero use.
    """
    states: list[BudgetState] = []
    for rule in rules.budgeted_rules():
        assert rule.budget is not None
        tallies = await store.budget_usage(rule.name, now - rule.budget.per)
        if rule.budget.scope == "global":
            states.append(_state(rule, None, tallies.get("global", BudgetTally())))
            continue
        agents = {k.removeprefix("agent:"): t for k, t in tallies.items() if k.startswith("agent:")}
        if not agents:
            states.append(_state(rule, None, BudgetTally()))
        for agent in sorted(agents):
            states.append(_state(rule, agent, agents[agent]))
    return states


def _state(rule: CompiledRule, agent: str | None, tally: BudgetTally) -> BudgetState:
    budget = rule.budget
    assert budget is not None
    return BudgetState(
        rule=rule.name,
        source=rule.source,
        scope=budget.scope,
        agent=agent,
        per=budget.per,
        count_used=tally.count,
        count_max=budget.count,
        sum_field=budget.sum_field,
        sum_used=tally.total,
        sum_max=budget.sum_max,
    )
