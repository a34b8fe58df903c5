"""Every Store method, on both backends: SQLite (a temp file) and PostgreSQL (a fresh database).

Races use two store instances on the same database — two replicas (or two
processes on one SQLite file) — so the guarantees hold across processes, not
just across coroutines.
"""

from __future__ import annotations

import asyncio
import dataclasses
import sqlite3
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from gateway.store import sqlite as sqlite_store
from gateway.store import store_from_url
from gateway.store.base import (
    ActionFilter,
    ActionRecord,
    AgentKeyRecord,
    DecisionRecord,
    EventRecord,
    RequestReceipt,
    Store,
)
from gateway.store.sqlite import SqliteStore


class Clock:
    """A settable clock for the store's own timestamps."""

    def __init__(self, now: float = 1_700_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'store.db'}"
    url: str = request.getfixturevalue("postgres_url")
    return url


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
async def store(store_url: str, clock: Clock) -> AsyncIterator[Store]:
    s = store_from_url(store_url, clock=clock)
    await s.open()
    try:
        yield s
    finally:
        await s.close()


@pytest.fixture
async def replica(store: Store, store_url: str, clock: Clock) -> AsyncIterator[Store]:
    """A second store on the same database (opened after the first: migrations are done)."""
    s = store_from_url(store_url, clock=clock)
    await s.open()
    try:
        yield s
    finally:
        await s.close()


_seq = 0


def action(**overrides: Any) -> ActionRecord:
    """A held refund with every column filled in; ids sort in creation order."""
    global _seq
    _seq += 1
    values: dict[str, Any] = {
        "id": f"act_{_seq:06d}",
        "status": "awaiting_approval",
        "created": 1_700_000_000 + _seq,
        "updated": 1_700_000_000.5 + _seq,
        "expires_at": 1_700_086_400,
        "agent": "sk_test_…6789",
        "credential_id": "cred_1",
        "method": "POST",
        "path": "/v1/refunds",
        "query": "",
        "content_type": "application/x-www-form-urlencoded",
        "body": b"charge=ch_1&amount=4999",
        "request_hash": "h" * 64,
        "params": {"charge": "ch_1", "amount": "4999"},
        "headers": {"Stripe-Version": "2024-06-20"},
        "summary": "Refund $49.99 USD of charge ch_1",
        "rule": "refunds",
        "reason": "matched rule refunds",
        "approvals_required": 1,
        "reviewers": ["billing@example.com"],
        "editable": ["amount"],
    }
    values.update(overrides)
    return ActionRecord(**values)


async def insert(store: Store, record: ActionRecord) -> ActionRecord:
    async with store.transaction() as tx:
        return await tx.insert_action(record)


# -- actions ------------------------------------------------------------------------------


async def test_every_field_round_trips(store: Store) -> None:
    record = action(
        query="expand[]=charge",
        body=bytes(range(256)),  # any bytes, not just text
        # Key order is kept: reviewers see parameters in the order the agent sent them.
        params={"zeta": "1", "amount": "4999", "metadata": {"b": "2", "a": ["x", {"y": None}]}},
        headers={"Stripe-Account": "acct_1", "Stripe-Version": "2024-06-20"},
        idempotency_key="key-1",
        account="acct_1",
        justification="Customer asked — «twice»",
        callback_url="http://127.0.0.1:9/cb",
        credential_sealed=b"\x00sealed\xff",
        context={"amount_refundable": 4999, "currency": "usd"},
        modified_params={"amount": "100"},
        response_code=200,
        response_body='{"id": "re_1"}',
        response_headers={"Request-Id": "req_1"},
        last_error="upstream answered 503",
        attempts=2,
        completed_at=1_700_000_100,
        lease_until=1_700_000_050.25,
    )
    assert await insert(store, record) == record
    stored = await store.get_action(record.id)
    assert stored == record
    assert stored is not None and list(stored.params) == ["zeta", "amount", "metadata"]
    async with store.transaction() as tx:
        assert await tx.get_action(record.id) == record
        assert await tx.get_action("act_missing") is None
    assert await store.get_action("act_missing") is None
    minimal = action()
    await insert(store, minimal)
    assert await store.get_action(minimal.id) == minimal


async def test_text_with_nul_is_stored_not_refused(store: Store) -> None:
    """Values may carry %00; PostgreSQL text cannot, so it keeps U+FFFD in its place."""
    record = await insert(store, action(justification="a\x00b", params={"reason": "a\x00b"}))
    async with store.transaction() as tx:
        assert await tx.update_action(record.id, ("awaiting_approval",), {"last_error": "x\x00"})
        assert await tx.insert_decision(
            DecisionRecord(record.id, "r@example.com", "reject", "n\x00", "api", 1)
        )
    stored = await store.get_action(record.id)
    assert stored is not None
    assert stored.justification in ("a\x00b", "a\ufffdb")
    assert stored.last_error in ("x\x00", "x\ufffd")
    assert stored.params == {"reason": "a\x00b"}  # JSON escapes it: kept exactly
    (decision,) = await store.decisions(record.id)
    assert decision.note in ("n\x00", "n\ufffd")


async def test_idempotency_key_collision_returns_the_first_action(store: Store) -> None:
    first = await insert(store, action(idempotency_key="k1"))
    again = await insert(store, action(idempotency_key="k1", summary="second"))
    assert again.id == first.id and again.summary == first.summary
    other_agent = await insert(store, action(idempotency_key="k1", agent="cos_other"))
    assert other_agent.id != first.id
    assert (await store.find_idempotent(first.agent, "k1")) == first
    assert await store.find_idempotent(first.agent, "k2") is None
    assert (await store.find_idempotent("cos_other", "k1")) == other_agent


