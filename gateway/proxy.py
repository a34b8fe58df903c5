"""The agent-facing handler: read → classify → allow / deny / hold (PRODUCT.md §3)."""

from __future__ import annotations

import logging
import time
from typing import Any

import aiohttp
from aiohttp import hdrs, web
from multidict import CIMultiDictProxy, istr

from gateway.actions import HoldRequest, request_hash
from gateway.agents import Agent
from gateway.budgets import Reservation
from gateway.callbacks import validate_callback_url
from gateway.canonical import CanonicalRequest, read_request
from gateway.errors import (
    ActionClosed,
    CosignerError,
    Denied,
    IdempotencyMismatch,
    InvalidBody,
    InvalidRequest,
    PayloadTooLarge,
    UnsupportedMediaType,
    UpstreamUnavailable,
)
from gateway.facts import for_reviewers
from gateway.forwarder import FORWARD_REQUEST_HEADERS, Outbound, UpstreamError
from gateway.jsontext import compact
from gateway.keys import (
    ACTIONS,
    AGENTS,
    BUDGETS,
    FORWARDER,
    INFO,
    LIMITS,
    POLICY,
    SETTINGS,
    STORE,
)
from gateway.resolve import Resolution, for_rules, needs_resolution
from gateway.rules import Decision, RuleRequest
from gateway.store.base import ActionRecord, RequestReceipt
from gateway.stripe_api import check_api_request
from gateway.summary import summarize
from gateway.views import hold_body
from gateway.waiting import HEADER as WAIT_HEADER
from gateway.waiting import parse_wait, wait_for_outcome

log = logging.getLogger("cosigner.proxy")

# SECURITY: a rule must judge the method Stripe acts on; override headers could change it.
# Lower case: a multidict's keys view compares names case-insensitively with them.
METHOD_OVERRIDE_HEADERS = frozenset(
    {"x-http-method-override", "x-http-method", "x-method-override", "x-original-method"}
)
# Bodies aiohttp decodes before we read them; any other encoding would be read as it came.
DECODED_ENCODINGS = frozenset({"identity", "gzip", "deflate"})
READ_METHODS = frozenset({"GET", "HEAD"})
MAX_JUSTIFICATION = 2000
# Header names the proxy reads, as multidict's istr: a plain str name is case-folded on
# every lookup, an istr's folding is done once, here.
AUTHORIZATION = hdrs.AUTHORIZATION
CONTENT_ENCODING = hdrs.CONTENT_ENCODING
CONTENT_TYPE = hdrs.CONTENT_TYPE
IDEMPOTENCY_KEY = istr("Idempotency-Key")
STRIPE_ACCOUNT = istr("Stripe-Account")
JUSTIFICATION = istr("Cosigner-Justification")
CALLBACK = istr("Cosigner-Callback")
WAIT = istr(WAIT_HEADER)
_FORWARDED = tuple(istr(name) for name in FORWARD_REQUEST_HEADERS)


def _forward_headers(request: web.Request) -> dict[str, str]:
    """The request headers an agent may pass to Stripe, named as Stripe documents them."""
    headers = request.headers
    out: dict[str, str] = {}
    for name in _FORWARDED:
        value = headers.get(name)
        if value is not None:
            out[name] = value
    return out


