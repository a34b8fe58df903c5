"""One-line summaries of Stripe operations, and amounts in currency units: a table of cases."""

from __future__ import annotations

from typing import Any

import pytest

from gateway.summary import format_amount, summarize

CHARGE_CTX = {"currency": "usd"}
SUB_CTX = {"currency": "usd", "amount": 2000, "interval": "month", "customer": "Jane <j@x.io>"}


@pytest.mark.parametrize(
    ("amount", "currency", "shown"),
    [
        (4999, "usd", "$49.99 USD"),
        ("4999", "USD", "$49.99 USD"),
        (5, "usd", "$0.05 USD"),
        (0, "eur", "€0.00 EUR"),
        (123456789, "usd", "$1,234,567.89 USD"),
        (5000, "jpy", "¥5,000 JPY"),
        (5000, "krw", "₩5,000 KRW"),
        (100, "clp", "100 CLP"),
        (1500, "kwd", "1.500 KWD"),
        (1, "bhd", "0.001 BHD"),
        (123456, "tnd", "123.456 TND"),
        (2500, "sek", "25.00 SEK"),
        (-500, "usd", "-$5.00 USD"),
        (-5, "kwd", "-0.005 KWD"),
        (10**20 + 1, "usd", "$1,000,000,000,000,000,000.01 USD"),  # exact: no float on the way
        (1000, "USD", "$10.00 USD"),
        (4999, None, "4999 (minor units, currency unknown)"),
        (4999, "", "4999 (minor units, currency unknown)"),
        (4999, "us dollars", "4999 (minor units, currency unknown)"),
        ("12.5", "usd", "12.5 (unparsed amount)"),
        ("0x10", "usd", "0x10 (unparsed amount)"),
    ],
)
def test_amounts_in_currency_units(amount: Any, currency: Any, shown: str) -> None:
    assert format_amount(amount, currency) == shown


