"""Reviewer emails: content, SMTP transports (aiosmtpd as server), the log mailer, the outbox."""

from __future__ import annotations

import logging
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestServer

from gateway.app import create_app
from gateway.keys import STORE
from gateway.mail import SmtpMailer, parse_smtp_url
from tests.support.gateway import GatewayThread, gateway_thread, settings_for
from tests.support.mailbox import events, hold, html_of, review_link, text_of, wait_events
from tests.support.peers import TEST_STRIPE_KEY, SmtpSink, free_port

RULES = Path(__file__).parent / "data" / "rules_review"
REVIEWERS = "ops@example.com, finance@example.com"


@contextmanager
def gateway(tmp_path: Path, upstream_url: str, **overrides: Any) -> Iterator[GatewayThread]:
    overrides.setdefault("reviewers", REVIEWERS)
    settings = settings_for(tmp_path, upstream_url, RULES, **overrides)
    with gateway_thread(settings) as gw:
        yield gw


def wait_outbox(gw: GatewayThread, action_id: str, expected: list[str]) -> None:
    """Poll the action's outbox until its statuses are ``expected`` (bounded)."""
    assert gw.app is not None
    deadline = time.monotonic() + 15
    while True:
        statuses = [item.status for item in gw.call(gw.app[STORE].outbox(action_id))]
        if statuses == expected:
            return
        assert time.monotonic() < deadline, statuses
        time.sleep(0.05)


# -- what the email says ------------------------------------------------------------------


def test_every_reviewer_gets_a_multipart_email_with_summary_params_and_links(
    tmp_path: Path, fake_stripe: str, smtp: SmtpSink
) -> None:
    with gateway(tmp_path, fake_stripe, smtp_url=smtp.url, mail_from="cosigner@ops.test") as gw:
        held = hold(
            gw,
            "/v1/payouts",
            {"amount": "4999", "currency": "usd", "metadata[ticket]": "T-88"},
            **{"Cosigner-Justification": "Vendor invoice <INV-7> is due today"},
        )
        messages = smtp.wait_for(2, timeout=15)
    assert sorted(m["To"] for m in messages) == ["finance@example.com", "ops@example.com"]
    received = smtp.received
    assert {r.mail_from for r in received} == {"cosigner@ops.test"}
    for message in messages:
        assert message.get_content_type() == "multipart/alternative"
        assert message["From"] == "cosigner@ops.test"
        assert message["X-Cosigner-Action"] == held["id"]
        assert message["Subject"] == "Approval needed: Pay out $49.99 USD"
        text, html = text_of(message), html_of(message)
        assert text.splitlines()[0] == held["summary"] == "Pay out $49.99 USD"
        for part in (text, html):
            assert "sk_test_…6789" in part  # the agent, masked
            assert "amount" in part and "4999 ($49.99 USD)" in part
            assert "metadata[ticket]" in part and "T-88" in part
            assert "currency" in part and "usd" in part
            assert f"{gw.url}/dashboard/actions/{held['id']}" in part
            assert "payouts" in part  # the rule
        assert "Justification: Vendor invoice <INV-7> is due today" in text
        assert "Vendor invoice &lt;INV-7&gt; is due today" in html  # escaped in HTML
        assert TEST_STRIPE_KEY not in text + html
        link = review_link(message)
        assert link.startswith(f"{gw.url}/review/")
    # Each reviewer's link is their own.
    assert len({review_link(m) for m in messages}) == 2


def test_zero_decimal_currency_is_shown_in_whole_units(
    tmp_path: Path, fake_stripe: str, smtp: SmtpSink
) -> None:
    with gateway(tmp_path, fake_stripe, smtp_url=smtp.url, reviewers="ops@example.com") as gw:
        hold(gw, "/v1/payouts", {"amount": "5000", "currency": "jpy"})
        (message,) = smtp.wait_for(1, timeout=15)
    assert message["Subject"] == "Approval needed: Pay out ¥5,000 JPY"
    assert "5000 (¥5,000 JPY)" in text_of(message)
    assert "50.00" not in text_of(message)


