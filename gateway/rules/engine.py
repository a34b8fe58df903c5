"""The compiled, immutable rule set: ``RuleSet.decide`` runs on every proxied request.

Pure by design: no I/O, no clock, no store. Budget usage is handed in by the
caller, so ``decide`` and ``explain`` give the same answer offline.

``decide`` and ``explain`` run the same tests in the same order: ``explain``
through ``_evaluate``, which says why at each step, ``decide`` through rules
prepared once per rule set (``_Plan``), which says nothing. Both decide a
condition with ``_judge`` and write why a rule matched with ``_matched_why``;
``decide`` only when its decision's ``reason`` is read. So the ``reason`` of a
decision and the text of an explanation are written by the same code, from what
the tests saw, and cannot drift apart.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any, Literal, NamedTuple

ActionKind = Literal["allow", "hold", "deny"]
OpKind = Literal["eq", "ne", "lt", "lte", "gt", "gte", "in", "not_in", "exists", "matches"]
Number = int | Decimal

READ_METHODS = frozenset({"GET", "HEAD"})
# The methods a canonical request can have (gateway.canonical.METHODS): rules are indexed by them.
INDEXED_METHODS = ("GET", "HEAD", "POST", "DELETE")
DEFAULT_EXPIRES_AFTER = 86400

# Stripe's own parse of a number: no sign but '-', no spaces, no leading zeros, no hex,
# no exponent. ASCII classes on purpose: \d would accept other scripts' digits.
_NUMBER = re.compile(r"-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?")
_INTEGER = re.compile(r"-?(?:0|[1-9][0-9]*)")
_INDEX = re.compile(r"0|[1-9][0-9]*")


class RuleRequest(NamedTuple):
    """What the rules see of one request (a NamedTuple: made for every request)."""

    method: str
    path: str
    params: Mapping[str, Any]
    agent: str = ""
    account: str | None = None


@dataclass(frozen=True, slots=True)
class Budget:
    """A rule's budget: it matches only while the request fits."""

    count: int | None
    sum_field: str | None
    sum_max: int | None
    per: int
    scope: Literal["agent", "global"]


@dataclass(frozen=True, slots=True)
class BudgetUsage:
    """What a budget has already counted in its window."""

    count: int = 0
    total: int = 0


@dataclass(frozen=True, slots=True)
class _Verdict:
    """What a decision says that does not depend on the request: one per rule, and per default."""

    action: ActionKind
    rule: str
    message: str | None = None
    reviewers: tuple[str, ...] = ()
    approvals: int = 1
    expires_after: int = DEFAULT_EXPIRES_AFTER
    editable: tuple[str, ...] = ()
    callback: str | None = None
    budget: Budget | None = None
    source: str | None = None


