"""Abuse limits: token buckets per agent on the proxy, per client address on sign-in pages.

- Per agent (after authentication, so a bogus key never gets a bucket): one
  budget for reads (GET, HEAD) and one for writes, ``COSIGNER_RATE_LIMIT_READS``
  and ``COSIGNER_RATE_LIMIT_WRITES``.
- Per client address: the review pages and the dashboard login form
  (``COSIGNER_RATE_LIMIT_PAGES``), and failed sign-ins on the JSON API and the
  dashboard (``COSIGNER_RATE_LIMIT_SIGNIN_FAILURES``: a 401 answering a
  presented credential, or a failed login form): once an address has used up
  its failures, its requests there get 429 until the bucket refills, valid
  token or not, so a weak admin token cannot be guessed at speed.

A rate is ``N/s``, ``N/m`` or ``N/h``, optionally ``burst B`` (default: 2 N),
or ``off``. Over the limit: 429 in Stripe's shape (``rate_limit_error``) with
``Retry-After`` in whole seconds (on the review and dashboard pages, a page
saying how long to wait). Buckets live in memory, per process (each
replica counts on its own), and their tables are bounded: the least recently
used bucket is dropped first (an idle bucket is a full one anyway). The
client address is the TCP peer; behind a reverse proxy every client shares
the proxy's address, so set these limits with that in mind.
"""

from __future__ import annotations

import math
import re
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from aiohttp import web

from gateway.errors import CosignerError, RateLimited

if TYPE_CHECKING:  # settings imports this module to validate rates
    from gateway.settings import Settings

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
PageAnswer = Callable[[web.Request, RateLimited], web.StreamResponse]
Guard = Callable[[web.Request, Handler], Awaitable[web.StreamResponse]]

MAX_BUCKETS = 10_000
LOGIN_PATH = "/dashboard/login"
PAGE_PREFIXES = ("/review/", LOGIN_PATH)
SIGN_IN_PREFIXES = ("/cosigner/", "/dashboard")
HTML_PREFIXES = ("/review/", "/dashboard")  # pages for people: their 429 is a page too
LIMITED_PREFIXES = PAGE_PREFIXES + SIGN_IN_PREFIXES  # where address_limits apply
_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0}
_RATE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*/\s*(s|m|h)\s*(?:burst\s+(\d+))?\s*", re.IGNORECASE)


@dataclass(frozen=True, slots=True)
class Rate:
    """A steady rate and the burst a full bucket allows."""

    per_second: float
    burst: float
    text: str

    def __str__(self) -> str:
        return self.text


def parse_rate(text: str) -> Rate | None:
    """``100/s``, ``60/m burst 20``, ``off`` → a Rate (None when off); ValueError if malformed."""
    if text.strip().lower() in ("off", "0", "none", ""):
        return None
    match = _RATE.fullmatch(text)
    if match is None:
        raise ValueError(f"must look like 100/s, 60/m or '20/s burst 40' (or off), not {text!r}")
    count = float(match.group(1))
    if count <= 0:
        raise ValueError("the rate must be positive (or 'off')")
    burst = float(match.group(3)) if match.group(3) else max(1.0, 2 * count)
    if burst < 1:
        raise ValueError("the burst must be at least 1")
    return Rate(count / _UNITS[match.group(2).lower()], burst, " ".join(text.split()))


