"""Budgets: count and sum, per agent and global, window roll-over, races, explain.

The store's reservation is tested on both backends (two store instances on one
database stand for two replicas); the rest runs through the real gateway with
the stripe SDK as the agent and localstripe as Stripe, on an injected clock.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any, cast

import pytest
import stripe

from gateway.budgets import Budgets, budget_state
from gateway.crypto import mask_key
from gateway.keys import POLICY, STORE
from gateway.rules import RuleRequest, parse_rules
from gateway.store import store_from_url
from gateway.store.base import BudgetTally, Store
from tests.support.gateway import GatewayThread, gateway_thread, settings_for
from tests.support.peers import TEST_STRIPE_KEY

RULES = Path(__file__).parent / "data" / "rules_budget"
OTHER_KEY = "sk_test_someoneelse000000000000004321"
AGENT = mask_key(TEST_STRIPE_KEY)
OTHER = mask_key(OTHER_KEY)
REPO = Path(__file__).resolve().parents[1]


class Clock:
    """A settable clock: the gateway's budgets (and everything else) read it."""

    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


# -- the store: one transaction recounts and reserves ---------------------------------------


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'store.db'}"
    url: str = request.getfixturevalue("postgres_url")
    return url


@pytest.fixture
async def store(store_url: str) -> AsyncIterator[Store]:
    s = store_from_url(store_url)
    await s.open()
    try:
        yield s
    finally:
        await s.close()


async def reserve(
    store: Store,
    *,
    rule: str = "r",
    scope: str = "global",
    since: float = 0.0,
    count_max: int | None = None,
    sum_max: int | None = None,
    amount: int = 0,
    ts: float = 100.0,
    ref: str = "req_1",
) -> tuple[bool, BudgetTally]:
    return await store.reserve_budget(
        rule, scope, since, count_max=count_max, sum_max=sum_max, amount=amount, ts=ts, ref=ref
    )


async def test_count_budget_reserves_until_full(store: Store) -> None:
    for used in range(3):
        assert await reserve(store, count_max=3, ts=100.0 + used) == (True, BudgetTally(used, 0))
    assert await reserve(store, count_max=3, ts=110.0) == (False, BudgetTally(3, 0))
    assert await store.budget_usage("r", 0.0) == {"global": BudgetTally(3, 0)}


async def test_sum_budget_counts_this_request_too(store: Store) -> None:
    assert (await reserve(store, sum_max=5000, amount=3000))[0]
    assert (await reserve(store, sum_max=5000, amount=2000))[0]  # exactly full: fits
    assert await reserve(store, sum_max=5000, amount=1) == (False, BudgetTally(2, 5000))
    assert await reserve(store, sum_max=5000, amount=0) == (True, BudgetTally(2, 5000))


async def test_window_is_the_last_per_seconds(store: Store) -> None:
    for ts in (100.0, 200.0, 300.0):
        assert (await reserve(store, count_max=3, ts=ts))[0]
    assert not (await reserve(store, count_max=3, since=99.0, ts=301.0))[0]
    # Entries at or before the window's start no longer count.
    assert await reserve(store, count_max=3, since=200.0, ts=350.0) == (True, BudgetTally(1, 0))
    assert await store.budget_usage("r", 200.0) == {"global": BudgetTally(2, 0)}


async def test_scopes_and_rules_are_separate(store: Store) -> None:
    assert (await reserve(store, scope="agent:a", count_max=1, amount=5))[0]
    assert not (await reserve(store, scope="agent:a", count_max=1))[0]
    assert (await reserve(store, scope="agent:b", count_max=1, amount=7))[0]
    assert (await reserve(store, rule="other", scope="agent:a", count_max=1))[0]
    assert await store.budget_usage("r", 0.0) == {
        "agent:a": BudgetTally(1, 5),
        "agent:b": BudgetTally(1, 7),
    }
    assert await store.budget_usage("r", 0.0, "agent:b") == {"agent:b": BudgetTally(1, 7)}
    assert await store.budget_usage("r", 0.0, "agent:c") == {}


