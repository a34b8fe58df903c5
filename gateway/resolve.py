"""Reads from Stripe on an agent's behalf: implicit money for the rules, facts for reviewers.

Two moments, both with the agent's own credentials and ``Stripe-Account``:

* **Before the rules decide** (``for_rules``): when an operation's money is
  implicit — a refund without ``amount`` is a full refund, paying an invoice
  pays what remains, closing a dispute gives up its amount — the object is read
  and the rules see ``amount`` (and ``currency`` when the request has none) as
  Stripe would act on it. Only the rules see it: the forwarded request stays
  exactly what the agent sent. A failed lookup leaves ``amount`` unknown, so
  every condition on it is false and the request cannot slip under a rule
  written for small amounts.
* **When a rule holds** (``facts.for_reviewers``): what a reviewer needs to decide
  (the charge's amount, what was already refunded, the customer...), read with
  a short timeout, labelled as looked up, and never failing the hold.

Which object an operation is about is one table, ``_TARGETS``. What reviewers
see of the read is gateway/facts.py.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from gateway.canonical import CanonicalRequest
from gateway.forwarder import Forwarder, Outbound, UpstreamError, UpstreamResponse
from gateway.rules import RuleSet
from gateway.summary import clean

log = logging.getLogger("cosigner.resolve")

# The shape the parsers below read; any account default could be older (no latest_charge).
LOOKUP_STRIPE_VERSION = "2024-06-20"
RULES_TIMEOUT = 5.0  # the agent is waiting; a slow lookup holds the request instead
# Stripe ids are short and plain; anything else is not looked up (it would be a path).
_STRIPE_ID = re.compile(r"[A-Za-z0-9_]{1,255}")
_LOOKUP_HEADERS = ("Stripe-Account", "Stripe-Context")

Kind = Literal["charge", "payment_intent", "invoice", "dispute", "subscription", "customer"]
Money = Literal["refund", "invoice_pay", "dispute_close"]

_COLLECTIONS: dict[str, str] = {
    "charge": "charges",
    "payment_intent": "payment_intents",
    "invoice": "invoices",
    "dispute": "disputes",
    "subscription": "subscriptions",
    "customer": "customers",
}
_EXPAND: dict[str, tuple[str, ...]] = {
    "charge": ("customer",),
    "payment_intent": ("latest_charge", "customer"),
    "subscription": ("customer",),
}


@dataclass(frozen=True, slots=True)
class Target:
    """The Stripe object an operation is about, and what money it implies, if any."""

    kind: Kind
    id: str
    money: Money | None = None

    @property
    def path(self) -> str:
        """Where to read it."""
        return f"/v1/{_COLLECTIONS[self.kind]}/{self.id}"

    @property
    def query(self) -> str:
        """Expansions, form-encoded as Stripe expects them."""
        return "&".join(f"expand%5B%5D={name}" for name in _EXPAND.get(self.kind, ()))

    @property
    def source(self) -> str:
        """``GET /v1/charges/ch_123``: where a fact came from, for the receipt."""
        return f"GET {self.path}"


@dataclass(frozen=True, slots=True)
class Lookup:
    """One read from Stripe: the object, or why there is none."""

    source: str
    at: float
    obj: Mapping[str, Any] | None = None
    error: str | None = None


@dataclass(frozen=True, slots=True)
class Resolution:
    """Money an operation implies, resolved for the rules (``amount`` None: unknown)."""

    target: Target
    lookup: Lookup
    filled: dict[str, Any]  # what the rules saw that the agent did not send (None: unknown)
    params: dict[str, Any]  # what the rules see; the forwarded request is untouched
    error: str | None = None

    def as_context(self) -> dict[str, Any]:
        """What the action records: what was resolved, from where (or why not)."""
        out: dict[str, Any] = {**self.filled, "from": self.lookup.source}
        if self.error:
            out["error"] = self.error
        return out


# -- which object an operation is about ----------------------------------------------------


def _plain_id(value: Any) -> str | None:
    if not isinstance(value, str) or _STRIPE_ID.fullmatch(value) is None:
        return None
    return value


def _refund(m: re.Match[str], p: Mapping[str, Any]) -> Target | None:
    if m.groupdict().get("id"):
        charge = _plain_id(m.group("id"))
        return Target("charge", charge, "refund") if charge else None
    charge = _plain_id(p.get("charge"))
    if charge is not None:
        return Target("charge", charge, "refund")
    intent = _plain_id(p.get("payment_intent"))
    return Target("payment_intent", intent, "refund") if intent else None


def _from_path(kind: Kind, money: Money | None = None) -> Callable[..., Target | None]:
    def target(m: re.Match[str], p: Mapping[str, Any]) -> Target | None:
        found = _plain_id(m.group("id"))
        return Target(kind, found, money) if found else None

    return target


def _credit_note(m: re.Match[str], p: Mapping[str, Any]) -> Target | None:
    invoice = _plain_id(p.get("invoice"))
    return Target("invoice", invoice) if invoice else None


_ID = r"(?P<id>[^/]+)"
_TARGETS: list[tuple[str, re.Pattern[str], Callable[..., Target | None]]] = [
    ("POST", re.compile(r"/v1/refunds"), _refund),
    ("POST", re.compile(rf"/v1/charges/{_ID}/refunds?"), _refund),
    ("POST", re.compile(rf"/v1/invoices/{_ID}/pay"), _from_path("invoice", "invoice_pay")),
    ("POST", re.compile(rf"/v1/invoices/{_ID}/void"), _from_path("invoice")),
    ("POST", re.compile(rf"/v1/disputes/{_ID}/close"), _from_path("dispute", "dispute_close")),
    ("DELETE", re.compile(rf"/v1/subscriptions/{_ID}"), _from_path("subscription")),
    ("POST", re.compile(rf"/v1/subscriptions/{_ID}/cancel"), _from_path("subscription")),
    ("POST", re.compile(rf"/v1/subscriptions/{_ID}"), _from_path("subscription")),
    ("DELETE", re.compile(rf"/v1/customers/{_ID}"), _from_path("customer")),
    ("POST", re.compile(r"/v1/credit_notes"), _credit_note),
]


# The same table by method, in order: a GET (most traffic) has nothing to look up at all.
_TARGETS_BY_METHOD: dict[str, tuple[tuple[re.Pattern[str], Callable[..., Target | None]], ...]] = {
    method: tuple((pattern, fn) for m, pattern, fn in _TARGETS if m == method)
    for method in {m for m, _, _ in _TARGETS}
}


def target_of(method: str, path: str, params: Mapping[str, Any]) -> Target | None:
    """The object a request is about, if it is one of the operations we look up."""
    for pattern, fn in _TARGETS_BY_METHOD.get(method.upper(), ()):
        match = pattern.fullmatch(path)
        if match is not None:
            found: Target | None = fn(match, params)
            return found
    return None


def _missing(params: Mapping[str, Any], name: str) -> bool:
    return params.get(name) is None


def needs_resolution(req: CanonicalRequest, rules: RuleSet) -> Target | None:
    """The object to read before the rules decide, or None (the usual case: no read)."""
    method = req.method.upper()
    if method not in _TARGETS_BY_METHOD:  # a read (most traffic) is about nothing to look up
        return None
    params = req.params
    # With an amount sent, a read could only tell the currency: a refund carries none, and
    # it is read only when a rule would test it. Cheapest first: no target is worked out.
    if not _missing(params, "amount") and (
        not _missing(params, "currency") or not rules.may_test(method, req.path, "currency")
    ):
        return None
    target = target_of(req.method, req.path, params)
    if target is None or target.money is None:
        return None
    return target


# -- reading -------------------------------------------------------------------------------


async def fetch(
    forwarder: Forwarder,
    target: Target,
    api_key: str,
    headers: Mapping[str, str],
    *,
    timeout: float,
    clock: Callable[[], float] = time.time,
) -> Lookup:
    """GET the object with the agent's key; never raises, a failure is in ``error``."""
    out_headers = {h: headers[h] for h in _LOOKUP_HEADERS if h in headers}
    out_headers["Authorization"] = f"Bearer {api_key}"
    out_headers["Stripe-Version"] = LOOKUP_STRIPE_VERSION
    out = Outbound("GET", target.path, target.query, out_headers, b"")
    at = clock()
    try:
        async with asyncio.timeout(timeout):
            obj, error = await forwarder.read_shared(out, _object_or_error)
    except TimeoutError:
        return Lookup(target.source, at, error=f"lookup failed: no answer within {timeout:g}s")
    except UpstreamError as exc:
        return Lookup(target.source, at, error=f"lookup failed: {clean(exc, 200)}")
    return Lookup(target.source, at, obj, error)


