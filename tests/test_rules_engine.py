"""RuleSet.decide and RuleSet.explain: operators, numbers, paths, order, defaults, budgets."""

from __future__ import annotations

import copy
import pickle
import re
import textwrap
import time
from decimal import Decimal
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.rules import BudgetUsage, Decision, RuleRequest, RuleSet, parse_rules


def rules(text: str, filename: str = "10-test.yaml") -> RuleSet:
    """A RuleSet from one rule file's body (``version: 1`` is added)."""
    return parse_rules({filename: "version: 1\n" + textwrap.dedent(text)})


def request(
    method: str = "POST",
    path: str = "/v1/refunds",
    *,
    agent: str = "",
    account: str | None = None,
    **params: Any,
) -> RuleRequest:
    return RuleRequest(method=method, path=path, params=params, agent=agent, account=account)


def when(condition: str) -> RuleSet:
    """One allow rule on every path with the given ``when:`` (flow style); else hold."""
    return rules(
        f"""
        rules:
          - name: r
            match: {{path: /**}}
            when: {condition}
            action: allow
        """
    )


def holds(ruleset: RuleSet, params: dict[str, Any]) -> bool:
    """Whether the rule's condition held for these params."""
    return ruleset.decide(RuleRequest("POST", "/v1/x", params)).rule == "r"


# --- operators --------------------------------------------------------------------------

OPERATOR_CASES = [
    # eq, and a bare value meaning eq: numeric when both sides are numbers
    ("{amount: {eq: 5000}}", {"amount": "5000"}, True),
    ("{amount: 5000}", {"amount": "5000"}, True),
    ("{amount: 5000}", {"amount": 5000}, True),
    ("{amount: 5000}", {"amount": "5001"}, False),
    ("{amount: 5000}", {"amount": "05000"}, False),
    ("{amount: '5000'}", {"amount": "5000"}, True),
    ("{amount: 0.1}", {"amount": 0.1}, True),
    ("{currency: usd}", {"currency": "usd"}, True),
    ("{currency: usd}", {"currency": "USD"}, False),  # strings compare exactly
    ("{capture: true}", {"capture": "true"}, True),
    ("{capture: true}", {"capture": True}, True),
    ("{capture: false}", {"capture": "false"}, True),
    ("{capture: true}", {"capture": "1"}, False),
    ("{capture: true}", {"capture": 1}, False),  # a bool is not a number
    ("{amount: 5000}", {}, False),
    # ne: false on a missing field
    ("{currency: {ne: usd}}", {"currency": "eur"}, True),
    ("{currency: {ne: usd}}", {"currency": "usd"}, False),
    ("{currency: {ne: usd}}", {}, False),
    ("{amount: {ne: 5000}}", {"amount": "5000.00"}, False),
    # lt lte gt gte: only numbers
    ("{amount: {lt: 5000}}", {"amount": "4999"}, True),
    ("{amount: {lt: 5000}}", {"amount": "5000"}, False),
    ("{amount: {lte: 5000}}", {"amount": "5000"}, True),
    ("{amount: {lte: 5000}}", {"amount": "5001"}, False),
    ("{amount: {lte: 5000}}", {"amount": 4999}, True),
    ("{amount: {lte: 5000}}", {"amount": True}, False),
    ("{amount: {lte: 5000}}", {"amount": "small"}, False),
    ("{amount: {lte: 5000}}", {}, False),
    ("{amount: {gt: 5000}}", {"amount": "5001"}, True),
    ("{amount: {gt: 5000}}", {"amount": "5000"}, False),
    ("{amount: {gte: 5000}}", {"amount": "5000"}, True),
    ("{amount: {gte: 5000}}", {"amount": "4999.99"}, False),
    ("{amount: {gte: -1}}", {"amount": "-1"}, True),
    ("{amount: {lte: 10.5}}", {"amount": "10.50"}, True),
    ("{amount: {lte: 10.5}}", {"amount": "10.51"}, False),
    ("{amount: {lte: 10.5}}", {"amount": "10"}, True),  # an integer is a decimal too
    ("{amount: {lte: 10.5}}", {"amount": 10}, True),
    ("{amount: {lte: 10.0}}", {"amount": "10.00"}, True),
    ("{amount: {gte: 100, lte: 5000}}", {"amount": "100"}, True),
    ("{amount: {gte: 100, lte: 5000}}", {"amount": "99"}, False),
    ("{amount: {gte: 100, lte: 5000}}", {"amount": "5001"}, False),
    # in / not_in: false on a missing field
    ("{currency: {in: [usd, eur]}}", {"currency": "eur"}, True),
    ("{currency: {in: [usd, eur]}}", {"currency": "gbp"}, False),
    ("{currency: {in: [usd, eur]}}", {}, False),
    ("{amount: {in: [100, 200]}}", {"amount": "200"}, True),
    ("{amount: {in: [100, 200]}}", {"amount": "0200"}, False),
    ("{amount: {in: [0.5, 1.5]}}", {"amount": "1.50"}, True),
    ("{currency: {not_in: [usd]}}", {"currency": "eur"}, True),
    ("{currency: {not_in: [usd]}}", {"currency": "usd"}, False),
    ("{currency: {not_in: [usd]}}", {}, False),
    # exists: the only operator a missing field can satisfy (with false)
    ("{metadata.order_id: {exists: true}}", {"metadata": {"order_id": "o_1"}}, True),
    ("{metadata.order_id: {exists: true}}", {"metadata": {}}, False),
    ("{metadata.order_id: {exists: true}}", {}, False),
    ("{metadata.order_id: {exists: false}}", {}, True),
    ("{metadata.order_id: {exists: false}}", {"metadata": "flat"}, True),
    ("{metadata.order_id: {exists: false}}", {"metadata": {"order_id": ""}}, False),
    ("{amount: {exists: false}}", {"amount": None}, True),  # JSON null = not carried
    ("{amount: {lte: 5000}}", {"amount": None}, False),
    # matches: re.fullmatch, strings only
    ("{description: {matches: 'order-[0-9]+'}}", {"description": "order-12"}, True),
    ("{description: {matches: 'order-[0-9]+'}}", {"description": "order-12x"}, False),
    ("{description: {matches: 'order-[0-9]+'}}", {"description": "my order-12"}, False),
    ("{description: {matches: 'order-[0-9]+'}}", {}, False),
    ("{amount: {matches: '5'}}", {"amount": 5}, False),
    # dotted paths into nested params: mappings, lists, and lists decoded as mappings
    ("{items.0.price: {lte: 100}}", {"items": [{"price": "50"}]}, True),
    ("{items.0.price: {lte: 100}}", {"items": {"0": {"price": "50"}}}, True),
    ("{items.1.price: {lte: 100}}", {"items": [{"price": "50"}]}, False),
    ("{items.00.price: {lte: 100}}", {"items": [{"price": "50"}]}, False),
    ("{metadata.tier: gold}", {"metadata": {"tier": "gold"}}, True),
    # a mapping or list is not a value: every operator but exists is false
    ("{metadata: {eq: x}}", {"metadata": {"a": "b"}}, False),
    ("{metadata: {ne: x}}", {"metadata": {"a": "b"}}, False),
    ("{items: {not_in: [x]}}", {"items": ["y"]}, False),
    ("{metadata: {exists: true}}", {"metadata": {"a": "b"}}, True),
]


