"""The dashboard: sign-in, the list of actions, and each action's receipt (PRODUCT.md §7).

Every page needs a signed-in user (session cookie from ``/dashboard/login``,
or the admin token as a bearer header); without one, a page shows the
sign-in form and nothing of any action. Forms that change state carry the
session's CSRF token.
"""

from __future__ import annotations

import urllib.parse
from typing import Any

from aiohttp import web

from gateway.errors import Conflict, InvalidRequest, NotFound
from gateway.keys import ACTIONS, STORE
from gateway.store.base import STATUSES, ActionFilter, ActionRecord
from gateway.templating import context_rows, current_value, param_rows, pretty_json
from gateway.web.pages import MAX_NOTE, edits_from, field, message, now, page, read_form, root
from gateway.web.session import (
    Auth,
    csrf_ok,
    csrf_token,
    current,
    dashboard_open,
    login_nonce,
    login_nonce_ok,
    remember_login_nonce,
    sign_in,
    sign_out,
    token_matches,
)
from gateway.web.timeline import timeline

PAGE_SIZE = 25
HOME = "/dashboard/actions"
# The stored headers are an allow-list already; these never show, whatever changes there.
HIDDEN = frozenset({"authorization", "proxy-authorization", "cookie"})


def redirect(request: web.Request, path: str) -> web.Response:
    """303 to a dashboard path (under COSIGNER_PUBLIC_URL's sub-path, if any)."""
    return web.Response(status=303, headers={"Location": root(request) + path})


def _safe_next(value: str) -> str:
    """Only ever return to a dashboard page: never an open redirect."""
    ok = (
        value.startswith("/dashboard/")
        and not value.startswith("/dashboard/login")
        and "\\" not in value
        and "//" not in value
        and value.isprintable()
    )
    return value if ok else HOME


def shown_status(action: ActionRecord, moment: float) -> str:
    """The status a person should see (an undecided action past its time is expired)."""
    if action.status == "awaiting_approval" and action.expires_at <= moment:
        return "expired"
    return action.status


# -- signing in and out -------------------------------------------------------------------


def _login_page(
    request: web.Request, *, status: int = 200, error: str | None = None, next_: str = HOME
) -> web.Response:
    nonce, form_token = login_nonce(request)
    response = page(
        request,
        "login.html",
        status=status,
        title="Sign in",
        error=error,
        next=next_,
        login_csrf=form_token,
        dashboard_open=dashboard_open(request),
    )
    remember_login_nonce(request, response, nonce)
    return response


def _signed_in(request: web.Request) -> Auth | web.Response:
    """The signed-in user, or a 401 sign-in page that shows nothing else."""
    auth = current(request)
    if auth is None:
        next_ = _safe_next(request.path_qs) if request.method == "GET" else HOME
        return _login_page(request, status=401, next_=next_)
    return auth


async def login_form(request: web.Request) -> web.Response:
    """``GET /dashboard/login``."""
    next_ = _safe_next(request.query.get("next", ""))
    if current(request) is not None:
        return redirect(request, next_)
    return _login_page(request, next_=next_)


async def login(request: web.Request) -> web.Response:
    """``POST /dashboard/login`` (field ``token``): sets the session cookie."""
    form = await read_form(request)
    if form is None:
        return _login_page(request, status=400, error="Please use the sign-in form.")
    next_ = _safe_next(field(form, "next"))
    if not dashboard_open(request):
        return _login_page(request, status=403, next_=next_)
    if not login_nonce_ok(request, field(form, "csrf")):
        return _login_page(
            request, status=403, error="The sign-in form expired. Please try again.", next_=next_
        )
    if not token_matches(request, field(form, "token", 4096)):
        return _login_page(request, status=401, error="That is not the admin token.", next_=next_)
    response = redirect(request, next_)
    sign_in(request, response, field(form, "reviewer", 320))
    return response


async def logout(request: web.Request) -> web.Response:
    """``POST /dashboard/logout``."""
    auth = _signed_in(request)
    if isinstance(auth, web.Response):
        return auth
    form = await read_form(request)
    if form is None or not csrf_ok(request, auth, field(form, "csrf")):
        return _csrf_failed(request, auth)
    response = redirect(request, "/dashboard/login")
    sign_out(response)
    return response


def _csrf_failed(request: web.Request, auth: Auth) -> web.Response:
    return message(
        request,
        403,
        "Not done: the form could not be verified",
        "The form expired or did not come from this dashboard. Reload the page and try again.",
        signed_in=True,
        csrf=csrf_token(request, auth),
    )


# -- the list -----------------------------------------------------------------------------


