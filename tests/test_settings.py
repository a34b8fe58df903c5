"""A database password never shows: not in Settings' repr, the serve log, the doctor or errors."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from gateway.settings import Settings, display_url
from gateway.store import store_from_url
from tests.support.gateway import SECRET_KEY, run_cosigner
from tests.support.peers import free_port

RULES = Path(__file__).parent / "data" / "rules_core"
BUDGET_RULES = Path(__file__).parent / "data" / "rules_budget"
PASSWORD = "pg-SECRET-pass-71c3"


def _urls(port: int) -> list[str]:
    """The spellings libpq accepts a password in: userinfo, ``?password=``, odd characters."""
    return [
        f"postgresql://cosigner:{PASSWORD}@127.0.0.1:{port}/cosigner",
        f"postgres://cosigner@127.0.0.1:{port}/cosigner?sslmode=disable&password={PASSWORD}",
        f"postgresql://cosigner:{PASSWORD}@x@127.0.0.1:{port}/cosigner",  # '@' in the password
    ]


def _cli(cwd: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    settings = {f"COSIGNER_{k.upper()}": v for k, v in env.items()}
    return run_cosigner(*args, cwd=cwd, settings=settings)


@pytest.mark.parametrize("url", _urls(5432))
def test_settings_repr_and_str_never_show_the_database_password(url: str) -> None:
    settings = Settings(database=url, secret_key=SECRET_KEY)
    assert settings.database == url  # the store still gets the real URL
    for text in (repr(settings), str(settings), settings.database_display):
        assert PASSWORD not in text, text
    assert SECRET_KEY not in repr(settings)
    assert "127.0.0.1:5432/cosigner" in settings.database_display


DISPLAY_CASES = [
    ("postgresql://u:pw@db:5432/app", "postgresql://u:***@db:5432/app"),
    ("postgresql://u:p@w@db/app", "postgresql://u:***@db/app"),
    ("postgresql://u:a/b?c@db/app", "postgresql://u:***@db/app"),
    ("postgresql://u:p%40w@db/app?sslmode=require", "postgresql://u:***@db/app?sslmode=require"),
    ("postgresql://:pw@db/app", "postgresql://:***@db/app"),
    ("postgresql://u@db/app", "postgresql://u@db/app"),
    (
        "postgresql://db/app?password=pw&sslmode=require",
        "postgresql://db/app?password=***&sslmode=require",
    ),
    ("postgresql://db/app?sslpassword=pw", "postgresql://db/app?sslpassword=***"),
    ("postgresql://db/app?PASSWORD=pw", "postgresql://db/app?PASSWORD=***"),
    ("host=db password=pw dbname=app", "host=db password=*** dbname=app"),
    # An '@' in the query could end a password: masking too much is the safe side.
    ("postgresql://db:5432/app?application_name=a@b", "postgresql://db:***@b"),
    ("sqlite:///./cosigner.db", "sqlite:///./cosigner.db"),
    ("sqlite:///srv/a@b:c.db", "sqlite:///srv/a@b:c.db"),
]


@pytest.mark.parametrize(("url", "shown"), DISPLAY_CASES)
def test_display_url_masks_every_password_spelling(url: str, shown: str) -> None:
    assert display_url(url) == shown


def test_an_unknown_database_scheme_is_named_without_the_url() -> None:
    with pytest.raises(ValueError) as caught:
        store_from_url(f"mysql://cosigner:{PASSWORD}@127.0.0.1/cosigner")
    assert "mysql://" in str(caught.value)
    assert PASSWORD not in str(caught.value)


def test_serve_logs_where_the_database_is_but_not_its_password(tmp_path: Path) -> None:
    port = free_port()
    for url in _urls(port):
        result = _cli(
            tmp_path,
            "serve",
            listen=f"127.0.0.1:{free_port()}",
            database=url,
            rules=str(RULES),
            secret_key=SECRET_KEY,
            log_level="DEBUG",
        )
        output = result.stdout + result.stderr
        assert result.returncode != 0, output  # nothing listens on the database port
        assert f"127.0.0.1:{port}/cosigner" in output, output  # the listening line says where
        assert PASSWORD not in output, output


def test_doctor_names_the_database_host_but_not_its_password(tmp_path: Path) -> None:
    port = free_port()
    for url in _urls(port):
        result = _cli(
            tmp_path,
            "doctor",
            "--timeout",
            "3",
            database=url,
            upstream=f"http://127.0.0.1:{free_port()}",
            rules=str(RULES),
        )
        output = result.stdout + result.stderr
        assert result.returncode == 1, output
        assert f"cannot connect to PostgreSQL at 127.0.0.1:{port}/cosigner" in output, output
        assert PASSWORD not in output, output


def test_rules_explain_names_an_unreadable_database_without_its_password(tmp_path: Path) -> None:
    port = free_port()
    for url in _urls(port):
        args = ("rules", "explain", "POST", "/v1/refunds", "-d", "amount=100")
        result = _cli(tmp_path, *args, "--rules", str(BUDGET_RULES), database=url)
        output = result.stdout + result.stderr
        assert result.returncode == 0, output
        assert f"could not read budget usage from {display_url(url)}" in output, output
        assert f"127.0.0.1:{port}/cosigner" in output, output
        assert PASSWORD not in output, output
