"""`cosigner actions ...` as a real subprocess against a running gateway's database."""

from __future__ import annotations

import concurrent.futures
import json
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
import stripe

from gateway.keys import NOTIFIER
from tests.support.gateway import (
    SECRET_KEY,
    GatewayThread,
    gateway_thread,
    run_cosigner,
    settings_for,
)
from tests.support.peers import TEST_STRIPE_KEY

RULES = Path(__file__).parent / "data" / "rules_core"


@pytest.fixture
def gw(tmp_path: Path, fake_stripe: str) -> Iterator[GatewayThread]:
    with gateway_thread(settings_for(tmp_path, fake_stripe, RULES)) as gateway:
        yield gateway


def cosigner(
    gw: GatewayThread, *args: str, database: str | None = None
) -> subprocess.CompletedProcess[str]:
    """Run `python -m gateway actions ...` with the gateway's settings, from another folder."""
    settings = {
        "COSIGNER_DATABASE": database or gw.settings.database,
        "COSIGNER_SECRET_KEY": SECRET_KEY,
        "COSIGNER_PUBLIC_URL": gw.url,
    }
    workdir = Path(gw.settings.database.removeprefix("sqlite:///")).parent / "elsewhere"
    workdir.mkdir(exist_ok=True)
    return run_cosigner("actions", *args, cwd=workdir, settings=settings)


def hold(gw: GatewayThread, charge: str, amount: int = 6000, key: str | None = None) -> Any:
    headers = {"Authorization": f"Bearer {TEST_STRIPE_KEY}"}
    if key:
        headers["Idempotency-Key"] = key
    resp = requests.post(
        gw.url + "/v1/refunds",
        data={"charge": charge, "amount": str(amount)},
        headers=headers,
        timeout=10,
    )
    assert resp.status_code == 202, resp.text
    return resp.json()


def api_object(gw: GatewayThread, action_id: str) -> Any:
    return gw.admin("GET", f"/cosigner/v1/actions/{action_id}").json()


def test_list_and_show_print_tables_and_json(gw: GatewayThread, upstream: Any) -> None:
    charge = upstream.create_charge(amount=9000)
    first = hold(gw, charge["id"], 6000)
    second = hold(gw, charge["id"], 7000)
    gw.admin("POST", f"/cosigner/v1/actions/{first['id']}/reject", json={"reviewer": "a@x.io"})

    listed = cosigner(gw, "list")
    assert listed.returncode == 0, listed.stderr
    header, *rows = listed.stdout.splitlines()
    assert header.split() == ["ID", "STATUS", "RULE", "AGENT", "SUMMARY", "CREATED"]
    # Newest first; both were made within the same second, so compare without order.
    assert sorted(r.split()[:4] for r in rows) == sorted(
        [
            [second["id"], "awaiting_approval", "refunds", "sk_test_…6789"],
            [first["id"], "rejected", "refunds", "sk_test_…6789"],
        ]
    )

    only = cosigner(gw, "list", "--status", "rejected", "--json")
    assert only.returncode == 0, only.stderr
    data = json.loads(only.stdout)
    assert data["object"] == "list" and data["has_more"] is False
    assert [a["id"] for a in data["data"]] == [first["id"]]
    assert data["data"][0] == api_object(gw, first["id"])

    paged = cosigner(gw, "list", "--limit", "1")
    newest = rows[0].split()[0]
    assert f"--starting-after {newest}" in paged.stdout
    assert "No actions with status expired." in cosigner(gw, "list", "--status", "expired").stdout

    shown = cosigner(gw, "show", first["id"])
    assert shown.returncode == 0, shown.stderr
    out = shown.stdout
    assert out.startswith(f"{first['id']}  rejected\n")
    assert first["summary"] in out and "POST /v1/refunds" in out
    assert "reject   a@x.io via api" in out
    timeline = out.split("Timeline:\n", 1)[1].splitlines()
    kinds = [line.split()[2] for line in timeline]
    assert kinds[0] == "held" and "decision" in kinds and "rejected" in kinds
    assert TEST_STRIPE_KEY not in out

    as_json = cosigner(gw, "show", second["id"], "--json")
    assert json.loads(as_json.stdout) == api_object(gw, second["id"])


def test_approve_from_the_cli_is_forwarded_by_the_running_gateway(
    gw: GatewayThread, upstream: Any
) -> None:
    charge = upstream.create_charge(amount=9000)
    held = hold(gw, charge["id"], 6000)
    done = cosigner(
        gw,
        "approve",
        held["id"],
        "--reviewer",
        "ops@example.com",
        "--note",
        "customer called",
        "--set",
        "amount=2500",
    )
    assert done.returncode == 0, done.stderr
    assert f"Approved {held['id']}" in done.stdout and "pending" in done.stdout
    gw.wait_status(held["id"], {"completed"})
    (refund,) = [r for r in upstream.refunds(charge["id"]) if r["charge"] == charge["id"]]
    assert refund["amount"] == 2500
    action = api_object(gw, held["id"])
    assert action["modified_params"] == {"amount": "2500"}
    (decision,) = action["decisions"]
    assert decision["via"] == "cli" and decision["reviewer"] == "ops@example.com"
    assert decision["note"] == "customer called"

    shown = cosigner(gw, "show", held["id"])
    assert "completed" in shown.stdout.splitlines()[0] and "forward_attempt" in shown.stdout

    again = cosigner(gw, "approve", held["id"], "--reviewer", "other@example.com")
    assert again.returncode == 1
    assert "is completed, not awaiting_approval" in again.stderr and again.stdout == ""


