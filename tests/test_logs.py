"""One canonical log line per request, text or JSON, and never a secret in the log."""

from __future__ import annotations

import base64
import io
import json
import logging
import os
import re
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from gateway.logs import JsonFormatter, TextFormatter, configure_logging, loggable_path
from tests.support.gateway import ADMIN_TOKEN, SECRET_KEY, GatewayProcess, gateway_thread
from tests.support.gateway import settings_for as gateway_settings
from tests.support.peers import TEST_STRIPE_KEY, SmtpSink, free_port

ROOT = Path(__file__).resolve().parent.parent
RULES = Path(__file__).parent / "data" / "rules_core"
AUTH = {"Authorization": f"Bearer {TEST_STRIPE_KEY}"}
PAIR = re.compile(r'(\w+)=("(?:[^"\\]|\\.)*"|\S+)')
FIELDS = (
    "request_id",
    "agent",
    "method",
    "path",
    "rule",
    "decision",
    "action_id",
    "status",
    "upstream_status",
    "latency_ms",
)


def parse_text(line: str) -> dict[str, str]:
    """The key=value pairs of a text access line (quoted values decoded)."""
    _, _, pairs = line.partition(" cosigner.access request ")
    assert pairs, line
    return {k: json.loads(v) if v.startswith('"') else v for k, v in PAIR.findall(pairs)}


