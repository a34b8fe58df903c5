"""No usable secret in the database file, the logs, the API answers or the pages.

A full run of a real ``cosigner serve`` process (DEBUG logging) with known
secrets: admin token, master secret, callback secret, SMTP password, the
gateway's Stripe key, a per-agent Stripe key, a raw agent key, two gateway
keys, a dashboard session cookie and the reviewers' magic links. Every flow
that touches them runs (allow, hold, approve, reject, cancel, a failed
forward, upstream errors, bad credentials, the CLI), then every byte the
gateway wrote or answered is searched for every secret, in clear, Basic-auth
and URL-encoded spellings.
"""

from __future__ import annotations

import base64
import json
import os
import re
import time
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from gateway.crypto import constant_time_equal
from tests.support.gateway import GatewayProcess, run_cosigner
from tests.support.peers import SmtpSink, Upstream, free_port
from tests.support.rawhttp import RecordingServer

pytestmark = pytest.mark.slow

RULES = Path(__file__).parent / "data" / "rules_keys"
ADMIN = "admin-token-SECRET-7f3a9c2e1b5d"
MASTER = "master-secret-SECRET-0c1d2e3f4a5b6c7d"
CALLBACK = "callback-secret-SECRET-9e8d7c6b5a"
SMTP_PASSWORD = "smtp-pass-SECRET-4455aa"
GATEWAY_STRIPE = "sk_test_gatewaySECRET00000000000002222"
PER_AGENT = "sk_test_peragentSECRET0000000000003333"
RAW = "sk_test_rawagentSECRET0000000000001111"


def spellings(secret: str) -> set[bytes]:
    """The ways a secret could leak: as is, URL-encoded, inside Basic auth."""
    return {
        secret.encode(),
        urllib.parse.quote(secret, safe="").encode(),
        base64.b64encode(f"{secret}:".encode()),
        base64.b64encode(secret.encode()),
    }


class Evidence:
    """Every byte the gateway wrote or answered, by where it came from."""

    def __init__(self) -> None:
        self.blobs: dict[str, bytes] = {}

    def add(self, where: str, data: bytes | str) -> None:
        data = data.encode() if isinstance(data, str) else data
        self.blobs[where] = self.blobs.get(where, b"") + data + b"\n"

    def answer(self, where: str, resp: requests.Response) -> requests.Response:
        head = "".join(f"{k}: {v}\n" for k, v in resp.headers.items())
        self.add(where, f"{resp.status_code}\n{head}\n".encode() + resp.content)
        return resp

    def leaks(self, secret: str, *, skip: tuple[str, ...] = ()) -> list[str]:
        found = []
        for where, blob in self.blobs.items():
            if where.startswith(skip):
                continue
            if any(spelled in blob for spelled in spellings(secret)):
                found.append(where)
        return found


def keys_cli(env: dict[str, str], cwd: Path, *args: str, stdin: str = "") -> Any:
    settings = {k: v for k, v in env.items() if k.startswith("COSIGNER_")}
    return run_cosigner("keys", *args, cwd=cwd, settings=settings, stdin=stdin, check=True)


@pytest.fixture
def smtp_auth() -> Iterator[SmtpSink]:
    with SmtpSink(username="mailer", password=SMTP_PASSWORD) as sink:
        yield sink


