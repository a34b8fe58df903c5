"""``cosigner doctor``: check the settings and every peer, and say what to fix.

Prints one line per check — ``OK``, ``WARN`` (works, but not how production
should run) or ``FAIL`` (will not work) with what to change — and exits 1 if
anything failed. It only reads: it never migrates the database, generates a
secret or sends an email.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sqlite3
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import aiohttp
import aiosmtplib

from gateway.rules import RulesError, load_rules
from gateway.settings import SECRET_FILE_NAME, Settings

Level = Literal["OK", "WARN", "FAIL"]
LoadSettings = Callable[[str | None], Settings]
MIN_SECRET = 16
GOOD_SECRET = 32


@dataclass(frozen=True, slots=True)
class Check:
    """The outcome of one check."""

    level: Level
    name: str
    message: str
    details: tuple[str, ...] = ()

    def render(self) -> str:
        """``FAIL  smtp: cannot connect ...`` plus indented details."""
        lines = [f"{self.level:<4}  {self.name}: {self.message}"]
        lines.extend(f"        {line}" for line in self.details)
        return "\n".join(lines)


def _describe(exc: BaseException) -> str:
    text = str(exc).strip()
    if isinstance(exc, TimeoutError) and not text:
        return "timed out"
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


# -- settings and secrets -----------------------------------------------------------------


def check_secret_key(settings: Settings) -> Check:
    """The master secret: set, long enough, the same on every replica."""
    if settings.secret_key is not None:
        length = len(settings.secret_key.get_secret_value())
        if length < MIN_SECRET:
            return Check(
                "FAIL",
                "secret key",
                f"COSIGNER_SECRET_KEY is {length} characters; the gateway refuses fewer than "
                f"{MIN_SECRET}. Use 32+ random characters (python -c 'import secrets; "
                "print(secrets.token_urlsafe(48))').",
            )
        rotating = (
            "; COSIGNER_SECRET_KEY_PREVIOUS is still accepted for decrypting"
            if settings.secret_key_previous is not None
            else ""
        )
        return Check("OK", "secret key", f"COSIGNER_SECRET_KEY is set{rotating}")
    path = settings.data_dir / SECRET_FILE_NAME
    where = f"using the generated {path}" if path.exists() else f"one will be generated into {path}"
    if not settings.database.startswith("sqlite:///"):
        return Check(
            "FAIL",
            "secret key",
            f"COSIGNER_SECRET_KEY is not set ({where}). With a shared database every replica "
            "must use the same secret: set COSIGNER_SECRET_KEY to one value everywhere.",
        )
    return Check(
        "WARN",
        "secret key",
        f"COSIGNER_SECRET_KEY is not set ({where}). Set it in production and back it up: "
        "without it, held credentials and review links cannot be read.",
    )


def check_admin_token(settings: Settings) -> Check:
    """The admin API and dashboard are closed without a token."""
    if settings.admin_token is None or not settings.admin_token.get_secret_value():
        return Check(
            "WARN",
            "admin token",
            "COSIGNER_ADMIN_TOKEN is not set: the admin API and the dashboard are closed. "
            "Set it to approve from the dashboard, the API or the CLI.",
        )
    if len(settings.admin_token.get_secret_value()) < GOOD_SECRET:
        return Check(
            "WARN",
            "admin token",
            f"COSIGNER_ADMIN_TOKEN is shorter than {GOOD_SECRET} characters; use a long "
            "random value.",
        )
    return Check("OK", "admin token", "COSIGNER_ADMIN_TOKEN is set")


def check_public_url(settings: Settings) -> Check:
    """Links in emails and receipts must reach the gateway from a reviewer's browser."""
    if settings.public_url is None:
        if settings.host in ("0.0.0.0", "::", "127.0.0.1", "localhost", "::1"):
            return Check(
                "WARN",
                "public url",
                f"COSIGNER_PUBLIC_URL is not set: links in emails will point at "
                f"{settings.base_url}, which reviewers on other machines cannot open. Set it "
                "to the address reviewers use (https://... behind your TLS proxy).",
            )
        return Check("OK", "public url", f"links use {settings.base_url}")
    if settings.public_url.startswith("http://") and settings.host not in ("127.0.0.1", "::1"):
        return Check(
            "WARN",
            "public url",
            f"{settings.public_url} is plain http: review links and dashboard sessions travel "
            "unencrypted. Terminate TLS in front of the gateway and use https://.",
        )
    return Check("OK", "public url", f"links use {settings.public_url}")


