"""load_rules / check_rules: reading a folder, reporting every problem, the shipped policy."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from gateway.rules import (
    BudgetUsage,
    RuleProblem,
    RuleRequest,
    RulesError,
    check_rules,
    load_rules,
    parse_duration,
    parse_rules,
)

DATA = Path(__file__).parent / "data"
SHIPPED = Path(__file__).parent.parent / "rules"


def write(folder: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        (folder / name).write_text(textwrap.dedent(text), encoding="utf-8")
    return folder


# --- durations --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "seconds"),
    [("90s", 90), ("30m", 1800), ("24h", 86400), ("7d", 604800), (3600, 3600), ("3600", 3600)],
)
def test_parse_duration(value: str | int, seconds: int) -> None:
    assert parse_duration(value) == seconds


@pytest.mark.parametrize(
    "value", ["0s", 0, -5, "-5m", "1.5h", "24 h", "24H", "h", "", "1w", "400d", "05m", True]
)
def test_parse_duration_refuses(value: str | int) -> None:
    with pytest.raises(ValueError, match="duration"):
        parse_duration(value)


# --- problems and the error -------------------------------------------------------------


@pytest.mark.parametrize(
    ("problem", "text"),
    [
        (
            RuleProblem("10-refunds.yaml", "small-refunds", "when.amount", "unknown operator"),
            "10-refunds.yaml: rule 'small-refunds': field 'when.amount': unknown operator",
        ),
        (
            RuleProblem("a.yaml", "#2", "name", "is required"),
            "a.yaml: rule #2: field 'name': is required",
        ),
        (
            RuleProblem("a.yaml", None, "version", "is required"),
            "a.yaml: field 'version': is required",
        ),
        (RuleProblem("a.yaml", None, None, "invalid YAML"), "a.yaml: invalid YAML"),
    ],
)
def test_problem_text(problem: RuleProblem, text: str) -> None:
    assert str(problem) == text


def test_rules_error_lists_every_problem_one_per_line() -> None:
    problems = [RuleProblem("a.yaml", None, None, "one"), RuleProblem("b.yaml", "r", "x", "two")]
    error = RulesError(problems)
    assert error.problems == tuple(problems)
    assert str(error).splitlines() == ["a.yaml: one", "b.yaml: rule 'r': field 'x': two"]


# Every problem in tests/data/rules_broken, found in one run: (file, rule, field, message part).
BROKEN = [
    ("10-keys.yaml", None, "flavour", "unknown key 'flavour'; expected one of version, defaults"),
    ("10-keys.yaml", "small-refunds", "match.verb", "unknown key 'verb'"),
    ("10-keys.yaml", "small-refunds", "when.amount.lessthan", "unknown operator 'lessthan'"),
    ("10-keys.yaml", "small-refunds", "colour", "unknown key 'colour'"),
    ("20-values.yaml", "bad-duration", "budget.per", "'3 days' is not a duration"),
    ("20-values.yaml", "hold-fields-on-deny", "reviewers", "only a hold rule takes reviewers"),
    ("20-values.yaml", "message-on-hold", "message", "only a deny rule takes a message"),
    ("20-values.yaml", "bad-regex", "when.description.matches", "bad regular expression"),
    ("20-values.yaml", "bad-method", "match.method", "unknown method 'POTS'"),
    ("20-values.yaml", "quorum", "approvals", "needs 2 distinct reviewers"),
    ("20-values.yaml", "lt-needs-number", "when.amount.lt", "must be a number, not 'lots'"),
    ("20-values.yaml", "lt-needs-number", "when.currency.in", "must be a non-empty list"),
    ("20-values.yaml", "#8", "name", "is required"),
    ("20-values.yaml", "#8", "action", "must be 'allow', 'hold' or 'deny', not 'permit'"),
    ("20-values.yaml", "bad-path", "match.path", "must start with '/'"),
    ("20-values.yaml", "bad-callback", "callback", "is not an http(s) URL"),
    ("30-no-version.yaml", None, "version", "is required"),
    ("40-bad-version.yaml", None, "version", "unsupported version 2"),
    ("50-conflicts.yaml", "small-refunds", "name", "duplicate rule name; first defined in 10-keys"),
    ("50-conflicts.yaml", None, "defaults.write", "allow conflicts with write: hold in 20-values"),
    ("60-syntax.yaml", None, None, "invalid YAML at line 6"),
    ("70-duplicate-key.yaml", None, None, "line 7, column 5: found duplicate key 'action'"),
]


@pytest.fixture(scope="module")
def broken() -> list[RuleProblem]:
    return check_rules(DATA / "rules_broken")


@pytest.mark.parametrize(("file", "rule", "field", "message"), BROKEN)
def test_broken_folder_reports(
    broken: list[RuleProblem], file: str, rule: str | None, field: str | None, message: str
) -> None:
    found = [p for p in broken if (p.file, p.rule, p.field) == (file, rule, field)]
    assert found, f"no problem for {file} {rule} {field}; got:\n" + "\n".join(map(str, broken))
    assert any(message in p.message for p in found), [p.message for p in found]


def test_broken_folder_reports_everything_at_once(broken: list[RuleProblem]) -> None:
    assert len(broken) == len(BROKEN)
    with pytest.raises(RulesError) as caught:
        load_rules(DATA / "rules_broken")
    assert caught.value.problems == tuple(broken)
    lines = str(caught.value).splitlines()
    assert len(lines) == len(BROKEN)
    assert "10-keys.yaml: rule 'small-refunds': field 'when.amount.lessthan': unknown operator" in (
        str(caught.value)
    )
    assert {line.split(":")[0] for line in lines} == {file for file, *_ in BROKEN}


def one_rule(fields: str) -> str:
    """A file with one rule named r on path /x, plus ``fields``."""
    return "version: 1\nrules:\n- {name: r, match: {path: /x}, " + fields + "}"


# One problem class per case: (file body, rule, field, message part).
PROBLEMS = [
    ("rules: []", None, "version", "is required"),
    ("version: '1'\nrules: []", None, "version", "unsupported version '1'"),
    ("version: true", None, "version", "unsupported version True"),
    ("version: 1\nrule: []", None, "rule", "unknown key 'rule'"),
    ("version: 1\nrules: {}", None, "rules", "must be a list"),
    ("version: 1\nrules: [refunds]", "#1", None, "must be a mapping"),
    ("version: 1\ndefaults: {read: permit}", None, "defaults.read", "must be 'allow'"),
    (
        one_rule("action: hold, expires_after: 2 days"),
        "r",
        "expires_after",
        "is not a duration",
    ),
    (
        one_rule("action: allow, budget: {per: 1h}"),
        "r",
        "budget",
        "needs count, sum or both",
    ),
    (
        one_rule("action: allow, budget: {count: 1}"),
        "r",
        "budget.per",
        "is required",
    ),
    (
        one_rule("action: deny, budget: {count: 1, per: 1h}"),
        "r",
        "budget",
        "a deny rule cannot have a budget",
    ),
    (
        one_rule("action: allow, when: {amount: [1, 2]}"),
        "r",
        "when.amount",
        "a list needs an operator",
    ),
    (
        one_rule("action: allow, when: {amount: {}}"),
        "r",
        "when.amount",
        "needs an operator",
    ),
    (
        one_rule("action: allow, when: {amount: null}"),
        "r",
        "when.amount.eq",
        "use exists: false",
    ),
    (
        one_rule("action: allow, when: {'a..b': 1}"),
        "r",
        "when",
        "is not a field path",
    ),
    (
        one_rule("action: allow, when: {x: {exists: 1}}"),
        "r",
        "when.x.exists",
        "must be true or false",
    ),
    ("version: 1\nrules:\n- {name: r, match: {}, action: allow}", "r", "match", "match needs"),
    ("version: 1\nrules:\n- {name: r, action: allow}", "r", "match", "is required"),
    (
        "version: 1\nrules:\n- {name: r, match: {method: null}, action: allow}",
        "r",
        "match.method",
        "null",
    ),
    (
        "version: 1\nrules:\n- {name: r, match: {path: /v1/**/x/**}, action: allow}",
        "r",
        "match.path",
        "once",
    ),
    (
        "version: 1\nrules:\n- {name: r, match: {path: '/v1//x'}, action: allow}",
        "r",
        "match.path",
        "empty",
    ),
    (
        "version: 1\nrules:\n- {name: r, match: {path: /a**}, action: allow}",
        "r",
        "match.path",
        "whole",
    ),
    (
        "version: 1\nrules:\n- {name: r, match: {path: '/x?y=1'}, action: allow}",
        "r",
        "match.path",
        "'?'",
    ),
    (
        "version: 1\nrules:\n- {name: 'a b', match: {path: /x}, action: allow}",
        "a b",
        "name",
        "not a rule name",
    ),
    (
        one_rule("action: allow, message: hi"),
        "r",
        "message",
        "deny",
    ),
    (
        one_rule("action: allow, approvals: 2"),
        "r",
        "approvals",
        "only a hold rule takes approvals",
    ),
    (
        one_rule("action: hold, approvals: 0"),
        "r",
        "approvals",
        "greater than or equal to 1",
    ),
    (
        one_rule("action: hold, reviewers: [a@x.com, A@x.com]"),
        "r",
        "reviewers",
        "listed twice",
    ),
    (
        one_rule("action: hold, reviewers: [nobody]"),
        "r",
        "reviewers",
        "not an email address",
    ),
    (
        one_rule("action: hold, editable: []"),
        "r",
        "editable",
        "at least one",
    ),
    ("version: 1\nrules: [\n", None, None, "invalid YAML at line"),
    ("- version: 1", None, None, "must be a mapping"),
    ("# all commented out\n", None, None, "is empty"),
]


@pytest.mark.parametrize(("body", "rule", "field", "message"), PROBLEMS)
def test_each_problem_names_file_rule_and_field(
    tmp_path: Path, body: str, rule: str | None, field: str | None, message: str
) -> None:
    write(tmp_path, {"10-x.yaml": body + "\n"})
    problems = check_rules(tmp_path)
    assert problems, "expected a problem"
    assert all(p.file == "10-x.yaml" for p in problems)
    found = [p for p in problems if (p.rule, p.field) == (rule, field)]
    assert found, [str(p) for p in problems]
    assert any(message in p.message for p in found), [str(p) for p in problems]
    with pytest.raises(RulesError):
        load_rules(tmp_path)


def test_several_problems_in_several_files_at_once(tmp_path: Path) -> None:
    write(
        tmp_path,
        {
            "10-a.yaml": """\
                version: 1
                defaults: {write: hold}
                rules:
                  - {name: dup, match: {path: /a}, action: hold, message: no}
                  - {name: bad-op, match: {path: /a}, when: {x: {about: 1}}, action: hold}
                """,
            "20-b.yaml": """\
                version: 1
                defaults: {write: allow}
                rules:
                  - {name: dup, match: {path: /b}, action: maybe}
                """,
        },
    )
    problems = {(p.file, p.rule, p.field) for p in check_rules(tmp_path)}
    assert problems == {
        ("10-a.yaml", "dup", "message"),
        ("10-a.yaml", "bad-op", "when.x.about"),
        ("20-b.yaml", None, "defaults.write"),
        ("20-b.yaml", "dup", "action"),
        ("20-b.yaml", "dup", "name"),
    }


def test_same_defaults_in_two_files_is_fine(tmp_path: Path) -> None:
    same = "version: 1\ndefaults: {read: allow, write: hold}\n"
    write(tmp_path, {"a.yaml": same, "b.yaml": same})
    assert check_rules(tmp_path) == []


# --- folders ----------------------------------------------------------------------------


def test_missing_folder_is_an_error(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    with pytest.raises(RulesError, match="does not exist"):
        load_rules(missing)
    assert [p.file for p in check_rules(missing)] == [str(missing)]


def test_a_file_is_not_a_folder(tmp_path: Path) -> None:
    write(tmp_path, {"x.yaml": "version: 1\n"})
    with pytest.raises(RulesError, match="not a folder"):
        load_rules(tmp_path / "x.yaml")


def test_empty_folder_means_defaults_only(tmp_path: Path) -> None:
    ruleset = load_rules(tmp_path)
    assert ruleset.rules == ()
    assert ruleset.decide(RuleRequest("GET", "/v1/charges", {})).action == "allow"
    assert ruleset.decide(RuleRequest("POST", "/v1/refunds", {})).action == "hold"
    assert check_rules(tmp_path) == []


def test_files_are_read_in_name_order() -> None:
    ruleset = load_rules(DATA / "rules_order")
    # .editor-swap.yaml (a dotfile) and notes.txt are not rule files.
    assert [(rule.source, rule.name) for rule in ruleset.rules] == [
        ("10-first.yaml", "first-refunds"),
        ("15-between.yml", "between-refunds"),
        ("20-second.yaml", "second-refunds"),
        ("20-second.yaml", "second-payouts"),
        ("9-last.yaml", "last-payouts"),
        ("9-last.yaml", "last-transfers"),
    ]

    def decide(path: str, **params: str) -> str:
        return ruleset.decide(RuleRequest("POST", path, params)).rule

    assert decide("/v1/refunds", amount="50") == "first-refunds"
    assert decide("/v1/refunds", amount="500") == "between-refunds"
    assert decide("/v1/refunds", amount="5000") == "second-refunds"
    assert decide("/v1/payouts") == "second-payouts"
    assert decide("/v1/transfers") == "last-transfers"


def test_unreadable_file_is_a_problem(tmp_path: Path) -> None:
    (tmp_path / "bad.yaml").write_bytes(b"version: 1\nrules: []\n\xff\xfe")
    (problem,) = check_rules(tmp_path)
    assert str(problem).startswith("bad.yaml: is not UTF-8 text")


# --- YAML as rules need it --------------------------------------------------------------


def test_yaml_scalars_follow_yaml_1_2() -> None:
    ruleset = parse_rules(
        {
            "a.yaml": """\