@pytest.mark.parametrize(("count_max", "sum_max", "winners"), [(5, None, 5), (None, 10000, 3)])
async def test_replicas_racing_for_the_last_units_never_overspend(
    store_url: str, count_max: int | None, sum_max: int | None, winners: int
) -> None:
    replicas = [store_from_url(store_url), store_from_url(store_url)]
    for replica in replicas:
        await replica.open()
    try:
        results = await asyncio.gather(
            *(
                reserve(
                    replicas[i % 2],
                    count_max=count_max,
                    sum_max=sum_max,
                    amount=3000,
                    ref=f"req_{i}",
                )
                for i in range(20)
            )
        )
        assert sum(1 for ok, _ in results if ok) == winners
        usage = await replicas[0].budget_usage("r", 0.0)
        assert usage == {"global": BudgetTally(winners, 3000 * winners)}
    finally:
        for replica in replicas:
            await replica.close()


# -- the decision loop: over budget, the next rule decides ----------------------------------

CHAINED = """
version: 1
rules:
  - name: first
    match: {method: POST, path: /v1/things}
    budget: {count: 1, per: 1h, scope: global}
    action: allow
  - name: second
    match: {method: POST, path: /v1/things}
    budget: {count: 1, per: 1h}
    action: hold
  - name: unbudgeted
    match: {method: POST, path: /v1/other}
    action: allow
"""


class _NoStore:
    """A store that must not be used: no budget is in play."""

    def __getattr__(self, name: str) -> Any:
        raise AssertionError(f"the store was used ({name})")


async def test_no_budget_in_play_never_touches_the_store() -> None:
    budgets = Budgets(cast(Store, _NoStore()), clock=Clock(1000.0))
    plain = parse_rules(
        {"10.yaml": "version: 1\nrules: [{name: r, match: {path: /v1/a}, action: allow}]\n"}
    )
    chained = parse_rules({"10.yaml": CHAINED})  # has budgets, but not on /v1/other
    assert not plain.has_budgets and chained.has_budgets
    for rules, req, rule in [
        (plain, RuleRequest("POST", "/v1/a", {}), "r"),
        (plain, RuleRequest("POST", "/v1/b", {}), "defaults.write"),
        (plain, RuleRequest("GET", "/v1/b", {}), "defaults.read"),
        (chained, RuleRequest("POST", "/v1/other", {}), "unbudgeted"),
        (chained, RuleRequest("GET", "/v1/things", {}), "defaults.read"),
    ]:
        decision, reservation = await budgets.decide(rules, req, "req_1")
        assert (decision.rule, reservation) == (rule, None)
        assert decision == rules.decide(req)  # the rules' own decision, reason and all
    with pytest.raises(AssertionError, match="the store was used"):
        await budgets.decide(chained, RuleRequest("POST", "/v1/things", {}), "req_2")


async def test_each_budgeted_rule_in_turn_then_the_default(store: Store) -> None:
    rules = parse_rules({"10.yaml": CHAINED})
    clock = Clock(1000.0)
    budgets = Budgets(store, clock=clock)
    req = RuleRequest("POST", "/v1/things", {}, agent="a")
    seen = []
    for i in range(4):
        decision, reservation = await budgets.decide(rules, req, f"req_{i}")
        seen.append((decision.rule, reservation.rule if reservation else None))
    assert seen == [
        ("first", "first"),
        ("second", "second"),
        ("defaults.write", None),
        ("defaults.write", None),
    ]
    # Agent scope: another agent still has its own unit of 'second'.
    other = RuleRequest("POST", "/v1/things", {}, agent="b")
    assert (await budgets.decide(rules, other, "req_b"))[0].rule == "second"
    # A rule without a budget never touches the store.
    decision, reservation = await budgets.decide(
        rules, RuleRequest("POST", "/v1/other", {}), "req_x"
    )
    assert (decision.rule, reservation) == ("unbudgeted", None)
    assert await store.budget_usage("unbudgeted", 0.0) == {}
    # An hour later the window has rolled over.
    clock.now += 3600
    assert (await budgets.decide(rules, req, "req_later"))[0].rule == "first"

    states = {(s.rule, s.agent): s for s in await budget_state(store, rules, clock.now)}
    assert states[("first", None)].count_used == 1
    assert states[("first", None)].count_left == 0
    assert states[("second", None)].count_used == 0  # no agent used it in this window
    states = {(s.rule, s.agent): s for s in await budget_state(store, rules, clock.now - 1)}
    assert states[("second", "a")].describe() == "1/1 used, 0 left (per 1h)"
    assert states[("second", "b")].count_used == 1


# -- through the gateway ----------------------------------------------------------------------


@pytest.fixture
def clock() -> Clock:
    return Clock(time.time())