def test_no_secret_is_written_logged_answered_or_shown(
    tmp_path: Path, fake_stripe: str, upstream: Upstream, smtp_auth: SmtpSink
) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("COSIGNER_")}
    env.update(
        COSIGNER_LISTEN=f"127.0.0.1:{port}",
        COSIGNER_PUBLIC_URL=url,
        COSIGNER_UPSTREAM=fake_stripe,
        COSIGNER_DATABASE=f"sqlite:///{tmp_path / 'cosigner.db'}",
        COSIGNER_RULES=str(RULES),
        COSIGNER_SECRET_KEY=MASTER,
        COSIGNER_ADMIN_TOKEN=ADMIN,
        COSIGNER_CALLBACK_SECRET=CALLBACK,
        COSIGNER_STRIPE_KEY=GATEWAY_STRIPE,
        COSIGNER_SMTP_URL=f"smtp://mailer:{SMTP_PASSWORD}@127.0.0.1:{smtp_auth.port}",
        COSIGNER_REVIEWERS="ops@example.com",
        COSIGNER_LOG_LEVEL="DEBUG",
        COSIGNER_WORKER_INTERVAL="0.2",
        COSIGNER_FORWARD_ATTEMPTS="2",
        COSIGNER_RULES_WATCH="0",
    )
    ev = Evidence()

    # -- keys, through the CLI (the key itself is printed once, by design) ----------------
    bot = keys_cli(env, tmp_path, "create", "billing-bot")
    own = keys_cli(env, tmp_path, "create", "own-bot", "--stripe-key", "-", stdin=PER_AGENT)
    for done in (bot, own):
        ev.add("cli create stderr", done.stderr)
    bot_key, own_key = bot.stdout.strip(), own.stdout.strip()
    ev.add("cli list", keys_cli(env, tmp_path, "list").stdout)
    ev.add("cli list --json", keys_cli(env, tmp_path, "list", "--json").stdout)

    def call(who: str, method: str, path: str, key: str | None, **kw: Any) -> requests.Response:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        headers.update(kw.pop("headers", {}))
        resp = requests.request(method, url + path, headers=headers, timeout=30, **kw)
        return ev.answer(f"answer {who} {method} {path}", resp)

    def admin(method: str, path: str, **kw: Any) -> requests.Response:
        return call("admin", method, path, ADMIN, **kw)

    def wait_for(action_id: str, statuses: set[str]) -> dict[str, Any]:
        deadline = time.monotonic() + 30
        while True:
            action: dict[str, Any] = admin("GET", f"/cosigner/v1/actions/{action_id}").json()
            if action["status"] in statuses:
                return action
            assert time.monotonic() < deadline, action
            time.sleep(0.2)

    with RecordingServer() as receiver, GatewayProcess(env, tmp_path) as gw:
        assert gw.url == url
        charge = upstream.create_charge(amount=9000)["id"]

        # A raw Stripe key: a read, then a hold approved by the admin with a callback.
        assert call("raw", "GET", f"/v1/charges/{charge}", RAW).status_code == 200
        held = call(
            "raw",
            "POST",
            "/v1/refunds",
            RAW,
            data={"charge": charge, "amount": "2500"},
            headers={"Cosigner-Callback": f"http://{receiver.authority}/hook"},
        )
        assert held.status_code == 202, held.text
        raw_action = held.json()["id"]
        assert admin(
            "POST", f"/cosigner/v1/actions/{raw_action}/approve", json={"reviewer": "ops@x.com"}
        ).ok
        assert wait_for(raw_action, {"completed"})["response_code"] == 200

        # A gateway key: allowed, then held and rejected.
        assert call(
            "bot", "POST", "/v1/refunds", bot_key, data={"charge": charge, "amount": "500"}
        ).ok
        held = call(
            "bot", "POST", "/v1/refunds", bot_key, data={"charge": charge, "amount": "2000"}
        )
        bot_action = held.json()["id"]
        assert call("bot", "GET", f"/cosigner/v1/actions/{bot_action}", bot_key).ok
        smtp_auth.wait_for(1, timeout=30)  # its reviewer's email (the others may be moot)

        # A per-agent Stripe key: held and cancelled by the agent.
        assert call("own", "GET", "/v1/balance", own_key).ok
        held = call("own", "POST", "/v1/refunds", own_key, data={"charge": charge, "amount": "900"})
        own_action = held.json()["id"]
        assert call("own", "POST", f"/cosigner/v1/actions/{own_action}/cancel", own_key).ok

        # The reviewers' emails and magic links; the review page.
        links: list[str] = []
        for n, message in enumerate(smtp_auth.messages):
            ev.add(f"email {n}", message.as_bytes())
            plain = message.get_body(("plain",))
            assert plain is not None
            text = plain.get_content()  # type: ignore[attr-defined]
            ev.add(f"email {n} text", text)
            links += re.findall(rf"{re.escape(url)}/review/([A-Za-z0-9_.~-]+)", text)
        assert links
        review_tokens = set(links)
        for token in review_tokens:
            # The page holds its own link (its form posts there): searched below apart.
            page = call("review page", "GET", f"/review/{token}", None)
            assert page.status_code in (200, 403, 409)

        # The dashboard: sign in with the form, look at the list and each receipt.
        browser = requests.Session()
        form = browser.get(url + "/dashboard/login", timeout=30)
        csrf = re.search(r'name="csrf" value="([^"]+)"', form.text)
        assert csrf, form.text
        signed_in = browser.post(
            url + "/dashboard/login",
            data={"token": ADMIN, "csrf": csrf.group(1), "reviewer": "ops@x.com"},
            allow_redirects=False,
            timeout=30,
        )
        assert signed_in.status_code == 303, signed_in.text
        cookies = [c.value for c in browser.cookies if c.name == "cosigner_session"]
        assert cookies
        for path in [
            "/dashboard/actions",
            *(f"/dashboard/actions/{a}" for a in (raw_action, bot_action, own_action)),
        ]:
            page = browser.get(url + path, timeout=30)
            assert page.status_code == 200 and "Sign in" not in page.text[:2000]
            ev.answer(f"page {path}", page)
        csrf = re.search(r'name="csrf" value="([^"]+)"', page.text)
        assert csrf
        rejected = browser.post(
            url + f"/dashboard/actions/{bot_action}/decide",
            data={"decision": "reject", "csrf": csrf.group(1), "reviewer": "ops@x.com"},
            allow_redirects=False,
            timeout=30,
        )
        ev.answer("page reject", rejected)
        if wait_for(bot_action, {"awaiting_approval", "rejected"})["status"] != "rejected":
            admin("POST", f"/cosigner/v1/actions/{bot_action}/reject", json={"reviewer": "o@x.com"})
        wait_for(bot_action, {"rejected"})

        # Failures: a forward Stripe keeps refusing, a dropped connection, bad credentials.
        held = call("raw", "POST", "/v1/refunds", RAW, data={"charge": charge, "amount": "1500"})
        failing = held.json()["id"]
        upstream.fault("/v1/refunds", method="POST", fail=[503, 503])
        admin("POST", f"/cosigner/v1/actions/{failing}/approve", json={"reviewer": "ops@x.com"})
        assert wait_for(failing, {"failed", "completed"})["status"] == "failed"
        upstream.fault("/v1/balance", method="GET", fail=["drop", "drop"])
        assert call("raw", "GET", "/v1/balance", RAW).status_code == 502
        assert call("bad", "GET", "/v1/balance", bot_key[:-2] + "xx").status_code == 401
        assert call("bad", "GET", "/cosigner/v1/actions", ADMIN[:-1] + "!").status_code == 401
        assert call("bad", "GET", "/v1/balance", None, auth=(RAW + "x", "")).status_code == 200
        browser.post(url + "/dashboard/login", data={"token": ADMIN + "x"}, timeout=30)
        for resp in (
            admin("GET", "/cosigner/v1/actions?limit=100"),
            call("ops", "GET", "/metrics", None),
        ):
            assert resp.status_code == 200

        # Wait for the callback, then collect the database while the gateway runs (WAL).
        deadline = time.monotonic() + 30
        while not receiver.requests:
            assert time.monotonic() < deadline, "no callback"
            time.sleep(0.1)
        for method, path, headers in receiver.requests:
            ev.add("callback", f"{method} {path}\n{json.dumps(headers)}")
        for db in tmp_path.glob("cosigner.db*"):
            ev.add(f"database {db.name} (running)", db.read_bytes())
    ev.add("log", gw.log.read_bytes())
    for db in tmp_path.glob("cosigner.db*"):
        ev.add(f"database {db.name} (stopped)", db.read_bytes())

    # The upstream saw the right keys, never a gateway key.
    seen = {r["api_key"] for r in upstream.requests()}
    assert seen == {"sk_test_…1111", "sk_test_…111x", "sk_test_…2222", "sk_test_…3333"}, seen

    assert "log" in ev.blobs and len(ev.blobs["log"]) > 1000  # DEBUG logging really ran
    secrets = {
        "admin token": ADMIN,
        "master secret": MASTER,
        "callback secret": CALLBACK,
        "SMTP password": SMTP_PASSWORD,
        "COSIGNER_STRIPE_KEY": GATEWAY_STRIPE,
        "per-agent Stripe key": PER_AGENT,
        "raw agent key": RAW,
        "gateway key": bot_key,
        "gateway key (own)": own_key,
        **{f"session cookie {n}": c for n, c in enumerate(cookies)},
    }
    leaks = {name: ev.leaks(secret) for name, secret in secrets.items()}
    # Magic links travel by email and each page shows its own; nowhere else.
    for token in review_tokens:
        leaks[f"review link {token[:8]}…"] = ev.leaks(token, skip=("email", "answer review page"))
    assert {name: where for name, where in leaks.items() if where} == {}


@pytest.mark.parametrize(
    ("a", "b", "equal"),
    [
        ("token", "token", True),
        ("token", "tokem", False),
        ("token", "token-and-more", False),
        ("", "token", False),
        ("caf\u00e9", "caf\u00e9", True),
        ("x" * 10_000, "x" * 10_000, True),
    ],
)
def test_secrets_are_compared_whatever_their_lengths(a: str, b: str, equal: bool) -> None:
    assert constant_time_equal(a, b) is equal
    assert constant_time_equal(b, a) is equal