@pytest.fixture
def access_lines() -> Iterator[Callable[[], list[str]]]:
    """What the access logger writes, through the text formatter, while the test runs."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(TextFormatter())
    logger = logging.getLogger("cosigner.access")
    level = logger.level
    logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    try:
        yield lambda: stream.getvalue().splitlines()
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def test_one_text_line_per_request_with_what_decided_it(
    tmp_path: Path, fake_stripe: str, upstream: Any, access_lines: Callable[[], list[str]]
) -> None:
    charge = upstream.create_charge(amount=5000)
    with gateway_thread(gateway_settings(tmp_path, fake_stripe, RULES)) as gw:
        held = requests.post(
            gw.url + "/v1/refunds/",  # not canonical: the line shows the path rules saw
            data={"charge": charge["id"], "amount": "2500"},
            headers=AUTH,
            timeout=30,
        )
        read = requests.get(
            f"{gw.url}/v1/charges/{charge['id']}?expand[]=customer", headers=AUTH, timeout=30
        )
        review = requests.get(gw.url + "/review/not-a-real-token-but-secret-shaped", timeout=30)
        probe = requests.get(gw.url + "/healthz", timeout=30)
        unauthenticated = requests.delete(gw.url + "/v1/customers/cus_1", timeout=30)
    assert held.status_code == 202 and read.status_code == 200 and probe.status_code == 200

    lines = access_lines()
    by_id = {parse_text(line)["request_id"]: parse_text(line) for line in lines}
    # Exactly one line per request; the probe answered well is kept out of INFO.
    answered = [held, read, review, unauthenticated]
    assert len(lines) == len(answered)
    assert set(by_id) == {r.headers["Cosigner-Request-Id"] for r in answered}
    for fields in by_id.values():
        assert tuple(fields) == FIELDS

    hold = by_id[held.headers["Cosigner-Request-Id"]]
    assert hold["method"] == "POST" and hold["path"] == "/v1/refunds"
    assert hold["rule"] == "refunds" and hold["decision"] == "hold"
    assert hold["action_id"] == held.json()["id"] and hold["status"] == "202"
    assert hold["agent"] == "sk_test_…6789" and hold["upstream_status"] == "-"
    assert float(hold["latency_ms"]) > 0

    allow = by_id[read.headers["Cosigner-Request-Id"]]
    assert allow["path"] == f"/v1/charges/{charge['id']}"  # no query string
    assert allow["rule"] == "defaults.read" and allow["decision"] == "allow"
    assert allow["upstream_status"] == "200" and allow["action_id"] == "-"

    assert by_id[review.headers["Cosigner-Request-Id"]]["path"] == "/review/***"
    refused = by_id[unauthenticated.headers["Cosigner-Request-Id"]]
    assert refused["status"] == "401" and refused["decision"] == "-"
    assert not any("secret-shaped" in line or "expand" in line for line in lines)


def test_text_values_with_spaces_or_quotes_stay_one_parseable_line() -> None:
    record = logging.makeLogRecord(
        {
            "name": "cosigner.access",
            "levelno": logging.INFO,
            "levelname": "INFO",
            "msg": "request",
            "fields": {"agent": 'ops team "blue"', "path": "/v1/a\nb", "status": 200},
        }
    )
    line = TextFormatter().format(record)
    assert "\n" not in line
    assert parse_text(line) == {"agent": 'ops team "blue"', "path": "/v1/a\nb", "status": "200"}


def test_json_lines_carry_exceptions_and_extra_fields() -> None:
    try:
        raise ValueError("boom")
    except ValueError:
        record = logging.getLogger("cosigner.test").makeRecord(
            "cosigner.test",
            logging.ERROR,
            __file__,
            1,
            "failed %s",
            ("here",),
            exc_info=sys.exc_info(),
            extra={"action_id": "act_1"},
        )
    out = json.loads(JsonFormatter().format(record))
    assert out["level"] == "ERROR" and out["logger"] == "cosigner.test"
    assert out["message"] == "failed here" and out["action_id"] == "act_1"
    assert "ValueError: boom" in out["exception"]
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", out["ts"])


def test_review_tokens_are_masked_wherever_they_sit() -> None:
    assert loggable_path("/review/abc.def") == "/review/***"
    assert loggable_path("/review/abc.def/approve") == "/review/***/approve"
    assert loggable_path("/v1/refunds") == "/v1/refunds"


def test_debug_never_opens_libraries_that_log_what_they_carry() -> None:
    root = logging.getLogger()
    saved = (root.level, list(root.handlers))
    try:
        configure_logging("DEBUG", "json")
        assert logging.getLogger("cosigner").isEnabledFor(logging.DEBUG)
        for name in ("aiosqlite", "aiosmtplib", "asyncpg"):
            assert not logging.getLogger(name).isEnabledFor(logging.DEBUG)
    finally:
        for handler in list(root.handlers):
            root.removeHandler(handler)
        for handler in saved[1]:
            root.addHandler(handler)
        root.setLevel(saved[0])
        for name in ("aiosqlite", "aiosmtplib", "asyncpg"):
            logging.getLogger(name).setLevel(logging.NOTSET)


def test_a_whole_flow_logs_json_and_no_secret_at_debug(
    tmp_path: Path, fake_stripe: str, upstream: Any
) -> None:
    smtp_user, smtp_password = "mailer", "smtp-password-Zq81-never-logged"
    stripe_key = "sk_test_gatewaysownkey000000000000004242"
    charge = upstream.create_charge(amount=5000)
    env = {k: v for k, v in os.environ.items() if not k.startswith("COSIGNER_")}
    with SmtpSink(username=smtp_user, password=smtp_password) as sink:
        env.update(
            {
                "PYTHONPATH": str(ROOT),
                "COSIGNER_LISTEN": f"127.0.0.1:{free_port()}",
                "COSIGNER_UPSTREAM": fake_stripe,
                "COSIGNER_RULES": str(RULES),
                "COSIGNER_DATABASE": f"sqlite:///{tmp_path / 'gw.db'}",
                "COSIGNER_SECRET_KEY": SECRET_KEY,
                "COSIGNER_ADMIN_TOKEN": ADMIN_TOKEN,
                "COSIGNER_STRIPE_KEY": stripe_key,
                "COSIGNER_SMTP_URL": sink.url,
                "COSIGNER_LOG_FORMAT": "json",
                "COSIGNER_LOG_LEVEL": "DEBUG",
            }
        )
        admin = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
        with GatewayProcess(env, tmp_path) as gw:
            held = requests.post(
                gw.url + "/v1/refunds",
                data={"charge": charge["id"], "amount": "2500"},
                headers=AUTH,
                timeout=30,
            )
            assert held.status_code == 202, held.text
            action_id = held.json()["id"]
            (mail,) = sink.wait_for(1, timeout=15)
            text = mail.get_body(("plain",)).get_content()  # type: ignore[union-attr]
            match = re.search(r"/review/([A-Za-z0-9_.\-~]+)", text)
            assert match is not None, text
            review_token = match.group(1)
            page = requests.get(gw.url + "/review/" + review_token, timeout=30)
            assert page.status_code == 200
            url = f"{gw.url}/cosigner/v1/actions/{action_id}"
            approved = requests.post(
                url + "/approve", json={"reviewer": "a@b.c"}, headers=admin, timeout=30
            )
            assert approved.status_code == 200, approved.text
            deadline = time.monotonic() + 15
            while requests.get(url, headers=admin, timeout=10).json()["status"] != "completed":
                assert time.monotonic() < deadline, "the approved refund never completed"
                time.sleep(0.1)
            answered = [held, page, approved]
        log = gw.log.read_text()

    records = [json.loads(line) for line in log.splitlines() if line.strip()]
    assert any(r["level"] == "DEBUG" for r in records), "the test must run at DEBUG"
    secrets = {
        "admin token": ADMIN_TOKEN,
        "secret key": SECRET_KEY,
        "agent's Stripe key": TEST_STRIPE_KEY,
        "gateway's Stripe key": stripe_key,
        "SMTP password": smtp_password,
        "SMTP AUTH PLAIN": base64.b64encode(f"\0{smtp_user}\0{smtp_password}".encode()).decode(),
        "SMTP AUTH LOGIN": base64.b64encode(smtp_password.encode()).decode(),
        "review token": review_token,
    }
    for what, secret in secrets.items():
        assert secret not in log, f"the {what} is in the log"

    access = {r["request_id"]: r for r in records if r["logger"] == "cosigner.access"}
    for resp in answered:
        assert resp.headers["Cosigner-Request-Id"] in access
    ids = [r["request_id"] for r in records if r["logger"] == "cosigner.access"]
    assert len(ids) == len(set(ids)), "one line per request"
    hold = access[held.headers["Cosigner-Request-Id"]]
    assert {k: hold[k] for k in ("method", "path", "rule", "decision", "action_id")} == {
        "method": "POST",
        "path": "/v1/refunds",
        "rule": "refunds",
        "decision": "hold",
        "action_id": action_id,
    }
    assert hold["status"] == 202 and isinstance(hold["latency_ms"], float)
    assert access[page.headers["Cosigner-Request-Id"]]["path"] == "/review/***"
    assert access[approved.headers["Cosigner-Request-Id"]]["action_id"] == action_id
