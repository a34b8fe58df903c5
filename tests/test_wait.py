"""Cosigner-Wait: the agent's call blocks until a human decides, or answers 202 after N seconds."""

from __future__ import annotations

import asyncio
import concurrent.futures
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import requests
import stripe

from gateway.keys import NOTIFIER, STORE
from gateway.store.base import ActionFilter
from tests.support.gateway import (
    ADMIN_TOKEN,
    GatewayThread,
    gateway_thread,
    settings_for,
)
from tests.support.peers import TEST_STRIPE_KEY

RULES = Path(__file__).parent / "data" / "rules_core"


@pytest.fixture
def gw(tmp_path: Path, fake_stripe: str) -> Iterator[GatewayThread]:
    with gateway_thread(settings_for(tmp_path, fake_stripe, RULES)) as gateway:
        yield gateway


def agent(gw: GatewayThread) -> stripe.StripeClient:
    return stripe.StripeClient(
        TEST_STRIPE_KEY, base_addresses={"api": gw.url}, max_network_retries=0
    )


def waiting(gw: GatewayThread) -> int:
    """How many requests are waiting inside the gateway right now."""
    assert gw.app is not None
    notifier = gw.app[NOTIFIER]

    async def count() -> int:
        return notifier.waiting()

    return gw.call(count())