@pytest.fixture
def gw(tmp_path: Path, fake_stripe: str, clock: Clock) -> Iterator[GatewayThread]:
    with gateway_thread(settings_for(tmp_path, fake_stripe, RULES), clock=clock) as gateway:
        yield gateway


def agent(gw: GatewayThread, key: str = TEST_STRIPE_KEY) -> stripe.StripeClient:
    return stripe.StripeClient(key, base_addresses={"api": gw.url}, max_network_retries=0)


def refund(gw: GatewayThread, charge: str, amount: int | None, key: str = TEST_STRIPE_KEY) -> Any:
    params: dict[str, Any] = {"charge": charge}
    if amount is not None:
        params["amount"] = amount
    return agent(gw, key).v1.refunds.create(params=params).to_dict()


def customer(gw: GatewayThread, budget: str, key: str = TEST_STRIPE_KEY) -> Any:
    return agent(gw, key).v1.customers.create(params={"metadata": {"budget": budget}}).to_dict()


def test_refunds_up_to_50_dollars_at_most_200_a_day_per_agent(
    gw: GatewayThread, upstream: Any, clock: Clock
) -> None:
    charge = upstream.create_charge(amount=100_000)["id"]
    for _ in range(5):
        assert refund(gw, charge, 4000)["object"] == "refund"  # 5 x $40 = $200: the budget
    held = refund(gw, charge, 100)
    assert held["object"] == "cosigner.action" and held["rule"] == "refunds"
    assert held["summary"] == f"Refund $1.00 USD of charge {charge}"
    over = refund(gw, charge, 5001)  # over the per-refund limit, whatever the budget
    assert over["rule"] == "refunds"
    # Per agent: another agent has its own $200.
    assert refund(gw, charge, 4000, OTHER_KEY)["object"] == "refund"
    # A day later the first agent's window has rolled over.
    clock.now += 86400
    assert refund(gw, charge, 4000)["object"] == "refund"
    assert len([r for r in upstream.refunds(charge) if r["charge"] == charge]) == 7
    assert upstream.count("POST", "/v1/refunds") == 7  # the held ones never reached Stripe


def test_full_refunds_count_their_resolved_amount(gw: GatewayThread, upstream: Any) -> None:
    charge = upstream.create_charge(amount=3000)["id"]
    assert refund(gw, charge, None)["amount"] == 3000  # resolved, allowed, counted
    big = upstream.create_charge(amount=100_000)["id"]
    for _ in range(4):
        assert refund(gw, big, 4000)["object"] == "refund"
    # 3000 + 16000 = 19000 used: 1000 left, so a 1001 refund is held and a 1000 one is not.
    assert refund(gw, big, 1001)["object"] == "cosigner.action"
    assert refund(gw, big, 1000)["object"] == "refund"
    assert gw.call(_usage(gw, "small-refunds")) == {f"agent:{AGENT}": BudgetTally(6, 20000)}


async def _usage(gw: GatewayThread, rule: str) -> dict[str, BudgetTally]:
    assert gw.app is not None
    return await gw.app[STORE].budget_usage(rule, 0.0)


def test_count_budget_per_agent(gw: GatewayThread, upstream: Any) -> None:
    assert [customer(gw, "agent")["object"] for _ in range(2)] == ["customer", "customer"]
    third = customer(gw, "agent")
    assert third["object"] == "cosigner.action" and third["rule"] == "defaults.write"
    assert customer(gw, "agent", OTHER_KEY)["object"] == "customer"
    assert upstream.count("POST", "/v1/customers") == 3


def test_count_budget_global(gw: GatewayThread, upstream: Any) -> None:
    assert customer(gw, "global")["object"] == "customer"
    assert customer(gw, "global", OTHER_KEY)["object"] == "customer"
    assert customer(gw, "global")["object"] == "customer"
    assert customer(gw, "global", OTHER_KEY)["object"] == "cosigner.action"
    assert customer(gw, "global")["object"] == "cosigner.action"


def test_every_match_counts_held_ones_too(gw: GatewayThread) -> None:
    first = agent(gw).v1.products.create(params={"name": "A"}).to_dict()
    second = agent(gw).v1.products.create(params={"name": "B"}).to_dict()
    assert (first["rule"], second["rule"]) == ("held-products", "products")
    action = gw.action(first["id"])
    assert action.reviewers == ["first@example.com"]
    assert action.context["budget"] == {
        "rule": "held-products",
        "scope": "global",
        "per": "1h",
        "request_id": action.context["budget"]["request_id"],
        "count": {"used": 1, "max": 1},
    }
    assert action.context["budget"]["request_id"].startswith("req_")