# Against an integer operand only a strict integer compares, as Stripe reads an integer
# field: a decimal ("500.0", or a JSON 500.0) satisfies no operator, ne and not_in
# included. A negative integer is an integer: it compares as itself.
INTEGER_CASES = [
    ("{amount: 5000}", {"amount": "5000.0"}, False),
    ("{amount: 5000}", {"amount": 5000.0}, False),
    ("{amount: {lte: 1000}}", {"amount": "500.0"}, False),
    ("{amount: {lte: 1000}}", {"amount": "500.00"}, False),
    ("{amount: {lte: 1000}}", {"amount": 500.0}, False),
    ("{amount: {lte: 1000}}", {"amount": "5e2"}, False),
    ("{amount: {lte: 1000}}", {"amount": "0.0"}, False),
    ("{amount: {lte: 1000}}", {"amount": "-500"}, True),
    ("{amount: {lte: 1000}}", {"amount": -500}, True),
    ("{amount: {gte: 1}}", {"amount": "-500"}, False),
    ("{amount: {gt: 100}}", {"amount": "500.5"}, False),
    ("{amount: {ne: 5000}}", {"amount": "500.0"}, False),
    ("{amount: {ne: 0}}", {"amount": "0.0"}, False),
    ("{amount: {in: [100, 200]}}", {"amount": "200.0"}, False),
    ("{amount: {not_in: [5000]}}", {"amount": "500.0"}, False),
    ("{amount: {in: ['500', usd]}}", {"amount": "500.0"}, False),
    ("{amount: {in: [100, 200]}}", {"amount": "200"}, True),
    ("{currency: {ne: 5}}", {"currency": "usd"}, True),  # not a number: compared as text
]


@pytest.mark.parametrize(("condition", "params", "expected"), OPERATOR_CASES + INTEGER_CASES)
def test_operator(condition: str, params: dict[str, Any], expected: bool) -> None:
    assert holds(when(condition), params) is expected


NOT_NUMBERS = [
    "+5000",
    "0x10",
    " 500",
    "500 ",
    "500\x00",
    "05000",
    "1e3",
    "5_000",
    "500.",
    ".5",
    "-",
    "",
    "NaN",
    "Infinity",
    "٥٠٠",  # Arabic-Indic digits: int() would accept them, Stripe would not
    "5,000",
]


@pytest.mark.parametrize("value", NOT_NUMBERS)
@pytest.mark.parametrize("op", ["lt", "lte", "gt", "gte"])
def test_strict_numbers_only(value: str, op: str) -> None:
    # Neither side of the limit: the value is not a number at all.
    assert not holds(when(f"{{amount: {{{op}: 5000}}}}"), {"amount": value})


@pytest.mark.parametrize("value", ["0", "-0", "4999", "-5", "5000"])
def test_canonical_integers_compare(value: str) -> None:
    assert holds(when("{amount: {lte: 5000}}"), {"amount": value})


@pytest.mark.parametrize("value", ["0", "0.0", "4999", "4999.99", "-5", "5000", "5000.000"])
def test_canonical_decimals_compare_with_a_decimal_operand(value: str) -> None:
    assert holds(when("{amount: {lte: 5000.0}}"), {"amount": value})
    if "." in value:  # the same decimal against an integer operand: not comparable
        assert not holds(when("{amount: {lte: 5000}}"), {"amount": value})


def test_an_integer_mismatch_is_explained() -> None:
    ruleset = when("{amount: {lte: 1000}}")
    explanation = ruleset.explain(request(amount="500.0"))
    assert explanation.decision.action == "hold"
    assert "amount 500.0 is not an integer (needed for lte 1000)" in explanation.render()


