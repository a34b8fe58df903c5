"""/metrics in Prometheus' text format: requests, upstream latency, actions, forwards, outbox."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import requests

from gateway.metrics import StoreSnapshot
from tests.support.gateway import GatewayThread, gateway_thread, settings_for
from tests.support.peers import TEST_STRIPE_KEY, free_port
from tests.support.scrape import scrape, value, wait_metric

RULES = Path(__file__).parent / "data" / "rules_core"
AUTH = {"Authorization": f"Bearer {TEST_STRIPE_KEY}"}


def hold_refund(gw: GatewayThread, charge: str, amount: int = 2500) -> str:
    resp = requests.post(
        gw.url + "/v1/refunds",
        data={"charge": charge, "amount": str(amount)},
        headers=AUTH,
        timeout=30,
    )
    assert resp.status_code == 202, resp.text
    action_id: str = resp.json()["id"]
    return action_id


def approve(gw: GatewayThread, action_id: str) -> None:
    resp = gw.admin(
        "POST", f"/cosigner/v1/actions/{action_id}/approve", json={"reviewer": "ops@example.com"}
    )
    assert resp.status_code == 200, resp.text


def test_a_held_refund_shows_from_request_to_stripes_answer(
    tmp_path: Path, fake_stripe: str, upstream: Any
) -> None:
    charge = upstream.create_charge(amount=5000)
    with gateway_thread(settings_for(tmp_path, fake_stripe, RULES)) as gw:
        read = requests.get(f"{gw.url}/v1/charges/{charge['id']}", headers=AUTH, timeout=30)
        assert read.status_code == 200
        action_id = hold_refund(gw, charge["id"])
        denied = requests.delete(gw.url + "/v1/customers/cus_1", headers=AUTH, timeout=30)
        assert denied.status_code == 403
        no_key = requests.post(gw.url + "/v1/refunds", data={"charge": "ch_1"}, timeout=30)
        assert no_key.status_code == 401

        before = scrape(gw.url)
        requests_total = "cosigner_requests_total"
        assert value(before, requests_total, decision="allow", rule="defaults.read", code="2xx")
        assert value(before, requests_total, decision="hold", rule="refunds", code="2xx") == 1
        assert (
            value(before, requests_total, decision="deny", rule="no-customer-deletes", code="4xx")
            == 1
        )
        assert value(before, requests_total, decision="none", rule="none", code="4xx") == 1
        # The read, and the hold's lookup of the charge (the refund's currency).
        upstream_calls = value(before, "cosigner_upstream_latency_seconds_count")
        assert upstream_calls >= 2
        assert value(before, "cosigner_upstream_latency_seconds_sum") > 0
        assert value(before, "cosigner_actions", status="awaiting_approval") == 1
        assert value(before, "cosigner_actions", status="completed") == 0
        assert value(before, "cosigner_forward_attempts_total", result="answered") == 0
        assert value(before, "cosigner_store_up") == 1

        approve(gw, action_id)
        gw.wait_status(action_id, {"completed"})
        after = wait_metric(
            gw.url, "cosigner_forwards_total", lambda v: v == 1, outcome="completed"
        )
        assert value(after, "cosigner_actions", status="awaiting_approval") == 0
        assert value(after, "cosigner_actions", status="completed") == 1
        assert value(after, "cosigner_forward_attempts_total", result="answered") == 1
        assert value(after, "cosigner_forward_attempts_total", result="error") == 0
        assert value(after, "cosigner_forwards_total", outcome="failed") == 0
        assert value(after, "cosigner_upstream_latency_seconds_count") == upstream_calls + 1
        assert value(after, "cosigner_upstream_errors_total") == 0


def test_a_forward_that_never_gets_an_answer_counts_attempts_and_the_failure(
    tmp_path: Path, fake_stripe: str, upstream: Any
) -> None:
    charge = upstream.create_charge(amount=5000)
    settings = settings_for(tmp_path, fake_stripe, RULES, forward_attempts=2)
    with gateway_thread(settings) as gw:
        action_id = hold_refund(gw, charge["id"])
        upstream.fault("/v1/refunds", method="POST", fail=[503, 503])
        approve(gw, action_id)
        gw.wait_status(action_id, {"failed"})
        samples = wait_metric(gw.url, "cosigner_forwards_total", lambda v: v == 1, outcome="failed")
        assert value(samples, "cosigner_forward_attempts_total", result="retryable") == 2
        assert value(samples, "cosigner_forward_attempts_total", result="answered") == 0
        assert value(samples, "cosigner_forwards_total", outcome="completed") == 0
        assert value(samples, "cosigner_actions", status="failed") == 1


def test_upstream_that_cannot_be_reached_counts_as_an_error(tmp_path: Path) -> None:
    closed = f"http://127.0.0.1:{free_port()}"
    with gateway_thread(settings_for(tmp_path, closed, RULES)) as gw:
        resp = requests.get(gw.url + "/v1/charges/ch_1", headers=AUTH, timeout=30)
        assert resp.status_code == 502
        samples = scrape(gw.url)
        assert value(samples, "cosigner_upstream_errors_total") == 1
        assert value(samples, "cosigner_upstream_latency_seconds_count") == 1
        assert (
            value(
                samples,
                "cosigner_requests_total",
                decision="allow",
                rule="defaults.read",
                code="5xx",
            )
            == 1
        )


def test_outbox_depth_and_failing_emails(tmp_path: Path, fake_stripe: str, upstream: Any) -> None:
    charge = upstream.create_charge(amount=5000)
    # Nothing listens there: every email attempt fails and waits for its retry.
    smtp_url = f"smtp://127.0.0.1:{free_port()}"
    with gateway_thread(settings_for(tmp_path, fake_stripe, RULES, smtp_url=smtp_url)) as gw:
        hold_refund(gw, charge["id"])
        samples = wait_metric(gw.url, "cosigner_outbox_retrying", lambda v: v == 1, kind="mail")
        assert value(samples, "cosigner_outbox_depth", kind="mail") == 1
        assert value(samples, "cosigner_outbox_items", kind="mail", status="pending") == 1
        assert value(samples, "cosigner_outbox_depth", kind="callback") == 0


def test_each_app_counts_for_itself(tmp_path: Path) -> None:
    closed = f"http://127.0.0.1:{free_port()}"
    with (
        gateway_thread(settings_for(tmp_path / "a", closed, RULES)) as one,
        gateway_thread(settings_for(tmp_path / "b", closed, RULES)) as two,
    ):
        requests.post(one.url + "/v1/refunds", timeout=30)  # 401: no key
        name = "cosigner_requests_total"
        assert value(scrape(one.url), name, decision="none", rule="none", code="4xx") == 1
        assert value(scrape(two.url), name, decision="none", rule="none", code="4xx") == 0


def test_openmetrics_when_the_scraper_asks_for_it(tmp_path: Path) -> None:
    closed = f"http://127.0.0.1:{free_port()}"
    with gateway_thread(settings_for(tmp_path, closed, RULES)) as gw:
        resp = requests.get(
            gw.url + "/metrics",
            headers={"Accept": "application/openmetrics-text; version=1.0.0; charset=utf-8"},
            timeout=10,
        )
        assert resp.status_code == 200
        assert resp.headers["Content-Type"].startswith("application/openmetrics-text")
        assert resp.text.endswith("# EOF\n")
        assert "cosigner_actions" in resp.text


def test_request_counts_and_latency_buckets_read_as_prometheus_client_would_write_them() -> None:
    """The hot-path numbers become the same series a Counter and a Histogram would give."""
    from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
    from prometheus_client.parser import text_string_to_metric_families

    from gateway.metrics import LATENCY_BUCKETS, Metrics, status_class
    from gateway.policy import Policy

    ours = Metrics(Policy.load(RULES))
    registry = CollectorRegistry()
    counter = Counter("cosigner_requests", "-", ["decision", "rule", "code"], registry=registry)
    histogram = Histogram(
        "cosigner_upstream_latency_seconds", "-", buckets=LATENCY_BUCKETS, registry=registry
    )
    requests_made = [
        ("allow", "r1", 200),
        ("allow", "r1", 201),
        ("-", "-", 401),
        ("hold", "r2", 202),
    ]
    for decision, rule, status in requests_made:
        ours.request(decision, rule, status)
        counter.labels(
            "none" if decision == "-" else decision,
            "none" if rule == "-" else rule,
            status_class(status),
        ).inc()
    # On a bucket's bound, just above it, the smallest and beyond the largest.
    for seconds in (0.0, 0.01, 0.0100001, 0.25, 30.0, 31.0, 0.003):
        ours.upstream(seconds, True)
        histogram.observe(seconds)

    def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        return {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text)
            for s in family.samples
            if family.name in ("cosigner_requests", "cosigner_upstream_latency_seconds")
            and not s.name.endswith("_created")
        }

    body, _ = ours.render(StoreSnapshot(None, None))
    expected = samples(generate_latest(registry).decode())
    assert samples(body.decode()) == expected
    assert (
        expected[
            ("cosigner_requests_total", (("code", "2xx"), ("decision", "allow"), ("rule", "r1")))
        ]
        == 2
    )
    assert "cosigner_upstream_latency_seconds_created" in body.decode()
    assert "cosigner_requests_created" in body.decode()