def until_waiting(gw: GatewayThread, n: int = 1, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while waiting(gw) < n:
        assert time.monotonic() < deadline, f"only {waiting(gw)} of {n} requests are waiting"
        time.sleep(0.02)


def held_ids(gw: GatewayThread) -> list[str]:
    assert gw.app is not None
    found, _ = gw.call(gw.app[STORE].list_actions(ActionFilter(limit=1000)))
    return [a.id for a in found]


def decide_while_waiting(
    gw: GatewayThread, decision: str = "approve", after: float = 1.0
) -> concurrent.futures.Future[requests.Response]:
    """In another thread: once the agent is waiting, decide its (only) action after ``after`` s."""

    def run() -> requests.Response:
        until_waiting(gw)
        time.sleep(after)
        (action_id,) = held_ids(gw)
        return gw.admin(
            "POST",
            f"/cosigner/v1/actions/{action_id}/{decision}",
            json={"reviewer": "ops@example.com", "note": "decided while the agent waited"},
        )

    pool = concurrent.futures.ThreadPoolExecutor(1)
    future = pool.submit(run)
    pool.shutdown(wait=False)
    return future


def test_approval_during_the_wait_returns_stripes_refund(gw: GatewayThread, upstream: Any) -> None:
    charge = upstream.create_charge(amount=10_000)
    decided = decide_while_waiting(gw, "approve", after=1.0)
    started = time.monotonic()
    refund = agent(gw).v1.refunds.create(
        params={"charge": charge["id"], "amount": 4999},
        options={"headers": {"Cosigner-Wait": "60"}},
    )
    elapsed = time.monotonic() - started
    assert decided.result(30).status_code == 200
    assert isinstance(refund, stripe.Refund)
    assert refund.amount == 4999 and refund.charge == charge["id"] and refund.status == "succeeded"
    assert refund.last_response.code == 200
    assert refund.last_response.headers["Cosigner-Action"] == held_ids(gw)[0]
    assert elapsed < 45  # answered by the decision, well before the wait ran out
    (stored,) = [r for r in upstream.refunds(charge["id"]) if r["charge"] == charge["id"]]
    assert stored["id"] == refund.id


def test_no_decision_within_the_wait_answers_202_after_n_seconds(
    gw: GatewayThread, upstream: Any
) -> None:
    charge = upstream.create_charge()
    started = time.monotonic()
    held = agent(gw).v1.refunds.create(
        params={"charge": charge["id"], "amount": 1500},
        options={"headers": {"Cosigner-Wait": "2"}},
    )
    elapsed = time.monotonic() - started
    # Not before the 2 s asked for; the upper bound only leaves room for a loaded machine.
    assert 1.9 <= elapsed <= 12.0, elapsed
    assert held.last_response.code == 202
    assert held["object"] == "cosigner.action" and held["status"] == "awaiting_approval"
    assert "Cosigner-Wait" in held["message"]
    assert waiting(gw) == 0


def test_rejection_during_the_wait_is_403(gw: GatewayThread, upstream: Any) -> None:
    charge = upstream.create_charge()
    decided = decide_while_waiting(gw, "reject", after=0.5)
    started = time.monotonic()
    with pytest.raises(stripe.PermissionError) as err:
        agent(gw).v1.refunds.create(
            params={"charge": charge["id"], "amount": 1500},
            options={"headers": {"Cosigner-Wait": "60"}},
        )
    assert time.monotonic() - started < 45
    assert decided.result(30).status_code == 200
    assert err.value.json_body["error"]["code"] == "cosigner_rejected"
    assert [r for r in upstream.refunds(charge["id"]) if r["charge"] == charge["id"]] == []


def test_expiry_during_the_wait_is_403_expired(gw: GatewayThread, upstream: Any) -> None:
    charge = upstream.create_charge()
    started = time.monotonic()
    with pytest.raises(stripe.PermissionError) as err:
        agent(gw).v1.refunds.create(
            params={"charge": charge["id"], "amount": 300, "metadata": {"expire": "fast"}},
            options={"headers": {"Cosigner-Wait": "60"}},
        )
    assert err.value.json_body["error"]["code"] == "cosigner_expired"
    # The action lives 1 s; the waiter wakes at its expiry, not at the end of the wait.
    assert time.monotonic() - started < 30


def test_resending_with_the_same_key_waits_for_the_outcome(
    gw: GatewayThread, upstream: Any
) -> None:
    charge = upstream.create_charge(amount=9000)
    client = agent(gw)
    params = {"charge": charge["id"], "amount": 2000}
    first = client.v1.refunds.create(params=params, options={"idempotency_key": "wait-resend"})
    assert first["status"] == "awaiting_approval"
    decided = decide_while_waiting(gw, "approve", after=0.5)
    refund = client.v1.refunds.create(
        params=params,
        options={"idempotency_key": "wait-resend", "headers": {"Cosigner-Wait": "60"}},
    )
    assert decided.result(30).status_code == 200
    assert isinstance(refund, stripe.Refund) and refund.amount == 2000
    # A different body under the same key is refused at once, not after the wait.
    started = time.monotonic()
    with pytest.raises(stripe.IdempotencyError):
        client.v1.refunds.create(
            params={"charge": charge["id"], "amount": 2100},
            options={"idempotency_key": "wait-resend", "headers": {"Cosigner-Wait": "60"}},
        )
    assert time.monotonic() - started < 30


def test_the_wait_is_capped_by_max_wait(tmp_path: Path, fake_stripe: str, upstream: Any) -> None:
    with gateway_thread(settings_for(tmp_path, fake_stripe, RULES, max_wait=1)) as gw:
        charge = upstream.create_charge()
        started = time.monotonic()
        resp = requests.post(
            gw.url + "/v1/refunds",
            data={"charge": charge["id"], "amount": "1500"},
            headers={"Authorization": f"Bearer {TEST_STRIPE_KEY}", "Cosigner-Wait": "30"},
            timeout=30,
        )
        elapsed = time.monotonic() - started
        assert resp.status_code == 202 and resp.json()["status"] == "awaiting_approval"
        # Capped at 1 s, not the 30 asked for; room above for a loaded machine.
        assert 0.9 <= elapsed <= 12.0, elapsed


@pytest.mark.parametrize("value", ["abc", "-1", "1.5", "", "1e3", "²", "5 5", "99999999"])
def test_a_bad_wait_header_is_400_and_holds_nothing(
    gw: GatewayThread, upstream: Any, value: str
) -> None:
    resp = requests.post(
        gw.url + "/v1/refunds",
        data={"charge": "ch_123", "amount": "1500"},
        headers={"Authorization": f"Bearer {TEST_STRIPE_KEY}", "Cosigner-Wait": value},
        timeout=10,
    )
    assert resp.status_code == 400, resp.text
    err = resp.json()["error"]
    assert err["param"] == "Cosigner-Wait" and "whole number" in err["message"]
    assert held_ids(gw) == []


async def test_hundreds_of_waiters_do_not_hold_up_reads(
    tmp_path: Path, fake_stripe: str, upstream: Any
) -> None:
    n = 200
    # Rate limits are not under test here; 400 writes from one agent would trip them.
    settings = settings_for(tmp_path, fake_stripe, RULES, rate_limit_writes="off")
    charge = await asyncio.to_thread(upstream.create_charge, amount=1_000_000)
    auth = {"Authorization": f"Bearer {TEST_STRIPE_KEY}"}

    def request_for(i: int) -> tuple[str, dict[str, str]]:
        # Three refunds to approve; payouts for the rest (no lookups at hold time).
        if i < 3:
            return "/v1/refunds", {"charge": charge["id"], "amount": str(1001 + i)}
        return "/v1/payouts", {"amount": str(1001 + i), "currency": "usd"}

    with gateway_thread(settings) as gw:
        connector = aiohttp.TCPConnector(limit=n + 20)
        async with aiohttp.ClientSession(connector=connector) as http:

            async def send(i: int, wait: int) -> tuple[int, dict[str, Any]]:
                path, data = request_for(i)
                headers = {**auth, "Cosigner-Wait": str(wait), "Idempotency-Key": f"many-{i}"}
                async with http.post(gw.url + path, data=data, headers=headers) as resp:
                    return resp.status, await resp.json()

            # Hold them all first, then wait on all of them at once (same key, same body).
            first = await asyncio.wait_for(asyncio.gather(*(send(i, 0) for i in range(n))), 120)
            assert {status for status, _ in first} == {202}
            waiters = [asyncio.create_task(send(i, 60)) for i in range(n)]
            try:
                await asyncio.to_thread(until_waiting, gw, n, 30)
                for _ in range(20):
                    async with http.get(f"{gw.url}/v1/charges/{charge['id']}", headers=auth) as r:
                        assert r.status == 200
                        assert (await r.json())["id"] == charge["id"]
                assert not any(task.done() for task in waiters)

                admin = {"Authorization": f"Bearer {ADMIN_TOKEN}"}

                async def decide(i: int, action_id: str) -> int:
                    verb = "approve" if i < 3 else "reject"
                    async with http.post(
                        f"{gw.url}/cosigner/v1/actions/{action_id}/{verb}",
                        json={"reviewer": "ops@example.com"},
                        headers=admin,
                    ) as resp:
                        return resp.status

                codes = await asyncio.gather(
                    *(decide(i, b["id"]) for i, (_, b) in enumerate(first))
                )
                assert set(codes) == {200}
                results = await asyncio.wait_for(asyncio.gather(*waiters), 60)
            finally:
                for task in waiters:
                    task.cancel()
    refunds = results[:3]
    assert [status for status, _ in refunds] == [200, 200, 200]
    assert [body["object"] for _, body in refunds] == ["refund"] * 3
    assert [body["amount"] for _, body in refunds] == [1001, 1002, 1003]
    rejected = results[3:]
    assert {status for status, _ in rejected} == {403}
    assert {body["error"]["code"] for _, body in rejected} == {"cosigner_rejected"}


def test_shutdown_answers_waiting_agents_at_once(
    tmp_path: Path, fake_stripe: str, upstream: Any
) -> None:
    gw = GatewayThread(settings_for(tmp_path, fake_stripe, RULES)).start()
    stopped = False
    try:
        charge = upstream.create_charge()
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            pending = pool.submit(
                requests.post,
                gw.url + "/v1/refunds",
                data={"charge": charge["id"], "amount": "1500"},
                headers={"Authorization": f"Bearer {TEST_STRIPE_KEY}", "Cosigner-Wait": "60"},
                timeout=60,
            )
            until_waiting(gw)
            started = time.monotonic()
            gw.stop()
            stopped = True
            resp = pending.result(60)
        assert resp.status_code == 202 and resp.json()["status"] == "awaiting_approval"
        assert time.monotonic() - started < 20
    finally:
        if not stopped:
            gw.stop()
