"""The embedded store: SQLite in WAL mode.

One writer connection on a thread of its own (transactions serialised by a
lock, group-committed with ``synchronous=FULL`` so a 202 is only sent for a
hold that is on disk) and one reader connection, through aiosqlite, that only
ever sees committed data.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import json
import queue
import sqlite3
import threading
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, fields
from functools import partial
from importlib import resources
from operator import attrgetter
from pathlib import Path
from typing import Any, TypeVar

import aiosqlite

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

JSON_FIELDS = frozenset(
    {"params", "headers", "reviewers", "editable", "context", "modified_params", "response_headers"}
)
ACTION_COLUMNS = tuple(f.name for f in fields(ActionRecord))
_ACTION_SELECT = "SELECT " + ", ".join(ACTION_COLUMNS) + " FROM actions"


def _dump(name: str, value: Any) -> Any:
    if name in JSON_FIELDS:
        return None if value is None else compact(value)
    return value


_action_values = attrgetter(*ACTION_COLUMNS)  # an action's values in column order, in C
_ACTION_JSON = tuple(name in JSON_FIELDS for name in ACTION_COLUMNS)


def _action_row(action: ActionRecord) -> list[Any]:
    """An action's values as the INSERT binds them: its JSON columns as text."""
    return [
        compact(value) if is_json and value is not None else value
        for is_json, value in zip(_ACTION_JSON, _action_values(action), strict=True)
    ]


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


T = TypeVar("T")
A = TypeVar("A")
Step = Callable[[sqlite3.Connection], Any]  # one piece of work on the writer's thread


def _execute(sql: str, args: Sequence[Any] = ()) -> Step:
    return lambda conn: conn.execute(sql, args)


_BEGIN = _execute("BEGIN IMMEDIATE")


def _run_steps(tx: SqliteTx, steps: Sequence[Step], last: Step, conn: sqlite3.Connection) -> Any:
    began = conn.in_transaction
    try:
        for step in steps:
            step(conn)
            began = began or conn.in_transaction
        return last(conn)
    except Exception as exc:
        if began and not conn.in_transaction:
            tx.lost = exc  # SQLite rolled the whole batch back (an I/O error, a full disk)
        raise


def _joined(conn: sqlite3.Connection) -> None:
    # Outside a transaction a statement (or a SAVEPOINT) would start one of its own and
    # commit alone: never join a group commit whose BEGIN failed.
    if not conn.in_transaction:
        raise sqlite3.OperationalError("the group commit this transaction joined did not begin")


def _savepoint(conn: sqlite3.Connection) -> None:
    _joined(conn)
    conn.execute("SAVEPOINT tx")


def _rollback_to_savepoint(conn: sqlite3.Connection) -> None:
    if not conn.in_transaction:
        return
    try:
        conn.execute("ROLLBACK TO tx")
    except sqlite3.OperationalError:
        return  # the transaction failed before its SAVEPOINT ran
    conn.execute("RELEASE tx")


def _commit(conn: sqlite3.Connection) -> Exception | None:
    """COMMIT the batch; on failure roll it back and return why (a batch is all or nothing)."""
    if not conn.in_transaction:
        return None  # its BEGIN failed: every member failed with it, nothing to commit
    try:
        conn.execute("COMMIT")
    except sqlite3.Error as exc:
        if conn.in_transaction:
            conn.rollback()
        return exc
    return None


@dataclass(slots=True)
class _Outcome:
    """What a last trip of a logical transaction did (its work never raises)."""

    error: Exception | None = None  # this logical transaction failed and was rolled back
    commit_error: Exception | None = None  # the batch's COMMIT failed: every member failed
    closed: bool = False  # no batch transaction is open any more


