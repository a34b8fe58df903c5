"""The action state machine: the only place action statuses change.

    awaiting_approval ──approve (quorum)──▶ pending ──Stripe answered──▶ completed
            │                                  └────no answer after retries─▶ failed
            ├──reject──▶ rejected
            ├──cancel──▶ cancelled
            └──time up─▶ expired

Every transition is one conditional update inside a store transaction
(``WHERE status = <expected>``), so two clicks, two reviewers or two
replicas can never both win. Terminal statuses never change again.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from gateway.canonical import CanonicalRequest, with_params
from gateway.crypto import Keyring
from gateway.errors import Conflict, InvalidRequest, NotFound
from gateway.forwarder import Attempt, Forwarder, ForwardFailed, Outbound, UpstreamResponse
from gateway.ids import sortable_id
from gateway.notify import Notifier
from gateway.rules import Decision
from gateway.store.base import (
    TERMINAL,
    ActionRecord,
    DecisionRecord,
    EventRecord,
    Store,
    Tx,
)
from gateway.summary import strict_int
from gateway.tasks import TaskSet

log = logging.getLogger("cosigner.actions")

ALLOWED: dict[str, frozenset[str]] = {
    "awaiting_approval": frozenset({"pending", "rejected", "cancelled", "expired"}),
    "pending": frozenset({"completed", "failed"}),
}
CREDENTIAL_PURPOSE = "held-credential"
# Seconds a forward lease outlives one attempt: room for the store write that renews
# it and for clock skew between replicas. After a crash, another replica (or the
# restarted one) resumes the forward once FORWARD_TIMEOUT + this has passed.
LEASE_MARGIN = 5.0
KEPT_RESPONSE_HEADERS = ("Request-Id", "Content-Type", "Idempotent-Replayed", "Stripe-Version")


def request_hash(req: CanonicalRequest) -> str:
    """What an Idempotency-Key is bound to: method, canonical path, query and body."""
    h = hashlib.sha256()
    for part in (req.method.encode(), req.path.encode(), req.query.encode(), req.body):
        h.update(len(part).to_bytes(8, "big"))
        h.update(part)
    return h.hexdigest()


@dataclass(frozen=True, slots=True)
class HoldRequest:
    """Everything the proxy knows about a request a rule held."""

    request: CanonicalRequest
    decision: Decision
    agent: str
    credential_id: str
    upstream_key: str
    headers: Mapping[str, str]
    idempotency_key: str | None
    account: str | None
    justification: str | None
    callback_url: str | None
    summary: str
    context: Mapping[str, Any]
    reviewers: tuple[str, ...]


class ActionService:
    """Creates, decides, expires and forwards actions."""

    def __init__(
        self,
        store: Store,
        keyring: Keyring,
        forwarder: Forwarder,
        notifier: Notifier,
        tasks: TaskSet,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self._keyring = keyring
        self._forwarder = forwarder
        self.notifier = notifier
        self._tasks = tasks
        self._clock = clock
        self._inflight: set[str] = set()

    # -- the one place statuses change -------------------------------------------------

    async def _move(
        self,
        tx: Tx,
        action: ActionRecord,
        to: str,
        now: float,
        fields: Mapping[str, Any] | None = None,
        event: Mapping[str, Any] | None = None,
    ) -> bool:
        """Conditionally move ``action`` to status ``to``; False if someone else moved it first."""
        if to not in ALLOWED.get(action.status, frozenset()):
            return False
        changes: dict[str, Any] = {"status": to, "updated": now, **(fields or {})}
        if action.status == "awaiting_approval":
            changes["join_key"] = None  # a later identical DELETE starts a new action
        if to in TERMINAL:
            # SECURITY: credentials are kept only while the action can still be forwarded.
            changes["credential_sealed"] = None
            changes["lease_until"] = None
            changes.setdefault("completed_at", int(now))
        if not await tx.update_action(action.id, (action.status,), changes):
            return False
        await tx.add_event(
            EventRecord(action.id, now, to, {**_event_data(changes), **(event or {})})
        )
        if to in TERMINAL and action.callback_url:
            await tx.enqueue("callback", action.id, {"url": action.callback_url})
        for name, value in changes.items():
            setattr(action, name, value)
        return True

    def _changed(self, action_id: str) -> None:
        self.notifier.publish(action_id)

    # -- creation -----------------------------------------------------------------------

    async def hold(self, h: HoldRequest) -> tuple[ActionRecord, bool]:
        """Persist a held request durably; returns the action and whether it is new."""
        now = self._clock()
        action_id = sortable_id("act_")
        req = h.request
        req_hash = request_hash(req)
        join_key = req_hash if req.method == "DELETE" else None
        action = ActionRecord(
            id=action_id,
            status="awaiting_approval",
            created=int(now),
            updated=now,
            expires_at=int(now) + h.decision.expires_after,
            agent=h.agent,
            credential_id=h.credential_id,
            method=req.method,
            path=req.path,
            query=req.query,
            content_type=req.content_type,
            body=req.body,
            request_hash=req_hash,
            params=req.params,
            headers=dict(h.headers),
            summary=h.summary,
            rule=h.decision.rule,
            reason=h.decision.reason,
            approvals_required=h.decision.approvals,
            reviewers=list(h.reviewers),
            editable=list(h.decision.editable),
            idempotency_key=h.idempotency_key if req.method != "DELETE" else None,
            join_key=join_key,
            account=h.account,
            justification=h.justification,
            callback_url=h.callback_url or h.decision.callback,
            credential_sealed=self._keyring.seal(
                CREDENTIAL_PURPOSE, h.upstream_key.encode(), action_id.encode()
            ),
            context=dict(h.context),
        )
        async with self.store.transaction() as tx:
            stored = await tx.insert_action(action)
            if stored.id == action_id:
                await tx.add_event(
                    EventRecord(
                        action_id,
                        now,
                        "held",
                        {"rule": action.rule, "reason": action.reason, "agent": action.agent},
                    )
                )
                for reviewer in action.reviewers:
                    await tx.enqueue("mail", action_id, {"to": reviewer})
        return stored, stored.id == action_id

    # -- reading ------------------------------------------------------------------------

    async def get(self, action_id: str) -> ActionRecord:
        """The action; an undecided one past its time reads as expired at once."""
        action = await self.store.get_action(action_id)
        if action is None:
            raise NotFound(f"No such action: '{action_id}'", param="id")
        if action.status == "awaiting_approval" and action.expires_at <= self._clock():
            await self.expire(action_id)
            action = await self.store.get_action(action_id)
            assert action is not None
        return action

    # -- decisions ----------------------------------------------------------------------

    async def approve(
        self,
        action_id: str,
        *,
        reviewer: str,
        via: str,
        note: str | None = None,
        params: Mapping[str, Any] | None = None,
    ) -> ActionRecord:
        """Count one reviewer's approval; at quorum the action goes to Stripe."""
        return await self._decide(action_id, "approve", reviewer, via, note, params or {})

    async def reject(
        self, action_id: str, *, reviewer: str, via: str, note: str | None = None
    ) -> ActionRecord:
        """One rejection ends the action."""
        return await self._decide(action_id, "reject", reviewer, via, note, {})

    async def _decide(
        self,
        action_id: str,
        decision: Literal["approve", "reject"],
        reviewer: str,
        via: str,
        note: str | None,
        edits: Mapping[str, Any],
    ) -> ActionRecord:
        reviewer = reviewer.strip()
        if not reviewer:
            raise InvalidRequest("A reviewer is required.", param="reviewer")
        now = self._clock()
        problem: Exception | None = None
        async with self.store.transaction() as tx:
            action = await tx.get_action(action_id)
            if action is None:
                raise NotFound(f"No such action: '{action_id}'", param="id")
            if action.status == "awaiting_approval" and action.expires_at <= now:
                await self._move(tx, action, "expired", now)
                problem = Conflict(f"Action {action_id} has expired.", status="expired")
            elif action.status != "awaiting_approval":
                raise Conflict(
                    f"Action {action_id} is {action.status}, not awaiting_approval.",
                    status=action.status,
                )
            else:
                merged = validate_edits(action, edits) if edits else None
                recorded = await tx.insert_decision(
                    DecisionRecord(
                        action_id,
                        reviewer,
                        decision,
                        note,
                        via,
                        int(now),
                        dict(edits) if edits else None,
                    )
                )
                if not recorded:
                    raise Conflict(
                        f"{reviewer} has already decided action {action_id}; one reviewer "
                        "counts once.",
                        code="reviewer_already_decided",
                    )
                await tx.add_event(
                    EventRecord(
                        action_id,
                        now,
                        "decision",
                        {
                            "reviewer": reviewer,
                            "decision": decision,
                            "note": note,
                            "via": via,
                            "params": dict(edits) if edits else None,
                        },
                    )
                )
                if decision == "reject":
                    await self._move(tx, action, "rejected", now)
                else:
                    if merged is not None:
                        await tx.update_action(
                            action_id, ("awaiting_approval",), {"modified_params": merged}
                        )
                        action.modified_params = merged
                    approvals = sum(
                        1 for d in await tx.decisions(action_id) if d.decision == "approve"
                    )
                    if approvals >= action.approvals_required:
                        await self._move(tx, action, "pending", now)
        self._changed(action_id)
        if problem is not None:
            raise problem
        if action.status == "pending":
            self.schedule_forward(action_id)
        return action

    async def cancel(self, action_id: str, *, by: str) -> ActionRecord:
        """The agent (or an admin) withdraws an undecided action."""
        now = self._clock()
        async with self.store.transaction() as tx:
            action = await tx.get_action(action_id)
            if action is None:
                raise NotFound(f"No such action: '{action_id}'", param="id")
            if action.status != "awaiting_approval":
                raise Conflict(
                    f"Action {action_id} is {action.status}, not awaiting_approval.",
                    status=action.status,
                )
            await self._move(tx, action, "cancelled", now, event={"by": by})
        self._changed(action_id)
        return action

    async def expire(self, action_id: str) -> bool:
        """Expire one undecided action whose time is up."""
        now = self._clock()
        async with self.store.transaction() as tx:
            action = await tx.get_action(action_id)
            if action is None or action.status != "awaiting_approval" or action.expires_at > now:
                return False
            moved = await self._move(tx, action, "expired", now)
        if moved:
            self._changed(action_id)
        return moved

    async def expire_due(self, limit: int = 500) -> int:
        """Expire every undecided action past its time; how many were expired."""
        count = 0
        for action_id in await self.store.due_expiries(self._clock(), limit):
            count += await self.expire(action_id)
        return count

    # -- forwarding ---------------------------------------------------------------------

    def schedule_forward(self, action_id: str) -> None:
        """Forward in the background (tracked, drained on shutdown)."""
        if action_id not in self._inflight and not self._tasks.closing:
            self._tasks.spawn(self.forward(action_id), name=f"forward-{action_id}")

    async def resume_forwards(self, limit: int = 100) -> int:
        """Pick up approved actions nobody is forwarding (after a restart or a dead replica)."""
        ids = await self.store.claimable_forwards(self._clock(), limit)
        for action_id in ids:
            self.schedule_forward(action_id)
        return len(ids)

    async def _claim(self, action_id: str) -> ActionRecord | None:
        """Take the lease on a pending action and count the attempt, before anything is sent."""
        now = self._clock()
        async with self.store.transaction() as tx:
            action = await tx.get_action(action_id)
            if action is None or action.status != "pending":
                return None
            if action.lease_until is not None and action.lease_until > now:
                return None
            lease = now + self._forwarder.attempt_timeout + LEASE_MARGIN
            if not await tx.update_action(
                action_id, ("pending",), {"lease_until": lease, "updated": now}
            ):
                return None
            action.lease_until = lease
            await tx.add_event(EventRecord(action_id, now, "forward_started", {}))
        return action

    async def forward(self, action_id: str) -> None:
        """Send an approved action to Stripe (at most once: same idempotency key every time)."""
        if action_id in self._inflight:
            return
        self._inflight.add(action_id)
        try:
            action = await self._claim(action_id)
            if action is None:
                return
            await self._forward_claimed(action)
        finally:
            self._inflight.discard(action_id)
        self._changed(action_id)

    def outbound(self, action: ActionRecord) -> Outbound:
        """The exact request to send: approved bytes, or the reviewer's edits re-encoded."""
        if action.credential_sealed is None:
            raise RuntimeError(f"action {action.id} has no credentials left")
        key = self._keyring.open(
            CREDENTIAL_PURPOSE, action.credential_sealed, action.id.encode()
        ).decode()
        query, body, content_type = action.query, action.body, action.content_type
        if action.modified_params:
            edited = with_params(
                CanonicalRequest(
                    action.method,
                    action.path,
                    action.query,
                    action.params,
                    action.body,
                    action.content_type,
                ),
                action.modified_params,
            )
            query, body, content_type = edited.query, edited.body, edited.content_type
        headers = {k: v for k, v in action.headers.items() if k.lower() != "idempotency-key"}
        headers["Idempotency-Key"] = action.idempotency_key or f"cosigner-{action.id}"
        headers["Authorization"] = f"Bearer {key}"
        if content_type and body:
            headers["Content-Type"] = content_type
        return Outbound(action.method, action.path, query, headers, body)

    async def _forward_claimed(self, action: ActionRecord) -> None:
        out = self.outbound(action)

        async def on_attempt(attempt: Attempt) -> None:
            now = self._clock()
            async with self.store.transaction() as tx:
                fresh = await tx.get_action(action.id)
                attempts = (fresh.attempts if fresh else action.attempts) + 1
                await tx.update_action(
                    action.id,
                    ("pending",),
                    {
                        "attempts": attempts,
                        # Renewed on every attempt: a dead forwarder's lease runs out soon.
                        "lease_until": now
                        + attempt.delay
                        + self._forwarder.attempt_timeout
                        + LEASE_MARGIN,
                        "last_error": attempt.error,
                    },
                )
                await tx.add_event(
                    EventRecord(
                        action.id,
                        now,
                        "forward_attempt",
                        {
                            "attempt": attempt.number,
                            "status": attempt.status,
                            "error": attempt.error,
                            "latency_ms": round(attempt.latency_ms, 1),
                            "will_retry": attempt.will_retry,
                            "delay": round(attempt.delay, 2),
                        },
                    )
                )

        try:
            resp = await self._forwarder.send(out, on_attempt)
        except ForwardFailed as exc:
            await self.finish(action.id, None, str(exc), exc.last)
        else:
            await self.finish(action.id, resp, None, resp)

    async def finish(
        self,
        action_id: str,
        resp: UpstreamResponse | None,
        error: str | None,
        last: UpstreamResponse | None,
    ) -> None:
        """Record Stripe's answer (completed) or the failure (failed)."""
        now = self._clock()
        fields: dict[str, Any] = {"last_error": error}
        if last is not None:
            fields["response_code"] = last.status
            fields["response_body"] = last.body.decode("utf-8", "replace")
            fields["response_headers"] = {
                k: last.headers[k] for k in KEPT_RESPONSE_HEADERS if k in last.headers
            }
        async with self.store.transaction() as tx:
            action = await tx.get_action(action_id)
            if action is None:
                return
            await self._move(tx, action, "completed" if resp is not None else "failed", now, fields)


