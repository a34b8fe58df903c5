"""Crashes, flaky upstreams, a dead mail server and several replicas: nothing lost, nothing twice.

Real peers only: `cosigner serve` processes (killed with SIGKILL, stopped with
SIGTERM/SIGINT), the fake Stripe that replays idempotency keys like Stripe,
an SMTP sink, and PostgreSQL for replicas. Each scenario that applies to both
stores runs on both. Every wait is bounded.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import secrets
import signal
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
import requests

from gateway.keys import STORE
from gateway.store import store_from_url
from gateway.store.base import EventRecord, OutboxItem, Store
from tests.support.gateway import (
    ADMIN_TOKEN,
    SECRET_KEY,
    GatewayProcess,
    GatewayThread,
    gateway_thread,
    settings_for,
)
from tests.support.peers import TEST_STRIPE_KEY, SmtpSink, Upstream, free_port

pytestmark = pytest.mark.slow

T = TypeVar("T")
RULES = Path(__file__).parent / "data" / "rules_core"
FORWARD_TIMEOUT = 6  # seconds per attempt; a dead forwarder's lease lapses 5 s after that
LEASE = FORWARD_TIMEOUT + 5  # after a crash mid-forward, the forward resumes this long after
# Seconds a "slow" refund takes upstream: the window to kill or stop a gateway mid-forward,
# wide enough for a loaded CI machine, and under FORWARD_TIMEOUT so the gateway never
# gives up on the attempt first.
SLOW = 5
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
AGENT = {"Authorization": f"Bearer {TEST_STRIPE_KEY}"}


@pytest.fixture(params=["sqlite", "postgresql"])
def database(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'cosigner.db'}"
    url: str = request.getfixturevalue("postgres_url")
    return url


def env_for(fake_stripe: str, database: str, **extra: str) -> dict[str, str]:
    """The environment of one `cosigner serve` replica."""
    return {
        "COSIGNER_LISTEN": f"127.0.0.1:{free_port()}",
        "COSIGNER_UPSTREAM": fake_stripe,
        "COSIGNER_DATABASE": database,
        "COSIGNER_RULES": str(RULES),
        "COSIGNER_SECRET_KEY": SECRET_KEY,
        "COSIGNER_ADMIN_TOKEN": ADMIN_TOKEN,
        "COSIGNER_WORKER_INTERVAL": "0.2",
        "COSIGNER_FORWARD_TIMEOUT": str(FORWARD_TIMEOUT),
        "COSIGNER_RULES_WATCH": "0",
        **extra,
    }


def replica_env(fake_stripe: str, postgres_url: str) -> dict[str, str]:
    """One of several replicas: same database, same secret, links to the load balancer."""
    return env_for(
        fake_stripe,
        postgres_url,
        COSIGNER_PUBLIC_URL="http://cosigner.internal",
        COSIGNER_REVIEWERS="ops@example.com",
    )


@pytest.fixture
def processes() -> Iterator[list[GatewayProcess]]:
    """Gateway processes a test starts; whatever is still running at the end is killed."""
    started: list[GatewayProcess] = []
    yield started
    for process in started:
        process.kill()


def serve(processes: list[GatewayProcess], env: dict[str, str], cwd: Path) -> GatewayProcess:
    cwd.mkdir(parents=True, exist_ok=True)
    process = GatewayProcess(env, cwd).start()
    processes.append(process)
    return process


def read_store(database: str, read: Callable[[Store], Awaitable[T]]) -> T:
    """Look into the database directly, as an operator would (no gateway involved)."""

    async def run() -> T:
        store = store_from_url(database)
        await store.open()
        try:
            return await read(store)
        finally:
            await store.close()

    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, run()).result(30)


def events(database: str, action_id: str) -> list[EventRecord]:
    return read_store(database, lambda s: s.events(action_id))


def store_of(gw: GatewayThread) -> Store:
    assert gw.app is not None
    return gw.app[STORE]


def outbox(database: str, action_id: str) -> list[OutboxItem]:
    return read_store(database, lambda s: s.outbox(action_id))


def hold(
    url: str, charge: str, amount: int = 2500, params: dict[str, str] | None = None, **headers: str
) -> str:
    resp = requests.post(
        url + "/v1/refunds",
        data={"charge": charge, "amount": str(amount), **(params or {})},
        headers={**AGENT, **headers},
        timeout=30,
    )
    assert resp.status_code == 202, resp.text
    action_id: str = resp.json()["id"]
    return action_id


def approve(url: str, action_id: str, reviewer: str = "ops@example.com") -> requests.Response:
    return requests.post(
        f"{url}/cosigner/v1/actions/{action_id}/approve",
        json={"reviewer": reviewer},
        headers=ADMIN,
        timeout=30,
    )


def get_action(url: str, action_id: str) -> dict[str, Any]:
    resp = requests.get(f"{url}/cosigner/v1/actions/{action_id}", headers=ADMIN, timeout=10)
    assert resp.status_code == 200, resp.text
    body: dict[str, Any] = resp.json()
    return body


def wait_status(url: str, action_id: str, statuses: set[str], timeout: float) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        action = get_action(url, action_id)
        if action["status"] in statuses or time.monotonic() > deadline:
            assert action["status"] in statuses, action
            return action
        time.sleep(0.1)


def wait_in_flight(upstream: Upstream, timeout: float = 30) -> dict[str, Any]:
    """The forwarded refund, once the upstream has read all of it (and not yet answered)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = [r for r in upstream.requests(method="POST", path="/v1/refunds") if r["body"]]
        if found:
            return found[0]
        time.sleep(0.05)
    raise AssertionError("the forward never reached the upstream")


