"""Reviewer emails: message building, SMTP and log mailers, and the durable outbox worker.

``ActionService.hold`` enqueues one ``mail`` outbox item per reviewer in the
same transaction as the action, so a hold never waits on (or fails because
of) SMTP. ``MailOutbox.step`` runs in the background: it claims due items,
sends each with a fresh magic link, and records every attempt on the
action's timeline (``email_sent`` / ``email_failed``), retrying with
exponential backoff until ``max_attempts``.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass
from email.message import EmailMessage
from email.utils import formatdate, make_msgid
from typing import Protocol

import aiosmtplib

from gateway import tokens
from gateway.crypto import Keyring
from gateway.settings import Settings
from gateway.store.base import ActionRecord, EventRecord, OutboxItem, Store
from gateway.templating import context_rows, oneline, param_rows, render
from gateway.views import receipt_url

log = logging.getLogger("cosigner.mail")

KIND = "mail"
MAX_DELAY = 3600.0  # no retry waits longer than an hour
MAX_ERROR = 500
SUBJECT_LIMIT = 150


class Mailer(Protocol):
    """Something that delivers one email."""

    @property
    def transport(self) -> str:
        """How mail leaves, for receipts (never credentials)."""

    async def send(self, message: EmailMessage) -> None:
        """Deliver, or raise."""


# -- SMTP ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SmtpConfig:
    """A parsed ``COSIGNER_SMTP_URL``."""

    host: str
    port: int
    username: str | None
    password: str | None
    implicit_tls: bool
    starttls: bool

    def __repr__(self) -> str:
        auth = f"{self.username}:**********@" if self.username else ""
        return f"SmtpConfig({auth}{self.host}:{self.port})"


def parse_smtp_url(url: str) -> SmtpConfig:
    """``smtp://user:pass@host:port``, ``smtps://`` (implicit TLS), ``?starttls=true``."""
    # SECURITY: error messages below never repeat the URL: it may hold a password.
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("smtp", "smtps"):
        raise ValueError("COSIGNER_SMTP_URL must start with smtp:// or smtps://")
    if not parts.hostname:
        raise ValueError("COSIGNER_SMTP_URL names no host")
    try:
        port = parts.port
    except ValueError:
        raise ValueError("COSIGNER_SMTP_URL has an invalid port") from None
    query = urllib.parse.parse_qs(parts.query, keep_blank_values=True)
    unknown = set(query) - {"starttls"}
    if unknown:
        raise ValueError(f"COSIGNER_SMTP_URL: unknown option(s) {', '.join(sorted(unknown))}")
    flag = query.get("starttls", ["false"])[-1].lower()
    if flag not in ("true", "false", "1", "0", "yes", "no"):
        raise ValueError("COSIGNER_SMTP_URL: starttls must be true or false")
    starttls = flag in ("true", "1", "yes")
    implicit = parts.scheme == "smtps"
    if implicit and starttls:
        raise ValueError("COSIGNER_SMTP_URL: smtps:// is already TLS; drop ?starttls=true")
    return SmtpConfig(
        host=parts.hostname,
        port=port or (465 if implicit else 587 if starttls else 25),
        username=urllib.parse.unquote(parts.username) if parts.username else None,
        password=urllib.parse.unquote(parts.password) if parts.password is not None else None,
        implicit_tls=implicit,
        starttls=starttls,
    )


