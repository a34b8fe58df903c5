"""What the gateway keeps, and the interface every store (SQLite, PostgreSQL) implements.

The store knows rows, not HTTP or rules. Status changes are made by
``gateway.actions`` through ``Tx.update_action`` — one conditional update —
so two clicks, two reviewers or two replicas can never both win.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from typing import Any, Literal, NamedTuple, Protocol, get_args

Status = Literal[
    "awaiting_approval", "pending", "completed", "failed", "rejected", "cancelled", "expired"
]
STATUSES: tuple[Status, ...] = get_args(Status)  # every status, in lifecycle order
TERMINAL: frozenset[str] = frozenset({"completed", "failed", "rejected", "cancelled", "expired"})
OPEN: frozenset[str] = frozenset({"awaiting_approval", "pending"})


@dataclass(slots=True)
class ActionRecord:
    """One held request and everything that happened to it."""

    id: str
    status: str
    created: int
    updated: float
    expires_at: int
    agent: str
    credential_id: str  # keyed hash of the credential: "same credential" without storing it
    method: str
    path: str
    query: str
    content_type: str | None
    body: bytes
    request_hash: str  # what an Idempotency-Key is bound to
    params: dict[str, Any]
    headers: dict[str, str]  # forwardable Stripe headers (Stripe-Version, Stripe-Account ...)
    summary: str
    rule: str
    reason: str
    approvals_required: int
    reviewers: list[str]
    editable: list[str]
    idempotency_key: str | None = None  # the agent's own key, if any
    join_key: str | None = None  # identical held DELETEs join while undecided
    account: str | None = None
    justification: str | None = None
    callback_url: str | None = None
    credential_sealed: bytes | None = None  # AES-GCM; erased once terminal
    context: dict[str, Any] = field(default_factory=dict)  # looked-up facts for reviewers
    modified_params: dict[str, Any] | None = None
    response_code: int | None = None
    response_body: str | None = None
    response_headers: dict[str, str] | None = None
    last_error: str | None = None
    attempts: int = 0
    completed_at: int | None = None
    lease_until: float | None = None


@dataclass(frozen=True, slots=True)
class DecisionRecord:
    """A reviewer's approve or reject."""

    action_id: str
    reviewer: str
    decision: Literal["approve", "reject"]
    note: str | None
    via: str
    created: int
    params: dict[str, Any] | None = None


@dataclass(frozen=True, slots=True)
class EventRecord:
    """One line of a receipt's timeline."""

    action_id: str
    ts: float
    kind: str
    data: dict[str, Any]


class RequestReceipt(NamedTuple):
    """A request that was decided without a hold (allow, deny, refusal).

    A NamedTuple, not a frozen dataclass: one is built for every allowed write, and a
    tuple is as read-only and cheaper to build.
    """

    id: str
    ts: float
    agent: str
    method: str
    path: str
    rule: str
    decision: str
    status: int
    latency_ms: float
    action_id: str | None = None


@dataclass(frozen=True, slots=True)
class OutboxItem:
    """A durable message to deliver: a reviewer email or a callback."""

    id: int
    kind: str
    action_id: str
    payload: dict[str, Any]
    attempts: int
    next_attempt_at: float
    status: str
    last_error: str | None


@dataclass(frozen=True, slots=True)
class BudgetTally:
    """What one budget counted in a window: matched requests and the sum of their amounts."""

    count: int = 0
    total: int = 0


@dataclass(frozen=True, slots=True)
class OutboxStat:
    """How many outbox items of one kind are in one status (for metrics)."""

    kind: str
    status: str
    items: int
    with_error: int  # of these, how many last failed to deliver


@dataclass(frozen=True, slots=True)
class AgentKeyRecord:
    """A gateway-issued agent key: only its SHA-256 is kept, never the key itself."""

    name: str  # the agent's name: rules (match.agent), budgets and receipts use it
    key_hash: str  # SHA-256 hex of the whole key
    prefix: str  # "cos_", for display
    last4: str  # for display: cos_…abcd
    created: int
    stripe_key_sealed: bytes | None = None  # AES-GCM, purpose "agent-stripe-key", AAD = name
    revoked_at: int | None = None


@dataclass(frozen=True, slots=True)
class ActionFilter:
    """Filters for listing actions, newest first."""

    status: str | None = None
    agent: str | None = None
    rule: str | None = None
    limit: int = 10
    starting_after: str | None = None