def test_huge_numbers_still_compare() -> None:
    assert not holds(when("{amount: {lte: 5000}}"), {"amount": "9" * 5000})
    assert holds(when("{amount: {gt: 5000}}"), {"amount": "9" * 5000})


@given(st.integers(), st.integers(-(10**6), 10**6))
def test_integer_strings_compare_like_integers(amount: int, limit: int) -> None:
    ruleset = when(f"{{amount: {{lte: {limit}}}}}")
    assert holds(ruleset, {"amount": str(amount)}) is (amount <= limit)


_STRIPE_NUMBER = re.compile(r"-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?")
_STRIPE_INTEGER = re.compile(r"-?(?:0|[1-9][0-9]*)")
_EITHER_SIDE_OF_ZERO = (when("{amount: {lte: 0}}"), when("{amount: {gt: 0}}"))
_EITHER_SIDE_OF_DECIMAL_ZERO = (when("{amount: {lte: 0.0}}"), when("{amount: {gt: 0.0}}"))


@given(st.text(alphabet=st.sampled_from("0123456789-+.e x\x00٥"), max_size=8) | st.text())
def test_a_string_is_a_number_only_in_strict_form(value: str) -> None:
    on_one_side = any(holds(ruleset, {"amount": value}) for ruleset in _EITHER_SIDE_OF_ZERO)
    assert on_one_side is (_STRIPE_INTEGER.fullmatch(value) is not None)
    rulesets = _EITHER_SIDE_OF_DECIMAL_ZERO
    on_one_side = any(holds(ruleset, {"amount": value}) for ruleset in rulesets)
    assert on_one_side is (_STRIPE_NUMBER.fullmatch(value) is not None)


# --- match: paths, methods, agents, accounts -------------------------------------------

PATH_CASES = [
    ("/v1/refunds", "/v1/refunds", True),
    ("/v1/refunds", "/v1/refunds/re_1", False),
    ("/v1/refunds", "/v1/refund", False),
    ("/v1/refunds", "/v1/refunds/", False),
    ("/v1/customers/*", "/v1/customers/cus_1", True),
    ("/v1/customers/*", "/v1/customers", False),
    ("/v1/customers/*", "/v1/customers/cus_1/sources", False),
    ("/v1/subscriptions/sub_*", "/v1/subscriptions/sub_123", True),
    ("/v1/subscriptions/sub_*", "/v1/subscriptions/si_123", False),
    ("/v1/subscriptions/sub_*", "/v1/subscriptions/sub_1/items", False),
    ("/v1/charges/*/refund", "/v1/charges/ch_1/refund", True),
    ("/v1/charges/*/refund", "/v1/charges/ch_1/refunds", False),
    ("/v1/charges/*/refund", "/v1/charges/a/b/refund", False),
    ("/v1/**", "/v1", True),
    ("/v1/**", "/v1/charges", True),
    ("/v1/**", "/v1/a/b/c", True),
    ("/v1/**", "/v2/charges", False),
    ("/v1/**", "/v10", False),
    ("/v1/**/refunds", "/v1/refunds", True),
    ("/v1/**/refunds", "/v1/charges/ch_1/refunds", True),
    ("/v1/**/refunds", "/v1/charges/ch_1/refunds/re_1", False),
    ("/**", "/", True),
    ("/**", "/v1/anything/at/all", True),
    ("/v1/a.b", "/v1/axb", False),  # regex characters are literal
    ("/v1/(x)", "/v1/(x)", True),
]


@pytest.mark.parametrize(("pattern", "path", "expected"), PATH_CASES)
def test_path_pattern(pattern: str, path: str, expected: bool) -> None:
    ruleset = rules(
        f"""
        rules:
          - name: r
            match: {{path: "{pattern}"}}
            action: allow
        """
    )
    assert (ruleset.decide(request("POST", path)).rule == "r") is expected


def test_path_matching_stays_fast_on_hostile_paths() -> None:
    ruleset = rules(
        """
        rules:
          - name: r
            match: {path: "/v1/**/x*y"}
            action: allow
        """
    )
    path = "/a" * 4000 + "/x" + "z" * 4000
    started = time.perf_counter()
    assert ruleset.decide(request("POST", path)).rule == "defaults.write"
    assert time.perf_counter() - started < 1.0


METHOD_CASES = [
    ("POST", "POST", True),
    ("post", "POST", True),
    ("POST", "post", True),
    ("[get, post]", "GET", True),
    ("[get, post]", "POST", True),
    ("[get, post]", "DELETE", False),
    ("DELETE", "POST", False),
]


@pytest.mark.parametrize(("methods", "method", "expected"), METHOD_CASES)
def test_method(methods: str, method: str, expected: bool) -> None:
    ruleset = rules(
        f"""
        rules:
          - name: r
            match: {{method: {methods}, path: /v1/refunds}}
            action: deny
        """
    )
    assert (ruleset.decide(request(method)).rule == "r") is expected


WHO_CASES = [
    ("{agent: billing-bot}", "billing-bot", None, True),
    ("{agent: billing-bot}", "other-bot", None, False),
    ("{agent: billing-bot}", "", None, False),
    ("{agent: [a, b]}", "b", None, True),
    ("{account: acct_1}", "a", "acct_1", True),
    ("{account: acct_1}", "a", "acct_2", False),
    ("{account: acct_1}", "a", None, False),
    ("{account: [acct_1, acct_2]}", "a", "acct_2", True),
    ("{agent: a, account: acct_1}", "a", "acct_1", True),
    ("{agent: a, account: acct_1}", "a", None, False),
]