async def test_join_key_collision_joins_until_the_key_is_cleared(store: Store) -> None:
    first = await insert(store, action(method="DELETE", join_key="j1"))
    joined = await insert(store, action(method="DELETE", join_key="j1"))
    assert joined.id == first.id
    assert (await store.find_joinable(first.agent, "j1")) == first
    async with store.transaction() as tx:
        assert await tx.update_action(
            first.id, ("awaiting_approval",), {"status": "rejected", "join_key": None}
        )
    assert await store.find_joinable(first.agent, "j1") is None
    fresh = await insert(store, action(method="DELETE", join_key="j1"))
    assert fresh.id != first.id


async def test_concurrent_inserts_with_one_key_make_one_action(
    store: Store, replica: Store
) -> None:
    records = [action(idempotency_key="race") for _ in range(10)]
    results = await asyncio.gather(
        *(insert(store if i % 2 else replica, r) for i, r in enumerate(records))
    )
    assert len({r.id for r in results}) == 1
    page, _ = await store.list_actions(ActionFilter(limit=50))
    assert len(page) == 1


async def test_update_is_conditional_on_status(store: Store) -> None:
    record = await insert(store, action())
    async with store.transaction() as tx:
        assert not await tx.update_action(record.id, ("pending",), {"status": "completed"})
        assert not await tx.update_action("act_missing", ("awaiting_approval",), {"attempts": 1})
        assert await tx.update_action(
            record.id,
            ("awaiting_approval", "pending"),
            {"status": "pending", "modified_params": {"amount": "10"}, "lease_until": 5.5},
        )
    stored = await store.get_action(record.id)
    assert stored is not None
    assert (stored.status, stored.modified_params, stored.lease_until) == (
        "pending",
        {"amount": "10"},
        5.5,
    )


async def test_a_failed_transaction_changes_nothing(store: Store) -> None:
    record = await insert(store, action())
    with pytest.raises(RuntimeError):
        async with store.transaction() as tx:
            await tx.update_action(record.id, ("awaiting_approval",), {"status": "pending"})
            await tx.add_event(EventRecord(record.id, 1.0, "pending", {}))
            await tx.enqueue("mail", record.id, {"to": "a@example.com"})
            raise RuntimeError("boom")
    assert (await store.get_action(record.id)) == record
    assert await store.events(record.id) == []
    assert await store.outbox(record.id) == []


async def test_racing_read_check_update_has_one_winner(store: Store, replica: Store) -> None:
    record = await insert(store, action())

    async def approve(s: Store, to: str) -> bool:
        async with s.transaction() as tx:
            current = await tx.get_action(record.id)
            assert current is not None
            if current.status != "awaiting_approval":
                return False
            await asyncio.sleep(0.1)  # both would read "awaiting_approval" without the lock
            return await tx.update_action(record.id, ("awaiting_approval",), {"status": to})

    results = await asyncio.gather(approve(store, "pending"), approve(replica, "rejected"))
    assert sorted(results) == [False, True]
    stored = await store.get_action(record.id)
    assert stored is not None
    assert stored.status == ("pending" if results[0] else "rejected")


async def test_racing_quorum_decisions_see_each_other(store: Store, replica: Store) -> None:
    """Two reviewers of a two-approval action decide at once: the second sees the first."""
    record = await insert(store, action(approvals_required=2))

    async def approve(s: Store, reviewer: str) -> bool:
        async with s.transaction() as tx:
            current = await tx.get_action(record.id)  # locks: the deciders take turns
            assert current is not None and current.status == "awaiting_approval"
            await tx.insert_decision(
                DecisionRecord(record.id, reviewer, "approve", None, "api", 1, None)
            )
            await asyncio.sleep(0.1)
            if len(await tx.decisions(record.id)) < current.approvals_required:
                return False
            return await tx.update_action(record.id, ("awaiting_approval",), {"status": "pending"})

    results = await asyncio.gather(approve(store, "a@x.com"), approve(replica, "b@x.com"))
    assert sorted(results) == [False, True]
    stored = await store.get_action(record.id)
    assert stored is not None and stored.status == "pending"


async def test_blind_conditional_updates_have_one_winner(store: Store, replica: Store) -> None:
    record = await insert(store, action())

    async def move(s: Store) -> bool:
        async with s.transaction() as tx:
            return await tx.update_action(record.id, ("awaiting_approval",), {"status": "pending"})

    results = await asyncio.gather(*(move(store if i % 2 else replica) for i in range(8)))
    assert results.count(True) == 1


# -- decisions and events -----------------------------------------------------------------


async def test_one_decision_per_reviewer_oldest_first(store: Store) -> None:
    record = await insert(store, action(approvals_required=2))
    first = DecisionRecord(record.id, "a@example.com", "approve", "ok", "api", 10, None)
    second = DecisionRecord(record.id, "b@example.com", "reject", None, "email", 10, {"x": "1"})
    async with store.transaction() as tx:
        assert await tx.insert_decision(first)
        assert not await tx.insert_decision(dataclasses.replace(first, decision="reject"))
        assert await tx.insert_decision(second)
        assert await tx.decisions(record.id) == [first, second]
    assert await store.decisions(record.id) == [first, second]
    assert await store.decisions("act_missing") == []


