"""``cosigner actions list | show | approve | reject``: decide from the terminal.

The commands work on the configured database (``COSIGNER_DATABASE``, the
same settings as ``cosigner serve``), not over HTTP, so they need no admin
token: whoever can read the database can decide. Decisions go through the
same state machine as every other channel and are recorded with
``via: "cli"``.

An approval leaves the action ``pending``; the running gateway's forward
worker sends it to Stripe within about a second (exactly once, with the
same idempotency key) and wakes an agent waiting with ``Cosigner-Wait``.
With no gateway running it is forwarded as soon as one starts.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import secrets
import sys
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import aiohttp

from gateway.actions import ActionService
from gateway.crypto import Keyring
from gateway.errors import CosignerError
from gateway.forwarder import Forwarder
from gateway.notify import Notifier
from gateway.settings import SECRET_FILE_NAME, Settings, load_secret_key
from gateway.store import existing_store
from gateway.store.base import STATUSES, ActionFilter, ActionRecord, EventRecord, Store
from gateway.tasks import TaskSet
from gateway.views import action_object

SUMMARY_WIDTH = 48
HELP = """\
Decide held actions from the terminal.

These commands work directly on the configured database (COSIGNER_DATABASE and
the other COSIGNER_* settings, exactly as `cosigner serve` reads them), not over
HTTP: no admin token is needed, so only people who may write that database can
decide. Decisions are recorded with via "cli".

An approval leaves the action `pending`; the running gateway sends it to Stripe
within about a second (once, with the same idempotency key) and answers an agent
waiting with Cosigner-Wait. If no gateway is running, it is forwarded when one
starts.