def assert_refunded_once(upstream: Upstream, charge: str, action: dict[str, Any]) -> None:
    """One refund at Stripe, the action's answer is that refund, every attempt had one key."""
    refunds = [r for r in upstream.refunds(charge) if r["charge"] == charge]
    assert len(refunds) == 1, refunds
    assert action["status"] == "completed" and action["response_code"] == 200
    assert action["response_body"]["id"] == refunds[0]["id"]
    sent = upstream.requests(method="POST", path="/v1/refunds")
    assert len({r["idempotency_key"] for r in sent}) == 1, sent
    assert upstream.count("POST", "/v1/refunds") == 1  # reached Stripe's logic once


# -- crashes ------------------------------------------------------------------------------


def test_kill_9_mid_forward_then_restart_refunds_exactly_once(
    tmp_path: Path,
    fake_stripe: str,
    upstream: Upstream,
    database: str,
    processes: list[GatewayProcess],
) -> None:
    env = env_for(fake_stripe, database)
    gw = serve(processes, env, tmp_path / "gw")
    charge = upstream.create_charge(amount=5000)["id"]
    key = "agent-key-" + secrets.token_hex(6)  # the fake Stripe outlives this test: a fresh key
    action_id = hold(gw.url, charge, **{"Idempotency-Key": key})
    upstream.fault("/v1/refunds", method="POST", delay=SLOW)  # still running when we kill
    assert approve(gw.url, action_id).status_code == 200
    first = wait_in_flight(upstream)
    assert first["idempotency_key"] == key
    gw.kill()
    # The slow request takes effect although its client is gone: the refund exists...
    upstream.wait_for_requests(1, method="POST", path="/v1/refunds", timeout=SLOW + 30)
    assert len(upstream.refunds(charge)) == 1, [
        {k: r[k] for k in ("status", "fault", "handled", "replayed", "duration", "body")}
        for r in upstream.requests(method="POST", path="/v1/refunds")
    ]
    # ... while the gateway's record still says it is being forwarded.
    stored = read_store(database, lambda s: s.get_action(action_id))
    assert stored is not None and stored.status == "pending"

    gw = serve(processes, env, tmp_path / "gw")
    # Resumed once the dead forwarder's lease lapsed, with the same key: Stripe replays.
    action = wait_status(gw.url, action_id, {"completed", "failed"}, timeout=LEASE + 30)
    assert_refunded_once(upstream, charge, action)
    assert any(r["replayed"] for r in upstream.requests(method="POST", path="/v1/refunds"))
    # The forward's own story: started, killed before any answer, started again, answered
    # once. (The reviewer email is another worker's business: when the first process died
    # before sending it, the restarted one skips it whenever its worker gets there.)
    kinds = [e.kind for e in events(database, action_id)]
    forward = [k for k in kinds if k.startswith("forward_") or k in ("completed", "failed")]
    assert forward == ["forward_started", "forward_started", "forward_attempt", "completed"]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_shutdown_finishes_the_forward_in_flight(
    tmp_path: Path,
    fake_stripe: str,
    upstream: Upstream,
    database: str,
    processes: list[GatewayProcess],
    sig: signal.Signals,
) -> None:
    env = env_for(fake_stripe, database, COSIGNER_SHUTDOWN_GRACE="20")
    gw = serve(processes, env, tmp_path / "gw")
    charge = upstream.create_charge(amount=5000)["id"]
    waiting = hold(gw.url, charge, amount=100)  # undecided: must survive the restart
    action_id = hold(gw.url, charge)
    upstream.fault("/v1/refunds", method="POST", delay=SLOW)
    assert approve(gw.url, action_id).status_code == 200
    wait_in_flight(upstream)
    assert gw.proc is not None
    gw.proc.send_signal(sig)
    # It stops accepting at once ...
    deadline = time.monotonic() + SLOW
    refused = False
    while not refused and time.monotonic() < deadline:
        try:
            requests.get(gw.url + "/healthz", timeout=1)
        except requests.ConnectionError:
            refused = True
        except requests.Timeout:
            pass  # caught in the moment the listener closed; try a fresh connection
        time.sleep(0.05)
    assert refused and gw.proc.poll() is None  # refusing while the forward still runs
    # ... and exits cleanly only after the forward got its answer.
    assert gw.proc.wait(SLOW + 30) == 0
    stored = read_store(database, lambda s: s.get_action(action_id))
    assert stored is not None and stored.status == "completed" and stored.attempts == 1
    still = read_store(database, lambda s: s.get_action(waiting))
    assert still is not None and still.status == "awaiting_approval"

    gw = serve(processes, env, tmp_path / "gw")
    action = get_action(gw.url, action_id)
    assert_refunded_once(upstream, charge, action)
    assert not any(r["replayed"] for r in upstream.requests(method="POST", path="/v1/refunds"))
    assert get_action(gw.url, waiting)["status"] == "awaiting_approval"


