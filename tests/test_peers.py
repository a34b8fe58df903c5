"""The test peers work: the fake Stripe (through the real SDK) and the SMTP sink."""

from __future__ import annotations

import json
import os
import time
import urllib.request
from collections.abc import Iterator
from email.message import EmailMessage

import aiosmtplib
import pytest
import stripe
from stripe.params import RefundCreateParams

from tests.support.peers import TEST_STRIPE_KEY, FakeStripeProcess, SmtpSink, Upstream

OTHER_KEY = "sk_test_othertenant000000000000004321"


@pytest.fixture
def http() -> Iterator[stripe.HTTPClient]:
    """The SDK's HTTP client, closed after the test (no unclosed sockets)."""
    client = stripe.RequestsClient(timeout=10)
    yield client
    client.close()  # type: ignore[no-untyped-call]


@pytest.fixture
def client(fake_stripe: str, http: stripe.HTTPClient) -> stripe.StripeClient:
    """The agent's view: the official SDK pointed at the upstream, no retries."""
    return make_client(fake_stripe, http, max_network_retries=0)


def make_client(
    url: str, http: stripe.HTTPClient, *, max_network_retries: int
) -> stripe.StripeClient:
    return stripe.StripeClient(
        TEST_STRIPE_KEY,
        base_addresses={"api": url},
        http_client=http,
        max_network_retries=max_network_retries,
    )


# ---------------------------------------------------------------------------
# Charges, payment intents, refunds
# ---------------------------------------------------------------------------


def test_create_charge(upstream: Upstream, client: stripe.StripeClient) -> None:
    charge = upstream.create_charge(amount=5000, currency="usd")
    assert charge["id"].startswith("ch_")
    assert charge["status"] == "succeeded"
    assert charge["captured"] is True
    assert charge["amount_captured"] == 5000
    again = client.v1.charges.retrieve(charge["id"])
    assert (again.amount, again.currency, again.amount_refunded, again.refunded) == (
        5000,
        "usd",
        0,
        False,
    )
    assert upstream.requests() == [upstream.requests(include_setup=False)[0]]  # only our GET
    assert upstream.requests(include_setup=True)[0]["setup"] is True


def test_create_payment_intent(upstream: Upstream) -> None:
    intent = upstream.create_payment_intent(amount=2500, currency="eur")
    assert intent["status"] == "succeeded"
    assert intent["amount_received"] == 2500
    assert isinstance(intent["latest_charge"], str)  # an id, as at Stripe
    charge = upstream.charge(intent["latest_charge"])
    assert (charge["amount"], charge["captured"], charge["payment_intent"]) == (
        2500,
        True,
        intent["id"],
    )


def test_refund_reason_is_kept(upstream: Upstream, client: stripe.StripeClient) -> None:
    charge = upstream.create_charge()
    refund = client.v1.refunds.create(
        {"charge": charge["id"], "amount": 1000, "reason": "requested_by_customer"}
    )
    assert refund.reason == "requested_by_customer"
    assert refund.amount == 1000
    assert client.v1.refunds.retrieve(refund.id).reason == "requested_by_customer"
    [listed] = upstream.refunds(charge["id"])
    assert listed["reason"] == "requested_by_customer"
    # localstripe never saw `reason` (it rejects unknown parameters); Stripe's
    # own default is null
    plain = client.v1.refunds.create({"charge": charge["id"], "amount": 10})
    assert plain.reason is None
    with pytest.raises(stripe.InvalidRequestError) as err:
        client.v1.refunds.create({"charge": charge["id"], "amount": 10, "reason": "whim"})
    assert err.value.param == "reason"