class SmtpMailer:
    """Sends through an SMTP server with aiosmtplib: plain, STARTTLS or implicit TLS, AUTH."""

    def __init__(
        self,
        config: SmtpConfig,
        *,
        tls_context: ssl.SSLContext | None = None,
        timeout: float = 30.0,
        local_hostname: str | None = None,
    ) -> None:
        self.config = config
        # None: the system's trust store (SSL_CERT_FILE works for a private CA).
        self._tls_context = tls_context
        self._timeout = timeout
        self._local_hostname = local_hostname

    @property
    def transport(self) -> str:
        """``smtp 127.0.0.1:25``, ``smtps ...``, ``smtp ... (STARTTLS)``."""
        c = self.config
        scheme = "smtps" if c.implicit_tls else "smtp"
        return f"{scheme} {c.host}:{c.port}" + (" (STARTTLS)" if c.starttls else "")

    async def send(self, message: EmailMessage) -> None:
        """Deliver one message; raises on any SMTP or network failure."""
        c = self.config
        await aiosmtplib.send(
            message,
            hostname=c.host,
            port=c.port,
            username=c.username,
            password=c.password,
            use_tls=c.implicit_tls,
            # Explicit: STARTTLS when asked for (and then required), never a silent downgrade.
            start_tls=c.starttls,
            tls_context=self._tls_context,
            timeout=self._timeout,
            local_hostname=self._local_hostname,
        )


class LogMailer:
    """Used when no SMTP server is configured: writes the text mail to the log."""

    transport = "log (COSIGNER_SMTP_URL is not set)"

    async def send(self, message: EmailMessage) -> None:
        """Log the message's text part."""
        body = message.get_body(("plain",))
        text = body.get_content() if isinstance(body, EmailMessage) else ""
        # SECURITY: the review link in the text is a capability (whoever has it can decide).
        # Printing it is this mailer's whole purpose: with no SMTP configured, the log is
        # how a developer reaches the review page. Configure COSIGNER_SMTP_URL in production.
        log.info(
            "reviewer email (no COSIGNER_SMTP_URL configured)\nTo: %s\nSubject: %s\n\n%s",
            message["To"],
            message["Subject"],
            text,
        )


def mailer_from_settings(settings: Settings) -> Mailer:
    """SMTP when ``COSIGNER_SMTP_URL`` is set, else the log."""
    if settings.smtp_url is None or not settings.smtp_url.get_secret_value():
        return LogMailer()
    return SmtpMailer(
        parse_smtp_url(settings.smtp_url.get_secret_value()),
        local_hostname=_domain(settings.mail_from),
    )


# -- messages -----------------------------------------------------------------------------


def _domain(address: str) -> str:
    return address.rpartition("@")[2].strip(" >") or "localhost"


def review_url(base_url: str, token: str) -> str:
    """The magic link."""
    return f"{base_url}/review/{token}"


def subject_for(action: ActionRecord) -> str:
    """One line: what the reviewer is asked to approve."""
    return f"Approval needed: {oneline(action.summary, SUBJECT_LIMIT)}"


def build_message(
    action: ActionRecord, to: str, *, token: str, base_url: str, mail_from: str
) -> EmailMessage:
    """The multipart (text + HTML) email asking ``to`` to review ``action``."""
    context = {
        "action": action,
        "reviewer": to,
        "params": param_rows(action),
        "context_rows": context_rows(action),
        "review_url": review_url(base_url, token),
        "receipt_url": receipt_url(base_url, action.id),
    }
    message = EmailMessage()
    message["From"] = mail_from
    message["To"] = to
    message["Subject"] = subject_for(action)
    message["Date"] = formatdate(usegmt=True)
    message["Message-ID"] = make_msgid("cosigner", domain=_domain(mail_from))
    message["Auto-Submitted"] = "auto-generated"
    message["X-Cosigner-Action"] = action.id
    message.set_content(render("email.txt", **context))
    message.add_alternative(render("email.html", **context), subtype="html")
    return message


# -- the outbox worker --------------------------------------------------------------------


