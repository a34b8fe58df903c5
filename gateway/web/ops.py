"""What operators and orchestrators call: ``/healthz``, ``/readyz`` and ``/metrics``.

``/healthz`` is liveness: the process answers, the store is reachable and
rules are loaded. ``/readyz`` is readiness to take traffic: all of that, plus
startup finished (the upstream session is open) and no shutdown under way.
Both answer 200 or 503 with the reasons, never a stack trace.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from aiohttp import web

from gateway.keys import METRICS, POLICY, SHUTTING_DOWN, STORE, UPSTREAM_SESSION
from gateway.metrics import StoreSnapshot

log = logging.getLogger("cosigner.health")

PROBE_TIMEOUT = 5.0  # seconds a probe waits for the store


async def _store_problem(app: web.Application) -> str | None:
    try:
        await asyncio.wait_for(app[STORE].ping(), PROBE_TIMEOUT)
    except Exception as exc:
        # Details go to the log only: a probe's answer is seen by whoever can reach it.
        log.warning("store unreachable: %s: %s", type(exc).__name__, exc)
        return f"store unreachable ({type(exc).__name__})"
    return None


def _answer(ok: bool, body: dict[str, Any], problems: list[str]) -> web.Response:
    if not ok:
        body = {**body, "problems": problems}
    return web.json_response(body, status=200 if ok else 503)


async def healthz(request: web.Request) -> web.Response:
    """Liveness: 200 once the store answers and rules are loaded."""
    problems = [p for p in [await _store_problem(request.app)] if p]
    rules = len(request.app[POLICY].current.rules)
    status = "unavailable" if problems else "ok"
    return _answer(not problems, {"status": status, "rules": rules}, problems)


async def readyz(request: web.Request) -> web.Response:
    """Readiness: live, started, and not shutting down."""
    app = request.app
    problems = [p for p in [await _store_problem(app)] if p]
    session = app.get(UPSTREAM_SESSION)
    if session is None or session.closed:
        problems.append("upstream session not open")
    if app[SHUTTING_DOWN].is_set():
        problems.append("shutting down")
    policy = app[POLICY]
    body: dict[str, Any] = {
        "status": "not_ready" if problems else "ready",
        "rules": len(policy.current.rules),
    }
    if policy.last_error is not None:
        # Still ready: the previous rules are in force. What is wrong is in the log only.
        body["rules_reload_failed"] = True
    return _answer(not problems, body, problems)


async def metrics(request: web.Request) -> web.Response:
    """Prometheus exposition; store figures are read now, not kept in step."""
    app = request.app
    store = app[STORE]
    try:
        actions, outbox = await asyncio.wait_for(
            asyncio.gather(store.count_by_status(), store.outbox_stats()), PROBE_TIMEOUT
        )
        snapshot = StoreSnapshot(actions, outbox)
    except Exception as exc:
        log.warning("metrics: store unreachable: %s: %s", type(exc).__name__, exc)
        snapshot = StoreSnapshot(None, None)
    body, content_type = app[METRICS].render(snapshot, request.headers.get("Accept", ""))
    return web.Response(body=body, headers={"Content-Type": content_type})


async def mark_shutting_down(app: web.Application) -> None:
    """on_shutdown: from now on /readyz says 503, so balancers stop sending traffic."""
    app[SHUTTING_DOWN].set()


ROUTES = (
    web.get("/healthz", healthz),
    web.get("/readyz", readyz),
    web.get("/metrics", metrics),
)


def setup(app: web.Application) -> None:
    """What the probes need: /readyz turns 503 once shutdown begins."""
    app[SHUTTING_DOWN] = asyncio.Event()
    app.on_shutdown.append(mark_shutting_down)
