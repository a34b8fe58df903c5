"""One readable line saying what money a request would move (202 body, emails, dashboard).

``summarize(method, path, params, context)``: ``params`` as the agent sent them,
``context`` what was looked up from Stripe at hold time (see gateway/resolve.py):
``currency``, ``amount_refundable`` (a refund), ``amount`` and ``interval`` (money an
operation implies: an invoice's amount, a dispute's, a subscription's price),
``customer`` (a display name). Every value shown is cleaned to one short line.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any

# Stripe's zero-decimal and three-decimal currencies (stripe.com/docs/currencies).
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
_CURRENCY = re.compile(r"[A-Za-z]{3}")
_UNSAFE = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]+")
MAX_SHOWN = 80

Summarizer = Callable[[re.Match[str], Mapping[str, Any], Mapping[str, Any]], str]


def strict_int(value: Any) -> int | None:
    """The integer Stripe would read, or None when the value is not a canonical integer."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str) and _INT.fullmatch(value):
        return int(value)
    return None


def minor_exponent(currency: str) -> int:
    """Digits after the decimal point in Stripe's minor units: 0 (JPY), 2 (USD), 3 (KWD)."""
    cur = currency.lower()
    return 0 if cur in ZERO_DECIMAL else 3 if cur in THREE_DECIMAL else 2


def format_amount(amount: Any, currency: Any) -> str:
    """``4999, "usd"`` → ``$49.99 USD``; minor units are said so when the currency is unknown."""
    minor = strict_int(amount)
    if minor is None:
        return f"{clean(amount)} (unparsed amount)"
    if not isinstance(currency, str) or _CURRENCY.fullmatch(currency) is None:
        return f"{minor} (minor units, currency unknown)"
    cur = currency.lower()
    exponent = minor_exponent(cur)
    # Exact in integers: the major units with thousands separators, then the minor digits.
    whole, fraction = divmod(abs(minor), 10**exponent)
    major = f"{whole:,}.{fraction:0{exponent}d}" if exponent else f"{whole:,}"
    sign = "-" if minor < 0 else ""
    return f"{sign}{SYMBOLS.get(cur, '')}{major} {cur.upper()}"


def clean(value: Any, limit: int = MAX_SHOWN) -> str:
    """A value from a request or from Stripe as one short, printable line."""
    text = _UNSAFE.sub(" ", value if isinstance(value, str) else str(value)).strip()
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _given(params: Mapping[str, Any], name: str) -> Any:
    """A scalar parameter, or None when absent, empty or not a value."""
    value = params.get(name)
    if value is None or value == "" or isinstance(value, Mapping | list):
        return None
    return value


def _true(params: Mapping[str, Any], name: str) -> bool:
    return str(_given(params, name)).lower() == "true"


def _reason(params: Mapping[str, Any]) -> str:
    reason = _given(params, "reason")
    return f" — reason: {clean(reason)}" if reason is not None else ""


def _implied(ctx: Mapping[str, Any], what: str) -> str:
    """``, $20.00 USD due`` when the context knows the implied amount, else nothing."""
    amount = ctx.get("amount")
    if strict_int(amount) is None:
        return ""
    money = format_amount(amount, ctx.get("currency"))
    interval = ctx.get("interval")
    if isinstance(interval, str) and interval:
        money += f"/{clean(interval, 20)}"
    return f"{money} {what}".rstrip()


def _customer(ctx: Mapping[str, Any]) -> str | None:
    customer = ctx.get("customer")
    return clean(customer) if isinstance(customer, str) and customer else None


def _details(*parts: str | None) -> str:
    shown = [p for p in parts if p]
    return f" ({', '.join(shown)})" if shown else ""


# -- one summariser per operation ----------------------------------------------------------


def _refund(m: re.Match[str], p: Mapping[str, Any], ctx: Mapping[str, Any]) -> str:
    if m.groupdict().get("id"):
        kind, target = "charge", m.group("id")
    elif _given(p, "charge") is not None:
        kind, target = "charge", _given(p, "charge")
    elif _given(p, "payment_intent") is not None:
        kind, target = "payment intent", _given(p, "payment_intent")
    else:
        kind, target = "charge", "(none given)"
    currency = ctx.get("currency")
    if p.get("amount") is not None:
        line = f"Refund {format_amount(p['amount'], currency)} of {kind} {clean(target)}"
    elif strict_int(ctx.get("amount_refundable")) is not None:
        money = format_amount(ctx["amount_refundable"], currency)
        line = f"Refund {money} of {kind} {clean(target)} (full refund)"
    else:
        line = (
            f"Refund the full remaining amount of {kind} {clean(target)}"
            " (full refund; amount unknown: the lookup failed)"
        )
    return line + _reason(p)


def _payout(m: re.Match[str], p: Mapping[str, Any], ctx: Mapping[str, Any]) -> str:
    line = f"Pay out {format_amount(p.get('amount'), _given(p, 'currency'))}"
    if _given(p, "destination") is not None:
        line += f" to {clean(p['destination'])}"
    if _given(p, "method") == "instant":
        line += " (instant)"
    return line


def _transfer(m: re.Match[str], p: Mapping[str, Any], ctx: Mapping[str, Any]) -> str:
    line = f"Transfer {format_amount(p.get('amount'), _given(p, 'currency'))}"
    if _given(p, "destination") is not None:
        line += f" to {clean(p['destination'])}"
    return line


