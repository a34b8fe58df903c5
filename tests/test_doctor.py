"""`cosigner doctor` as an operator runs it: a real process against real peers."""

from __future__ import annotations

import asyncio
import sqlite3
import subprocess
from pathlib import Path
from typing import Any

import pytest

from gateway.store.sqlite import SqliteStore
from tests.support.gateway import ADMIN_TOKEN, SECRET_KEY, run_cosigner
from tests.support.peers import TEST_STRIPE_KEY, SmtpSink, free_port

ROOT = Path(__file__).resolve().parent.parent
RULES = Path(__file__).parent / "data" / "rules_core"
SMTP_USER, SMTP_PASSWORD = "mailer", "smtp-password-for-doctor-9f3"


def doctor(cwd: Path, **env: str) -> subprocess.CompletedProcess[str]:
    settings = {f"COSIGNER_{k.upper()}": v for k, v in env.items()}
    return run_cosigner("doctor", "--timeout", "3", cwd=cwd, settings=settings)


def lines(out: str, level: str, name: str) -> list[str]:
    return [line for line in out.splitlines() if line.startswith(f"{level:<4}  {name}:")]


def migrated_db(path: Path) -> str:
    async def migrate() -> None:
        store = SqliteStore(path)
        await store.open()
        await store.close()

    asyncio.run(migrate())
    return f"sqlite:///{path}"


@pytest.fixture
def good(tmp_path: Path, fake_stripe: str) -> Any:
    with SmtpSink(username=SMTP_USER, password=SMTP_PASSWORD) as sink:
        yield {
            "upstream": fake_stripe,
            "smtp_url": sink.url,
            "database": migrated_db(tmp_path / "gw.db"),
            "rules": str(RULES),
            "secret_key": SECRET_KEY,
            "admin_token": ADMIN_TOKEN,
            "public_url": "https://cosigner.example.com",
            "reviewers": "ops@example.com",
            "stripe_key": TEST_STRIPE_KEY,
        }


def test_a_healthy_setup_passes_every_check(tmp_path: Path, good: dict[str, str]) -> None:
    result = doctor(tmp_path, **good)
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    for name in ("settings", "secret key", "admin token", "public url", "rules", "store"):
        assert lines(out, "OK", name), out
    assert "up to date" in lines(out, "OK", "store")[0]
    assert lines(out, "OK", "smtp") == [
        f"OK    smtp: 127.0.0.1:{good['smtp_url'].rsplit(':', 1)[1]} answered EHLO (login ok)"
    ]
    assert "answered HTTP" in lines(out, "OK", "upstream")[0]
    assert lines(out, "OK", "stripe key")
    assert "WARN" not in out and "FAIL" not in out
    assert out.rstrip().endswith("All checks passed (0 warning(s)).")
    for secret in (SMTP_PASSWORD, ADMIN_TOKEN, SECRET_KEY, TEST_STRIPE_KEY):
        assert secret not in out + result.stderr


def test_unreachable_smtp_and_upstream_fail_with_what_to_fix(
    tmp_path: Path, good: dict[str, str]
) -> None:
    smtp_port, upstream_port = free_port(), free_port()
    result = doctor(
        tmp_path,
        **{
            **good,
            "smtp_url": f"smtp://{SMTP_USER}:{SMTP_PASSWORD}@127.0.0.1:{smtp_port}",
            "upstream": f"http://127.0.0.1:{upstream_port}",
        },
    )
    assert result.returncode == 1
    out = result.stdout
    (smtp,) = lines(out, "FAIL", "smtp")
    assert f"cannot talk to 127.0.0.1:{smtp_port}" in smtp and "COSIGNER_SMTP_URL" in smtp
    (upstream,) = lines(out, "FAIL", "upstream")
    assert f"cannot reach http://127.0.0.1:{upstream_port}" in upstream
    assert "COSIGNER_UPSTREAM" in upstream
    assert lines(out, "OK", "store") and lines(out, "OK", "rules")
    assert "2 check(s) failed" in out
    assert SMTP_PASSWORD not in out


def test_a_wrong_smtp_password_is_named_without_repeating_it(
    tmp_path: Path, good: dict[str, str]
) -> None:
    port = good["smtp_url"].rsplit(":", 1)[1]
    wrong = "not-the-password-7781"
    result = doctor(
        tmp_path, **{**good, "smtp_url": f"smtp://{SMTP_USER}:{wrong}@127.0.0.1:{port}"}
    )
    assert result.returncode == 1
    (smtp,) = lines(result.stdout, "FAIL", "smtp")
    assert "refused the user name or password" in smtp
    assert wrong not in result.stdout + result.stderr


def test_invalid_settings_are_named(tmp_path: Path) -> None:
    result = doctor(tmp_path, listen="everywhere", max_body="-1")
    assert result.returncode == 1
    assert result.stdout.startswith("FAIL  settings: Invalid settings")
    assert "COSIGNER_LISTEN" in result.stdout and "COSIGNER_MAX_BODY" in result.stdout


def test_broken_rules_fail_naming_file_rule_and_field(tmp_path: Path, good: dict[str, str]) -> None:
    rules = tmp_path / "rules"
    rules.mkdir()
    (rules / "10-bad.yaml").write_text(
        "version: 1\nrules:\n  - name: oops\n    match: {method: POST, path: /v1/refunds}\n"
        "    when: {amount: {lessthan: 5}}\n    action: allow\n"
    )
    result = doctor(tmp_path, **{**good, "rules": str(rules)})
    assert result.returncode == 1
    (rules_line,) = lines(result.stdout, "FAIL", "rules")
    assert "will not start" in rules_line
    detail = result.stdout.split(rules_line, 1)[1]
    assert "10-bad.yaml" in detail and "oops" in detail and "when.amount" in detail


def test_pending_migrations_are_a_warning_and_the_doctor_migrates_nothing(
    tmp_path: Path, good: dict[str, str]
) -> None:
    path = tmp_path / "old.db"
    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE schema_migrations (version INTEGER PRIMARY KEY, applied REAL)")
    result = doctor(tmp_path, **{**good, "database": f"sqlite:///{path}"})
    assert result.returncode == 0, result.stdout
    (store,) = lines(result.stdout, "WARN", "store")
    assert "migration(s) pending (0001" in store and "next start" in store
    with sqlite3.connect(path) as db:
        tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    assert tables == {"schema_migrations"}


def test_nothing_configured_warns_and_creates_nothing(tmp_path: Path, fake_stripe: str) -> None:
    result = doctor(tmp_path, upstream=fake_stripe, rules=str(ROOT / "rules"))
    assert result.returncode == 0, result.stdout
    for name in ("secret key", "admin token", "public url", "smtp", "store"):
        assert lines(result.stdout, "WARN", name), result.stdout
    assert "COSIGNER_SMTP_URL is not set" in result.stdout
    assert list(tmp_path.iterdir()) == [], "the doctor only reads"


def test_postgres_without_a_shared_secret_and_unreachable(tmp_path: Path) -> None:
    port = free_port()
    result = doctor(
        tmp_path,
        database=f"postgresql://cosigner:pg-password-1234@127.0.0.1:{port}/cosigner",
        upstream=f"http://127.0.0.1:{free_port()}",
        rules=str(RULES),
    )
    assert result.returncode == 1
    (secret,) = lines(result.stdout, "FAIL", "secret key")
    assert "every replica" in secret
    (store,) = lines(result.stdout, "FAIL", "store")
    assert f"cannot connect to PostgreSQL at 127.0.0.1:{port}/cosigner" in store
    assert "pg-password-1234" not in result.stdout + result.stderr