async def test_events_keep_their_order_and_data(store: Store) -> None:
    record = await insert(store, action())
    async with store.transaction() as tx:
        await tx.add_event(EventRecord(record.id, 3.0, "held", {"rule": "refunds"}))
        await tx.add_event(EventRecord(record.id, 2.0, "decision", {"note": None, "n": [1, 2]}))
    await store.add_event(EventRecord(record.id, 1.5, "forward_attempt", {"latency_ms": 12.5}))
    await store.add_event(EventRecord("act_other", 1.0, "held", {}))
    events = await store.events(record.id)
    assert [(e.kind, e.ts, e.data) for e in events] == [
        ("held", 3.0, {"rule": "refunds"}),
        ("decision", 2.0, {"note": None, "n": [1, 2]}),
        ("forward_attempt", 1.5, {"latency_ms": 12.5}),
    ]


# -- listing and workers' queries ---------------------------------------------------------


async def test_list_pages_newest_first_with_filters(store: Store) -> None:
    made = []
    for i in range(7):
        made.append(
            await insert(
                store,
                action(
                    created=1000 + i // 2,  # ties on created are broken by id
                    status="pending" if i % 3 == 0 else "awaiting_approval",
                    agent="agent_a" if i % 2 else "agent_b",
                    rule="payouts" if i == 4 else "refunds",
                ),
            )
        )
    newest_first = sorted(made, key=lambda a: (a.created, a.id), reverse=True)
    seen: list[str] = []
    after = None
    while True:
        page, more = await store.list_actions(ActionFilter(limit=3, starting_after=after))
        seen += [a.id for a in page]
        if not more:
            break
        after = page[-1].id
    assert seen == [a.id for a in newest_first]
    pending, more = await store.list_actions(ActionFilter(status="pending", limit=10))
    assert [a.id for a in pending] == [a.id for a in newest_first if a.status == "pending"]
    assert not more
    by_agent, _ = await store.list_actions(ActionFilter(agent="agent_a", rule="refunds"))
    assert [a.id for a in by_agent] == [
        a.id for a in newest_first if a.agent == "agent_a" and a.rule == "refunds"
    ]
    exact, more = await store.list_actions(ActionFilter(limit=7))
    assert len(exact) == 7 and not more
    assert await store.list_actions(ActionFilter(starting_after="act_missing")) == ([], False)


async def test_list_is_newest_first_by_insertion_within_one_second(store: Store) -> None:
    # Random ids do not sort by time: actions made in the same second list as inserted.
    ids = ["act_zzz", "act_aaa", "act_mmm", "act_bbb"]
    for action_id in ids:
        await insert(store, action(id=action_id, created=1_800_000_000))
    page, more = await store.list_actions(ActionFilter(limit=2))
    rest, _ = await store.list_actions(ActionFilter(limit=10, starting_after=page[-1].id))
    assert [a.id for a in page + rest] == list(reversed(ids)) and more


async def test_due_expiries_are_undecided_actions_past_their_time(store: Store) -> None:
    due = await insert(store, action(expires_at=100))
    await insert(store, action(expires_at=100, status="rejected"))
    await insert(store, action(expires_at=200))
    assert await store.due_expiries(150.5, 10) == [due.id]
    assert len(await store.due_expiries(200.0, 10)) == 2
    assert len(await store.due_expiries(200.0, 1)) == 1


async def test_claimable_forwards_skip_live_leases(store: Store) -> None:
    free = await insert(store, action(status="pending", updated=3.0))
    lapsed = await insert(store, action(status="pending", updated=1.0, lease_until=50.0))
    await insert(store, action(status="pending", updated=2.0, lease_until=150.0))
    await insert(store, action(status="completed"))
    await insert(store, action(status="awaiting_approval"))
    assert await store.claimable_forwards(100.0, 10) == [lapsed.id, free.id]
    assert await store.claimable_forwards(100.0, 1) == [lapsed.id]
    assert len(await store.claimable_forwards(151.0, 10)) == 3


# -- receipts -----------------------------------------------------------------------------


async def test_request_receipts_newest_first(store: Store) -> None:
    receipts = [
        RequestReceipt(f"req_{i}", 10.0 + i, "agent", "GET", "/v1/charges", "r", "allow", 200, 1.5)
        for i in range(4)
    ]
    receipts.append(
        RequestReceipt("req_x", 5.0, "a", "POST", "/v1/refunds", "r", "hold", 202, 2.0, "act_1")
    )
    for receipt in receipts:
        await store.record_request(receipt)
    assert await store.requests(3) == receipts[3::-1][:3]
    assert (await store.requests(10))[-1] == receipts[-1]


# -- outbox -------------------------------------------------------------------------------


