"""One readable line saying what money a request would move (202 body, emails, dashboard)."""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from decimal import Decimal
from typing import Any

# Stripe's zero-decimal and three-decimal currencies.
ZERO_DECIMAL = frozenset(
    [
        "bif",
        "clp",
        "djf",
        "gnf",
        "jpy",
        "kmf",
        "krw",
        "mga",
        "pyg",
        "rwf",
        "ugx",
        "vnd",
        "vuv",
        "xaf",
        "xof",
        "xpf",
    ]
)
THREE_DECIMAL = frozenset(["bhd", "jod", "kwd", "omr", "tnd"])
SYMBOLS = {
    "usd": "$",
    "eur": "€",
    "gbp": "£",
    "jpy": "¥",
    "inr": "₹",
    "krw": "₩",
    "cad": "CA$",
    "aud": "A$",
    "chf": "CHF ",
    "cny": "CN¥",
}
_INT = re.compile(r"-?(0|[1-9][0-9]*)")


def strict_int(value: Any) -> int | None:
    """The integer Stripe would read, or None when the value is not a canonical integer."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str) and _INT.fullmatch(value):
        return int(value)
    return None


def format_amount(amount: Any, currency: str | None) -> str:
    """``4999, "usd"`` → ``$49.99 USD``; minor units are said so when the currency is unknown."""
    minor = strict_int(amount)
    if minor is None:
        return f"{amount!s} (unparsed amount)"
    if not currency:
        return f"{minor} (minor units, currency unknown)"
    cur = currency.lower()
    exponent = 0 if cur in ZERO_DECIMAL else 3 if cur in THREE_DECIMAL else 2
    major = Decimal(minor).scaleb(-exponent)
    text = f"{major:,.{exponent}f}"
    return f"{SYMBOLS.get(cur, '')}{text} {cur.upper()}"


def _refund(path: str, p: Mapping[str, Any], ctx: Mapping[str, Any]) -> str:
    target = p.get("charge") or p.get("payment_intent")
    m = re.fullmatch(r"/v1/charges/([^/]+)/refunds?", path)
    if m:
        target = m.group(1)
    kind = "charge" if str(target or "").startswith("ch_") else "payment intent"
    currency = p.get("currency") or ctx.get("currency")
    if "amount" in p:
        what = format_amount(p["amount"], currency)
    elif ctx.get("amount_refundable") is not None:
        what = format_amount(ctx["amount_refundable"], currency) + " (full refund)"
    else:
        what = "the full amount"
    line = f"Refund {what} of {kind} {target or '(unspecified)'}"
    if p.get("reason"):
        line += f" — reason: {p['reason']}"
    return line


def _money(verb: str, dest_key: str | None = None) -> Callable[..., str]:
    def summarize(path: str, p: Mapping[str, Any], ctx: Mapping[str, Any]) -> str:
        amount = p.get("amount")
        line = f"{verb} {format_amount(amount, p.get('currency'))}" if amount else verb
        if dest_key and p.get(dest_key):
            line += f" to {p[dest_key]}"
        return line

    return summarize


def _object(verb: str) -> Callable[..., str]:
    def summarize(path: str, p: Mapping[str, Any], ctx: Mapping[str, Any]) -> str:
        obj = path.rstrip("/").split("/")[3] if path.count("/") >= 3 else "?"
        return f"{verb} {obj}"

    return summarize


# (method, path regex) → summariser; first match wins.
_KNOWN: list[
    tuple[str, re.Pattern[str], Callable[[str, Mapping[str, Any], Mapping[str, Any]], str]]
] = [
    ("POST", re.compile(r"/v1/refunds"), _refund),
    ("POST", re.compile(r"/v1/charges/[^/]+/refunds?"), _refund),
    ("POST", re.compile(r"/v1/payouts"), _money("Pay out", "destination")),
    ("POST", re.compile(r"/v1/transfers"), _money("Transfer", "destination")),
    ("DELETE", re.compile(r"/v1/subscriptions/[^/]+"), _object("Cancel subscription")),
    ("POST", re.compile(r"/v1/subscriptions/[^/]+/cancel"), _object("Cancel subscription")),
    ("POST", re.compile(r"/v1/subscriptions/[^/]+"), _object("Update subscription")),
    ("POST", re.compile(r"/v1/invoices/[^/]+/void"), _object("Void invoice")),
    ("POST", re.compile(r"/v1/invoices/[^/]+/pay"), _object("Pay invoice")),
    ("POST", re.compile(r"/v1/disputes/[^/]+/close"), _object("Close dispute (accept the loss)")),
    ("POST", re.compile(r"/v1/credit_notes"), _money("Issue credit note for", "invoice")),
    ("DELETE", re.compile(r"/v1/customers/[^/]+"), _object("Delete customer")),
]


def summarize(
    method: str, path: str, params: Mapping[str, Any], context: Mapping[str, Any] | None = None
) -> str:
    """A one-line summary; unknown operations get a generic, still readable one."""
    ctx = context or {}
    for m, pattern, fn in _KNOWN:
        if m == method and pattern.fullmatch(path):
            return fn(path, params, ctx)
    names = ", ".join(f"{k}={v}" for k, v in list(params.items())[:4] if not isinstance(v, dict))
    return f"{method} {path}" + (f" ({names})" if names else "")
