"""Frozen settings read from ``COSIGNER_*`` environment variables (PRODUCT.md §1)."""

from __future__ import annotations

import logging
import os
import re
import secrets
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from gateway.ratelimit import parse_rate

log = logging.getLogger("cosigner")

SECRET_FILE_NAME = "cosigner-secret.key"


class Settings(BaseSettings):
    """Every setting has a safe default so `cosigner serve` runs with nothing configured."""

    model_config = SettingsConfigDict(
        env_prefix="COSIGNER_", env_file=".env", extra="ignore", frozen=True
    )

    listen: str = "127.0.0.1:8080"
    upstream: str = "https://api.stripe.com"
    public_url: str | None = None
    # SECURITY: may hold a password; repr shows nothing of it, logs show database_display.
    database: str = Field("sqlite:///./cosigner.db", repr=False)
    rules: Path = Path("./rules")
    secret_key: SecretStr | None = None
    secret_key_previous: SecretStr | None = None
    admin_token: SecretStr | None = None
    smtp_url: SecretStr | None = None
    mail_from: str = "cosigner@localhost"
    reviewers: str = ""
    callback_secret: SecretStr | None = None
    callback_allow: str = ""
    max_wait: int = Field(60, ge=0)
    max_body: int = Field(1_048_576, gt=0)
    stripe_key: SecretStr | None = None
    require_agent_keys: bool = False
    # Not in the public table, but operators may tune them.
    forward_timeout: float = Field(30.0, gt=0)
    forward_attempts: int = Field(4, ge=1)
    worker_interval: float = Field(1.0, gt=0)
    shutdown_grace: float = Field(20.0, ge=0)
    mail_retry_delay: float = Field(30.0, gt=0)  # first retry of a reviewer email; doubles
    mail_attempts: int = Field(8, ge=1)  # then the email is marked failed on the receipt
    # Seconds between callback attempts (JSON list); one more attempt than delays, then failed.
    callback_delays: tuple[float, ...] = (30.0, 120.0, 300.0, 600.0, 1200.0, 1800.0)
    log_level: str = "INFO"
    log_format: Literal["text", "json"] = "text"  # json: one object per line, for collectors
    rules_watch: float = Field(1.0, ge=0)  # seconds between looks at the rules folder; 0: off
    event_loop: Literal["auto", "uvloop", "asyncio"] = "auto"  # auto: uvloop when installed
    # Abuse limits (gateway/ratelimit.py): "N/s", "N/m" or "N/h", optionally "burst B", or "off".
    rate_limit_reads: str = "100/s burst 200"  # per agent: GET/HEAD (Stripe's live-mode rate)
    rate_limit_writes: str = "25/s burst 200"  # per agent: every other method
    rate_limit_pages: str = "60/m burst 60"  # per client address: /review/ and /dashboard/login
    rate_limit_signin_failures: str = "10/m burst 20"  # per address: 401s on API and dashboard

    @field_validator("listen")
    @classmethod
    def _listen_has_port(cls, value: str) -> str:
        host, sep, port = value.rpartition(":")
        if not sep or not host or not port.isdigit():
            raise ValueError("COSIGNER_LISTEN must be host:port, e.g. 127.0.0.1:8080")
        return value

    @field_validator(
        "rate_limit_reads", "rate_limit_writes", "rate_limit_pages", "rate_limit_signin_failures"
    )
    @classmethod
    def _rate(cls, value: str) -> str:
        parse_rate(value)  # raises ValueError with the expected form
        return value

    @field_validator("log_level")
    @classmethod
    def _known_level(cls, value: str) -> str:
        if value.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
            raise ValueError("must be DEBUG, INFO, WARNING, ERROR or CRITICAL")
        return value.upper()

    @field_validator("upstream", "public_url")
    @classmethod
    def _http_url(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("http://", "https://")):
            raise ValueError("must be an http(s) URL")
        return value.rstrip("/") if value else value

    @property
    def host(self) -> str:
        """Host part of COSIGNER_LISTEN."""
        return self.listen.rpartition(":")[0].strip("[]")

    @property
    def port(self) -> int:
        """Port part of COSIGNER_LISTEN."""
        return int(self.listen.rpartition(":")[2])

    @property
    def base_url(self) -> str:
        """Base of links in emails, receipts and 202 bodies."""
        return self.public_url or f"http://{self.listen}"

    @property
    def reviewer_list(self) -> tuple[str, ...]:
        """Default reviewers for rules that name none."""
        return tuple(r.strip() for r in self.reviewers.split(",") if r.strip())

    @property
    def database_display(self) -> str:
        """COSIGNER_DATABASE with its password masked, for logs and messages."""
        return display_url(self.database)

    @property
    def data_dir(self) -> Path:
        """Folder of the SQLite file, or the working folder for other databases."""
        if self.database.startswith("sqlite:///"):
            return Path(self.database.removeprefix("sqlite:///")).expanduser().resolve().parent
        return Path.cwd()


_USER = re.compile(r"[^:@/?#]*:")  # "user:" at the start of a URL's authority
_QUERY_PASSWORD = re.compile(r"(?i)((?:^|[?&\s])(?:ssl)?password=)[^&\s]*")


def display_url(url: str) -> str:
    """A database URL fit to print: ``postgresql://user:***@host:5432/db``.

    Masks the userinfo password and ``password=``/``sslpassword=`` options (libpq reads
    both), even in a URL too malformed to parse.
    """
    scheme, sep, rest = url.partition("://")
    if sep and scheme != "sqlite":
        user = _USER.match(rest)
        # The password runs to the LAST '@', as libpq and asyncpg read it: it may hold '@',
        # and, unencoded, '/', '?' or '#'. An '@' in the query masks too much: the safe side.
        at = rest.rfind("@")
        if user is not None and at >= user.end():
            rest = f"{rest[: user.end()]}***{rest[at:]}"
        url = f"{scheme}://{rest}"
    return _QUERY_PASSWORD.sub(r"\1***", url)


def load_secret_key(settings: Settings) -> bytes:
    """The master secret: configured, or generated once into the data folder with a warning."""
    if settings.secret_key is not None:
        value = settings.secret_key.get_secret_value()
        if len(value) < 16:
            raise ValueError("COSIGNER_SECRET_KEY must be at least 16 characters")
        return value.encode()
    path = settings.data_dir / SECRET_FILE_NAME
    if path.exists():
        return path.read_bytes().strip()
    path.parent.mkdir(parents=True, exist_ok=True)
    generated = secrets.token_urlsafe(48).encode()
    # SECURITY: create with 0600 so no other local user can read the master secret.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(generated + b"\n")
    log.warning(
        "COSIGNER_SECRET_KEY is not set: generated one into %s. Back it up; set the same "
        "value on every replica.",
        path,
    )
    return generated
