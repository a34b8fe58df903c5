"""Magic links end to end: read the email from aiosmtpd, follow the link, submit the form."""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from gateway import tokens
from gateway.crypto import Keyring
from tests.support.gateway import SECRET_KEY, GatewayThread, gateway_thread, settings_for
from tests.support.mailbox import events, hold, review_link, wait_events, wait_links
from tests.support.peers import SmtpSink

RULES = Path(__file__).parent / "data" / "rules_review"


@pytest.fixture
def gw(tmp_path: Path, fake_stripe: str, smtp: SmtpSink) -> Iterator[GatewayThread]:
    settings = settings_for(tmp_path, fake_stripe, RULES, smtp_url=smtp.url)
    with gateway_thread(settings) as gateway:
        yield gateway


def refund_links(
    gw: GatewayThread, smtp: SmtpSink, charge: str, amount: int, **extra: str
) -> tuple[dict[str, Any], dict[str, str]]:
    """Hold a refund; its action and ``{reviewer: link}`` once every email is sent and recorded."""
    held = hold(gw, "/v1/refunds", {"charge": charge, "amount": str(amount), **extra})
    want = len(gw.action(held["id"]).reviewers)
    links = wait_links(smtp, held["id"], want)
    # The receipt records a send just after the server accepted it: wait for that too.
    wait_events(gw, held["id"], lambda es: sum(e.kind == "email_sent" for e in es) == want)
    return held, links


def refunds_for(upstream: Any, charge: str) -> list[dict[str, Any]]:
    return [r for r in upstream.refunds(charge) if r["charge"] == charge]


def title(resp: requests.Response) -> str:
    found = re.search(r"<h1[^>]*>(.*?)</h1>", resp.text, re.S)
    assert found, resp.text[:500]
    return found.group(1).strip()


def action_json(gw: GatewayThread, action_id: str) -> dict[str, Any]:
    body: dict[str, Any] = gw.admin("GET", f"/cosigner/v1/actions/{action_id}").json()
    return body


def test_get_only_shows_and_post_decides_via_email(
    gw: GatewayThread, smtp: SmtpSink, upstream: Any
) -> None:
    charge = upstream.create_charge(amount=10_000)
    held, links = refund_links(gw, smtp, charge["id"], 4999, reason="requested_by_customer")
    link = links["billing@example.com"]
    before = [e.kind for e in events(gw, held["id"])]
    # Mail scanners, link previews and the reviewer: three GETs change nothing.
    for _ in range(3):
        page = requests.get(link, timeout=10)
        assert page.status_code == 200
        assert page.headers["Content-Type"].startswith("text/html")
        assert page.headers["Cache-Control"] == "no-store"
        assert page.headers["Referrer-Policy"] == "no-referrer"
        assert "script-src" not in page.headers["Content-Security-Policy"]
        assert held["summary"] in page.text.replace("&#39;", "'")
        assert charge["id"] in page.text and "4999 ($49.99 USD)" in page.text
        assert 'method="post"' in page.text and "<script" not in page.text
    assert requests.head(link, timeout=10).status_code == 200
    assert gw.action(held["id"]).status == "awaiting_approval"
    assert action_json(gw, held["id"])["decisions"] == []
    assert [e.kind for e in events(gw, held["id"])] == before
    assert refunds_for(upstream, charge["id"]) == []

    done = requests.post(link, data={"decision": "approve", "note": "checked the order"})
    assert done.status_code == 200 and title(done) == "Approved"
    gw.wait_status(held["id"], {"completed"})
    (refund,) = refunds_for(upstream, charge["id"])
    assert refund["amount"] == 4999
    (decision,) = action_json(gw, held["id"])["decisions"]
    assert decision | {"created": 0} == {
        "reviewer": "billing@example.com",
        "decision": "approve",
        "note": "checked the order",
        "via": "email",
        "created": 0,
    }


def test_reject_through_the_link(gw: GatewayThread, smtp: SmtpSink, upstream: Any) -> None:
    charge = upstream.create_charge(amount=10_000)
    held, links = refund_links(gw, smtp, charge["id"], 3000)
    resp = requests.post(
        links["billing@example.com"], data={"decision": "reject", "note": "not our order"}
    )
    assert resp.status_code == 200 and title(resp) == "Rejected"
    assert gw.action(held["id"]).status == "rejected"
    (decision,) = action_json(gw, held["id"])["decisions"]
    assert (decision["decision"], decision["via"], decision["note"]) == (
        "reject",
        "email",
        "not our order",
    )
    assert refunds_for(upstream, charge["id"]) == []