# -- a flaky upstream ---------------------------------------------------------------------


def test_upstream_503_then_200_is_retried_with_the_same_key(
    tmp_path: Path, fake_stripe: str, upstream: Upstream, database: str
) -> None:
    settings = settings_for(tmp_path, fake_stripe, RULES, database=database)
    with gateway_thread(settings) as gw:
        charge = upstream.create_charge(amount=5000)["id"]
        upstream.fault("/v1/refunds", method="POST", fail=[503])
        action_id = hold(gw.url, charge)
        assert approve(gw.url, action_id).status_code == 200
        gw.wait_status(action_id, {"completed", "failed"})
        action = get_action(gw.url, action_id)
        assert_refunded_once(upstream, charge, action)
        assert action["attempts"] == 2
        sent = upstream.requests(method="POST", path="/v1/refunds")
        assert [r["status"] for r in sent] == [503, 200]
        assert sent[0]["idempotency_key"] == f"cosigner-{action_id}"
        log = [
            e.data for e in gw.call(store_of(gw).events(action_id)) if e.kind == "forward_attempt"
        ]
        assert [(a["status"], a["will_retry"]) for a in log] == [(503, True), (200, False)]


def test_upstream_timing_out_is_retried_and_refunds_once(
    tmp_path: Path, fake_stripe: str, upstream: Upstream, database: str
) -> None:
    # Attempts to spare: retries that find the first request still running upstream get
    # Stripe's 409 (key in use) until it has finished, however the backoff's jitter falls.
    settings = settings_for(
        tmp_path, fake_stripe, RULES, database=database, forward_timeout=1.0, forward_attempts=8
    )
    with gateway_thread(settings) as gw:
        charge = upstream.create_charge(amount=5000)["id"]
        # The first attempt outlives its timeout (and still takes effect upstream, later).
        upstream.fault("/v1/refunds", method="POST", delay=2)
        action_id = hold(gw.url, charge)
        assert approve(gw.url, action_id).status_code == 200
        gw.wait_status(action_id, {"completed", "failed"}, timeout=60)
        upstream.wait_for_requests(2, method="POST", path="/v1/refunds", timeout=30)
        action = get_action(gw.url, action_id)
        assert_refunded_once(upstream, charge, action)
        log = [
            e.data for e in gw.call(store_of(gw).events(action_id)) if e.kind == "forward_attempt"
        ]
        assert "timed out" in log[0]["error"] and log[0]["will_retry"]
        assert log[-1]["status"] == 200
        # The late first request found the key already used: Stripe replayed, no second refund.
        assert any(r["replayed"] for r in upstream.requests(method="POST", path="/v1/refunds"))


