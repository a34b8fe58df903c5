"""`cosigner serve` as a real process: defaults, restarts, signals; `cosigner rules check`."""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

import requests
import stripe

from tests.support.gateway import ADMIN_TOKEN, SECRET_KEY, GatewayProcess, clean_env, run_cosigner
from tests.support.peers import TEST_STRIPE_KEY, free_port

ROOT = Path(__file__).resolve().parent.parent
CORE_RULES = Path(__file__).parent / "data" / "rules_core"


def test_serve_runs_with_nothing_configured(tmp_path: Path) -> None:
    shutil.copytree(ROOT / "rules", tmp_path / "rules")
    port = free_port()
    env = {"COSIGNER_LISTEN": f"127.0.0.1:{port}"}
    gw = GatewayProcess(env, tmp_path)
    gw.env = {**clean_env(), **env}
    with gw:
        health = requests.get(gw.url + "/healthz", timeout=5)
        assert health.status_code == 200 and health.json()["rules"] > 0
        # The admin API stays closed without a token.
        closed = requests.get(gw.url + "/cosigner/v1/actions", timeout=5)
        assert closed.status_code == 401
        assert closed.json()["error"]["code"] == "admin_disabled"
    assert (tmp_path / "cosigner.db").exists()
    secret = tmp_path / "cosigner-secret.key"
    assert secret.exists() and (secret.stat().st_mode & 0o777) == 0o600
    log = gw.log.read_text()
    assert "COSIGNER_SECRET_KEY is not set" in log
    assert secret.read_text().strip() not in log


def test_held_action_survives_a_restart_and_completes_after(
    tmp_path: Path, fake_stripe: str, upstream: object
) -> None:
    port = free_port()
    env = {
        **clean_env(),
        "COSIGNER_LISTEN": f"127.0.0.1:{port}",
        "COSIGNER_UPSTREAM": fake_stripe,
        "COSIGNER_RULES": str(CORE_RULES),
        "COSIGNER_DATABASE": f"sqlite:///{tmp_path / 'gw.db'}",
        "COSIGNER_SECRET_KEY": SECRET_KEY,
        "COSIGNER_ADMIN_TOKEN": ADMIN_TOKEN,
    }
    charge = upstream.create_charge(amount=7000)  # type: ignore[attr-defined]
    gw = GatewayProcess(env, tmp_path).start()
    try:
        client = stripe.StripeClient(TEST_STRIPE_KEY, base_addresses={"api": gw.url})
        held = client.v1.refunds.create(params={"charge": charge["id"], "amount": 3000})
        assert held["status"] == "awaiting_approval"
        assert gw.terminate() == 0
        gw.start()
        admin = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
        url = f"{gw.url}/cosigner/v1/actions/{held['id']}"
        assert requests.get(url, headers=admin, timeout=5).json()["status"] == "awaiting_approval"
        approved = requests.post(
            url + "/approve", json={"reviewer": "a@b.c"}, headers=admin, timeout=10
        )
        assert approved.status_code == 200
        for _ in range(100):
            action = requests.get(url, headers=admin, timeout=5).json()
            if action["status"] == "completed":
                break
            time.sleep(0.1)
        assert action["status"] == "completed" and action["response_code"] == 200
        refunds = upstream.refunds(charge["id"])  # type: ignore[attr-defined]
        assert len([r for r in refunds if r["charge"] == charge["id"]]) == 1
    finally:
        gw.kill()


def _cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return run_cosigner(*args, cwd=cwd or ROOT)


def test_rules_check_accepts_the_shipped_rules_and_names_problems(tmp_path: Path) -> None:
    ok = _cli("rules", "check", str(ROOT / "rules"))
    assert ok.returncode == 0, ok.stderr
    (tmp_path / "10-bad.yaml").write_text(
        "version: 1\nrules:\n  - name: oops\n    match: {method: POST, path: /v1/refunds}\n"
        "    when: {amount: {lessthan: 5}}\n    action: allow\n"
    )
    bad = _cli("rules", "check", str(tmp_path))
    assert bad.returncode == 1
    assert "10-bad.yaml" in bad.stderr and "oops" in bad.stderr and "when.amount" in bad.stderr


def test_rules_explain_prints_the_deciding_rule() -> None:
    out = _cli(
        "rules",
        "explain",
        "POST",
        "/v1/refunds",
        "-d",
        "charge=ch_1",
        "-d",
        "amount=500",
        "--rules",
        str(CORE_RULES),
    )
    assert out.returncode == 0, out.stderr
    assert "HOLD by rule 'refunds'" in out.stdout
    assert "amount 500 is not gt 100000" in out.stdout


def test_invalid_rules_stop_startup_with_a_message(tmp_path: Path) -> None:
    rules = tmp_path / "rules"
    rules.mkdir()
    (rules / "00.yaml").write_text("version: 2\n")
    settings = {
        "COSIGNER_LISTEN": f"127.0.0.1:{free_port()}",
        "COSIGNER_RULES": str(rules),
        "COSIGNER_SECRET_KEY": SECRET_KEY,
    }
    proc = run_cosigner("serve", cwd=tmp_path, settings=settings)
    assert proc.returncode == 2
    assert "00.yaml" in proc.stderr and "version" in proc.stderr