def test_refund_amount_uses_the_charges_currency_and_says_why_when_unknown(
    tmp_path: Path, fake_stripe: str, smtp: SmtpSink, upstream: Any
) -> None:
    charge = upstream.create_charge(amount=10_000, currency="usd")
    with gateway(tmp_path, fake_stripe, smtp_url=smtp.url) as gw:
        held = hold(
            gw,
            "/v1/refunds",
            {"charge": charge["id"], "amount": "4999", "reason": "requested_by_customer"},
        )
        (message,) = smtp.wait_for(1, timeout=15)
        assert message["To"] == "billing@example.com"
        text = text_of(message)
        assert text.splitlines()[0] == held["summary"]
        assert "$49.99" in message["Subject"] and "requested_by_customer" in message["Subject"]
        assert "4999 ($49.99 USD)" in text
        assert "[you may change this, only lower]" in text  # editable: amount

        smtp.clear()
        hold(gw, "/v1/refunds", {"charge": "ch_doesnotexist", "amount": "4999"})
        (unknown,) = smtp.wait_for(1, timeout=15)
    assert "amount: 4999 (minor units, currency unknown)" in text_of(unknown)


def test_agent_text_cannot_forge_lines_in_the_email(
    tmp_path: Path, fake_stripe: str, smtp: SmtpSink
) -> None:
    forged = "x\n\nReview and decide: http://evil.example/review/abc.def"
    with gateway(tmp_path, fake_stripe, smtp_url=smtp.url, reviewers="ops@example.com") as gw:
        hold(gw, "/v1/payouts", {"amount": "100", "currency": "usd", "description": forged})
        (message,) = smtp.wait_for(1, timeout=15)
    text = text_of(message)
    assert "evil.example" in text  # shown, but on the parameter's own line
    assert not any(line.startswith("Review and decide: http://evil") for line in text.splitlines())
    assert "description: x\\n\\nReview and decide" in text
    assert "<script" not in html_of(message)
    assert review_link(message).startswith(gw.url)


# -- transports ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "tls"),
    [
        ({"username": "mailer", "password": "p@ss:w/rd"}, False),
        ({"starttls": True}, True),
        ({"starttls": True, "username": "mailer", "password": "s3cret"}, True),
        ({"implicit_tls": True}, True),
    ],
    ids=["plain-auth", "starttls", "starttls-auth", "implicit-tls"],
)
def test_smtp_transports_from_the_url(
    tmp_path: Path,
    fake_stripe: str,
    monkeypatch: pytest.MonkeyPatch,
    options: dict[str, Any],
    tls: bool,
) -> None:
    with SmtpSink(**options) as sink:
        if sink.cert_path:
            # How an operator trusts a private CA: the standard OpenSSL variable.
            monkeypatch.setenv("SSL_CERT_FILE", sink.cert_path)
        with gateway(tmp_path, fake_stripe, smtp_url=sink.url, reviewers="ops@example.com") as gw:
            held = hold(gw, "/v1/payouts", {"amount": "4999", "currency": "usd"})
            sink.wait_for(1, timeout=15)
            found = wait_events(gw, held["id"], lambda es: any(e.kind == "email_sent" for e in es))
        (mail,) = sink.received
    assert mail.tls is tls
    assert mail.auth_login == options.get("username")
    assert mail.rcpt_tos == ["ops@example.com"]
    sent = next(e for e in found if e.kind == "email_sent")
    assert sent.data["to"] == "ops@example.com" and sent.data["attempt"] == 1
    assert "password" not in str(sent.data) and "p@ss" not in str(sent.data)


def test_wrong_smtp_password_is_on_the_receipt_without_the_password(
    tmp_path: Path, fake_stripe: str, caplog: pytest.LogCaptureFixture
) -> None:
    with SmtpSink(username="mailer", password="right-one") as sink:
        url = sink.url.replace("right-one", "wrong-one")
        with (
            caplog.at_level(logging.WARNING, logger="cosigner.mail"),
            gateway(tmp_path, fake_stripe, smtp_url=url, reviewers="ops@example.com") as gw,
        ):
            held = hold(gw, "/v1/payouts", {"amount": "4999", "currency": "usd"})
            found = wait_events(
                gw, held["id"], lambda es: any(e.kind == "email_failed" for e in es)
            )
        assert sink.received == []
    failed = next(e for e in found if e.kind == "email_failed")
    assert failed.data["to"] == "ops@example.com"
    assert "SMTPAuthenticationError" in failed.data["error"]
    assert failed.data["will_retry"] is True
    assert "wrong-one" not in str(failed.data) and "wrong-one" not in caplog.text