def _describe(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    if isinstance(exc, TimeoutError) and not str(exc):
        text = "timed out"
    return oneline(f"{type(exc).__name__}: {text}", MAX_ERROR)


class MailOutbox:
    """Delivers the ``mail`` outbox: one reviewer email per item, retried with backoff."""

    def __init__(
        self,
        store: Store,
        mailer: Mailer,
        keyring: Keyring,
        *,
        base_url: str,
        mail_from: str,
        clock: Callable[[], float] = time.time,
        retry_delay: float = 30.0,
        max_attempts: int = 8,
        batch: int = 10,
        send_timeout: float = 60.0,
    ) -> None:
        self._store = store
        self._mailer = mailer
        self._keyring = keyring
        self._base_url = base_url
        self._mail_from = mail_from
        self._clock = clock
        self._retry_delay = retry_delay
        self._max_attempts = max_attempts
        self._batch = batch
        self._send_timeout = send_timeout

    @classmethod
    def from_settings(
        cls,
        store: Store,
        mailer: Mailer,
        keyring: Keyring,
        settings: Settings,
        clock: Callable[[], float] = time.time,
    ) -> MailOutbox:
        """The worker as configured."""
        return cls(
            store,
            mailer,
            keyring,
            base_url=settings.base_url,
            mail_from=settings.mail_from,
            clock=clock,
            retry_delay=settings.mail_retry_delay,
            max_attempts=settings.mail_attempts,
        )

    async def step(self) -> int:
        """Send every due email once; how many were tried."""
        # The lease outlives one send, so a second replica never sends the same email.
        lease = self._send_timeout + 30.0
        items = await self._store.claim_outbox(KIND, self._clock(), lease, self._batch)
        results = await asyncio.gather(
            *(self._deliver(item) for item in items), return_exceptions=True
        )
        for item, result in zip(items, results, strict=True):
            if isinstance(result, Exception):
                # Left leased: retried once the lease runs out, like a crashed replica's.
                log.error("mail outbox item %s failed", item.id, exc_info=result)
        return len(items)

    async def _deliver(self, item: OutboxItem) -> None:
        now = self._clock()
        attempt = item.attempts + 1
        to = str(item.payload.get("to") or "")
        action = await self._store.get_action(item.action_id)
        if action is None or not to:
            await self._finish(item, "failed", attempt, now, "no such action or recipient")
            return
        if action.status != "awaiting_approval" or action.expires_at <= now:
            # Decided (or expired) before the email went out: a link would only disappoint.
            reason = "expired" if action.status == "awaiting_approval" else action.status
            await self._finish(item, "skipped", attempt, now, f"action is {reason}")
            await self._event(action, now, "email_skipped", to=to, reason=f"action is {reason}")
            return
        try:
            token = tokens.issue(self._keyring, action.id, to, action.expires_at)
            message = build_message(
                action, to, token=token, base_url=self._base_url, mail_from=self._mail_from
            )
            await asyncio.wait_for(self._mailer.send(message), self._send_timeout)
        except Exception as exc:
            error = _describe(exc)
            final = attempt >= self._max_attempts
            delay = min(self._retry_delay * 2 ** (attempt - 1), MAX_DELAY)
            log.warning(
                "email to %s for %s failed (attempt %d%s): %s",
                to,
                action.id,
                attempt,
                ", giving up" if final else f", retrying in {delay:.0f}s",
                error,
            )
            await self._event(
                action,
                now,
                "email_failed",
                to=to,
                attempt=attempt,
                error=error,
                will_retry=not final,
                retry_in=None if final else round(delay, 1),
            )
            await self._finish(item, "failed" if final else "pending", attempt, now + delay, error)
            return
        await self._event(
            action, now, "email_sent", to=to, attempt=attempt, transport=self._mailer.transport
        )
        await self._finish(item, "sent", attempt, now, None)

    async def _finish(
        self, item: OutboxItem, status: str, attempts: int, next_at: float, error: str | None
    ) -> None:
        await self._store.finish_outbox(
            item.id, status=status, attempts=attempts, next_attempt_at=next_at, last_error=error
        )

    async def _event(self, action: ActionRecord, now: float, kind: str, **data: object) -> None:
        await self._store.add_event(EventRecord(action.id, now, kind, dict(data)))
