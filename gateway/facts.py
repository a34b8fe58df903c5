"""What reviewers see of a held request: facts read live from Stripe at hold time.

``for_reviewers`` builds an action's ``context``: what was resolved for the
rules (``resolved``), the facts looked up for reviewers, labelled and with
their source (``looked_up``: ``from``, ``at``, ``facts`` or ``error``), and the
plain values summaries use (``currency``, ``amount_refundable``, ``amount``,
``interval``, ``customer``). A slow or failed read never fails the hold.
"""

from __future__ import annotations

import datetime
import logging
from collections.abc import Mapping
from typing import Any

from gateway.canonical import CanonicalRequest
from gateway.forwarder import Forwarder
from gateway.resolve import (
    Lookup,
    Resolution,
    Target,
    charge_of,
    fetch,
    field_dict,
    field_int,
    field_str,
    implied_money,
    target_of,
)
from gateway.summary import clean, format_amount

log = logging.getLogger("cosigner.facts")

CONTEXT_TIMEOUT = 3.0  # only decoration for reviewers: never worth delaying a hold more


async def for_reviewers(
    forwarder: Forwarder,
    req: CanonicalRequest,
    api_key: str,
    headers: Mapping[str, str],
    resolution: Resolution | None,
) -> dict[str, Any]:
    """The action's ``context``: what was resolved, and facts looked up for reviewers.

    Never raises and never waits more than CONTEXT_TIMEOUT: a hold must not fail
    because Stripe is slow to answer a read.
    """
    context: dict[str, Any] = {}
    try:
        if resolution is not None:
            context["resolved"] = resolution.as_context()
            target, lookup = resolution.target, resolution.lookup
        else:
            found = target_of(req.method, req.path, req.params)
            if found is None:
                return context
            target = found
            lookup = await fetch(forwarder, target, api_key, headers, timeout=CONTEXT_TIMEOUT)
        context.update(describe(target, lookup))
    except Exception:  # decoration only: log, and hold without it
        log.exception("looking up context for %s %s failed", req.method, req.path)
        context["looked_up"] = {"error": "lookup failed: internal error"}
    return context


def describe(target: Target, lookup: Lookup) -> dict[str, Any]:
    """Context keys from one lookup: labelled facts, plus the values summaries use."""
    looked_up: dict[str, Any] = {"from": lookup.source, "at": _when(lookup.at)}
    if lookup.obj is None:
        looked_up["error"] = lookup.error or "lookup failed"
        return {"looked_up": looked_up}
    obj = lookup.obj
    out: dict[str, Any] = {}
    facts: dict[str, str] = {}
    currency = field_str(obj, "currency")
    if target.kind in ("charge", "payment_intent"):
        charge = charge_of(target, obj)
        currency = field_str(charge, "currency") or currency
        if target.kind == "payment_intent":
            _money_fact(facts, "Payment intent amount", field_int(obj, "amount"), currency)
            if charge is not None and field_str(charge, "id"):
                facts["Charge"] = clean(charge["id"])
        _money_fact(facts, "Charge amount", field_int(charge, "amount"), currency)
        _money_fact(facts, "Already refunded", field_int(charge, "amount_refunded"), currency)
        if target.money == "refund":
            refundable, _, _ = implied_money(target, obj)
            if refundable is not None:
                out["amount_refundable"] = refundable
                _money_fact(facts, "Still refundable", refundable, currency)
        _date_fact(
            facts, "Charge created", field_int(charge, "created") or field_int(obj, "created")
        )
        _text_fact(facts, "Status", field_str(charge, "status"))
        _text_fact(
            facts, "Description", field_str(charge, "description") or field_str(obj, "description")
        )
        customer = _customer(obj) or _customer(charge or {})
    elif target.kind == "subscription":
        price, price_currency, interval = _subscription_price(obj)
        currency = price_currency or currency
        if price is not None:
            out["amount"] = price
            _money_fact(facts, "Price", price, currency)
            if interval:
                out["interval"] = interval
                facts["Price"] += f" per {interval}"
        _text_fact(facts, "Status", field_str(obj, "status"))
        _date_fact(facts, "Current period ends", field_int(obj, "current_period_end"))
        _date_fact(facts, "Created", field_int(obj, "created"))
        customer = _customer(obj)
    elif target.kind == "invoice":
        _text_fact(facts, "Invoice number", field_str(obj, "number"))
        _money_fact(facts, "Amount due", field_int(obj, "amount_due"), currency)
        _money_fact(facts, "Amount remaining", field_int(obj, "amount_remaining"), currency)
        name = "amount_remaining" if target.money == "invoice_pay" else "amount_due"
        if field_int(obj, name) is not None:
            out["amount"] = field_int(obj, name)
        _text_fact(facts, "Status", field_str(obj, "status"))
        _date_fact(facts, "Created", field_int(obj, "created"))
        customer = _person(field_str(obj, "customer_name"), field_str(obj, "customer_email"))
        customer = customer or _customer(obj)
    elif target.kind == "dispute":
        _money_fact(facts, "Disputed amount", field_int(obj, "amount"), currency)
        if field_int(obj, "amount") is not None:
            out["amount"] = field_int(obj, "amount")
        _text_fact(facts, "Reason", field_str(obj, "reason"))
        _text_fact(facts, "Status", field_str(obj, "status"))
        _text_fact(facts, "Charge", field_str(obj, "charge"))
        evidence = field_dict(obj, "evidence_details")
        _date_fact(facts, "Evidence due by", field_int(evidence, "due_by"))
        customer = None
    else:  # customer
        customer = _person(field_str(obj, "name"), field_str(obj, "email")) or clean(target.id)
        _date_fact(facts, "Customer since", field_int(obj, "created"))
        _text_fact(facts, "Description", field_str(obj, "description"))
        balance = field_int(obj, "balance")
        if balance is None:
            balance = field_int(obj, "account_balance")
        if balance:
            _money_fact(facts, "Balance", balance, currency)
    if customer:
        out["customer"] = customer
        facts = {"Customer": customer, **facts}
    if currency:
        out["currency"] = currency.lower()
    looked_up["facts"] = facts
    return {"looked_up": looked_up, **out}


