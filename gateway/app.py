"""The application factory: wires settings, store, rules, upstream and workers together."""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable

import aiohttp
from aiohttp import web
from multidict import istr

from gateway import keys
from gateway.actions import ActionService
from gateway.agents import AgentResolver
from gateway.budgets import Budgets
from gateway.callbacks import CallbackSender, callback_secret, callback_session
from gateway.crypto import Keyring
from gateway.errors import CosignerError, error_from_http, error_response
from gateway.forwarder import Forwarder
from gateway.ids import request_id
from gateway.logs import log_request, loggable_path
from gateway.mail import Mailer, MailOutbox, mailer_from_settings
from gateway.metrics import Metrics
from gateway.notify import Notifier
from gateway.policy import Policy
from gateway.proxy import proxy
from gateway.ratelimit import LIMITED_PREFIXES, address_limits, limiter_from_settings
from gateway.reload import reload_ctx
from gateway.settings import Settings, load_secret_key
from gateway.store import store_from_url
from gateway.store.base import Store
from gateway.tasks import TaskSet
from gateway.web import api, dashboard, ops, pages, review
from gateway.workers import every

log = logging.getLogger("cosigner")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
# As an istr, folded once: a plain str name is case-folded on every response.
REQUEST_ID_HEADER = istr("Cosigner-Request-Id")
RESERVED_PREFIXES = ("/cosigner/", "/dashboard", "/review/", "/healthz", "/readyz", "/metrics")


def answered(handler: Handler, *, address_limits: bool = True) -> Handler:
    """``handler`` as every route runs it: errors in Stripe's shape, a request id, one log line.

    The one place errors become answers: create_app wraps each route's handler in it.
    Not a middleware: aiohttp runs every request of an app that has middlewares through
    two more coroutine layers (the middleware and one that tracks the current app), and
    a proxied GET is cheap enough for those to show. ``address_limits``: the per-address
    limits of the pages and sign-ins run from here, for their paths only (the proxy's
    route never serves one of those paths, so it does not look).
    """

    @functools.wraps(handler)
    async def answer(request: web.Request) -> web.StreamResponse:
        info = keys.RequestInfo(request_id())
        request[keys.INFO] = info
        started = time.perf_counter()
        try:
            if address_limits and request.path.startswith(LIMITED_PREFIXES):
                response = await request.app[keys.ADDRESS_LIMITS](request, handler)
            else:
                response = await handler(request)
        except CosignerError as exc:
            response = error_response(exc)
        except web.HTTPException as exc:
            if exc.status < 400:
                # Redirects stay exceptions for aiohttp to send; they still get an id and a line.
                _finish(request, info, exc, started)
                raise
            response = error_response(error_from_http(exc))
        except Exception:
            path = loggable_path(request.rel_url.raw_path)
            log.exception("unhandled error on %s %s (%s)", request.method, path, info.request_id)
            err = CosignerError(
                "An unexpected error occurred in the gateway.", code="internal_error"
            )
            err.status, err.type = 500, "api_error"
            response = error_response(err)
        _finish(request, info, response, started)
        return response

    return answer


def _answered(routes: Iterable[web.RouteDef]) -> list[web.RouteDef]:
    out = []
    for route in routes:
        if isinstance(route.handler, type):
            raise TypeError(f"{route.path}: class-based views are not used here")
        out.append(web.RouteDef(route.method, route.path, answered(route.handler), route.kwargs))
    return out


def _finish(
    request: web.Request, info: keys.RequestInfo, response: web.StreamResponse, started: float
) -> None:
    """Stamp the request id, count the request, and write its one canonical log line."""
    if not response.prepared:
        response.headers[REQUEST_ID_HEADER] = info.request_id
    request.app[keys.METRICS].request(info.decision, info.rule, response.status)
    log_request(info, request, response.status, started)


async def reserved_not_found(request: web.Request) -> web.Response:
    """Gateway paths that exist nowhere are 404, never proxied to Stripe."""
    raise web.HTTPNotFound()


