"""Signed outcome POSTs (PRODUCT.md §8): signing, verifying, URL checks and the outbox sender.

When an action becomes terminal, ``ActionService`` enqueues a ``callback``
outbox item in the same transaction. ``CallbackSender.deliver_due`` (a
background loop) claims due items, POSTs the action object with
``Cosigner-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256(secret, "<t>.<body>")>``
and retries with backoff; every attempt is written to the action's timeline.

Receivers check the signature with :func:`verify`.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import json
import logging
import socket
import time
from collections.abc import Callable, Sequence
from urllib.parse import urlsplit

import aiohttp

from gateway.crypto import Keyring
from gateway.errors import InvalidRequest
from gateway.settings import Settings
from gateway.store.base import EventRecord, OutboxItem, Store
from gateway.tasks import TaskSet
from gateway.views import action_object

log = logging.getLogger("cosigner.callbacks")

SIGNATURE_HEADER = "Cosigner-Signature"
OUTBOX_KIND = "callback"
# Delays after failed attempts 1, 2, ...: 7 attempts spread over 67.5 minutes.
DEFAULT_DELAYS: tuple[float, ...] = (30.0, 120.0, 300.0, 600.0, 1200.0, 1800.0)
TIMEOUT = 10.0  # seconds one delivery attempt may take
MAX_IN_FLIGHT = 32  # deliveries at once; a slow receiver never holds up the others
MAX_URL_LENGTH = 2048
_DEFAULT_PORTS = {"http": 80, "https": 443}
_LOOPBACK_NAMES = frozenset({"localhost", "localhost.localdomain", "ip6-localhost"})


# -- signatures -----------------------------------------------------------------------------


def _mac(body: bytes, secret: bytes, t: int) -> str:
    return hmac.new(secret, str(t).encode() + b"." + body, hashlib.sha256).hexdigest()


def sign(body: bytes, secret: bytes, t: int) -> str:
    """The ``Cosigner-Signature`` header value for ``body`` sent at unix time ``t``."""
    return f"t={t},v1={_mac(body, secret, t)}"


def verify(
    body: bytes | str,
    header: str | None,
    secret: bytes | str,
    tolerance: int = 300,
    *,
    now: float | None = None,
) -> bool:
    """True if ``header`` signs exactly ``body`` with ``secret`` within ``tolerance`` seconds.

    Use the raw request body as received, before any JSON parsing. Several
    ``v1=`` values are accepted (any one may match), so a sender can sign with
    an old and a new secret while they rotate.
    """
    if not header:
        return False
    raw = body.encode() if isinstance(body, str) else body
    key = secret.encode() if isinstance(secret, str) else secret
    t: int | None = None
    candidates: list[str] = []
    for part in header.split(","):
        name, sep, value = part.strip().partition("=")
        if not sep:
            continue
        if name == "t":
            if not value.isascii() or not value.isdecimal() or len(value) > 12:
                return False
            t = int(value)
        elif name == "v1":
            candidates.append(value.strip())
    if t is None or not candidates:
        return False
    current = time.time() if now is None else now
    # Replays of an old delivery (and clocks far in the future) are refused.
    if abs(current - t) > tolerance:
        return False
    expected = _mac(raw, key, t).encode()
    matched = False
    for candidate in candidates:
        matched |= hmac.compare_digest(expected, candidate.lower().encode())
    return matched


def callback_secret(settings: Settings, keyring: Keyring) -> bytes:
    """COSIGNER_CALLBACK_SECRET, or a key derived from the master secret when it is unset."""
    if settings.callback_secret is not None:
        return settings.callback_secret.get_secret_value().encode()
    return keyring.key("callback")


# -- where callbacks may go -------------------------------------------------------------------


def _host_ip(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        pass
    try:
        # The resolver also accepts short and numeric IPv4 forms ("127.1", "2130706433").
        return ipaddress.IPv4Address(socket.inet_aton(host))
    except OSError:
        return None


def _is_loopback(host: str) -> bool:
    if host in _LOOPBACK_NAMES or host.endswith(".localhost"):
        return True
    ip = _host_ip(host)
    return ip is not None and (ip.is_loopback or ip.is_unspecified)


def _split_host_port(text: str) -> tuple[str, int | None]:
    """``host``, ``host:port``, ``[v6]:port`` or a bare IPv6 address; the port may be absent."""
    text = text.strip().lower()
    if "://" in text:
        text = text.split("://", 1)[1]
    text = text.split("/", 1)[0]
    port = ""
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else ""
    elif text.count(":") == 1:
        host, port = text.split(":")
    else:
        host = text
    if port and not port.isdecimal():
        raise ValueError(f"{text!r} has an invalid port")
    return host.rstrip("."), int(port) if port else None


def _matches(host: str, port: int, pattern: str) -> bool:
    try:
        p_host, p_port = _split_host_port(pattern)
    except ValueError:
        return False
    if p_port is not None and p_port != port:
        return False
    if p_host.startswith("*."):
        return host.endswith(p_host[1:])
    return host == p_host


def _own_endpoints(settings: Settings) -> set[tuple[str, int]]:
    own = {(settings.host.lower(), settings.port)}
    parts = urlsplit(settings.base_url)
    if parts.hostname:
        own.add((parts.hostname.rstrip("."), parts.port or _DEFAULT_PORTS[parts.scheme]))
    return own


def callback_url_problem(url: str, settings: Settings) -> str | None:
    """Why the gateway will not POST to ``url``, or None when it may."""
    if len(url) > MAX_URL_LENGTH:
        return f"is longer than {MAX_URL_LENGTH} characters"
    if any(ch <= " " or ch == "\x7f" for ch in url):
        return "must not contain spaces or control characters"
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        return "is not a valid URL"
    if parts.scheme not in _DEFAULT_PORTS:
        return "must be an http(s) URL"
    host = (parts.hostname or "").rstrip(".")
    if not host:
        return "must name a host"
    port = port or _DEFAULT_PORTS[parts.scheme]
    # SECURITY: a callback must never make the gateway call itself (loops, admin routes).
    own = _own_endpoints(settings)
    if (host, port) in own or (_is_loopback(host) and port == settings.port):
        return "must not point at the gateway itself"
    patterns = [p for p in settings.callback_allow.split(",") if p.strip()]
    if patterns and not any(_matches(host, port, p) for p in patterns):
        return f"host {host}:{port} is not in COSIGNER_CALLBACK_ALLOW"
    return None


def validate_callback_url(url: str, settings: Settings) -> str:
    """The URL if callbacks may go there; else a 400 naming the reason."""
    problem = callback_url_problem(url, settings)
    if problem is not None:
        raise InvalidRequest(f"Cosigner-Callback {problem}.", param="Cosigner-Callback")
    return url


# -- delivery ---------------------------------------------------------------------------------


def callback_session() -> aiohttp.ClientSession:
    """The one session callbacks go out on (separate from the Stripe session)."""
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=MAX_IN_FLIGHT, ttl_dns_cache=300),
        timeout=aiohttp.ClientTimeout(total=TIMEOUT),
        # Receivers are the operator's own services; no proxy settings from the environment.
        trust_env=False,
        # One receiver's cookies are never sent to another, nor kept at all.
        cookie_jar=aiohttp.DummyCookieJar(),
        headers={"User-Agent": "Cosigner-Callbacks/1"},
    )


def _describe(exc: BaseException, timeout: float) -> str:
    if isinstance(exc, TimeoutError):
        return f"no answer within {timeout:g}s"
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


class CallbackSender:
    """Delivers terminal actions to their callback URLs from the durable outbox."""

    def __init__(
        self,
        session: aiohttp.ClientSession,
        store: Store,
        settings: Settings,
        secret: bytes,
        tasks: TaskSet,
        *,
        delays: Sequence[float] = DEFAULT_DELAYS,
        timeout: float = TIMEOUT,
        secret_configured: bool = True,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._session = session
        self._store = store
        self._settings = settings
        self._secret = secret
        self._tasks = tasks
        self._delays = tuple(delays)
        self._timeout = timeout
        self._clock = clock
        self._in_flight: set[int] = set()
        self._warned = secret_configured

    def _warn_if_unverifiable(self) -> None:
        if not self._warned:
            self._warned = True
            log.warning(
                "COSIGNER_CALLBACK_SECRET is not set: callbacks are signed with a key derived "
                "from COSIGNER_SECRET_KEY that receivers cannot know. Set COSIGNER_CALLBACK_SECRET "
                "and give receivers the same value."
            )

    def __repr__(self) -> str:
        return f"CallbackSender(delays={self._delays}, in_flight={len(self._in_flight)})"

    async def deliver_due(self) -> int:
        """Start delivering every due callback (the worker step); how many were started."""
        room = MAX_IN_FLIGHT - len(self._in_flight)
        if room <= 0 or self._tasks.closing:
            return 0
        # The lease outlives one attempt; a crashed sender's items are retried after it.
        lease = self._timeout + 20.0
        items = await self._store.claim_outbox(OUTBOX_KIND, self._clock(), lease, room)
        for item in items:
            self._in_flight.add(item.id)
            self._tasks.spawn(self._deliver_tracked(item), name=f"callback-{item.action_id}")
        return len(items)

    async def _deliver_tracked(self, item: OutboxItem) -> None:
        try:
            await self.deliver(item)
        finally:
            self._in_flight.discard(item.id)

    async def deliver(self, item: OutboxItem) -> bool:
        """One attempt at one callback; records it and schedules the next. True if delivered."""
        attempt = item.attempts + 1
        url = str(item.payload.get("url") or "")
        status: int | None = None
        error: str | None = None
        latency_ms: float | None = None  # only for an attempt that was sent
        action = await self._store.get_action(item.action_id)
        if action is None:
            problem: str | None = "the action no longer exists"
        else:
            problem = callback_url_problem(url, self._settings)
            if problem is not None:
                problem = f"callback URL {problem}"
        if problem is None and action is not None:
            self._warn_if_unverifiable()
            decisions = await self._store.decisions(action.id)
            body = json.dumps(
                action_object(action, decisions, self._settings.base_url), separators=(",", ":")
            ).encode()
            headers = {
                "Content-Type": "application/json",
                "Cosigner-Action": action.id,
                SIGNATURE_HEADER: sign(body, self._secret, int(self._clock())),
            }
            started = time.perf_counter()
            try:
                async with self._session.post(
                    url,
                    data=body,
                    headers=headers,
                    # SECURITY: a redirect could send the signed outcome somewhere unchecked.
                    allow_redirects=False,
                    timeout=aiohttp.ClientTimeout(total=self._timeout),
                ) as resp:
                    status = resp.status
            except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
                error = _describe(exc, self._timeout)
            latency_ms = round((time.perf_counter() - started) * 1000, 1)
            if status is not None and not 200 <= status < 300:
                error = f"HTTP {status}"
                if 300 <= status < 400:
                    error += " (redirects are not followed)"
        else:
            error = problem
        delivered = error is None
        retry = not delivered and problem is None and attempt <= len(self._delays)
        now = self._clock()
        next_at = now + self._delays[attempt - 1] if retry else now
        await self._store.add_event(
            EventRecord(
                item.action_id,
                now,
                "callback",
                {
                    "url": url,
                    "attempt": attempt,
                    "status": status,
                    "latency_ms": latency_ms,
                    "error": error,
                    "delivered": delivered,
                    "next_attempt_at": round(next_at, 3) if retry else None,
                },
            )
        )
        await self._store.finish_outbox(
            item.id,
            status="delivered" if delivered else ("pending" if retry else "failed"),
            attempts=attempt,
            next_attempt_at=next_at,
            last_error=error,
        )
        if not delivered:
            log.warning(
                "callback for %s attempt %d failed: %s%s",
                item.action_id,
                attempt,
                error,
                f"; retrying in {self._delays[attempt - 1]:g}s" if retry else "; giving up",
            )
        return delivered
