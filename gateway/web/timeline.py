"""A receipt's timeline: the action's events turned into lines a person can read."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from gateway.store.base import EventRecord, OutboxItem
from gateway.templating import oneline

Details = list[tuple[str, str]]


@dataclass(frozen=True, slots=True)
class Entry:
    """One line of the timeline."""

    ts: float
    kind: str
    title: str
    tone: str = "info"  # info | ok | bad | wait
    details: Details = field(default_factory=list)
    note: str | None = None


def _s(value: Any) -> str:
    return oneline(value, 2000)


def _held(d: Mapping[str, Any]) -> tuple[str, str, Details]:
    return f"Held by rule {_s(d.get('rule', '?'))}", "wait", [("reason", _s(d.get("reason", "")))]


def _email_sent(d: Mapping[str, Any]) -> tuple[str, str, Details]:
    details = [("attempt", _s(d.get("attempt", 1)))]
    if d.get("transport"):
        details.append(("via", _s(d["transport"])))
    return f"Emailed {_s(d.get('to', '?'))}", "info", details


def _email_failed(d: Mapping[str, Any]) -> tuple[str, str, Details]:
    details = [("attempt", _s(d.get("attempt", "?"))), ("error", _s(d.get("error", "")))]
    if d.get("will_retry"):
        details.append(("next", f"retry in {d.get('retry_in')} s"))
    else:
        details.append(("next", "gave up"))
    return f"Email to {_s(d.get('to', '?'))} failed", "bad", details


def _email_skipped(d: Mapping[str, Any]) -> tuple[str, str, Details]:
    return f"Email to {_s(d.get('to', '?'))} not sent", "info", [("why", _s(d.get("reason", "")))]


def _decision(d: Mapping[str, Any]) -> tuple[str, str, Details]:
    approved = d.get("decision") == "approve"
    verb = "Approved" if approved else "Rejected"
    title = f"{verb} by {_s(d.get('reviewer', '?'))} via {_s(d.get('via', '?'))}"
    details = [(f"changed {_s(k)}", f"→ {_s(v)}") for k, v in (d.get("params") or {}).items()]
    return title, "ok" if approved else "bad", details


def _forward_attempt(d: Mapping[str, Any]) -> tuple[str, str, Details]:
    status = d.get("status")
    answer = f"Stripe answered {status}" if status is not None else "no answer"
    details = [("latency", f"{d.get('latency_ms', '?')} ms")]
    if d.get("error"):
        details.append(("error", _s(d["error"])))
    if d.get("will_retry"):
        details.append(("next", f"retry in {d.get('delay', '?')} s"))
    ok = status is not None and 200 <= int(status) < 300
    return f"Attempt {d.get('attempt', '?')} to Stripe: {answer}", "ok" if ok else "bad", details


def _callback(d: Mapping[str, Any]) -> tuple[str, str, Details]:
    status = d.get("status")
    details = [("url", _s(d.get("url", "")))]
    if status is not None:
        details.append(("status", _s(status)))
    if d.get("latency_ms") is not None:
        details.append(("latency", f"{d['latency_ms']} ms"))
    if d.get("error"):
        details.append(("error", _s(d["error"])))
    delivered = bool(d.get("delivered"))
    title = f"Callback attempt {d.get('attempt', '?')}: " + ("delivered" if delivered else "failed")
    return title, "ok" if delivered else "bad", details


def _status(title: str, tone: str) -> Callable[[Mapping[str, Any]], tuple[str, str, Details]]:
    def render(d: Mapping[str, Any]) -> tuple[str, str, Details]:
        details: Details = []
        if d.get("response_code") is not None:
            details.append(("Stripe status", _s(d["response_code"])))
        if d.get("last_error"):
            details.append(("error", _s(d["last_error"])))
        if d.get("by"):
            details.append(("by", _s(d["by"])))
        return title, tone, details

    return render


_KINDS: dict[str, Callable[[Mapping[str, Any]], tuple[str, str, Details]]] = {
    "held": _held,
    "email_sent": _email_sent,
    "email_failed": _email_failed,
    "email_skipped": _email_skipped,
    "decision": _decision,
    "pending": _status("Quorum reached: approved for sending", "ok"),
    "forward_started": _status("Sending to Stripe", "info"),
    "forward_attempt": _forward_attempt,
    "completed": _status("Completed: Stripe answered", "ok"),
    "failed": _status("Failed: could not be delivered to Stripe", "bad"),
    "rejected": _status("Rejected: will not be sent to Stripe", "bad"),
    "cancelled": _status("Cancelled", "bad"),
    "expired": _status("Expired: nobody decided in time; never sent", "bad"),
    "callback": _callback,
}


def _generic(kind: str, d: Mapping[str, Any]) -> tuple[str, str, Details]:
    return kind.replace("_", " ").capitalize(), "info", [(str(k), _s(v)) for k, v in d.items()]


def timeline(events: Iterable[EventRecord], queued: Iterable[OutboxItem] = ()) -> list[Entry]:
    """Every event, oldest first, then deliveries still waiting in the outbox."""
    entries = []
    for event in events:
        fn = _KINDS.get(event.kind)
        title, tone, details = fn(event.data) if fn else _generic(event.kind, event.data)
        note = event.data.get("note") if event.kind == "decision" else None
        entries.append(Entry(event.ts, event.kind, title, tone, details, note or None))
    for item in queued:
        if item.status != "pending":
            continue
        to = item.payload.get("to") or item.payload.get("url") or ""
        what = "Email" if item.kind == "mail" else item.kind.capitalize()
        details = [("attempts so far", str(item.attempts))] if item.attempts else []
        if item.last_error:
            details.append(("last error", _s(item.last_error)))
        title = f"{what} to {_s(to)} queued"
        entries.append(Entry(item.next_attempt_at, f"queued_{item.kind}", title, "wait", details))
    return entries
