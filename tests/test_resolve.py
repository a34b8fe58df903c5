"""Full-refund resolution and reviewer context, against localstripe through the stripe SDK.

A refund without ``amount`` is a full refund: the gateway reads the charge (or
payment intent) with the agent's key, the rules see what is still refundable,
the action records what was resolved and from where, and the forward stays a
full refund. Held actions carry facts looked up for reviewers.
"""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import requests
import stripe

from gateway.canonical import CanonicalRequest
from gateway.crypto import mask_key
from gateway.resolve import Target, needs_resolution, target_of
from gateway.rules import RuleSet, parse_rules
from tests.support.gateway import GatewayThread, gateway_thread, settings_for
from tests.support.peers import SETUP_HEADER, TEST_STRIPE_KEY

DATA = Path(__file__).parent / "data"
AGENT = mask_key(TEST_STRIPE_KEY)
SETUP: stripe.RequestOptions = {"headers": {SETUP_HEADER: "1"}}


@pytest.fixture
def gw(tmp_path: Path, fake_stripe: str) -> Iterator[GatewayThread]:
    with gateway_thread(settings_for(tmp_path, fake_stripe, DATA / "rules_resolve")) as gateway:
        yield gateway


def agent(gw: GatewayThread) -> stripe.StripeClient:
    return stripe.StripeClient(
        TEST_STRIPE_KEY, base_addresses={"api": gw.url}, max_network_retries=0
    )


def full_refund(gw: GatewayThread, **params: Any) -> dict[str, Any]:
    result: dict[str, Any] = agent(gw).v1.refunds.create(params=params).to_dict()  # type: ignore[arg-type]
    return result


def approve(gw: GatewayThread, action_id: str, **body: Any) -> None:
    resp = gw.admin(
        "POST",
        f"/cosigner/v1/actions/{action_id}/approve",
        json={"reviewer": "finance@example.com", **body},
    )
    assert resp.status_code == 200, resp.text


# -- rules see the amount still refundable ---------------------------------------------------


def test_full_refund_of_a_small_remainder_is_allowed(gw: GatewayThread, upstream: Any) -> None:
    charge = upstream.create_charge(amount=5000)["id"]
    upstream.client().v1.refunds.create({"charge": charge, "amount": 4200}, SETUP)
    refund = full_refund(gw, charge=charge)
    assert refund["object"] == "refund" and refund["amount"] == 800  # allowed: 800 <= 1000
    (lookup,) = upstream.requests(method="GET", path=f"/v1/charges/{charge}")
    assert lookup["api_key"] == AGENT  # read with the agent's own credentials
    (forward,) = upstream.requests(method="POST", path="/v1/refunds")
    assert forward["params"] == {"charge": charge}  # still a full refund, no amount added


def test_full_refund_of_a_large_remainder_is_held_and_stays_full(
    gw: GatewayThread, upstream: Any
) -> None:
    charge = upstream.create_charge(amount=5000)["id"]
    upstream.client().v1.refunds.create({"charge": charge, "amount": 1000}, SETUP)
    held = full_refund(gw, charge=charge, reason="requested_by_customer")
    assert held["object"] == "cosigner.action" and held["rule"] == "refunds"
    assert held["params"] == {"charge": charge, "reason": "requested_by_customer"}
    assert held["summary"] == (
        f"Refund $40.00 USD of charge {charge} (full refund) — reason: requested_by_customer"
    )
    action = gw.action(held["id"])
    assert action.context["resolved"] == {
        "amount": 4000,
        "currency": "usd",
        "from": f"GET /v1/charges/{charge}",
    }
    assert action.context["amount_refundable"] == 4000
    facts = action.context["looked_up"]["facts"]
    assert facts["Charge amount"] == "$50.00 USD"
    assert facts["Already refunded"] == "$10.00 USD"
    assert facts["Still refundable"] == "$40.00 USD"
    assert action.context["looked_up"]["from"] == f"GET /v1/charges/{charge}"
    # One read served both the rules and the reviewers.
    assert len(upstream.requests(method="GET", path=f"/v1/charges/{charge}")) == 1
    assert not upstream.requests(method="POST", path="/v1/refunds")

    approve(gw, held["id"])
    done = gw.wait_status(held["id"], {"completed", "failed"})
    assert done.status == "completed"
    (forward,) = upstream.requests(method="POST", path="/v1/refunds")
    assert forward["params"] == {"charge": charge, "reason": "requested_by_customer"}
    refunds = [r for r in upstream.refunds(charge) if r["charge"] == charge]
    assert sorted(r["amount"] for r in refunds) == [1000, 4000]