@pytest.mark.parametrize(
    ("method", "path", "params", "context", "summary"),
    [
        # Refunds: currency from the looked-up charge; PRODUCT.md §6's form for the reason.
        (
            "POST",
            "/v1/refunds",
            {"charge": "ch_123", "amount": "4999", "reason": "requested_by_customer"},
            CHARGE_CTX,
            "Refund $49.99 USD of charge ch_123 — reason: requested_by_customer",
        ),
        (
            "POST",
            "/v1/refunds",
            {"charge": "ch_123", "reason": "requested_by_customer"},
            {"currency": "usd", "amount_refundable": 4999},
            "Refund $49.99 USD of charge ch_123 (full refund) — reason: requested_by_customer",
        ),
        (
            "POST",
            "/v1/refunds",
            {"payment_intent": "pi_9", "amount": "5000"},
            {"currency": "jpy"},
            "Refund ¥5,000 JPY of payment intent pi_9",
        ),
        (
            "POST",
            "/v1/refunds",
            {"charge": "ch_123", "amount": "4999"},
            {},
            "Refund 4999 (minor units, currency unknown) of charge ch_123",
        ),
        (
            "POST",
            "/v1/refunds",
            {"charge": "ch_123"},
            {"looked_up": {"error": "lookup failed: Stripe answered 404"}},
            "Refund the full remaining amount of charge ch_123"
            " (full refund; amount unknown: the lookup failed)",
        ),
        (
            "POST",
            "/v1/charges/ch_77/refunds",
            {"amount": "1500"},
            {"currency": "kwd"},
            "Refund 1.500 KWD of charge ch_77",
        ),
        (
            "POST",
            "/v1/charges/ch_77/refund",
            {},
            {"currency": "eur", "amount_refundable": 100},
            "Refund €1.00 EUR of charge ch_77 (full refund)",
        ),
        # Money that is explicit in the request.
        (
            "POST",
            "/v1/payouts",
            {"amount": "50000", "currency": "usd", "destination": "ba_1", "method": "instant"},
            {},
            "Pay out $500.00 USD to ba_1 (instant)",
        ),
        ("POST", "/v1/payouts", {"amount": "700", "currency": "jpy"}, {}, "Pay out ¥700 JPY"),
        (
            "POST",
            "/v1/transfers",
            {"amount": "1000", "currency": "gbp", "destination": "acct_1"},
            {},
            "Transfer £10.00 GBP to acct_1",
        ),
        # Subscriptions: price and customer looked up at hold time.
        (
            "DELETE",
            "/v1/subscriptions/sub_1",
            {},
            SUB_CTX,
            "Cancel subscription sub_1 immediately (Jane <j@x.io>, $20.00 USD/month)",
        ),
        (
            "DELETE",
            "/v1/subscriptions/sub_1",
            {"invoice_now": "true", "prorate": "true"},
            {},
            "Cancel subscription sub_1 immediately (final invoice now, prorated)",
        ),
        ("DELETE", "/v1/subscriptions/sub_1", {}, {}, "Cancel subscription sub_1 immediately"),
        (
            "POST",
            "/v1/subscriptions/sub_1",
            {"cancel_at_period_end": "true"},
            SUB_CTX,
            "Cancel subscription sub_1 at the end of the period (Jane <j@x.io>, $20.00 USD/month)",
        ),
        (
            "POST",
            "/v1/subscriptions/sub_1",
            {"items": [{"price": "price_2"}], "proration_behavior": "none"},
            {},
            "Update subscription sub_1: items, proration_behavior",
        ),
        # Invoices, disputes, credit notes, customers.
        (
            "POST",
            "/v1/invoices/in_1/void",
            {},
            {"currency": "usd", "amount": 12000, "customer": "a@b.co"},
            "Void invoice in_1 ($120.00 USD due, a@b.co)",
        ),
        (
            "POST",
            "/v1/invoices/in_1/pay",
            {},
            {"currency": "usd", "amount": 500},
            "Pay invoice in_1 ($5.00 USD remaining)",
        ),
        (
            "POST",
            "/v1/invoices/in_1/pay",
            {"paid_out_of_band": "true"},
            {},
            "Pay invoice in_1 (out of band)",
        ),
        (
            "POST",
            "/v1/disputes/dp_1/close",
            {},
            {"currency": "usd", "amount": 5000},
            "Close dispute dp_1 (accept the loss of $50.00 USD)",
        ),
        ("POST", "/v1/disputes/dp_1/close", {}, {}, "Close dispute dp_1 (accept the loss)"),
        (
            "POST",
            "/v1/credit_notes",
            {"invoice": "in_1", "amount": "500", "reason": "duplicate"},
            {"currency": "usd"},
            "Credit note of $5.00 USD on invoice in_1 — reason: duplicate",
        ),
        (
            "POST",
            "/v1/credit_notes",
            {"invoice": "in_1", "lines": [{"type": "invoice_line_item"}], "refund_amount": "300"},
            {"currency": "eur"},
            "Credit note on invoice in_1 (by line items), refunding €3.00 EUR",
        ),
        ("POST", "/v1/credit_notes/cn_1/void", {}, {}, "Void credit note cn_1"),
        (
            "DELETE",
            "/v1/customers/cus_1",
            {},
            {"customer": "Jane Doe <jane@example.com>"},
            "Delete customer cus_1 (Jane Doe <jane@example.com>)",
        ),
        ("DELETE", "/v1/customers/cus_1", {}, {}, "Delete customer cus_1"),
        # Unknown operations: generic, still readable, never multi-line.
        (
            "POST",
            "/v1/payment_intents/pi_1/cancel",
            {"cancellation_reason": "duplicate"},
            {},
            "POST /v1/payment_intents/pi_1/cancel (cancellation_reason=duplicate)",
        ),
        (
            "POST",
            "/v1/things",
            {"a": "1", "b": "2", "c": "3", "d": "4", "e": "5", "metadata": {"k": "v"}},
            {},
            "POST /v1/things (a=1, b=2, c=3, d=4, …)",
        ),
        ("DELETE", "/v1/webhook_endpoints/we_1", {}, {}, "DELETE /v1/webhook_endpoints/we_1"),
        (
            "POST",
            "/v1/refunds",
            {"charge": "ch_1\nBCC: x", "amount": "100", "reason": "a\r\nb"},
            CHARGE_CTX,
            "Refund $1.00 USD of charge ch_1 BCC: x — reason: a b",
        ),
    ],
)
def test_summaries(
    method: str, path: str, params: dict[str, Any], context: dict[str, Any], summary: str
) -> None:
    assert summarize(method, path, params, context) == summary


def test_long_values_are_cut() -> None:
    line = summarize("POST", "/v1/refunds", {"charge": "ch_" + "x" * 500, "amount": "1"})
    assert len(line) < 200 and line.endswith("…")
