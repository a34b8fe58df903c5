"""The dashboard over HTTP, as a browser without JavaScript would use it (requests.Session)."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from tests.support.gateway import ADMIN_TOKEN, GatewayThread, gateway_thread, settings_for
from tests.support.mailbox import hold, wait_events
from tests.support.peers import TEST_STRIPE_KEY, SmtpSink

RULES = Path(__file__).parent / "data" / "rules_review"
BEARER = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


@pytest.fixture
def gw(tmp_path: Path, fake_stripe: str, smtp: SmtpSink) -> Iterator[GatewayThread]:
    settings = settings_for(
        tmp_path, fake_stripe, RULES, smtp_url=smtp.url, reviewers="ops@example.com"
    )
    with gateway_thread(settings) as gateway:
        yield gateway


def hidden(html: str, name: str) -> str:
    found = re.search(rf'name="{re.escape(name)}" value="([^"]*)"', html)
    assert found, f"no hidden {name} field"
    return found.group(1)


def sign_in(gw: GatewayThread, reviewer: str = "ops@example.com") -> requests.Session:
    browser = requests.Session()
    form = browser.get(f"{gw.url}/dashboard/login")
    assert form.status_code == 200
    resp = browser.post(
        f"{gw.url}/dashboard/login",
        data={"csrf": hidden(form.text, "csrf"), "token": ADMIN_TOKEN, "reviewer": reviewer},
        allow_redirects=False,
    )
    assert resp.status_code == 303, resp.text[:300]
    return browser


def refund(gw: GatewayThread, upstream: Any, amount: int = 4999) -> dict[str, Any]:
    charge = upstream.create_charge(amount=10_000)
    return hold(gw, "/v1/refunds", {"charge": charge["id"], "amount": str(amount)})


def test_sign_in_sets_an_httponly_samesite_session_cookie(gw: GatewayThread) -> None:
    browser = requests.Session()
    form = browser.get(f"{gw.url}/dashboard/login")
    assert 'name="token"' in form.text and 'type="password"' in form.text
    resp = browser.post(
        f"{gw.url}/dashboard/login",
        data={"csrf": hidden(form.text, "csrf"), "token": ADMIN_TOKEN, "next": "/dashboard/x"},
        allow_redirects=False,
    )
    assert resp.status_code == 303
    assert resp.headers["Location"] == "/dashboard/x"
    cookies = [c for c in resp.raw.headers.getlist("Set-Cookie") if "cosigner_session=" in c]
    assert len(cookies) == 1
    cookie = cookies[0]
    assert "HttpOnly" in cookie and "SameSite=Lax" in cookie and "Path=/" in cookie
    assert ADMIN_TOKEN not in cookie  # a signed session, never the token itself
    assert browser.get(f"{gw.url}/dashboard/actions").status_code == 200


def test_wrong_token_or_forged_form_signs_nobody_in(gw: GatewayThread) -> None:
    browser = requests.Session()
    form = browser.get(f"{gw.url}/dashboard/login")
    wrong = browser.post(
        f"{gw.url}/dashboard/login",
        data={"csrf": hidden(form.text, "csrf"), "token": ADMIN_TOKEN + "x"},
        allow_redirects=False,
    )
    assert wrong.status_code == 401 and "not the admin token" in wrong.text
    assert "cosigner_session" not in browser.cookies
    # A sign-in form posted from elsewhere (no login cookie bound to its token).
    stranger = requests.post(
        f"{gw.url}/dashboard/login",
        data={"csrf": hidden(form.text, "csrf"), "token": ADMIN_TOKEN},
        allow_redirects=False,
    )
    assert stranger.status_code == 403 and "cosigner_session" not in stranger.cookies
    # Never an open redirect.
    form = browser.get(f"{gw.url}/dashboard/login")
    away = browser.post(
        f"{gw.url}/dashboard/login",
        data={"csrf": hidden(form.text, "csrf"), "token": ADMIN_TOKEN, "next": "//evil.test/"},
        allow_redirects=False,
    )
    assert away.status_code == 303 and away.headers["Location"] == "/dashboard/actions"


def test_without_sign_in_no_page_shows_anything_of_an_action(
    gw: GatewayThread, upstream: Any
) -> None:
    held = refund(gw, upstream)
    charge = held["params"]["charge"]
    stranger = requests.Session()
    stranger.cookies.set("cosigner_session", "eyJ4IjoxfQ.AAAA")  # garbage
    for url in (
        f"{gw.url}/dashboard/actions",
        f"{gw.url}/dashboard/actions?status=awaiting_approval",
        f"{gw.url}/dashboard/actions/{held['id']}",
    ):
        for client, headers in (
            (requests, {}),
            (stranger, {}),
            (requests, {"Authorization": "Bearer wrong-token"}),
            (requests, {"Authorization": f"Bearer {TEST_STRIPE_KEY}"}),  # the agent's key
        ):
            resp = client.get(url, headers=headers, allow_redirects=False)  # type: ignore[attr-defined]
            assert resp.status_code == 401, url
            assert 'name="token"' in resp.text  # the sign-in form, and nothing else
            for secret in (held["summary"], charge, "4999", "sk_test_", "refunds"):
                assert secret not in resp.text, (url, secret)
    decide = requests.post(
        f"{gw.url}/dashboard/actions/{held['id']}/decide",
        data={"decision": "approve", "reviewer": "x@y.z"},
        allow_redirects=False,
    )
    assert decide.status_code == 401
    assert gw.action(held["id"]).status == "awaiting_approval"


def test_a_session_cookie_cannot_be_forged_or_edited(gw: GatewayThread) -> None:
    browser = sign_in(gw)
    value = browser.cookies["cosigner_session"]
    payload, mac = value.split(".")
    for forged in (payload + "." + mac[::-1], payload[:-2] + "." + mac, ADMIN_TOKEN):
        resp = requests.get(f"{gw.url}/dashboard/actions", cookies={"cosigner_session": forged})
        assert resp.status_code == 401


def test_decisions_need_the_sessions_csrf_token(gw: GatewayThread, upstream: Any) -> None:
    held = refund(gw, upstream, amount=6000)
    browser = sign_in(gw, reviewer="ops@example.com")
    page = browser.get(f"{gw.url}/dashboard/actions/{held['id']}")
    assert page.status_code == 200
    token = hidden(page.text, "csrf")
    url = f"{gw.url}/dashboard/actions/{held['id']}/decide"
    other = sign_in(gw, reviewer="other@example.com")
    other_token = hidden(other.get(f"{gw.url}/dashboard/actions").text, "csrf")
    assert other_token != token
    for data in (
        {"decision": "approve", "reviewer": "ops@example.com"},
        {"decision": "approve", "reviewer": "ops@example.com", "csrf": ""},
        {"decision": "approve", "reviewer": "ops@example.com", "csrf": other_token},
    ):
        resp = browser.post(url, data=data, allow_redirects=False)
        assert resp.status_code == 403, data
        assert "could not be verified" in resp.text
    assert gw.action(held["id"]).status == "awaiting_approval"
    # Logout is a state change too.
    assert browser.post(f"{gw.url}/dashboard/logout", allow_redirects=False).status_code == 403

    raised = browser.post(
        url,
        data={
            "decision": "approve",
            "reviewer": "ops@example.com",
            "csrf": token,
            "param.amount": "9000",
        },
        allow_redirects=False,
    )
    assert raised.status_code == 400 and "may only be lowered" in raised.text
    ok = browser.post(
        url,
        data={
            "decision": "approve",
            "reviewer": "ops@example.com",
            "csrf": token,
            "param.amount": "2500",
            "note": "half now",
        },
        allow_redirects=False,
    )
    assert ok.status_code == 303
    assert ok.headers["Location"] == f"/dashboard/actions/{held['id']}"
    gw.wait_status(held["id"], {"completed"})
    body = gw.admin("GET", f"/cosigner/v1/actions/{held['id']}").json()
    assert body["modified_params"] == {"amount": "2500"}
    (decision,) = body["decisions"]
    assert (decision["reviewer"], decision["via"], decision["note"]) == (
        "ops@example.com",
        "dashboard",
        "half now",
    )
    again = browser.post(
        url,
        data={"decision": "reject", "reviewer": "someone@else.test", "csrf": token},
        allow_redirects=False,
    )
    assert again.status_code == 409 and "not awaiting_approval" in again.text


def test_the_bearer_header_works_without_a_cookie(gw: GatewayThread, upstream: Any) -> None:
    held = refund(gw, upstream)
    listing = requests.get(f"{gw.url}/dashboard/actions", headers=BEARER)
    assert listing.status_code == 200 and held["id"] in listing.text
    resp = requests.post(
        f"{gw.url}/dashboard/actions/{held['id']}/decide",
        data={"decision": "reject", "reviewer": "script@example.com", "note": "no"},
        headers=BEARER,
        allow_redirects=False,
    )
    assert resp.status_code == 303
    assert gw.action(held["id"]).status == "rejected"


def test_list_filters_and_pages_newest_first(gw: GatewayThread, upstream: Any) -> None:
    first = refund(gw, upstream)
    payouts = [
        hold(gw, "/v1/payouts", {"amount": str(100 + i), "currency": "usd"}) for i in range(26)
    ]
    browser = sign_in(gw)
    page = browser.get(f"{gw.url}/dashboard/actions")
    ids = re.findall(r'href="/dashboard/actions/(act_\w+)"', page.text)
    assert len(ids) == 25  # a page
    older = re.search(r'href="/dashboard/actions(\?[^"]+)" rel="next"', page.text)
    assert older
    page2 = browser.get(f"{gw.url}/dashboard/actions{older.group(1).replace('&amp;', '&')}")
    ids2 = re.findall(r'href="/dashboard/actions/(act_\w+)"', page2.text)
    assert len(ids2) == 2 and 'rel="next"' not in page2.text
    assert sorted(ids + ids2) == sorted([first["id"]] + [p["id"] for p in payouts])
    # Newest first (creation time has one-second resolution; ties keep a stable order).
    created = [gw.action(i).created for i in ids + ids2]
    assert created == sorted(created, reverse=True)
    assert ids2[-1] == first["id"] or gw.action(ids2[-1]).created == gw.action(first["id"]).created

    by_rule = browser.get(f"{gw.url}/dashboard/actions", params={"rule": "refunds"})
    assert re.findall(r'href="/dashboard/actions/(act_\w+)"', by_rule.text) == [first["id"]]
    by_agent = browser.get(f"{gw.url}/dashboard/actions", params={"agent": "nobody"})
    assert "No actions match" in by_agent.text
    gw.admin("POST", f"/cosigner/v1/actions/{first['id']}/cancel")
    by_status = browser.get(f"{gw.url}/dashboard/actions", params={"status": "cancelled"})
    assert re.findall(r'href="/dashboard/actions/(act_\w+)"', by_status.text) == [first["id"]]
    bogus = browser.get(f"{gw.url}/dashboard/actions", params={"status": "nonsense"})
    assert bogus.status_code == 200 and "Unknown status" in bogus.text


def test_receipt_shows_request_rule_timeline_and_stripes_answer(
    gw: GatewayThread, upstream: Any, smtp: SmtpSink
) -> None:
    held = hold(
        gw,
        "/v1/refunds",
        {"charge": upstream.create_charge(amount=10_000)["id"], "amount": "4999"},
        **{"Cosigner-Justification": "duplicate <charge>", "Idempotency-Key": "order-77"},
    )
    wait_events(gw, held["id"], lambda es: any(e.kind == "email_sent" for e in es))
    browser = sign_in(gw)
    url = f"{gw.url}/dashboard/actions/{held['id']}"
    before = browser.get(url).text
    assert "awaiting approval" in before and "Emailed billing@example.com" in before
    assert "duplicate &lt;charge&gt;" in before and "order-77" in before
    assert "4999 ($49.99 USD)" in before and "sk_test_…6789" in before
    assert TEST_STRIPE_KEY not in before and "stored encrypted" in before
    approve = browser.post(
        f"{url}/decide",
        data={
            "decision": "approve",
            "reviewer": "ops@example.com",
            "note": "ok",
            "csrf": hidden(before, "csrf"),
        },
    )
    assert approve.status_code == 200  # followed the redirect back to the receipt
    gw.wait_status(held["id"], {"completed"})
    after = browser.get(url).text
    refund_id = gw.action(held["id"]).response_body.split('"id": "')[1].split('"')[0]
    for text in (
        "Held by rule refunds",
        "Emailed billing@example.com",
        "Approved by ops@example.com via dashboard",
        "Attempt 1 to Stripe: Stripe answered 200",
        "Completed: Stripe answered",
        "Stripe's answer",
        refund_id,
        "erased (the action is final)",
    ):
        assert text in after, text
    assert re.search(r"<em>latency</em> \d+(\.\d+)? ms", after)
    assert 'name="decision"' not in after  # nothing left to decide
    assert TEST_STRIPE_KEY not in after


def test_pages_are_self_contained_and_locked_down(gw: GatewayThread, upstream: Any) -> None:
    held = refund(gw, upstream)
    browser = sign_in(gw)
    for path in ("/dashboard/actions", f"/dashboard/actions/{held['id']}", "/dashboard/login"):
        resp = browser.get(gw.url + path)
        assert resp.headers["X-Frame-Options"] == "DENY"
        assert "frame-ancestors 'none'" in resp.headers["Content-Security-Policy"]
        assert "<script" not in resp.text
        # No CDN: every stylesheet, image and form target is the gateway's own.
        for ref in re.findall(r'(?:href|src|action)="([^"]+)"', resp.text):
            assert ref.startswith("/") or ref.startswith(gw.url), ref
    css = requests.get(f"{gw.url}/dashboard/static/style.css")
    assert css.status_code == 200 and css.headers["Content-Type"].startswith("text/css")
    assert "@media" in css.text and "http" not in css.text
    assert requests.get(f"{gw.url}/dashboard/static/nope.css").status_code == 404
    home = requests.get(f"{gw.url}/dashboard", allow_redirects=False)
    assert home.status_code == 303 and home.headers["Location"] == "/dashboard/actions"


def test_logout_ends_the_session(gw: GatewayThread) -> None:
    browser = sign_in(gw)
    page = browser.get(f"{gw.url}/dashboard/actions")
    resp = browser.post(
        f"{gw.url}/dashboard/logout",
        data={"csrf": hidden(page.text, "csrf")},
        allow_redirects=False,
    )
    assert resp.status_code == 303 and resp.headers["Location"] == "/dashboard/login"
    assert "cosigner_session" not in browser.cookies
    assert browser.get(f"{gw.url}/dashboard/actions").status_code == 401


def test_dashboard_is_closed_without_an_admin_token(tmp_path: Path, fake_stripe: str) -> None:
    settings = settings_for(tmp_path, fake_stripe, RULES, admin_token=None)
    with gateway_thread(settings) as gw:
        page = requests.get(f"{gw.url}/dashboard/login")
        assert "dashboard is closed" in page.text
        resp = requests.get(f"{gw.url}/dashboard/actions", headers={"Authorization": "Bearer "})
        assert resp.status_code == 401
