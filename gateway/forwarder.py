"""Sends allowed and approved requests upstream: retries, backoff, one idempotency key.

The retry policy copies stripe-python's ``_should_retry`` and
``_sleep_time_seconds``: honour ``Stripe-Should-Retry`` first, retry 409, 429
(after ``Retry-After``), 5xx and connection errors, 0.5 s doubling to a cap
with jitter, the same ``Idempotency-Key`` on every attempt.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol, TypeVar

import aiohttp
from multidict import CIMultiDict, CIMultiDictProxy, istr
from yarl import URL

# Request headers an agent may pass to Stripe; everything else is dropped.
FORWARD_REQUEST_HEADERS = (
    "Stripe-Version",
    "Stripe-Account",
    "Stripe-Context",
    "Idempotency-Key",
    "User-Agent",
    "X-Stripe-Client-User-Agent",
    "Accept-Language",
)
# Response headers never passed back (hop-by-hop, or no longer true after decoding).
HOP_BY_HOP = frozenset(
    h.lower()
    for h in (
        "Connection",
        "Keep-Alive",
        "Proxy-Authenticate",
        "Proxy-Authorization",
        "TE",
        "Trailer",
        "Trailers",
        "Transfer-Encoding",
        "Upgrade",
        "Content-Length",
        "Content-Encoding",
        "Date",
        "Server",
    )
)
# As istr, whose case is folded once: a lookup by a plain str folds it every time.
_HOP_BY_HOP_NAMES = tuple(istr(name) for name in HOP_BY_HOP)
INITIAL_DELAY = 0.5
MAX_DELAY = 5.0
MAX_RETRY_AFTER = 60.0
T = TypeVar("T")


class Outbound(NamedTuple):
    """Exactly what goes upstream.

    Immutable records on the per-request path are NamedTuples: as read-only as a frozen
    dataclass, and built for a third of the CPU (a frozen dataclass sets each field
    through ``object.__setattr__``).
    """

    method: str
    path: str
    query: str
    headers: Mapping[str, str]
    body: bytes


class UpstreamResponse(NamedTuple):
    """What Stripe answered."""

    status: int
    headers: CIMultiDict[str]
    body: bytes
    latency_ms: float


@dataclass(frozen=True, slots=True)
class Attempt:
    """One try, for the receipt's timeline."""

    number: int
    status: int | None
    error: str | None
    latency_ms: float
    will_retry: bool
    delay: float


class UpstreamError(Exception):
    """Stripe could not be reached (connection error or timeout)."""


class ForwardFailed(Exception):
    """No final answer after every attempt."""

    def __init__(self, message: str, last: UpstreamResponse | None) -> None:
        super().__init__(message)
        self.last = last


class ForwardObserver(Protocol):
    """Told about every upstream attempt (the seam for metrics)."""

    def upstream(self, seconds: float, answered: bool) -> None:
        """One attempt took ``seconds``; ``answered`` is False without an HTTP answer."""

    def forward_attempt(self, attempt: Attempt) -> None:
        """One attempt of a forward with retries."""

    def forward_finished(self, completed: bool) -> None:
        """A forward with retries got its final answer (True) or gave up (False)."""


def response_headers(headers: CIMultiDictProxy[str] | CIMultiDict[str]) -> CIMultiDict[str]:
    """Upstream response headers minus hop-by-hop ones."""
    out = CIMultiDict(headers)
    for name in _HOP_BY_HOP_NAMES:  # a copy and a few lookups: cheaper than filtering each one
        out.popall(name, None)
    return out


def should_retry(status: int, headers: Mapping[str, str]) -> bool:
    """stripe-python's policy, plus 429."""
    flag = headers.get("Stripe-Should-Retry")
    if flag == "false":
        return False
    if flag == "true":
        return True
    return status in (409, 429) or status >= 500


def backoff(attempt: int, headers: Mapping[str, str] | None = None) -> float:
    """Seconds to sleep before retry number ``attempt`` (1-based).

    Jittered exponential backoff, but never less than the ``Retry-After`` the
    upstream asked for (capped at MAX_RETRY_AFTER), as stripe-python does.
    """
    delay: float = min(INITIAL_DELAY * 2.0 ** (attempt - 1), MAX_DELAY)
    delay *= 0.5 * (1 + random.random())
    delay = max(INITIAL_DELAY, delay)
    retry_after = (headers or {}).get("Retry-After", "").strip()
    if retry_after.isdigit():
        delay = max(delay, min(float(retry_after), MAX_RETRY_AFTER))
    return delay