def check_rules(settings: Settings) -> Check:
    """Every rule file valid; someone to email for every hold."""
    try:
        rules = load_rules(settings.rules)
    except RulesError as exc:
        return Check(
            "FAIL",
            "rules",
            f"{settings.rules} is invalid; the gateway will not start. Fix:",
            tuple(str(problem) for problem in exc.problems),
        )
    if not settings.reviewer_list:
        silent = [r.name for r in rules.rules if r.action == "hold" and not r.reviewers]
        if rules.default_read == "hold" or rules.default_write == "hold":
            silent.append("the defaults")
        if silent:
            named = ", ".join(silent[:3]) + (
                f" and {len(silent) - 3} more" if len(silent) > 3 else ""
            )
            return Check(
                "WARN",
                "rules",
                f"{len(rules.rules)} rules in {settings.rules}, but {named} hold "
                "without naming reviewers and COSIGNER_REVIEWERS is empty: nobody is emailed. "
                "Set COSIGNER_REVIEWERS.",
            )
    return Check("OK", "rules", f"{len(rules.rules)} rules in {settings.rules}")


def check_agent_keys(settings: Settings) -> Check | None:
    """Gateway keys need a real Stripe key to substitute."""
    if settings.require_agent_keys and settings.stripe_key is None:
        return Check(
            "WARN",
            "agent keys",
            "COSIGNER_REQUIRE_AGENT_KEYS=true but COSIGNER_STRIPE_KEY is not set: every "
            "gateway key needs its own --stripe-key, or forwards will fail.",
        )
    return None


# -- the store ----------------------------------------------------------------------------


def _expected(dialect: str) -> set[int]:
    from gateway.store.sqlite import migrations

    try:
        return {version for version, _ in migrations(dialect)}
    except (FileNotFoundError, OSError):
        return set()


def _migrations_check(applied: set[int], expected: set[int], where: str) -> Check:
    pending = sorted(expected - applied)
    newer = sorted(applied - expected)
    if newer:
        return Check(
            "WARN",
            "store",
            f"{where} has migration(s) {', '.join(map(str, newer))} that this version does not "
            "know: it was upgraded by a newer cosigner. Upgrade this one too.",
        )
    if pending:
        return Check(
            "WARN",
            "store",
            f"{where} is reachable; {len(pending)} migration(s) pending "
            f"({', '.join(f'{v:04d}' for v in pending)}): applied in one transaction at the "
            "next start. Back up first.",
        )
    return Check("OK", "store", f"{where} is reachable and up to date")


def _sqlite_check(path: Path) -> Check:
    if not path.exists():
        folder = path.parent
        while not folder.exists() and folder != folder.parent:
            folder = folder.parent
        if not folder.is_dir() or not _writable(folder):
            return Check(
                "FAIL",
                "store",
                f"{path} does not exist and {folder} is not writable: the gateway cannot "
                "create its database. Fix COSIGNER_DATABASE or the folder's permissions.",
            )
        return Check("WARN", "store", f"{path} does not exist yet; it is created at first start")
    try:
        # Read-only: the doctor never migrates or creates anything.
        db = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True, timeout=5)
        try:
            found = db.execute(
                "SELECT name FROM sqlite_master WHERE type='table' AND name='schema_migrations'"
            ).fetchone()
            applied = (
                {row[0] for row in db.execute("SELECT version FROM schema_migrations")}
                if found
                else set()
            )
        finally:
            db.close()
    except sqlite3.Error as exc:
        return Check(
            "FAIL",
            "store",
            f"cannot read {path}: {exc}. Check that it is a Cosigner SQLite database and "
            "readable by this user.",
        )
    return _migrations_check(applied, _expected("sqlite"), str(path))


def _writable(folder: Path) -> bool:
    return os.access(folder, os.W_OK | os.X_OK)