def _object_or_error(resp: UpstreamResponse) -> tuple[Mapping[str, Any] | None, str | None]:
    """Stripe's answer to a lookup, decoded once for every caller that shares the read.

    The object is shared by those callers (holds on one charge): never changed.
    """
    try:
        body = json.loads(resp.body)
    except (ValueError, RecursionError):  # not JSON, or nested deeper than Python decodes
        body = None
    if resp.status != 200:
        message = ""
        if isinstance(body, dict) and isinstance(body.get("error"), dict):
            message = ": " + clean(body["error"].get("message") or "", 200)
        return None, f"lookup failed: Stripe answered {resp.status}{message}"
    if not isinstance(body, dict):
        return None, "lookup failed: Stripe's answer is not an object"
    return body, None


def field_int(obj: Mapping[str, Any] | None, name: str) -> int | None:
    """An integer field of a Stripe object, or None (absent, null or not an integer)."""
    value = obj.get(name) if obj is not None else None
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def field_str(obj: Mapping[str, Any] | None, name: str) -> str | None:
    """A non-empty string field of a Stripe object, or None."""
    value = obj.get(name) if obj is not None else None
    return value if isinstance(value, str) and value else None


def field_dict(obj: Mapping[str, Any] | None, name: str) -> Mapping[str, Any] | None:
    """An object field (expanded, or a list envelope) of a Stripe object, or None."""
    value = obj.get(name) if obj is not None else None
    return value if isinstance(value, Mapping) else None