def _json(status: int, body: Any, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(
        status=status,
        text=compact(body),
        content_type="application/json",
        headers=headers,
    )


async def read_canonical(request: web.Request, max_body: int) -> CanonicalRequest:
    """The one canonical reading of a request, or a Stripe-shaped 4xx."""
    headers = request.headers
    _check_headers(headers)
    if request.content_length is not None and request.content_length > max_body:
        raise PayloadTooLarge(f"Request body is larger than {max_body} bytes.")
    try:
        body = await request.read()
    except (ConnectionResetError, aiohttp.ClientPayloadError):
        # SECURITY: a body cut short is unreadable, never "empty" or "what arrived".
        raise InvalidBody("The request body could not be read completely.") from None
    content_type = headers.get(CONTENT_TYPE) if body else None
    req = read_request(request.method, request.raw_path, content_type, body)
    # SECURITY: what Stripe reads of the request must be what the rules read.
    check_api_request(req)
    return req


def read_bodiless(request: web.Request) -> CanonicalRequest:
    """``read_canonical`` of a request without a body (most reads): nothing to await."""
    _check_headers(request.headers)
    req = read_request(request.method, request.raw_path, None, b"")
    check_api_request(req)
    return req


def _check_headers(headers: CIMultiDictProxy[str]) -> None:
    if not headers.keys().isdisjoint(METHOD_OVERRIDE_HEADERS):
        header = sorted(headers.keys() & METHOD_OVERRIDE_HEADERS)[0]
        raise InvalidRequest(f"The {header} header is not accepted by this gateway.")
    encoding = headers.get(CONTENT_ENCODING)  # usually none: identity
    if encoding is not None:
        encoding = encoding.strip().lower()
        if encoding not in DECODED_ENCODINGS:
            raise UnsupportedMediaType(f"Content-Encoding {encoding[:40]!r} is not supported.")


async def proxy(request: web.Request) -> web.StreamResponse:
    """Every Stripe API call an agent makes comes through here."""
    app = request.app
    settings = app[SETTINGS]
    headers = request.headers
    authorization = headers.get(AUTHORIZATION)
    agents = app[AGENTS]
    agent = agents.known(authorization) or await agents.resolve(authorization)
    info = request[INFO]
    info.agent = agent.name
    app[LIMITS].agent(agent.name, write=request.method not in READ_METHODS)
    if request.body_exists:
        req = await read_canonical(request, settings.max_body)
    else:
        req = read_bodiless(request)
    read = req.method in READ_METHODS  # the method as read (and upper-cased) for the rules
    info.path = req.path
    wait = parse_wait(headers.get(WAIT), settings.max_wait)
    key = headers.get(IDEMPOTENCY_KEY)
    if key and not read and req.method != "DELETE":
        existing = await app[STORE].find_idempotent(agent.name, key)
        if existing is not None:
            return await _answer(request, existing, req, wait)

    rules = app[POLICY].current
    # Implicit money (a refund without amount...) is looked up for the rules only.
    target = needs_resolution(req, rules)
    resolved = None
    if target is not None:
        resolved = await for_rules(app[FORWARDER], req, target, agent.upstream_key, headers)
    rule_request = RuleRequest(  # method, path, params, agent, account
        req.method,
        req.path,
        resolved.params if resolved is not None else req.params,
        agent.name,
        headers.get(STRIPE_ACCOUNT),
    )
    decision = rules.decide(rule_request)
    reservation = None
    if decision.budget is not None:  # its budget decides, in the store
        decision, reservation = await app[BUDGETS].decide(
            rules, rule_request, ref=info.request_id, first=decision
        )
    info.rule, info.decision = decision.rule, decision.action
    if decision.action == "allow":
        return await _allow(request, req, agent, decision, read)
    if decision.action == "deny":
        await _receipt(request, req, agent, decision, 403)
        raise Denied(decision.message or f"Denied by rule {decision.rule}.", rule=decision.rule)
    return await _hold(request, req, agent, decision, key, wait, resolved, reservation)


async def _allow(
    request: web.Request, req: CanonicalRequest, agent: Agent, decision: Decision, read: bool
) -> web.StreamResponse:
    started = time.perf_counter()  # for a write's receipt
    headers = _forward_headers(request)
    headers["Authorization"] = "Bearer " + agent.upstream_key
    if req.body and req.content_type:
        headers["Content-Type"] = req.content_type
    out = Outbound(req.method, req.path, req.query, headers, req.body)
    try:
        resp = await request.app[FORWARDER].send_once(out)
    except UpstreamError as exc:
        await _receipt(request, req, agent, decision, 502, started)
        raise UpstreamUnavailable(str(exc)) from exc
    request[INFO].upstream_status = resp.status
    if not read:
        await _receipt(request, req, agent, decision, resp.status, started)
    return web.Response(status=resp.status, body=resp.body, headers=resp.headers)


async def _receipt(
    request: web.Request,
    req: CanonicalRequest,
    agent: Agent,
    decision: Decision,
    status: int,
    started: float | None = None,
) -> None:
    """Durable receipt for a write decided without a hold."""
    latency = (time.perf_counter() - started) * 1000 if started else 0.0
    await request.app[STORE].record_request(
        RequestReceipt(  # id, ts, agent, method, path, rule, decision, status, latency_ms
            request[INFO].request_id,
            time.time(),
            agent.name,
            req.method,
            req.path,
            decision.rule,
            decision.action,
            status,
            round(latency, 2),
        )
    )


async def _hold(
    request: web.Request,
    req: CanonicalRequest,
    agent: Agent,
    decision: Decision,
    key: str | None,
    wait: int,
    resolved: Resolution | None = None,
    reservation: Reservation | None = None,
) -> web.StreamResponse:
    app = request.app
    settings = app[SETTINGS]
    justification = request.headers.get(JUSTIFICATION)
    if justification is not None and len(justification) > MAX_JUSTIFICATION:
        raise InvalidRequest(
            f"Cosigner-Justification is longer than {MAX_JUSTIFICATION} characters."
        )
    callback = request.headers.get(CALLBACK)
    if callback is not None:
        validate_callback_url(callback, settings)
    # What reviewers need, read live from Stripe; a failed lookup never fails the hold.
    context = await for_reviewers(
        app[FORWARDER], req, agent.upstream_key, request.headers, resolved
    )
    if reservation is not None:
        context["budget"] = reservation.as_context()
    action, created = await app[ACTIONS].hold(
        HoldRequest(
            request=req,
            decision=decision,
            agent=agent.name,
            credential_id=agent.credential_id,
            upstream_key=agent.upstream_key,
            headers=_forward_headers(request),
            idempotency_key=key,
            account=request.headers.get(STRIPE_ACCOUNT),
            justification=justification,
            callback_url=callback,
            summary=summarize(req.method, req.path, req.params, context),
            context=context,
            reviewers=decision.reviewers or settings.reviewer_list,
        )
    )
    # A new action was made from this very request: its hash is this request's.
    return await _answer(request, action, req, wait, action.request_hash if created else None)


async def _answer(
    request: web.Request,
    action: ActionRecord,
    req: CanonicalRequest,
    wait: int,
    req_hash: str | None = None,
) -> web.Response:
    """The outcome for this request's action, after waiting up to ``wait`` s for a decision."""
    request[INFO].action_id = action.id
    if req_hash is None:
        req_hash = request_hash(req)
    # A mismatched Idempotency-Key is refused at once, never after a wait.
    if wait and action.request_hash == req_hash:
        action = await wait_for_outcome(request.app[ACTIONS], action, wait)
    return outcome_response(action, req_hash, request.app[SETTINGS].base_url)


def outcome_response(action: ActionRecord, req_hash: str, base_url: str) -> web.Response:
    """What an agent gets for an action: the 202 while open, Stripe's answer once final."""
    if action.request_hash != req_hash:
        raise IdempotencyMismatch(
            "Keys for idempotent requests can only be used with the same parameters they were "
            f"first used with. Try using a key other than the one used for action {action.id}."
        )
    headers = {"Cosigner-Action": action.id}
    if action.status in ("awaiting_approval", "pending"):
        return _json(202, hold_body(action, base_url), headers)
    if action.status == "completed" and action.response_code is not None:
        content_type = (action.response_headers or {}).get("Content-Type", "application/json")
        return web.Response(
            status=action.response_code,
            body=(action.response_body or "").encode(),
            headers={**headers, "Content-Type": content_type},
        )
    if action.status == "failed":
        err = CosignerError(
            f"Action {action.id} could not be delivered to Stripe: {action.last_error}",
            code="cosigner_failed",
            headers=headers,
        )
        err.status, err.type = 502, "api_error"
        raise err
    raise ActionClosed(
        f"Action {action.id} was {action.status}; it was not sent to Stripe.",
        code=f"cosigner_{action.status}",
        headers=headers,
    )