def _finish(
    steps: Sequence[Step],
    started: bool,
    commit: bool,
    savepoint: bool,
    conn: sqlite3.Connection,
) -> _Outcome:
    """The transaction's deferred statements and RELEASE, and the COMMIT when it is due.

    ``started``: an earlier trip opened this transaction's SAVEPOINT, so a batch must be
    open; if SQLite rolled it back meanwhile, nothing more is written in autocommit.
    Without ``savepoint`` the transaction is one statement, which SQLite undoes by
    itself when it fails: no SAVEPOINT to RELEASE or roll back to.
    """
    out = _Outcome()
    began = conn.in_transaction
    if started and not began:
        out.error = sqlite3.OperationalError("the batch this transaction was in was rolled back")
        out.closed = True
        return out
    try:
        for step in steps:
            step(conn)
            began = began or conn.in_transaction
        if savepoint:
            conn.execute("RELEASE tx")
    except Exception as exc:
        out.error = exc
        if began and not conn.in_transaction:
            out.commit_error = exc  # SQLite rolled the whole batch back: nobody's work is in
        if savepoint:
            _rollback_to_savepoint(conn)
    if commit and out.commit_error is None:
        out.commit_error = _commit(conn)
    out.closed = not conn.in_transaction
    return out


def _abort(
    started: bool, commit: bool, lost: Exception | None, conn: sqlite3.Connection
) -> _Outcome:
    """Undo a failed logical transaction; COMMIT the batch's others when it is due.

    ``lost``: the failure already made SQLite roll the whole batch back, so every member
    of the batch fails with it.
    """
    out = _Outcome(commit_error=lost)
    if started:
        _rollback_to_savepoint(conn)
    if commit and lost is None:
        out.commit_error = _commit(conn)
    out.closed = not conn.in_transaction
    return out


def _commit_only(conn: sqlite3.Connection) -> _Outcome:
    return _Outcome(commit_error=_commit(conn), closed=not conn.in_transaction)


class Writer:
    """The one writer connection, on a thread of its own.

    aiosqlite makes one trip to its thread per statement. Here a trip runs a list of
    statements, and trips run in the order they were submitted: a logical transaction's
    BEGIN and SAVEPOINT go with its first statement, its write-only statements (events,
    outbox items, receipts) with its RELEASE and the batch's COMMIT.

    The thread is a plain loop over a queue, not a ThreadPoolExecutor: the executor's
    bookkeeping (its future, condition and callbacks, then asyncio's future wrapped
    around that one) is Python run on this thread, holding the GIL the event loop
    waits for, on every trip.
    """

    def __init__(self) -> None:
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._conn: sqlite3.Connection | None = None

    async def open(self, path: str) -> None:
        def connect(_: None) -> sqlite3.Connection:
            return sqlite3.connect(
                path,
                isolation_level=None,
                check_same_thread=False,
                cached_statements=STATEMENT_CACHE,
            )

        self._thread = threading.Thread(target=self._serve, name="cosigner-sqlite", daemon=True)
        self._thread.start()
        self._conn = await self._queue(connect, None)

    def submit(self, step: Callable[[sqlite3.Connection], T]) -> asyncio.Future[T]:
        """Queue ``step`` for the writer thread now; it runs after everything queued before."""
        assert self._conn is not None, "store is not open"
        return self._queue(step, self._conn)

    async def call(self, step: Callable[[sqlite3.Connection], T]) -> T:
        """Run ``step`` on the writer thread; a cancelled caller does not stop it midway."""
        return await asyncio.shield(self.submit(step))

    async def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            await self._queue(sqlite3.Connection.close, conn)
        if self._thread is not None:
            self._jobs.put(None)  # the thread ends after what was queued before
            self._thread = None

    def _queue(self, step: Callable[[A], T], arg: A) -> asyncio.Future[T]:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        self._jobs.put((step, arg, future, loop))
        return future

    def _serve(self) -> None:
        """The writer thread: each job in turn, its outcome handed to the job's event loop."""
        jobs = self._jobs
        while (job := jobs.get()) is not None:
            step, arg, future, loop = job
            settle: Callable[[asyncio.Future[Any], Any], None] = _set_result
            try:
                outcome = step(arg)
            except BaseException as exc:  # never leave a caller waiting
                outcome, settle = exc, _set_exception
            # A closed loop (RuntimeError) has nobody waiting for the outcome any more.
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(settle, future, outcome)
            del job, step, arg, future, loop, outcome  # nothing kept until the next job


