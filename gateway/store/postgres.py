"""The replica store: PostgreSQL through asyncpg, for several gateways behind one load balancer.

Any replica can take any step. Read-check-update runs inside one transaction
that locks the action row (``SELECT ... FOR UPDATE``), so two replicas
deciding or claiming the same action are serialised and the loser sees the
winner's result; outbox items are claimed with ``FOR UPDATE SKIP LOCKED``.
A status change sends ``NOTIFY cosigner_actions, '<id>'`` in the same
transaction; every replica LISTENs and wakes its own ``Cosigner-Wait``
waiters. Migrations run under an advisory lock, so replicas starting
together migrate once.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import fields
from typing import TYPE_CHECKING, Any, TypeAlias

import asyncpg

from gateway.jsontext import compact
from gateway.store.base import (
    ActionFilter,
    ActionRecord,
    AgentKeyRecord,
    BudgetTally,
    DecisionRecord,
    EventRecord,
    OutboxItem,
    OutboxStat,
    RequestReceipt,
)
from gateway.store.sqlite import migrations

log = logging.getLogger("cosigner.store")

CHANNEL = "cosigner_actions"
# Any fixed 64-bit number; it names the lock every replica takes to migrate.
MIGRATION_LOCK = 0x636F7369676E6572  # "cosigner"
LISTEN_HEALTH_INTERVAL = 30.0  # seconds between checks that the LISTEN connection is alive
RECONNECT_DELAY = 1.0
CLOSE_TIMEOUT = 10.0

ACTION_COLUMNS = tuple(f.name for f in fields(ActionRecord))
_ACTION_SELECT = "SELECT " + ", ".join(ACTION_COLUMNS) + " FROM actions"
_DECISION_SELECT = (
    "SELECT action_id, reviewer, decision, note, via, created, params FROM decisions"
    " WHERE action_id = $1 ORDER BY created, id"
)
_OUTBOX_COLUMNS = "id, kind, action_id, payload, attempts, next_attempt_at, status, last_error"
_AGENT_KEY_COLUMNS = "name, key_hash, prefix, last4, created, stripe_key_sealed, revoked_at"

if TYPE_CHECKING:  # asyncpg's classes are generic only in its stubs
    from asyncpg.pool import PoolConnectionProxy

    Connection: TypeAlias = asyncpg.Connection[asyncpg.Record] | PoolConnectionProxy[asyncpg.Record]
    Pool: TypeAlias = asyncpg.Pool[asyncpg.Record]


def _action(row: asyncpg.Record) -> ActionRecord:
    values = dict(row.items())
    values["body"] = bytes(values["body"])
    return ActionRecord(**values)


def _decision(row: asyncpg.Record) -> DecisionRecord:
    return DecisionRecord(**dict(row.items()))


def _outbox(row: asyncpg.Record) -> OutboxItem:
    return OutboxItem(**dict(row.items()))


def _agent_key(row: asyncpg.Record) -> AgentKeyRecord:
    values = dict(row.items())
    if values["stripe_key_sealed"] is not None:
        values["stripe_key_sealed"] = bytes(values["stripe_key_sealed"])
    return AgentKeyRecord(**values)


async def _init_connection(conn: Connection) -> None:
    """JSON columns travel as Python objects."""
    await conn.set_type_codec(
        "json",
        encoder=compact,
        decoder=json.loads,
        schema="pg_catalog",
    )


def _clean(value: Any) -> Any:
    """PostgreSQL text cannot hold NUL: store U+FFFD instead (JSON columns escape it)."""
    return value.replace("\x00", "\ufffd") if isinstance(value, str) else value


def _setter(event: asyncio.Event) -> Callable[[object], None]:
    return lambda _conn: event.set()


class PostgresTx:
    """Transaction primitives on one pooled connection inside ``BEGIN ... COMMIT``."""

    def __init__(self, conn: Connection, now: float) -> None:
        self._conn = conn
        self._now = now

    async def get_action(self, action_id: str) -> ActionRecord | None:
        # Locked until commit: the check-then-update that follows is atomic across replicas.
        row = await self._conn.fetchrow(_ACTION_SELECT + " WHERE id = $1 FOR UPDATE", action_id)
        return _action(row) if row else None

    async def insert_action(self, action: ActionRecord) -> ActionRecord:
        cols = ", ".join(ACTION_COLUMNS)
        marks = ", ".join(f"${i}" for i in range(1, len(ACTION_COLUMNS) + 1))
        # ON CONFLICT waits for a concurrent insert of the same key to commit, then yields.
        inserted = await self._conn.fetchval(
            f"INSERT INTO actions ({cols}) VALUES ({marks}) ON CONFLICT DO NOTHING RETURNING id",
            *(_clean(getattr(action, n)) for n in ACTION_COLUMNS),
        )
        if inserted is not None:
            return action
        existing = None
        if action.idempotency_key is not None:
            existing = await self._one(
                " WHERE agent = $1 AND idempotency_key = $2", action.agent, action.idempotency_key
            )
        if existing is None and action.join_key is not None:
            existing = await self._one(
                " WHERE agent = $1 AND join_key = $2", action.agent, action.join_key
            )
        if existing is None:
            raise RuntimeError(f"action {action.id} collided with nothing")
        return existing

    async def _one(self, where: str, *args: Any) -> ActionRecord | None:
        row = await self._conn.fetchrow(_ACTION_SELECT + where, *args)
        return _action(row) if row else None

    async def update_action(
        self, action_id: str, expect: Sequence[str], fields: Mapping[str, Any]
    ) -> bool:
        unknown = set(fields) - set(ACTION_COLUMNS)
        if unknown or not fields:
            raise ValueError(f"cannot update action columns {sorted(unknown) or 'none'}")
        names = list(fields)
        sets = ", ".join(f"{name} = ${i}" for i, name in enumerate(names, start=3))
        changed = await self._conn.fetchval(
            f"UPDATE actions SET {sets} WHERE id = $1 AND status = ANY($2::text[]) RETURNING id",
            action_id,
            list(expect),
            *(_clean(fields[n]) for n in names),
        )
        if changed is None:
            return False
        if "status" in fields:
            # Delivered to every replica's LISTEN connection when (and only if) this commits.
            await self._conn.execute("SELECT pg_notify($1, $2)", CHANNEL, action_id)
        return True

    async def insert_decision(self, decision: DecisionRecord) -> bool:
        inserted = await self._conn.fetchval(
            "INSERT INTO decisions (action_id, reviewer, decision, note, via, created, params)"
            " VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT DO NOTHING RETURNING id",
            decision.action_id,
            _clean(decision.reviewer),
            decision.decision,
            _clean(decision.note),
            decision.via,
            decision.created,
            decision.params,
        )
        return inserted is not None

    async def decisions(self, action_id: str) -> list[DecisionRecord]:
        return [_decision(r) for r in await self._conn.fetch(_DECISION_SELECT, action_id)]

    async def add_event(self, event: EventRecord) -> None:
        await _add_event(self._conn, event)

    async def enqueue(self, kind: str, action_id: str, payload: Mapping[str, Any]) -> None:
        await self._conn.execute(
            "INSERT INTO outbox (kind, action_id, payload, next_attempt_at)"
            " VALUES ($1, $2, $3, $4)",
            kind,
            action_id,
            dict(payload),
            self._now,
        )


async def _add_event(conn: Connection | Pool, event: EventRecord) -> None:
    await conn.execute(
        "INSERT INTO events (action_id, ts, kind, data) VALUES ($1, $2, $3, $4)",
        event.action_id,
        event.ts,
        event.kind,
        event.data,
    )


class PostgresStore:
    """Store backed by one PostgreSQL database shared by every replica."""

    def __init__(
        self,
        dsn: str,
        *,
        clock: Callable[[], float] | None = None,
        min_size: int = 1,
        max_size: int = 10,
    ) -> None:
        self._dsn = dsn
        self._clock = clock or time.time
        self._min_size = min_size
        self._max_size = max_size
        self._pool: Pool | None = None
        self._callbacks: list[Callable[[str], None]] = []
        self._listener: asyncio.Task[None] | None = None

    @classmethod
    def from_url(cls, url: str, **kwargs: Any) -> PostgresStore:
        """``postgresql://user:password@host:port/database`` (libpq URL syntax)."""
        return cls(url, **kwargs)

    @property
    def _p(self) -> Pool:
        assert self._pool is not None, "store is not open"
        return self._pool

    async def open(self) -> None:
        self._pool = await asyncpg.create_pool(
            self._dsn, min_size=self._min_size, max_size=self._max_size, init=_init_connection
        )
        try:
            await self._migrate()
        except BaseException:
            await self._pool.close()
            self._pool = None
            raise

    async def _migrate(self) -> None:
        async with self._p.acquire() as conn, conn.transaction():
            # Replicas starting together queue here; the first migrates, the rest find it done.
            await conn.execute("SELECT pg_advisory_xact_lock($1)", MIGRATION_LOCK)
            await conn.execute(
                "CREATE TABLE IF NOT EXISTS schema_migrations"
                " (version INTEGER PRIMARY KEY, applied DOUBLE PRECISION NOT NULL)"
            )
            done = {r["version"] for r in await conn.fetch("SELECT version FROM schema_migrations")}
            for version, script in migrations("postgres"):
                if version in done:
                    continue
                await conn.execute(script)
                await conn.execute(
                    "INSERT INTO schema_migrations VALUES ($1, $2)", version, self._clock()
                )
                log.info("database migrated to version %d", version)

    async def close(self) -> None:
        listener, self._listener = self._listener, None
        if listener is not None:
            listener.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await listener
        pool, self._pool = self._pool, None
        if pool is not None:
            try:
                await asyncio.wait_for(pool.close(), CLOSE_TIMEOUT)
            except TimeoutError:
                pool.terminate()

    # -- cross-replica wake-ups ----------------------------------------------------------

    async def subscribe(self, callback: Callable[[str], None]) -> None:
        """Call ``callback(action_id)`` whenever any replica changes an action's status."""
        self._callbacks.append(callback)
        if self._listener is None:
            ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._listener = asyncio.create_task(self._listen(ready), name="store-listen")
            await ready

    def _notified(self, conn: object, pid: int, channel: str, payload: object) -> None:
        for callback in self._callbacks:
            try:
                callback(str(payload))
            except Exception:
                log.exception("action change callback failed")

    async def _listen(self, ready: asyncio.Future[None]) -> None:
        """Hold one LISTEN connection, reconnecting if it drops."""
        while True:
            conn: Connection | None = None
            try:
                conn = await asyncpg.connect(self._dsn)
                lost = asyncio.Event()
                conn.add_termination_listener(_setter(lost))
                await conn.add_listener(CHANNEL, self._notified)
                if not ready.done():
                    ready.set_result(None)
                while not lost.is_set():
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(lost.wait(), LISTEN_HEALTH_INTERVAL)
                    if not lost.is_set():
                        await asyncio.wait_for(conn.fetchval("SELECT 1"), 10)
                log.warning("LISTEN connection to PostgreSQL lost; reconnecting")
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if not ready.done():
                    ready.set_exception(exc)
                    return
                log.warning("LISTEN connection to PostgreSQL failed (%s); reconnecting", exc)
            finally:
                if conn is not None and not conn.is_closed():
                    with contextlib.suppress(Exception):
                        await conn.close(timeout=5)
            await asyncio.sleep(RECONNECT_DELAY)

    # -- transactions --------------------------------------------------------------------

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[PostgresTx]:
        async with self._p.acquire() as conn, conn.transaction():
            yield PostgresTx(conn, self._clock())

    # -- reads and single writes ---------------------------------------------------------

    async def get_action(self, action_id: str) -> ActionRecord | None:
        row = await self._p.fetchrow(_ACTION_SELECT + " WHERE id = $1", action_id)
        return _action(row) if row else None

    async def find_idempotent(self, agent: str, key: str) -> ActionRecord | None:
        row = await self._p.fetchrow(
            _ACTION_SELECT + " WHERE agent = $1 AND idempotency_key = $2", agent, key
        )
        return _action(row) if row else None

    async def find_joinable(self, agent: str, join_key: str) -> ActionRecord | None:
        row = await self._p.fetchrow(
            _ACTION_SELECT + " WHERE agent = $1 AND join_key = $2", agent, join_key
        )
        return _action(row) if row else None

    async def list_actions(self, flt: ActionFilter) -> tuple[list[ActionRecord], bool]:
        where: list[str] = []
        args: list[Any] = []
        for column in ("status", "agent", "rule"):
            value = getattr(flt, column)
            if value:
                args.append(value)
                where.append(f"{column} = ${len(args)}")
        if flt.starting_after:
            # Keyset pagination on (created, seq): newest first, in insertion order.
            args.append(flt.starting_after)
            where.append(
                f"(created, seq) < (SELECT created, seq FROM actions WHERE id = ${len(args)})"
            )
        args.append(flt.limit + 1)
        sql = _ACTION_SELECT + (" WHERE " + " AND ".join(where) if where else "")
        sql += f" ORDER BY created DESC, seq DESC LIMIT ${len(args)}"
        rows = [_action(r) for r in await self._p.fetch(sql, *args)]
        return rows[: flt.limit], len(rows) > flt.limit

    async def decisions(self, action_id: str) -> list[DecisionRecord]:
        return [_decision(r) for r in await self._p.fetch(_DECISION_SELECT, action_id)]

    async def events(self, action_id: str) -> list[EventRecord]:
        rows = await self._p.fetch(
            "SELECT action_id, ts, kind, data FROM events WHERE action_id = $1 ORDER BY id",
            action_id,
        )
        return [EventRecord(r["action_id"], r["ts"], r["kind"], r["data"]) for r in rows]

    async def add_event(self, event: EventRecord) -> None:
        await _add_event(self._p, event)

    async def due_expiries(self, now: float, limit: int) -> list[str]:
        rows = await self._p.fetch(
            "SELECT id FROM actions WHERE status = 'awaiting_approval'"
            " AND expires_at <= $1::double precision LIMIT $2",
            now,
            limit,
        )
        return [r["id"] for r in rows]

    async def claimable_forwards(self, now: float, limit: int) -> list[str]:
        rows = await self._p.fetch(
            "SELECT id FROM actions WHERE status = 'pending'"
            " AND (lease_until IS NULL OR lease_until < $1) ORDER BY updated LIMIT $2",
            now,
            limit,
        )
        return [r["id"] for r in rows]

    async def record_request(self, receipt: RequestReceipt) -> None:
        await self._p.execute(
            "INSERT INTO requests (id, ts, agent, method, path, rule, decision, status,"
            " latency_ms, action_id) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)",
            receipt.id,
            receipt.ts,
            receipt.agent,
            receipt.method,
            _clean(receipt.path),
            receipt.rule,
            receipt.decision,
            receipt.status,
            receipt.latency_ms,
            receipt.action_id,
        )

    async def requests(self, limit: int) -> list[RequestReceipt]:
        rows = await self._p.fetch(
            "SELECT id, ts, agent, method, path, rule, decision, status, latency_ms, action_id"
            " FROM requests ORDER BY ts DESC LIMIT $1",
            limit,
        )
        return [RequestReceipt(**dict(r.items())) for r in rows]

    async def claim_outbox(
        self, kind: str, now: float, lease: float, limit: int
    ) -> list[OutboxItem]:
        # SKIP LOCKED: concurrent claimers on other replicas take other items, never these.
        rows = await self._p.fetch(
            f"UPDATE outbox SET lease_until = $4 WHERE id IN ("
            " SELECT id FROM outbox WHERE kind = $1 AND status = 'pending'"
            " AND next_attempt_at <= $2 AND (lease_until IS NULL OR lease_until < $2)"
            " ORDER BY next_attempt_at, id LIMIT $3 FOR UPDATE SKIP LOCKED)"
            f" RETURNING {_OUTBOX_COLUMNS}",
            kind,
            now,
            limit,
            now + lease,
        )
        items = [_outbox(r) for r in rows]
        return sorted(items, key=lambda i: (i.next_attempt_at, i.id))

    async def finish_outbox(
        self,
        item_id: int,
        *,
        status: str,
        attempts: int,
        next_attempt_at: float,
        last_error: str | None,
    ) -> None:
        await self._p.execute(
            "UPDATE outbox SET status = $1, attempts = $2, next_attempt_at = $3, last_error = $4,"
            " lease_until = NULL WHERE id = $5",
            status,
            attempts,
            next_attempt_at,
            _clean(last_error),
            item_id,
        )

    async def outbox(self, action_id: str) -> list[OutboxItem]:
        rows = await self._p.fetch(
            f"SELECT {_OUTBOX_COLUMNS} FROM outbox WHERE action_id = $1 ORDER BY id", action_id
        )
        return [_outbox(r) for r in rows]

    async def budget_usage(
        self, rule: str, since: float, scope_key: str | None = None
    ) -> dict[str, BudgetTally]:
        sql = (
            "SELECT scope_key, COUNT(*) AS count, COALESCE(SUM(amount), 0)::bigint AS total"
            " FROM budget_entries WHERE rule = $1 AND ts > $2"
        )
        args: list[Any] = [rule, since]
        if scope_key is not None:
            sql += " AND scope_key = $3"
            args.append(scope_key)
        rows = await self._p.fetch(sql + " GROUP BY scope_key", *args)
        return {r["scope_key"]: BudgetTally(r["count"], r["total"]) for r in rows}

    async def reserve_budget(
        self,
        rule: str,
        scope_key: str,
        since: float,
        *,
        count_max: int | None,
        sum_max: int | None,
        amount: int,
        ts: float,
        ref: str,
    ) -> tuple[bool, BudgetTally]:
        async with self._p.acquire() as conn, conn.transaction():
            # Serialise recount-and-insert per (rule, scope) across every replica.
            await conn.execute(
                "SELECT pg_advisory_xact_lock(hashtextextended($1 || '/' || $2, 0))",
                rule,
                scope_key,
            )
            row = await conn.fetchrow(
                "SELECT COUNT(*) AS count, COALESCE(SUM(amount), 0)::bigint AS total"
                " FROM budget_entries WHERE rule = $1 AND scope_key = $2 AND ts > $3",
                rule,
                scope_key,
                since,
            )
            tally = BudgetTally(row["count"], row["total"]) if row else BudgetTally()
            if (count_max is not None and tally.count + 1 > count_max) or (
                sum_max is not None and tally.total + amount > sum_max
            ):
                return False, tally
            await conn.execute(
                "INSERT INTO budget_entries (rule, scope_key, ts, amount, ref)"
                " VALUES ($1, $2, $3, $4, $5)",
                rule,
                scope_key,
                ts,
                amount,
                ref,
            )
        return True, tally

    async def count_by_status(self) -> dict[str, int]:
        rows = await self._p.fetch("SELECT status, COUNT(*) AS n FROM actions GROUP BY status")
        return {r["status"]: r["n"] for r in rows}

    async def outbox_stats(self) -> list[OutboxStat]:
        rows = await self._p.fetch(
            "SELECT kind, status, COUNT(*) AS items, COUNT(last_error) AS with_error"
            " FROM outbox GROUP BY kind, status ORDER BY kind, status"
        )
        return [OutboxStat(**dict(r.items())) for r in rows]

    async def create_agent_key(self, key: AgentKeyRecord) -> bool:
        # A revoked key's name may be issued again; an active one may not.
        changed = await self._p.fetchval(
            "INSERT INTO agent_keys (name, key_hash, prefix, last4, stripe_key_sealed, created,"
            " revoked_at) VALUES ($1, $2, $3, $4, $5, $6, NULL)"
            " ON CONFLICT (name) DO UPDATE SET key_hash = excluded.key_hash,"
            " prefix = excluded.prefix, last4 = excluded.last4,"
            " stripe_key_sealed = excluded.stripe_key_sealed, created = excluded.created,"
            " revoked_at = NULL WHERE agent_keys.revoked_at IS NOT NULL RETURNING name",
            key.name,
            key.key_hash,
            key.prefix,
            key.last4,
            key.stripe_key_sealed,
            key.created,
        )
        return changed is not None

    async def agent_key_by_hash(self, key_hash: str) -> AgentKeyRecord | None:
        row = await self._p.fetchrow(
            f"SELECT {_AGENT_KEY_COLUMNS} FROM agent_keys WHERE key_hash = $1", key_hash
        )
        return _agent_key(row) if row else None

    async def list_agent_keys(self) -> list[AgentKeyRecord]:
        rows = await self._p.fetch(f"SELECT {_AGENT_KEY_COLUMNS} FROM agent_keys ORDER BY name")
        return [_agent_key(r) for r in rows]

    async def revoke_agent_key(self, name: str, when: int) -> bool:
        changed = await self._p.fetchval(
            "UPDATE agent_keys SET revoked_at = $1 WHERE name = $2 AND revoked_at IS NULL"
            " RETURNING name",
            when,
            name,
        )
        return changed is not None

    async def set_agent_stripe_key(self, name: str, sealed: bytes | None) -> bool:
        changed = await self._p.fetchval(
            "UPDATE agent_keys SET stripe_key_sealed = $1 WHERE name = $2 RETURNING name",
            sealed,
            name,
        )
        return changed is not None

    async def ping(self) -> None:
        await self._p.fetchval("SELECT 1")