def test_over_refund_errors_and_charge_totals(
    upstream: Upstream, client: stripe.StripeClient
) -> None:
    charge = upstream.create_charge(amount=5000)
    client.v1.refunds.create({"charge": charge["id"], "amount": 3000})
    with pytest.raises(stripe.InvalidRequestError) as err:
        client.v1.refunds.create({"charge": charge["id"], "amount": 3000})
    assert err.value.code == "amount_too_large"
    assert err.value.http_status == 400
    after_partial = client.v1.charges.retrieve(charge["id"])
    assert (after_partial.amount_refunded, after_partial.refunded) == (3000, False)

    rest = client.v1.refunds.create({"charge": charge["id"]})  # full = what remains
    assert rest.amount == 2000
    with pytest.raises(stripe.InvalidRequestError) as err:
        client.v1.refunds.create({"charge": charge["id"]})
    assert err.value.code == "charge_already_refunded"
    with pytest.raises(stripe.InvalidRequestError) as err:
        client.v1.refunds.create({"charge": charge["id"], "amount": 1})
    assert err.value.code == "charge_already_refunded"
    done = client.v1.charges.retrieve(charge["id"])
    assert (done.amount_refunded, done.refunded) == (5000, True)
    assert len(upstream.refunds(charge["id"])) == 2


def test_refund_by_payment_intent(upstream: Upstream, client: stripe.StripeClient) -> None:
    intent = upstream.create_payment_intent(amount=4000)
    refund = client.v1.refunds.create(
        {"payment_intent": intent["id"], "amount": 1500, "reason": "duplicate"}
    )
    assert (refund.payment_intent, refund.charge, refund.reason) == (
        intent["id"],
        intent["latest_charge"],
        "duplicate",
    )
    with pytest.raises(stripe.InvalidRequestError) as err:
        client.v1.refunds.create({"payment_intent": intent["id"], "amount": 2501})
    assert err.value.code == "amount_too_large"
    rest = client.v1.refunds.create({"payment_intent": intent["id"]})
    assert rest.amount == 2500
    # (localstripe lists refunds made within the same second oldest first)
    assert sorted(r["amount"] for r in upstream.refunds(payment_intent=intent["id"])) == [
        1500,
        2500,
    ]
    # a refund of a charge made by a payment intent names the intent, as at Stripe
    other = upstream.create_payment_intent(amount=100)
    by_charge = client.v1.refunds.create({"charge": other["latest_charge"]})
    assert by_charge.payment_intent == other["id"]


# ---------------------------------------------------------------------------
# Idempotency
# ---------------------------------------------------------------------------


def test_idempotent_replay(upstream: Upstream, client: stripe.StripeClient) -> None:
    charge = upstream.create_charge()
    params: RefundCreateParams = {"charge": charge["id"], "amount": 700}
    first = client.v1.refunds.create(params, {"idempotency_key": "idem-replay-1"})
    second = client.v1.refunds.create(params, {"idempotency_key": "idem-replay-1"})
    assert first.id == second.id
    assert first.last_response is not None and second.last_response is not None
    assert "Idempotent-Replayed" not in first.last_response.headers
    assert second.last_response.headers["Idempotent-Replayed"] == "true"
    assert len(upstream.refunds(charge["id"])) == 1
    assert upstream.count("POST", "/v1/refunds", "received") == 2
    assert upstream.count("POST", "/v1/refunds", "replayed") == 1
    assert upstream.count("POST", "/v1/refunds") == 1  # handled: reached localstripe once

    # keys are scoped per API key: another key's request is a new one
    other = upstream.client(OTHER_KEY).v1.refunds.create(
        params, {"idempotency_key": "idem-replay-1"}
    )
    assert other.id != first.id
    assert len(upstream.refunds(charge["id"])) == 2


def test_idempotency_key_reuse_with_other_body(
    upstream: Upstream, client: stripe.StripeClient
) -> None:
    charge = upstream.create_charge()
    client.v1.refunds.create(
        {"charge": charge["id"], "amount": 100}, {"idempotency_key": "idem-reuse-1"}
    )
    with pytest.raises(stripe.IdempotencyError) as err:
        client.v1.refunds.create(
            {"charge": charge["id"], "amount": 200}, {"idempotency_key": "idem-reuse-1"}
        )
    assert err.value.http_status == 400
    assert err.value.error is not None and err.value.error.type == "idempotency_error"
    assert len(upstream.refunds(charge["id"])) == 1