class Decision:
    """What to do with a request, which rule said so, and why.

    Immutable: every field is a read-only property over one private slot, which
    only this module writes (a plain slot is far cheaper to fill than the frozen
    dataclass this was, and ``decide`` makes one per matched request).

    ``reason`` is written when it is first read: most decisions (an allowed
    request) are never asked why. ``decide`` keeps what the text is made of (the
    rule, the request and the values its conditions saw) and the code that writes
    ``explain``'s text writes it then, so it reads exactly as if written at once.
    """

    __slots__ = ("_state",)
    __match_args__ = (
        "action",
        "rule",
        "reason",
        "message",
        "reviewers",
        "approvals",
        "expires_after",
        "editable",
        "callback",
        "budget",
        "source",
        "budget_amount",
    )

    # The rule's constant part, the reason (or what it is written from), the budget amount.
    _state: tuple[_Verdict, str | _Hit, int | None]

    def __init__(
        self,
        action: ActionKind,
        rule: str,
        reason: str,
        message: str | None = None,
        reviewers: tuple[str, ...] = (),
        approvals: int = 1,
        expires_after: int = DEFAULT_EXPIRES_AFTER,
        editable: tuple[str, ...] = (),
        callback: str | None = None,
        budget: Budget | None = None,
        source: str | None = None,
        budget_amount: int | None = None,
    ) -> None:
        verdict = _Verdict(
            action=action,
            rule=rule,
            message=message,
            reviewers=reviewers,
            approvals=approvals,
            expires_after=expires_after,
            editable=editable,
            callback=callback,
            budget=budget,
            source=source,
        )
        self._state = (verdict, reason, budget_amount)

    @property
    def action(self) -> ActionKind:
        return self._state[0].action

    @property
    def rule(self) -> str:
        return self._state[0].rule

    @property
    def reason(self) -> str:
        verdict, reason, amount = self._state
        if isinstance(reason, str):
            return reason
        text = _matched_reason(*reason)
        self._state = (verdict, text, amount)  # written once: the same text every time
        return text

    @property
    def message(self) -> str | None:
        return self._state[0].message

    @property
    def reviewers(self) -> tuple[str, ...]:
        return self._state[0].reviewers

    @property
    def approvals(self) -> int:
        return self._state[0].approvals

    @property
    def expires_after(self) -> int:
        return self._state[0].expires_after

    @property
    def editable(self) -> tuple[str, ...]:
        return self._state[0].editable

    @property
    def callback(self) -> str | None:
        return self._state[0].callback

    @property
    def budget(self) -> Budget | None:
        return self._state[0].budget

    @property
    def source(self) -> str | None:
        return self._state[0].source

    @property
    def budget_amount(self) -> int | None:
        return self._state[2]

    # Compared, hashed, shown and pickled as the dataclass it was: field by field.

    def _fields(self) -> tuple[Any, ...]:
        return tuple(getattr(self, name) for name in self.__match_args__)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Decision) or other.__class__ is not self.__class__:
            return NotImplemented
        return self._fields() == other._fields()

    def __hash__(self) -> int:
        return hash(self._fields())

    def __repr__(self) -> str:
        shown = ", ".join(f"{name}={getattr(self, name)!r}" for name in self.__match_args__)
        return f"Decision({shown})"

    def __reduce__(self) -> tuple[type[Decision], tuple[Any, ...]]:
        return Decision, self._fields()


_new_decision = object.__new__


@dataclass(frozen=True, slots=True)
class Operand:
    """A scalar from a rule file, prepared for comparison."""

    number: Number | None
    text: str
    shown: str


@dataclass(frozen=True, slots=True)
class Condition:
    """One operator on one dotted field path."""

    field: str
    parts: tuple[str, ...]
    op: OpKind
    operands: tuple[Operand, ...] = ()  # one for eq/ne/lt/lte/gt/gte, the list for in/not_in
    flag: bool = False  # exists
    regex: re.Pattern[str] | None = None  # matches

    def describe(self) -> str:
        """The operator as a rule author wrote it, e.g. ``lte 5000``."""
        if self.op == "exists":
            return f"exists: {'true' if self.flag else 'false'}"
        if self.op == "matches":
            assert self.regex is not None
            return f"matches {self.regex.pattern!r}"
        if self.op in ("in", "not_in"):
            return f"{self.op} [{', '.join(o.shown for o in self.operands)}]"
        return f"{self.op} {self.operands[0].shown}"


@dataclass(frozen=True, slots=True)
class CompiledRule:
    """A validated rule with its matchers compiled."""

    name: str
    source: str
    action: ActionKind
    index: int = 1  # position in its file, from 1
    description: str | None = None
    methods: frozenset[str] | None = None
    path: str | None = None
    path_regex: re.Pattern[str] | None = None
    agents: frozenset[str] | None = None
    accounts: frozenset[str] | None = None
    conditions: tuple[Condition, ...] = ()
    budget: Budget | None = None
    sum_parts: tuple[str, ...] = ()  # budget.sum_field split on '.'
    message: str | None = None
    reviewers: tuple[str, ...] = ()
    approvals: int = 1
    expires_after: int = DEFAULT_EXPIRES_AFTER
    editable: tuple[str, ...] = ()
    callback: str | None = None


@dataclass(frozen=True, slots=True)
class ExplanationStep:
    """One rule tried, in order, and why it did or did not match."""

    rule: str
    source: str
    matched: bool
    why: str