@pytest.mark.parametrize(("match", "agent", "account", "expected"), WHO_CASES)
def test_agent_and_account(match: str, agent: str, account: str | None, expected: bool) -> None:
    ruleset = rules(
        f"""
        rules:
          - name: r
            match: {match}
            action: allow
        """
    )
    decision = ruleset.decide(request(agent=agent, account=account))
    assert (decision.rule == "r") is expected


# --- order and defaults -----------------------------------------------------------------


def test_first_match_wins_within_a_file() -> None:
    ruleset = rules(
        """
        rules:
          - {name: small, match: {path: /v1/refunds}, when: {amount: {lte: 100}}, action: allow}
          - {name: all, match: {path: /v1/refunds}, action: hold}
          - {name: never, match: {path: /v1/refunds}, action: deny}
        """
    )
    assert ruleset.decide(request(amount="50")).rule == "small"
    assert ruleset.decide(request(amount="500")).rule == "all"
    assert [rule.name for rule in ruleset.rules] == ["small", "all", "never"]


def test_first_match_wins_across_files_in_name_order() -> None:
    body = "version: 1\nrules:\n  - {{name: {0}, match: {{path: /v1/refunds}}, action: {1}}}\n"
    ruleset = parse_rules(
        {"20-b.yaml": body.format("b", "hold"), "10-a.yaml": body.format("a", "deny")}
    )
    decision = ruleset.decide(request())
    assert (decision.rule, decision.action, decision.source) == ("a", "deny", "10-a.yaml")
    assert [(rule.name, rule.source) for rule in ruleset.rules] == [
        ("a", "10-a.yaml"),
        ("b", "20-b.yaml"),
    ]


@pytest.mark.parametrize(
    ("method", "rule", "action"),
    [
        ("GET", "defaults.read", "allow"),
        ("HEAD", "defaults.read", "allow"),
        ("POST", "defaults.write", "hold"),
        ("DELETE", "defaults.write", "hold"),
        ("PATCH", "defaults.write", "hold"),
        ("OPTIONS", "defaults.write", "hold"),
        ("get", "defaults.read", "allow"),
    ],
)
def test_builtin_defaults(method: str, rule: str, action: str) -> None:
    decision = RuleSet().decide(request(method, "/v1/charges"))
    assert (decision.rule, decision.action) == (rule, action)
    assert decision.approvals == 1
    assert decision.expires_after == 86400
    assert decision.reviewers == ()
    assert method.upper() in decision.reason


def test_declared_defaults() -> None:
    ruleset = rules("defaults: {read: hold, write: deny}\n", "00-defaults.yaml")
    read = ruleset.decide(request("GET", "/v1/charges"))
    write = ruleset.decide(request("POST", "/v1/charges"))
    assert (read.rule, read.action, read.source) == ("defaults.read", "hold", "00-defaults.yaml")
    assert (write.rule, write.action) == ("defaults.write", "deny")
    assert write.message  # the agent is told something


# --- what a decision carries ------------------------------------------------------------


def test_hold_decision_carries_the_rule_settings() -> None:
    ruleset = rules(
        """
        rules:
          - name: refunds
            match: {method: POST, path: /v1/refunds}
            action: hold
            reviewers: [a@example.com, b@example.com]
            approvals: 2
            expires_after: 1h
            editable: [amount, reason]
            callback: https://hooks.example.com/cosigner
        """
    )
    decision = ruleset.decide(request(amount="100"))
    assert decision.action == "hold"
    assert decision.reviewers == ("a@example.com", "b@example.com")
    assert decision.approvals == 2
    assert decision.expires_after == 3600
    assert decision.editable == ("amount", "reason")
    assert decision.callback == "https://hooks.example.com/cosigner"
    assert decision.budget is None and decision.budget_amount is None


def test_deny_decision_carries_its_message() -> None:
    ruleset = rules(
        """
        rules:
          - {name: said, match: {path: /v1/a}, action: deny, message: Not you.}
          - {name: unsaid, match: {path: /v1/b}, action: deny}
        """
    )
    assert ruleset.decide(request(path="/v1/a")).message == "Not you."
    assert "unsaid" in (ruleset.decide(request(path="/v1/b")).message or "")


def test_reason_names_rule_file_and_what_matched() -> None:
    ruleset = rules(
        """
        rules:
          - name: small-refunds
            match: {method: POST, path: /v1/refunds}
            when: {amount: {lte: 5000}}
            action: allow
        """,
        "10-refunds.yaml",
    )
    decision = ruleset.decide(request(amount="4999"))
    assert decision.reason == (
        "rule 'small-refunds' (10-refunds.yaml) matched: POST /v1/refunds, amount 4999 lte 5000"
    )


# --- budgets ----------------------------------------------------------------------------

BUDGET = """
rules:
  - name: small-refunds
    match: {method: POST, path: /v1/refunds}
    budget: %s
    action: allow
  - name: refunds
    match: {method: POST, path: /v1/refunds}
    action: hold
"""