def _subscription_cancel(m: re.Match[str], p: Mapping[str, Any], ctx: Mapping[str, Any]) -> str:
    line = f"Cancel subscription {clean(m.group('id'))} immediately"
    extras = []
    if _true(p, "invoice_now"):
        extras.append("final invoice now")
    if _true(p, "prorate"):
        extras.append("prorated")
    return line + _details(_customer(ctx), _implied(ctx, ""), *extras)


def _subscription_update(m: re.Match[str], p: Mapping[str, Any], ctx: Mapping[str, Any]) -> str:
    sub = clean(m.group("id"))
    about = _details(_customer(ctx), _implied(ctx, ""))
    if _true(p, "cancel_at_period_end"):
        return f"Cancel subscription {sub} at the end of the period{about}"
    if _given(p, "cancel_at") is not None:
        return f"Schedule cancellation of subscription {sub} at {clean(p['cancel_at'])}{about}"
    changed = ", ".join(clean(k, 40) for k in list(p)[:6]) or "nothing"
    more = ", …" if len(p) > 6 else ""
    return f"Update subscription {sub}: {changed}{more}{about}"


def _invoice_void(m: re.Match[str], p: Mapping[str, Any], ctx: Mapping[str, Any]) -> str:
    return f"Void invoice {clean(m.group('id'))}" + _details(_implied(ctx, "due"), _customer(ctx))


def _invoice_pay(m: re.Match[str], p: Mapping[str, Any], ctx: Mapping[str, Any]) -> str:
    how = "out of band" if _true(p, "paid_out_of_band") else None
    line = f"Pay invoice {clean(m.group('id'))}"
    return line + _details(_implied(ctx, "remaining"), _customer(ctx), how)


def _dispute_close(m: re.Match[str], p: Mapping[str, Any], ctx: Mapping[str, Any]) -> str:
    loss = _implied(ctx, "")
    what = f"accept the loss of {loss}" if loss else "accept the loss"
    return f"Close dispute {clean(m.group('id'))} ({what})"


def _credit_note(m: re.Match[str], p: Mapping[str, Any], ctx: Mapping[str, Any]) -> str:
    currency = ctx.get("currency")
    invoice = _given(p, "invoice")
    on = f" on invoice {clean(invoice)}" if invoice is not None else ""
    if p.get("amount") is not None:
        line = f"Credit note of {format_amount(p['amount'], currency)}{on}"
    else:
        line = f"Credit note{on} (by line items)"
    if p.get("refund_amount") is not None:
        line += f", refunding {format_amount(p['refund_amount'], currency)}"
    return line + _reason(p)


def _credit_note_void(m: re.Match[str], p: Mapping[str, Any], ctx: Mapping[str, Any]) -> str:
    return f"Void credit note {clean(m.group('id'))}"


def _customer_delete(m: re.Match[str], p: Mapping[str, Any], ctx: Mapping[str, Any]) -> str:
    return f"Delete customer {clean(m.group('id'))}" + _details(_customer(ctx))


_ID = r"(?P<id>[^/]+)"
# (method, path pattern, summariser); first match wins, so specific paths come first.
_KNOWN: list[tuple[str, re.Pattern[str], Summarizer]] = [
    ("POST", re.compile(r"/v1/refunds"), _refund),
    ("POST", re.compile(rf"/v1/charges/{_ID}/refunds?"), _refund),
    ("POST", re.compile(r"/v1/payouts"), _payout),
    ("POST", re.compile(r"/v1/transfers"), _transfer),
    ("DELETE", re.compile(rf"/v1/subscriptions/{_ID}"), _subscription_cancel),
    ("POST", re.compile(rf"/v1/subscriptions/{_ID}/cancel"), _subscription_cancel),
    ("POST", re.compile(rf"/v1/subscriptions/{_ID}"), _subscription_update),
    ("POST", re.compile(rf"/v1/invoices/{_ID}/void"), _invoice_void),
    ("POST", re.compile(rf"/v1/invoices/{_ID}/pay"), _invoice_pay),
    ("POST", re.compile(rf"/v1/disputes/{_ID}/close"), _dispute_close),
    ("POST", re.compile(r"/v1/credit_notes"), _credit_note),
    ("POST", re.compile(rf"/v1/credit_notes/{_ID}/void"), _credit_note_void),
    ("DELETE", re.compile(rf"/v1/customers/{_ID}"), _customer_delete),
]


def summarize(
    method: str, path: str, params: Mapping[str, Any], context: Mapping[str, Any] | None = None
) -> str:
    """A one-line summary; unknown operations get a generic, still readable one."""
    ctx = context or {}
    method = method.upper()
    for m, pattern, fn in _KNOWN:
        match = pattern.fullmatch(path) if m == method else None
        if match is not None:
            return fn(match, params, ctx)
    shown = [
        f"{clean(k, 40)}={clean(v, 40)}"
        for k, v in params.items()
        if not isinstance(v, Mapping | list)
    ]
    names = ", ".join(shown[:4]) + (", …" if len(shown) > 4 else "")
    return f"{method} {clean(path, 120)}" + (f" ({names})" if names else "")