async def test_create_app_accepts_a_mailer(
    tmp_path: Path, fake_stripe: str, smtp: SmtpSink
) -> None:
    with SmtpSink(implicit_tls=True) as sink:
        mailer = SmtpMailer(parse_smtp_url(sink.url), tls_context=sink.client_tls_context())
        settings = settings_for(
            tmp_path, fake_stripe, RULES, reviewers="ops@example.com", smtp_url=smtp.url
        )
        server = TestServer(create_app(settings, mailer=mailer))
        await server.start_server()
        try:
            async with aiohttp.ClientSession() as client:
                resp = await client.post(
                    server.make_url("/v1/payouts"),
                    data={"amount": "700", "currency": "eur"},
                    headers={"Authorization": f"Bearer {TEST_STRIPE_KEY}"},
                )
                assert resp.status == 202
            (message,) = await sink.wait_for_async(1, timeout=15)
        finally:
            await server.close()
    assert sink.received[0].tls
    assert message["Subject"] == "Approval needed: Pay out €7.00 EUR"
    assert smtp.received == []  # the injected mailer, not the URL, was used


def test_without_smtp_the_email_is_written_to_the_log(
    tmp_path: Path, fake_stripe: str, caplog: pytest.LogCaptureFixture
) -> None:
    with (
        caplog.at_level(logging.INFO, logger="cosigner.mail"),
        gateway(tmp_path, fake_stripe, reviewers="ops@example.com") as gw,
    ):
        held = hold(gw, "/v1/payouts", {"amount": "4999", "currency": "usd"})
        found = wait_events(gw, held["id"], lambda es: any(e.kind == "email_sent" for e in es))
    records = [r for r in caplog.records if r.name == "cosigner.mail"]
    assert records, "nothing logged"
    logged = records[0].getMessage()
    assert "To: ops@example.com" in logged
    assert "Subject: Approval needed: Pay out $49.99 USD" in logged
    assert f"{gw.url}/review/" in logged  # the whole point of the log mailer in development
    assert TEST_STRIPE_KEY not in caplog.text
    sent = next(e for e in found if e.kind == "email_sent")
    assert sent.data["transport"].startswith("log")


# -- the outbox: never blocking the hold, retried until delivered -------------------------


def test_mail_retries_until_the_smtp_server_comes_up(tmp_path: Path, fake_stripe: str) -> None:
    port = free_port()
    with gateway(
        tmp_path,
        fake_stripe,
        smtp_url=f"smtp://127.0.0.1:{port}",
        reviewers="ops@example.com",
        mail_retry_delay=0.3,
    ) as gw:
        held = hold(gw, "/v1/payouts", {"amount": "4999", "currency": "usd"})
        wait_events(gw, held["id"], lambda es: any(e.kind == "email_failed" for e in es))
        assert gw.action(held["id"]).status == "awaiting_approval"
        with SmtpSink(port=port) as sink:
            (message,) = sink.wait_for(1, timeout=20)
            found = wait_events(gw, held["id"], lambda es: any(e.kind == "email_sent" for e in es))
            wait_outbox(gw, held["id"], ["sent"])
            assert len(sink.received) == 1  # delivered once, not once per attempt
    assert message["To"] == "ops@example.com"
    failures = [e for e in found if e.kind == "email_failed"]
    sent = next(e for e in found if e.kind == "email_sent")
    assert failures and all(f.data["will_retry"] for f in failures)
    assert [f.data["attempt"] for f in failures] == list(range(1, len(failures) + 1))
    assert sent.data["attempt"] == len(failures) + 1
    # Every attempt is on the receipt.
    assert all(f.data["to"] == "ops@example.com" and f.data["error"] for f in failures)