@dataclass(frozen=True)
class Explanation:
    """Every rule tried for a request, and the decision."""

    steps: tuple[ExplanationStep, ...]
    decision: Decision
    request: RuleRequest | None = None
    usage: BudgetUsage | None = None  # of the deciding rule's budget

    def render(self) -> str:
        """Readable multi-line text for ``cosigner rules explain``."""
        lines: list[str] = []
        req = self.request
        if req is not None:
            account = req.account if req.account is not None else "(none)"
            agent = req.agent or "(none)"
            lines.append(
                f"{req.method.upper()} {_show_text(req.path)}  agent: {_show_text(agent)}"
                f"  account: {_show_text(account)}"
            )
        if not self.steps:
            lines.append("  (no rules loaded)")
        for number, step in enumerate(self.steps, 1):
            mark = "MATCH" if step.matched else "no   "
            lines.append(f"  {number:>2}. {mark} {step.rule} ({step.source}): {step.why}")
        d = self.decision
        where = f" ({d.source})" if d.source else ""
        lines.append(f"=> {d.action.upper()} by {_rule_label(d.rule)}{where}")
        lines.append(f"   reason: {d.reason}")
        if d.action == "deny" and d.message:
            lines.append(f"   message: {d.message}")
        if d.action == "hold":
            reviewers = ", ".join(d.reviewers) if d.reviewers else "COSIGNER_REVIEWERS"
            lines.append(
                f"   reviewers: {reviewers}; approvals needed: {d.approvals};"
                f" expires after {format_duration(d.expires_after)}"
            )
            if d.editable:
                lines.append(f"   editable: {', '.join(d.editable)}")
            if d.callback:
                lines.append(f"   callback: {d.callback}")
        if d.budget is not None:
            lines.append(f"   budget: {_budget_state(d.budget, self.usage, d.budget_amount)}")
        return "\n".join(lines)


@dataclass(frozen=True, slots=True)
class _Outcome:
    matched: bool
    why: str = ""
    amount: int | None = None  # the sum budget's field, when the rule has one


_ZERO = BudgetUsage()

# What a matched rule's reason is written from: the rule, the request's method (upper
# case), the request, what each condition saw (in order) and what its budget said.
_Hit = tuple[CompiledRule, str, RuleRequest, Sequence[Any], str | None]


class _Check(NamedTuple):
    """One condition, prepared for ``decide``."""

    cond: Condition
    parts: tuple[str, ...]
    exists: bool
    # eq, ne, in and not_in on operands none of which is a number: a string value
    # holds exactly when ``(value in texts) == positive`` (see _judge).
    texts: frozenset[str] | None
    positive: bool


class _Plan(NamedTuple):
    """One rule, prepared for ``decide``: the same tests as _evaluate, none of the words."""

    rule: CompiledRule
    literal: str | None  # the one path a pattern without wildcards matches: compared as text
    path: Callable[[str], re.Match[str] | None] | None  # else the path pattern's fullmatch
    agents: frozenset[str] | None
    accounts: frozenset[str] | None
    checks: tuple[_Check, ...]
    verdict: _Verdict


def _check(cond: Condition) -> _Check:
    texts: frozenset[str] | None = None
    if cond.op in ("eq", "ne", "in", "not_in") and all(o.number is None for o in cond.operands):
        texts = frozenset(operand.text for operand in cond.operands)
    return _Check(cond, cond.parts, cond.op == "exists", texts, cond.op in ("eq", "in"))


def _plan(rule: CompiledRule) -> _Plan:
    verdict = _Verdict(
        action=rule.action,
        rule=rule.name,
        message=_message(rule),
        reviewers=rule.reviewers,
        approvals=rule.approvals,
        expires_after=rule.expires_after,
        editable=rule.editable,
        callback=rule.callback,
        budget=rule.budget,
        source=rule.source,
    )
    literal = _literal_path(rule)
    path = rule.path_regex.fullmatch if rule.path_regex is not None and literal is None else None
    checks = tuple(_check(cond) for cond in rule.conditions)
    return _Plan(rule, literal, path, rule.agents, rule.accounts, checks, verdict)