class Buckets:
    """Token buckets by key, refilled lazily, at most ``max_keys`` of them."""

    def __init__(
        self,
        rate: Rate,
        *,
        max_keys: int = MAX_BUCKETS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.rate = rate
        self._max_keys = max_keys
        self._clock = clock
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()  # tokens, at

    def __len__(self) -> int:
        return len(self._buckets)

    def _level(self, key: str, now: float) -> float:
        found = self._buckets.get(key)
        if found is None:
            return self.rate.burst
        tokens, at = found
        return min(self.rate.burst, tokens + (now - at) * self.rate.per_second)

    def _store(self, key: str, tokens: float, now: float) -> None:
        self._buckets[key] = (tokens, now)
        self._buckets.move_to_end(key)
        while len(self._buckets) > self._max_keys:
            self._buckets.popitem(last=False)

    def take(self, key: str) -> float:
        """Spend one token: 0 if there was one, else the seconds until there will be."""
        now = self._clock()
        tokens = self._level(key, now)
        if tokens >= 1:
            self._store(key, tokens - 1, now)
            return 0.0
        self._store(key, tokens, now)
        return (1 - tokens) / self.rate.per_second

    def wait(self, key: str) -> float:
        """Seconds until ``key`` has a token (0 if it has one now); spends nothing."""
        tokens = self._level(key, self._clock())
        return 0.0 if tokens >= 1 else (1 - tokens) / self.rate.per_second


def _limited(message: str, wait: float) -> RateLimited:
    return RateLimited(message, max(1, math.ceil(wait)))


class RateLimiter:
    """Every limit of one gateway process."""

    def __init__(
        self,
        *,
        reads: Rate | None,
        writes: Rate | None,
        pages: Rate | None,
        signin_failures: Rate | None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        def buckets(rate: Rate | None) -> Buckets | None:
            return Buckets(rate, clock=clock) if rate is not None else None

        self.reads = buckets(reads)
        self.writes = buckets(writes)
        self.pages = buckets(pages)
        self.failures = buckets(signin_failures)

    def agent(self, name: str, *, write: bool) -> None:
        """Spend one of an (authenticated) agent's reads or writes, or raise RateLimited."""
        buckets = self.writes if write else self.reads
        if buckets is None:
            return
        wait = buckets.take(name)
        if wait:
            kind = "writes" if write else "reads"
            raise _limited(
                f"Too many requests: agent {name} is over its limit of {buckets.rate} {kind}.",
                wait,
            )

    def page(self, address: str) -> None:
        """Spend one of an address's page views, or raise RateLimited."""
        if self.pages is not None and (wait := self.pages.take(address)):
            raise _limited("Too many requests from your address.", wait)

    def check_signin(self, address: str) -> None:
        """Raise RateLimited while an address has no sign-in failures left."""
        if self.failures is not None and (wait := self.failures.wait(address)):
            raise _limited("Too many failed sign-ins from your address.", wait)

    def signin_failed(self, address: str) -> None:
        """Count one failed sign-in (a 401) against an address."""
        if self.failures is not None:
            self.failures.take(address)


def limiter_from_settings(settings: Settings) -> RateLimiter:
    """The limits ``COSIGNER_RATE_LIMIT_*`` ask for."""
    return RateLimiter(
        reads=parse_rate(settings.rate_limit_reads),
        writes=parse_rate(settings.rate_limit_writes),
        pages=parse_rate(settings.rate_limit_pages),
        signin_failures=parse_rate(settings.rate_limit_signin_failures),
    )


def address_limits(limiter: RateLimiter, *, page_answer: PageAnswer | None = None) -> Guard:
    """Per-address limits on the review pages, the login form and sign-in failures.

    Keyed by path prefix, so it covers routes it knows nothing else about: the errors
    middleware hands it every request under ``LIMITED_PREFIXES`` (the proxy's requests
    never pay for a layer they pass through; per-agent limits are the proxy's own). A 429
    it raises is rendered in Stripe's shape by that middleware; on the pages people read
    (``HTML_PREFIXES``), ``page_answer`` renders it instead, as a page.
    """

    async def limits(request: web.Request, handler: Handler) -> web.StreamResponse:
        path = request.path
        address = request.remote or "-"
        guarded = path.startswith(SIGN_IN_PREFIXES)
        try:
            if path.startswith(PAGE_PREFIXES):
                limiter.page(address)
            if guarded:
                limiter.check_signin(address)
        except RateLimited as exc:
            if page_answer is not None and path.startswith(HTML_PREFIXES):
                return page_answer(request, exc)
            raise
        if guarded:
            # Only a presented credential can be a guess: a 401 for "not signed in yet"
            # (a reviewer following a receipt link) is no failure.
            guarded = "Authorization" in request.headers or (
                request.method == "POST" and path == LOGIN_PATH
            )
        try:
            response = await handler(request)
        except (CosignerError, web.HTTPException) as exc:
            if guarded and exc.status == 401:
                limiter.signin_failed(address)
            raise
        if guarded and response.status == 401:
            limiter.signin_failed(address)
        return response

    return limits
