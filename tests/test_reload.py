"""Rules change without a restart: on a folder change and on SIGHUP, validated whole."""

from __future__ import annotations

import logging
import os
import signal
from pathlib import Path
from typing import Any

import pytest
import requests

from gateway.policy import Policy
from gateway.reload import RulesReloader
from tests.support.gateway import ADMIN_TOKEN, SECRET_KEY, GatewayProcess, gateway_thread
from tests.support.gateway import settings_for as gateway_settings
from tests.support.peers import TEST_STRIPE_KEY, free_port
from tests.support.scrape import value, wait_metric

ROOT = Path(__file__).resolve().parent.parent
AUTH = {"Authorization": f"Bearer {TEST_STRIPE_KEY}"}
HOLD_A = """version: 1
defaults: {read: allow, write: hold}
rules:
  - name: refunds-a
    match: {method: POST, path: /v1/refunds}
    action: hold
    reviewers: [a@example.com]
"""
DENY_B = """version: 1
defaults: {read: allow, write: hold}
rules:
  - name: refunds-b
    match: {method: POST, path: /v1/refunds}
    action: deny
    message: Refunds are frozen while we investigate.
"""
BROKEN = """version: 1
rules:
  - name: refunds-c
    match: {method: POST, path: /v1/refunds}
    action: explode
"""
RELOADS = "cosigner_rule_reloads_total"


def refund(url: str, charge: str = "ch_1", amount: int = 1500) -> requests.Response:
    return requests.post(
        url + "/v1/refunds",
        data={"charge": charge, "amount": str(amount)},
        headers=AUTH,
        timeout=30,
    )


def rules_dir(tmp_path: Path, text: str = HOLD_A) -> Path:
    folder = tmp_path / "rules"
    folder.mkdir()
    (folder / "10-refunds.yaml").write_text(text)
    return folder


# -- the watcher --------------------------------------------------------------------------


async def test_a_change_is_loaded_once_the_folder_has_settled(tmp_path: Path) -> None:
    folder = rules_dir(tmp_path)
    policy = Policy.load(folder)
    reloader = RulesReloader(policy)
    assert not await reloader.poll()
    (folder / "10-refunds.yaml").write_text(DENY_B)
    # First look: changed, but maybe half-written. Nothing is loaded yet.
    assert not await reloader.poll()
    assert [r.name for r in policy.current.rules] == ["refunds-a"]
    assert await reloader.poll()
    assert [r.name for r in policy.current.rules] == ["refunds-b"]
    assert (policy.reloads, policy.failed_reloads) == (1, 0)
    assert not await reloader.poll()
    # Editors' swap files and other suffixes are not rules.
    (folder / ".10-refunds.yaml.swp").write_text("garbage")
    (folder / "notes.txt").write_text("garbage")
    assert not await reloader.poll() and not await reloader.poll()
    assert policy.reloads == 1


async def test_a_broken_folder_is_reported_once_per_change(tmp_path: Path) -> None:
    folder = rules_dir(tmp_path)
    policy = Policy.load(folder)
    reloader = RulesReloader(policy)
    (folder / "20-broken.yaml").write_text(BROKEN)
    assert not await reloader.poll()
    assert await reloader.poll()
    assert (policy.reloads, policy.failed_reloads) == (0, 1)
    for _ in range(3):
        assert not await reloader.poll()
    assert policy.failed_reloads == 1
    assert [r.name for r in policy.current.rules] == ["refunds-a"]
    (folder / "20-broken.yaml").unlink()
    assert not await reloader.poll()
    assert await reloader.poll()
    assert (policy.reloads, policy.failed_reloads, policy.last_error) == (1, 1, None)


