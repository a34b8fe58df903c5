"""The embedded store: SQLite in WAL mode through aiosqlite.

One writer connection (transactions serialised by a lock, committed with
``synchronous=FULL`` so a 202 is only sent for a hold that is on disk) and
one reader connection that only ever sees committed data.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import fields
from importlib import resources
from pathlib import Path
from typing import Any

import aiosqlite

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

JSON_FIELDS = frozenset(
    {"params", "headers", "reviewers", "editable", "context", "modified_params", "response_headers"}
)
ACTION_COLUMNS = tuple(f.name for f in fields(ActionRecord))
_ACTION_SELECT = "SELECT " + ", ".join(ACTION_COLUMNS) + " FROM actions"


def _dump(name: str, value: Any) -> Any:
    if name in JSON_FIELDS:
        return None if value is None else json.dumps(value, separators=(",", ":"))
    return value


def _action(row: Sequence[Any]) -> ActionRecord:
    values = {
        name: (json.loads(v) if name in JSON_FIELDS and v is not None else v)
        for name, v in zip(ACTION_COLUMNS, row, strict=True)
    }
    values["body"] = bytes(values["body"])
    return ActionRecord(**values)


def _decision(row: Sequence[Any]) -> DecisionRecord:
    action_id, reviewer, decision, note, via, created, params = row
    return DecisionRecord(
        action_id=action_id,
        reviewer=reviewer,
        decision=decision,
        note=note,
        via=via,
        created=created,
        params=json.loads(params) if params else None,
    )


def _outbox(row: Sequence[Any]) -> OutboxItem:
    id_, kind, action_id, payload, attempts, next_at, status, last_error = row
    return OutboxItem(
        id_, kind, action_id, json.loads(payload), attempts, next_at, status, last_error
    )


_OUTBOX_COLUMNS = "id, kind, action_id, payload, attempts, next_attempt_at, status, last_error"
_AGENT_KEY_COLUMNS = "name, key_hash, prefix, last4, created, stripe_key_sealed, revoked_at"


def _agent_key(row: Sequence[Any]) -> AgentKeyRecord:
    name, key_hash, prefix, last4, created, sealed, revoked_at = row
    return AgentKeyRecord(
        name, key_hash, prefix, last4, created, bytes(sealed) if sealed else None, revoked_at
    )


def migrations(dialect: str) -> list[tuple[int, str]]:
    """Numbered migration scripts shipped in the package, in order."""
    folder = resources.files("gateway.store").joinpath("migrations", dialect)
    found = []
    for entry in folder.iterdir():
        if entry.name.endswith(".sql"):
            found.append((int(entry.name.split("_", 1)[0]), entry.read_text()))
    return sorted(found)


class SqliteTx:
    """Transaction primitives on the writer connection."""

    def __init__(self, db: aiosqlite.Connection, now: float) -> None:
        self._db = db
        self._now = now

    async def get_action(self, action_id: str) -> ActionRecord | None:
        async with self._db.execute(_ACTION_SELECT + " WHERE id = ?", (action_id,)) as cur:
            row = await cur.fetchone()
        return _action(row) if row else None

    async def insert_action(self, action: ActionRecord) -> ActionRecord:
        cols = ", ".join(ACTION_COLUMNS)
        marks = ", ".join("?" for _ in ACTION_COLUMNS)
        values = [_dump(n, getattr(action, n)) for n in ACTION_COLUMNS]
        async with self._db.execute(
            f"INSERT INTO actions ({cols}) VALUES ({marks}) ON CONFLICT DO NOTHING", values
        ) as cur:
            inserted = cur.rowcount == 1
        if inserted:
            return action
        existing = None
        if action.idempotency_key is not None:
            existing = await self._one(
                " WHERE agent = ? AND idempotency_key = ?", (action.agent, action.idempotency_key)
            )
        if existing is None and action.join_key is not None:
            existing = await self._one(
                " WHERE agent = ? AND join_key = ?", (action.agent, action.join_key)
            )
        if existing is None:
            raise RuntimeError(f"action {action.id} collided with nothing")
        return existing

    async def _one(self, where: str, args: Sequence[Any]) -> ActionRecord | None:
        async with self._db.execute(_ACTION_SELECT + where, args) as cur:
            row = await cur.fetchone()
        return _action(row) if row else None

    async def update_action(
        self, action_id: str, expect: Sequence[str], fields: Mapping[str, Any]
    ) -> bool:
        sets = ", ".join(f"{name} = ?" for name in fields)
        marks = ", ".join("?" for _ in expect)
        args = [_dump(n, v) for n, v in fields.items()] + [action_id, *expect]
        async with self._db.execute(
            f"UPDATE actions SET {sets} WHERE id = ? AND status IN ({marks})", args
        ) as cur:
            return cur.rowcount == 1

    async def insert_decision(self, decision: DecisionRecord) -> bool:
        async with self._db.execute(
            "INSERT INTO decisions (action_id, reviewer, decision, note, via, created, params)"
            " VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
            (
                decision.action_id,
                decision.reviewer,
                decision.decision,
                decision.note,
                decision.via,
                decision.created,
                json.dumps(decision.params) if decision.params is not None else None,
            ),
        ) as cur:
            return cur.rowcount == 1

    async def decisions(self, action_id: str) -> list[DecisionRecord]:
        return await _decisions(self._db, action_id)

    async def add_event(self, event: EventRecord) -> None:
        await _add_event(self._db, event)

    async def enqueue(self, kind: str, action_id: str, payload: Mapping[str, Any]) -> None:
        await self._db.execute(
            "INSERT INTO outbox (kind, action_id, payload, next_attempt_at) VALUES (?, ?, ?, ?)",
            (kind, action_id, json.dumps(payload), self._now),
        )


async def _decisions(db: aiosqlite.Connection, action_id: str) -> list[DecisionRecord]:
    rows = await db.execute_fetchall(
        "SELECT action_id, reviewer, decision, note, via, created, params FROM decisions"
        " WHERE action_id = ? ORDER BY created, rowid",
        (action_id,),
    )
    return [_decision(r) for r in rows]


async def _add_event(db: aiosqlite.Connection, event: EventRecord) -> None:
    await db.execute(
        "INSERT INTO events (action_id, ts, kind, data) VALUES (?, ?, ?, ?)",
        (event.action_id, event.ts, event.kind, json.dumps(event.data)),
    )


MAX_BATCH = 512  # logical transactions per group commit


class SqliteStore:
    """Store backed by one SQLite file."""

    def __init__(self, path: str | Path, *, clock: Callable[[], float] | None = None) -> None:
        self.path = str(path)
        self._lock = asyncio.Lock()
        self._queued = 0  # logical transactions waiting for the writer lock
        self._batch: asyncio.Future[None] | None = None  # the open group commit, if any
        self._batch_size = 0
        self._flushes: set[asyncio.Task[None]] = set()
        self.commits = 0  # SQLite commits made (fewer than transactions, thanks to batching)
        self._writer: aiosqlite.Connection | None = None
        self._reader: aiosqlite.Connection | None = None
        self._clock = clock or time.time

    @classmethod
    def from_url(cls, url: str, **kwargs: Any) -> SqliteStore:
        """``sqlite:///relative/or/absolute.db``."""
        return cls(url.removeprefix("sqlite:///") or "cosigner.db", **kwargs)

    @property
    def _w(self) -> aiosqlite.Connection:
        assert self._writer is not None, "store is not open"
        return self._writer

    @property
    def _r(self) -> aiosqlite.Connection:
        assert self._reader is not None, "store is not open"
        return self._reader

    async def open(self) -> None:
        if self.path != ":memory:":
            Path(self.path).expanduser().resolve().parent.mkdir(parents=True, exist_ok=True)
        self._writer = await aiosqlite.connect(self.path, isolation_level=None)
        for pragma in (
            # First: switching to WAL needs a lock another process may hold (say, migrating).
            "PRAGMA busy_timeout=10000",
            "PRAGMA journal_mode=WAL",
            "PRAGMA synchronous=FULL",
            "PRAGMA foreign_keys=ON",
            # SECURITY: erased credentials (even sealed) are zeroed on disk, not left in free pages.
            "PRAGMA secure_delete=ON",
        ):
            await self._writer.execute(pragma)
        await self._migrate()
        self._reader = await aiosqlite.connect(self.path, isolation_level=None)
        await self._reader.execute("PRAGMA busy_timeout=10000")

    async def _migrate(self) -> None:
        async with self._lock:
            await self._w.execute("BEGIN IMMEDIATE")
            try:
                await self._w.execute(
                    "CREATE TABLE IF NOT EXISTS schema_migrations"
                    " (version INTEGER PRIMARY KEY, applied REAL NOT NULL)"
                )
                async with self._w.execute("SELECT version FROM schema_migrations") as cur:
                    done = {r[0] for r in await cur.fetchall()}
                for version, script in migrations("sqlite"):
                    if version in done:
                        continue
                    for statement in _statements(script):
                        await self._w.execute(statement)
                    await self._w.execute(
                        "INSERT INTO schema_migrations VALUES (?, ?)", (version, self._clock())
                    )
            except BaseException:
                await self._w.rollback()
                raise
            await self._w.commit()

    async def close(self) -> None:
        if self._flushes:
            await asyncio.gather(*self._flushes, return_exceptions=True)
        for conn in (self._reader, self._writer):
            if conn is not None:
                await conn.close()
        self._reader = self._writer = None

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[SqliteTx]:
        """One logical transaction; several share one SQLite commit (group commit).

        Each logical transaction runs alone under the writer lock, inside a SAVEPOINT of the
        batch's BEGIN IMMEDIATE. When it ends and others are already queued for the lock, the
        commit is left to the last of them: one fsync then makes the whole batch durable, and
        every caller returns only after that COMMIT. A failing logical transaction rolls back
        to its savepoint and leaves the rest of the batch alone.
        """
        self._queued += 1
        try:
            await self._lock.acquire()
        except BaseException:
            self._queued -= 1
            self._flush_soon()  # the holder may have left the batch to us
            raise
        self._queued -= 1
        try:
            if self._batch is None:
                await self._w.execute("BEGIN IMMEDIATE")
                self._batch = asyncio.get_running_loop().create_future()
                self._batch_size = 0
            batch = self._batch
            await self._w.execute("SAVEPOINT tx")
            try:
                yield SqliteTx(self._w, self._clock())
            except BaseException:
                await self._w.execute("ROLLBACK TO tx")
                await self._w.execute("RELEASE tx")
                await self._end_turn()
                raise
            await self._w.execute("RELEASE tx")
            self._batch_size += 1
            await self._end_turn()
        finally:
            self._lock.release()
        # Durable before we answer; a cancelled caller does not cancel the shared commit.
        await asyncio.shield(batch)

    async def _end_turn(self) -> None:
        """Commit the batch unless another logical transaction is queued to join it."""
        if self._queued and self._batch_size < MAX_BATCH:
            return
        batch, self._batch = self._batch, None
        if batch is None:
            return
        try:
            await self._w.execute("COMMIT")
            self.commits += 1
        except BaseException as exc:
            await self._w.rollback()
            if not batch.done():
                batch.set_exception(exc)
            raise
        if not batch.done():
            batch.set_result(None)

    def _flush_soon(self) -> None:
        """Commit an open batch whose last joiner gave up before taking the lock."""

        async def flush() -> None:
            async with self._lock:
                await self._end_turn()  # a no-op while someone else is queued to join

        if self._batch is not None and self._queued == 0:
            task = asyncio.get_running_loop().create_task(flush())
            self._flushes.add(task)
            task.add_done_callback(self._flushes.discard)

    async def _write(self, sql: str, args: Sequence[Any]) -> None:
        async with self.transaction():
            await self._w.execute(sql, args)

    async def _rows(self, sql: str, args: Sequence[Any] = ()) -> list[Sequence[Any]]:
        """Every read on the shared reader is one call (execute + fetch + close).

        An open cursor interleaved with other reads would keep a read transaction, and so an
        old snapshot, alive: readers would see a stale status.
        """
        return list(await self._r.execute_fetchall(sql, args))

    async def get_action(self, action_id: str) -> ActionRecord | None:
        rows = await self._rows(_ACTION_SELECT + " WHERE id = ?", (action_id,))
        return _action(rows[0]) if rows else None

    async def find_idempotent(self, agent: str, key: str) -> ActionRecord | None:
        rows = await self._rows(
            _ACTION_SELECT + " WHERE agent = ? AND idempotency_key = ?", (agent, key)
        )
        return _action(rows[0]) if rows else None

    async def find_joinable(self, agent: str, join_key: str) -> ActionRecord | None:
        rows = await self._rows(
            _ACTION_SELECT + " WHERE agent = ? AND join_key = ?", (agent, join_key)
        )
        return _action(rows[0]) if rows else None

    async def list_actions(self, flt: ActionFilter) -> tuple[list[ActionRecord], bool]:
        where, args = [], []
        for column in ("status", "agent", "rule"):
            value = getattr(flt, column)
            if value:
                where.append(f"{column} = ?")
                args.append(value)
        if flt.starting_after:
            # Keyset pagination on (created, rowid): newest first, in insertion order.
            where.append("(created, rowid) < (SELECT created, rowid FROM actions WHERE id = ?)")
            args.append(flt.starting_after)
        sql = _ACTION_SELECT + (" WHERE " + " AND ".join(where) if where else "")
        sql += " ORDER BY created DESC, rowid DESC LIMIT ?"
        args.append(flt.limit + 1)
        actions = [_action(r) for r in await self._rows(sql, args)]
        return actions[: flt.limit], len(actions) > flt.limit

    async def decisions(self, action_id: str) -> list[DecisionRecord]:
        return await _decisions(self._r, action_id)

    async def events(self, action_id: str) -> list[EventRecord]:
        rows = await self._rows(
            "SELECT action_id, ts, kind, data FROM events WHERE action_id = ? ORDER BY id",
            (action_id,),
        )
        return [EventRecord(a, ts, k, json.loads(d)) for a, ts, k, d in rows]

    async def add_event(self, event: EventRecord) -> None:
        async with self.transaction():
            await _add_event(self._w, event)

    async def due_expiries(self, now: float, limit: int) -> list[str]:
        rows = await self._rows(
            "SELECT id FROM actions WHERE status = 'awaiting_approval' AND expires_at <= ? LIMIT ?",
            (now, limit),
        )
        return [r[0] for r in rows]

    async def claimable_forwards(self, now: float, limit: int) -> list[str]:
        rows = await self._rows(
            "SELECT id FROM actions WHERE status = 'pending'"
            " AND (lease_until IS NULL OR lease_until < ?) ORDER BY updated LIMIT ?",
            (now, limit),
        )
        return [r[0] for r in rows]

    async def record_request(self, receipt: RequestReceipt) -> None:
        await self._write(
            "INSERT INTO requests (id, ts, agent, method, path, rule, decision, status,"
            " latency_ms, action_id) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                receipt.id,
                receipt.ts,
                receipt.agent,
                receipt.method,
                receipt.path,
                receipt.rule,
                receipt.decision,
                receipt.status,
                receipt.latency_ms,
                receipt.action_id,
            ),
        )

    async def requests(self, limit: int) -> list[RequestReceipt]:
        rows = await self._rows(
            "SELECT id, ts, agent, method, path, rule, decision, status, latency_ms, action_id"
            " FROM requests ORDER BY ts DESC LIMIT ?",
            (limit,),
        )
        return [RequestReceipt(*r) for r in rows]

    async def claim_outbox(
        self, kind: str, now: float, lease: float, limit: int
    ) -> list[OutboxItem]:
        async with self.transaction():
            async with self._w.execute(
                f"SELECT {_OUTBOX_COLUMNS} FROM outbox WHERE kind = ? AND status = 'pending'"
                " AND next_attempt_at <= ? AND (lease_until IS NULL OR lease_until < ?)"
                " ORDER BY next_attempt_at LIMIT ?",
                (kind, now, now, limit),
            ) as cur:
                items = [_outbox(r) for r in await cur.fetchall()]
            for item in items:
                await self._w.execute(
                    "UPDATE outbox SET lease_until = ? WHERE id = ?", (now + lease, item.id)
                )
        return items

    async def finish_outbox(
        self,
        item_id: int,
        *,
        status: str,
        attempts: int,
        next_attempt_at: float,
        last_error: str | None,
    ) -> None:
        await self._write(
            "UPDATE outbox SET status = ?, attempts = ?, next_attempt_at = ?, last_error = ?,"
            " lease_until = NULL WHERE id = ?",
            (status, attempts, next_attempt_at, last_error, item_id),
        )

    async def outbox(self, action_id: str) -> list[OutboxItem]:
        rows = await self._rows(
            f"SELECT {_OUTBOX_COLUMNS} FROM outbox WHERE action_id = ? ORDER BY id", (action_id,)
        )
        return [_outbox(r) for r in rows]

    async def budget_usage(
        self, rule: str, since: float, scope_key: str | None = None
    ) -> dict[str, BudgetTally]:
        sql = (
            "SELECT scope_key, COUNT(*), COALESCE(SUM(amount), 0) FROM budget_entries"
            " WHERE rule = ? AND ts > ?"
        )
        args: list[Any] = [rule, since]
        if scope_key is not None:
            sql += " AND scope_key = ?"
            args.append(scope_key)
        rows = await self._rows(sql + " GROUP BY scope_key", args)
        return {key: BudgetTally(count, total) for key, count, total in rows}

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
        # The writer lock plus BEGIN IMMEDIATE serialise this recount-and-insert against
        # every other writer, in this process and in any other on the same file.
        async with self.transaction():
            async with self._w.execute(
                "SELECT COUNT(*), COALESCE(SUM(amount), 0) FROM budget_entries"
                " WHERE rule = ? AND scope_key = ? AND ts > ?",
                (rule, scope_key, since),
            ) as cur:
                row = await cur.fetchone()
            tally = BudgetTally(*row) if row else BudgetTally()
            if (count_max is not None and tally.count + 1 > count_max) or (
                sum_max is not None and tally.total + amount > sum_max
            ):
                return False, tally
            await self._w.execute(
                "INSERT INTO budget_entries (rule, scope_key, ts, amount, ref)"
                " VALUES (?, ?, ?, ?, ?)",
                (rule, scope_key, ts, amount, ref),
            )
        return True, tally

    async def count_by_status(self) -> dict[str, int]:
        rows = await self._rows("SELECT status, COUNT(*) FROM actions GROUP BY status")
        return {status: count for status, count in rows}

    async def outbox_stats(self) -> list[OutboxStat]:
        rows = await self._rows(
            "SELECT kind, status, COUNT(*), COUNT(last_error) FROM outbox GROUP BY kind, status"
        )
        return [OutboxStat(*row) for row in rows]

    async def create_agent_key(self, key: AgentKeyRecord) -> bool:
        # A revoked key's name may be issued again; an active one may not.
        changed = await self._changed_rows(
            "INSERT INTO agent_keys (name, key_hash, prefix, last4, stripe_key_sealed, created,"
            " revoked_at) VALUES (?, ?, ?, ?, ?, ?, NULL)"
            " ON CONFLICT (name) DO UPDATE SET key_hash = excluded.key_hash,"
            " prefix = excluded.prefix, last4 = excluded.last4,"
            " stripe_key_sealed = excluded.stripe_key_sealed, created = excluded.created,"
            " revoked_at = NULL WHERE agent_keys.revoked_at IS NOT NULL",
            (key.name, key.key_hash, key.prefix, key.last4, key.stripe_key_sealed, key.created),
        )
        return changed == 1

    async def agent_key_by_hash(self, key_hash: str) -> AgentKeyRecord | None:
        rows = await self._rows(
            f"SELECT {_AGENT_KEY_COLUMNS} FROM agent_keys WHERE key_hash = ?", (key_hash,)
        )
        return _agent_key(rows[0]) if rows else None

    async def list_agent_keys(self) -> list[AgentKeyRecord]:
        rows = await self._rows(f"SELECT {_AGENT_KEY_COLUMNS} FROM agent_keys ORDER BY name")
        return [_agent_key(r) for r in rows]

    async def revoke_agent_key(self, name: str, when: int) -> bool:
        changed = await self._changed_rows(
            "UPDATE agent_keys SET revoked_at = ? WHERE name = ? AND revoked_at IS NULL",
            (when, name),
        )
        return changed == 1

    async def set_agent_stripe_key(self, name: str, sealed: bytes | None) -> bool:
        changed = await self._changed_rows(
            "UPDATE agent_keys SET stripe_key_sealed = ? WHERE name = ?", (sealed, name)
        )
        return changed == 1

    async def _changed_rows(self, sql: str, args: Sequence[Any]) -> int:
        async with self.transaction(), self._w.execute(sql, args) as cur:
            return cur.rowcount

    async def ping(self) -> None:
        await self._rows("SELECT 1")

    async def subscribe(self, callback: Callable[[str], None]) -> None:
        """No-op: one process writes this file, and it wakes its own waiters."""


def _statements(script: str) -> list[str]:
    """Split a migration script into statements (no semicolons inside our SQL literals)."""
    lines = [ln for ln in script.splitlines() if not ln.strip().startswith("--")]
    return [s.strip() for s in "\n".join(lines).split(";") if s.strip()]