async def _postgres_check(url: str, timeout: float) -> Check:
    import asyncpg

    # SECURITY: only the host part of the URL is ever printed.
    where = "PostgreSQL at " + url.rpartition("@")[2].split("?")[0]
    try:
        conn = await asyncpg.connect(url, timeout=timeout)
    except Exception as exc:
        return Check(
            "FAIL",
            "store",
            f"cannot connect to {where}: {_describe(exc)}. Check COSIGNER_DATABASE (host, "
            "port, user, password, database) and that the server accepts this client.",
        )
    try:
        table = await conn.fetchval("SELECT to_regclass('schema_migrations')")
        applied = (
            {r["version"] for r in await conn.fetch("SELECT version FROM schema_migrations")}
            if table
            else set()
        )
    except Exception as exc:
        return Check("FAIL", "store", f"{where} answered, but reading it failed: {_describe(exc)}")
    finally:
        await conn.close()
    return _migrations_check(applied, _expected("postgres"), where)


async def check_store(settings: Settings, timeout: float) -> Check:
    """Reachable, and migrated as far as this version expects (read-only)."""
    url = settings.database
    if url.startswith("sqlite:///"):
        path = Path(url.removeprefix("sqlite:///") or "cosigner.db").expanduser().resolve()
        return await asyncio.to_thread(_sqlite_check, path)
    if url.startswith(("postgresql://", "postgres://")):
        return await _postgres_check(url, timeout)
    return Check("FAIL", "store", "COSIGNER_DATABASE must start with sqlite:/// or postgresql://")


# -- peers --------------------------------------------------------------------------------


async def check_smtp(settings: Settings, timeout: float) -> Check:
    """Connect, EHLO, STARTTLS and log in as the gateway would; send nothing."""
    from gateway.mail import parse_smtp_url

    if settings.smtp_url is None or not settings.smtp_url.get_secret_value():
        return Check(
            "WARN",
            "smtp",
            "COSIGNER_SMTP_URL is not set: reviewer emails are written to the log. Set "
            "smtp://user:pass@host:port (smtps:// or ?starttls=true for TLS).",
        )
    try:
        config = parse_smtp_url(settings.smtp_url.get_secret_value())
    except ValueError as exc:
        return Check("FAIL", "smtp", f"{exc}")
    where = f"{config.host}:{config.port}"
    client = aiosmtplib.SMTP(
        hostname=config.host,
        port=config.port,
        username=config.username,
        password=config.password,
        use_tls=config.implicit_tls,
        start_tls=config.starttls,
        timeout=timeout,
        local_hostname=settings.mail_from.rpartition("@")[2].strip(" >") or "localhost",
    )
    try:
        # connect() greets, upgrades with STARTTLS and logs in when the URL asks for them.
        await client.connect()
        await client.ehlo()
    except aiosmtplib.SMTPAuthenticationError:
        return Check(
            "FAIL",
            "smtp",
            f"{where} refused the user name or password. Fix the credentials in "
            "COSIGNER_SMTP_URL (percent-encode special characters).",
        )
    except (aiosmtplib.SMTPException, OSError, TimeoutError) as exc:
        return Check(
            "FAIL",
            "smtp",
            f"cannot talk to {where}: {_describe(exc)}. Check the host and port in "
            "COSIGNER_SMTP_URL, that the server is up, and its TLS mode (smtps:// for port "
            "465, ?starttls=true for 587).",
        )
    finally:
        if client.is_connected:
            try:
                await client.quit()
            except (aiosmtplib.SMTPException, OSError, TimeoutError):
                client.close()
    extras = [
        name for name, on in (("STARTTLS", config.starttls), ("TLS", config.implicit_tls)) if on
    ]
    if config.username:
        extras.append("login")
    how = f" ({', '.join(extras)} ok)" if extras else ""
    return Check("OK", "smtp", f"{where} answered EHLO{how}")


