"""``cosigner keys create | list | revoke | reseal``: gateway-issued agent keys (PRODUCT.md §3a).

The commands work on the configured database (``COSIGNER_DATABASE``) with the
configured ``COSIGNER_SECRET_KEY``, exactly as ``cosigner serve`` reads them.
A key is printed once by ``create`` and never again: only its SHA-256 is
stored. A per-agent Stripe key is stored sealed (AES-GCM) and shown masked.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import asynccontextmanager
from typing import Any

from gateway.agents import (
    AGENT_NAME,
    GATEWAY_KEY_PREFIX,
    RAW_KEY,
    gateway_key_hash,
    mask_gateway_key,
    new_gateway_key,
    open_stripe_key,
    seal_stripe_key,
)
from gateway.crypto import Keyring, mask_key
from gateway.settings import SECRET_FILE_NAME, Settings, load_secret_key
from gateway.store import existing_store, store_from_url
from gateway.store.base import AgentKeyRecord, Store

LoadSettings = Callable[[str | None], Settings]
Command = Callable[[Settings, argparse.Namespace], Coroutine[Any, Any, None]]
HELP = """\
Issue, list and revoke gateway keys for agents.

An agent uses its gateway key (cos_...) as its Stripe API key, with the gateway
as its Stripe base URL. On forward the gateway substitutes a real Stripe key:
the agent's own (--stripe-key, stored encrypted under COSIGNER_SECRET_KEY), or
else COSIGNER_STRIPE_KEY. The agent never holds a key that works against Stripe.

The key is printed once, on stdout; only its SHA-256 is stored. The key's name
is the agent's name in rules (match.agent), budgets and receipts. A revoked key
stops working within a few seconds on every running gateway.

These commands use the configured database and secret key (COSIGNER_DATABASE,
COSIGNER_SECRET_KEY, ...), exactly as `cosigner serve` reads them.
"""


class KeysError(Exception):
    """A problem to print on stderr, exiting 1."""


def _keyring(settings: Settings, *, create: bool) -> Keyring | None:
    """The gateway's keyring; None when no secret exists yet and ``create`` is false."""
    configured = settings.secret_key is not None
    if not create and not configured and not (settings.data_dir / SECRET_FILE_NAME).exists():
        return None
    previous = settings.secret_key_previous
    return Keyring(
        load_secret_key(settings), [previous.get_secret_value().encode()] if previous else []
    )


@asynccontextmanager
async def _store(settings: Settings, *, create: bool) -> AsyncIterator[Store]:
    try:
        store = store_from_url(settings.database) if create else existing_store(settings.database)
    except ValueError as exc:
        raise KeysError(str(exc)) from None
    await store.open()
    try:
        yield store
    finally:
        await store.close()


def _read_stripe_key(value: str) -> str:
    key = sys.stdin.readline().strip() if value == "-" else value.strip()
    if not RAW_KEY.fullmatch(key) or len(key) < 12:
        raise KeysError("--stripe-key must be a Stripe secret or restricted key (sk_... or rk_...)")
    return key


async def _create(settings: Settings, args: argparse.Namespace) -> None:
    name = args.name
    if not AGENT_NAME.fullmatch(name):
        raise KeysError(
            "NAME must be 1-64 characters: letters, digits, '_', '.', '@' or '-', "
            "starting with a letter or digit"
        )
    sealed = None
    if args.stripe_key is not None:
        stripe_key = _read_stripe_key(args.stripe_key)
        keyring = _keyring(settings, create=True)
        assert keyring is not None
        sealed = seal_stripe_key(keyring, name, stripe_key)
    key = new_gateway_key()
    record = AgentKeyRecord(
        name=name,
        key_hash=gateway_key_hash(key),
        prefix=GATEWAY_KEY_PREFIX,
        last4=key[-4:],
        created=int(time.time()),
        stripe_key_sealed=sealed,
    )
    async with _store(settings, create=True) as store:
        if not await store.create_agent_key(record):
            raise KeysError(
                f"agent {name!r} already has an active key; revoke it first "
                f"(cosigner keys revoke {name})"
            )
    print(key, flush=True)
    print(
        f"Created the gateway key of agent {name!r} ({mask_gateway_key(record)}). It is shown "
        "only this once: give it to the agent as its Stripe API key.",
        file=sys.stderr,
    )
    if sealed is None and settings.stripe_key is None:
        print(
            "warning: COSIGNER_STRIPE_KEY is not set and no --stripe-key was given: requests "
            "with this key fail until one of them is configured.",
            file=sys.stderr,
        )