_Job = tuple[Callable[[Any], Any], Any, "asyncio.Future[Any]", asyncio.AbstractEventLoop]


def _set_result(future: asyncio.Future[Any], result: Any) -> None:
    if not future.done():
        future.set_result(result)


def _set_exception(future: asyncio.Future[Any], exc: BaseException) -> None:
    if not future.done():
        future.set_exception(exc)


class SqliteTx:
    """Transaction primitives on the writer connection.

    Statements whose result nobody reads are deferred: they run, in order, on the next trip
    to the writer thread (another statement's, or the transaction's end). A deferred
    statement that fails still fails the logical transaction and rolls it back.
    """

    def __init__(self, writer: Writer, now: float, *, begin: bool, savepoint: bool = True) -> None:
        self._writer = writer
        self._now = now
        self._savepoint = savepoint
        # The first transaction of a batch opens it; the BEGIN goes with its first trip.
        if begin:
            self._steps: list[Step] = [_BEGIN]
            if savepoint:
                self._steps.append(_savepoint)
        else:
            self._steps = [_savepoint if savepoint else _joined]
        self.started = False  # a trip to the writer thread was queued (the SAVEPOINT with it)
        self.lost: Exception | None = None  # what made SQLite roll the whole batch back

    def defer(self, sql: str, args: Sequence[Any] = ()) -> None:
        """Run ``sql`` with the next trip to the writer thread."""
        self._steps.append(_execute(sql, args))

    def defer_many(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        """``executemany`` with the next trip to the writer thread."""
        self._steps.append(lambda conn: conn.executemany(sql, rows))

    async def call(self, last: Callable[[sqlite3.Connection], T]) -> T:
        """Every deferred statement, then ``last``, in one trip; returns what ``last`` does."""
        steps, self._steps = self._steps, []
        self.started = True
        return await self._writer.call(partial(_run_steps, self, steps, last))

    def finish(self, commit: bool) -> Callable[[sqlite3.Connection], _Outcome]:
        """The last trip: deferred statements, RELEASE, and the batch's COMMIT if ``commit``."""
        steps, self._steps = self._steps, []
        started, self.started = self.started, True
        if (
            commit
            and not started
            and not self._savepoint
            and len(steps) == 2
            and steps[0] is _BEGIN
        ):
            # A batch of one statement, committed in the same trip: SQLite's own
            # transaction of that statement does it (as durable), one step instead of three.
            steps = steps[1:]
        return partial(_finish, steps, started, commit, self._savepoint)

    async def rows(self, sql: str, args: Sequence[Any] = ()) -> list[Any]:
        """A query's rows."""
        rows: list[Any] = await self.call(lambda conn: conn.execute(sql, args).fetchall())
        return rows

    async def rowcount(self, sql: str, args: Sequence[Any] = ()) -> int:
        """Rows a statement changed."""
        count: int = await self.call(lambda conn: conn.execute(sql, args).rowcount)
        return count

    async def get_action(self, action_id: str) -> ActionRecord | None:
        rows = await self.rows(_ACTION_SELECT + " WHERE id = ?", (action_id,))
        return _action(rows[0]) if rows else None

    async def insert_action(self, action: ActionRecord) -> ActionRecord:
        cols = ", ".join(ACTION_COLUMNS)
        marks = ", ".join("?" for _ in ACTION_COLUMNS)
        values = _action_row(action)
        if action.idempotency_key is None and action.join_key is None:
            # Nothing to collide with but its own new id: no need to wait for the INSERT's
            # answer, so it goes with the next trip (a hold is then one trip, not two).
            self.defer(f"INSERT INTO actions ({cols}) VALUES ({marks})", values)
            return action
        inserted = await self.rowcount(
            f"INSERT INTO actions ({cols}) VALUES ({marks}) ON CONFLICT DO NOTHING", values
        )
        if inserted == 1:
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
        rows = await self.rows(_ACTION_SELECT + where, args)
        return _action(rows[0]) if rows else None

    async def update_action(
        self, action_id: str, expect: Sequence[str], fields: Mapping[str, Any]
    ) -> bool:
        sets = ", ".join(f"{name} = ?" for name in fields)
        marks = ", ".join("?" for _ in expect)
        args = [_dump(n, v) for n, v in fields.items()] + [action_id, *expect]
        changed = await self.rowcount(
            f"UPDATE actions SET {sets} WHERE id = ? AND status IN ({marks})", args
        )
        return changed == 1

    async def insert_decision(self, decision: DecisionRecord) -> bool:
        changed = await self.rowcount(
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
        )
        return changed == 1

    async def decisions(self, action_id: str) -> list[DecisionRecord]:
        return [_decision(r) for r in await self.rows(_DECISIONS, (action_id,))]

    async def add_event(self, event: EventRecord) -> None:
        self.defer(_INSERT_EVENT, _event_args(event))

    async def enqueue(self, kind: str, action_id: str, payload: Mapping[str, Any]) -> None:
        self.defer(
            "INSERT INTO outbox (kind, action_id, payload, next_attempt_at) VALUES (?, ?, ?, ?)",
            (kind, action_id, json.dumps(payload), self._now),
        )


_DECISIONS = (
    "SELECT action_id, reviewer, decision, note, via, created, params FROM decisions"
    " WHERE action_id = ? ORDER BY created, rowid"
)
_INSERT_EVENT = "INSERT INTO events (action_id, ts, kind, data) VALUES (?, ?, ?, ?)"


def _event_args(event: EventRecord) -> tuple[Any, ...]:
    return (event.action_id, event.ts, event.kind, json.dumps(event.data))


MAX_BATCH = 512  # logical transactions per group commit
_REQUEST_COLUMNS = RequestReceipt._fields  # a receipt is its row
# Receipts per INSERT (so per trip to the writer thread); the rest wait for the next trip.
MAX_RECEIPT_ROWS = 64
# Room for the writer's statements and one INSERT per number of receipts, all prepared once.
STATEMENT_CACHE = 256


@functools.lru_cache(maxsize=MAX_RECEIPT_ROWS)
def _insert_requests(rows: int) -> str:
    """One INSERT of ``rows`` receipts, their values bound as one flat list.

    A single statement, however many rows: one step of SQLite's for the writer thread
    (each step is a trip of the GIL between the threads), and nothing to parse (a JSON
    text read back with json_extract cost the writer twice the CPU).
    """
    row = "(" + ", ".join("?" * len(_REQUEST_COLUMNS)) + ")"
    return f"INSERT INTO requests ({', '.join(_REQUEST_COLUMNS)}) VALUES " + ", ".join([row] * rows)


BUSY_TIMEOUT_MS = 10_000
_PRAGMAS = (
    f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}",
    "PRAGMA synchronous=FULL",
    "PRAGMA foreign_keys=ON",
    # SECURITY: erased credentials (even sealed) are zeroed on disk, not left in free pages.
    "PRAGMA secure_delete=ON",
)


