"""The forwarder's retry policy (stripe-python's), against real HTTP servers on 127.0.0.1.

The waits between attempts go through an injected sleep that records them, so
the policy is checked exactly without the test sleeping through it.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from gateway.forwarder import (
    INITIAL_DELAY,
    MAX_DELAY,
    MAX_RETRY_AFTER,
    Attempt,
    Forwarder,
    ForwardFailed,
    Outbound,
    UpstreamResponse,
    backoff,
    should_retry,
)
from tests.support.peers import free_port

Script = list[tuple[int, dict[str, str]]]


class Upstream:
    """Answers each request with the next (status, headers) of a script; records what came."""

    def __init__(self, script: Script, delay: float = 0.0) -> None:
        self.script = list(script)
        self.delay = delay
        self.seen: list[dict[str, str]] = []
        self.url = ""

    async def handle(self, request: web.Request) -> web.Response:
        self.seen.append(dict(request.headers))
        if self.delay:
            await asyncio.sleep(self.delay)
        status, headers = self.script.pop(0) if self.script else (200, {})
        return web.json_response({"status": status}, status=status, headers=headers)


@pytest.fixture
async def serve() -> AsyncIterator[Callable[[Upstream], Any]]:
    runners: list[web.AppRunner] = []

    async def start(upstream: Upstream) -> Upstream:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", upstream.handle)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        port = free_port()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        runners.append(runner)
        upstream.url = f"http://127.0.0.1:{port}"
        return upstream

    yield start
    for runner in runners:
        await runner.cleanup()


OUT = Outbound("POST", "/v1/refunds", "", {"Idempotency-Key": "key-1"}, b"charge=ch_1&amount=100")


async def send(
    url: str, *, attempts: int = 4, timeout: float = 5.0
) -> tuple[Any, list[Attempt], list[float]]:
    slept: list[float] = []
    log: list[Attempt] = []

    async def sleep(seconds: float) -> None:
        slept.append(seconds)

    async def on_attempt(attempt: Attempt) -> None:
        log.append(attempt)

    async with aiohttp.ClientSession() as session:
        forwarder = Forwarder(session, url, timeout=timeout, attempts=attempts, sleep=sleep)
        try:
            result: Any = await forwarder.send(OUT, on_attempt)
        except ForwardFailed as exc:
            result = exc
    return result, log, slept


@pytest.mark.parametrize("status", [409, 429, 500, 502, 503])
async def test_retryable_answers_are_retried_with_the_same_key(serve: Any, status: int) -> None:
    upstream = await serve(Upstream([(status, {}), (status, {})]))
    resp, log, slept = await send(upstream.url)
    assert resp.status == 200
    assert [a.status for a in log] == [status, status, 200]
    assert [a.will_retry for a in log] == [True, True, False]
    assert {h["Idempotency-Key"] for h in upstream.seen} == {"key-1"}
    assert len(slept) == 2 and all(INITIAL_DELAY <= s <= MAX_DELAY for s in slept)


@pytest.mark.parametrize("status", [400, 401, 402, 403, 404])
async def test_other_4xx_are_final(serve: Any, status: int) -> None:
    upstream = await serve(Upstream([(status, {})]))
    resp, log, slept = await send(upstream.url)
    assert resp.status == status and len(upstream.seen) == 1
    assert [(a.status, a.will_retry) for a in log] == [(status, False)]
    assert slept == []


async def test_stripe_should_retry_overrides_the_status(serve: Any) -> None:
    upstream = await serve(
        Upstream([(503, {"Stripe-Should-Retry": "false"}), (400, {"Stripe-Should-Retry": "true"})])
    )
    resp, _, _ = await send(upstream.url)
    assert resp.status == 503 and len(upstream.seen) == 1  # told not to retry a 503
    upstream.script = [(400, {"Stripe-Should-Retry": "true"})]
    resp, log, _ = await send(upstream.url)
    assert resp.status == 200 and [a.status for a in log] == [400, 200]  # told to retry a 400


async def test_429_waits_for_retry_after(serve: Any) -> None:
    upstream = await serve(Upstream([(429, {"Retry-After": "7"}), (429, {"Retry-After": "0"})]))
    resp, log, slept = await send(upstream.url)
    assert resp.status == 200
    assert slept[0] == 7.0  # what Stripe asked for (longer than the backoff)
    assert INITIAL_DELAY <= slept[1] <= MAX_DELAY  # never less than the backoff
    assert [a.delay for a in log[:2]] == slept


async def test_retry_after_is_capped(serve: Any) -> None:
    upstream = await serve(Upstream([(429, {"Retry-After": "3600"})]))
    _, _, slept = await send(upstream.url)
    assert slept == [MAX_RETRY_AFTER]


async def test_each_attempt_has_its_own_timeout(serve: Any) -> None:
    upstream = await serve(Upstream([], delay=2.0))
    result, log, slept = await send(upstream.url, attempts=2, timeout=0.3)
    assert isinstance(result, ForwardFailed) and result.last is None
    assert "2 attempts" in str(result)
    assert [a.status for a in log] == [None, None]
    assert all("timed out" in (a.error or "") for a in log)
    assert all(a.latency_ms < 1500 for a in log)  # cut at 0.3 s, far from the 2 s answer
    assert len(slept) == 1 and len(upstream.seen) == 2


async def test_connection_errors_are_retried_then_fail() -> None:
    result, log, slept = await send(f"http://127.0.0.1:{free_port()}", attempts=3)
    assert isinstance(result, ForwardFailed) and result.last is None
    assert [a.will_retry for a in log] == [True, True, False]
    assert len(slept) == 2


async def test_out_of_attempts_keeps_the_last_answer(serve: Any) -> None:
    upstream = await serve(Upstream([(503, {})] * 3))
    result, _, _ = await send(upstream.url, attempts=3)
    assert isinstance(result, ForwardFailed)
    assert result.last is not None and result.last.status == 503


def test_policy_table() -> None:
    assert should_retry(409, {}) and should_retry(429, {}) and should_retry(500, {})
    assert not should_retry(400, {}) and not should_retry(404, {}) and not should_retry(200, {})
    assert not should_retry(500, {"Stripe-Should-Retry": "false"})
    assert should_retry(400, {"Stripe-Should-Retry": "true"})
    for attempt in range(1, 10):
        delay = backoff(attempt)
        assert INITIAL_DELAY <= delay <= MAX_DELAY
    assert backoff(1, {"Retry-After": "not-a-number"}) <= MAX_DELAY


# -- reads the gateway makes for itself (lookups) are shared while in flight -----------------


def _lookup(key: str = "sk_test_1", path: str = "/v1/charges/ch_1") -> Outbound:
    return Outbound("GET", path, "", {"Authorization": f"Bearer {key}"}, b"")


def _status(resp: UpstreamResponse) -> int:
    return resp.status


async def test_identical_reads_in_flight_share_one_request(serve: Any) -> None:
    upstream = await serve(Upstream([], delay=0.3))
    async with aiohttp.ClientSession() as session:
        forwarder = Forwarder(session, upstream.url, timeout=5, attempts=1)
        answers = await asyncio.gather(
            *(forwarder.read_shared(_lookup(), _status) for _ in range(5))
        )
        assert len(upstream.seen) == 1 and set(answers) == {200}
        # Once the answer is in, the next read goes to Stripe afresh.
        await forwarder.read_shared(_lookup(), _status)
        assert len(upstream.seen) == 2


async def test_reads_with_other_keys_or_paths_are_never_shared(serve: Any) -> None:
    upstream = await serve(Upstream([], delay=0.3))
    async with aiohttp.ClientSession() as session:
        forwarder = Forwarder(session, upstream.url, timeout=5, attempts=1)
        await asyncio.gather(
            forwarder.read_shared(_lookup("sk_test_1"), _status),
            forwarder.read_shared(_lookup("sk_test_2"), _status),
            forwarder.read_shared(_lookup("sk_test_1", "/v1/charges/ch_2"), _status),
        )
        assert sorted(h["Authorization"] for h in upstream.seen) == [
            "Bearer sk_test_1",
            "Bearer sk_test_1",
            "Bearer sk_test_2",
        ]


async def test_a_reader_that_gives_up_leaves_the_read_to_the_others(serve: Any) -> None:
    upstream = await serve(Upstream([], delay=0.4))
    async with aiohttp.ClientSession() as session:
        forwarder = Forwarder(session, upstream.url, timeout=5, attempts=1)
        patient = asyncio.ensure_future(forwarder.read_shared(_lookup(), _status))
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.1):
                await forwarder.read_shared(_lookup(), _status)
        assert (await patient) == 200
        assert len(upstream.seen) == 1


async def test_a_shared_read_is_parsed_once_and_every_caller_gets_that_value(serve: Any) -> None:
    upstream = await serve(Upstream([], delay=0.3))
    parsed: list[UpstreamResponse] = []

    def decode(resp: UpstreamResponse) -> dict[str, Any]:
        parsed.append(resp)
        return dict(json.loads(resp.body))

    async with aiohttp.ClientSession() as session:
        forwarder = Forwarder(session, upstream.url, timeout=5, attempts=1)
        answers = await asyncio.gather(
            *(forwarder.read_shared(_lookup(), decode) for _ in range(5))
        )
        assert len(parsed) == 1 and all(a is answers[0] for a in answers)
        assert answers[0] == {"status": 200}
        # Another parse of the same GET is a read of its own: it is part of what is shared.
        await asyncio.gather(
            forwarder.read_shared(_lookup(), decode), forwarder.read_shared(_lookup(), _status)
        )
        assert len(upstream.seen) == 3


async def test_a_parse_that_fails_fails_every_caller_of_that_read(serve: Any) -> None:
    upstream = await serve(Upstream([], delay=0.2))

    def broken(resp: UpstreamResponse) -> int:
        raise ValueError("unreadable")

    async with aiohttp.ClientSession() as session:
        forwarder = Forwarder(session, upstream.url, timeout=5, attempts=1)
        results = await asyncio.gather(
            *(forwarder.read_shared(_lookup(), broken) for _ in range(3)), return_exceptions=True
        )
        assert all(isinstance(r, ValueError) for r in results)
        assert len(upstream.seen) == 1
        assert await forwarder.read_shared(_lookup(), _status) == 200  # nothing left behind