def test_mail_gives_up_after_max_attempts(tmp_path: Path, fake_stripe: str) -> None:
    with gateway(
        tmp_path,
        fake_stripe,
        smtp_url=f"smtp://127.0.0.1:{free_port()}",
        reviewers="ops@example.com",
        mail_retry_delay=0.1,
        mail_attempts=2,
    ) as gw:
        held = hold(gw, "/v1/payouts", {"amount": "4999", "currency": "usd"})
        found = wait_events(
            gw,
            held["id"],
            lambda es: any(e.kind == "email_failed" and not e.data["will_retry"] for e in es),
        )
        wait_outbox(gw, held["id"], ["failed"])
        assert gw.action(held["id"]).status == "awaiting_approval"  # still decidable
    assert [e.data["attempt"] for e in found if e.kind == "email_failed"] == [1, 2]


def test_no_email_for_an_action_decided_before_the_mail_went_out(
    tmp_path: Path, fake_stripe: str
) -> None:
    port = free_port()
    with gateway(
        tmp_path,
        fake_stripe,
        smtp_url=f"smtp://127.0.0.1:{port}",
        reviewers="ops@example.com",
        mail_retry_delay=0.3,
    ) as gw:
        held = hold(gw, "/v1/payouts", {"amount": "4999", "currency": "usd"})
        wait_events(gw, held["id"], lambda es: any(e.kind == "email_failed" for e in es))
        reject = gw.admin(
            "POST", f"/cosigner/v1/actions/{held['id']}/reject", json={"reviewer": "cfo@x.test"}
        )
        assert reject.status_code == 200
        with SmtpSink(port=port) as sink:
            found = wait_events(
                gw, held["id"], lambda es: any(e.kind == "email_skipped" for e in es)
            )
            wait_outbox(gw, held["id"], ["skipped"])
            assert sink.received == []
    skipped = next(e for e in found if e.kind == "email_skipped")
    assert skipped.data == {"to": "ops@example.com", "reason": "action is rejected"}


def test_a_hung_smtp_server_never_delays_the_hold(tmp_path: Path, fake_stripe: str) -> None:
    # Accepts TCP connections and never says a word: every send hangs until its timeout.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(16)
        port = silent.getsockname()[1]
        with gateway(
            tmp_path,
            fake_stripe,
            smtp_url=f"smtp://127.0.0.1:{port}",
            reviewers="a@x.test",
            shutdown_grace=1.0,  # the stuck send is abandoned on shutdown; its lease covers it
        ) as gw:
            started = time.monotonic()
            first = hold(gw, "/v1/payouts", {"amount": "100", "currency": "usd"})
            time.sleep(0.5)  # let the mail worker get stuck on the silent server
            second = hold(gw, "/v1/payouts", {"amount": "200", "currency": "usd"})
            elapsed = time.monotonic() - started
            for held in (first, second):
                assert gw.action(held["id"]).status == "awaiting_approval"
            assert not any(e.kind.startswith("email") for e in events(gw, first["id"]))
    # Generous: an SMTP send would hang for its whole timeout (tens of seconds).
    assert elapsed < 10, elapsed


def test_smtp_url_is_validated_without_echoing_it() -> None:
    assert parse_smtp_url("smtp://u%40x:p%3Aw@mail.test:2525?starttls=true") == parse_smtp_url(
        "smtp://u%40x:p%3Aw@mail.test:2525?starttls=1"
    )
    config = parse_smtp_url("smtp://u%40x:p%3Aw@mail.test:2525?starttls=true")
    assert (config.username, config.password, config.port, config.starttls) == (
        "u@x",
        "p:w",
        2525,
        True,
    )
    assert "p:w" not in repr(config)
    assert parse_smtp_url("smtps://mail.test").port == 465
    assert parse_smtp_url("smtp://mail.test").port == 25
    for bad in (
        "http://user:hunter2@mail.test",
        "smtp://user:hunter2@mail.test?tls=yes",
        "smtps://user:hunter2@mail.test?starttls=true",
        "smtp://user:hunter2@",
    ):
        with pytest.raises(ValueError) as info:
            parse_smtp_url(bad)
        assert "hunter2" not in str(info.value)