def validate_edits(action: ActionRecord, edits: Mapping[str, Any]) -> dict[str, Any]:
    """Reviewer edits: only ``editable`` fields, and an amount may only go down."""
    current = {**action.params, **(action.modified_params or {})}
    for name, value in edits.items():
        if name not in action.editable:
            raise InvalidRequest(
                f"'{name}' is not editable for this action (editable: "
                f"{', '.join(action.editable) or 'none'}).",
                param=name,
                code="parameter_not_editable",
            )
        if not isinstance(value, str | int) or isinstance(value, bool):
            raise InvalidRequest(f"'{name}' must be a string or integer.", param=name)
        if name == "amount":
            new, old = strict_int(value), strict_int(current.get("amount"))
            if new is None or new <= 0:
                raise InvalidRequest("amount must be a positive integer.", param="amount")
            limit = old if old is not None else strict_int(action.context.get("amount_refundable"))
            # SECURITY: a reviewer may lower what moves, never raise it.
            if limit is None or new > limit:
                raise InvalidRequest(
                    f"amount may only be lowered (at most {limit}).", param="amount"
                )
    return {**(action.modified_params or {}), **{k: str(v) for k, v in edits.items()}}


def _event_data(fields: Mapping[str, Any]) -> dict[str, Any]:
    keep = ("response_code", "last_error")
    return {k: fields[k] for k in keep if fields.get(k) is not None}