def _money_fact(
    facts: dict[str, str], label: str, amount: int | None, currency: str | None
) -> None:
    if amount is not None:
        facts[label] = format_amount(amount, currency)


def _text_fact(facts: dict[str, str], label: str, value: str | None) -> None:
    if value:
        facts[label] = clean(value)


def _when(ts: float) -> str:
    return datetime.datetime.fromtimestamp(ts, datetime.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _date_fact(facts: dict[str, str], label: str, ts: int | None) -> None:
    if ts is not None and ts > 0:
        try:
            when = datetime.datetime.fromtimestamp(ts, datetime.UTC)
        except (OverflowError, OSError, ValueError):
            return
        facts[label] = when.strftime("%Y-%m-%d %H:%M UTC")


def _person(name: str | None, email: str | None) -> str | None:
    if name and email:
        return f"{clean(name)} <{clean(email)}>"
    return clean(name or email) if (name or email) else None


def _customer(obj: Mapping[str, Any]) -> str | None:
    """Who a charge or subscription is for: the expanded customer, else billing details."""
    customer = obj.get("customer")
    if isinstance(customer, Mapping):
        found = _person(field_str(customer, "name"), field_str(customer, "email"))
        if found:
            return found
        customer = customer.get("id")
    billing = field_dict(obj, "billing_details")
    found = _person(
        field_str(billing, "name"), field_str(billing, "email") or field_str(obj, "receipt_email")
    )
    if found:
        return found
    return clean(customer) if isinstance(customer, str) and customer else None


def _subscription_price(obj: Mapping[str, Any]) -> tuple[int | None, str | None, str | None]:
    """Total price per interval across items (``price``, or legacy ``plan``)."""
    items = field_dict(obj, "items")
    data = items.get("data") if items is not None else None
    if not isinstance(data, list) or not data:
        return None, None, None
    total, currency, interval = 0, None, None
    for item in data:
        if not isinstance(item, Mapping):
            return None, None, None
        price = field_dict(item, "price")
        plan = field_dict(item, "plan")
        unit = field_int(price, "unit_amount") if price is not None else None
        if unit is None:
            unit = field_int(plan, "amount")
        recurring = field_dict(price, "recurring")
        every = field_str(recurring, "interval") or field_str(plan, "interval")
        count = field_int(recurring, "interval_count") or field_int(plan, "interval_count") or 1
        if every is not None and count > 1:
            every = f"{count} {every}s"
        cur = field_str(price, "currency") or field_str(plan, "currency")
        quantity = field_int(item, "quantity")
        if unit is None or (interval is not None and every != interval):
            return None, None, None  # mixed intervals: no single honest figure
        total += unit * (quantity if quantity is not None else 1)
        currency, interval = cur or currency, every
    return total, currency, interval