async def test_outbox_claims_lease_and_finish(store: Store, clock: Clock) -> None:
    record = await insert(store, action())
    clock.now = 100.0
    async with store.transaction() as tx:
        await tx.enqueue("mail", record.id, {"to": "a@example.com"})
        await tx.enqueue("mail", record.id, {"to": "b@example.com"})
        await tx.enqueue("callback", record.id, {"url": "http://127.0.0.1:9/"})
    assert await store.claim_outbox("mail", 99.0, 30, 10) == []  # not due yet
    claimed = await store.claim_outbox("mail", 100.0, 30, 10)
    assert [i.payload for i in claimed] == [{"to": "a@example.com"}, {"to": "b@example.com"}]
    assert {(i.kind, i.status, i.attempts, i.action_id) for i in claimed} == {
        ("mail", "pending", 0, record.id)
    }
    assert await store.claim_outbox("mail", 110.0, 30, 10) == []  # leased
    a, b = claimed
    await store.finish_outbox(a.id, status="sent", attempts=1, next_attempt_at=110, last_error=None)
    await store.finish_outbox(
        b.id, status="pending", attempts=1, next_attempt_at=200, last_error="421 try later"
    )
    assert await store.claim_outbox("mail", 150.0, 30, 10) == []  # b retries at 200
    again = await store.claim_outbox("mail", 200.0, 30, 10)
    assert [(i.id, i.attempts, i.last_error) for i in again] == [(b.id, 1, "421 try later")]
    # A lease that ran out (the sender died) makes the item claimable again.
    assert [i.id for i in await store.claim_outbox("mail", 231.0, 30, 10)] == [b.id]
    callbacks = await store.claim_outbox("callback", 300.0, 30, 10)
    assert [i.payload for i in callbacks] == [{"url": "http://127.0.0.1:9/"}]
    items = await store.outbox(record.id)
    assert [(i.kind, i.status) for i in items] == [
        ("mail", "sent"),
        ("mail", "pending"),
        ("callback", "pending"),
    ]
    assert await store.outbox("act_missing") == []


async def test_concurrent_claimers_never_share_an_item(
    store: Store, replica: Store, clock: Clock
) -> None:
    record = await insert(store, action())
    clock.now = 1.0
    async with store.transaction() as tx:
        for n in range(40):
            await tx.enqueue("mail", record.id, {"n": n})

    async def claim(s: Store) -> list[int]:
        got: list[int] = []
        for _ in range(6):
            got += [i.id for i in await s.claim_outbox("mail", 10.0, 60, 4)]
            await asyncio.sleep(0)
        return got

    results = await asyncio.gather(claim(store), claim(replica), claim(store), claim(replica))
    everything = [i for r in results for i in r]
    assert len(everything) == len(set(everything)) == 40


async def test_counts_for_metrics(store: Store) -> None:
    a = await insert(store, action())
    await insert(store, action())
    await insert(store, action(status="completed"))
    async with store.transaction() as tx:
        await tx.enqueue("mail", a.id, {"to": "x@example.com"})
        await tx.enqueue("mail", a.id, {"to": "y@example.com"})
        await tx.enqueue("callback", a.id, {"url": "http://127.0.0.1:9/"})
    assert await store.count_by_status() == {"awaiting_approval": 2, "completed": 1}
    (item, *_) = await store.claim_outbox("mail", 1e12, 30, 1)
    await store.finish_outbox(
        item.id, status="failed", attempts=5, next_attempt_at=0, last_error="x"
    )
    stats = {(s.kind, s.status): (s.items, s.with_error) for s in await store.outbox_stats()}
    assert stats == {
        ("mail", "failed"): (1, 1),
        ("mail", "pending"): (1, 0),
        ("callback", "pending"): (1, 0),
    }


# -- agent keys ---------------------------------------------------------------------------


async def test_agent_keys_create_revoke_reissue(store: Store) -> None:
    key = AgentKeyRecord("billing-bot", "a" * 64, "cos_", "abcd", 100, b"\x00sealed")
    assert await store.create_agent_key(key)
    assert not await store.create_agent_key(dataclasses.replace(key, key_hash="b" * 64))
    assert await store.agent_key_by_hash("a" * 64) == key
    assert await store.agent_key_by_hash("b" * 64) is None
    other = AgentKeyRecord("Zed", "c" * 64, "cos_", "wxyz", 101)
    assert await store.create_agent_key(other)
    assert [k.name for k in await store.list_agent_keys()] == ["Zed", "billing-bot"]  # bytewise
    assert await store.revoke_agent_key("billing-bot", 200)
    assert not await store.revoke_agent_key("billing-bot", 201)
    assert not await store.revoke_agent_key("nobody", 201)
    revoked = await store.agent_key_by_hash("a" * 64)
    assert revoked is not None and revoked.revoked_at == 200
    reissued = dataclasses.replace(key, key_hash="d" * 64, created=300, stripe_key_sealed=None)
    assert await store.create_agent_key(reissued)  # a revoked name may be issued again
    assert await store.agent_key_by_hash("a" * 64) is None
    assert await store.agent_key_by_hash("d" * 64) == reissued
    assert await store.set_agent_stripe_key("Zed", b"resealed")
    assert not await store.set_agent_stripe_key("nobody", b"x")
    zed = await store.agent_key_by_hash("c" * 64)
    assert zed is not None and zed.stripe_key_sealed == b"resealed"


# -- budgets ------------------------------------------------------------------------------


async def test_budget_reservations_count_the_window(store: Store) -> None:
    ok, tally = await store.reserve_budget(
        "small", "agent:a", 0.0, count_max=2, sum_max=None, amount=500, ts=10.0, ref="r1"
    )
    assert ok and (tally.count, tally.total) == (0, 0)
    ok, tally = await store.reserve_budget(
        "small", "agent:a", 0.0, count_max=2, sum_max=1000, amount=600, ts=11.0, ref="r2"
    )
    assert not ok and (tally.count, tally.total) == (1, 500)
    ok, _ = await store.reserve_budget(
        "small", "agent:b", 0.0, count_max=2, sum_max=1000, amount=600, ts=11.0, ref="r3"
    )
    assert ok
    usage = await store.budget_usage("small", 0.0)
    assert {k: (t.count, t.total) for k, t in usage.items()} == {
        "agent:a": (1, 500),
        "agent:b": (1, 600),
    }
    assert await store.budget_usage("small", 10.5, "agent:a") == {}  # outside the window