BUDGET_CASES = [
    # count
    ("{count: 10, per: 24h}", {}, None, "small-refunds"),
    ("{count: 10, per: 24h}", {}, BudgetUsage(count=9), "small-refunds"),
    ("{count: 10, per: 24h}", {}, BudgetUsage(count=10), "refunds"),
    ("{count: 1, per: 1h}", {}, BudgetUsage(count=1), "refunds"),
    # sum: this request included
    ("{sum: {field: amount, max: 20000}, per: 24h}", {"amount": "4999"}, None, "small-refunds"),
    (
        "{sum: {field: amount, max: 20000}, per: 24h}",
        {"amount": "5000"},
        BudgetUsage(count=3, total=15000),
        "small-refunds",
    ),
    (
        "{sum: {field: amount, max: 20000}, per: 24h}",
        {"amount": "5001"},
        BudgetUsage(count=3, total=15000),
        "refunds",
    ),
    ("{sum: {field: amount, max: 20000}, per: 24h}", {"amount": 100}, None, "small-refunds"),
    ("{sum: {field: amount, max: 20000}, per: 24h}", {"amount": "20001"}, None, "refunds"),
    # an amount the budget cannot count never fits
    ("{sum: {field: amount, max: 20000}, per: 24h}", {}, None, "refunds"),
    ("{sum: {field: amount, max: 20000}, per: 24h}", {"amount": "49.99"}, None, "refunds"),
    ("{sum: {field: amount, max: 20000}, per: 24h}", {"amount": "+100"}, None, "refunds"),
    ("{sum: {field: amount, max: 20000}, per: 24h}", {"amount": "-100"}, None, "refunds"),
    ("{sum: {field: amount, max: 20000}, per: 24h}", {"amount": True}, None, "refunds"),
    ("{sum: {field: amount, max: 20000}, per: 24h}", {"amount": "9" * 5000}, None, "refunds"),
    # nested sum field
    (
        "{sum: {field: metadata.cents, max: 100}, per: 24h}",
        {"metadata": {"cents": "100"}},
        None,
        "small-refunds",
    ),
    # count and sum: both must fit
    (
        "{count: 10, sum: {field: amount, max: 20000}, per: 24h}",
        {"amount": "1"},
        BudgetUsage(count=10, total=0),
        "refunds",
    ),
    (
        "{count: 10, sum: {field: amount, max: 20000}, per: 24h}",
        {"amount": "1"},
        BudgetUsage(count=9, total=19999),
        "small-refunds",
    ),
]


@pytest.mark.parametrize(("budget", "params", "used", "expected"), BUDGET_CASES)
def test_budget_fit(
    budget: str, params: dict[str, Any], used: BudgetUsage | None, expected: str
) -> None:
    ruleset = rules(BUDGET % budget)
    usage = {"small-refunds": used} if used is not None else None
    assert ruleset.decide(request(**params), usage).rule == expected


def test_budget_usage_is_per_rule_name() -> None:
    ruleset = rules(BUDGET % "{count: 1, per: 24h}")
    assert ruleset.decide(request(), {"refunds": BudgetUsage(count=99)}).rule == "small-refunds"
    assert ruleset.decide(request(), {}).rule == "small-refunds"


def test_budget_on_the_decision() -> None:
    ruleset = rules(
        BUDGET % "{count: 10, sum: {field: amount, max: 20000}, per: 2h, scope: global}"
    )
    decision = ruleset.decide(request(amount="4999"))
    assert decision.budget is not None
    assert decision.budget.count == 10
    assert (decision.budget.sum_field, decision.budget.sum_max) == ("amount", 20000)
    assert (decision.budget.per, decision.budget.scope) == (7200, "global")
    assert decision.budget_amount == 4999
    count_only = rules(BUDGET % "{count: 10, per: 24h}").decide(request(amount="4999"))
    assert count_only.budget is not None and count_only.budget.scope == "agent"
    assert count_only.budget_amount is None


def test_budgeted_rules() -> None:
    ruleset = rules(BUDGET % "{count: 10, per: 24h}")
    assert [rule.name for rule in ruleset.budgeted_rules()] == ["small-refunds"]
    assert RuleSet().budgeted_rules() == ()


# --- explain ----------------------------------------------------------------------------

EXPLAINED = """
rules:
  - name: no-deletes
    match: {method: DELETE, path: /v1/customers/*}
    action: deny
    message: No.
  - name: charges
    match: {method: POST, path: /v1/charges}
    action: hold
  - name: bot-only
    match: {method: POST, path: /v1/refunds, agent: bot}
    action: allow
  - name: eur-refunds
    match: {method: POST, path: /v1/refunds}
    when: {currency: eur}
    action: allow
  - name: small-refunds
    match: {method: POST, path: /v1/refunds}
    when: {amount: {lte: 5000}}
    action: allow
  - name: budgeted-refunds
    match: {method: POST, path: /v1/refunds}
    budget: {count: 10, per: 24h}
    action: allow
  - name: refunds
    match: {method: POST, path: /v1/refunds}
    action: hold
    reviewers: [ops@example.com]
"""


def test_explain_says_why_each_earlier_rule_did_not_match() -> None:
    ruleset = rules(EXPLAINED, "10-refunds.yaml")
    usage = {"budgeted-refunds": BudgetUsage(count=10)}
    explanation = ruleset.explain(request(agent="other", amount="6000"), usage)
    whys = [(step.rule, step.matched, step.why) for step in explanation.steps]
    assert whys == [
        ("no-deletes", False, "method POST is not DELETE"),
        ("charges", False, "path /v1/refunds does not match /v1/charges"),
        ("bot-only", False, "agent other is not bot"),
        ("eur-refunds", False, "currency is missing (needed for eq 'eur')"),
        ("small-refunds", False, "amount 6000 is not lte 5000"),
        ("budgeted-refunds", False, "over budget: 10/10 used in 24h"),
        ("refunds", True, "POST /v1/refunds"),
    ]
    assert all(step.source == "10-refunds.yaml" for step in explanation.steps)
    text = explanation.render()
    for _, _, why in whys:
        assert why in text
    assert "=> HOLD by rule 'refunds' (10-refunds.yaml)" in text
    assert "ops@example.com" in text