def test_a_4xx_is_final_and_never_retried(
    tmp_path: Path, fake_stripe: str, upstream: Upstream, database: str
) -> None:
    settings = settings_for(tmp_path, fake_stripe, RULES, database=database)
    with gateway_thread(settings) as gw:
        charge = upstream.create_charge(amount=5000)["id"]
        upstream.fault("/v1/refunds", method="POST", fail=[402, 402])
        action_id = hold(gw.url, charge)
        assert approve(gw.url, action_id).status_code == 200
        gw.wait_status(action_id, {"completed", "failed"})
        action = get_action(gw.url, action_id)
        assert action["status"] == "completed" and action["response_code"] == 402
        assert action["attempts"] == 1
        assert len(upstream.requests(method="POST", path="/v1/refunds")) == 1
        assert upstream.refunds(charge) == []


# -- a dead mail server -------------------------------------------------------------------


def test_mail_server_down_at_hold_time_never_blocks_and_delivers_later(
    tmp_path: Path, fake_stripe: str, upstream: Upstream, database: str
) -> None:
    port = free_port()  # nothing listens here yet
    settings = settings_for(
        tmp_path,
        fake_stripe,
        RULES,
        database=database,
        smtp_url=f"smtp://127.0.0.1:{port}",
        mail_retry_delay=0.5,
    )
    with gateway_thread(settings) as gw:
        charge = upstream.create_charge(amount=5000)["id"]
        action_id = hold(gw.url, charge)  # answered 202 although no email can go out
        store = store_of(gw)

        def mail() -> list[OutboxItem]:
            return [i for i in gw.call(store.outbox(action_id)) if i.kind == "mail"]

        deadline = time.monotonic() + 30
        while not any(i.attempts for i in mail()) and time.monotonic() < deadline:
            time.sleep(0.05)
        (item,) = mail()
        assert item.status == "pending" and item.attempts >= 1 and item.last_error
        # Approvals don't wait for mail either.
        other = hold(gw.url, charge, amount=300)
        assert approve(gw.url, other).status_code == 200
        assert gw.wait_status(other, {"completed"})
        with SmtpSink(port=port) as sink:  # the mail server comes back
            sink.wait_for(1, timeout=30)
            (received,) = sink.received
            assert received.rcpt_tos == ["billing@example.com"]
            text = received.message.get_body(("plain",))
            assert text is not None and action_id in str(text.get_content())
            deadline = time.monotonic() + 30
            while mail()[0].status != "sent" and time.monotonic() < deadline:
                time.sleep(0.05)
            assert mail()[0].status == "sent"
        kinds = [e.kind for e in gw.call(store.events(action_id))]
        assert "email_failed" in kinds and kinds.index("email_failed") < kinds.index("email_sent")


# -- concurrency --------------------------------------------------------------------------


def test_eight_reviewers_approving_at_once_forward_once(
    tmp_path: Path, fake_stripe: str, upstream: Upstream, database: str
) -> None:
    settings = settings_for(tmp_path, fake_stripe, RULES, database=database)
    with gateway_thread(settings) as gw:
        charge = upstream.create_charge(amount=5000)["id"]
        action_id = hold(gw.url, charge)
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            answers = list(
                pool.map(lambda n: approve(gw.url, action_id, f"r{n}@example.com"), range(8))
            )
        assert sorted(a.status_code for a in answers) == [200] + [409] * 7
        gw.wait_status(action_id, {"completed", "failed"})
        assert_refunded_once(upstream, charge, get_action(gw.url, action_id))
        decisions = gw.call(store_of(gw).decisions(action_id))
        assert len(decisions) == 1


def test_two_hundred_concurrent_holds_make_two_hundred_actions(
    tmp_path: Path, fake_stripe: str, upstream: Upstream, database: str
) -> None:
    settings = settings_for(tmp_path, fake_stripe, RULES, database=database)
    with gateway_thread(settings) as gw:
        charge = upstream.create_charge(amount=5000)["id"]
        with concurrent.futures.ThreadPoolExecutor(32) as pool:
            ids = list(
                pool.map(
                    lambda n: hold(gw.url, charge, amount=100 + n, **{"Idempotency-Key": f"k{n}"}),
                    range(200),
                )
            )
        assert len(set(ids)) == 200
        store = store_of(gw)
        assert gw.call(store.count_by_status()) == {"awaiting_approval": 200}
        stored = [gw.call(store.get_action(i)) for i in ids]
        assert sorted(a.params["amount"] for a in stored) == sorted(
            str(100 + n) for n in range(200)
        )
        assert upstream.requests(method="POST", path="/v1/refunds") == []