async def test_racing_reservations_never_overspend(store: Store, replica: Store) -> None:
    async def reserve(s: Store, n: int) -> bool:
        ok, _ = await s.reserve_budget(
            "cap", "global", 0.0, count_max=3, sum_max=None, amount=1, ts=5.0, ref=f"r{n}"
        )
        return ok

    results = await asyncio.gather(*(reserve(store if n % 2 else replica, n) for n in range(10)))
    assert results.count(True) == 3
    assert (await store.budget_usage("cap", 0.0))["global"].count == 3


# -- lifecycle ----------------------------------------------------------------------------


async def test_migrations_run_once_however_often_and_concurrently_opened(
    store_url: str, clock: Clock
) -> None:
    stores = [store_from_url(store_url, clock=clock) for _ in range(3)]
    await asyncio.gather(*(s.open() for s in stores))  # replicas starting together
    try:
        record = await insert(stores[0], action())
        await stores[1].close()
        await stores[1].open()  # reopening an up-to-date database changes nothing
        assert await stores[1].get_action(record.id) == record
        await stores[2].ping()
    finally:
        for s in stores:
            await s.close()


async def test_closed_store_refuses_work(store_url: str) -> None:
    s = store_from_url(store_url)
    await s.open()
    await s.ping()
    await s.close()
    with pytest.raises(AssertionError):
        await s.ping()


async def test_status_changes_reach_subscribers_of_every_replica(postgres_url: str) -> None:
    writer, listener = store_from_url(postgres_url), store_from_url(postgres_url)
    await writer.open()
    await listener.open()
    heard: list[str] = []
    arrived = asyncio.Event()

    def on_change(action_id: str) -> None:
        heard.append(action_id)
        arrived.set()

    try:
        await listener.subscribe(on_change)
        record = await insert(writer, action())
        async with writer.transaction() as tx:  # no status change: no wake-up
            await tx.update_action(record.id, ("awaiting_approval",), {"attempts": 1})
        with pytest.raises(RuntimeError):  # rolled back: no wake-up
            async with writer.transaction() as tx:
                await tx.update_action(record.id, ("awaiting_approval",), {"status": "expired"})
                raise RuntimeError("boom")
        async with writer.transaction() as tx:
            await tx.update_action(record.id, ("awaiting_approval",), {"status": "pending"})
        await asyncio.wait_for(arrived.wait(), 10)
        await asyncio.sleep(0.2)  # anything else in flight would have arrived by now
        assert heard == [record.id]
    finally:
        await writer.close()
        await listener.close()


async def test_wake_ups_resume_after_the_listen_connection_drops(postgres_url: str) -> None:
    writer, listener = store_from_url(postgres_url), store_from_url(postgres_url)
    await writer.open()
    await listener.open()
    heard: list[str] = []
    try:
        await listener.subscribe(heard.append)
        # The database goes away under the LISTEN connection (a failover, an admin's kill).
        killed = await writer_fetch(
            writer,
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
            " WHERE datname = current_database() AND query LIKE 'LISTEN%'",
        )
        assert killed == [True]
        deadline = asyncio.get_running_loop().time() + 15
        while True:  # changes made while it reconnects may be missed; later ones arrive
            record = await insert(writer, action())
            async with writer.transaction() as tx:
                await tx.update_action(record.id, ("awaiting_approval",), {"status": "pending"})
            await asyncio.sleep(0.3)
            if record.id in heard or asyncio.get_running_loop().time() > deadline:
                break
        assert record.id in heard
    finally:
        await writer.close()
        await listener.close()


async def writer_fetch(store: Store, sql: str) -> list[Any]:
    """One column of a raw query on the PostgreSQL store's pool."""
    from gateway.store.postgres import PostgresStore

    assert isinstance(store, PostgresStore)
    return [r[0] for r in await store._p.fetch(sql)]


def test_every_migration_exists_for_both_stores() -> None:
    from gateway.store.sqlite import migrations

    sqlite, postgres = migrations("sqlite"), migrations("postgres")
    assert [v for v, _ in sqlite] == [v for v, _ in postgres]
    assert len({v for v, _ in sqlite}) == len(sqlite)


def test_store_is_chosen_by_url(tmp_path: Path) -> None:
    from gateway.store.postgres import PostgresStore

    assert isinstance(store_from_url(f"sqlite:///{tmp_path / 'x.db'}"), SqliteStore)
    assert isinstance(store_from_url("postgresql://u@127.0.0.1/db"), PostgresStore)
    assert isinstance(store_from_url("postgres://u@127.0.0.1/db"), PostgresStore)
    with pytest.raises(ValueError, match="COSIGNER_DATABASE"):
        store_from_url("mysql://u@127.0.0.1/db")


# -- group commit (SQLite) ----------------------------------------------------------------


async def _sqlite(tmp_path: Path) -> SqliteStore:
    store = SqliteStore(tmp_path / "group.db")
    await store.open()
    return store


async def _assert_durable(tmp_path: Path, records: list[ActionRecord]) -> None:
    """A fresh connection (another process's view) sees every one of ``records``."""
    other = await _sqlite(tmp_path)
    try:
        for record in records:
            assert await other.get_action(record.id) is not None
    finally:
        await other.close()