def test_validation_errors_are_not_saved_for_the_key(
    upstream: Upstream, client: stripe.StripeClient
) -> None:
    charge = upstream.create_charge(amount=1000)
    params: RefundCreateParams = {"charge": charge["id"], "amount": 600}
    client.v1.refunds.create({"charge": charge["id"], "amount": 500})
    with pytest.raises(stripe.InvalidRequestError):
        client.v1.refunds.create(params, {"idempotency_key": "idem-invalid-1"})
    # still over the limit: the same key is evaluated afresh, not replayed
    with pytest.raises(stripe.InvalidRequestError):
        client.v1.refunds.create(params, {"idempotency_key": "idem-invalid-1"})
    assert upstream.count("POST", "/v1/refunds", "replayed") == 0
    assert upstream.count("POST", "/v1/refunds", "handled") == 3


# ---------------------------------------------------------------------------
# Faults, delays, observation
# ---------------------------------------------------------------------------


def test_fault_503_then_success_with_sdk_retry(
    upstream: Upstream, fake_stripe: str, http: stripe.HTTPClient
) -> None:
    charge = upstream.create_charge()
    upstream.fault("/v1/refunds", method="POST", fail=[503])
    retrying = make_client(fake_stripe, http, max_network_retries=1)
    refund = retrying.v1.refunds.create({"charge": charge["id"], "amount": 100})
    seen = upstream.requests(method="POST", path="/v1/refunds")
    assert [(r["status"], r["fault"], r["handled"]) for r in seen] == [
        (503, 503, False),
        (200, None, True),
    ]
    assert seen[0]["idempotency_key"] == seen[1]["idempotency_key"] is not None
    assert upstream.count("POST", "/v1/refunds") == 1
    assert upstream.count("POST", "/v1/refunds", "faulted") == 1
    assert [r["id"] for r in upstream.refunds(charge["id"])] == [refund.id]
    assert upstream.faults() == []  # used up


def test_fault_error_shape_and_should_retry(
    upstream: Upstream, client: stripe.StripeClient, fake_stripe: str, http: stripe.HTTPClient
) -> None:
    upstream.fault("/v1/charges", method="GET", fail=[503], should_retry=False)
    retrying = make_client(fake_stripe, http, max_network_retries=3)
    with pytest.raises(stripe.APIError) as err:
        retrying.v1.charges.list()
    assert err.value.http_status == 503
    assert err.value.headers is not None
    assert err.value.headers["Stripe-Should-Retry"] == "false"
    assert err.value.error is not None and err.value.error.type == "api_error"
    assert upstream.count("GET", "/v1/charges", "received") == 1  # not retried

    upstream.fault("/v1/charges", fail=[429, 402])
    with pytest.raises(stripe.RateLimitError):
        client.v1.charges.list()
    with pytest.raises(stripe.CardError):
        client.v1.charges.list()
    client.v1.charges.list()  # rule used up


def test_dropped_after_handling_then_retry_is_replayed(
    upstream: Upstream, fake_stripe: str, http: stripe.HTTPClient
) -> None:
    charge = upstream.create_charge()
    upstream.fault("/v1/refunds", method="POST", fail=["drop_after"])
    retrying = make_client(fake_stripe, http, max_network_retries=1)
    refund = retrying.v1.refunds.create({"charge": charge["id"], "amount": 100})
    first, second = upstream.requests(method="POST", path="/v1/refunds")
    assert (first["fault"], first["handled"], first["status"]) == ("drop_after", True, 200)
    assert second["replayed"] is True
    assert [r["id"] for r in upstream.refunds(charge["id"])] == [refund.id]


def test_dropped_before_handling(upstream: Upstream, client: stripe.StripeClient) -> None:
    charge = upstream.create_charge()
    upstream.fault("/v1/refunds", fail=["drop"])
    with pytest.raises(stripe.APIConnectionError):
        client.v1.refunds.create({"charge": charge["id"], "amount": 100})
    [seen] = upstream.requests(method="POST", path="/v1/refunds")
    assert (seen["fault"], seen["handled"], seen["status"]) == ("drop", False, None)
    assert upstream.refunds(charge["id"]) == []