def test_a_cli_approval_reaches_an_agent_that_is_waiting(gw: GatewayThread, upstream: Any) -> None:
    charge = upstream.create_charge(amount=9000)
    client = stripe.StripeClient(
        TEST_STRIPE_KEY, base_addresses={"api": gw.url}, max_network_retries=0
    )
    assert gw.app is not None
    notifier = gw.app[NOTIFIER]

    async def waiting() -> int:
        return notifier.waiting()

    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        call = pool.submit(
            client.v1.refunds.create,
            params={"charge": charge["id"], "amount": 1200},
            options={"headers": {"Cosigner-Wait": "30"}},
        )
        deadline = time.monotonic() + 20
        while gw.call(waiting()) < 1:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        (action,) = json.loads(cosigner(gw, "list", "--json").stdout)["data"]
        done = cosigner(gw, "approve", action["id"], "--reviewer", "ops@example.com")
        assert done.returncode == 0, done.stderr
        refund = call.result(30)
    assert isinstance(refund, stripe.Refund) and refund.amount == 1200


def test_a_cli_rejection_reaches_a_waiting_agent_when_its_wait_ends(
    gw: GatewayThread, upstream: Any
) -> None:
    charge = upstream.create_charge()
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        call = pool.submit(
            requests.post,
            gw.url + "/v1/refunds",
            data={"charge": charge["id"], "amount": "1300"},
            headers={"Authorization": f"Bearer {TEST_STRIPE_KEY}", "Cosigner-Wait": "10"},
            timeout=30,
        )
        deadline = time.monotonic() + 20
        while not (found := json.loads(cosigner(gw, "list", "--json").stdout)["data"]):
            assert time.monotonic() < deadline
        (action,) = found
        assert cosigner(gw, "reject", action["id"], "--reviewer", "ops@x.io").returncode == 0
        resp = call.result(30)
    assert resp.status_code == 403
    assert resp.json()["error"]["code"] == "cosigner_rejected"


def test_reject_from_the_cli_closes_the_action(gw: GatewayThread, upstream: Any) -> None:
    charge = upstream.create_charge()
    held = hold(gw, charge["id"], 1500, key="cli-reject")
    done = cosigner(gw, "reject", held["id"], "--reviewer", "ops@example.com", "--json")
    assert done.returncode == 0, done.stderr
    body = json.loads(done.stdout)
    assert body["status"] == "rejected" and body["decisions"][0]["via"] == "cli"
    resend = requests.post(
        gw.url + "/v1/refunds",
        data={"charge": charge["id"], "amount": "1500"},
        headers={"Authorization": f"Bearer {TEST_STRIPE_KEY}", "Idempotency-Key": "cli-reject"},
        timeout=10,
    )
    assert resend.status_code == 403
    assert resend.json()["error"]["code"] == "cosigner_rejected"


def test_mistakes_exit_1_with_a_message_and_change_nothing(
    gw: GatewayThread, upstream: Any, tmp_path: Path
) -> None:
    charge = upstream.create_charge()
    held = hold(gw, charge["id"], 1500)
    cases = [
        (("show", "act_doesnotexist"), "No such action: 'act_doesnotexist'"),
        (("approve", "act_doesnotexist", "--reviewer", "a@x.io"), "No such action"),
        (("approve", held["id"], "--reviewer", "a@x.io", "--set", "charge=ch_x"), "not editable"),
        (("approve", held["id"], "--reviewer", "a@x.io", "--set", "amount=9999"), "lowered"),
        (("approve", held["id"], "--reviewer", "a@x.io", "--set", "amount"), "field=value"),
        (("approve", held["id"], "--reviewer", "  "), "reviewer is required"),
        (("list", "--starting-after", "act_nope"), "names no action"),
    ]
    for args, message in cases:
        result = cosigner(gw, *args)
        assert result.returncode == 1, (args, result.stdout, result.stderr)
        assert message in result.stderr, (args, result.stderr)
        assert result.stderr.startswith("cosigner: ")
    assert gw.action(held["id"]).status == "awaiting_approval"

    missing = tmp_path / "nowhere" / "cosigner.db"
    result = cosigner(gw, "list", database=f"sqlite:///{missing}")
    assert result.returncode == 1 and "no database at" in result.stderr
    assert not missing.exists() and not missing.parent.exists()

    usage = cosigner(gw, "approve", held["id"])
    assert usage.returncode == 2 and "--reviewer" in usage.stderr