async def _traced(store: SqliteStore) -> list[str]:
    """Every statement the writer connection runs from now on (until _untraced)."""
    statements: list[str] = []
    assert store._w._conn is not None
    await store._w.call(lambda conn: conn.set_trace_callback(statements.append))
    return statements


async def _untraced(store: SqliteStore) -> None:
    await store._w.call(lambda conn: conn.set_trace_callback(None))


async def _requests_seen_elsewhere(tmp_path: Path) -> list[RequestReceipt]:
    """The receipts a fresh connection (another process's view) reads."""
    other = await _sqlite(tmp_path)
    try:
        return await other.requests(1000)
    finally:
        await other.close()


async def test_group_commit_makes_every_transaction_durable_with_fewer_commits(
    tmp_path: Path,
) -> None:
    store = await _sqlite(tmp_path)
    try:
        records = [action() for _ in range(200)]
        before = store.commits
        await asyncio.gather(*(insert(store, r) for r in records))
        used = store.commits - before
        assert 1 <= used < 200
        # Every insert is committed by the time its transaction returned.
        await _assert_durable(tmp_path, records)
    finally:
        await store.close()


async def test_a_failing_transaction_in_a_batch_leaves_the_others_alone(tmp_path: Path) -> None:
    store = await _sqlite(tmp_path)
    good = [action() for _ in range(20)]
    bad = action()

    async def fail() -> None:
        async with store.transaction() as tx:
            await tx.insert_action(bad)
            raise RuntimeError("boom")

    try:
        results = await asyncio.gather(
            *(insert(store, r) for r in good[:10]),
            fail(),
            *(insert(store, r) for r in good[10:]),
            return_exceptions=True,
        )
        assert [type(r) for r in results].count(RuntimeError) == 1
        assert await store.get_action(bad.id) is None
        for record in good:
            assert await store.get_action(record.id) is not None
    finally:
        await store.close()


async def test_a_cancelled_joiner_never_strands_the_batch(tmp_path: Path) -> None:
    store = await _sqlite(tmp_path)
    first, second = action(), action()
    try:
        entered = asyncio.Event()
        release = asyncio.Event()

        async def slow() -> None:
            async with store.transaction() as tx:
                await tx.insert_action(first)
                entered.set()
                await release.wait()

        holder = asyncio.create_task(slow())
        await entered.wait()
        joiner = asyncio.create_task(insert(store, second))
        await asyncio.sleep(0.05)  # the joiner is queued for the lock
        release.set()
        # The holder sees the joiner queued, leaves the commit to it and hands it the lock;
        # the joiner is cancelled before it runs. The batch must still be committed.
        for _ in range(10_000):
            if not store._lock.locked():
                break
            await asyncio.sleep(0)
        assert not store._lock.locked() and not holder.done()
        joiner.cancel()
        await asyncio.wait_for(holder, 10)  # returns only once its insert is committed
        assert await store.get_action(first.id) is not None
        with pytest.raises(asyncio.CancelledError):
            await joiner
    finally:
        await store.close()


async def test_a_failing_deferred_statement_fails_only_its_own_transaction(
    tmp_path: Path,
) -> None:
    # Events, outbox items and receipts are deferred to the transaction's last trip to the
    # writer thread; when one of them fails there, its transaction is still rolled back whole.
    store = await _sqlite(tmp_path)
    good = [action() for _ in range(10)]
    bad = action()

    async def fail_late() -> None:
        async with store.transaction() as tx:
            await tx.insert_action(bad)
            tx.defer("INSERT INTO no_such_table VALUES (1)")

    try:
        results = await asyncio.gather(
            *(insert(store, r) for r in good[:5]),
            fail_late(),
            *(insert(store, r) for r in good[5:]),
            return_exceptions=True,
        )
        errors = [r for r in results if isinstance(r, BaseException)]
        assert len(errors) == 1 and "no_such_table" in str(errors[0])
        assert await store.get_action(bad.id) is None
        for record in good:
            assert await store.get_action(record.id) is not None
        await insert(store, action())  # and the store goes on
    finally:
        await store.close()