def test_a_reviewer_may_lower_a_full_refund(gw: GatewayThread, upstream: Any) -> None:
    charge = upstream.create_charge(amount=5000)["id"]
    held = full_refund(gw, charge=charge)
    too_much = gw.admin(
        "POST",
        f"/cosigner/v1/actions/{held['id']}/approve",
        json={"reviewer": "finance@example.com", "params": {"amount": "5001"}},
    )
    assert too_much.status_code == 400
    approve(gw, held["id"], params={"amount": "2500"})
    assert gw.wait_status(held["id"], {"completed", "failed"}).status == "completed"
    (forward,) = upstream.requests(method="POST", path="/v1/refunds")
    assert forward["params"] == {"charge": charge, "amount": "2500"}


def test_full_refund_of_a_payment_intent(gw: GatewayThread, upstream: Any) -> None:
    small = upstream.create_payment_intent(amount=900)["id"]
    assert full_refund(gw, payment_intent=small)["amount"] == 900
    large = upstream.create_payment_intent(amount=3000, currency="eur")["id"]
    held = full_refund(gw, payment_intent=large)
    assert held["rule"] == "refunds"
    assert held["summary"] == f"Refund €30.00 EUR of payment intent {large} (full refund)"
    context = gw.action(held["id"]).context
    assert context["resolved"] == {
        "amount": 3000,
        "currency": "eur",
        "from": f"GET /v1/payment_intents/{large}",
    }
    (lookup,) = upstream.requests(method="GET", path=f"/v1/payment_intents/{large}")
    assert lookup["query"] == {"expand": ["latest_charge", "customer"]}


def test_full_refund_on_the_charge_refunds_path(gw: GatewayThread, upstream: Any) -> None:
    charge = upstream.create_charge(amount=700)["id"]
    resp = requests.post(
        f"{gw.url}/v1/charges/{charge}/refunds",
        headers={"Authorization": f"Bearer {TEST_STRIPE_KEY}"},
        timeout=30,
    )
    # Allowed by small-charge-refunds: the rules saw amount 700. (What localstripe does
    # with this legacy path does not matter; that the gateway let it through does.)
    assert resp.status_code != 202, resp.text
    assert upstream.requests(method="GET", path=f"/v1/charges/{charge}")
    (forward,) = upstream.requests(method="POST", path=f"/v1/charges/{charge}/refunds")
    assert forward["params"] == {}


# -- a failed lookup: amount unknown, conditions false, held by the next rule ----------------


def test_unknown_charge_is_held_by_the_next_rule(gw: GatewayThread, upstream: Any) -> None:
    held = full_refund(gw, charge="ch_doesnotexist")
    assert held["object"] == "cosigner.action" and held["rule"] == "refunds"
    assert held["summary"] == (
        "Refund the full remaining amount of charge ch_doesnotexist"
        " (full refund; amount unknown: the lookup failed)"
    )
    context = gw.action(held["id"]).context
    assert context["resolved"]["amount"] is None
    assert context["resolved"]["from"] == "GET /v1/charges/ch_doesnotexist"
    assert "Stripe answered 404" in context["resolved"]["error"]
    assert "Stripe answered 404" in context["looked_up"]["error"]
    assert "small-refunds" not in gw.action(held["id"]).reason