def _literal_path(rule: CompiledRule) -> str | None:
    """The path itself when the rule's pattern has no wildcard, else None."""
    if rule.path is None or rule.path_regex is None or "*" in rule.path:
        return None
    # Without '*', compile_path escapes the pattern whole: it fullmatches that one string.
    return rule.path if rule.path_regex == compile_path(rule.path) else None


@dataclass(frozen=True, slots=True)
class RuleSet:
    """An immutable, ordered rule set; swap the whole object to reload."""

    rules: tuple[CompiledRule, ...] = ()
    default_read: ActionKind = "allow"
    default_write: ActionKind = "hold"
    defaults_source: str | None = None  # the file that declared the defaults, if any
    # Built once: per method, the rules that can match it (in order) and the default decision.
    _by_method: dict[str, tuple[tuple[_Plan, ...], Decision]] = field(
        init=False, repr=False, compare=False, default_factory=dict
    )
    _plans: tuple[_Plan, ...] = field(init=False, repr=False, compare=False, default=())
    has_budgets: bool = field(init=False, repr=False, compare=False, default=False)
    # Per field, the rules with a condition on it (in order): see ``may_test``.
    _testing: dict[str, tuple[CompiledRule, ...]] = field(
        init=False, repr=False, compare=False, default_factory=dict
    )

    def __post_init__(self) -> None:
        object.__setattr__(self, "_plans", tuple(_plan(rule) for rule in self.rules))
        for method in INDEXED_METHODS:
            self._by_method[method] = self._for_method(method)
        object.__setattr__(self, "has_budgets", any(r.budget is not None for r in self.rules))
        for rule in self.rules:
            for name in dict.fromkeys(cond.field for cond in rule.conditions):
                self._testing[name] = (*self._testing.get(name, ()), rule)

    def decide(self, req: RuleRequest, usage: Mapping[str, BudgetUsage] | None = None) -> Decision:
        """The first matching rule's decision, or the default one.

        The same tests as ``explain`` (``_evaluate``), in the same order, without
        writing why: the reason is written only if it is read.
        """
        method = req.method.upper()
        # A rule for other methods would miss on the method: only these can match.
        plans, default = self._by_method.get(method) or self._for_method(method)
        for rule, literal, path, agents, accounts, checks, verdict in plans:
            if literal is not None:
                if req.path != literal:
                    continue
            elif path is not None and path(req.path) is None:
                continue
            if agents is not None and req.agent not in agents:
                continue
            if accounts is not None and (req.account is None or req.account not in accounts):
                continue
            values: Sequence[Any] = ()
            if checks:
                seen = _check_all(checks, req.params)
                if seen is None:
                    continue
                values = seen
            amount: int | None = None
            budget_why: str | None = None
            if rule.budget is not None:
                used = _usage_of(usage, rule.name)
                fits, budget_why, amount = _fit_budget(
                    rule.budget, rule.sum_parts, used, req.params
                )
                if not fits:
                    continue
            # The reason is written if read (Decision.reason), from what the tests saw.
            decision: Decision = _new_decision(Decision)
            decision._state = (verdict, (rule, method, req, values, budget_why), amount)
            return decision
        return default

    def explain(
        self, req: RuleRequest, usage: Mapping[str, BudgetUsage] | None = None
    ) -> Explanation:
        """Every rule tried up to the deciding one, each with why it did (not) match."""
        method = req.method.upper()
        steps: list[ExplanationStep] = []
        for rule in self.rules:
            outcome = _evaluate(rule, req, method, usage)
            steps.append(ExplanationStep(rule.name, rule.source, outcome.matched, outcome.why))
            if outcome.matched:
                used = _usage_of(usage, rule.name) if rule.budget is not None else None
                return Explanation(tuple(steps), _rule_decision(rule, outcome), req, used)
        return Explanation(tuple(steps), self._default_decision(method), req)

    def budgeted_rules(self) -> tuple[CompiledRule, ...]:
        """The rules that carry a budget."""
        return tuple(rule for rule in self.rules if rule.budget is not None)

    def may_test(self, method: str, path: str, name: str) -> bool:
        """Could a rule for this method (upper case) and path test the field ``name``?"""
        for rule in self._testing.get(name, ()):
            if rule.methods is not None and method not in rule.methods:
                continue
            if rule.path_regex is None or rule.path_regex.fullmatch(path) is not None:
                return True
        return False

    def _for_method(self, method: str) -> tuple[tuple[_Plan, ...], Decision]:
        """The rules that can match this method (in order), and its default decision."""
        plans = tuple(p for p in self._plans if p.rule.methods is None or method in p.rule.methods)
        return plans, self._default_decision(method)

    def _default_decision(self, method: str) -> Decision:
        if method in READ_METHODS:
            kind, action = "read", self.default_read
        else:
            kind, action = "write", self.default_write
        message = "No rule allows this request." if action == "deny" else None
        return Decision(
            action=action,
            rule=f"defaults.{kind}",
            reason=f"no rule matched; the default for a {kind} ({method}) is {action}",
            message=message,
            source=self.defaults_source,
        )