def test_delay_and_client_timeout(
    upstream: Upstream, fake_stripe: str, client: stripe.StripeClient
) -> None:
    charge = upstream.create_charge()
    upstream.fault("/v1/refunds", method="POST", delay=1.0)
    started = time.monotonic()
    client.v1.refunds.create({"charge": charge["id"], "amount": 100})
    assert time.monotonic() - started >= 1.0

    # a client that gives up early: the slow request still takes effect upstream
    upstream.fault("/v1/refunds", method="POST", delay=1.0)
    impatient = stripe.RequestsClient(timeout=0.3)
    try:
        with pytest.raises(stripe.APIConnectionError):
            make_client(fake_stripe, impatient, max_network_retries=0).v1.refunds.create(
                {"charge": charge["id"], "amount": 200}
            )
    finally:
        impatient.close()  # type: ignore[no-untyped-call]
    upstream.wait_for_requests(2, method="POST", path="/v1/refunds", timeout=5)
    assert sorted(r["amount"] for r in upstream.refunds(charge["id"])) == [100, 200]


async def test_wait_for_requests_async(upstream: Upstream) -> None:
    with pytest.raises(TimeoutError):
        await upstream.wait_for_requests_async(1, path="/v1/refunds", timeout=0.2)


def test_requests_are_recorded(upstream: Upstream, client: stripe.StripeClient) -> None:
    charge = upstream.create_charge()
    client.v1.refunds.create(
        {"charge": charge["id"], "amount": 250, "metadata": {"ticket": "T-1"}},
        {"idempotency_key": "idem-record-1"},
    )
    client.v1.refunds.list({"charge": charge["id"], "limit": 3})
    post, get = upstream.requests()
    assert post["method"] == "POST" and post["path"] == "/v1/refunds"
    assert post["params"] == {
        "charge": charge["id"],
        "amount": "250",
        "metadata": {"ticket": "T-1"},
    }
    assert "metadata[ticket]=T-1" in post["body"]
    assert post["idempotency_key"] == "idem-record-1"
    assert post["api_key_last4"] == "6789"
    assert post["api_key"] == "sk_test_…6789"
    assert not any(k.lower() == "authorization" for k in post["headers"])
    assert TEST_STRIPE_KEY not in json.dumps(post)
    assert post["status"] == 200 and post["handled"] is True
    assert isinstance(post["time"], float) and post["duration"] >= 0
    assert get["method"] == "GET" and get["query"] == {"charge": charge["id"], "limit": "3"}
    assert get["idempotency_key"] is None
    assert upstream.counts()["POST /v1/refunds"] == {
        "received": 1,
        "faulted": 0,
        "replayed": 0,
        "handled": 1,
    }
    upstream.clear_requests()
    assert upstream.requests(include_setup=True) == []


def test_auth_and_unknown_urls_are_stripe_shaped(
    upstream: Upstream, fake_stripe: str, client: stripe.StripeClient, http: stripe.HTTPClient
) -> None:
    anonymous = stripe.StripeClient(
        "pk_test_nope", base_addresses={"api": fake_stripe}, http_client=http
    )
    with pytest.raises(stripe.AuthenticationError):
        anonymous.v1.charges.list()
    with pytest.raises(stripe.InvalidRequestError) as err:
        client.raw_request("get", "/v1/no_such_thing")
    assert err.value.http_status == 404


# ---------------------------------------------------------------------------
# Disputes
# ---------------------------------------------------------------------------


def test_dispute_create_retrieve_close(upstream: Upstream, client: stripe.StripeClient) -> None:
    intent = upstream.create_payment_intent(amount=3000)
    created = upstream.create_dispute(intent["latest_charge"])
    assert created["status"] == "needs_response"
    assert (created["amount"], created["payment_intent"]) == (3000, intent["id"])

    dispute = client.v1.disputes.retrieve(created["id"])
    assert (dispute.object, dispute.charge, dispute.reason) == (
        "dispute",
        intent["latest_charge"],
        "fraudulent",
    )
    listed = client.v1.disputes.list({"charge": intent["latest_charge"]})
    assert [d.id for d in listed.data] == [created["id"]]
    updated = client.v1.disputes.update(created["id"], {"metadata": {"case": "42"}})
    assert updated.metadata.to_dict() == {"case": "42"}

    closed = client.v1.disputes.close(created["id"])
    assert closed.status == "lost"
    assert upstream.dispute(created["id"])["status"] == "lost"
    with pytest.raises(stripe.InvalidRequestError):
        client.v1.disputes.close(created["id"])
    with pytest.raises(stripe.InvalidRequestError) as err:
        client.v1.disputes.retrieve("dp_missing")
    assert err.value.http_status == 404