def test_tampered_tokens_get_a_clear_400_page_and_decide_nothing(
    gw: GatewayThread, smtp: SmtpSink, upstream: Any
) -> None:
    charge = upstream.create_charge(amount=10_000)
    held, links = refund_links(gw, smtp, charge["id"], 2000)
    link = links["billing@example.com"]
    base, token = link.rsplit("/", 1)
    payload, mac = token.split(".")
    flipped = mac[:-2] + ("A" if mac[-2] != "A" else "B") + mac[-1]
    # Another reviewer's address in the payload, the original signature.
    forged = tokens._b64(f'[1,"{held["id"]}","mallory@example.com",{held["expires_at"]}]'.encode())
    for bad in (
        f"{payload}.{flipped}",
        f"{forged}.{mac}",
        payload,
        "not-a-token",
        f"{payload}.{mac}.{mac}",
        "x" * 3000 + "." + mac,
    ):
        for method in ("GET", "POST"):
            resp = requests.request(method, f"{base}/{bad}", data={"decision": "approve"})
            assert resp.status_code == 400, (bad, method)
            assert title(resp) == "This link is not valid"
            assert held["summary"] not in resp.text and charge["id"] not in resp.text
    assert gw.action(held["id"]).status == "awaiting_approval"
    assert action_json(gw, held["id"])["decisions"] == []


def test_a_token_signed_for_someone_not_reviewing_is_refused(
    gw: GatewayThread, smtp: SmtpSink, upstream: Any
) -> None:
    charge = upstream.create_charge(amount=10_000)
    held, _ = refund_links(gw, smtp, charge["id"], 2000)
    token = tokens.issue(Keyring(SECRET_KEY.encode()), held["id"], "intruder@x.test", 2**40)
    resp = requests.post(f"{gw.url}/review/{token}", data={"decision": "approve"})
    assert resp.status_code == 403
    assert gw.action(held["id"]).status == "awaiting_approval"


def test_expired_tokens_get_a_403_page(gw: GatewayThread, smtp: SmtpSink, upstream: Any) -> None:
    charge = upstream.create_charge(amount=10_000)
    held, _ = refund_links(gw, smtp, charge["id"], 2000)
    past = tokens.issue(
        Keyring(SECRET_KEY.encode()), held["id"], "billing@example.com", int(time.time()) - 5
    )
    for method in ("GET", "POST"):
        resp = requests.request(method, f"{gw.url}/review/{past}", data={"decision": "approve"})
        assert resp.status_code == 403 and title(resp) == "This link has expired"
    assert gw.action(held["id"]).status == "awaiting_approval"

    # A real link whose action ran out of time (the rule gives 2 seconds).
    quick, quick_links = refund_links(gw, smtp, charge["id"], 1500, **{"metadata[expire]": "fast"})
    assert quick["rule"] == "quick-expiry"
    gw.wait_status(quick["id"], {"expired"}, timeout=20)
    resp = requests.post(quick_links["billing@example.com"], data={"decision": "approve"})
    assert resp.status_code == 403 and title(resp) == "This link has expired"
    assert gw.action(quick["id"]).status == "expired"
    assert refunds_for(upstream, charge["id"]) == []


def test_quorum_through_two_reviewers_links_and_links_decide_once(
    gw: GatewayThread, smtp: SmtpSink, upstream: Any
) -> None:
    charge = upstream.create_charge(amount=500_000)
    held, links = refund_links(gw, smtp, charge["id"], 200_000)
    assert held["rule"] == "two-person-refunds" and held["approvals_required"] == 2
    assert set(links) == {"alice@example.com", "bob@example.com", "carol@example.com"}

    first = requests.post(links["alice@example.com"], data={"decision": "approve"})
    assert first.status_code == 200 and "2 approvals" in first.text
    assert gw.action(held["id"]).status == "awaiting_approval"
    # Alice's link is used: she cannot count twice, by GET or POST.
    for method in ("GET", "POST"):
        again = requests.request(method, links["alice@example.com"], data={"decision": "approve"})
        assert again.status_code == 403 and title(again) == "This link has been used"
    assert refunds_for(upstream, charge["id"]) == []

    second = requests.post(links["bob@example.com"], data={"decision": "approve"})
    assert second.status_code == 200 and "sending the request to Stripe" in second.text
    gw.wait_status(held["id"], {"completed"})
    assert len(refunds_for(upstream, charge["id"])) == 1
    decisions = action_json(gw, held["id"])["decisions"]
    assert [(d["reviewer"], d["via"]) for d in decisions] == [
        ("alice@example.com", "email"),
        ("bob@example.com", "email"),
    ]
    # Carol's link still opens, says there is nothing left to decide, and decides nothing.
    late = requests.get(links["carol@example.com"])
    assert late.status_code == 200 and title(late) == "Nothing left to decide"
    late_post = requests.post(links["carol@example.com"], data={"decision": "reject"})
    assert late_post.status_code == 409
    assert gw.action(held["id"]).status == "completed"
    assert len(action_json(gw, held["id"])["decisions"]) == 2