def test_concurrent_requests_racing_for_the_last_units(gw: GatewayThread, upstream: Any) -> None:
    with concurrent.futures.ThreadPoolExecutor(max_workers=8) as pool:
        results = list(pool.map(lambda _: customer(gw, "race")["object"], range(8)))
    assert results.count("customer") == 3
    assert results.count("cosigner.action") == 5
    assert upstream.count("POST", "/v1/customers") == 3


def test_budgets_follow_the_injected_clock(gw: GatewayThread, clock: Clock) -> None:
    customer(gw, "agent")
    customer(gw, "agent")
    assert customer(gw, "agent")["object"] == "cosigner.action"
    clock.now += 3599
    assert customer(gw, "agent")["object"] == "cosigner.action"
    clock.now += 2
    assert customer(gw, "agent")["object"] == "customer"


def test_budget_state_for_the_dashboard(gw: GatewayThread, clock: Clock) -> None:
    customer(gw, "agent")
    customer(gw, "agent", OTHER_KEY)
    customer(gw, "agent", OTHER_KEY)
    assert gw.app is not None
    states = gw.call(budget_state(gw.app[STORE], gw.app[POLICY].current, clock.now))
    by_key = {(s.rule, s.agent): s for s in states}
    assert by_key[("customers-per-agent", AGENT)].count_left == 1
    assert by_key[("customers-per-agent", OTHER)].count_left == 0
    assert by_key[("customers-global", None)].count_used == 0
    assert by_key[("small-refunds", None)].describe() == "amount 0/20000 used, 20000 left (per 24h)"


# -- cosigner rules explain ------------------------------------------------------------------


def explain(tmp_path: Path, *args: str, database: Path | None = None) -> str:
    env = {
        **os.environ,
        "COSIGNER_RULES": str(RULES),
        "COSIGNER_DATABASE": f"sqlite:///{database or tmp_path / 'cosigner.db'}",
    }
    proc = subprocess.run(
        [sys.executable, "-m", "gateway", "rules", "explain", *args],
        env={**env, "PYTHONPATH": str(REPO)},
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_explain_shows_real_budget_usage(tmp_path: Path, gw: GatewayThread, upstream: Any) -> None:
    charge = upstream.create_charge(amount=100_000)["id"]
    for _ in range(5):
        refund(gw, charge, 4000)
    out = explain(
        tmp_path,
        "POST",
        "/v1/refunds",
        "-d",
        f"charge={charge}",
        "-d",
        "amount=100",
        "--agent",
        AGENT,
    )
    lines = out.splitlines()
    assert "   1. no    small-refunds (10-budgets.yaml): over budget:" in out
    assert "20000 used + 100 > 20000 in 24h" in out
    assert "   2. MATCH refunds (10-budgets.yaml)" in out
    assert "=> HOLD by rule 'refunds' (10-budgets.yaml)" in lines
    assert f"budget usage read from {tmp_path / 'cosigner.db'} (agent {AGENT})" in out

    fresh = explain(
        tmp_path,
        "POST",
        "/v1/refunds",
        "-d",
        f"charge={charge}",
        "-d",
        "amount=100",
        "--agent",
        OTHER,
    )
    assert "=> ALLOW by rule 'small-refunds' (10-budgets.yaml)" in fresh
    assert (
        "   budget: amount 0 used + 100 of 20000, 19900 left after it (per 24h, scope agent)"
        in fresh.splitlines()
    )


def test_explain_without_a_database_shows_budgets_unused(tmp_path: Path) -> None:
    missing = tmp_path / "nothing-here.db"
    out = explain(
        tmp_path, "POST", "/v1/customers", "-d", "metadata[budget]=global", database=missing
    )
    assert "=> ALLOW by rule 'customers-global' (10-budgets.yaml)" in out
    assert "   budget: 0/3 used before this request, 2 left after it (per 1h, scope global)" in out
    assert f"no database at {missing}: budgets shown unused" in out
    assert not missing.exists()


def test_explain_a_full_refund_says_it_is_resolved_first(tmp_path: Path) -> None:
    out = explain(tmp_path, "POST", "/v1/refunds", "-d", "charge=ch_123", "--agent", AGENT)
    assert "small-refunds (10-budgets.yaml): amount is missing (needed for lte 5000)" in out
    assert "=> HOLD by rule 'refunds'" in out
    assert "reads GET /v1/charges/ch_123 first" in out