def _check_all(checks: tuple[_Check, ...], params: Mapping[str, Any]) -> list[Any] | None:
    """What each condition saw, if all of them hold; None at the first that does not."""
    values: list[Any] = []
    for cond, parts, exists, texts, positive in checks:
        # _resolve, inline while the params are plain dicts (as parsed): that is the same walk.
        value: Any = params
        for part in parts:
            if type(value) is not dict:
                present, value = _resolve(params, parts)
                break
            value = value.get(part)
        else:
            present = value is not None
        if exists:
            holds = present == cond.flag
        elif texts is not None and present and type(value) is str:
            holds = (value in texts) == positive
        else:
            holds = _judge(cond, present, value)[0]
        if not holds:
            return None
        values.append(value)
    return values


def _message(rule: CompiledRule) -> str | None:
    if rule.action == "deny" and rule.message is None:
        return f"Denied by rule '{rule.name}'."
    return rule.message


def _rule_decision(rule: CompiledRule, outcome: _Outcome) -> Decision:
    return Decision(
        action=rule.action,
        rule=rule.name,
        reason=_reason(rule, outcome.why),
        message=_message(rule),
        reviewers=rule.reviewers,
        approvals=rule.approvals,
        expires_after=rule.expires_after,
        editable=rule.editable,
        callback=rule.callback,
        budget=rule.budget,
        source=rule.source,
        budget_amount=outcome.amount,
    )


def _reason(rule: CompiledRule, why: str) -> str:
    return f"rule '{rule.name}' ({rule.source}) matched: {why}"


def _matched_reason(
    rule: CompiledRule,
    method: str,
    req: RuleRequest,
    values: Sequence[Any],
    budget_why: str | None,
) -> str:
    return _reason(rule, _matched_why(rule, method, req, values, budget_why))


def _matched_why(
    rule: CompiledRule,
    method: str,
    req: RuleRequest,
    values: Sequence[Any],
    budget_why: str | None,
) -> str:
    """Why a rule matched: what each of its tests saw (``values``: one per condition)."""
    hit = [f"{method} {_show_text(req.path)}"]
    if rule.agents is not None:
        hit.append(f"agent {_show_text(req.agent)}")
    if rule.accounts is not None:
        assert req.account is not None
        hit.append(f"account {_show_text(req.account)}")
    for cond, value in zip(rule.conditions, values, strict=True):
        # A held condition saw its field unless it asked for it to be absent.
        present = cond.flag if cond.op == "exists" else True
        hit.append(_test(cond, present, value)[1])
    if budget_why is not None:
        hit.append(budget_why)
    return ", ".join(hit)