class Forwarder:
    """Talks to the one fixed upstream through one pooled session."""

    def __init__(
        self,
        session: aiohttp.ClientSession,
        upstream: str,
        *,
        timeout: float,
        attempts: int,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        observer: ForwardObserver | None = None,
    ) -> None:
        self._session = session
        # SECURITY: the upstream is fixed at startup; nothing in a request changes it.
        self._base = upstream.rstrip("/")
        self._timeout = aiohttp.ClientTimeout(total=timeout, connect=min(timeout, 10.0))
        self.attempts = attempts
        self._sleep = sleep
        self._observer = observer
        self._reads: dict[tuple[object, ...], asyncio.Future[Any]] = {}

    @property
    def attempt_timeout(self) -> float:
        """Longest one attempt may take."""
        total: float | None = self._timeout.total
        return float(total or 30.0)

    def url(self, out: Outbound) -> URL:
        """The full upstream URL, already encoded: yarl must not re-escape the approved bytes."""
        return URL(self._base + out.path + (("?" + out.query) if out.query else ""), encoded=True)

    async def send_once(self, out: Outbound) -> UpstreamResponse:
        """One attempt; raises UpstreamError when Stripe cannot be reached."""
        start = time.perf_counter()
        try:
            async with self._session.request(
                out.method,
                self.url(out),
                headers=out.headers,
                data=out.body if out.body else None,
                timeout=self._timeout,
                allow_redirects=False,
            ) as resp:
                body = await resp.read()
                seconds = time.perf_counter() - start
                if self._observer is not None:
                    self._observer.upstream(seconds, True)
                return UpstreamResponse(
                    resp.status, response_headers(resp.headers), body, seconds * 1000
                )
        except (aiohttp.ClientError, TimeoutError) as exc:
            if self._observer is not None:
                self._observer.upstream(time.perf_counter() - start, False)
            kind = "timed out" if isinstance(exc, TimeoutError) else type(exc).__name__
            raise UpstreamError(f"upstream {kind}: {exc}".rstrip(": ")) from exc

    async def read_shared(self, out: Outbound, parse: Callable[[UpstreamResponse], T]) -> T:
        """A GET the gateway makes for itself, shared by identical GETs already in flight.

        Holds on one object that arrive together (an agent retrying, a burst of refunds of
        one charge) then cost Stripe one read and one rate-limit slot, not one each, and
        the gateway one ``parse`` of the answer (a JSON decode): every caller gets the same
        parsed value, which must therefore never be changed. A caller that joins gets the
        answer to a read already on its way: at most one round trip older than a read of
        its own. Identical means the same ``parse`` (a module-level function: it is part of
        the key) and the same path, query and headers (the API key and Stripe-Account among
        them). Once the answer is in, the next GET reads afresh.
        """
        key = (parse, out.method, out.path, out.query, *sorted(out.headers.items()))
        shared = self._reads.get(key)
        if shared is None:
            shared = asyncio.ensure_future(self._read_parsed(out, parse))
            self._reads[key] = shared

            def done(task: asyncio.Future[Any]) -> None:
                if self._reads.get(key) is task:
                    del self._reads[key]
                if not task.cancelled():
                    task.exception()  # retrieved: callers that gave up never will

            shared.add_done_callback(done)
        # One caller giving up (its timeout) does not cancel the read for the others.
        parsed: T = await asyncio.shield(shared)
        return parsed

    async def _read_parsed(self, out: Outbound, parse: Callable[[UpstreamResponse], T]) -> T:
        return parse(await self.send_once(out))

    async def send(
        self, out: Outbound, on_attempt: Callable[[Attempt], Awaitable[None]] | None = None
    ) -> UpstreamResponse:
        """Send with retries; the final answer, or ForwardFailed after the last attempt."""
        if self._observer is not None:
            on_attempt = _observed(self._observer, on_attempt)
        last: UpstreamResponse | None = None
        error = "no attempt made"
        for number in range(1, self.attempts + 1):
            started = time.perf_counter()
            try:
                resp = await self.send_once(out)
            except UpstreamError as exc:
                last, error = None, str(exc)
                retry = number < self.attempts
                delay = backoff(number) if retry else 0.0
                if on_attempt:
                    latency = (time.perf_counter() - started) * 1000
                    await on_attempt(Attempt(number, None, error, latency, retry, delay))
            else:
                last = resp
                retry = should_retry(resp.status, resp.headers)
                if not retry:
                    if on_attempt:
                        await on_attempt(
                            Attempt(number, resp.status, None, resp.latency_ms, False, 0)
                        )
                    if self._observer is not None:
                        self._observer.forward_finished(True)
                    return resp
                error = f"upstream answered {resp.status}"
                retry = number < self.attempts
                delay = backoff(number, resp.headers) if retry else 0.0
                if on_attempt:
                    await on_attempt(
                        Attempt(number, resp.status, error, resp.latency_ms, retry, delay)
                    )
            if retry:
                await self._sleep(delay)
        if self._observer is not None:
            self._observer.forward_finished(False)
        raise ForwardFailed(f"{error} after {self.attempts} attempts", last)


def _observed(
    observer: ForwardObserver, on_attempt: Callable[[Attempt], Awaitable[None]] | None
) -> Callable[[Attempt], Awaitable[None]]:
    async def report(attempt: Attempt) -> None:
        observer.forward_attempt(attempt)
        if on_attempt is not None:
            await on_attempt(attempt)

    return report