def test_explain_shows_odd_values_plainly() -> None:
    ruleset = rules(EXPLAINED)
    why = ruleset.explain(request(amount="500\x00")).steps[4].why
    assert why == "amount '500\\x00' is not a number (needed for lte 5000)"


def test_explain_stops_at_the_deciding_rule() -> None:
    explanation = rules(EXPLAINED).explain(request("DELETE", "/v1/customers/cus_1"))
    assert [step.rule for step in explanation.steps] == ["no-deletes"]
    text = explanation.render()
    assert "=> DENY by rule 'no-deletes'" in text
    assert "message: No." in text


def test_explain_shows_budget_state() -> None:
    ruleset = rules(BUDGET % "{count: 10, sum: {field: amount, max: 20000}, per: 24h}")
    usage = {"small-refunds": BudgetUsage(count=3, total=15000)}
    explanation = ruleset.explain(request(amount="4999"), usage)
    assert explanation.usage == BudgetUsage(count=3, total=15000)
    text = explanation.render()
    assert "3/10 used before this request, 6 left after it" in text
    assert "amount 15000 used + 4999 of 20000, 1 left after it" in text
    assert "per 24h, scope agent" in text


def test_explain_of_a_default() -> None:
    explanation = rules(EXPLAINED).explain(request("POST", "/v1/customers"))
    assert all(not step.matched for step in explanation.steps)
    assert len(explanation.steps) == 7
    assert explanation.decision.rule == "defaults.write"
    assert "=> HOLD by defaults.write" in explanation.render()
    assert "(no rules loaded)" in RuleSet().explain(request()).render()


EXPLAIN_REQUESTS = [
    request(),
    request(amount="4999"),
    request(amount="4999", agent="bot"),
    request(currency="eur"),
    request("DELETE", "/v1/customers/cus_1"),
    request("GET", "/v1/charges"),
    request("POST", "/v1/charges"),
    request(amount="+5"),
]


@pytest.mark.parametrize("req", EXPLAIN_REQUESTS)
@pytest.mark.parametrize("used", [0, 9, 10])
def test_explain_and_decide_agree(req: RuleRequest, used: int) -> None:
    ruleset = rules(EXPLAINED)
    usage = {"budgeted-refunds": BudgetUsage(count=used)}
    assert ruleset.explain(req, usage).decision == ruleset.decide(req, usage)


# --- decide's prepared rules and its reason, written when read ----------------------------
#
# decide() runs rules prepared once per rule set (text operands as sets, wildcard-free
# paths as text) and writes a decision's reason only when it is read. These pin that it
# decides and writes exactly what the step-by-step evaluation (explain) does.

SHAPES = """
rules:
  - name: text-eq
    match: {method: POST, path: /v1/refunds}
    when: {metadata.bench: allow}
    action: allow
  - name: agent-account
    match: {method: [POST, DELETE], path: /v1/customers/*, agent: [bot, a b], account: acct_1}
    action: hold
  - name: numbers
    match: {path: /v1/charges}
    when: {amount: {gte: 1, lte: 5000}, currency: {in: [eur, usd]}}
    action: allow
  - name: mixed
    match: {method: POST, path: /v1/payouts}
    when:
      metadata.k: {exists: false}
      description: {matches: 'inv-[0-9]+'}
      currency: {ne: usd}
      method_type: {not_in: [instant, 5]}
      destination: {exists: true}
    action: deny
  - name: nested
    match: {path: /v2/**}
    when: {items.0.price: {lt: 0.5}, flag: true}
    action: allow
  - name: odd
    match: {path: /v1/odd}
    when: {note: {in: [a b, "x'y", "é", "tab\\there"]}}
    action: allow
  - name: budgeted
    match: {method: POST, path: /v1/transfers}
    budget: {count: 5, sum: {field: amount, max: 1000}, per: 24h}
    action: allow
"""

_PAYOUT = {
    "metadata": {},
    "description": "inv-42",
    "currency": "eur",
    "method_type": "standard",
    "destination": {"id": "ba_1"},
}