class Tx(Protocol):
    """Primitives run inside one store transaction."""

    async def get_action(self, action_id: str) -> ActionRecord | None:
        """The action, locked for this transaction where the backend can."""

    async def insert_action(self, action: ActionRecord) -> ActionRecord:
        """Insert; on an idempotency or join collision return the existing action instead."""

    async def update_action(
        self, action_id: str, expect: Sequence[str], fields: Mapping[str, Any]
    ) -> bool:
        """Set fields only if the status is one of ``expect``; True if a row changed."""

    async def insert_decision(self, decision: DecisionRecord) -> bool:
        """Record a decision; False when this reviewer already decided this action."""

    async def decisions(self, action_id: str) -> list[DecisionRecord]:
        """Decisions on one action, oldest first."""

    async def add_event(self, event: EventRecord) -> None:
        """Append to an action's timeline."""

    async def enqueue(self, kind: str, action_id: str, payload: Mapping[str, Any]) -> None:
        """Add an outbox item, delivered after this transaction commits."""


class Store(Protocol):
    """A durable store of actions, decisions, timelines, receipts and outboxes."""

    async def open(self) -> None:
        """Connect and migrate."""

    async def close(self) -> None:
        """Flush and disconnect."""

    def transaction(self) -> AbstractAsyncContextManager[Tx]:
        """One atomic unit of work; committed (durably) when the block exits cleanly."""

    async def get_action(self, action_id: str) -> ActionRecord | None:
        """Read one action (committed state)."""

    async def find_idempotent(self, agent: str, key: str) -> ActionRecord | None:
        """The action an agent's Idempotency-Key already made, if any."""

    async def find_joinable(self, agent: str, join_key: str) -> ActionRecord | None:
        """An undecided action an identical DELETE would join."""

    async def list_actions(self, flt: ActionFilter) -> tuple[list[ActionRecord], bool]:
        """A page of actions, newest first, and whether more follow."""

    async def decisions(self, action_id: str) -> list[DecisionRecord]:
        """Decisions on one action, oldest first."""

    async def events(self, action_id: str) -> list[EventRecord]:
        """An action's timeline, oldest first."""

    async def add_event(self, event: EventRecord) -> None:
        """Append to a timeline outside a transaction (e.g. a forward attempt)."""

    async def due_expiries(self, now: float, limit: int) -> list[str]:
        """Undecided actions whose time is up."""

    async def claimable_forwards(self, now: float, limit: int) -> list[str]:
        """Approved actions no live worker holds a lease on."""

    async def record_request(self, receipt: RequestReceipt) -> None:
        """Keep a receipt for a request decided without a hold."""

    async def requests(self, limit: int) -> list[RequestReceipt]:
        """Recent request receipts, newest first."""

    async def claim_outbox(
        self, kind: str, now: float, lease: float, limit: int
    ) -> list[OutboxItem]:
        """Take due outbox items of a kind, leasing them so no one else sends them."""

    async def finish_outbox(
        self,
        item_id: int,
        *,
        status: str,
        attempts: int,
        next_attempt_at: float,
        last_error: str | None,
    ) -> None:
        """Record the outcome of one delivery attempt."""

    async def outbox(self, action_id: str) -> list[OutboxItem]:
        """Outbox items of one action."""

    async def budget_usage(
        self, rule: str, since: float, scope_key: str | None = None
    ) -> dict[str, BudgetTally]:
        """A rule's budget entries after ``since``, per scope key (one key, or all when None)."""

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
        """In ONE transaction: tally the window, and record this match only if it still fits.

        Returns whether it was recorded and the tally before it. Exact under
        concurrency: the recount and the insert are serialised per (rule, scope_key)
        (SQLite: the writer lock and BEGIN IMMEDIATE; PostgreSQL: an advisory lock).
        """

    async def count_by_status(self) -> dict[str, int]:
        """How many actions are in each status (statuses with none may be absent)."""

    async def outbox_stats(self) -> list[OutboxStat]:
        """Outbox items counted by kind and status."""

    async def create_agent_key(self, key: AgentKeyRecord) -> bool:
        """Add a key; a revoked key of the same name is replaced. False if one is active."""

    async def agent_key_by_hash(self, key_hash: str) -> AgentKeyRecord | None:
        """The key (active or revoked) with this SHA-256 hex, if any."""

    async def list_agent_keys(self) -> list[AgentKeyRecord]:
        """Every agent key, by name."""

    async def revoke_agent_key(self, name: str, when: int) -> bool:
        """Mark an active key revoked; False if there is no active key of that name."""

    async def set_agent_stripe_key(self, name: str, sealed: bytes | None) -> bool:
        """Replace a key's sealed Stripe key (re-sealing after a secret-key rotation)."""

    async def ping(self) -> None:
        """Raise if the store is unreachable."""

    async def subscribe(self, callback: Callable[[str], None]) -> None:
        """Call ``callback(action_id)`` whenever another process changes an action's status.

        The seam for replicas: ``ActionService`` wakes this process's waiters
        itself; a store shared by several processes (PostgreSQL LISTEN/NOTIFY)
        also reports the changes the others made. Call after ``open``. A store
        only one process writes to (SQLite) makes this a no-op.
        """
