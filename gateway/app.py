"""The application factory: wires settings, store, rules, upstream and workers together."""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import aiohttp
from aiohttp import web

from gateway import keys
from gateway.actions import ActionService
from gateway.agents import AgentResolver
from gateway.crypto import Keyring
from gateway.errors import CosignerError, error_from_http, error_response
from gateway.forwarder import Forwarder
from gateway.notify import Notifier
from gateway.policy import Policy
from gateway.proxy import proxy
from gateway.settings import Settings, load_secret_key
from gateway.store import store_from_url
from gateway.store.base import Store
from gateway.tasks import TaskSet
from gateway.web import api
from gateway.workers import every

log = logging.getLogger("cosigner")
access = logging.getLogger("cosigner.access")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
RESERVED_PREFIXES = ("/cosigner/", "/dashboard", "/review/", "/healthz")


@web.middleware
async def errors_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """The one place errors become answers: Stripe's shape, a request id, one log line."""
    info = keys.RequestInfo("req_" + secrets.token_urlsafe(12))
    request[keys.INFO] = info
    started = time.perf_counter()
    try:
        response = await handler(request)
    except CosignerError as exc:
        response = error_response(exc)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        response = error_response(error_from_http(exc))
    except Exception:
        log.exception("unhandled error on %s %s", request.method, request.path)
        err = CosignerError("An unexpected error occurred in the gateway.", code="internal_error")
        err.status, err.type = 500, "api_error"
        response = error_response(err)
    response.headers["Cosigner-Request-Id"] = info.request_id
    if access.isEnabledFor(logging.INFO):
        access.info(
            "request_id=%s agent=%s method=%s path=%s rule=%s decision=%s action=%s status=%s "
            "upstream=%s latency_ms=%.1f",
            info.request_id,
            info.agent,
            request.method,
            request.path,
            info.rule,
            info.decision,
            info.action_id,
            response.status,
            info.upstream_status or "-",
            (time.perf_counter() - started) * 1000,
        )
    return response


async def healthz(request: web.Request) -> web.Response:
    """200 once the store and rules are loaded."""
    await request.app[keys.STORE].ping()
    rules = request.app[keys.POLICY].current
    return web.json_response({"status": "ok", "rules": len(rules.rules)})


async def reserved_not_found(request: web.Request) -> web.Response:
    """Gateway paths that exist nowhere are 404, never proxied to Stripe."""
    raise web.HTTPNotFound()


def create_app(
    settings: Settings,
    *,
    store: Store | None = None,
    upstream: aiohttp.ClientSession | None = None,
    clock: Callable[[], float] = time.time,
) -> web.Application:
    """Build the gateway. Tests inject a store, an upstream session and a clock."""
    # Room above max_body so the proxy can answer 413 in Stripe's shape itself.
    app = web.Application(middlewares=[errors_middleware], client_max_size=settings.max_body)
    previous = (
        [settings.secret_key_previous.get_secret_value().encode()]
        if (settings.secret_key_previous)
        else []
    )
    keyring = Keyring(load_secret_key(settings), previous)
    app[keys.SETTINGS] = settings
    app[keys.KEYRING] = keyring
    app[keys.POLICY] = Policy.load(settings.rules)
    app[keys.STORE] = store or store_from_url(settings.database, clock=clock)
    app[keys.AGENTS] = AgentResolver(keyring, require_agent_keys=settings.require_agent_keys)
    app[keys.NOTIFIER] = Notifier()
    app[keys.TASKS] = TaskSet()

    async def store_ctx(app: web.Application) -> AsyncIterator[None]:
        await app[keys.STORE].open()
        yield
        await app[keys.STORE].close()

    async def upstream_ctx(app: web.Application) -> AsyncIterator[None]:
        owned = upstream is None
        session = upstream or aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=200, ttl_dns_cache=300),
            # SECURITY: never read proxy settings from the environment for the money path.
            trust_env=False,
        )
        app[keys.UPSTREAM_SESSION] = session
        app[keys.FORWARDER] = Forwarder(
            session,
            settings.upstream,
            timeout=settings.forward_timeout,
            attempts=settings.forward_attempts,
        )
        app[keys.ACTIONS] = ActionService(
            app[keys.STORE],
            keyring,
            app[keys.FORWARDER],
            app[keys.NOTIFIER],
            app[keys.TASKS],
            clock=clock,
        )
        yield
        if owned:
            await session.close()

    async def workers_ctx(app: web.Application) -> AsyncIterator[None]:
        actions = app[keys.ACTIONS]
        tasks = app[keys.TASKS]
        loops = [
            tasks.spawn(every(settings.worker_interval, "expiry", actions.expire_due)),
            tasks.spawn(every(settings.worker_interval, "forwards", actions.resume_forwards)),
        ]
        yield
        for loop in loops:
            loop.cancel()
        # Finish in-flight forwards within the grace period; leases cover the rest.
        await tasks.drain(settings.shutdown_grace)

    app.cleanup_ctx.extend([store_ctx, upstream_ctx, workers_ctx])
    app.router.add_get("/healthz", healthz)
    api.setup(app)
    for prefix in RESERVED_PREFIXES:
        app.router.add_route("*", prefix.rstrip("/") + "/{tail:.*}", reserved_not_found)
    app.router.add_route("*", "/{tail:.*}", proxy)
    return app