# The reasons as the engine wrote them when it wrote every reason at once.
REASON_CASES: list[tuple[RuleRequest, dict[str, BudgetUsage] | None, str, str, int | None]] = [
    (
        request(metadata={"bench": "allow"}),
        None,
        "text-eq",
        "POST /v1/refunds, metadata.bench 'allow' eq 'allow'",
        None,
    ),
    (
        request("post", metadata={"bench": "allow"}, amount="1"),
        None,
        "text-eq",
        "POST /v1/refunds, metadata.bench 'allow' eq 'allow'",
        None,
    ),
    (
        request("DELETE", "/v1/customers/cus_1", agent="a b", account="acct_1"),
        None,
        "agent-account",
        "DELETE /v1/customers/cus_1, agent 'a b', account acct_1",
        None,
    ),
    (
        request(path="/v1/charges", amount="4999", currency="eur"),
        None,
        "numbers",
        "POST /v1/charges, amount 4999 lte 5000, amount 4999 gte 1,"
        " currency 'eur' in ['eur', 'usd']",
        None,
    ),
    (
        request(path="/v1/charges", amount=5000, currency="usd"),
        None,
        "numbers",
        "POST /v1/charges, amount 5000 lte 5000, amount 5000 gte 1,"
        " currency 'usd' in ['eur', 'usd']",
        None,
    ),
    (
        request(path="/v1/payouts", **_PAYOUT),
        None,
        "mixed",
        "POST /v1/payouts, metadata.k is absent, description 'inv-42' matches 'inv-[0-9]+',"
        " currency 'eur' ne 'usd', method_type 'standard' not_in ['instant', 5],"
        " destination exists",
        None,
    ),
    (
        request(path="/v2/core/x", items=[{"price": 0.25}], flag=True),
        None,
        "nested",
        "POST /v2/core/x, items.0.price 0.25 lt 0.5, flag true eq true",
        None,
    ),
    (
        request(path="/v2/" + "a" * 70, items=[{"price": Decimal("0.1")}], flag="true"),
        None,
        "nested",
        "POST '/v2/" + "a" * 56 + "'..., items.0.price 0.1 lt 0.5, flag 'true' eq true",
        None,
    ),
    (
        request(path="/v1/odd", note="x'y"),
        None,
        "odd",
        """POST /v1/odd, note "x'y" in ['a b', "x'y", 'é', 'tab\\there']""",
        None,
    ),
    (
        request(path="/v1/odd", note="tab\there"),
        None,
        "odd",
        """POST /v1/odd, note 'tab\\there' in ['a b', "x'y", 'é', 'tab\\there']""",
        None,
    ),
    (
        request(path="/v1/transfers", amount="300"),
        {"budgeted": BudgetUsage(count=2, total=100)},
        "budgeted",
        "POST /v1/transfers, budget 3/5 in 24h, sum 100 + 300 <= 1000 in 24h",
        300,
    ),
    (
        request(path="/v1/transfers", amount=700),
        None,
        "budgeted",
        "POST /v1/transfers, budget 1/5 in 24h, sum 0 + 700 <= 1000 in 24h",
        700,
    ),
]


@pytest.mark.parametrize(("req", "usage", "rule", "why", "amount"), REASON_CASES)
def test_a_reason_reads_exactly_as_it_always_has(
    req: RuleRequest,
    usage: dict[str, BudgetUsage] | None,
    rule: str,
    why: str,
    amount: int | None,
) -> None:
    ruleset = rules(SHAPES, "20-shapes.yaml")
    decision = ruleset.decide(req, usage)
    reason = f"rule '{rule}' (20-shapes.yaml) matched: {why}"
    assert (decision.rule, decision.reason, decision.budget_amount) == (rule, reason, amount)
    assert decision.reason == reason  # read again: the same text
    explanation = ruleset.explain(req, usage)
    assert explanation.decision == decision
    assert explanation.steps[-1].why == why
    assert f"   reason: {reason}" in explanation.render()


def test_explain_renders_as_it_always_has() -> None:
    explanation = rules(SHAPES, "20-shapes.yaml").explain(request(path="/v1/payouts", **_PAYOUT))
    matched = (
        "POST /v1/payouts, metadata.k is absent, description 'inv-42' matches 'inv-[0-9]+',"
        " currency 'eur' ne 'usd', method_type 'standard' not_in ['instant', 5], destination exists"
    )
    assert explanation.render() == "\n".join(
        [
            "POST /v1/payouts  agent: (none)  account: (none)",
            "   1. no    text-eq (20-shapes.yaml): path /v1/payouts does not match /v1/refunds",
            "   2. no    agent-account (20-shapes.yaml):"
            " path /v1/payouts does not match /v1/customers/*",
            "   3. no    numbers (20-shapes.yaml): path /v1/payouts does not match /v1/charges",
            f"   4. MATCH mixed (20-shapes.yaml): {matched}",
            "=> DENY by rule 'mixed' (20-shapes.yaml)",
            f"   reason: rule 'mixed' (20-shapes.yaml) matched: {matched}",
            "   message: Denied by rule 'mixed'.",
        ]
    )


def test_a_reason_is_of_the_request_as_it_was_decided() -> None:
    ruleset = rules(SHAPES, "20-shapes.yaml")
    params: dict[str, Any] = {"amount": "4999", "currency": "eur"}
    decision = ruleset.decide(RuleRequest("POST", "/v1/charges", params))
    params["amount"], params["currency"] = "1", "usd"  # changed after the decision
    assert decision.reason == (
        "rule 'numbers' (20-shapes.yaml) matched: POST /v1/charges,"
        " amount 4999 lte 5000, amount 4999 gte 1, currency 'eur' in ['eur', 'usd']"
    )