async def check_upstream(settings: Settings, timeout: float) -> list[Check]:
    """Any HTTP answer means reachable; with COSIGNER_STRIPE_KEY, also that it is accepted."""
    checks: list[Check] = []
    client_timeout = aiohttp.ClientTimeout(total=timeout)
    async with aiohttp.ClientSession(timeout=client_timeout, trust_env=False) as session:
        started = time.perf_counter()
        try:
            async with session.get(settings.upstream + "/", allow_redirects=False) as resp:
                status = resp.status
        except (aiohttp.ClientError, TimeoutError) as exc:
            checks.append(
                Check(
                    "FAIL",
                    "upstream",
                    f"cannot reach {settings.upstream}: {_describe(exc)}. Check "
                    "COSIGNER_UPSTREAM, DNS and that outbound HTTPS is allowed.",
                )
            )
            return checks
        ms = (time.perf_counter() - started) * 1000
        checks.append(
            Check("OK", "upstream", f"{settings.upstream} answered HTTP {status} in {ms:.0f} ms")
        )
        if settings.stripe_key is not None:
            key = settings.stripe_key.get_secret_value()
            try:
                async with session.get(
                    settings.upstream + "/v1/balance",
                    headers={"Authorization": f"Bearer {key}"},
                    allow_redirects=False,
                ) as resp:
                    status = resp.status
            except (aiohttp.ClientError, TimeoutError) as exc:
                checks.append(Check("WARN", "stripe key", f"could not be tried: {_describe(exc)}"))
            else:
                if status in (401, 403):
                    checks.append(
                        Check(
                            "FAIL",
                            "stripe key",
                            f"{settings.upstream} rejects COSIGNER_STRIPE_KEY (HTTP {status}). "
                            "Set a valid secret or restricted key.",
                        )
                    )
                else:
                    checks.append(Check("OK", "stripe key", "COSIGNER_STRIPE_KEY is accepted"))
    return checks


# -- running ------------------------------------------------------------------------------


async def run_checks(settings: Settings, timeout: float) -> list[Check]:
    """Every check, the slow network ones concurrently."""
    checks = [
        Check("OK", "settings", "every COSIGNER_* setting is valid"),
        check_secret_key(settings),
        check_admin_token(settings),
        check_public_url(settings),
        check_rules(settings),
    ]
    agent_keys = check_agent_keys(settings)
    if agent_keys is not None:
        checks.append(agent_keys)

    async def guarded(name: str, coro: Awaitable[Any]) -> list[Check]:
        try:
            result = await coro
        except Exception as exc:  # a bug in a check must not hide the others
            return [Check("FAIL", name, f"check crashed: {_describe(exc)}")]
        return result if isinstance(result, list) else [result]

    for found in await asyncio.gather(
        guarded("store", check_store(settings, timeout)),
        guarded("smtp", check_smtp(settings, timeout)),
        guarded("upstream", check_upstream(settings, timeout)),
    ):
        checks.extend(found)
    return checks


def cmd_doctor(args: argparse.Namespace, load_settings: LoadSettings) -> int:
    """Run every check, print one line each, exit 1 if any failed."""
    try:
        settings = load_settings(args.config)
    except SystemExit as exc:  # the CLI's settings loader explains invalid settings this way
        first, *rest = str(exc.code).splitlines()
        fix = "Fix these environment variables (or --config entries):"
        print(Check("FAIL", "settings", f"{first} {fix}", tuple(r.strip() for r in rest)).render())
        return 1
    checks = asyncio.run(run_checks(settings, args.timeout))
    for check in checks:
        print(check.render())
    failed = sum(c.level == "FAIL" for c in checks)
    warned = sum(c.level == "WARN" for c in checks)
    if failed:
        print(f"\n{failed} check(s) failed: fix the FAIL lines above.")
        return 1
    print(f"\nAll checks passed ({warned} warning(s)).")
    return 0


def register(sub: Any, load_settings: LoadSettings) -> None:
    """Add ``cosigner doctor`` to the command line."""
    doctor = sub.add_parser(
        "doctor", help="check settings, store, SMTP and upstream; say what to fix"
    )
    doctor.add_argument("--config", help="TOML file of settings (names without COSIGNER_)")
    doctor.add_argument(
        "--timeout", type=float, default=5.0, help="seconds per network check (default 5)"
    )
    doctor.set_defaults(func=lambda args: cmd_doctor(args, load_settings))