def test_a_reviewer_who_decided_elsewhere_finds_the_link_used(
    gw: GatewayThread, smtp: SmtpSink, upstream: Any
) -> None:
    charge = upstream.create_charge(amount=500_000)
    held, links = refund_links(gw, smtp, charge["id"], 200_000)
    api = gw.admin(
        "POST",
        f"/cosigner/v1/actions/{held['id']}/approve",
        json={"reviewer": "Alice@Example.com"},
    )
    assert api.status_code == 200
    resp = requests.post(links["alice@example.com"], data={"decision": "approve"})
    assert resp.status_code == 403 and title(resp) == "This link has been used"
    assert gw.action(held["id"]).status == "awaiting_approval"  # still one approval of two


def test_edits_lower_the_amount_and_the_forward_uses_it(
    gw: GatewayThread, smtp: SmtpSink, upstream: Any
) -> None:
    charge = upstream.create_charge(amount=8000)
    held, links = refund_links(gw, smtp, charge["id"], 6000)
    link = links["billing@example.com"]
    page = requests.get(link)
    assert 'name="param.amount" value="6000"' in page.text
    assert 'name="param.reason"' in page.text and 'name="param.charge"' not in page.text

    raised = requests.post(link, data={"decision": "approve", "param.amount": "7000"})
    assert raised.status_code == 400
    assert "may only be lowered" in raised.text and "Not recorded" in raised.text
    assert 'value="7000"' in raised.text  # the form keeps what was typed
    garbage = requests.post(link, data={"decision": "approve", "param.amount": "12.5"})
    assert garbage.status_code == 400
    # Fields that are not editable are ignored, never forwarded.
    sneaky = {"decision": "approve", "param.charge": "ch_other", "param.amount": "2500"}
    assert gw.action(held["id"]).status == "awaiting_approval"
    assert action_json(gw, held["id"])["decisions"] == []

    ok = requests.post(link, data={**sneaky, "note": "partial refund"})
    assert ok.status_code == 200 and "amount = 2500" in ok.text
    gw.wait_status(held["id"], {"completed"})
    (refund,) = refunds_for(upstream, charge["id"])
    assert refund["amount"] == 2500
    body = action_json(gw, held["id"])
    assert body["modified_params"] == {"amount": "2500"}
    assert body["params"]["amount"] == "6000"
    assert body["decisions"][0]["via"] == "email"


def test_review_links_use_the_public_url(tmp_path: Path, fake_stripe: str, smtp: SmtpSink) -> None:
    settings = settings_for(
        tmp_path,
        fake_stripe,
        RULES,
        smtp_url=smtp.url,
        public_url="https://cosigner.example.com",
        reviewers="ops@example.com",
    )
    with gateway_thread(settings) as gw:
        held = hold(gw, "/v1/payouts", {"amount": "100", "currency": "usd"})
        (message,) = smtp.wait_for(1, timeout=15)
        link = review_link(message)
        assert link.startswith("https://cosigner.example.com/review/")
        local = gw.url + link.removeprefix("https://cosigner.example.com")
        page = requests.get(local)
        assert page.status_code == 200 and held["id"] in page.text


def test_tokens_verify_across_key_rotation_and_nothing_else() -> None:
    old, new = Keyring(b"old-secret-0123456789"), Keyring(b"new-secret-0123456789")
    token = tokens.issue(old, "act_1", "a@x.test", 2000)
    assert tokens.verify(old, token, 1000) == tokens.ReviewToken("act_1", "a@x.test", 2000)
    rotated = Keyring(b"new-secret-0123456789", [b"old-secret-0123456789"])
    assert tokens.verify(rotated, token, 1000).reviewer == "a@x.test"
    with pytest.raises(tokens.BadToken):
        tokens.verify(new, token, 1000)
    with pytest.raises(tokens.ExpiredToken):
        tokens.verify(old, token, 2000)
    assert re.fullmatch(r"[A-Za-z0-9_\-]+\.[A-Za-z0-9_\-]+", token)  # URL-safe as it is