# -- several replicas on one PostgreSQL ---------------------------------------------------


def test_two_replicas_racing_approvals_forward_once_and_wake_each_others_waiters(
    tmp_path: Path,
    fake_stripe: str,
    upstream: Upstream,
    postgres_url: str,
    processes: list[GatewayProcess],
) -> None:
    a = serve(processes, replica_env(fake_stripe, postgres_url), tmp_path / "a")
    b = serve(processes, replica_env(fake_stripe, postgres_url), tmp_path / "b")
    charge = upstream.create_charge(amount=5000)["id"]
    key = "agent-key-" + secrets.token_hex(6)
    action_id = hold(a.url, charge, **{"Idempotency-Key": key})  # held on A
    assert get_action(b.url, action_id)["status"] == "awaiting_approval"  # seen on B
    with concurrent.futures.ThreadPoolExecutor(9) as pool:
        # The agent long-polls A; the answer can only come early if B's change wakes A.
        waiter = pool.submit(
            requests.post,
            a.url + "/v1/refunds",
            data={"charge": charge, "amount": "2500"},
            headers={**AGENT, "Idempotency-Key": key, "Cosigner-Wait": "60"},
            timeout=20,
        )
        time.sleep(0.5)
        answers = list(
            pool.map(lambda n: approve((a, b)[n % 2].url, action_id, f"r{n}@example.com"), range(8))
        )
        assert sorted(r.status_code for r in answers) == [200] + [409] * 7
        final = waiter.result(25)
    assert final.status_code == 200, final.text
    assert final.headers["Cosigner-Action"] == action_id
    action = wait_status(b.url, action_id, {"completed", "failed"}, timeout=30)
    assert_refunded_once(upstream, charge, action)
    assert get_action(a.url, action_id) == action


def test_two_replicas_expire_and_email_each_action_once(
    tmp_path: Path,
    fake_stripe: str,
    upstream: Upstream,
    postgres_url: str,
    processes: list[GatewayProcess],
) -> None:
    replicas = [
        serve(processes, replica_env(fake_stripe, postgres_url), tmp_path / name)
        for name in ("a", "b")
    ]
    charge = upstream.create_charge(amount=5000)["id"]
    # Held for one second, alternately on each replica; both replicas' expiry and mail
    # workers race for every one of them.
    ids = [
        hold(replicas[n % 2].url, charge, 100 + n, {"metadata[expire]": "fast"}) for n in range(6)
    ]
    for action_id in ids:
        wait_status(replicas[0].url, action_id, {"expired"}, timeout=30)
    deadline = time.monotonic() + 30
    for action_id in ids:
        mail: list[OutboxItem] = []
        while time.monotonic() < deadline:
            mail = outbox(postgres_url, action_id)
            if all(item.status != "pending" for item in mail):
                break
            time.sleep(0.1)
        assert [(i.kind, i.status) for i in mail] in (
            [("mail", "sent")],
            [("mail", "skipped")],  # expired before its turn: no link to a closed action
        )
        kinds = [e.kind for e in events(postgres_url, action_id)]
        assert kinds.count("expired") == 1
        assert kinds.count("email_sent") + kinds.count("email_skipped") == 1


def test_replica_killed_mid_forward_while_the_other_keeps_serving(
    tmp_path: Path,
    fake_stripe: str,
    upstream: Upstream,
    postgres_url: str,
    processes: list[GatewayProcess],
) -> None:
    a = serve(processes, replica_env(fake_stripe, postgres_url), tmp_path / "a")
    b = serve(processes, replica_env(fake_stripe, postgres_url), tmp_path / "b")
    charge = upstream.create_charge(amount=5000)["id"]
    action_id = hold(b.url, charge)
    upstream.fault("/v1/refunds", method="POST", delay=SLOW)
    assert approve(a.url, action_id).status_code == 200  # A forwards ...
    wait_in_flight(upstream)
    a.kill()  # ... and dies mid-forward.
    # B keeps serving: reads, holds and decisions.
    assert requests.get(b.url + "/healthz", timeout=5).status_code == 200
    other = hold(b.url, charge, amount=300)
    assert get_action(b.url, other)["status"] == "awaiting_approval"
    # B resumes A's forward once A's lease lapses; Stripe replays the first answer.
    action = wait_status(b.url, action_id, {"completed", "failed"}, timeout=LEASE + 30)
    assert_refunded_once(upstream, charge, action)
    assert any(r["replayed"] for r in upstream.requests(method="POST", path="/v1/refunds"))