def charge_of(target: Target, obj: Mapping[str, Any]) -> Mapping[str, Any] | None:
    """The charge a refund would come from: the charge itself, or the intent's latest."""
    if target.kind == "charge":
        return obj
    latest = field_dict(obj, "latest_charge")
    if latest is None:  # accounts pinned to versions before latest_charge
        charges = field_dict(obj, "charges")
        data = charges.get("data") if charges is not None else None
        if isinstance(data, list) and data and isinstance(data[0], Mapping):
            latest = data[0]
    return latest


def implied_money(target: Target, obj: Mapping[str, Any]) -> tuple[int | None, str | None, str]:
    """(amount, currency, error) of the money an operation implies on this object."""
    currency = field_str(obj, "currency")
    if target.money == "refund":
        charge = charge_of(target, obj)
        if charge is None:
            return None, currency, f"{target.id} has no charge to refund"
        amount, refunded = field_int(charge, "amount"), field_int(charge, "amount_refunded")
        if amount is None or refunded is None:
            return None, currency, "the charge shows no amount or amount_refunded"
        return max(amount - refunded, 0), field_str(charge, "currency") or currency, ""
    name = "amount_remaining" if target.money == "invoice_pay" else "amount"
    amount = field_int(obj, name)
    if amount is None:
        return None, currency, f"{target.id} shows no {name}"
    return amount, currency, ""


async def for_rules(
    forwarder: Forwarder,
    req: CanonicalRequest,
    target: Target,
    api_key: str,
    headers: Mapping[str, str],
) -> Resolution:
    """Resolve the implicit money of ``target`` (``needs_resolution``'s) for the rules."""
    lookup = await fetch(forwarder, target, api_key, headers, timeout=RULES_TIMEOUT)
    params = dict(req.params)
    amount: int | None = None
    currency: str | None = None
    error = lookup.error or ""
    if lookup.obj is not None:
        amount, currency, error = implied_money(target, lookup.obj)
    filled: dict[str, Any] = {}
    if _missing(params, "amount"):
        filled["amount"] = amount
        if amount is not None:
            params["amount"] = str(amount)  # as sent values are: strings
    if _missing(params, "currency"):
        filled["currency"] = currency
        if currency is not None:
            params["currency"] = currency
    log.info(
        "resolved for the rules %s %s: %s from %s%s",
        req.method,
        req.path,
        ", ".join(f"{k}={v}" for k, v in filled.items()),
        lookup.source,
        f" ({error})" if error else "",
    )
    return Resolution(target, lookup, filled, params, error or None)