def test_held_actions_keep_their_rule_after_the_files_change(
    tmp_path: Path, fake_stripe: str, upstream: Any
) -> None:
    charge = upstream.create_charge(amount=5000)
    folder = rules_dir(tmp_path)
    settings = gateway_settings(tmp_path, fake_stripe, folder, rules_watch=0.1)
    with gateway_thread(settings) as gw:
        held = refund(gw.url, charge["id"])
        assert held.status_code == 202 and held.json()["rule"] == "refunds-a"
        action_id = held.json()["id"]

        (folder / "10-refunds.yaml").write_text(DENY_B)
        samples = wait_metric(gw.url, RELOADS, lambda v: v == 1, result="ok")
        assert value(samples, RELOADS, result="failed") == 0
        denied = refund(gw.url, charge["id"], 1000)
        assert denied.status_code == 403
        assert denied.json()["error"]["rule"] == "refunds-b"

        approved = gw.admin(
            "POST", f"/cosigner/v1/actions/{action_id}/approve", json={"reviewer": "a@b.c"}
        )
        assert approved.status_code == 200, approved.text
        gw.wait_status(action_id, {"completed"})
        receipt = gw.admin("GET", f"/cosigner/v1/actions/{action_id}").json()
        assert receipt["status"] == "completed" and receipt["rule"] == "refunds-a"
        refunds = [r for r in upstream.refunds(charge["id"]) if r["charge"] == charge["id"]]
        assert [r["amount"] for r in refunds] == [1500]


def test_a_broken_file_keeps_the_old_rules_and_says_what_is_wrong(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="cosigner.rules")
    folder = rules_dir(tmp_path)
    closed = f"http://127.0.0.1:{free_port()}"
    with gateway_thread(gateway_settings(tmp_path, closed, folder, rules_watch=0.1)) as gw:
        (folder / "20-broken.yaml").write_text(BROKEN)
        samples = wait_metric(gw.url, RELOADS, lambda v: v == 1, result="failed")
        assert value(samples, RELOADS, result="ok") == 0
        assert value(samples, "cosigner_rules_last_reload_successful") == 0
        assert value(samples, "cosigner_rules_loaded") == 1

        still = refund(gw.url)
        assert still.status_code == 202 and still.json()["rule"] == "refunds-a"
        ready = requests.get(gw.url + "/readyz", timeout=10)
        assert ready.status_code == 200 and ready.json()["rules_reload_failed"] is True

        failures = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
        assert len(failures) == 1
        assert "previous rules stay in force" in failures[0]
        assert "20-broken.yaml" in failures[0] and "refunds-c" in failures[0]
        assert "action" in failures[0]

        (folder / "20-broken.yaml").unlink()
        samples = wait_metric(gw.url, RELOADS, lambda v: v == 1, result="ok")
        assert value(samples, RELOADS, result="failed") == 1
        assert value(samples, "cosigner_rules_last_reload_successful") == 1
        assert "rules_reload_failed" not in requests.get(gw.url + "/readyz", timeout=10).json()


# -- SIGHUP -------------------------------------------------------------------------------


def test_sighup_reloads_a_running_gateway(tmp_path: Path) -> None:
    folder = rules_dir(tmp_path)
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("COSIGNER_")}
    env.update(
        {
            "PYTHONPATH": str(ROOT),
            "COSIGNER_LISTEN": f"127.0.0.1:{port}",
            "COSIGNER_UPSTREAM": f"http://127.0.0.1:{free_port()}",
            "COSIGNER_RULES": str(folder),
            "COSIGNER_RULES_WATCH": "0",  # only the signal may reload here
            "COSIGNER_DATABASE": f"sqlite:///{tmp_path / 'gw.db'}",
            "COSIGNER_SECRET_KEY": SECRET_KEY,
            "COSIGNER_ADMIN_TOKEN": ADMIN_TOKEN,
        }
    )
    with GatewayProcess(env, tmp_path) as gw:
        assert gw.proc is not None
        assert refund(gw.url).json()["rule"] == "refunds-a"

        (folder / "10-refunds.yaml").write_text(DENY_B)
        os.kill(gw.proc.pid, signal.SIGHUP)
        wait_metric(gw.url, RELOADS, lambda v: v == 1, result="ok")
        assert refund(gw.url).json()["error"]["rule"] == "refunds-b"

        (folder / "20-broken.yaml").write_text(BROKEN)
        os.kill(gw.proc.pid, signal.SIGHUP)
        samples = wait_metric(gw.url, RELOADS, lambda v: v == 1, result="failed")
        assert value(samples, RELOADS, result="ok") == 1
        assert refund(gw.url).json()["error"]["rule"] == "refunds-b"
        assert gw.proc.poll() is None, "SIGHUP must not stop the gateway"
        assert gw.terminate() == 0
    log = gw.log.read_text()
    assert "reloading rules" in log and "(SIGHUP)" in log
    assert "20-broken.yaml" in log and "previous rules stay in force" in log