version: 1
rules:
  - name: norway
    match: {path: /v1/a}
    when: {country: {in: [us, no]}, flag: on}
    action: allow
  - name: decimal
    match: {path: /v1/b}
    when: {amount: 010, day: 2024-01-31}
    action: allow
"""
        }
    )

    def rule(path: str, **params: str) -> str:
        return ruleset.decide(RuleRequest("POST", path, params)).rule

    assert rule("/v1/a", country="no", flag="on") == "norway"  # YAML 1.1 would say False
    assert rule("/v1/b", amount="10", day="2024-01-31") == "decimal"  # not 8, not a date


def test_anchors_and_merge_keys_work() -> None:
    ruleset = parse_rules(
        {
            "a.yaml": """\
version: 1
rules:
  - &hold {name: one, match: {method: POST, path: /v1/a}, action: hold}
  - {<<: *hold, name: two, match: {method: POST, path: /v1/b}}
"""
        }
    )
    assert ruleset.decide(RuleRequest("POST", "/v1/b", {})).rule == "two"


# --- the shipped policy -----------------------------------------------------------------


def test_shipped_rules_are_valid() -> None:
    assert check_rules(SHIPPED) == []


@pytest.mark.parametrize(
    ("method", "path", "action", "rule"),
    [
        ("GET", "/v1/charges", "allow", "defaults.read"),
        ("GET", "/v1/customers/cus_1", "allow", "defaults.read"),
        ("POST", "/v1/refunds", "hold", "refunds"),
        ("POST", "/v1/charges/ch_1/refund", "hold", "charge-refund"),
        ("POST", "/v1/charges/ch_1/refunds", "hold", "charge-refunds"),
        ("POST", "/v1/payouts", "hold", "payouts"),
        ("POST", "/v1/transfers", "hold", "transfers"),
        ("POST", "/v1/credit_notes", "hold", "credit-notes"),
        ("POST", "/v1/invoices/in_1/void", "hold", "invoice-voids"),
        ("POST", "/v1/invoices/in_1/pay", "hold", "invoice-payments"),
        ("POST", "/v1/disputes/dp_1/close", "hold", "dispute-closes"),
        ("DELETE", "/v1/subscriptions/sub_1", "hold", "subscription-cancels"),
        ("POST", "/v1/subscriptions/sub_1/cancel", "hold", "subscription-cancels-post"),
        ("POST", "/v1/subscriptions/sub_1", "hold", "subscription-updates"),
        ("DELETE", "/v1/customers/cus_1", "deny", "no-customer-deletes"),
        ("POST", "/v1/customers", "hold", "defaults.write"),
        ("POST", "/v1/customers/cus_1", "hold", "defaults.write"),
    ],
)
def test_shipped_rules_decide_sensibly(method: str, path: str, action: str, rule: str) -> None:
    decision = load_rules(SHIPPED).decide(RuleRequest(method, path, {"amount": "100"}))
    assert (decision.action, decision.rule) == (action, rule)
    assert decision.reviewers == ()  # reviewers come from COSIGNER_REVIEWERS


def test_shipped_deny_explains_itself() -> None:
    decision = load_rules(SHIPPED).decide(RuleRequest("DELETE", "/v1/customers/cus_1", {}))
    assert decision.message and "delete customers" in decision.message


def test_shipped_small_refund_example_works_when_uncommented() -> None:
    sources = {path.name: path.read_text(encoding="utf-8") for path in SHIPPED.glob("*.yaml")}
    lines = sources["20-money.yaml"].splitlines()
    # The example's YAML lines are "  # -" or "  #  ..."; its prose is "  # Text".
    uncommented = [
        "  " + line[4:] if line.startswith(("  # -", "  #  ")) else line for line in lines
    ]
    assert uncommented != lines
    sources["20-money.yaml"] = "\n".join(uncommented) + "\n"
    ruleset = parse_rules(sources)

    def decide(amount: str, count: int = 0, total: int = 0) -> str:
        usage = {"small-refunds": BudgetUsage(count, total)}
        return ruleset.decide(RuleRequest("POST", "/v1/refunds", {"amount": amount}), usage).rule

    assert decide("4999") == "small-refunds"
    assert decide("5001") == "refunds"
    assert decide("4999", count=10) == "refunds"
    assert decide("4999", total=16000) == "refunds"
    assert ruleset.decide(RuleRequest("POST", "/v1/refunds", {"charge": "ch_1"})).rule == "refunds"