def _stripe_key_shown(record: AgentKeyRecord, keyring: Keyring | None, default: bool) -> str:
    if record.stripe_key_sealed is None:
        return "COSIGNER_STRIPE_KEY" if default else "none (COSIGNER_STRIPE_KEY is not set)"
    if keyring is None:
        return "own (cannot decrypt: no COSIGNER_SECRET_KEY)"
    try:
        return "own " + mask_key(open_stripe_key(keyring, record))
    except ValueError:
        return "own (cannot decrypt with COSIGNER_SECRET_KEY)"


def _when(ts: int | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts)) if ts else "-"


async def _list(settings: Settings, args: argparse.Namespace) -> None:
    keyring = _keyring(settings, create=False)
    async with _store(settings, create=False) as store:
        records = await store.list_agent_keys()
    rows: list[dict[str, Any]] = [
        {
            "name": r.name,
            "key": mask_gateway_key(r),
            "created": r.created,
            "revoked_at": r.revoked_at,
            "status": "revoked" if r.revoked_at else "active",
            "stripe_key": _stripe_key_shown(r, keyring, settings.stripe_key is not None),
        }
        for r in records
    ]
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    if not rows:
        print("no agent keys (create one with: cosigner keys create NAME)")
        return
    header = ("NAME", "KEY", "CREATED", "STATUS", "STRIPE KEY")
    table = [
        (
            r["name"],
            r["key"],
            _when(r["created"]),
            f"revoked {_when(r['revoked_at'])}" if r["revoked_at"] else "active",
            r["stripe_key"],
        )
        for r in rows
    ]
    widths = [max(len(str(line[i])) for line in [header, *table]) for i in range(len(header))]
    for line in [header, *table]:
        print("  ".join(str(cell).ljust(width) for cell, width in zip(line, widths, strict=True)))


async def _revoke(settings: Settings, args: argparse.Namespace) -> None:
    async with _store(settings, create=False) as store:
        if not await store.revoke_agent_key(args.name, int(time.time())):
            raise KeysError(f"agent {args.name!r} has no active key")
    print(
        f"Revoked the gateway key of agent {args.name!r}; running gateways refuse it within a "
        "few seconds."
    )


async def _reseal(settings: Settings, args: argparse.Namespace) -> None:
    """Re-encrypt every per-agent Stripe key under the current COSIGNER_SECRET_KEY."""
    keyring = _keyring(settings, create=False)
    if keyring is None:
        raise KeysError("COSIGNER_SECRET_KEY is not set and no generated secret exists")
    done = 0
    async with _store(settings, create=False) as store:
        for record in await store.list_agent_keys():
            if record.stripe_key_sealed is None:
                continue
            try:
                stripe_key = open_stripe_key(keyring, record)
            except ValueError:
                raise KeysError(
                    f"the Stripe key of agent {record.name!r} opens with neither "
                    "COSIGNER_SECRET_KEY nor COSIGNER_SECRET_KEY_PREVIOUS"
                ) from None
            await store.set_agent_stripe_key(
                record.name, seal_stripe_key(keyring, record.name, stripe_key)
            )
            done += 1
    print(f"Re-sealed {done} agent Stripe key(s) under the current COSIGNER_SECRET_KEY.")


def _runner(
    load_settings: LoadSettings,
    command: Command,
) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        settings = load_settings(args.config)
        try:
            asyncio.run(command(settings, args))
        except KeysError as exc:
            print(f"cosigner: {exc}", file=sys.stderr)
            return 1
        return 0

    return run


def register(sub: Any, load_settings: LoadSettings) -> None:
    """Add ``cosigner keys ...`` to the command line."""
    keys = sub.add_parser(
        "keys",
        help="issue, list and revoke gateway keys for agents",
        description=HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    keys_sub = keys.add_subparsers(dest="keys_command", required=True)

    def command(name: str, help_text: str, fn: Command) -> argparse.ArgumentParser:
        parser: argparse.ArgumentParser = keys_sub.add_parser(
            name, help=help_text, description=help_text
        )
        parser.add_argument("--config", help="TOML file of settings (names without COSIGNER_)")
        parser.set_defaults(func=_runner(load_settings, fn))
        return parser

    create = command("create", "issue a key for an agent (printed once)", _create)
    create.add_argument("name", help="the agent's name (rules, budgets, receipts)")
    create.add_argument(
        "--stripe-key",
        metavar="sk_...",
        help="the agent's own Stripe key, stored encrypted ('-' reads it from stdin); "
        "default: COSIGNER_STRIPE_KEY",
    )
    listing = command("list", "every key: name, masked key, created, status, Stripe key", _list)
    listing.add_argument("--json", action="store_true", help="print JSON")
    revoke = command("revoke", "revoke an agent's key", _revoke)
    revoke.add_argument("name")
    command(
        "reseal",
        "re-encrypt per-agent Stripe keys under the current COSIGNER_SECRET_KEY (after rotation)",
        _reseal,
    )