def create_app(
    settings: Settings,
    *,
    store: Store | None = None,
    upstream: aiohttp.ClientSession | None = None,
    mailer: Mailer | None = None,
    clock: Callable[[], float] = time.time,
) -> web.Application:
    """Build the gateway. Tests inject a store, an upstream session, a mailer and a clock."""
    limiter = limiter_from_settings(settings)
    # A declared Content-Length over max_body gets the proxy's own 413; a body that grows
    # past it while read is refused by aiohttp, answered in Stripe's shape (error_from_http).
    app = web.Application(client_max_size=settings.max_body)
    app[keys.LIMITS] = limiter
    app[keys.ADDRESS_LIMITS] = address_limits(limiter, page_answer=pages.too_many_requests)
    previous = (
        [settings.secret_key_previous.get_secret_value().encode()]
        if (settings.secret_key_previous)
        else []
    )
    keyring = Keyring(load_secret_key(settings), previous)
    app[keys.SETTINGS] = settings
    app[keys.KEYRING] = keyring
    app[keys.POLICY] = Policy.load(settings.rules)
    app[keys.METRICS] = Metrics(app[keys.POLICY])
    app[keys.STORE] = store or store_from_url(settings.database, clock=clock)
    app[keys.AGENTS] = AgentResolver(
        keyring,
        app[keys.STORE],
        require_agent_keys=settings.require_agent_keys,
        stripe_key=settings.stripe_key,
    )
    app[keys.NOTIFIER] = Notifier()
    app[keys.TASKS] = TaskSet()
    app[keys.CLOCK] = clock
    app[keys.BUDGETS] = Budgets(app[keys.STORE], clock=clock)
    app[keys.MAILER] = mailer or mailer_from_settings(settings)
    app[keys.MAIL_OUTBOX] = MailOutbox.from_settings(
        app[keys.STORE], app[keys.MAILER], keyring, settings, clock
    )

    async def store_ctx(app: web.Application) -> AsyncIterator[None]:
        await app[keys.STORE].open()
        # Other replicas' status changes wake this replica's Cosigner-Wait waiters too.
        await app[keys.STORE].subscribe(app[keys.NOTIFIER].publish)
        yield
        await app[keys.STORE].close()

    async def upstream_ctx(app: web.Application) -> AsyncIterator[None]:
        owned = upstream is None
        session = upstream or aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=200, ttl_dns_cache=300),
            # SECURITY: never read proxy settings from the environment for the money path.
            trust_env=False,
            # SECURITY: a cookie Stripe sets for one agent's call is never sent with another's
            # (nor kept at all). It also spares every forward the jar's bookkeeping.
            cookie_jar=aiohttp.DummyCookieJar(),
        )
        app[keys.UPSTREAM_SESSION] = session
        app[keys.FORWARDER] = Forwarder(
            session,
            settings.upstream,
            timeout=settings.forward_timeout,
            attempts=settings.forward_attempts,
            observer=app[keys.METRICS],
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

    async def callbacks_ctx(app: web.Application) -> AsyncIterator[None]:
        async with callback_session() as session:
            app[keys.CALLBACKS] = CallbackSender(
                session,
                app[keys.STORE],
                settings,
                callback_secret(settings, keyring),
                app[keys.TASKS],
                delays=settings.callback_delays,
                secret_configured=settings.callback_secret is not None,
                clock=clock,
            )
            yield

    async def release_waiters(app: web.Application) -> None:
        # Cosigner-Wait requests answer with the action as it stands rather than delay shutdown.
        app[keys.NOTIFIER].close()

    async def workers_ctx(app: web.Application) -> AsyncIterator[None]:
        actions = app[keys.ACTIONS]
        tasks = app[keys.TASKS]
        stop = tasks.stopping
        for name, step in (
            ("expiry", actions.expire_due),
            ("forwards", actions.resume_forwards),
            ("mail", app[keys.MAIL_OUTBOX].step),
            ("callbacks", app[keys.CALLBACKS].deliver_due),
        ):
            tasks.spawn(every(settings.worker_interval, name, step, stop=stop), name=name)
        yield
        # Loops finish the step they are in (an email being sent, a forward being claimed)
        # and stop; in-flight forwards and deliveries get the grace period, leases the rest.
        await tasks.drain(settings.shutdown_grace)

    app.cleanup_ctx.extend([store_ctx, upstream_ctx, callbacks_ctx, workers_ctx])
    app.on_shutdown.append(release_waiters)
    app.cleanup_ctx.append(reload_ctx)
    ops.setup(app)
    app.router.add_routes(
        _answered(
            [*ops.ROUTES, *api.ROUTES, *pages.static_routes(), *review.ROUTES, *dashboard.ROUTES]
        )
    )
    for prefix in RESERVED_PREFIXES:
        path = prefix.rstrip("/") + "/{tail:.*}"
        app.router.add_route("*", path, answered(reserved_not_found))
    app.router.add_route("*", "/{tail:.*}", answered(proxy, address_limits=False))
    return app