async def test_an_action_without_keys_is_written_with_the_last_trip(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # No Idempotency-Key and no join key: nothing to collide with, so the hold needs no
    # answer from its INSERT and the whole transaction is one trip to the writer thread.
    store = await _sqlite(tmp_path)
    trips: list[object] = []
    submit = store._w.submit
    monkeypatch.setattr(store._w, "submit", lambda step: trips.append(step) or submit(step))
    try:
        first = action()
        async with store.transaction() as tx:
            assert await tx.insert_action(first) is first
            await tx.add_event(EventRecord(first.id, 1.0, "held", {}))
        assert len(trips) == 1
        assert await store.get_action(first.id) == first
        # Its id taken after all: the transaction fails whole, the first action is untouched.
        with pytest.raises(sqlite3.IntegrityError):
            async with store.transaction() as tx:
                await tx.insert_action(action(id=first.id, summary="another"))
                await tx.add_event(EventRecord(first.id, 2.0, "held again", {}))
        assert await store.get_action(first.id) == first
        assert [e.kind for e in await store.events(first.id)] == ["held"]
    finally:
        await store.close()


async def test_a_failed_commit_fails_every_member_and_the_store_recovers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_commit = sqlite_store._commit
    failures = [sqlite3.OperationalError("disk I/O error")]

    def failing_commit(conn: sqlite3.Connection) -> Exception | None:
        if not failures:
            return real_commit(conn)
        conn.rollback()  # what SQLite leaves after a failed COMMIT: nothing of the batch
        return failures.pop()

    monkeypatch.setattr(sqlite_store, "_commit", failing_commit)
    store = await _sqlite(tmp_path)
    try:
        lost = [action() for _ in range(8)]
        results = await asyncio.gather(*(insert(store, r) for r in lost), return_exceptions=True)
        # Whoever was in the failed batch hears about it; nothing of it is in the file.
        failed = [r for r in results if isinstance(r, sqlite3.OperationalError)]
        assert failed and all("disk I/O error" in str(r) for r in failed)
        for record, result in zip(lost, results, strict=True):
            found = await store.get_action(record.id)
            assert (found is None) == isinstance(result, BaseException)
        later = action()
        await insert(store, later)
        assert await store.get_action(later.id) is not None
    finally:
        await store.close()


async def test_transactions_that_come_during_a_commit_join_the_next_batch(
    tmp_path: Path,
) -> None:
    store = await _sqlite(tmp_path)
    try:
        first = [action() for _ in range(50)]
        second = [action() for _ in range(50)]
        before = store.commits
        one = asyncio.gather(*(insert(store, r) for r in first))
        await asyncio.sleep(0)  # the first wave is queued; the second comes while it commits
        two = asyncio.gather(*(insert(store, r) for r in second))
        await asyncio.gather(one, two)
        assert 1 <= store.commits - before < 100
        await _assert_durable(tmp_path, first + second)
    finally:
        await store.close()


async def test_receipts_written_together_are_each_durable(tmp_path: Path) -> None:
    store = await _sqlite(tmp_path)
    try:
        receipts = [
            RequestReceipt(
                f"req_{i:04d}", 100.0 + i, "a", "POST", "/v1/refunds", "r", "allow", 200, 1
            )
            for i in range(300)
        ]
        before = store.commits
        statements = await _traced(store)
        await asyncio.gather(*(store.record_request(r) for r in receipts))
        assert store.commits - before < 300  # many receipts per commit
        # All 300 were queued at once: one INSERT per MAX_RECEIPT_ROWS of them.
        inserts = [s for s in statements if s.startswith("INSERT INTO requests")]
        assert len(inserts) == -(-300 // sqlite_store.MAX_RECEIPT_ROWS)
        await _untraced(store)
        assert sorted(await _requests_seen_elsewhere(tmp_path), key=lambda r: r.id) == receipts
        # A receipt that cannot be written fails the callers in its batch, loudly...
        results = await asyncio.gather(
            store.record_request(receipts[0]),  # the same id again
            return_exceptions=True,
        )
        assert isinstance(results[0], Exception) and "UNIQUE" in str(results[0])
        # ...and the next ones are written as usual.
        extra = receipts[0]._replace(id="req_extra")
        await store.record_request(extra)
        assert extra in await store.requests(1000)
    finally:
        await store.close()


async def test_receipts_come_back_exactly_as_written(tmp_path: Path) -> None:
    # SQLite receipts go in as one multi-row INSERT per batch: floats, None and any text
    # must come back bit for bit.
    store = await _sqlite(tmp_path)
    try:
        now = time.time()
        receipts = [
            RequestReceipt(
                f"req_{i:03d}",
                now + i / 7,
                'sk_test_…a9Zé☃"\\',
                "POST",
                "/v1/refunds",
                "rule \u2028 with ' quotes",
                "allow",
                200 + i,
                round(i / 3, 2),
                None if i % 2 else f"act_{i}",
            )
            for i in range(50)
        ]
        await asyncio.gather(*(store.record_request(r) for r in receipts))
        assert sorted(await store.requests(100), key=lambda r: r.id) == receipts
    finally:
        await store.close()


async def test_a_cancelled_receipt_writer_leaves_its_batch_alone(tmp_path: Path) -> None:
    store = await _sqlite(tmp_path)
    try:
        receipts = [
            RequestReceipt(f"req_{i}", 1.0 + i, "a", "POST", "/v1/refunds", "r", "allow", 200, 1)
            for i in range(20)
        ]
        tasks = [asyncio.ensure_future(store.record_request(r)) for r in receipts]
        await asyncio.sleep(0)  # every one queued
        tasks[3].cancel()
        results = await asyncio.gather(*tasks, return_exceptions=True)
        assert isinstance(results[3], asyncio.CancelledError)
        assert all(r is None for n, r in enumerate(results) if n != 3)
        # Its receipt was in the batch all the same: a cancelled caller stops waiting only.
        assert sorted(await store.requests(100), key=lambda r: r.id) == sorted(
            receipts, key=lambda r: r.id
        )
    finally:
        await store.close()


async def test_receipts_alone_commit_in_one_statement_and_join_an_open_batch(
    tmp_path: Path,
) -> None:
    store = await _sqlite(tmp_path)
    try:
        statements = await _traced(store)
        receipt = RequestReceipt("req_1", 1.0, "a", "POST", "/v1/refunds", "r", "allow", 200, 1)
        await store.record_request(receipt)
        # Alone, the batch is SQLite's own transaction of its one INSERT: no BEGIN, no COMMIT.
        assert [s.split()[0] for s in statements] == ["INSERT"]
        assert await _requests_seen_elsewhere(tmp_path) == [receipt]  # committed, durable

        # With a logical transaction open, receipts join its batch and its COMMIT.
        statements.clear()
        entered, release = asyncio.Event(), asyncio.Event()
        held = action()

        async def slow() -> None:
            async with store.transaction() as tx:
                await tx.insert_action(held)
                entered.set()
                await release.wait()

        holder = asyncio.create_task(slow())
        await entered.wait()
        second = receipt._replace(id="req_2")
        writing = asyncio.create_task(store.record_request(second))
        await asyncio.sleep(0.05)
        assert not writing.done()  # waits for the batch it joined
        release.set()
        await asyncio.wait_for(asyncio.gather(holder, writing), 10)
        words = [s.split()[0] for s in statements]
        assert words.count("BEGIN") == 1 and words.count("COMMIT") == 1
        assert words.index("BEGIN") < words.index("INSERT") and words[-1] == "COMMIT"
        assert second in await store.requests(10)
    finally:
        await store.close()


async def test_closing_leaves_no_transaction_waiting_for_its_commit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_commit = sqlite_store._commit

    def slow_commit(conn: sqlite3.Connection) -> Exception | None:
        time.sleep(0.05)  # a slow disk: batches pile up behind the COMMIT on its way
        return real_commit(conn)

    monkeypatch.setattr(sqlite_store, "_commit", slow_commit)
    store = await _sqlite(tmp_path)
    # With an Idempotency-Key each insert waits for its answer: a trip under the lock.
    records = [action(idempotency_key=f"key-{i}") for i in range(30)]

    first = asyncio.gather(*(insert(store, r) for r in records))
    while not store._lock.locked():
        await asyncio.sleep(0)  # they have started
    while store._lock.locked() or store._queued:
        await asyncio.sleep(0.001)  # every insert has queued its last trip
    # The first batch's COMMIT is on its way. Writes that need no answer (timeline events)
    # queue their one trip behind it, and leave their batch open for it to finish.
    events = [EventRecord(r.id, 1.0, "note", {"n": i}) for i, r in enumerate(records)]
    second = asyncio.gather(*(store.add_event(e) for e in events))
    await asyncio.sleep(0)
    assert store._batch is not None and store._committing
    # Closing commits it; nobody is left waiting.
    await store.close()
    await asyncio.wait_for(asyncio.gather(first, second), 10)
    store = await _sqlite(tmp_path)
    try:
        for record, event in zip(records, events, strict=True):
            assert await store.get_action(record.id) is not None
            assert event in await store.events(record.id)
    finally:
        await store.close()


@pytest.mark.parametrize("trip", ["last", "with an answer"])
async def test_a_batch_sqlite_rolls_back_whole_fails_every_member(
    tmp_path: Path, trip: str
) -> None:
    # An I/O error or a full disk can make SQLite roll back the whole transaction, not just
    # one statement: then nobody in the batch may hear "committed". (Here a deferred ROLLBACK
    # plays that part.) Whatever succeeded is on disk; whatever is not, failed.
    store = await _sqlite(tmp_path)
    records = [action() for _ in range(20)]

    async def lose_the_batch() -> None:
        async with store.transaction() as tx:
            await tx.insert_action(action())
            tx.defer("ROLLBACK")
            if trip == "last":
                tx.defer("INSERT INTO no_such_table VALUES (1)")
            else:
                await tx.rows("SELECT * FROM no_such_table")

    try:
        results = await asyncio.gather(
            *(insert(store, r) for r in records[:10]),
            lose_the_batch(),
            *(insert(store, r) for r in records[10:]),
            return_exceptions=True,
        )
        outcomes = results[:10] + results[11:]
        assert isinstance(results[10], sqlite3.OperationalError)
        assert any(isinstance(r, BaseException) for r in outcomes)  # its batch went with it
        other = await _sqlite(tmp_path)
        try:
            for record, result in zip(records, outcomes, strict=True):
                on_disk = await other.get_action(record.id) is not None
                assert on_disk == (not isinstance(result, BaseException))
        finally:
            await other.close()
        later = action()
        await insert(store, later)  # and the store goes on
        assert await store.get_action(later.id) is not None
    finally:
        await store.close()


async def test_the_writer_thread_runs_jobs_in_order_and_stops_when_closed(
    tmp_path: Path,
) -> None:
    writer = sqlite_store.Writer()
    await writer.open(str(tmp_path / "w.db"))
    thread = writer._thread
    assert thread is not None and thread.name == "cosigner-sqlite"
    assert thread is not threading.current_thread()
    order: list[int] = []
    futures = [writer.submit(lambda conn, n=n: order.append(n) or n) for n in range(50)]
    assert await asyncio.gather(*futures) == list(range(50)) == order
    # A failing step fails its own caller with its own exception, and the next one runs.
    with pytest.raises(sqlite3.OperationalError, match="no such table"):
        await writer.call(lambda conn: conn.execute("SELECT * FROM nowhere"))
    assert await writer.call(lambda conn: conn.execute("SELECT 41 + 1").fetchone()) == (42,)
    # A caller that stops waiting does not stop the step: it runs, in its turn.
    slow = asyncio.ensure_future(writer.call(lambda conn: time.sleep(0.05) or "done"))
    await asyncio.sleep(0.01)
    slow.cancel()
    assert await writer.call(lambda conn: "after") == "after"
    await writer.close()
    thread.join(timeout=5)
    assert not thread.is_alive()
