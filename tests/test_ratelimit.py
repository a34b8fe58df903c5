"""Abuse limits: per-agent buckets on the proxy, per-address ones on pages and sign-ins."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import requests
import stripe
from pydantic import ValidationError

from gateway.keys import LIMITS
from gateway.ratelimit import Buckets, Rate, parse_rate
from tests.support.gateway import ADMIN_TOKEN, GatewayThread, gateway_thread, settings_for
from tests.support.peers import TEST_STRIPE_KEY, Upstream

RULES = Path(__file__).parent / "data" / "rules_core"
OTHER_KEY = "sk_test_someoneelse000000000000004321"


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


# -- rates and buckets -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "per_second", "burst"),
    [
        ("100/s", 100.0, 200.0),
        ("20/s burst 40", 20.0, 40.0),
        ("60/m", 1.0, 120.0),
        ("60/M BURST 5", 1.0, 5.0),
        ("  36 / h  ", 0.01, 72.0),
        ("0.5/s", 0.5, 1.0),
    ],
)
def test_rates_parse(text: str, per_second: float, burst: float) -> None:
    rate = parse_rate(text)
    assert rate is not None
    assert (rate.per_second, rate.burst) == pytest.approx((per_second, burst))


@pytest.mark.parametrize("text", ["off", "OFF", "0", ""])
def test_rates_can_be_off(text: str) -> None:
    assert parse_rate(text) is None


@pytest.mark.parametrize("text", ["100", "100/d", "-1/s", "0/s", "ten/s", "5/s burst 0", "5/s 10"])
def test_bad_rates_are_refused_with_the_expected_form(text: str) -> None:
    with pytest.raises(ValueError, match=r"100/s|positive|burst"):
        parse_rate(text)


def test_a_bad_rate_setting_stops_startup(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="rate_limit_writes"):
        settings_for(tmp_path, "http://127.0.0.1:1", RULES, rate_limit_writes="lots")


def test_a_bucket_allows_its_burst_then_its_rate() -> None:
    clock = FakeClock()
    buckets = Buckets(Rate(2.0, 3.0, "2/s burst 3"), clock=clock)
    assert [buckets.take("a") for _ in range(3)] == [0, 0, 0]
    assert buckets.take("a") == pytest.approx(0.5)
    assert buckets.take("b") == 0  # buckets are per key
    clock.now += 0.5
    assert buckets.take("a") == 0
    assert buckets.wait("a") == pytest.approx(0.5)  # wait() spends nothing
    assert buckets.wait("a") == pytest.approx(0.5)
    clock.now += 100
    assert [buckets.take("a") for _ in range(3)] == [0, 0, 0]  # refills to the burst, no more
    assert buckets.take("a") > 0


def test_the_bucket_table_is_bounded() -> None:
    clock = FakeClock()
    buckets = Buckets(Rate(1.0, 1.0, "1/s burst 1"), max_keys=100, clock=clock)
    buckets.take("busy")
    for n in range(1000):
        buckets.take(f"random-{n}")
        buckets.wait("busy")  # reading does not keep a bucket alive ...
        if n % 50 == 0:
            buckets.take("busy")  # ... using it does
    assert len(buckets) == 100
    assert buckets.take("busy") > 0  # recently used: still drained, not reset by eviction


# -- through the gateway ---------------------------------------------------------------------


def _gateway(tmp_path: Path, fake_stripe: str, **limits: Any) -> Any:
    return gateway_thread(settings_for(tmp_path, fake_stripe, RULES, **limits))


def _get(gw: GatewayThread, path: str, key: str | None = TEST_STRIPE_KEY, **kw: Any) -> Any:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    headers.update(kw.pop("headers", {}))
    return requests.get(gw.url + path, headers=headers, timeout=30, **kw)


def test_an_agent_over_its_read_limit_gets_stripes_429(
    tmp_path: Path, fake_stripe: str, upstream: Upstream
) -> None:
    with _gateway(tmp_path, fake_stripe, rate_limit_reads="1/m burst 2") as gw:
        client = stripe.StripeClient(
            TEST_STRIPE_KEY, base_addresses={"api": gw.url}, max_network_retries=0
        )
        client.v1.balance.retrieve()
        client.v1.balance.retrieve()
        with pytest.raises(stripe.RateLimitError):
            client.v1.balance.retrieve()
        resp = _get(gw, "/v1/balance")
        assert resp.status_code == 429
        assert resp.json()["error"]["type"] == "rate_limit_error"
        assert resp.json()["error"]["code"] == "rate_limit"
        assert 1 <= int(resp.headers["Retry-After"]) <= 60
        assert resp.headers["Stripe-Should-Retry"] == "false"
        # Another agent has its own bucket; this agent's writes have theirs.
        assert _get(gw, "/v1/balance", OTHER_KEY).status_code == 200
        charge = upstream.create_charge(amount=5000)["id"]
        held = requests.post(
            gw.url + "/v1/refunds",
            data={"charge": charge, "amount": "2500"},
            headers={"Authorization": f"Bearer {TEST_STRIPE_KEY}"},
            timeout=30,
        )
        assert held.status_code == 202
    assert upstream.count("GET", "/v1/balance") == 3


def test_an_agent_over_its_write_limit_holds_nothing_more(
    tmp_path: Path, fake_stripe: str, upstream: Upstream
) -> None:
    charge = upstream.create_charge(amount=5000)["id"]
    with _gateway(tmp_path, fake_stripe, rate_limit_writes="1/h burst 1") as gw:

        def refund() -> requests.Response:
            return requests.post(
                gw.url + "/v1/refunds",
                data={"charge": charge, "amount": "2500"},
                headers={"Authorization": f"Bearer {TEST_STRIPE_KEY}"},
                timeout=30,
            )

        assert refund().status_code == 202
        limited = refund()
        assert limited.status_code == 429
        assert int(limited.headers["Retry-After"]) > 60
        assert _get(gw, "/v1/balance").status_code == 200  # reads still go
        listed = gw.admin("GET", "/cosigner/v1/actions").json()
        assert len(listed["data"]) == 1


def test_bogus_keys_never_get_buckets(tmp_path: Path, fake_stripe: str) -> None:
    with _gateway(tmp_path, fake_stripe) as gw:
        for n in range(50):
            # Raw keys are passed to Stripe to judge: each is an agent (sk_test_…0042).
            assert _get(gw, "/v1/balance", f"sk_test_bogus{n:020d}").status_code == 200
            assert _get(gw, "/v1/balance", f"cos_bogus{n}").status_code == 401
            assert _get(gw, "/v1/balance", None).status_code == 401
        assert gw.app is not None
        limits = gw.app[LIMITS]
        assert limits.reads is not None and len(limits.reads) == 50  # only the sk_ ones
        assert limits.writes is not None and len(limits.writes) == 0


def test_limits_can_be_switched_off(tmp_path: Path, fake_stripe: str) -> None:
    with _gateway(tmp_path, fake_stripe, rate_limit_reads="off") as gw:
        for _ in range(30):
            assert _get(gw, "/v1/balance").status_code == 200


@pytest.mark.parametrize("path", ["/review/not-a-token", "/dashboard/login"])
def test_review_pages_and_login_are_limited_per_address(
    tmp_path: Path, fake_stripe: str, path: str
) -> None:
    with _gateway(tmp_path, fake_stripe, rate_limit_pages="1/h burst 3") as gw:
        statuses = [_get(gw, path, None).status_code for _ in range(3)]
        assert 429 not in statuses
        limited = _get(gw, path, None)
        assert limited.status_code == 429
        assert int(limited.headers["Retry-After"]) > 60
        # The pages' bucket is the address's: the other page is limited too, the API is not.
        other = "/dashboard/login" if path.startswith("/review/") else "/review/x"
        assert _get(gw, other, None).status_code == 429
        assert _get(gw, "/v1/balance").status_code == 200


def _limited_page(resp: requests.Response) -> int:
    """Check a 429 is a page for people saying how long to wait; return that wait."""
    assert resp.status_code == 429
    assert resp.headers["Content-Type"].startswith("text/html")
    assert resp.headers["X-Frame-Options"] == "DENY"  # a page like every other page
    seconds = int(resp.headers["Retry-After"])
    text = _visible_text(resp.text)
    assert "Too many requests" in text
    assert re.search(rf"Please wait {seconds} seconds?\b", text), text
    return seconds


def _visible_text(html: str) -> str:
    return " ".join(re.sub(r"<[^>]+>", " ", html).split())


@pytest.mark.parametrize("path", ["/review/not-a-token", "/dashboard/login"])
def test_a_limited_page_answers_with_a_page(tmp_path: Path, fake_stripe: str, path: str) -> None:
    with _gateway(tmp_path, fake_stripe, rate_limit_pages="1/h burst 1") as gw:
        assert _get(gw, path, None).status_code != 429
        assert 3000 < _limited_page(_get(gw, path, None)) <= 3600
        posted = requests.post(gw.url + path, data={"decision": "approve"}, timeout=30)
        assert _limited_page(posted) > 3000
        assert "(about 60 minutes)" in _visible_text(posted.text)


def test_a_short_wait_is_said_in_seconds_only(tmp_path: Path, fake_stripe: str) -> None:
    with _gateway(tmp_path, fake_stripe, rate_limit_pages="1/m burst 1") as gw:
        assert _get(gw, "/dashboard/login", None).status_code == 200
        resp = _get(gw, "/dashboard/login", None)
        assert 1 <= _limited_page(resp) <= 60
        assert "(about" not in resp.text


def test_a_locked_out_dashboard_answers_with_a_page_and_the_api_in_json(
    tmp_path: Path, fake_stripe: str
) -> None:
    with _gateway(tmp_path, fake_stripe, rate_limit_signin_failures="1/h burst 1") as gw:
        bad = {"Authorization": "Bearer not-the-admin-token"}
        assert _get(gw, "/cosigner/v1/actions", None, headers=bad).status_code == 401
        page = _get(gw, "/dashboard/actions", None)
        assert _limited_page(page) > 3000
        assert "failed sign-ins" in _visible_text(page.text)
        api = _get(gw, "/cosigner/v1/actions", None, headers=bad)
        assert api.status_code == 429
        assert api.headers["Content-Type"].startswith("application/json")
        assert api.json()["error"]["type"] == "rate_limit_error"
        assert api.json()["error"]["code"] == "rate_limit"
        assert api.headers["Retry-After"] == page.headers["Retry-After"]


def test_failed_sign_ins_lock_the_address_out_for_a_while(tmp_path: Path, fake_stripe: str) -> None:
    with _gateway(tmp_path, fake_stripe, rate_limit_signin_failures="1/h burst 3") as gw:
        bad = {"Authorization": "Bearer not-the-admin-token"}
        for _ in range(3):
            assert _get(gw, "/cosigner/v1/actions", None, headers=bad).status_code == 401
        locked = _get(gw, "/cosigner/v1/actions", None, headers=bad)
        assert locked.status_code == 429
        assert int(locked.headers["Retry-After"]) > 60
        # Locked out even with the right token: guessing cannot go on at speed.
        assert gw.admin("GET", "/cosigner/v1/actions").status_code == 429
        assert ADMIN_TOKEN not in locked.text
        # The proxy is not a sign-in: agents on the same address go on.
        assert _get(gw, "/v1/balance").status_code == 200


def test_successful_sign_ins_cost_nothing(tmp_path: Path, fake_stripe: str) -> None:
    with _gateway(tmp_path, fake_stripe, rate_limit_signin_failures="1/h burst 2") as gw:
        for _ in range(20):
            assert gw.admin("GET", "/cosigner/v1/actions").status_code == 200


def test_not_being_signed_in_is_no_failed_sign_in(tmp_path: Path, fake_stripe: str) -> None:
    """A reviewer following receipt links before signing in gets the sign-in page, not 429."""
    with _gateway(tmp_path, fake_stripe, rate_limit_signin_failures="1/h burst 2") as gw:
        for _ in range(10):
            assert _get(gw, "/dashboard/actions/act_x", None).status_code == 401
            assert _get(gw, "/cosigner/v1/actions", None).status_code == 401
        assert gw.admin("GET", "/cosigner/v1/actions").status_code == 200


def test_failed_login_forms_count_as_failed_sign_ins(tmp_path: Path, fake_stripe: str) -> None:
    with _gateway(
        tmp_path, fake_stripe, rate_limit_signin_failures="1/h burst 2", rate_limit_pages="off"
    ) as gw:
        browser = requests.Session()

        def attempt(token: str) -> int:
            form = browser.get(gw.url + "/dashboard/login", timeout=30)
            found = re.search(r'name="csrf" value="([^"]+)"', form.text)
            csrf = found.group(1) if found else ""
            resp = browser.post(
                gw.url + "/dashboard/login",
                data={"token": token, "csrf": csrf},
                allow_redirects=False,
                timeout=30,
            )
            return resp.status_code

        assert [attempt("guess-1"), attempt("guess-2")] == [401, 401]
        assert attempt(ADMIN_TOKEN) == 429  # locked out, right token or not