async def list_actions(request: web.Request) -> web.Response:
    """``GET /dashboard/actions?status=&agent=&rule=&starting_after=``: newest first."""
    auth = _signed_in(request)
    if isinstance(auth, web.Response):
        return auth
    q, store = request.query, request.app[STORE]
    status = q.get("status", "")
    notice = None
    if status and status not in STATUSES:
        notice, status = f"Unknown status {status!r}: showing every status.", ""
    agent, rule = q.get("agent", "").strip(), q.get("rule", "").strip()
    after = q.get("starting_after", "").strip()
    if after and await store.get_action(after) is None:
        notice, after = "That page no longer exists: showing the newest actions.", ""
    actions, has_more = await store.list_actions(
        ActionFilter(
            status=status or None,
            agent=agent or None,
            rule=rule or None,
            limit=PAGE_SIZE,
            starting_after=after or None,
        )
    )
    moment = now(request)
    rows = []
    for action in actions:
        decisions = await store.decisions(action.id)
        rows.append(
            {
                "action": action,
                "status": shown_status(action, moment),
                "approvals": sum(1 for d in decisions if d.decision == "approve"),
            }
        )
    filters = {k: v for k, v in (("status", status), ("agent", agent), ("rule", rule)) if v}
    older = (
        "?" + urllib.parse.urlencode({**filters, "starting_after": actions[-1].id})
        if has_more and actions
        else None
    )
    newest = ("?" + urllib.parse.urlencode(filters)) if after else None
    return page(
        request,
        "actions.html",
        title="Actions",
        signed_in=True,
        csrf=csrf_token(request, auth),
        rows=rows,
        statuses=STATUSES,
        status_filter=status,
        agent=agent,
        rule=rule,
        notice=notice,
        older=older,
        newest=newest,
    )


# -- the receipt --------------------------------------------------------------------------


async def _receipt(
    request: web.Request,
    auth: Auth,
    action: ActionRecord,
    *,
    status: int = 200,
    error: str | None = None,
    typed: dict[str, str] | None = None,
    note: str = "",
    reviewer: str | None = None,
) -> web.Response:
    store = request.app[STORE]
    decisions = await store.decisions(action.id)
    shown = shown_status(action, now(request))
    entries = timeline(await store.events(action.id), await store.outbox(action.id))
    editable = [
        {"name": n, "value": (typed or {}).get(n, current_value(action, n))}
        for n in action.editable
    ]
    return page(
        request,
        "receipt.html",
        status=status,
        title=action.summary,
        signed_in=True,
        csrf=csrf_token(request, auth),
        action=action,
        status_shown=shown,
        params=param_rows(action),
        context_rows=context_rows(action),
        request_headers=[
            (k, v) for k, v in sorted(action.headers.items()) if k.lower() not in HIDDEN
        ],
        decisions=decisions,
        approvals=sum(1 for d in decisions if d.decision == "approve"),
        timeline=entries,
        response_body=pretty_json(action.response_body),
        editable=editable,
        can_decide=shown == "awaiting_approval",
        reviewer=auth.reviewer if reviewer is None else reviewer,
        note=note,
        error=error,
        # Reload while the forward runs, so Stripe's answer appears by itself.
        refresh=5 if shown == "pending" else None,
    )


async def receipt(request: web.Request) -> web.Response:
    """``GET /dashboard/actions/{id}``: the receipt."""
    auth = _signed_in(request)
    if isinstance(auth, web.Response):
        return auth
    action = await request.app[STORE].get_action(request.match_info["id"])
    if action is None:
        return _missing(request, auth)
    return await _receipt(request, auth, action)


def _missing(request: web.Request, auth: Auth) -> web.Response:
    return message(
        request,
        404,
        "No such action",
        "There is no action with that id.",
        signed_in=True,
        csrf=csrf_token(request, auth),
    )


async def decide(request: web.Request) -> web.Response:
    """``POST /dashboard/actions/{id}/decide``: approve (with edits) or reject."""
    auth = _signed_in(request)
    if isinstance(auth, web.Response):
        return auth
    form = await read_form(request)
    if form is None or not csrf_ok(request, auth, field(form, "csrf")):
        return _csrf_failed(request, auth)
    store, actions = request.app[STORE], request.app[ACTIONS]
    action = await store.get_action(request.match_info["id"])
    if action is None:
        return _missing(request, auth)
    decision = field(form, "decision")
    reviewer = field(form, "reviewer", 320)
    note = field(form, "note", MAX_NOTE)
    typed = {name: field(form, "param." + name) for name in action.editable}
    again: dict[str, Any] = {"typed": typed, "note": note, "reviewer": reviewer}
    if decision not in ("approve", "reject"):
        return await _receipt(
            request, auth, action, status=400, error="Choose Approve or Reject.", **again
        )
    if not reviewer:
        return await _receipt(
            request, auth, action, status=400, error="Enter your name or email.", **again
        )
    try:
        if decision == "approve":
            edits = edits_from(form, action)
            await actions.approve(
                action.id,
                reviewer=reviewer,
                via="dashboard",
                note=note or None,
                params=edits or None,
            )
        else:
            await actions.reject(action.id, reviewer=reviewer, via="dashboard", note=note or None)
    except InvalidRequest as exc:
        error, code = f"Not recorded: {exc.message}", 400
    except Conflict as exc:
        error, code = f"Not recorded: {exc.message}", 409
    except NotFound:
        return _missing(request, auth)
    else:
        return redirect(request, f"/dashboard/actions/{action.id}")
    fresh = await store.get_action(action.id)
    return await _receipt(request, auth, fresh or action, status=code, error=error, **again)


async def home(request: web.Request) -> web.Response:
    """``/dashboard`` → the list."""
    return redirect(request, HOME)


ROUTES = (
    web.get("/dashboard", home),
    web.get("/dashboard/", home),
    web.get("/dashboard/login", login_form),
    web.post("/dashboard/login", login),
    web.post("/dashboard/logout", logout),
    web.get("/dashboard/actions", list_actions),
    web.get("/dashboard/actions/{id}", receipt),
    web.post("/dashboard/actions/{id}/decide", decide),
)