def test_lookup_error_holds_a_refund_a_small_rule_would_allow(
    gw: GatewayThread, upstream: Any
) -> None:
    charge = upstream.create_charge(amount=500)["id"]
    upstream.fault("/v1/charges/", method="GET", fail=[503])
    held = full_refund(gw, charge=charge)
    assert held["rule"] == "refunds"  # 500 would have been allowed had the read worked
    assert "503" in gw.action(held["id"]).context["resolved"]["error"]
    assert not upstream.requests(method="POST", path="/v1/refunds")


def test_an_answer_that_cannot_be_decoded_is_a_lookup_error_not_a_crash() -> None:
    from multidict import CIMultiDict

    from gateway.forwarder import UpstreamResponse
    from gateway.resolve import _object_or_error

    for body in (b"not json", b"[" * 200_000 + b"]" * 200_000, b'{"a":' * 200_000):
        answer = UpstreamResponse(200, CIMultiDict(), body, 1.0)
        assert _object_or_error(answer) == (None, "lookup failed: Stripe's answer is not an object")
    failed = UpstreamResponse(500, CIMultiDict(), b"[" * 200_000, 1.0)
    assert _object_or_error(failed) == (None, "lookup failed: Stripe answered 500")


def test_a_slow_lookup_holds_instead_of_hanging(
    tmp_path: Path, fake_stripe: str, upstream: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("gateway.resolve.RULES_TIMEOUT", 0.5)
    monkeypatch.setattr("gateway.facts.CONTEXT_TIMEOUT", 0.5)
    charge = upstream.create_charge(amount=500)["id"]
    upstream.fault("/v1/charges/", method="GET", delay=3.0)
    with gateway_thread(settings_for(tmp_path, fake_stripe, DATA / "rules_resolve")) as gw:
        held = full_refund(gw, charge=charge)
        assert held["rule"] == "refunds"
        assert "no answer within 0.5s" in gw.action(held["id"]).context["resolved"]["error"]


# -- explicit amounts: no read unless a hold needs context -----------------------------------


def test_allowed_refund_with_an_amount_reads_nothing(gw: GatewayThread, upstream: Any) -> None:
    charge = upstream.create_charge(amount=5000)["id"]
    assert full_refund(gw, charge=charge, amount=300)["object"] == "refund"
    assert not upstream.requests(method="GET")


def test_held_refund_shows_looked_up_facts(gw: GatewayThread, upstream: Any) -> None:
    client = upstream.client()
    cus = client.v1.customers.create({"email": "jane@example.com", "name": "Jane Doe"}, SETUP)
    charge = client.v1.charges.create(
        {"amount": 1_234_500, "currency": "jpy", "source": "pm_card_visa", "customer": cus.id},
        SETUP,
    ).id
    resp = requests.post(
        f"{gw.url}/v1/refunds",
        data={"charge": charge, "amount": "5000"},
        headers={"Authorization": f"Bearer {TEST_STRIPE_KEY}", "Stripe-Account": "acct_123"},
        timeout=30,
    )
    assert resp.status_code == 202
    held = resp.json()
    assert held["summary"] == f"Refund ¥5,000 JPY of charge {charge}"
    context = gw.action(held["id"]).context
    assert "resolved" not in context  # the rules saw the agent's own amount
    assert context["currency"] == "jpy"
    assert context["customer"] == "Jane Doe <jane@example.com>"
    looked_up = context["looked_up"]
    assert looked_up["from"] == f"GET /v1/charges/{charge}"
    assert looked_up["at"].endswith(" UTC")
    assert looked_up["facts"]["Customer"] == "Jane Doe <jane@example.com>"
    assert looked_up["facts"]["Charge amount"] == "¥1,234,500 JPY"
    assert looked_up["facts"]["Already refunded"] == "¥0 JPY"
    assert looked_up["facts"]["Charge created"].endswith(" UTC")
    (lookup,) = upstream.requests(method="GET", path=f"/v1/charges/{charge}")
    assert lookup["stripe_account"] == "acct_123"  # the same account the refund is for
    assert lookup["api_key"] == AGENT


def test_holds_on_one_charge_that_arrive_together_share_its_lookup(
    gw: GatewayThread, upstream: Any
) -> None:
    # A burst of holds on one charge (an agent retrying, say) reads it from Stripe once: the
    # holds that come while the first read is on its way get its answer.
    charge = upstream.create_charge(amount=50_000)["id"]
    upstream.fault(f"/v1/charges/{charge}", method="GET", delay=1.0)
    with ThreadPoolExecutor(6) as pool:
        held = list(pool.map(lambda _: full_refund(gw, charge=charge, amount=5000), range(6)))
    assert {h["status"] for h in held} == {"awaiting_approval"}
    facts = [gw.action(h["id"]).context["looked_up"]["facts"] for h in held]
    assert all(f == facts[0] for f in facts) and facts[0]["Charge amount"]
    assert len(upstream.requests(method="GET", path=f"/v1/charges/{charge}")) == 1
    # Once that read is answered, the next hold reads the charge afresh.
    full_refund(gw, charge=charge, amount=5000)
    assert len(upstream.requests(method="GET", path=f"/v1/charges/{charge}")) == 2


def test_context_lookup_failure_never_fails_the_hold(gw: GatewayThread, upstream: Any) -> None:
    upstream.fault("/v1/charges/", method="GET", fail=["drop"])
    held = full_refund(gw, charge="ch_anything", amount=5000)
    assert held["status"] == "awaiting_approval"
    assert held["summary"] == "Refund 5000 (minor units, currency unknown) of charge ch_anything"
    assert gw.action(held["id"]).context["looked_up"]["error"].startswith("lookup failed")


def test_ids_that_are_not_stripe_ids_are_not_looked_up(gw: GatewayThread, upstream: Any) -> None:
    held = full_refund(gw, charge="../../v1/customers")
    assert held["rule"] == "refunds"
    assert not upstream.requests(method="GET")


# -- other operations: subscription cancel, customer delete ----------------------------------


def test_subscription_cancel_shows_price_and_customer(gw: GatewayThread, upstream: Any) -> None:
    client = upstream.client()
    cus = client.v1.customers.create(
        {
            "email": "jane@example.com",
            "name": "Jane Doe",
            "payment_method": "pm_card_visa",
            "invoice_settings": {"default_payment_method": "pm_card_visa"},
        },
        SETUP,
    )
    product = client.v1.products.create({"name": "Pro"}, SETUP)
    plan = client.v1.plans.create(
        {"amount": 2000, "currency": "usd", "interval": "month", "product": product.id}, SETUP
    )
    sub = client.v1.subscriptions.create(
        {"customer": cus.id, "items": [{"plan": plan.id, "quantity": 2}]}, SETUP
    )
    held = agent(gw).v1.subscriptions.cancel(sub.id).to_dict()
    assert held["object"] == "cosigner.action" and held["rule"] == "defaults.write"
    assert held["summary"] == (
        f"Cancel subscription {sub.id} immediately (Jane Doe <jane@example.com>, $40.00 USD/month)"
    )
    facts = gw.action(held["id"]).context["looked_up"]["facts"]
    assert facts["Price"] == "$40.00 USD per month"
    assert facts["Status"] == "active"


def test_customer_delete_shows_who(gw: GatewayThread, upstream: Any) -> None:
    cus = upstream.client().v1.customers.create(
        {"email": "jane@example.com", "name": "Jane Doe"}, SETUP
    )
    held = agent(gw).v1.customers.delete(cus.id).to_dict()
    assert held["summary"] == f"Delete customer {cus.id} (Jane Doe <jane@example.com>)"


# -- a currency condition on refunds ---------------------------------------------------------


def test_currency_conditions_on_refunds_use_the_charges_currency(
    tmp_path: Path, fake_stripe: str, upstream: Any
) -> None:
    eur = upstream.create_charge(amount=5000, currency="eur")["id"]
    usd = upstream.create_charge(amount=5000, currency="usd")["id"]
    rules = DATA / "rules_resolve_currency"
    with gateway_thread(settings_for(tmp_path, fake_stripe, rules)) as gw:
        assert full_refund(gw, charge=eur, amount=500)["object"] == "refund"
        held = full_refund(gw, charge=usd, amount=500)
        assert held["object"] == "cosigner.action"
        assert gw.action(held["id"]).context["resolved"] == {
            "currency": "usd",
            "from": f"GET /v1/charges/{usd}",
        }
    (forward,) = upstream.requests(method="POST", path="/v1/refunds")
    assert forward["params"] == {"charge": eur, "amount": "500"}  # no currency added


# -- which requests are looked up before the rules decide (no Stripe needed) -----------------

_CURRENCY_RULE = """
version: 1
rules:
  - name: eur-refunds
    match: {method: POST, path: /v1/refunds}
    when: {currency: eur}
    action: allow
  - name: small
    match: {path: /v1/**}
    when: {amount: {lte: 5}}
    action: allow
"""
_NO_CURRENCY_RULE = _CURRENCY_RULE.replace("when: {currency: eur}", "when: {charge: ch_1}")


def _canonical(method: str, path: str, params: dict[str, Any]) -> CanonicalRequest:
    return CanonicalRequest(
        method=method, path=path, query="", params=params, body=b"", content_type=None
    )


def _looked_up_as_always(req: CanonicalRequest, rules: RuleSet) -> Target | None:
    """The rule as first written: the target first, then every rule walked for 'currency'."""
    target = target_of(req.method, req.path, req.params)
    if target is None or target.money is None:
        return None
    if req.params.get("amount") is None:
        return target
    asks = any(
        (rule.methods is None or req.method in rule.methods)
        and (rule.path_regex is None or rule.path_regex.fullmatch(req.path) is not None)
        and any(cond.field == "currency" for cond in rule.conditions)
        for rule in rules.rules
    )
    return target if req.params.get("currency") is None and asks else None


@pytest.mark.parametrize(
    ("method", "path", "params", "with_rule", "without_rule"),
    [
        ("POST", "/v1/refunds", {"charge": "ch_1", "amount": "100"}, "charge", None),
        ("POST", "/v1/refunds", {"charge": "ch_1", "amount": "1", "currency": "eur"}, None, None),
        ("POST", "/v1/refunds", {"charge": "ch_1"}, "charge", "charge"),
        ("POST", "/v1/refunds", {"charge": "ch_1", "amount": None}, "charge", "charge"),
        ("POST", "/v1/refunds", {"payment_intent": "pi_1"}, "payment_intent", "payment_intent"),
        ("POST", "/v1/refunds", {"charge": "a b"}, None, None),  # not a Stripe id
        ("POST", "/v1/refunds", {"amount": "100"}, None, None),  # nothing to read
        ("POST", "/v1/charges/ch_1/refunds", {"amount": "5"}, None, None),  # other path
        ("POST", "/v1/charges/ch_1/refund", {}, "charge", "charge"),
        ("POST", "/v1/invoices/in_1/pay", {}, "invoice", "invoice"),
        ("POST", "/v1/invoices/in_1/void", {}, None, None),  # implies no money
        ("POST", "/v1/disputes/dp_1/close", {}, "dispute", "dispute"),
        ("DELETE", "/v1/subscriptions/sub_1", {}, None, None),
        ("POST", "/v1/customers", {"amount": "5"}, None, None),
        ("GET", "/v1/charges/ch_1", {}, None, None),
        ("GET", "/v1/refunds", {"charge": "ch_1"}, None, None),
    ],
)
def test_which_requests_are_looked_up_first(
    method: str,
    path: str,
    params: dict[str, Any],
    with_rule: str | None,
    without_rule: str | None,
) -> None:
    req = _canonical(method, path, params)
    for text, kind in ((_CURRENCY_RULE, with_rule), (_NO_CURRENCY_RULE, without_rule)):
        rules = parse_rules({"10-x.yaml": text})
        target = needs_resolution(req, rules)
        assert (target.kind if target is not None else None) == kind
        assert target == _looked_up_as_always(req, rules)