# ---------------------------------------------------------------------------
# Process lifecycle
# ---------------------------------------------------------------------------


@pytest.mark.slow
def test_fake_stripe_process_starts_and_stops() -> None:
    with FakeStripeProcess() as fake:
        pid = fake.pid
        assert pid is not None
        with urllib.request.urlopen(fake.url + "/_test/health", timeout=5) as resp:
            assert json.loads(resp.read())["pid"] == pid
        assert fake.url.startswith("http://127.0.0.1:")
    assert fake.process is None
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


# ---------------------------------------------------------------------------
# SMTP sink
# ---------------------------------------------------------------------------


def _mail(subject: str) -> EmailMessage:
    msg = EmailMessage()
    msg["From"] = "cosigner@localhost"
    msg["To"] = "billing@example.com"
    msg["Subject"] = subject
    msg.set_content("Refund $49.99 USD of charge ch_123")
    msg.add_alternative("<p>Refund <b>$49.99</b> USD</p>", subtype="html")
    return msg


async def test_smtp_sink_plain(smtp: SmtpSink) -> None:
    assert smtp.port is not None
    await aiosmtplib.send(_mail("plain"), hostname=smtp.host, port=smtp.port, timeout=5)
    [msg] = await smtp.wait_for_async(1, timeout=5)
    assert msg["Subject"] == "plain"
    assert msg.get_body(("plain",)) is not None
    body = msg.get_body(("html",))
    assert body is not None and "<b>$49.99</b>" in body.get_content()
    [received] = smtp.received
    assert received.rcpt_tos == ["billing@example.com"]
    assert (received.auth_login, received.tls) == (None, False)
    smtp.clear()
    assert smtp.messages == []
    with pytest.raises(TimeoutError):
        smtp.wait_for(1, timeout=0.1)


async def test_smtp_sink_auth() -> None:
    with SmtpSink(username="mailer", password="s3cret:/@") as sink:
        assert sink.port is not None
        assert sink.url == f"smtp://mailer:s3cret%3A%2F%40@127.0.0.1:{sink.port}"
        with pytest.raises(aiosmtplib.SMTPAuthenticationError):
            await aiosmtplib.send(
                _mail("bad"),
                hostname=sink.host,
                port=sink.port,
                username="mailer",
                password="wrong",
                timeout=5,
            )
        with pytest.raises(aiosmtplib.SMTPSenderRefused):
            await aiosmtplib.send(_mail("anon"), hostname=sink.host, port=sink.port, timeout=5)
        await aiosmtplib.send(
            _mail("auth"),
            hostname=sink.host,
            port=sink.port,
            username="mailer",
            password="s3cret:/@",
            timeout=5,
        )
        [msg] = await sink.wait_for_async(1, timeout=5)
        assert msg["Subject"] == "auth"
        assert sink.received[0].auth_login == "mailer"


async def test_smtp_sink_starttls() -> None:
    with SmtpSink(starttls=True, username="u", password="p") as sink:
        assert sink.port is not None and sink.cert_path is not None
        assert sink.url.endswith("?starttls=true")
        # STARTTLS is required: a client that will not upgrade is refused
        with pytest.raises(aiosmtplib.SMTPException):
            await aiosmtplib.send(
                _mail("cleartext"), hostname=sink.host, port=sink.port, start_tls=False, timeout=5
            )
        await aiosmtplib.send(
            _mail("tls"),
            hostname=sink.host,
            port=sink.port,
            start_tls=True,
            tls_context=sink.client_tls_context(),  # verifies the self-signed cert
            username="u",
            password="p",
            timeout=5,
        )
        await sink.wait_for_async(1, timeout=5)
        assert sink.received[0].tls is True
        assert sink.received[0].auth_login == "u"


async def test_smtp_sink_implicit_tls() -> None:
    with SmtpSink(implicit_tls=True) as sink:
        assert sink.port is not None and sink.cert_path is not None
        await aiosmtplib.send(
            _mail("smtps"),
            hostname=sink.host,
            port=sink.port,
            use_tls=True,
            cert_bundle=sink.cert_path,
            timeout=5,
        )
        [msg] = await sink.wait_for_async(1, timeout=5)
        assert msg["Subject"] == "smtps"
        assert sink.received[0].tls is True