def _prepare(conn: sqlite3.Connection) -> None:
    """Pragmas, WAL mode first: switching to it needs a lock another process may hold.

    SQLite answers "database is locked" to a journal-mode switch at once, without waiting
    out the busy timeout, when another connection is opening the same file (replicas or a
    CLI starting together): wait and try again, up to the busy timeout.
    """
    conn.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
    deadline = time.monotonic() + BUSY_TIMEOUT_MS / 1000
    while True:
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            break
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(0.02)
    for pragma in _PRAGMAS:
        conn.execute(pragma)


def _migrate(now: float, conn: sqlite3.Connection) -> None:
    conn.execute("BEGIN IMMEDIATE")
    try:
        conn.execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations"
            " (version INTEGER PRIMARY KEY, applied REAL NOT NULL)"
        )
        done = {r[0] for r in conn.execute("SELECT version FROM schema_migrations")}
        for version, script in migrations("sqlite"):
            if version in done:
                continue
            for statement in _statements(script):
                conn.execute(statement)
            conn.execute("INSERT INTO schema_migrations VALUES (?, ?)", (version, now))
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


class SqliteStore:
    """Store backed by one SQLite file."""

    def __init__(self, path: str | Path, *, clock: Callable[[], float] | None = None) -> None:
        self.path = str(path)
        self._lock = asyncio.Lock()
        self._queued = 0  # logical transactions waiting for the writer lock
        self._batch: asyncio.Future[None] | None = None  # the open group commit, if any
        self._batch_size = 0
        self._batch_begun = False  # the open batch's BEGIN has been queued
        self._committing = 0  # COMMITs queued to the writer thread and not yet done
        self._flushes: set[asyncio.Task[None]] = set()
        self._receipts: list[tuple[Any, ...]] = []  # request receipts waiting for a batch
        self._receipt_waiters: list[asyncio.Future[None]] = []  # theirs, in the same order
        self._receipts_flusher: asyncio.Task[None] | None = None
        self.commits = 0  # SQLite commits made (fewer than transactions, thanks to batching)
        self._writer: Writer | None = None
        self._reader: aiosqlite.Connection | None = None
        self._clock = clock or time.time

    @classmethod
    def from_url(cls, url: str, **kwargs: Any) -> SqliteStore:
        """``sqlite:///relative/or/absolute.db``."""
        return cls(url.removeprefix("sqlite:///") or "cosigner.db", **kwargs)

    @property
    def _w(self) -> Writer:
        assert self._writer is not None, "store is not open"
        return self._writer

    @property
    def _r(self) -> aiosqlite.Connection:
        assert self._reader is not None, "store is not open"
        return self._reader

    async def open(self) -> None:
        if self.path != ":memory:":
            Path(self.path).expanduser().resolve().parent.mkdir(parents=True, exist_ok=True)
        self._writer = Writer()
        await self._writer.open(self.path)
        await self._writer.call(_prepare)
        async with self._lock:
            await self._writer.call(partial(_migrate, self._clock()))
        self._reader = await aiosqlite.connect(self.path, isolation_level=None)
        await self._reader.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")

    async def close(self) -> None:
        while self._flushes:
            await asyncio.gather(*self._flushes, return_exceptions=True)
        if self._writer is not None and self._batch is not None:
            # Left open for a COMMIT still on its way when we were asked to close: commit it
            # now, so that no caller waits for a batch that a closed connection rolled back.
            async with self._lock:
                if self._batch is not None:
                    last = self._last_trip(_commit_only, self._batch, True)
                    await asyncio.gather(last, return_exceptions=True)
        if self._reader is not None:
            await self._reader.close()
        if self._writer is not None:
            await self._writer.close()
        self._reader = self._writer = None

    @asynccontextmanager
    async def transaction(self, *, one_statement: bool = False) -> AsyncIterator[SqliteTx]:
        """One logical transaction; several share one SQLite commit (group commit).

        Logical transactions take the writer lock in turn and run inside a SAVEPOINT of the
        batch's BEGIN IMMEDIATE. The lock is held only until a transaction's last trip is
        queued (trips run in the order they are queued), so the next one starts at once. The
        last one in while nobody waits for the lock adds the COMMIT to its last trip: one
        fsync makes the whole batch durable, and every caller returns only after it. A
        failing logical transaction rolls back to its savepoint and leaves the rest of the
        batch alone.

        ``one_statement``: the transaction runs exactly one statement, which SQLite undoes
        by itself if it fails, so it goes without a SAVEPOINT (and its RELEASE).
        """
        self._queued += 1
        try:
            await self._lock.acquire()
        except BaseException:
            self._queued -= 1
            self._flush_soon()  # the holder may have left the batch to us
            raise
        self._queued -= 1
        tx: SqliteTx | None = None
        try:
            batch = self._batch
            if batch is None:
                batch = self._batch = asyncio.get_running_loop().create_future()
                self._batch_size, self._batch_begun = 0, False
            tx = SqliteTx(
                self._w, self._clock(), begin=not self._batch_begun, savepoint=not one_statement
            )
            try:
                yield tx
            except BaseException:
                commit = self._commit_due()
                self._last_trip(partial(_abort, tx.started, commit, tx.lost), batch, commit)
                raise
            self._batch_size += 1
            commit = self._commit_due()
            last = self._last_trip(tx.finish(commit), batch, commit)
        finally:
            if tx is not None and tx.started:
                self._batch_begun = True
            self._lock.release()
        outcome = await asyncio.shield(last)
        if outcome.error is not None:
            raise outcome.error
        # Durable before we answer; a cancelled caller does not cancel the shared commit.
        await asyncio.shield(batch)

    def _commit_due(self) -> bool:
        """Commit with this trip, unless someone is queued to join the batch.

        Nor while the previous batch's COMMIT is still on its way: this batch stays open for
        whoever comes meanwhile, and is committed when that one is done (``_settle``).
        """
        if self._batch_size >= MAX_BATCH:
            return True
        return not self._queued and not self._committing

    def _last_trip(
        self,
        step: Callable[[sqlite3.Connection], _Outcome],
        batch: asyncio.Future[None],
        commit: bool,
    ) -> asyncio.Future[_Outcome]:
        """Queue a transaction's last trip (under the lock); settle the batch when it ends."""
        if commit:
            self._batch = None  # whoever comes next opens a new batch, queued behind this one
            self._committing += 1
        done = self._w.submit(step)
        done.add_done_callback(partial(self._settle, batch, commit))
        return done

    def _settle(
        self, batch: asyncio.Future[None], commit: bool, done: asyncio.Future[_Outcome]
    ) -> None:
        try:
            outcome = done.result()
        except Exception as exc:  # a bug in a step: fail the batch rather than leave it hanging
            outcome = _Outcome(error=exc, commit_error=exc, closed=True)
        if commit:
            self._committing -= 1
            self._flush_soon()  # the batch that stayed open while this one committed
        if not (commit or outcome.closed):
            return
        if self._batch is batch:
            self._batch = None  # its BEGIN failed, or SQLite rolled it back: open a new one
        if batch.done():
            return
        if outcome.commit_error is not None:
            batch.set_exception(outcome.commit_error)
            batch.exception()  # members that are still waiting get it; no "never retrieved"
        else:
            self.commits += commit
            batch.set_result(None)

    def _flush_soon(self) -> None:
        """Commit an open batch whose last joiner gave up before taking the lock."""

        async def flush() -> None:
            async with self._lock:
                batch = self._batch
                if batch is None or self._queued or self._committing:
                    return  # already committed, or someone else will
                done = self._last_trip(_commit_only, batch, True)
            await asyncio.shield(done)

        if self._batch is not None and self._queued == 0 and not self._committing:
            task = asyncio.get_running_loop().create_task(flush())
            self._flushes.add(task)
            task.add_done_callback(self._flushes.discard)

    async def _write(self, sql: str, args: Sequence[Any]) -> None:
        async with self.transaction() as tx:
            tx.defer(sql, args)

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
        return [_decision(r) for r in await self._rows(_DECISIONS, (action_id,))]

    async def events(self, action_id: str) -> list[EventRecord]:
        rows = await self._rows(
            "SELECT action_id, ts, kind, data FROM events WHERE action_id = ? ORDER BY id",
            (action_id,),
        )
        return [EventRecord(a, ts, k, json.loads(d)) for a, ts, k, d in rows]

    async def add_event(self, event: EventRecord) -> None:
        async with self.transaction() as tx:
            await tx.add_event(event)

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
        """Queue the receipt for the next batch; return once that batch is committed.

        Receipts are the hot path of allowed writes: one statement per batch instead of a
        logical transaction per receipt. Each caller waits on a future of its own, which
        the flusher resolves: a cancelled caller cancels only that, never the batch.
        """
        done = asyncio.get_running_loop().create_future()
        self._receipts.append(receipt)  # a NamedTuple in the columns' order: the row itself
        self._receipt_waiters.append(done)
        if self._receipts_flusher is None:
            task = asyncio.get_running_loop().create_task(self._flush_receipts())
            self._receipts_flusher = task
            self._flushes.add(task)
            task.add_done_callback(self._flushes.discard)
        await done

    async def _flush_receipts(self) -> None:
        """Write queued receipts, a batch at a time, until none are left.

        One batch at a time: receipts that come while one is being committed wait for the
        next, so a busy gateway writes many per transaction instead of many transactions.
        A batch is one INSERT of up to MAX_RECEIPT_ROWS rows: a single statement, which
        needs no savepoint.
        """
        try:
            while self._receipts:
                waiters: list[asyncio.Future[None]] = []
                failed: BaseException | None = None
                try:
                    async with self.transaction(one_statement=True) as tx:
                        # Taken once the batch is ours: what came meanwhile goes in too.
                        rows = self._receipts[:MAX_RECEIPT_ROWS]
                        waiters = self._receipt_waiters[:MAX_RECEIPT_ROWS]
                        del self._receipts[:MAX_RECEIPT_ROWS]
                        del self._receipt_waiters[:MAX_RECEIPT_ROWS]
                        values = list(itertools.chain.from_iterable(rows))
                        tx.defer(_insert_requests(len(rows)), values)
                except BaseException as exc:
                    failed = exc
                    if not waiters:  # failed before taking the batch: fail everyone queued
                        waiters, self._receipt_waiters = self._receipt_waiters, []
                        self._receipts = []
                for waiter in waiters:
                    if waiter.done():
                        continue
                    if failed is None:
                        waiter.set_result(None)
                    else:
                        waiter.set_exception(failed)
                if failed is not None and not isinstance(failed, Exception):
                    # Stopped (cancelled): nothing will write what is still queued either.
                    rest, self._receipt_waiters, self._receipts = self._receipt_waiters, [], []
                    for waiter in rest:
                        if not waiter.done():
                            waiter.set_exception(failed)
                    raise failed
        finally:
            self._receipts_flusher = None

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
        async with self.transaction() as tx:
            rows = await tx.rows(
                f"SELECT {_OUTBOX_COLUMNS} FROM outbox WHERE kind = ? AND status = 'pending'"
                " AND next_attempt_at <= ? AND (lease_until IS NULL OR lease_until < ?)"
                " ORDER BY next_attempt_at LIMIT ?",
                (kind, now, now, limit),
            )
            items = [_outbox(r) for r in rows]
            tx.defer_many(
                "UPDATE outbox SET lease_until = ? WHERE id = ?",
                [(now + lease, item.id) for item in items],
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
        async with self.transaction() as tx:
            rows = await tx.rows(
                "SELECT COUNT(*), COALESCE(SUM(amount), 0) FROM budget_entries"
                " WHERE rule = ? AND scope_key = ? AND ts > ?",
                (rule, scope_key, since),
            )
            tally = BudgetTally(*rows[0]) if rows else BudgetTally()
            if (count_max is not None and tally.count + 1 > count_max) or (
                sum_max is not None and tally.total + amount > sum_max
            ):
                return False, tally
            tx.defer(
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
        async with self.transaction() as tx:
            return await tx.rowcount(sql, args)

    async def ping(self) -> None:
        await self._rows("SELECT 1")

    async def subscribe(self, callback: Callable[[str], None]) -> None:
        """No-op: one process writes this file, and it wakes its own waiters."""


def _statements(script: str) -> list[str]:
    """Split a migration script into statements (no semicolons inside our SQL literals)."""
    lines = [ln for ln in script.splitlines() if not ln.strip().startswith("--")]
    return [s.strip() for s in "\n".join(lines).split(";") if s.strip()]
