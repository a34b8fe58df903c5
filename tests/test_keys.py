"""Gateway-issued agent keys (PRODUCT.md §3a): `cosigner keys ...` as a real subprocess,
the official stripe SDK as the agent, the fake Stripe as the upstream."""

from __future__ import annotations

import hashlib
import json
import sqlite3
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
import stripe

from gateway.agents import GATEWAY_KEY_TTL
from tests.support.gateway import (
    SECRET_KEY,
    GatewayThread,
    gateway_thread,
    run_cosigner,
    settings_for,
)
from tests.support.peers import TEST_STRIPE_KEY, Upstream
from tests.support.rawhttp import build, send

RULES = Path(__file__).parent / "data" / "rules_keys"
OWN_STRIPE_KEY = "sk_test_agentsownkey00000000000004321"
OTHER_SECRET = "another-secret-key-for-rotation-000000"


def cosigner(
    workdir: Path, *args: str, env: dict[str, str] | None = None, stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    """`cosigner keys ARGS` against the test database, as a separate process."""
    settings = {
        "COSIGNER_DATABASE": f"sqlite:///{workdir / 'cosigner.db'}",
        "COSIGNER_SECRET_KEY": SECRET_KEY,
        **(env or {}),
    }
    return run_cosigner("keys", *args, cwd=workdir, settings=settings, stdin=stdin or "")


def create_key(workdir: Path, name: str, *extra: str, **kwargs: Any) -> str:
    done = cosigner(workdir, "create", name, *extra, **kwargs)
    assert done.returncode == 0, done.stderr
    key = done.stdout.strip()
    assert key.startswith("cos_") and len(key) >= 40 and "\n" not in key
    return key


def agent(gw: GatewayThread, key: str) -> stripe.StripeClient:
    return stripe.StripeClient(key, base_addresses={"api": gw.url}, max_network_retries=0)


def raw(gw: GatewayThread, method: str, path: str, key: str, **kwargs: Any) -> requests.Response:
    headers = {"Authorization": f"Bearer {key}", **kwargs.pop("headers", {})}
    return requests.request(method, gw.url + path, headers=headers, timeout=30, **kwargs)


@pytest.fixture
def gw(tmp_path: Path, fake_stripe: str) -> Iterator[GatewayThread]:
    settings = settings_for(tmp_path, fake_stripe, RULES, stripe_key=TEST_STRIPE_KEY)
    with gateway_thread(settings) as gateway:
        yield gateway


def test_a_gateway_key_works_and_stripe_only_ever_sees_the_real_key(
    tmp_path: Path, gw: GatewayThread, upstream: Upstream
) -> None:
    key = create_key(tmp_path, "billing-bot")
    charge = upstream.create_charge(amount=4200)
    fetched = agent(gw, key).v1.charges.retrieve(charge["id"])
    assert fetched.id == charge["id"]
    # Allowed by the rule keyed on the agent's name: forwarded at once.
    refund = agent(gw, key).v1.refunds.create({"charge": charge["id"], "amount": 500})
    assert refund.amount == 500
    seen = upstream.requests()
    assert [r["method"] for r in seen] == ["GET", "POST"]
    assert {r["api_key"] for r in seen} == {"sk_test_…6789"}
    assert all(key[-4:] != r["api_key_last4"] for r in seen)
    assert all(key not in json.dumps(r) for r in seen)


def test_the_key_name_is_the_agent_for_rules_actions_and_ownership(
    tmp_path: Path, gw: GatewayThread, upstream: Upstream
) -> None:
    bot = create_key(tmp_path, "billing-bot")
    other = create_key(tmp_path, "support-bot")
    charge = upstream.create_charge(amount=5000)["id"]
    # The same small refund: allowed for billing-bot (match.agent), held for support-bot.
    held = raw(gw, "POST", "/v1/refunds", other, data={"charge": charge, "amount": "700"})
    assert held.status_code == 202, held.text
    action = held.json()
    assert action["rule"] == "refunds"
    polled = raw(gw, "GET", f"/cosigner/v1/actions/{action['id']}", other).json()
    assert polled["agent"] == "support-bot"
    # Another credential (even the real Stripe key behind it) does not own the action.
    for stranger in (bot, TEST_STRIPE_KEY):
        assert raw(gw, "GET", f"/cosigner/v1/actions/{action['id']}", stranger).status_code == 404
    approved = gw.admin(
        "POST", f"/cosigner/v1/actions/{action['id']}/approve", json={"reviewer": "ops@x.com"}
    )
    assert approved.status_code == 200, approved.text
    gw.wait_status(action["id"], {"completed"})
    [forwarded] = upstream.requests(method="POST", path="/v1/refunds")
    assert forwarded["api_key"] == "sk_test_…6789"
    assert [r["amount"] for r in upstream.refunds(charge)] == [700]


def test_revoked_and_unknown_gateway_keys_get_401(
    tmp_path: Path, gw: GatewayThread, upstream: Upstream
) -> None:
    key = create_key(tmp_path, "short-lived")
    assert raw(gw, "GET", "/v1/balance", key).status_code == 200
    revoked = cosigner(tmp_path, "revoke", "short-lived")
    assert revoked.returncode == 0, revoked.stderr
    # Another process revoked it: the gateway stops accepting it within its cache TTL.
    deadline = time.monotonic() + GATEWAY_KEY_TTL + 5
    while raw(gw, "GET", "/v1/balance", key).status_code == 200:
        assert time.monotonic() < deadline, "a revoked key still works"
        time.sleep(0.2)
    forwarded = upstream.count("GET", "/v1/balance")
    with pytest.raises(stripe.AuthenticationError):
        agent(gw, key).v1.balance.retrieve()
    unknown = "cos_" + "A" * 43
    resp = raw(gw, "GET", "/v1/balance", unknown)
    assert resp.status_code == 401
    assert resp.json()["error"]["type"] == "authentication_error"
    # Unknown and revoked read the same: nothing tells which keys ever existed.
    assert resp.json() == raw(gw, "GET", "/v1/balance", key).json()
    assert unknown not in resp.text
    assert upstream.count("GET", "/v1/balance") == forwarded  # refused ones never went out


def test_a_name_can_be_issued_again_only_once_revoked(
    tmp_path: Path, gw: GatewayThread, upstream: Upstream
) -> None:
    first = create_key(tmp_path, "rotating-bot")
    again = cosigner(tmp_path, "create", "rotating-bot")
    assert again.returncode == 1 and "already has an active key" in again.stderr
    assert again.stdout == ""
    assert cosigner(tmp_path, "revoke", "rotating-bot").returncode == 0
    assert cosigner(tmp_path, "revoke", "rotating-bot").returncode == 1
    second = create_key(tmp_path, "rotating-bot")
    assert second != first
    assert raw(gw, "GET", "/v1/balance", second).status_code == 200
    assert raw(gw, "GET", "/v1/balance", first).status_code == 401


def test_keys_list_shows_keys_masked_and_never_again_in_full(tmp_path: Path) -> None:
    key = create_key(tmp_path, "lister")
    own = create_key(tmp_path, "own-key-bot", "--stripe-key", OWN_STRIPE_KEY)
    cosigner(tmp_path, "revoke", "lister")
    listing = cosigner(tmp_path, "list", env={"COSIGNER_STRIPE_KEY": TEST_STRIPE_KEY})
    assert listing.returncode == 0, listing.stderr
    assert f"cos_…{key[-4:]}" in listing.stdout and f"cos_…{own[-4:]}" in listing.stdout
    assert key not in listing.stdout and own not in listing.stdout
    assert OWN_STRIPE_KEY not in listing.stdout and "own sk_test_…4321" in listing.stdout
    as_json = json.loads(cosigner(tmp_path, "list", "--json").stdout)
    by_name = {row["name"]: row for row in as_json}
    assert by_name["lister"]["status"] == "revoked" and by_name["lister"]["revoked_at"]
    assert by_name["own-key-bot"]["status"] == "active"
    assert by_name["own-key-bot"]["stripe_key"] == "own sk_test_…4321"
    assert by_name["lister"]["stripe_key"].startswith("none")


def test_only_the_hash_of_a_key_is_stored(tmp_path: Path) -> None:
    key = create_key(tmp_path, "hashed", "--stripe-key", OWN_STRIPE_KEY)
    with sqlite3.connect(tmp_path / "cosigner.db") as db:
        rows = db.execute("SELECT name, key_hash, prefix, last4, stripe_key_sealed FROM agent_keys")
        [(name, key_hash, prefix, last4, sealed)] = rows.fetchall()
    assert (name, prefix, last4) == ("hashed", "cos_", key[-4:])
    assert key_hash == hashlib.sha256(key.encode()).hexdigest()
    assert OWN_STRIPE_KEY.encode() not in sealed
    files = b"".join(p.read_bytes() for p in tmp_path.glob("cosigner.db*"))
    assert key.encode() not in files and key[4:].encode() not in files
    assert OWN_STRIPE_KEY.encode() not in files


def test_a_per_agent_stripe_key_is_substituted(
    tmp_path: Path, fake_stripe: str, upstream: Upstream
) -> None:
    key = create_key(tmp_path, "billing-bot", "--stripe-key", "-", stdin=OWN_STRIPE_KEY + "\n")
    # No COSIGNER_STRIPE_KEY at all: the agent's own key is used.
    with gateway_thread(settings_for(tmp_path, fake_stripe, RULES)) as gw:
        charge = upstream.create_charge(amount=3000)
        assert agent(gw, key).v1.charges.retrieve(charge["id"]).amount == 3000
        held = raw(gw, "POST", "/v1/refunds", key, data={"charge": charge["id"], "amount": "2000"})
        assert held.status_code == 202
        stored = gw.action(held.json()["id"])
        assert OWN_STRIPE_KEY.encode() not in stored.credential_sealed
        gw.admin(
            "POST",
            f"/cosigner/v1/actions/{stored.id}/approve",
            json={"reviewer": "ops@example.com"},
        )
        done = gw.wait_status(stored.id, {"completed"})
        assert done.credential_sealed is None  # erased once terminal
    assert {r["api_key"] for r in upstream.requests()} == {"sk_test_…4321"}


def test_a_gateway_key_without_any_stripe_key_is_a_clear_error(
    tmp_path: Path, fake_stripe: str, upstream: Upstream
) -> None:
    done = cosigner(tmp_path, "create", "no-stripe")
    assert done.returncode == 0 and "COSIGNER_STRIPE_KEY is not set" in done.stderr
    key = done.stdout.strip()
    with gateway_thread(settings_for(tmp_path, fake_stripe, RULES)) as gw:
        resp = raw(gw, "GET", "/v1/balance", key)
        assert resp.status_code == 500
        error = resp.json()["error"]
        assert error["code"] == "stripe_key_missing" and "no-stripe" in error["message"]
        with pytest.raises(stripe.APIError):
            agent(gw, key).v1.balance.retrieve()
    assert upstream.requests() == []


def test_require_agent_keys_refuses_raw_stripe_keys(
    tmp_path: Path, fake_stripe: str, upstream: Upstream
) -> None:
    key = create_key(tmp_path, "billing-bot")
    settings = settings_for(
        tmp_path, fake_stripe, RULES, stripe_key=TEST_STRIPE_KEY, require_agent_keys=True
    )
    with gateway_thread(settings) as gw:
        with pytest.raises(stripe.AuthenticationError):
            agent(gw, TEST_STRIPE_KEY).v1.balance.retrieve()
        resp = raw(gw, "GET", "/v1/balance", TEST_STRIPE_KEY)
        assert resp.status_code == 401 and resp.json()["error"]["code"] == "agent_key_required"
        assert TEST_STRIPE_KEY not in resp.text
        agent(gw, key).v1.balance.retrieve()
    assert upstream.count("GET", "/v1/balance") == 1


def test_a_gateway_key_is_useless_against_stripe_directly(
    tmp_path: Path, upstream: Upstream
) -> None:
    key = create_key(tmp_path, "billing-bot")
    with pytest.raises(stripe.AuthenticationError):
        upstream.client(key).v1.balance.retrieve()


def test_after_a_secret_key_rotation_keys_still_open_and_can_be_resealed(
    tmp_path: Path, fake_stripe: str, upstream: Upstream
) -> None:
    key = create_key(tmp_path, "billing-bot", "--stripe-key", OWN_STRIPE_KEY)
    rotated = {"COSIGNER_SECRET_KEY": OTHER_SECRET, "COSIGNER_SECRET_KEY_PREVIOUS": SECRET_KEY}
    # New secret, old one as previous: the sealed Stripe key still opens.
    settings = settings_for(
        tmp_path, fake_stripe, RULES, secret_key=OTHER_SECRET, secret_key_previous=SECRET_KEY
    )
    with gateway_thread(settings) as gw:
        assert raw(gw, "GET", "/v1/balance", key).status_code == 200
    assert "own sk_test_…4321" in cosigner(tmp_path, "list", env=rotated).stdout
    # Without the previous secret, before re-sealing, it cannot be opened: a clear error.
    only_new = {"COSIGNER_SECRET_KEY": OTHER_SECRET}
    assert "cannot decrypt" in cosigner(tmp_path, "list", env=only_new).stdout
    resealed = cosigner(tmp_path, "reseal", env=rotated)
    assert resealed.returncode == 0 and "1 agent Stripe key" in resealed.stdout
    assert "own sk_test_…4321" in cosigner(tmp_path, "list", env=only_new).stdout
    with gateway_thread(settings_for(tmp_path, fake_stripe, RULES, secret_key=OTHER_SECRET)) as gw:
        assert raw(gw, "GET", "/v1/balance", key).status_code == 200
    assert {r["api_key"] for r in upstream.requests()} == {"sk_test_…4321"}


@pytest.mark.parametrize(
    ("args", "problem"),
    [
        (("create", "bad name"), "NAME must be"),
        (("create", "--", "-dash-first"), "NAME must be"),
        (("create", "x" * 65), "NAME must be"),
        (("create", "ok", "--stripe-key", "pk_test_123456789012"), "--stripe-key must be"),
        (("create", "ok", "--stripe-key", "cos_abcdefghijklmnop"), "--stripe-key must be"),
        (("revoke", "nobody"), "no database"),
    ],
)
def test_cli_refuses_bad_input_clearly(tmp_path: Path, args: tuple[str, ...], problem: str) -> None:
    done = cosigner(tmp_path, *args)
    assert done.returncode != 0
    assert problem in done.stderr
    assert "Traceback" not in done.stderr and done.stdout == ""


@pytest.mark.parametrize(
    "credential",
    [
        "sk_test_abc def0123456789",
        "sk_test_abc\tdef0123456789",
        "sk_test_abc\x7fdef0123456789",
        "sk_test_abc;def0123456789",
        "sk_test_caf\u00e90123456789",
        "sk_",
        "pk_test_0123456789abcdef",
        "cos_",
    ],
)
def test_odd_credentials_never_reach_stripe(
    gw: GatewayThread, upstream: Upstream, credential: str
) -> None:
    data = build("GET", "/v1/balance", headers=[("Authorization", f"Bearer {credential}")])
    resp = send(gw.settings.port, data)
    assert resp.status in (400, 401), resp.raw[:400]
    assert credential.encode("latin-1", "replace") not in resp.body
    assert upstream.requests() == []
