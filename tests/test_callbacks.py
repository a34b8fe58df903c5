"""Signed callbacks: a real HTTP receiver verifies them; failures are retried and on the receipt."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import requests
from aiohttp import web

from gateway.callbacks import DEFAULT_DELAYS, callback_secret, callback_url_problem, sign, verify
from gateway.crypto import Keyring
from gateway.keys import STORE
from gateway.settings import Settings
from tests.support.gateway import GatewayThread, gateway_thread, settings_for
from tests.support.peers import TEST_STRIPE_KEY, free_port

RULES = Path(__file__).parent / "data" / "rules_core"
SECRET = "callback-secret-for-tests-0123456789"
FAST = (0.2, 0.2, 0.2)  # retry delays: four attempts in well under a second


# -- a real receiver --------------------------------------------------------------------------


@dataclass
class Received:
    headers: dict[str, str]
    body: bytes
    verified: bool


@dataclass
class Receiver:
    """An aiohttp server on 127.0.0.1 in its own thread, answering a scripted list of statuses."""

    statuses: list[int] = field(default_factory=list)
    received: list[Received] = field(default_factory=list)
    port: int = 0

    def __post_init__(self) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._runner: web.AppRunner | None = None
        self._lock = threading.Lock()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hooks/cosigner"

    async def _handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        ok = verify(body, request.headers.get("Cosigner-Signature"), SECRET)
        with self._lock:
            self.received.append(Received(dict(request.headers), body, ok))
            status = self.statuses.pop(0) if self.statuses else 200
        if 300 <= status < 400:
            raise web.HTTPTemporaryRedirect("http://127.0.0.1:9/elsewhere")
        return web.Response(status=status, text="ok" if status < 300 else "nope")

    def start(self) -> Receiver:
        self._thread.start()

        async def _start() -> None:
            app = web.Application()
            app.router.add_post("/hooks/cosigner", self._handle)
            self._runner = web.AppRunner(app, access_log=None)
            await self._runner.setup()
            self.port = free_port()
            await web.TCPSite(self._runner, "127.0.0.1", self.port).start()

        asyncio.run_coroutine_threadsafe(_start(), self._loop).result(10)
        return self

    def stop(self) -> None:
        if self._runner is not None:
            asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()

    def wait_for(self, n: int, timeout: float = 30) -> list[Received]:
        deadline = time.monotonic() + timeout
        while True:
            with self._lock:
                if len(self.received) >= n:
                    return list(self.received)
            assert time.monotonic() < deadline, f"received {len(self.received)} of {n} callbacks"
            time.sleep(0.02)


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    rx = Receiver().start()
    try:
        yield rx
    finally:
        rx.stop()


@pytest.fixture
def gw(tmp_path: Path, fake_stripe: str) -> Iterator[GatewayThread]:
    settings = settings_for(
        tmp_path, fake_stripe, RULES, callback_secret=SECRET, callback_delays=FAST
    )
    with gateway_thread(settings) as gateway:
        yield gateway


def hold(gw: GatewayThread, charge: str, callback: str | None, amount: int = 2500) -> Any:
    headers = {"Authorization": f"Bearer {TEST_STRIPE_KEY}"}
    if callback is not None:
        headers["Cosigner-Callback"] = callback
    return requests.post(
        gw.url + "/v1/refunds",
        data={"charge": charge, "amount": str(amount)},
        headers=headers,
        timeout=10,
    )


def callback_events(gw: GatewayThread, action_id: str) -> list[dict[str, Any]]:
    assert gw.app is not None
    events = gw.call(gw.app[STORE].events(action_id))
    return [e.data for e in events if e.kind == "callback"]


def outbox_status(gw: GatewayThread, action_id: str) -> list[str]:
    assert gw.app is not None
    items = gw.call(gw.app[STORE].outbox(action_id))
    return [i.status for i in items if i.kind == "callback"]


def wait_outbox(gw: GatewayThread, action_id: str, status: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while outbox_status(gw, action_id) != [status]:
        assert time.monotonic() < deadline, outbox_status(gw, action_id)
        time.sleep(0.05)


# -- signatures -------------------------------------------------------------------------------


def test_sign_and_verify_round_trip() -> None:
    body = b'{"id":"act_1","status":"completed"}'
    now = 1_732_000_000
    header = sign(body, SECRET.encode(), now)
    assert header.startswith(f"t={now},v1=") and len(header.split("v1=")[1]) == 64
    assert verify(body, header, SECRET, now=now)
    assert verify(body.decode(), header, SECRET.encode(), now=now + 299)
    assert not verify(body + b" ", header, SECRET, now=now), "tampered body"
    assert not verify(body, header, "another-secret", now=now), "wrong secret"
    assert not verify(body, header, SECRET, now=now + 301), "stale timestamp"
    assert not verify(body, header, SECRET, now=now - 301), "timestamp from the future"
    assert verify(body, header, SECRET, tolerance=1000, now=now + 900)
    # The timestamp is signed too: moving it breaks the signature.
    moved = header.replace(f"t={now}", f"t={now + 1}")
    assert not verify(body, moved, SECRET, now=now)


def test_verify_accepts_any_of_several_signatures_and_refuses_junk() -> None:
    body = b"{}"
    now = 1_732_000_000
    good = sign(body, SECRET.encode(), now).split(",")[1]
    assert verify(body, f"t={now},v1={'0' * 64},{good}", SECRET, now=now)
    assert verify(body, f"t={now}, {good}", SECRET, now=now)
    for header in (
        None,
        "",
        good,
        f"t={now}",
        f"t=abc,{good}",
        f"t=-{now},{good}",
        f"t={now},v1=zz",
        f"t={now},v0={good[3:]}",
        f"t={now},v1=ü",
    ):
        assert not verify(body, header, SECRET, now=now), header


def test_default_retries_are_at_least_six_attempts_over_an_hour() -> None:
    delays = _settings().callback_delays
    assert delays == DEFAULT_DELAYS
    assert len(delays) + 1 >= 6 and sum(delays) >= 3600


def test_the_secret_is_derived_from_the_master_secret_unless_configured() -> None:
    keyring = Keyring(b"m" * 32)
    assert callback_secret(_settings(), keyring) == keyring.key("callback")
    assert callback_secret(_settings(callback_secret=SECRET), keyring) == SECRET.encode()
    assert keyring.key("callback") != Keyring(b"n" * 32).key("callback")


# -- where callbacks may go -------------------------------------------------------------------


def _settings(**extra: Any) -> Settings:
    values: dict[str, Any] = {
        "listen": "127.0.0.1:8080",
        "public_url": "https://cosigner.example.com",
        "secret_key": "x" * 32,
        **extra,
    }
    return Settings(_env_file=None, **values)  # type: ignore[call-arg]


@pytest.mark.parametrize(
    ("url", "allowed"),
    [
        ("https://hooks.example.com/cosigner", True),
        ("http://127.0.0.1:9000/hook", True),
        ("http://localhost:8081/", True),
        ("ftp://hooks.example.com/", False),
        ("javascript:alert(1)", False),
        ("hooks.example.com/cosigner", False),
        ("http:///nohost", False),
        ("http://hooks.example.com:99999/", False),
        ("http://hooks.example.com/a b", False),
        ("https://cosigner.example.com/anything", False),
        ("https://COSIGNER.example.com./x", False),
        ("http://127.0.0.1:8080/cosigner/v1/actions", False),
        ("http://localhost:8080/", False),
        ("http://[::1]:8080/", False),
        ("http://127.1:8080/", False),
        ("http://0.0.0.0:8080/", False),
        ("https://" + "a" * 3000 + ".example.com/", False),
    ],
)
def test_callback_urls_must_be_http_and_not_the_gateway(url: str, allowed: bool) -> None:
    assert (callback_url_problem(url, _settings()) is None) is allowed


@pytest.mark.parametrize(
    ("url", "allowed"),
    [
        ("https://hooks.example.com/x", True),
        ("https://a.b.internal.example.org/x", True),
        ("https://internal.example.org/x", False),
        ("http://10.0.0.5:9000/x", True),
        ("http://10.0.0.5:9001/x", False),
        ("https://evil.example.net/x", False),
        ("https://hooks.example.com.evil.net/x", False),
    ],
)
def test_callback_allow_patterns(url: str, allowed: bool) -> None:
    settings = _settings(callback_allow="hooks.example.com, *.internal.example.org,10.0.0.5:9000")
    assert (callback_url_problem(url, settings) is None) is allowed


# -- delivery end to end ----------------------------------------------------------------------


def test_a_receiver_that_fails_twice_gets_the_callback_once_delivered(
    gw: GatewayThread, upstream: Any, receiver: Receiver
) -> None:
    receiver.statuses = [500, 503, 200]
    charge = upstream.create_charge(amount=9000)
    held = hold(gw, charge["id"], receiver.url)
    assert held.status_code == 202, held.text
    action_id = held.json()["id"]
    approved = gw.admin(
        "POST", f"/cosigner/v1/actions/{action_id}/approve", json={"reviewer": "ops@example.com"}
    )
    assert approved.status_code == 200
    received = receiver.wait_for(3)
    wait_outbox(gw, action_id, "delivered")
    time.sleep(sum(FAST) + 0.5)  # nothing more arrives once delivered
    assert len(receiver.received) == 3
    for rx in received:
        assert rx.verified, rx.headers
        assert rx.headers["Content-Type"] == "application/json"
        assert rx.headers["Cosigner-Action"] == action_id
    body = json.loads(received[-1].body)
    assert body["object"] == "cosigner.action" and body["id"] == action_id
    assert body["status"] == "completed" and body["response_code"] == 200
    assert body["response_body"]["object"] == "refund"
    assert body["decisions"][0]["reviewer"] == "ops@example.com"
    assert body["callback_url"] == receiver.url
    assert TEST_STRIPE_KEY not in received[-1].body.decode()

    attempts = callback_events(gw, action_id)
    assert [a["attempt"] for a in attempts] == [1, 2, 3]
    assert [a["status"] for a in attempts] == [500, 503, 200]
    assert [a["delivered"] for a in attempts] == [False, False, True]
    assert attempts[0]["error"] == "HTTP 500" and attempts[2]["error"] is None
    assert all(a["url"] == receiver.url and a["latency_ms"] >= 0 for a in attempts)
    assert attempts[0]["next_attempt_at"] is not None and attempts[2]["next_attempt_at"] is None


def test_every_terminal_status_is_called_back(
    gw: GatewayThread, upstream: Any, receiver: Receiver
) -> None:
    charge = upstream.create_charge()
    rejected = hold(gw, charge["id"], receiver.url).json()["id"]
    cancelled = hold(gw, charge["id"], receiver.url, amount=2600).json()["id"]
    gw.admin("POST", f"/cosigner/v1/actions/{rejected}/reject", json={"reviewer": "ops@x.io"})
    cancel = requests.post(
        f"{gw.url}/cosigner/v1/actions/{cancelled}/cancel",
        headers={"Authorization": f"Bearer {TEST_STRIPE_KEY}"},
        timeout=10,
    )
    assert cancel.status_code == 200
    received = receiver.wait_for(2)
    statuses = {json.loads(r.body)["id"]: json.loads(r.body)["status"] for r in received}
    assert statuses == {rejected: "rejected", cancelled: "cancelled"}
    assert all(r.verified for r in received)


def test_a_receiver_that_never_succeeds_is_given_up_on(
    gw: GatewayThread, upstream: Any, receiver: Receiver
) -> None:
    receiver.statuses = [500, 307, 500, 500, 500, 500]
    charge = upstream.create_charge()
    action_id = hold(gw, charge["id"], receiver.url).json()["id"]
    gw.admin("POST", f"/cosigner/v1/actions/{action_id}/reject", json={"reviewer": "ops@x.io"})
    wait_outbox(gw, action_id, "failed")
    attempts = callback_events(gw, action_id)
    assert len(attempts) == len(FAST) + 1 == len(receiver.received)
    assert not any(a["delivered"] for a in attempts)
    assert "redirects are not followed" in attempts[1]["error"]


def test_an_unreachable_receiver_is_recorded_on_the_receipt(
    tmp_path: Path, fake_stripe: str, upstream: Any
) -> None:
    settings = settings_for(
        tmp_path, fake_stripe, RULES, callback_secret=SECRET, callback_delays=(0.1,)
    )
    with gateway_thread(settings) as gw:
        charge = upstream.create_charge()
        dead = f"http://127.0.0.1:{free_port()}/gone"
        action_id = hold(gw, charge["id"], dead).json()["id"]
        gw.admin("POST", f"/cosigner/v1/actions/{action_id}/reject", json={"reviewer": "o@x.io"})
        wait_outbox(gw, action_id, "failed")
        attempts = callback_events(gw, action_id)
        assert [a["status"] for a in attempts] == [None, None]
        assert all(a["error"] and "Connect" in a["error"] for a in attempts)


def test_a_rules_callback_is_used_when_the_agent_names_none(
    tmp_path: Path, fake_stripe: str, upstream: Any, receiver: Receiver
) -> None:
    rules = tmp_path / "rules"
    rules.mkdir()
    (rules / "10.yaml").write_text(
        "version: 1\n"
        "rules:\n"
        "  - name: refunds\n"
        "    match: {method: POST, path: /v1/refunds}\n"
        "    action: hold\n"
        f"    callback: {receiver.url}\n"
    )
    settings = settings_for(tmp_path, fake_stripe, rules, callback_secret=SECRET)
    with gateway_thread(settings) as gw:
        charge = upstream.create_charge()
        held = hold(gw, charge["id"], None).json()
        assert held["status"] == "awaiting_approval"
        gw.admin("POST", f"/cosigner/v1/actions/{held['id']}/reject", json={"reviewer": "o@x.io"})
        (rx,) = receiver.wait_for(1)
        assert rx.verified and json.loads(rx.body)["status"] == "rejected"


def test_a_rules_callback_is_checked_again_at_delivery(
    tmp_path: Path, fake_stripe: str, upstream: Any
) -> None:
    port = free_port()
    rules = tmp_path / "rules"
    rules.mkdir()
    (rules / "10.yaml").write_text(
        "version: 1\n"
        "rules:\n"
        "  - name: refunds\n"
        "    match: {method: POST, path: /v1/refunds}\n"
        "    action: hold\n"
        f"    callback: http://localhost:{port}/cosigner/v1/actions\n"
    )
    settings = settings_for(tmp_path, fake_stripe, rules, port=port, callback_secret=SECRET)
    with gateway_thread(settings) as gw:
        charge = upstream.create_charge()
        held = hold(gw, charge["id"], None).json()
        gw.admin("POST", f"/cosigner/v1/actions/{held['id']}/reject", json={"reviewer": "o@x.io"})
        wait_outbox(gw, held["id"], "failed")
        (attempt,) = callback_events(gw, held["id"])
        assert attempt["error"] == "callback URL must not point at the gateway itself"
        assert attempt["status"] is None and attempt["latency_ms"] is None


@pytest.mark.parametrize(
    "callback",
    [
        "ftp://127.0.0.1/x",
        "not a url",
        "http://",
        "{gateway}/cosigner/v1/actions",
        "http://localhost:{port}/x",
    ],
)
def test_bad_callbacks_are_refused_and_nothing_is_held(
    gw: GatewayThread, upstream: Any, callback: str
) -> None:
    url = callback.format(gateway=gw.url, port=gw.settings.port)
    resp = hold(gw, "ch_123", url)
    assert resp.status_code == 400, resp.text
    err = resp.json()["error"]
    assert err["param"] == "Cosigner-Callback" and err["message"].startswith("Cosigner-Callback")
    assert gw.admin("GET", "/cosigner/v1/actions").json()["data"] == []


def test_callback_allow_refuses_other_hosts(
    tmp_path: Path, fake_stripe: str, upstream: Any, receiver: Receiver
) -> None:
    settings = settings_for(tmp_path, fake_stripe, RULES, callback_allow="hooks.example.com")
    with gateway_thread(settings) as gw:
        resp = hold(gw, "ch_123", receiver.url)
        assert resp.status_code == 400
        assert "COSIGNER_CALLBACK_ALLOW" in resp.json()["error"]["message"]