def _evaluate(
    rule: CompiledRule, req: RuleRequest, method: str, usage: Mapping[str, BudgetUsage] | None
) -> _Outcome:
    """Does ``rule`` match ``req``, and why (not)? What ``explain`` shows.

    Checks run cheapest first and stop at the first miss. ``RuleSet.decide`` runs
    the same checks in the same order without the words (conditions through
    ``_judge``, as here), and has ``_matched_why`` write its reason, as here.
    """
    if rule.methods is not None and method not in rule.methods:
        return _Outcome(False, f"method {method} is not {_one_of(sorted(rule.methods))}")
    if rule.path_regex is not None and rule.path_regex.fullmatch(req.path) is None:
        return _Outcome(False, f"path {_show_text(req.path)} does not match {rule.path}")
    if rule.agents is not None and req.agent not in rule.agents:
        agent = _show_text(req.agent) if req.agent else "(none)"
        return _Outcome(False, f"agent {agent} is not {_one_of(sorted(rule.agents))}")
    if rule.accounts is not None and (req.account is None or req.account not in rule.accounts):
        account = "(no Stripe-Account header)" if req.account is None else req.account
        wanted = _one_of(sorted(rule.accounts))
        return _Outcome(False, f"account {_show_text(account)} is not {wanted}")
    values: list[Any] = []
    for cond in rule.conditions:
        present, value = _resolve(req.params, cond.parts)
        ok, why = _test(cond, present, value)
        if not ok:
            return _Outcome(False, why)
        values.append(value)
    amount: int | None = None
    budget_why: str | None = None
    if rule.budget is not None:
        used = _usage_of(usage, rule.name)
        fits, budget_why, amount = _fit_budget(rule.budget, rule.sum_parts, used, req.params)
        if not fits:
            return _Outcome(False, budget_why)
    return _Outcome(True, _matched_why(rule, method, req, values, budget_why), amount)


def _usage_of(usage: Mapping[str, BudgetUsage] | None, name: str) -> BudgetUsage:
    if not usage:
        return _ZERO
    return usage.get(name, _ZERO)


def _resolve(params: Mapping[str, Any], parts: tuple[str, ...]) -> tuple[bool, Any]:
    """Follow a dotted path into nested params: ``metadata.order_id``, ``items.0.price``."""
    current: Any = params
    for part in parts:
        if type(current) is dict:  # parsed params: a missing key is None, and None is not carried
            current = current.get(part)
        elif isinstance(current, Mapping):
            if part not in current:
                return False, None
            current = current[part]
        elif isinstance(current, list | tuple):
            if _INDEX.fullmatch(part) is None or int(part) >= len(current):
                return False, None
            current = current[int(part)]
        else:
            return False, None
    # A JSON null is "not carried": Stripe reads null as unset, so rules do too.
    if current is None:
        return False, None
    return True, current