def test_a_decision_compares_hashes_shows_and_pickles_as_the_dataclass_did() -> None:
    ruleset = rules(SHAPES, "20-shapes.yaml")
    first = ruleset.decide(request(metadata={"bench": "allow"}))
    again = ruleset.decide(request(metadata={"bench": "allow"}, amount="5"))
    assert first == again and hash(first) == hash(again) and first is not again
    other = ruleset.decide(request(path="/v1/charges", amount="5", currency="eur"))
    same_rule = ruleset.decide(request(path="/v1/charges", amount="6", currency="eur"))
    assert other != same_rule  # the same rule, a different reason
    assert first != "allow" and first != other
    assert repr(first) == (
        "Decision(action='allow', rule='text-eq', reason=\"rule 'text-eq' (20-shapes.yaml)"
        " matched: POST /v1/refunds, metadata.bench 'allow' eq 'allow'\", message=None,"
        " reviewers=(), approvals=1, expires_after=86400, editable=(), callback=None,"
        " budget=None, source='20-shapes.yaml', budget_amount=None)"
    )
    for copied in (pickle.loads(pickle.dumps(first)), copy.copy(first), copy.deepcopy(other)):
        assert copied == (first if copied.rule == "text-eq" else other)
    default = ruleset.decide(request("GET", "/v1/balance"))
    assert default == RuleSet(default_read="allow").decide(request("GET", "/v1/balance"))
    match first:
        case Decision("allow", "text-eq", reason):
            assert reason == first.reason
        case _:
            pytest.fail("a decision matches positionally, as the dataclass did")


@pytest.mark.parametrize("name", Decision.__match_args__)
def test_a_decision_is_immutable(name: str) -> None:
    decision = rules(SHAPES).decide(request(metadata={"bench": "allow"}))
    before = getattr(decision, name)
    with pytest.raises(AttributeError):
        setattr(decision, name, "changed")
    with pytest.raises(AttributeError):
        delattr(decision, name)
    assert getattr(decision, name) == before


@pytest.mark.parametrize(
    ("pattern", "path", "expected"),
    [
        ("/v1/a.b", "/v1/a.b", True),
        ("/v1/a.b", "/v1/aXb", False),  # '.' is a dot, not any character
        ("/v1/a.b", "/v1/a.bc", False),
        ("/v1/a.b", "/v1/a.b/c", False),
        ("/v1/a+b", "/v1/aab", False),
        ("/v1/a+b", "/v1/a+b", True),
        ("/", "/", True),
        ("/", "/v1", False),
    ],
)
def test_a_path_without_wildcards_matches_itself_only(
    pattern: str, path: str, expected: bool
) -> None:
    ruleset = rules(f"rules: [{{name: r, match: {{path: '{pattern}'}}, action: deny}}]")
    assert (ruleset.decide(request(path=path)).rule == "r") is expected
    assert ruleset.explain(request(path=path)).steps[0].matched is expected


_SCALARS = ["allow", "'5000'", "5000", "5", "0.5", "true", "'true'", "''", "'a b'", "-3"]
_CONDITIONS = st.one_of(
    st.tuples(st.sampled_from(["eq", "ne"]), st.sampled_from(_SCALARS)),
    st.tuples(
        st.sampled_from(["in", "not_in"]),
        st.lists(st.sampled_from(_SCALARS), min_size=1, max_size=3).map(
            lambda items: f"[{', '.join(items)}]"
        ),
    ),
    st.tuples(st.sampled_from(["lt", "lte", "gt", "gte"]), st.sampled_from(["5", "0.5", "-3"])),
)
_VALUES = st.one_of(
    st.sampled_from(["allow", "5000", "5", "05", "5.0", "0.5", "-3", "+5", "true", "", "a b"]),
    st.sampled_from([5, 5000, -3, 0.5, 5.0, True, False, None, Decimal("0.5"), 10**30]),
    st.sampled_from([{"k": "v"}, ["allow"], ("allow",), float("nan"), float("inf")]),
)


@given(_CONDITIONS, _VALUES)
def test_decide_tests_a_condition_as_explain_does(condition: tuple[str, str], value: Any) -> None:
    op, operand = condition
    ruleset = when(f"{{amount: {{{op}: {operand}}}}}")
    for params in ({"amount": value}, {"x": {"amount": value}}, {}):
        req = RuleRequest("POST", "/v1/x", params)
        decision = ruleset.decide(req)
        explanation = ruleset.explain(req)
        assert explanation.decision == decision
        assert (decision.rule == "r") is explanation.steps[0].matched


@pytest.mark.parametrize(
    ("method", "path", "field", "expected"),
    [
        ("POST", "/v1/refunds", "currency", True),
        ("POST", "/v1/refunds", "amount", True),
        ("POST", "/v1/refunds", "metadata.k", True),
        ("DELETE", "/v1/refunds", "currency", False),  # no rule for DELETE tests it
        ("POST", "/v1/charges", "currency", False),
        ("POST", "/v1/charges", "amount", True),  # the '/v1/**' rule, any method
        ("GET", "/v1/charges/ch_1", "amount", True),
        ("GET", "/v2/x", "amount", False),
        ("POST", "/v1/refunds", "description", False),
    ],
)
def test_may_test_names_the_fields_rules_could_test(
    method: str, path: str, field: str, expected: bool
) -> None:
    ruleset = rules(
        """
        rules:
          - name: eur
            match: {method: POST, path: /v1/refunds}
            when: {currency: eur, metadata.k: {exists: true}}
            action: allow
          - name: small
            match: {path: /v1/**}
            when: {amount: {lte: 5}}
            action: allow
        """
    )
    assert ruleset.may_test(method, path, field) is expected
    # What it answers is what a walk over every rule answers.
    walked = any(
        (rule.methods is None or method in rule.methods)
        and (rule.path_regex is None or rule.path_regex.fullmatch(path) is not None)
        and any(cond.field == field for cond in rule.conditions)
        for rule in ruleset.rules
    )
    assert walked is expected


def test_has_budgets_says_whether_any_rule_has_one() -> None:
    assert not RuleSet().has_budgets
    assert not rules(SHAPES.replace("budget:", "# budget:")).has_budgets
    assert rules(SHAPES).has_budgets
