"""Review pages and the dashboard in real headless Chromium (Playwright's sync API).

The gateway runs in a thread (``gateway_thread``); the browser is Debian's
Chromium found by ``tests/support/browser.py`` (``make browser`` installs it).
Screenshots go to ``test-artifacts/`` (ignored by git).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.browser import artifact, browser, chromium_path, distinct_colors
from tests.support.gateway import ADMIN_TOKEN, GatewayThread, gateway_thread, settings_for
from tests.support.mailbox import hold, wait_links
from tests.support.peers import SmtpSink

pytestmark = [pytest.mark.browser, pytest.mark.slow]

RULES = Path(__file__).parent / "data" / "rules_review"
DESKTOP = {"width": 1280, "height": 900}
PHONE = {"width": 390, "height": 844}


@pytest.fixture
def chromium() -> Iterator[Any]:
    if chromium_path() is None:
        message = "no Chromium: run `make browser` (Debian's chromium-headless-shell)"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    with browser() as instance:
        yield instance


@pytest.fixture
def gw(tmp_path: Path, fake_stripe: str, smtp: SmtpSink) -> Iterator[GatewayThread]:
    settings = settings_for(
        tmp_path, fake_stripe, RULES, smtp_url=smtp.url, reviewers="ops@example.com"
    )
    with gateway_thread(settings) as gateway:
        yield gateway


def sign_in(page: Any, gw: GatewayThread, start: str = "/dashboard/actions") -> None:
    from playwright.sync_api import expect

    page.goto(gw.url + start)
    expect(page.locator("h1")).to_have_text("Sign in to Cosigner")
    page.fill("input[name=token]", ADMIN_TOKEN)
    page.fill("input[name=reviewer]", "ops@example.com")
    page.click("button:has-text('Sign in')")
    page.wait_for_url(gw.url + start)


def check_rendered(page: Any, blank: Any, name: str) -> None:
    """A screenshot that is really a page: a real size and many colours, not a blank frame."""
    png = page.screenshot(path=str(artifact(name)), full_page=True)
    assert len(png) > 10_000, len(png)
    assert distinct_colors(blank, png) >= 16


def test_reviewer_opens_the_emailed_link_lowers_the_amount_and_approves(
    chromium: Any, gw: GatewayThread, smtp: SmtpSink, upstream: Any
) -> None:
    from playwright.sync_api import expect

    charge = upstream.create_charge(amount=8000)
    held = hold(gw, "/v1/refunds", {"charge": charge["id"], "amount": "6000"})
    link = wait_links(smtp, held["id"], 1)["billing@example.com"]
    context = chromium.new_context(viewport=PHONE)
    page = context.new_page()
    page.goto(link)
    expect(page.locator("h1")).to_have_text(held["summary"])
    expect(page.locator("input[name='param.amount']")).to_have_value("6000")
    assert gw.action(held["id"]).status == "awaiting_approval"  # opening decided nothing
    check_rendered(page, context.new_page(), "review-phone.png")

    page.fill("input[name='param.amount']", "9000")
    page.click("button[value=approve]")
    expect(page.locator(".error")).to_contain_text("may only be lowered")
    assert gw.action(held["id"]).status == "awaiting_approval"

    page.fill("input[name='param.amount']", "2500")
    page.fill("textarea[name=note]", "partial: one item came back")
    page.click("button[value=approve]")
    expect(page.locator("h1")).to_have_text("Approved")
    gw.wait_status(held["id"], {"completed"})
    (refund,) = [r for r in upstream.refunds(charge["id"]) if r["charge"] == charge["id"]]
    assert refund["amount"] == 2500

    page.goto(link)  # the link decides once
    expect(page.locator("h1")).to_have_text("This link has been used")
    context.close()


def test_dashboard_sign_in_filter_receipt_approve_timeline(
    chromium: Any, gw: GatewayThread, upstream: Any
) -> None:
    from playwright.sync_api import expect

    charge = upstream.create_charge(amount=10_000)
    refund = hold(
        gw,
        "/v1/refunds",
        {"charge": charge["id"], "amount": "4999"},
        **{"Cosigner-Justification": "Customer returned the item"},
    )
    payout = hold(gw, "/v1/payouts", {"amount": "12000", "currency": "usd"})
    context = chromium.new_context(viewport=DESKTOP)
    page = context.new_page()
    requested: list[str] = []
    page.on("request", lambda request: requested.append(request.url))

    sign_in(page, gw)
    rows = page.locator(".action-row")
    expect(rows).to_have_count(2)
    expect(page.locator(".actions")).to_contain_text(payout["summary"])
    expect(page.locator(".actions")).to_contain_text(refund["summary"])

    page.fill("input[name=rule]", "refunds")
    page.click("button:has-text('Filter')")
    expect(rows).to_have_count(1)
    expect(rows.first).to_contain_text(refund["summary"])
    page.select_option("select[name=status]", "completed")
    page.click("button:has-text('Filter')")
    expect(rows).to_have_count(0)
    page.select_option("select[name=status]", "awaiting_approval")
    page.click("button:has-text('Filter')")
    expect(rows).to_have_count(1)

    rows.first.locator("a").click()
    page.wait_for_url(f"{gw.url}/dashboard/actions/{refund['id']}")
    expect(page.locator("h1")).to_have_text(refund["summary"])
    expect(page.locator(".badge").first).to_have_text("awaiting approval")
    expect(page.locator(".justification")).to_contain_text("Customer returned the item")
    expect(page.locator(".timeline")).to_contain_text("Held by rule refunds")
    check_rendered(page, context.new_page(), "receipt-desktop.png")

    expect(page.locator("input[name=reviewer]")).to_have_value("ops@example.com")
    page.fill("textarea[name=note]", "matches the return")
    page.click("button[value=approve]")
    page.wait_for_url(f"{gw.url}/dashboard/actions/{refund['id']}")
    timeline = page.locator(".timeline")
    expect(timeline).to_contain_text("Approved by ops@example.com via dashboard")
    expect(timeline).to_contain_text("matches the return")
    gw.wait_status(refund["id"], {"completed"})
    page.reload()
    expect(timeline).to_contain_text("Attempt 1 to Stripe: Stripe answered 200")
    expect(timeline).to_contain_text("Completed: Stripe answered")
    expect(page.locator(".badge").first).to_have_text("completed")
    expect(page.locator("pre.body")).to_contain_text('"object": "refund"')
    expect(page.locator("button[value=approve]")).to_have_count(0)
    check_rendered(page, context.new_page(), "receipt-completed.png")

    page.click("button:has-text('Sign out')")
    expect(page.locator("h1")).to_have_text("Sign in to Cosigner")
    page.goto(f"{gw.url}/dashboard/actions/{refund['id']}")
    expect(page.locator("h1")).to_have_text("Sign in to Cosigner")
    assert refund["summary"] not in page.content()

    # Rendered offline: nothing was fetched from anywhere but the gateway.
    assert requested and all(u.startswith(gw.url) for u in requested), requested
    context.close()


def test_pages_fit_a_phone_screen(chromium: Any, gw: GatewayThread, upstream: Any) -> None:
    from playwright.sync_api import expect

    charge = upstream.create_charge(amount=10_000)
    long_value = "order-" + "x" * 120  # long values wrap instead of widening the page
    held = hold(
        gw,
        "/v1/refunds",
        {"charge": charge["id"], "amount": "4999", "metadata[note]": long_value},
    )
    context = chromium.new_context(viewport=PHONE, is_mobile=True, has_touch=True)
    page = context.new_page()
    sign_in(page, gw)
    for path in ("/dashboard/actions", f"/dashboard/actions/{held['id']}"):
        page.goto(gw.url + path)
        overflow = page.evaluate(
            "document.documentElement.scrollWidth - document.documentElement.clientWidth"
        )
        assert overflow <= 1, (path, overflow)
    approve = page.locator("button[value=approve]")
    expect(approve).to_be_visible()
    box = approve.bounding_box()
    assert box is not None and box["x"] >= 0 and box["x"] + box["width"] <= PHONE["width"]
    assert box["height"] >= 36  # a thumb-sized target
    check_rendered(page, context.new_page(), "receipt-phone.png")
    assert re.search(r"4999 \(\$49\.99 USD\)", page.content())
    context.close()