def to_number(value: object) -> Number | None:
    """The value as a number if it is one by Stripe's strict parse, else None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        # Through repr so that 0.1 from JSON equals 0.1 in a rule file, exactly.
        return Decimal(repr(value)) if math.isfinite(value) else None
    if isinstance(value, Decimal):
        return value if value.is_finite() else None
    if isinstance(value, str) and _NUMBER.fullmatch(value) is not None:
        if "." in value:
            return Decimal(value)
        try:
            return int(value)
        except ValueError:  # longer than int's digit limit: still a number
            return Decimal(value)
    return None


def to_text(value: object) -> str:
    """The string a non-numeric comparison uses; booleans are ``true``/``false``."""
    if isinstance(value, bool):
        return "true" if value else "false"
    return value if isinstance(value, str) else str(value)


def make_operand(value: str | int | float | bool) -> Operand:
    """Prepare a scalar from a rule file for comparison."""
    return Operand(to_number(value), to_text(value), _show(value))


def _equal(value: Any, number: Number | None, operand: Operand) -> bool:
    if number is not None and operand.number is not None:
        return number == operand.number
    return to_text(value) == operand.text


def _test(cond: Condition, present: bool, value: Any) -> tuple[bool, str]:
    """Apply one condition; the text says why it held or did not."""
    ok, failed = _judge(cond, present, value)
    field = cond.field
    if cond.op == "exists":
        if ok:
            return True, f"{field} exists" if present else f"{field} is absent"
        if present:
            return False, f"{field} is present ({_show(value)}) but must be absent"
        return False, f"{field} is missing (exists: true)"
    if failed == "missing":
        return False, f"{field} is missing (needed for {cond.describe()})"
    if failed == "not a value":
        kind = "a list" if isinstance(value, list | tuple) else "a mapping"
        return False, f"{field} is {kind}, not a value (needed for {cond.describe()})"
    shown = _show(value)
    if failed:
        return False, f"{field} {shown} is {failed} (needed for {cond.describe()})"
    if ok:
        return True, f"{field} {shown} {cond.describe()}"
    return False, f"{field} {shown} is not {cond.describe()}"


_Failed = Literal["", "missing", "not a value", "not a string", "not an integer", "not a number"]


def _judge(cond: Condition, present: bool, value: Any) -> tuple[bool, _Failed]:
    """Does one condition hold? When not before its comparison, which check failed.

    The one place a condition is decided: ``_test`` says why, ``decide`` does not.
    """
    op = cond.op
    if op == "exists":
        return present == cond.flag, ""
    # A missing field fails every other operator, ne and not_in included: a refund
    # without an amount must never pass a rule written for small amounts.
    if not present:
        return False, "missing"
    # Operators compare values; a whole mapping or list never satisfies one (ne included).
    if type(value) is not str and isinstance(value, Mapping | list | tuple):
        return False, "not a value"
    if op == "matches":
        assert cond.regex is not None
        if not isinstance(value, str):
            return False, "not a string"
        return cond.regex.fullmatch(value) is not None, ""
    number = to_number(value)
    # Stripe reads an integer field only in integer form: to it "500.0" is no 500 (it
    # refuses the request), so against an integer operand a decimal value satisfies no
    # operator, ne and not_in included. "-500" is an integer and compares as -500;
    # where a negative amount is invalid, Stripe refuses it.
    if number is not None and not _is_integer(value, number) and _integral(cond):
        return False, "not an integer"
    if op in ("lt", "lte", "gt", "gte"):
        if number is None:
            return False, "not a number"
        limit = cond.operands[0].number
        assert limit is not None
        if op == "lt":
            return number < limit, ""
        if op == "lte":
            return number <= limit, ""
        if op == "gt":
            return number > limit, ""
        return number >= limit, ""
    if op in ("eq", "ne"):
        return _equal(value, number, cond.operands[0]) == (op == "eq"), ""
    # in, not_in
    found = any(_equal(value, number, operand) for operand in cond.operands)
    return found == (op == "in"), ""


def _is_integer(value: object, number: Number) -> bool:
    """Is this number (``to_number(value)``) written as a strict integer?"""
    # A string without '.' that to_number accepted is an integer, even one too long for int.
    return type(number) is int or (isinstance(value, str) and "." not in value)


def _integral(cond: Condition) -> bool:
    """Does the condition name an integer (``lte: 1000``), not a decimal (``lte: 0.5``)?"""
    return any(type(operand.number) is int for operand in cond.operands)


def _fit_budget(
    budget: Budget, sum_parts: tuple[str, ...], used: BudgetUsage, params: Mapping[str, Any]
) -> tuple[bool, str, int | None]:
    """Does this request fit the budget, itself included? The text says how full it is."""
    per = format_duration(budget.per)
    parts: list[str] = []
    if budget.count is not None:
        if used.count + 1 > budget.count:
            return False, f"over budget: {used.count}/{budget.count} used in {per}", None
        parts.append(f"budget {used.count + 1}/{budget.count} in {per}")
    amount: int | None = None
    if budget.sum_field is not None and budget.sum_max is not None:
        present, raw = _resolve(params, sum_parts)
        amount = _strict_amount(raw) if present else None
        # Safe side: an amount the budget cannot count does not fit, so the next rule
        # (usually a hold) decides instead of an unlimited allow.
        if not present:
            return False, f"over budget: {budget.sum_field} is missing (the sum needs it)", None
        if amount is None:
            shown = _show(raw)
            why = f"over budget: {budget.sum_field} {shown} is not a whole non-negative number"
            return False, why, None
        total = used.total + amount
        if total > budget.sum_max:
            why = f"over budget: {used.total} used + {amount} > {budget.sum_max} in {per}"
            return False, why, None
        parts.append(f"sum {used.total} + {amount} <= {budget.sum_max} in {per}")
    return True, ", ".join(parts), amount


def _strict_amount(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        number = value
    elif isinstance(value, str) and _INTEGER.fullmatch(value) is not None:
        try:
            number = int(value)
        except ValueError:  # beyond int's digit limit: no budget is that large
            return None
    else:
        return None
    # Negative amounts would give budget back; Stripe refuses them anyway.
    return number if number >= 0 else None


def _budget_state(budget: Budget, used: BudgetUsage | None, amount: int | None) -> str:
    used = used or _ZERO
    parts: list[str] = []
    if budget.count is not None:
        left = budget.count - used.count - 1
        parts.append(f"{used.count}/{budget.count} used before this request, {left} left after it")
    if budget.sum_max is not None and budget.sum_field is not None:
        this = amount if amount is not None else 0
        left = budget.sum_max - used.total - this
        parts.append(
            f"{budget.sum_field} {used.total} used + {this} of {budget.sum_max},"
            f" {left} left after it"
        )
    return f"{'; '.join(parts)} (per {format_duration(budget.per)}, scope {budget.scope})"


def compile_path(pattern: str) -> re.Pattern[str]:
    """Compile a path pattern: ``*`` is within one segment, ``**`` any number of segments.

    Raises ValueError with a readable message for a bad pattern.
    """
    if not pattern.startswith("/"):
        raise ValueError(f"path pattern {pattern!r} must start with '/'")
    if "?" in pattern or "#" in pattern:
        raise ValueError("path pattern must not contain '?' or '#': match parameters with 'when'")
    if pattern == "/":
        return re.compile("/")
    if pattern.endswith("/"):
        raise ValueError("path pattern must not end with '/': paths are matched without it")
    segments = pattern[1:].split("/")
    # At most one '**' and one '*' per segment keeps every match linear in the path's
    # length: paths come from agents, and nested wildcards backtrack polynomially.
    if segments.count("**") > 1:
        raise ValueError("path pattern may use '**' only once")
    parts: list[str] = []
    for segment in segments:
        if segment == "":
            raise ValueError("path pattern has an empty segment ('//')")
        if segment in (".", ".."):
            raise ValueError("path pattern must not contain '.' or '..' segments")
        if segment == "**":
            parts.append("(?:/[^/]+)*")
        elif "**" in segment:
            raise ValueError(f"'**' must be a whole segment, not part of {segment!r}")
        elif segment == "*":
            parts.append("/[^/]+")
        elif segment.count("*") > 1:
            raise ValueError(f"a path segment may use '*' only once, not {segment!r}")
        else:
            parts.append("/" + "[^/]*".join(re.escape(piece) for piece in segment.split("*")))
    body = "".join(parts)
    if segments == ["**"]:
        body = f"(?:{body}|/)"  # '/**' matches everything, the root included
    return re.compile(body)


def format_duration(seconds: int) -> str:
    """Seconds as the shortest exact unit: ``24h``, ``7d``, ``90s``."""
    if seconds % 86400 == 0 and seconds > 2 * 86400:
        return f"{seconds // 86400}d"
    if seconds % 3600 == 0:
        return f"{seconds // 3600}h"
    if seconds % 60 == 0:
        return f"{seconds // 60}m"
    return f"{seconds}s"


def _rule_label(rule: str) -> str:
    return rule if rule.startswith("defaults.") else f"rule '{rule}'"


def _one_of(items: Sequence[str]) -> str:
    if len(items) == 1:
        return _show_text(items[0])
    return "one of " + ", ".join(_show_text(item) for item in items)


_MAX_SHOWN = 60


def _show_text(text: str) -> str:
    """Request text in a reason: as is when plain, quoted with escapes when not."""
    if len(text) > _MAX_SHOWN:
        return repr(text[:_MAX_SHOWN]) + "..."
    if text and text.isprintable() and " " not in text and "'" not in text:
        return text
    return repr(text)


def _show(value: object) -> str:
    """A value in a reason: numbers bare, other strings quoted so '+5000' shows its '+'."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | Decimal):
        return str(value)
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, str):
        if _NUMBER.fullmatch(value) is not None and len(value) <= _MAX_SHOWN:
            return value
        if len(value) > _MAX_SHOWN:
            return repr(value[:_MAX_SHOWN]) + "..."
        return repr(value)
    if isinstance(value, Mapping):
        return "{...}"
    if isinstance(value, list | tuple):
        return "[...]"
    return repr(value)[:_MAX_SHOWN]