Exit status: 0 on success, 1 when the action does not exist or cannot be decided
(the reason is printed on stderr).
"""
LoadSettings = Callable[[str | None], Settings]


class CliError(Exception):
    """A problem to print on stderr, exiting 1."""


@dataclass(slots=True)
class Session:
    """What one command works with."""

    settings: Settings
    store: Store
    actions: ActionService

    async def render(self, action: ActionRecord) -> dict[str, Any]:
        """The action object, exactly as the JSON API returns it."""
        decisions = await self.store.decisions(action.id)
        return action_object(action, decisions, self.settings.base_url)


def _keyring(settings: Settings) -> Keyring:
    # Deciding never opens sealed credentials (the gateway forwards), so without a configured
    # secret an ephemeral one does; never generate a secret file as a side effect of a CLI call.
    if settings.secret_key is not None or (settings.data_dir / SECRET_FILE_NAME).exists():
        return Keyring(load_secret_key(settings))
    return Keyring(secrets.token_bytes(32))


@asynccontextmanager
async def _session(settings: Settings) -> AsyncIterator[Session]:
    try:
        store = existing_store(settings.database)
    except ValueError as exc:
        raise CliError(str(exc)) from None
    await store.open()
    tasks = TaskSet()
    # This process never forwards: a closed task set makes approvals leave the action
    # `pending` for the running gateway's forward worker, which owns the upstream.
    tasks.closing = True
    try:
        async with aiohttp.ClientSession(trust_env=False) as unused:
            forwarder = Forwarder(
                unused,
                settings.upstream,
                timeout=settings.forward_timeout,
                attempts=settings.forward_attempts,
            )
            actions = ActionService(store, _keyring(settings), forwarder, Notifier(), tasks)
            yield Session(settings, store, actions)
    finally:
        await store.close()


# -- output ---------------------------------------------------------------------------------


def _when(ts: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts)) if ts else "-"


def _clip(text: str, width: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1] + "…"


def _table(rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
        for row in rows
    )


def _json_out(data: Any) -> None:
    print(json.dumps(data, indent=2, ensure_ascii=False))


def _value(value: Any) -> str:
    if isinstance(value, dict | list):
        return json.dumps(value, separators=(",", ":"), ensure_ascii=False)
    return str(value)


def _event_line(event: EventRecord) -> str:
    details = " ".join(f"{k}={_value(v)}" for k, v in event.data.items() if v not in (None, ""))
    return f"  {_when(event.ts)}  {event.kind:<16} {details}".rstrip()


def _details(obj: dict[str, Any], events: list[EventRecord]) -> str:
    approvals = sum(1 for d in obj["decisions"] if d["decision"] == "approve")
    fields: list[tuple[str, Any]] = [
        ("request", f"{obj['method']} {obj['path']}"),
        ("params", obj["params"]),
        ("edited", obj["modified_params"]),
        ("agent", obj["agent"]),
        ("rule", obj["rule"]),
        ("why", obj.get("reason")),
        ("approvals", f"{approvals} of {obj['approvals_required']}"),
        ("justification", obj["justification"]),
        ("created", _when(obj["created"])),
        ("expires", _when(obj["expires_at"])),
        ("finished", _when(obj["completed_at"]) if obj["completed_at"] else None),
        ("response", obj["response_code"]),
        ("stripe said", _clip(_value(obj["response_body"]), 200) if obj["response_body"] else None),
        ("last error", obj["last_error"]),
        ("callback", obj["callback_url"]),
        ("receipt", obj["receipt_url"]),
    ]
    lines = [f"{obj['id']}  {obj['status']}", f"  {obj['summary']}", ""]
    width = max(len(name) for name, _ in fields)
    lines += [f"  {name:<{width}}  {_value(v)}" for name, v in fields if v not in (None, "", {})]
    lines += ["", "Decisions:"]
    lines += [
        f"  {_when(d['created'])}  {d['decision']:<8} {d['reviewer']} via {d['via']}"
        + (f" — {d['note']}" if d["note"] else "")
        for d in obj["decisions"]
    ] or ["  none yet"]
    lines += ["", "Timeline:", *[_event_line(e) for e in events]]
    return "\n".join(lines)


# -- commands -------------------------------------------------------------------------------


async def _list(s: Session, args: argparse.Namespace) -> None:
    flt = ActionFilter(
        status=args.status,
        agent=args.agent,
        rule=args.rule,
        limit=args.limit,
        starting_after=args.starting_after,
    )
    if flt.starting_after and await s.store.get_action(flt.starting_after) is None:
        raise CliError(f"--starting-after names no action: {flt.starting_after}")
    found, has_more = await s.store.list_actions(flt)
    if args.json:
        data = [await s.render(a) for a in found]
        _json_out({"object": "list", "data": data, "has_more": has_more})
        return
    if not found:
        print("No actions" + (f" with status {args.status}." if args.status else "."))
        return
    rows = [("ID", "STATUS", "RULE", "AGENT", "SUMMARY", "CREATED")]
    rows += [
        (a.id, a.status, a.rule, a.agent, _clip(a.summary, SUMMARY_WIDTH), _when(a.created))
        for a in found
    ]
    print(_table(rows))
    if has_more:
        print(f"… more: --starting-after {found[-1].id}")


async def _show(s: Session, args: argparse.Namespace) -> None:
    action = await s.actions.get(args.id)
    obj = await s.render(action)
    if args.json:
        _json_out(obj)
        return
    print(_details(obj, await s.store.events(action.id)))


def _edits(items: Sequence[str]) -> dict[str, str]:
    edits: dict[str, str] = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name.strip():
            raise CliError(f"--set must look like field=value, not {item!r}")
        edits[name.strip()] = value
    return edits


def _outcome(verb: str, obj: dict[str, Any]) -> str:
    approvals = sum(1 for d in obj["decisions"] if d["decision"] == "approve")
    head = f"{verb} {obj['id']} ({obj['summary']}). Status: {obj['status']}"
    if obj["status"] == "awaiting_approval":
        return f"{head} — {approvals} of {obj['approvals_required']} approvals."
    if obj["status"] == "pending":
        return (
            f"{head} — the running gateway sends it to Stripe shortly "
            f"(follow with: cosigner actions show {obj['id']})."
        )
    return head + "."


async def _approve(s: Session, args: argparse.Namespace) -> None:
    action = await s.actions.approve(
        args.id,
        reviewer=args.reviewer,
        via="cli",
        note=args.note,
        params=_edits(args.set or []) or None,
    )
    obj = await s.render(action)
    if args.json:
        _json_out(obj)
    else:
        print(_outcome("Approved", obj))


async def _reject(s: Session, args: argparse.Namespace) -> None:
    action = await s.actions.reject(args.id, reviewer=args.reviewer, via="cli", note=args.note)
    obj = await s.render(action)
    if args.json:
        _json_out(obj)
    else:
        print(_outcome("Rejected", obj))


def _runner(
    load_settings: LoadSettings,
    command: Callable[[Session, argparse.Namespace], Any],
) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        settings = load_settings(args.config)

        async def go() -> None:
            async with _session(settings) as session:
                await command(session, args)

        try:
            asyncio.run(go())
        except (CliError, CosignerError) as exc:
            print(f"cosigner: {exc}", file=sys.stderr)
            return 1
        return 0

    return run


def _limit(text: str) -> int:
    value = int(text)
    if not 1 <= value <= 1000:
        raise argparse.ArgumentTypeError("must be between 1 and 1000")
    return value


def register(sub: Any, load_settings: LoadSettings) -> None:
    """Add ``cosigner actions ...`` to the command line."""
    actions = sub.add_parser(
        "actions",
        help="list, show, approve or reject held actions",
        description=HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    actions_sub = actions.add_subparsers(dest="actions_command", required=True)

    def command(name: str, help_text: str, fn: Callable[..., Any]) -> argparse.ArgumentParser:
        parser: argparse.ArgumentParser = actions_sub.add_parser(
            name, help=help_text, description=help_text
        )
        parser.add_argument("--config", help="TOML file of settings (names without COSIGNER_)")
        parser.add_argument("--json", action="store_true", help="print the action object(s)")
        parser.set_defaults(func=_runner(load_settings, fn))
        return parser

    listing = command("list", "list actions, newest first", _list)
    listing.add_argument("--status", choices=STATUSES)
    listing.add_argument("--agent", help="only this agent's actions")
    listing.add_argument("--rule", help="only actions held by this rule")
    listing.add_argument("--limit", type=_limit, default=20, help="how many (default 20)")
    listing.add_argument("--starting-after", help="action id: the page after it")

    show = command("show", "an action's details and timeline", _show)
    show.add_argument("id")

    for name, verb, fn in (("approve", "approve", _approve), ("reject", "reject", _reject)):
        parser = command(name, f"{verb} an action awaiting approval", fn)
        parser.add_argument("id")
        parser.add_argument("--reviewer", required=True, help="who decides (name or email)")
        parser.add_argument("--note", help="why, shown on the receipt")
        if name == "approve":
            parser.add_argument(
                "--set",
                action="append",
                metavar="FIELD=VALUE",
                help="change an editable field before forwarding (repeatable), e.g. amount=2500",
            )
